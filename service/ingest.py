"""Bulk loading from files: transaction/batch/collection Bundles (JSON) and NDJSON.

Transaction and batch Bundles go through exactly the code the HTTP API uses. Plain
resources (NDJSON lines, collection entries, single resources) are validated one by
one (service/validation), the invalid ones reported with their file and line, the
element's path and the FHIR issue code, and skipped; the valid
ones stored in chunks of one transaction each (update-or-create by id). A load may hold a
resource before the one it refers to, so literal references are checked once everything
is stored: each that resolves neither to the load nor to the database is reported (its
resource stays stored) and the load exits 1. The query planner's statistics are
refreshed as a load grows (`repository.GrowingWrite`) and when it ends, if it stored
anything: the statements a load runs per chunk (which of its resources exist, which
references resolve) would otherwise be planned for a store a fraction of its new size.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine

from service import bundles, db, references
from service.errors import FhirError
from service.store import repository
from service.validation import validate

CHUNK = 500
#: Synthea writes these beside the patient bundles; patients refer to them conditionally.
_FIRST = ("hospitalInformation", "practitionerInformation")


@dataclass
class Report:
    """What an ingest run stored and refused."""

    stored: int = 0
    files: int = 0
    rejected: list[str] = field(default_factory=list)


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files to load, directories expanded; Synthea's organisation files before the patients."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in (".json", ".ndjson") and p.is_file()))
        else:
            files.append(path)
    return sorted(files, key=lambda p: (not p.name.startswith(_FIRST), str(p)))


def _ndjson(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield where, exc


class _Loader:
    """Validates plain resources and writes them in chunks."""

    def __init__(self, engine: Engine, report: Report):
        self.engine = engine
        self.report = report
        self.chunk: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        self.anonymous: list[tuple[str, dict[str, Any]]] = []
        self.references = references.Pending()  # checked at the end: a target may come later in the load
        self.growth = repository.GrowingWrite()

    def add(self, where: str, resource: Any) -> None:
        if isinstance(resource, Exception):
            self.report.rejected.append(f"{where}: not valid JSON: {resource}")
            return
        try:
            resource_type = validate(resource)
            if resource.get("id"):
                repository.check_id(resource["id"])
        except FhirError as exc:
            self.report.rejected.append(f"{where}: {exc.message} (issue {exc.code})")
            return
        if resource.get("id"):
            key = (resource_type, resource["id"])
            if key in self.chunk:  # a later line of the same resource becomes the next version
                self.flush()
            self.chunk[key] = (resource_type, resource)
        else:
            self.anonymous.append((resource_type, resource))
        if len(self.chunk) + len(self.anonymous) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        items = [*self.chunk.values(), *self.anonymous]
        self.chunk, self.anonymous = {}, []
        if items:
            with db.write(self.engine) as conn:
                self.report.stored += len(repository.upsert(conn, items))
                self.references.note(conn, [resource for _, resource in items])
                self.growth.added(conn, self.report.stored)


def _load_json(path: Path, engine: Engine, loader: _Loader) -> None:
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        loader.report.rejected.append(f"{path}: not valid JSON: {exc}")
        return
    if isinstance(data, dict) and data.get("resourceType") == "Bundle" and data.get("type") in ("transaction", "batch"):
        try:
            with db.write(engine) as conn:
                response = bundles.process(conn, data)
        except FhirError as exc:
            loader.report.rejected.append(f"{path}: {exc.message}")
            return
        for index, entry in enumerate(response["entry"]):
            status = entry["response"]["status"]
            if status.startswith(("4", "5")):
                message = entry["response"]["outcome"]["issue"][0]["diagnostics"]
                loader.report.rejected.append(f"{path}: Bundle.entry[{index}]: {message}")
            elif status.startswith(("200", "201")):
                loader.report.stored += 1
        return
    if isinstance(data, dict) and data.get("resourceType") == "Bundle":
        for index, entry in enumerate(data.get("entry") or []):
            loader.add(f"{path}: Bundle.entry[{index}]", (entry or {}).get("resource"))
        return
    loader.add(str(path), data)


def ingest(engine: Engine, paths: Iterable[str | Path], progress: Callable[[int], None] = lambda _: None) -> Report:
    """Load every file, then refresh the planner's statistics if anything was stored;
    `progress` receives the number of bytes of each file done."""
    report = Report()
    loader = _Loader(engine, report)
    for path in expand(paths):
        if path.suffix == ".ndjson":
            for where, resource in _ndjson(path):
                loader.add(where, resource)
        else:
            _load_json(path, engine, loader)
        loader.flush()
        report.files += 1
        progress(path.stat().st_size)
    with db.read(engine) as conn:  # stored, but reported (and exit 1): service/references.py, `Pending`
        report.rejected.extend(loader.references.unresolved(conn))
    if report.stored:
        with db.write(engine) as conn:
            repository.refresh_statistics(conn)
    return report
