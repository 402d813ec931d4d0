"""Seeded synthetic databases, loaded through the real CLI and cached between runs.

A dataset is generated as NDJSON (`service.synthetic`), then loaded with
`flask --app wsgi ingest` — in `--load-procs` parallel processes, each given an
interleaved share of every file (the product's validation is CPU-bound and runs
outside the write transaction, so two loaders on two cores nearly double the rate).

SQLite datasets are kept in `benchmarks/out/` under a name that includes a fingerprint
of the schema, indexer and generator sources, so a change to any of them rebuilds the
file instead of benchmarking a stale one. PostgreSQL datasets live in private schemas
for one run only. Sections that write (projects, consents, exports) work on a copy.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import orjson

from benchmarks.harness import (
    BIN,
    OUT,
    ROOT,
    SEED,
    Backend,
    Database,
    Instance,
    Options,
    analyze,
    checkpoint,
    fingerprint,
    measure,
    progress,
    sqlite_statistics,
)

Generator = Callable[[Path], dict[str, Any]]


def fixed_resources(seed: int = SEED) -> int:
    """Organisations, practitioners and their roles: what every synthetic load starts with."""
    from service import synthetic

    return sum(1 for _ in synthetic.ndjson_resources(0, seed))


def patients_for(resources: int, seed: int = SEED) -> int:
    """How many synthetic patients make about `resources` stored resources (≈56 per patient)."""
    from service import synthetic

    sample = 100
    per_patient = (sum(1 for _ in synthetic.ndjson_resources(sample, seed)) - fixed_resources(seed)) / sample
    return max(1, round((resources - fixed_resources(seed)) / per_patient))


def write_population(directory: Path, resources: int, seed: int = SEED) -> dict[str, Any]:
    """The product's generator as is: `write_ndjson` for about `resources` resources."""
    from service import synthetic

    patients = patients_for(resources, seed)
    counts = synthetic.write_ndjson(directory, patients, seed)
    return {"patients": patients, "counts": counts}


def write_observations(directory: Path, patients: int, per_patient: int, seed: int = SEED) -> dict[str, Any]:
    """Patients with their first `per_patient` Observations only (the $aggregate workload)."""
    from service import synthetic

    directory.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    code_patients: dict[str, set[str]] = defaultdict(set)
    code_quantity: Counter = Counter()
    code_obs: Counter = Counter()
    current: str | None = None
    kept = 0
    with (directory / "Patient.ndjson").open("wb") as pat, (directory / "Observation.ndjson").open("wb") as obs:
        for resource in synthetic.ndjson_resources(patients, seed):
            kind = resource["resourceType"]
            if kind in ("Patient", "Observation"):
                resource = _patient_references_only(resource)
            if kind == "Patient":
                current, kept = resource["id"], 0
                pat.write(orjson.dumps(resource, option=orjson.OPT_APPEND_NEWLINE))
                counts[kind] += 1
            elif kind == "Observation" and current is not None and kept < per_patient:
                kept += 1
                obs.write(orjson.dumps(resource, option=orjson.OPT_APPEND_NEWLINE))
                counts[kind] += 1
                for coding in (resource.get("code") or {}).get("coding", ())[:1]:
                    code = f"{coding.get('system')}|{coding.get('code')}"
                    code_patients[code].add(current)
                    code_obs[code] += 1
                    if isinstance((resource.get("valueQuantity") or {}).get("value"), (int, float)):
                        code_quantity[code] += 1
    codes = {code: {"patients": len(members), "observations": code_obs[code], "quantities": code_quantity[code]}
             for code, members in code_patients.items()}
    return {"patients": patients, "counts": dict(counts), "codes": codes}


def write_subset(directory: Path, patients: int, codes: dict[str, frozenset[str]], seed: int = SEED
                 ) -> dict[str, Any]:
    """Patients, and of their resources only those whose type is a key of `codes` and whose first
    coding's `system|code` is in its set (the model-training workload: what its features and label read).
    References to anything but a Patient are dropped (they would dangle)."""
    from service import synthetic

    directory.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    per_code: Counter = Counter()
    with ExitStack() as stack:
        files = {kind: stack.enter_context((directory / f"{kind}.ndjson").open("wb")) for kind in ("Patient", *codes)}
        for number, resource in enumerate(synthetic.ndjson_resources(patients, seed)):
            kind = resource["resourceType"]
            if kind == "Patient":
                if counts[kind] % 10_000 == 0 and counts[kind]:
                    progress(f"generated {counts[kind]:,} of {patients:,} patients ({number:,} resources read)")
            elif kind in codes:
                first = ((resource.get("code") or {}).get("coding") or [{}])[0]
                code = f"{first.get('system')}|{first.get('code')}"
                if code not in codes[kind]:
                    continue
                per_code[code] += 1
            else:
                continue
            files[kind].write(orjson.dumps(_patient_references_only(resource), option=orjson.OPT_APPEND_NEWLINE))
            counts[kind] += 1
    return {"patients": patients, "counts": dict(counts), "codes": dict(per_code)}


