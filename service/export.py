"""FHIR Bulk Data `$export` for research projects: kick-off, status, cancel, and the workers.

A kick-off is a GET with query parameters or a POST with a Parameters body (Bulk Data
Access IG v2): `_type`, `_since`, `_outputFormat`, `_typeFilter` and, on Patient and Group
exports, `patient`. An export with `_since` also lists, in the manifest's `deleted` array,
the resources deleted since then that the project could have received
(`Release.export_deleted`). A status poll's `X-Progress` starts with a percentage.

Jobs, files and worker heartbeats live in the database (service/store/jobs.py), so any
node can accept a kick-off, run the job, answer a poll or serve a file, and a restart
loses nothing: a job whose worker died is claimed again once that worker has fallen silent
(no heartbeat for three intervals) or its lease has expired, and restarted from scratch;
only the worker running a job can change it; the manifest appears only once every file is
complete. Stored data reaches a file, and a file a client, only through the caller's `Release`
(service/release.py): rows are chosen by the consent filter in SQL and de-identified
when a file is written, in keyset batches (memory stays flat however large the export),
and every line is judged again when the file is downloaded.

Workers run wherever the app is served: each serving process starts a worker thread on
its first request (`PASSERELLE_EXPORT_WORKER=thread`, the default), and
`flask --app wsgi export-worker` runs one as a process of its own (with `off` on the
serving processes). Every worker beats in the database; a kick-off, or a poll of an
unfinished job, when no worker has beaten lately is answered 503 instead of waiting.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
from flask import Flask
from sqlalchemy.exc import SQLAlchemyError

from consent import engine as consent_engine
from consent.projects import PATIENT_DATA_TYPES
from policies.fhirdates import DateFormatError, date_range, instant
from service.errors import ExportFailed, Gone, InvalidRequest, ServiceUnavailable, TooManyRequests
from service.release import Release, release_for
from service.store import jobs

log = logging.getLogger(__name__)

NDJSON_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
_SUPPORTED = frozenset({"_outputFormat", "_type", "_since", "_typeFilter", "patient"})
#: The value each kick-off parameter takes in a POSTed Parameters resource.
_VALUE_TYPES = {"_outputFormat": ("valueString", "valueCode"), "_type": ("valueString", "valueCode"),
                "_since": ("valueInstant", "valueDateTime"), "_typeFilter": ("valueString",),
                "patient": ("valueReference",)}
#: Where one `_typeFilter` query ends and the next begins in a comma-separated value: a comma
#: followed by a resource type and "?" (a comma inside a query stays in it).
_NEXT_QUERY = re.compile(r",(?=[A-Z][A-Za-z]*\?)")
_BATCH = 500
_PART_BYTES = 1 << 20
LEASE_US = 60_000_000
#: An idle worker looks for queued jobs this often. It records a heartbeat at most every
#: EXPORT_HEARTBEAT_SECONDS, and counts as gone three of those after its last (service/store/jobs.py).
IDLE_SECONDS = 1.0
_STARTED_IN = "passerelle.export_worker_pid"
_start_lock = threading.Lock()


@dataclass(frozen=True)
class Status:
    """What a status poll answers: the manifest of a completed job, or the progress of a running one."""

    manifest: dict[str, Any] | None
    headers: dict[str, str]


# -- kick-off ----------------------------------------------------------------------------------


def kick_off(release: Release, *, kind: str, group_id: str | None, params: Sequence[tuple[str, str]],
             request_url: str, lenient: bool = False) -> str:
    """Validate an export request and queue its job; returns the job id.

    `kind` is system, patient or group. Without `_type` the job exports every type the
    project receives (a patient or group export: only its patient-data types); `_type`
    may repeat and list types separated by commas. `_since` must be the transactionTime
    of one of this project's earlier published manifests, exactly as the manifest gave it:
    any other instant would let a caller probe real write times, which date shifting hides.
    `_typeFilter` queries (`Type?search`, repeated or comma-separated) are held to the
    research search rules (`Release.export_criteria`); a type's queries are alternatives,
    and a type without any is exported whole. `patient` (Patient and Group exports) names
    patients by the pseudonyms this project sees (`Release.export_patients`). A parameter this
    server does not support is refused, or ignored when `lenient` (`Prefer: handling=lenient`).
    """
    unsupported = sorted({name for name, _ in params} - _SUPPORTED)
    if lenient:
        params = [(name, value) for name, value in params if name in _SUPPORTED]
    elif unsupported:
        raise InvalidRequest(f"$export does not support {', '.join(unsupported)}", expression=unsupported[0])
    output_format = _single(params, "_outputFormat") or NDJSON_FORMATS[0]
    if output_format not in NDJSON_FORMATS:
        raise InvalidRequest(f"_outputFormat {output_format!r} is not supported; use application/fhir+ndjson",
                             expression="_outputFormat")
    types = _types(release, kind, [value for name, value in params if name == "_type"])
    since = _since(release, _single(params, "_since"))
    if group_id is not None:
        release.require_group(group_id)
    type_filters = _type_filters(release, types, [value for name, value in params if name == "_typeFilter"])
    patients = _patients(release, kind, group_id, [value for name, value in params if name == "patient"])
    _require_worker()
    return jobs.create(project_id=release.project.project_id, client_id=release.client_id, kind=kind,
                       group_id=group_id, types=types, since=since, request=request_url,
                       type_filters=type_filters, patients=patients)


def parameters(body: Any) -> list[tuple[str, str]]:
    """The kick-off parameters of a POSTed Parameters resource, as (name, value) pairs like a query's
    (a parameter this server does not support is passed on by name, for `kick_off` to judge)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise InvalidRequest("A POST kick-off's body must be a Parameters resource", expression="Parameters")
    pairs = []
    for index, parameter in enumerate(body.get("parameter") or []):
        where = f"Parameters.parameter[{index}]"
        name = parameter.get("name") if isinstance(parameter, dict) else None
        if not isinstance(name, str):
            raise InvalidRequest(f"{where} has no name", expression=where)
        if name not in _VALUE_TYPES:
            pairs.append((name, ""))
            continue
        kinds = [kind for kind in _VALUE_TYPES[name] if kind in parameter]
        value = parameter[kinds[0]] if len(kinds) == 1 else None
        if name == "patient":
            value = value.get("reference") if isinstance(value, dict) else None
        if not isinstance(value, str) or not value:
            raise InvalidRequest(f"{where} ({name}) needs one {' or '.join(_VALUE_TYPES[name])}", expression=where)
        pairs.append((name, value))
    return pairs


