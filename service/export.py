"""FHIR Bulk Data `$export` for research projects: kick-off, status, cancel, and the workers.

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
import socket
import threading
import time
import uuid
from collections.abc import Sequence
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
_SUPPORTED = frozenset({"_outputFormat", "_type", "_since"})
_BATCH = 500
_PART_BYTES = 1 << 20
LEASE_US = 60_000_000
#: An idle worker looks for queued jobs this often; it records a heartbeat at most this often.
IDLE_SECONDS = 1.0
HEARTBEAT_SECONDS = 5.0
#: No heartbeat for three intervals: that worker is gone (and no worker runs when none has beaten).
_SILENT_US = int(3 * HEARTBEAT_SECONDS * 1_000_000)
_STARTED_IN = "passerelle.export_worker_pid"
_start_lock = threading.Lock()


@dataclass(frozen=True)
class Status:
    """What a status poll answers: the manifest of a completed job, or the progress of a running one."""

    manifest: dict[str, Any] | None
    headers: dict[str, str]


# -- kick-off ----------------------------------------------------------------------------------


def kick_off(release: Release, *, kind: str, group_id: str | None, params: Sequence[tuple[str, str]],
             request_url: str) -> str:
    """Validate an export request and queue its job; returns the job id.

    `kind` is system, patient or group. Without `_type` the job exports every type the
    project receives (a patient or group export: only its patient-data types); `_type`
    may repeat and list types separated by commas. `_since` must be the transactionTime
    of one of this project's earlier published manifests, exactly as the manifest gave it:
    any other instant would let a caller probe real write times, which date shifting hides.
    """
    unsupported = sorted({name for name, _ in params} - _SUPPORTED)
    if unsupported:
        raise InvalidRequest(f"$export does not support {', '.join(unsupported)}", expression=unsupported[0])
    output_format = _single(params, "_outputFormat") or NDJSON_FORMATS[0]
    if output_format not in NDJSON_FORMATS:
        raise InvalidRequest(f"_outputFormat {output_format!r} is not supported; use application/fhir+ndjson",
                             expression="_outputFormat")
    types = _types(release, kind, [value for name, value in params if name == "_type"])
    since = _since(release, _single(params, "_since"))
    if group_id is not None:
        release.require_group(group_id)
    _require_worker()
    return jobs.create(project_id=release.project.project_id, client_id=release.client_id, kind=kind,
                       group_id=group_id, types=types, since=since, request=request_url)


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
    if not jobs.worker_alive(_SILENT_US):
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
    return Status(None, {**wait, "X-Progress": job.progress or job.state})


def _manifest(job: jobs.Job, file_url: str) -> dict[str, Any]:
    """The Bulk Data completion manifest.

    Each `count` is the number of lines the file was written with: a download holds only
    the lines the project may still receive (release.py), so it can hold fewer.
    """
    return {
        "transactionTime": instant(job.transaction_time),
        "request": job.request,
        "requiresAccessToken": True,
        "output": [{"type": f.resource_type, "url": file_url.format(f.file_no), "count": f.count}
                   for f in jobs.files(job.job_id)],
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
        self._next_beat = 0.0

    def beat(self) -> None:
        """Record that this worker is alive (at most once every HEARTBEAT_SECONDS)."""
        if time.monotonic() >= self._next_beat:
            with self.app.app_context():
                jobs.beat(self.worker_id)
            self._next_beat = time.monotonic() + HEARTBEAT_SECONDS

    def work(self) -> int:
        """Run queued jobs until none is left; returns how many ran."""
        ran = 0
        with self.app.app_context():
            self.beat()
            jobs.purge_expired()
            while (job_id := jobs.claim(self.worker_id, LEASE_US, _SILENT_US)) is not None:
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
        """Produce every file of a claimed job, then publish its manifest in one step."""
        job = jobs.restart(job_id)
        try:
            release = release_for(job.client_id, job.project_id, consent_engine.RECORD)
            for file_no, resource_type in enumerate(job.types):
                writer = _Writer(job_id, self.worker_id, file_no)
                after = 0
                while batch := release.export_rows(resource_type, after=after, until=job.transaction_time,
                                                   since=job.since, group_id=job.group_id, limit=_BATCH):
                    for line, resource in batch:
                        writer.add(line, resource)
                    after = batch[-1][0][0]
                    self.beat()
                writer.flush(progress=f"{file_no + 1} of {len(job.types)} resource types done")
                if writer.count and not jobs.add_file(job_id, self.worker_id, file_no, resource_type, writer.count,
                                                      LEASE_US):
                    raise _Cancelled
            if not jobs.complete(job_id, self.worker_id, self.app.config["EXPORT_TTL_SECONDS"] * 1_000_000):
                raise _Cancelled
        except _Cancelled:
            log.info("export job %s was cancelled or taken over", job_id)
        except Exception as exc:  # a failed job is reported to its client, never left half-done
            log.exception("export job %s failed", job_id)
            jobs.fail(job_id, self.worker_id, getattr(exc, "message", "the export failed; ask the data custodian"))


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
