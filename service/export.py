"""FHIR Bulk Data `$export` for research projects: jobs, workers and NDJSON files.

Everything lives in the database (jobs, leases, file parts), so any node can accept
a kick-off, run the job, answer a poll or serve a file, and a restart loses nothing:
a job whose worker died is claimed again when its lease expires and restarted from
scratch; the manifest appears only once every file is complete, so a client never
sees a half-delivered export. Rows stream through the same release gate as search
(consent filter in SQL, de-identification, audit) in keyset batches: memory stays
flat however large the export.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from flask import Flask
from sqlalchemy import Connection, Engine, delete, false, insert, or_, select, update

from consent import engine as consent_engine
from consent.projects import PATIENT_DATA_TYPES
from service import db
from service.errors import InvalidRequest, NotFound
from service.release import Release, open_release, patients_of
from service.store.fhirdates import DateFormatError, date_range, instant
from service.store.schema import export_files, export_jobs, export_parts, idx_reference, resources

log = logging.getLogger(__name__)

NDJSON_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
_SUPPORTED = frozenset({"_outputFormat", "_type", "_since"})
_BATCH = 500
_PART_BYTES = 1 << 20
LEASE_US = 60_000_000


@dataclass(frozen=True)
class Job:
    """One export job as stored."""

    job_id: str
    project_id: str
    client_id: str
    kind: str
    group_id: str | None
    types: tuple[str, ...]
    since: int | None
    request: str
    state: str
    transaction_time: int
    progress: str
    error: str | None
    last_poll: int | None
    expires: int | None


def _job(row: Any) -> Job:
    return Job(row.job_id, row.project_id, row.client_id, row.kind, row.group_id, tuple(json.loads(row.types)),
               row.since, row.request, row.state, row.transaction_time, row.progress, row.error, row.last_poll,
               row.expires)


# -- kick-off ----------------------------------------------------------------------------------


def kick_off(conn: Connection, release: Release, *, kind: str, group_id: str | None,
             params: list[tuple[str, str]], request_url: str) -> str:
    """Validate an export request and queue its job; returns the job id."""
    unsupported = sorted({name for name, _ in params} - _SUPPORTED)
    if unsupported:
        raise InvalidRequest(f"$export does not support {', '.join(unsupported)}", expression=unsupported[0])
    values = dict(params)
    output_format = values.get("_outputFormat", NDJSON_FORMATS[0])
    if output_format not in NDJSON_FORMATS:
        raise InvalidRequest(f"_outputFormat {output_format!r} is not supported; use application/fhir+ndjson",
                             expression="_outputFormat")
    allowed = [t for t in release.types if kind == "system" or t in PATIENT_DATA_TYPES]
    types = [t.strip() for t in values["_type"].split(",") if t.strip()] if values.get("_type") else allowed
    refused = [t for t in types if t not in allowed]
    if refused:
        raise InvalidRequest(f"_type {', '.join(refused)}: not available to this project on this export",
                             expression="_type")
    since = None
    if values.get("_since"):
        try:
            since = date_range(values["_since"])[0]
        except DateFormatError as exc:
            raise InvalidRequest(f"_since: {exc}", expression="_since") from None
    if group_id is not None:
        group = conn.execute(select(resources.c.pk).where(resources.c.type == "Group", resources.c.id == group_id,
                                                          resources.c.deleted == false())).first()
        if group is None:
            raise NotFound(f"Group/{group_id} is not known")
    job_id = str(uuid.uuid4())
    now = db.now_us()
    conn.execute(insert(export_jobs).values(
        job_id=job_id, project_id=release.project.project_id, client_id=release.client_id, kind=kind,
        group_id=group_id, types=json.dumps(types), since=since, request=request_url, state="accepted",
        transaction_time=now, progress="queued", created=now))
    return job_id


# -- status, manifest, files, cancel -------------------------------------------------------


def get(conn: Connection, job_id: str, project_id: str) -> Job:
    """A job of this project (another project's job is as unknown as a missing one)."""
    row = conn.execute(select(export_jobs).where(export_jobs.c.job_id == job_id,
                                                 export_jobs.c.project_id == project_id)).first()
    if row is None or row.state == "cancelled":
        raise NotFound(f"Export job {job_id} is not known")
    return _job(row)


def note_poll(conn: Connection, job_id: str) -> None:
    conn.execute(update(export_jobs).where(export_jobs.c.job_id == job_id).values(last_poll=db.now_us()))


def manifest(conn: Connection, job: Job, file_url: str) -> dict[str, Any]:
    """The Bulk Data completion manifest; `file_url` is formatted with the file number."""
    rows = conn.execute(select(export_files).where(export_files.c.job_id == job.job_id)
                        .order_by(export_files.c.file_no)).all()
    return {
        "transactionTime": instant(job.transaction_time),
        "request": job.request,
        "requiresAccessToken": True,
        "output": [{"type": r.resource_type, "url": file_url.format(r.file_no), "count": r.count} for r in rows],
        "error": [],
    }


def file_parts(engine: Engine, job: Job, file_no: int) -> Iterator[bytes]:
    """Stream one file part by part (each part read in its own short transaction)."""
    with db.read(engine) as conn:
        known = conn.execute(select(export_files.c.count).where(export_files.c.job_id == job.job_id,
                                                                export_files.c.file_no == file_no)).first()
    if known is None or job.state != "completed":
        raise NotFound(f"Export file {file_no} of job {job.job_id} is not known")

    def stream() -> Iterator[bytes]:
        part = 0
        while True:
            with db.read(engine) as conn:
                content = conn.execute(select(export_parts.c.content).where(
                    export_parts.c.job_id == job.job_id, export_parts.c.file_no == file_no,
                    export_parts.c.part == part)).scalar()
            if content is None:
                return
            yield bytes(content)
            part += 1
    return stream()


def cancel(conn: Connection, job: Job) -> None:
    """Cancel a job and delete what it produced (a running worker notices at its next part)."""
    conn.execute(update(export_jobs).where(export_jobs.c.job_id == job.job_id).values(state="cancelled"))
    _purge_files(conn, job.job_id)


def _purge_files(conn: Connection, job_id: str) -> None:
    conn.execute(delete(export_parts).where(export_parts.c.job_id == job_id))
    conn.execute(delete(export_files).where(export_files.c.job_id == job_id))


# -- the worker ----------------------------------------------------------------------------


def claim(engine: Engine, owner: str) -> str | None:
    """Take the oldest queued job, or one whose worker's lease ran out; None if there is none."""
    now = db.now_us()
    claimable = or_(export_jobs.c.state == "accepted",
                    (export_jobs.c.state == "in-progress") & (export_jobs.c.lease_until < now))
    with db.write(engine) as conn:
        job_id = conn.execute(select(export_jobs.c.job_id).where(claimable)
                              .order_by(export_jobs.c.created).limit(1)).scalar()
        if job_id is None:
            return None
        taken = conn.execute(update(export_jobs).where(export_jobs.c.job_id == job_id, claimable).values(
            state="in-progress", owner=owner, lease_until=now + LEASE_US, progress="starting"))
        return job_id if taken.rowcount == 1 else None


class _Cancelled(Exception):
    """The job was cancelled (or taken over) while running."""


class _Writer:
    """Buffers one file's NDJSON and stores it in parts, renewing the lease as it goes."""

    def __init__(self, engine: Engine, job_id: str, owner: str, file_no: int):
        self.engine, self.job_id, self.owner, self.file_no = engine, job_id, owner, file_no
        self.buffer = bytearray()
        self.part = 0
        self.count = 0

    def add(self, resource: dict[str, Any]) -> None:
        self.buffer += orjson.dumps(resource) + b"\n"
        self.count += 1
        if len(self.buffer) >= _PART_BYTES:
            self.flush()

    def flush(self, progress: str | None = None) -> None:
        with db.write(self.engine) as conn:
            still_ours = conn.execute(update(export_jobs).where(
                export_jobs.c.job_id == self.job_id, export_jobs.c.owner == self.owner,
                export_jobs.c.state == "in-progress").values(
                lease_until=db.now_us() + LEASE_US, **({"progress": progress} if progress else {})))
            if still_ours.rowcount != 1:
                raise _Cancelled
            if self.buffer:
                conn.execute(insert(export_parts).values(job_id=self.job_id, file_no=self.file_no, part=self.part,
                                                         content=bytes(self.buffer)))
                self.part += 1
                self.buffer = bytearray()


def _rows(conn: Connection, release: Release, job: Job, resource_type: str, after: int) -> list[Any]:
    statement = (select(resources.c.pk, resources.c.type, resources.c.id, resources.c.json, resources.c.patient_id)
                 .where(resources.c.type == resource_type, resources.c.deleted == false(), resources.c.pk > after,
                        resources.c.last_updated <= job.transaction_time))
    if job.since is not None:
        statement = statement.where(resources.c.last_updated > job.since)
    if job.group_id is not None:
        group_pk = select(resources.c.pk).where(resources.c.type == "Group", resources.c.id == job.group_id)
        members = select(idx_reference.c.target_id).where(
            idx_reference.c.resource_pk == group_pk.scalar_subquery(), idx_reference.c.param == "member",
            idx_reference.c.target_type == "Patient")
        statement = statement.where(resources.c.patient_id.in_(members))
    return conn.execute(release.records_filter()(statement).order_by(resources.c.pk).limit(_BATCH)).all()


def run(app: Flask, job_id: str, owner: str) -> None:
    """Produce every file of a claimed job, then publish its manifest in one step."""
    engine = db.engine()
    with db.write(engine) as conn:
        job = _job(conn.execute(select(export_jobs).where(export_jobs.c.job_id == job_id)).one())
        _purge_files(conn, job_id)  # a job taken over from a dead worker starts again from scratch
    patients: set[str] = set()
    total = 0
    try:
        with db.read(engine) as conn:
            release = open_release(conn, job.client_id, job.project_id, consent_engine.RECORD)
        for file_no, resource_type in enumerate(job.types):
            writer = _Writer(engine, job_id, owner, file_no)
            after = 0
            while True:
                with db.read(engine) as conn:
                    rows = _rows(conn, release, job, resource_type, after)
                    for resource in release.deidentify(conn, rows):
                        writer.add(resource)
                if not rows:
                    break
                patients |= patients_of(rows)
                after = rows[-1].pk
            writer.flush(progress=f"{file_no + 1} of {len(job.types)} resource types done")
            total += writer.count
            if writer.count:
                with db.write(engine) as conn:
                    conn.execute(insert(export_files).values(job_id=job_id, file_no=file_no,
                                                             resource_type=resource_type, count=writer.count))
        ttl = app.config["EXPORT_TTL_SECONDS"] * 1_000_000
        with db.write(engine) as conn:
            done = conn.execute(update(export_jobs).where(export_jobs.c.job_id == job_id,
                                                          export_jobs.c.owner == owner,
                                                          export_jobs.c.state == "in-progress")
                                .values(state="completed", progress="100%", expires=db.now_us() + ttl))
            if done.rowcount != 1:
                raise _Cancelled
        release.audit("export", {"job": job_id, "types": list(job.types), "request": job.request}, patients,
                      resources=total)
    except _Cancelled:
        log.info("export job %s was cancelled or taken over", job_id)
    except Exception as exc:  # a failed job is reported to its client, never left half-done
        log.exception("export job %s failed", job_id)
        with db.write(engine) as conn:
            _purge_files(conn, job_id)
            conn.execute(update(export_jobs).where(export_jobs.c.job_id == job_id).values(
                state="failed", error=getattr(exc, "message", "the export failed; ask the data custodian")))


def purge_expired(engine: Engine) -> int:
    """Delete the files of completed jobs past their expiry."""
    now = db.now_us()
    with db.write(engine) as conn:
        expired = list(conn.execute(select(export_jobs.c.job_id).where(
            export_jobs.c.state == "completed", export_jobs.c.expires < now)).scalars())
        for job_id in expired:
            _purge_files(conn, job_id)
            conn.execute(update(export_jobs).where(export_jobs.c.job_id == job_id).values(state="expired"))
    return len(expired)


def work(app: Flask, owner: str | None = None) -> int:
    """Run queued jobs until none is left; returns how many ran."""
    owner = owner or f"worker-{uuid.uuid4()}"
    ran = 0
    with app.app_context():
        engine = db.engine()
        purge_expired(engine)
        while (job_id := claim(engine, owner)) is not None:
            run(app, job_id, owner)
            ran += 1
    return ran


def start_worker(app: Flask, interval: float = 1.0) -> threading.Thread:
    """A daemon thread in this process that runs export jobs as they arrive."""
    def loop() -> None:
        while True:
            try:
                work(app)
            except Exception:  # keep the worker alive; the job itself records its failure
                log.exception("export worker iteration failed")
            time.sleep(interval)
    thread = threading.Thread(target=loop, name="passerelle-export-worker", daemon=True)
    thread.start()
    return thread