def shard(source: Path, target: Path, parts: int) -> list[Path]:
    """Deal every NDJSON line of `source` round-robin into `parts` directories (same file names)."""
    directories = [target / f"part{i}" for i in range(parts)]
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.ndjson")):
        with ExitStack() as stack:
            outs: list[IO[bytes]] = [stack.enter_context((d / path.name).open("wb")) for d in directories]
            with path.open("rb") as handle:
                for number, line in enumerate(handle):
                    outs[number % parts].write(line)
    return directories


#: How `flask ingest` reports a reference still unresolved when its own load ends.
_UNRESOLVED = "does not resolve to a resource of this load or server"


def parallel_ingest(instance: Instance, directories: list[Path]) -> tuple[int, float, float]:
    """`flask --app wsgi ingest DIR`, one process per directory, all at once; (stored, seconds, CPU seconds).

    Each process checks its references when its own load ends, when another may not have stored
    their targets yet: such reports are judged once every load is done (`_dangling`)."""
    env = instance.env()
    with measure() as used:
        stored, problems = _ingest_all(env, directories)
    if problems:
        raise RuntimeError("ingest failed: " + "; ".join(problems))
    dangling = _dangling(instance)
    if dangling:
        raise RuntimeError(f"ingest left {dangling:,} references to resources the dataset does not hold")
    return stored, used.wall, used.children


def _ingest_all(env: dict[str, str], directories: list[Path]) -> tuple[int, list[str]]:
    processes = [subprocess.Popen([str(BIN / "flask"), "--app", "wsgi", "ingest", str(d)], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in directories]
    stored = 0
    problems = []
    for process in processes:
        out, err = process.communicate()
        found = re.search(r"Stored (\d+) resources", err)
        stored += int(found.group(1)) if found else 0
        rejected = [line for line in err.splitlines() if line.startswith("rejected:") and _UNRESOLVED not in line]
        if process.returncode != 0 and (rejected or "Stored" not in err):
            shown = (rejected or err.strip().splitlines())[-3:] if err else out[-300:]
            problems.append(f"exit {process.returncode}: {shown}")
    return stored, problems


def _dangling(instance: Instance) -> int:
    """References to this server's resources that name no live resource of the database."""
    from sqlalchemy import and_, exists, func, select

    from service.store.schema import idx_reference, resources

    target = select(resources.c.pk).where(and_(resources.c.type == idx_reference.c.target_type,
                                               resources.c.id == idx_reference.c.target_id,
                                               resources.c.deleted.is_(False)))
    with instance.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(idx_reference).where(
            idx_reference.c.target_type.is_not(None), ~exists(target))).scalar_one()


def _patient_references_only(node: Any) -> Any:
    """`node` without the references to anything but a Patient (the $aggregate workload keeps
    Patients and Observations only: a reference to an Encounter or a Practitioner would dangle)."""
    if isinstance(node, dict):
        kept = {}
        for key, value in node.items():
            if isinstance(value, dict) and isinstance(value.get("reference"), str) \
                    and not value["reference"].startswith("Patient/"):
                continue
            value = _patient_references_only(value)
            if value not in ([], {}):
                kept[key] = value
        return kept
    if isinstance(node, list):
        items = [_patient_references_only(item) for item in node
                 if not (isinstance(item, dict) and isinstance(item.get("reference"), str)
                         and not item["reference"].startswith("Patient/"))]
        return [item for item in items if item not in ([], {})]
    return node


