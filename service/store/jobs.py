"""Bulk Data export bookkeeping: jobs, their files and parts, leases and worker heartbeats.

Nothing here decides what a project may receive: the parts hold NDJSON that
service/release.py produced, with the (row, version, patient) each line came from, and
release.py judges those lines again at every download. Functions without a connection
argument run in a short transaction of their own; the two that take one read inside the
caller's.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import ColumnElement, Connection, and_, delete, exists, func, insert, or_, select, update

from service import db
from service.errors import NotFound
from service.store.schema import export_files, export_jobs, export_parts, export_workers

#: What one NDJSON line holds: the stored row, its version and its patient (None for directory data).
Line = tuple[int, int, str | None]
#: Heartbeats older than this belong to workers long gone; each new worker clears them.
_FORGET_WORKERS_US = 24 * 3600 * 1_000_000
#: Every state a job can be in.
STATES = ("accepted", "in-progress", "completed", "failed", "cancelled", "expired")
#: States whose manifest was published (an expired job's files are gone, its manifest is not).
_PUBLISHED = ("completed", "expired")
#: The type recorded for a file of deletions (the manifest's `deleted` array): NDJSON of
#: transaction Bundles, each holding DELETE entries. No export ever has Bundle files of its own.
DELETED = "Bundle"
#: Progress as a job's status answers it (`X-Progress`): a percentage first, as clients display it.
QUEUED = "0% (queued)"
STARTING = "0% (starting)"


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
    #: `_typeFilter` queries by type, as the client sent them (a type without any is exported whole).
    type_filters: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: The stored ids of the patients a `patient` parameter named (None: every patient).
    patients: tuple[str, ...] | None = None


def _job(row: Any) -> Job:
    selection = json.loads(row.types)
    if isinstance(selection, list):  # the types alone (a job without _typeFilter or patient)
        selection = {"types": selection}
    patients = selection.get("patients")
    return Job(row.job_id, row.project_id, row.client_id, row.kind, row.group_id, tuple(selection["types"]),
               row.since, row.request, row.state, row.transaction_time, row.progress, row.error,
               {t: tuple(queries) for t, queries in selection.get("typeFilter", {}).items()},
               None if patients is None else tuple(patients))


# -- what clients ask ----------------------------------------------------------------------------


def create(*, project_id: str, client_id: str, kind: str, group_id: str | None, types: Sequence[str],
           since: int | None, request: str, type_filters: Mapping[str, Sequence[str]] | None = None,
           patients: Sequence[str] | None = None) -> str:
    """Queue a job whose transaction time is now; returns its id.

    The `types` column holds what the job selects as JSON: the list of types, or, with
    `_typeFilter` queries or a `patient` list, an object {"types", "typeFilter", "patients"}.
    """
    job_id = str(uuid.uuid4())
    now = db.now_us()
    selection: Any = list(types)
    if type_filters or patients is not None:
        selection = {"types": list(types), "typeFilter": {t: list(q) for t, q in (type_filters or {}).items()},
                     "patients": None if patients is None else list(patients)}
    with db.write() as conn:
        conn.execute(insert(export_jobs).values(
            job_id=job_id, project_id=project_id, client_id=client_id, kind=kind, group_id=group_id,
            types=json.dumps(selection), since=since, request=request, state="accepted", transaction_time=now,
            progress=QUEUED, created=now))
    return job_id


def get(job_id: str, project_id: str) -> Job:
    """A job of this project (another project's job, or a cancelled one, is as unknown as a missing one)."""
    with db.read() as conn:
        row = conn.execute(select(export_jobs).where(export_jobs.c.job_id == job_id,
                                                     export_jobs.c.project_id == project_id,
                                                     export_jobs.c.state != "cancelled")).first()
    if row is None:
        raise NotFound(f"Export job {job_id} is not known")
    return _job(row)


def note_poll(job_id: str, min_interval_us: int) -> bool:
    """Record a status poll; False (and nothing recorded) if the previous one is more recent than the interval."""
    now = db.now_us()
    with db.write() as conn:
        noted = conn.execute(update(export_jobs).where(
            export_jobs.c.job_id == job_id,
            or_(export_jobs.c.last_poll.is_(None), export_jobs.c.last_poll <= now - min_interval_us))
            .values(last_poll=now))
    return noted.rowcount == 1


def files(job_id: str) -> list[Any]:
    """The files of a job: (file_no, resource_type, count), in order (deletions have type `DELETED`)."""
    with db.read() as conn:
        return list(conn.execute(select(export_files.c.file_no, export_files.c.resource_type, export_files.c.count)
                                 .where(export_files.c.job_id == job_id).order_by(export_files.c.file_no)))


def published_transaction_times(project_id: str, low: int, high: int) -> list[int]:
    """Transaction times in [low, high] of this project's jobs whose manifest was published."""
    with db.read() as conn:
        return list(conn.execute(select(export_jobs.c.transaction_time).where(
            export_jobs.c.project_id == project_id, export_jobs.c.state.in_(_PUBLISHED),
            export_jobs.c.transaction_time.between(low, high)).order_by(export_jobs.c.transaction_time)).scalars())


def cancel(job_id: str, project_id: str) -> None:
    """Cancel a job of this project and delete what it produced (a running worker notices at its next part)."""
    with db.write() as conn:
        cancelled = conn.execute(update(export_jobs).where(
            export_jobs.c.job_id == job_id, export_jobs.c.project_id == project_id,
            export_jobs.c.state != "cancelled").values(state="cancelled"))
        if cancelled.rowcount != 1:
            raise NotFound(f"Export job {job_id} is not known")
        _purge_files(conn, job_id)


def file_part_count(conn: Connection, project_id: str, job_id: str, file_no: int) -> int | None:
    """How many parts a file of this project's completed job has; None if there is no such file."""
    known = conn.execute(select(export_files.c.file_no).join(export_jobs, export_jobs.c.job_id == export_files.c.job_id)
                         .where(export_files.c.job_id == job_id, export_files.c.file_no == file_no,
                                export_jobs.c.project_id == project_id, export_jobs.c.state == "completed")).first()
    if known is None:
        return None
    return conn.execute(select(func.count()).where(export_parts.c.job_id == job_id,
                                                   export_parts.c.file_no == file_no)).scalar_one()


def part_lines(conn: Connection, job_id: str, file_no: int, part: int) -> list[Line]:
    """What each line of one part holds, in order."""
    raw = conn.execute(select(export_parts.c.lines).where(export_parts.c.job_id == job_id,
                                                          export_parts.c.file_no == file_no,
                                                          export_parts.c.part == part)).scalar_one()
    return [(pk, version, patient) for pk, version, patient in orjson.loads(raw)]


def part_content(job_id: str, file_no: int, part: int) -> bytes | None:
    """One part's NDJSON; None if it was deleted since (the job was cancelled or expired)."""
    with db.read() as conn:
        content = conn.execute(select(export_parts.c.content).where(
            export_parts.c.job_id == job_id, export_parts.c.file_no == file_no,
            export_parts.c.part == part)).scalar()
    return None if content is None else bytes(content)


# -- what workers do ------------------------------------------------------------------------------


def claim(owner: str, lease_us: int) -> str | None:
    """Take the oldest queued job, or one whose worker's lease ran out or whose worker is gone (`_alive`);
    None if there is none.

    The job's row stays locked until the claim commits. On PostgreSQL a claim passes over rows other
    claims hold (`FOR UPDATE SKIP LOCKED`), so workers of every node claiming at once take different
    jobs; SQLite ignores it (one writer at a time). The conditional UPDATE claims a job once either way.
    """
    now = db.now_us()
    alive = select(export_workers.c.worker_id).where(_alive(now))
    claimable = or_(export_jobs.c.state == "accepted",
                    and_(export_jobs.c.state == "in-progress",
                         or_(export_jobs.c.lease_until < now, export_jobs.c.owner.not_in(alive))))
    with db.write() as conn:
        job_id = conn.execute(select(export_jobs.c.job_id).where(claimable).order_by(export_jobs.c.created)
                              .limit(1).with_for_update(skip_locked=True)).scalar()
        if job_id is None:
            return None
        taken = conn.execute(update(export_jobs).where(export_jobs.c.job_id == job_id, claimable).values(
            state="in-progress", owner=owner, lease_until=now + lease_us, progress=STARTING))
        return job_id if taken.rowcount == 1 else None


def restart(job_id: str) -> Job:
    """A claimed job, with whatever an earlier (dead) worker wrote for it deleted."""
    with db.write() as conn:
        _purge_files(conn, job_id)
        return _job(conn.execute(select(export_jobs).where(export_jobs.c.job_id == job_id)).one())


def _running(job_id: str, owner: str) -> ColumnElement[bool]:
    """The job, while this owner runs it. Every write of a worker updates the job's row under this
    condition first, in the same transaction: the row's lock orders it against a takeover (`claim`),
    so a worker whose job was taken over (or cancelled, or ended) changes nothing of it any more."""
    return and_(export_jobs.c.job_id == job_id, export_jobs.c.owner == owner, export_jobs.c.state == "in-progress")


def store_part(job_id: str, owner: str, file_no: int, part: int, content: bytes, lines: Sequence[Line],
               lease_us: int, progress: str | None) -> bool:
    """Renew the owner's lease and store one part (none if `content` is empty); False if the job is no
    longer this owner's to run (cancelled, ended or taken over)."""
    with db.write() as conn:
        still_ours = conn.execute(update(export_jobs).where(_running(job_id, owner)).values(
            lease_until=db.now_us() + lease_us, **({"progress": progress} if progress else {})))
        if still_ours.rowcount != 1:
            return False
        if content:
            conn.execute(insert(export_parts).values(job_id=job_id, file_no=file_no, part=part, content=content,
                                                     lines=orjson.dumps(lines).decode()))
    return True


def add_file(job_id: str, owner: str, file_no: int, resource_type: str, count: int, lease_us: int) -> bool:
    """Renew the owner's lease and record one complete file; False (nothing recorded) if the job is no
    longer this owner's to run."""
    with db.write() as conn:
        if conn.execute(update(export_jobs).where(_running(job_id, owner))
                        .values(lease_until=db.now_us() + lease_us)).rowcount != 1:
            return False
        conn.execute(insert(export_files).values(job_id=job_id, file_no=file_no, resource_type=resource_type,
                                                 count=count))
    return True


def complete(job_id: str, owner: str, ttl_us: int) -> bool:
    """Publish the manifest of a job this owner still runs; False if it no longer does."""
    with db.write() as conn:
        done = conn.execute(update(export_jobs).where(_running(job_id, owner))
                            .values(state="completed", progress="100%", expires=db.now_us() + ttl_us))
    return done.rowcount == 1


def fail(job_id: str, owner: str, error: str) -> None:
    """Mark a job this owner still runs failed, with the message its client will read, and delete what it
    produced; a job no longer this owner's is left as it is."""
    with db.write() as conn:
        if conn.execute(update(export_jobs).where(_running(job_id, owner))
                        .values(state="failed", error=error)).rowcount == 1:
            _purge_files(conn, job_id)


def purge_expired() -> int:
    """Delete the files of completed jobs past their expiry; returns how many jobs expired."""
    now = db.now_us()
    with db.write() as conn:
        expired = list(conn.execute(select(export_jobs.c.job_id).where(
            export_jobs.c.state == "completed", export_jobs.c.expires < now)).scalars())
        for job_id in expired:
            _purge_files(conn, job_id)
            conn.execute(update(export_jobs).where(export_jobs.c.job_id == job_id).values(state="expired"))
    return len(expired)


def end_group_exports(conn: Connection, project_id: str, group_id: str) -> None:
    """In the caller's transaction: a project's exports of a Group end; their files are deleted now."""
    ended = list(conn.execute(select(export_jobs.c.job_id).where(
        export_jobs.c.project_id == project_id, export_jobs.c.group_id == group_id,
        export_jobs.c.state.in_(("accepted", "in-progress", "completed")))).scalars())
    for job_id in ended:
        _purge_files(conn, job_id)
    conn.execute(update(export_jobs).where(export_jobs.c.job_id.in_(ended), export_jobs.c.state == "completed")
                 .values(state="expired"))
    conn.execute(update(export_jobs).where(export_jobs.c.job_id.in_(ended), export_jobs.c.state != "expired")
                 .values(state="failed", error=f"Group/{group_id} is no longer available to this project"))


def _purge_files(conn: Connection, job_id: str) -> None:
    conn.execute(delete(export_parts).where(export_parts.c.job_id == job_id))
    conn.execute(delete(export_files).where(export_files.c.job_id == job_id))


# -- heartbeats -----------------------------------------------------------------------------------


def beat(worker_id: str, every_us: int) -> None:
    """Record that a worker is alive now and beats every `every_us` microseconds (a new worker also
    forgets workers silent for a day)."""
    now = db.now_us()
    with db.write() as conn:
        if conn.execute(update(export_workers).where(export_workers.c.worker_id == worker_id)
                        .values(last_beat=now, beat_every_us=every_us)).rowcount == 0:
            conn.execute(delete(export_workers).where(export_workers.c.last_beat < now - _FORGET_WORKERS_US))
            conn.execute(insert(export_workers).values(worker_id=worker_id, last_beat=now, beat_every_us=every_us))


def _alive(now: int) -> ColumnElement[bool]:
    """A worker is alive until three of the intervals it declared have passed since its last beat: a
    worker is judged by its own interval, whatever the judging node's configuration."""
    return export_workers.c.last_beat + 3 * export_workers.c.beat_every_us >= now


def worker_alive() -> bool:
    """Whether some worker is alive (`_alive`)."""
    with db.read() as conn:
        return conn.execute(select(exists().where(_alive(db.now_us())))).scalar_one()