def _type_filters(release: Release, types: list[str], values: list[str]) -> dict[str, list[str]]:
    """The `_typeFilter` queries by type, each checked now (their pseudonyms are resolved when the job runs)."""
    filters: dict[str, list[str]] = {}
    for value in values:
        for item in _NEXT_QUERY.split(value):
            resource_type, mark, query = item.partition("?")
            if not mark or not query:
                raise InvalidRequest(f"_typeFilter {item!r} must be <type>?<search parameters>",
                                     expression="_typeFilter")
            if resource_type not in types:
                raise InvalidRequest(f"_typeFilter {item!r}: {resource_type} is not a type of this export",
                                     expression="_typeFilter")
            filters.setdefault(resource_type, []).append(query)
    for resource_type, queries in filters.items():
        release.export_criteria(resource_type, queries)
    return filters


def _patients(release: Release, kind: str, group_id: str | None, values: list[str]) -> list[str] | None:
    """The stored ids of the patients a `patient` parameter names (None without one)."""
    if not values:
        return None
    if kind == "system":
        raise InvalidRequest("patient applies to Patient and Group exports, not to a system export",
                             expression="patient")
    references = list(dict.fromkeys(item.strip() for value in values for item in value.split(",") if item.strip()))
    return release.export_patients(references, group_id)


def _single(params: Sequence[tuple[str, str]], name: str) -> str | None:
    values = [value for key, value in params if key == name]
    if len(values) > 1:
        raise InvalidRequest(f"{name} may be given only once", expression=name)
    return values[0] if values else None


def _types(release: Release, kind: str, requested: list[str]) -> list[str]:
    allowed = [t for t in release.types if kind == "system" or t in PATIENT_DATA_TYPES]
    named = list(dict.fromkeys(t.strip() for value in requested for t in value.split(",") if t.strip()))
    refused = [t for t in named if t not in allowed]
    if refused:
        raise InvalidRequest(f"_type {', '.join(refused)}: not available to this project on this export",
                             expression="_type")
    return named or allowed