class Datasets:
    """Builds (or finds in the cache) the databases the sections share."""

    def __init__(self, backend: Backend, options: Options, workdir: Path):
        self.backend = backend
        self.options = options
        self.workdir = workdir
        self.memo: dict[str, tuple[Database, dict[str, Any]]] = {}

    def population(self, resources: int) -> tuple[Database, dict[str, Any]]:
        """About `resources` stored resources of the full synthetic population."""
        return self._get(f"population-{resources}", lambda d: write_population(d, resources))

    def observations(self, patients: int, per_patient: int) -> tuple[Database, dict[str, Any]]:
        """`patients` Patients with `per_patient` Observations each."""
        return self._get(f"observations-{patients}x{per_patient}",
                         lambda d: write_observations(d, patients, per_patient))

    def subset(self, label: str, patients: int, codes: dict[str, frozenset[str]]) -> tuple[Database, dict[str, Any]]:
        """`patients` Patients with only their resources of the types and codes `codes` names
        (`write_subset`), cached as `label`-`patients`-(a digest of `codes`)."""
        digest = hashlib.sha256(json.dumps({k: sorted(v) for k, v in codes.items()}, sort_keys=True).encode())
        return self._get(f"{label}-{patients}-{digest.hexdigest()[:6]}", lambda d: write_subset(d, patients, codes))

    def checkout(self, database: Database, label: str) -> Database:
        """A private copy to write into (projects, consents, export jobs)."""
        start = time.perf_counter()
        copy = self.backend.copy(database, label)
        progress(f"copied {label} database in {time.perf_counter() - start:.1f} s")
        return copy

    # -- building ---------------------------------------------------------------------------

    def _cache_paths(self, name: str) -> tuple[Path, Path]:
        stem = f"{name}-{fingerprint()}"
        return OUT / f"{stem}.sqlite", OUT / f"{stem}.json"

    def _get(self, name: str, generate: Generator) -> tuple[Database, dict[str, Any]]:
        if name in self.memo:
            return self.memo[name]
        if self.backend.kind == "sqlite":
            path, meta_path = self._cache_paths(name)
            if path.exists() and meta_path.exists() and not self.options.rebuild:
                meta = {**json.loads(meta_path.read_text()), "fresh": False}
                progress(f"dataset {name}: cached {path.name} ({meta['resources']:,} resources)")
                sqlite_statistics(path, self.options.analyze)
                self.memo[name] = (Database(f"sqlite:///{path}", "sqlite", path=path), meta)
                return self.memo[name]
            for stale in OUT.glob(f"{name}-*.*"):  # other fingerprints: outdated
                stale.unlink()
            OUT.mkdir(parents=True, exist_ok=True)
            building = path.with_suffix(".building")
            for leftover in OUT.glob(building.name + "*"):
                leftover.unlink()
            database = Database(f"sqlite:///{building}", "sqlite", path=building)
        else:
            database = self.backend.new(name)
        meta = self._build(name, database, generate)
        if self.backend.kind == "sqlite":
            assert database.path is not None
            checkpoint(database.path)
            database.path.rename(path)
            for side in ("-wal", "-shm"):
                Path(f"{database.path}{side}").unlink(missing_ok=True)
            meta_path.write_text(json.dumps(meta, indent=1))
            sqlite_statistics(path, self.options.analyze)
            database = Database(f"sqlite:///{path}", "sqlite", path=path)
        else:
            analyze(database)
        self.memo[name] = (database, {**meta, "fresh": True})
        return self.memo[name]

    def _build(self, name: str, database: Database, generate: Generator) -> dict[str, Any]:
        source = self.workdir / f"{name}-ndjson"
        progress(f"dataset {name}: generating NDJSON")
        start = time.perf_counter()
        info = generate(source)
        generated = time.perf_counter() - start
        total = sum(info["counts"].values())
        procs = max(1, self.options.load_procs)
        directories = shard(source, self.workdir / f"{name}-shards", procs) if procs > 1 else [source]
        instance = Instance(database, self.workdir / f"{name}-instance")
        try:
            progress(f"dataset {name}: ingesting {total:,} resources with {procs} `flask ingest` processes")
            stored, seconds, cpu = parallel_ingest(instance, directories)
            from sqlalchemy import func, select

            from service.store.schema import resources

            with instance.engine.connect() as conn:
                in_db = conn.execute(select(func.count()).select_from(resources)).scalar_one()
        finally:
            instance.close()
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(self.workdir / f"{name}-shards", ignore_errors=True)
        if in_db != total:
            raise RuntimeError(f"dataset {name}: {in_db} resources stored, {total} generated")
        progress(f"dataset {name}: {stored:,} resources in {seconds:.0f} s ({stored / seconds:,.0f}/s)")
        return {"name": name, "resources": in_db, "generate_seconds": generated, "ingest_seconds": seconds,
                "ingest_rate": stored / seconds, "ingest_cpu_rate": stored / cpu if cpu else None, "procs": procs,
                "built": time.strftime("%Y-%m-%d %H:%M"), **info}


def sample_rows(database: Database, statement: Any, limit: int) -> list[Any]:
    from sqlalchemy import create_engine

    engine = create_engine(database.url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(statement.limit(limit)).all())
    finally:
        engine.dispose()


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