def _since(release: Release, value: str | None) -> int | None:
    """The transaction time of the earlier export a `_since` names (None without `_since`)."""
    if value is None:
        return None
    try:
        low, high = date_range(value)
    except DateFormatError as exc:
        raise InvalidRequest(f"_since: {exc}", expression="_since") from None
    for transaction_time in jobs.published_transaction_times(release.project.project_id, low, high):
        if instant(transaction_time) == value:
            return transaction_time
    raise InvalidRequest("_since must be the transactionTime of one of this project's earlier completed exports, "
                         "exactly as its manifest gave it", expression="_since")


def _require_worker() -> None:
    if not jobs.worker_alive():
        raise ServiceUnavailable("No export worker is running, so the export cannot progress; try again later or "
                                 "tell the data custodian")


# -- status, cancel --------------------------------------------------------------------------


def status(release: Release, job_id: str, poll_seconds: int, file_url: str) -> Status:
    """Answer a status poll of one of this project's jobs (`file_url` is formatted with the file number).

    Polls more frequent than `poll_seconds` get TooManyRequests; a failed job ExportFailed,
    an expired one Gone, and an unfinished one ServiceUnavailable while no worker runs.
    """
    job = jobs.get(job_id, release.project.project_id)
    wait = {"Retry-After": str(max(1, int(poll_seconds)))}
    if not jobs.note_poll(job_id, int(poll_seconds * 1_000_000)):
        raise TooManyRequests(f"Poll at most every {poll_seconds} seconds", headers=wait)
    if job.state == "completed":
        return Status(_manifest(job, file_url), {})
    if job.state == "failed":
        raise ExportFailed(job.error or "The export failed")
    if job.state == "expired":
        raise Gone(f"The files of export job {job_id} have expired; start a new export")
    _require_worker()
    return Status(None, {**wait, "X-Progress": job.progress or jobs.QUEUED})


def _manifest(job: jobs.Job, file_url: str) -> dict[str, Any]:
    """The Bulk Data completion manifest.

    Each `count` is the number of lines the file was written with: a download holds only
    the lines the project may still receive (release.py), so it can hold fewer. `deleted`
    lists, for an export with `_since`, the files of deletions since then
    (`Release.export_deleted`): NDJSON of transaction Bundles of DELETE entries.
    """
    files = jobs.files(job.job_id)
    return {
        "transactionTime": instant(job.transaction_time),
        "request": job.request,
        "requiresAccessToken": True,
        "output": [{"type": f.resource_type, "url": file_url.format(f.file_no), "count": f.count}
                   for f in files if f.resource_type != jobs.DELETED],
        "deleted": [{"type": f.resource_type, "url": file_url.format(f.file_no), "count": f.count}
                    for f in files if f.resource_type == jobs.DELETED],
        "error": [],
    }


def cancel(release: Release, job_id: str) -> None:
    """Cancel one of this project's jobs and delete what it produced."""
    jobs.cancel(job_id, release.project.project_id)


# -- the workers ------------------------------------------------------------------------------


class _Cancelled(Exception):
    """The job was cancelled (or taken over) while running."""


class _Writer:
    """Buffers one file's NDJSON with what each line holds, and stores it in parts, renewing the lease."""

    def __init__(self, job_id: str, owner: str, file_no: int):
        self.job_id, self.owner, self.file_no = job_id, owner, file_no
        self.buffer = bytearray()
        self.lines: list[jobs.Line] = []
        self.part = 0
        self.count = 0

    def add(self, line: jobs.Line, resource: dict[str, Any]) -> None:
        self.buffer += orjson.dumps(resource) + b"\n"
        self.lines.append(line)
        self.count += 1
        if len(self.buffer) >= _PART_BYTES:
            self.flush()

    def flush(self, progress: str | None = None) -> None:
        if not jobs.store_part(self.job_id, self.owner, self.file_no, self.part, bytes(self.buffer), self.lines,
                               LEASE_US, progress):
            raise _Cancelled
        if self.buffer:
            self.part += 1
            self.buffer, self.lines = bytearray(), []


class Worker:
    """One export worker: runs queued jobs and records a heartbeat while it lives."""

    def __init__(self, app: Flask, worker_id: str | None = None):
        self.app = app
        self.worker_id = worker_id or f"{socket.gethostname()[:24]}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._every = app.config["EXPORT_HEARTBEAT_SECONDS"]
        self._next_beat = 0.0

    def beat(self) -> None:
        """Record that this worker is alive (at most once every EXPORT_HEARTBEAT_SECONDS)."""
        if time.monotonic() >= self._next_beat:
            with self.app.app_context():
                jobs.beat(self.worker_id, round(self._every * 1_000_000))
            self._next_beat = time.monotonic() + self._every

    def work(self) -> int:
        """Run queued jobs until none is left; returns how many ran."""
        ran = 0
        with self.app.app_context():
            self.beat()
            jobs.purge_expired()
            while (job_id := jobs.claim(self.worker_id, LEASE_US)) is not None:
                self._run(job_id)
                ran += 1
        return ran

    def serve(self) -> NoReturn:
        """Run jobs as they arrive, for as long as the process lives."""
        while True:
            try:
                self.work()
            except Exception:  # keep the worker alive; a job itself records its failure
                log.exception("export worker iteration failed")
            time.sleep(IDLE_SECONDS)

    def _run(self, job_id: str) -> None:
        """Produce every file of a claimed job, then publish its manifest in one step.

        The steps are the job's types, then (with `_since`) the deletions of each type; its
        progress reads "<percent>% (<done> of <steps> steps done)".
        """
        job = jobs.restart(job_id)
        try:
            release = release_for(job.client_id, job.project_id, consent_engine.RECORD)
            steps = [(t, False) for t in job.types] + [(t, True) for t in job.types if job.since is not None]
            for file_no, (resource_type, deletions) in enumerate(steps):
                writer = _Writer(job_id, self.worker_id, file_no)
                batches = _batches(release, job, resource_type, deletions)
                after = 0
                while batch := batches(after):
                    for line, resource in batch:
                        writer.add(line, resource)
                    after = batch[-1][0][0]
                    self.beat()
                done = file_no + 1
                writer.flush(progress=f"{100 * done // len(steps)}% ({done} of {len(steps)} steps done)")
                file_type = jobs.DELETED if deletions else resource_type
                if writer.count and not jobs.add_file(job_id, self.worker_id, file_no, file_type, writer.count,
                                                      LEASE_US):
                    raise _Cancelled
            if not jobs.complete(job_id, self.worker_id, self.app.config["EXPORT_TTL_SECONDS"] * 1_000_000):
                raise _Cancelled
        except _Cancelled:
            log.info("export job %s was cancelled or taken over", job_id)
        except Exception as exc:  # a failed job is reported to its client, never left half-done
            log.exception("export job %s failed", job_id)
            jobs.fail(job_id, self.worker_id, getattr(exc, "message", "the export failed; ask the data custodian"))


Batch = list[tuple[jobs.Line, dict[str, Any]]]


def _batches(release: Release, job: jobs.Job, resource_type: str, deletions: bool) -> Callable[[int], Batch]:
    """What one step of a job reads: the batch after a row number, of the type's rows or of its deletions.

    `_typeFilter` narrows the rows, not the deletions: a deleted resource has no index entries
    left to match, and the project may learn of the deletion of any resource it could have
    received (the deletion files list no more than that, `Release.export_deleted`).
    """
    if deletions:
        since = job.since
        assert since is not None

        def deleted(after: int) -> Batch:
            return release.export_deleted(resource_type, after=after, until=job.transaction_time, since=since,
                                          group_id=job.group_id, patients=job.patients, limit=_BATCH)
        return deleted
    criteria = release.export_criteria(resource_type, job.type_filters.get(resource_type, ()))

    def rows(after: int) -> Batch:
        return release.export_rows(resource_type, after=after, until=job.transaction_time, since=job.since,
                                   group_id=job.group_id, patients=job.patients, criteria=criteria, limit=_BATCH)
    return rows


def init_app(app: Flask) -> None:
    """Give every serving process its export worker thread on its first request."""
    app.before_request(lambda: start_worker(app))


def start_worker(app: Flask) -> None:
    """Start this process's export worker thread, unless it runs already or EXPORT_WORKER is off.

    Fork-safe: the thread belongs to the process that started it, so a process forked
    from it (a preloading server's workers) starts its own. The first heartbeat is
    written before this returns, so the request that started the worker already finds
    it alive.
    """
    pid = os.getpid()
    if app.config["EXPORT_WORKER"] != "thread" or app.extensions.get(_STARTED_IN) == pid:
        return
    with _start_lock:
        if app.extensions.get(_STARTED_IN) == pid:
            return
        worker = Worker(app)
        try:
            worker.beat()
        except SQLAlchemyError:  # the database is unreachable now; the thread beats once it is back
            log.exception("export worker heartbeat failed")
        threading.Thread(target=worker.serve, name="passerelle-export-worker", daemon=True).start()
        app.extensions[_STARTED_IN] = pid
