"""Versioned resource storage: create, read, update, delete, history.

Every write goes through `write()`, which stores the new current version, appends it
to `history` (old versions are never overwritten), replaces the search-index rows and
gives the version its sensitivity mask, recomputing those of the stored resources that
inherit from it (`service/store/masks.py`), all on the caller's connection so a
request's writes share one transaction.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import orjson
from sqlalchemy import ColumnElement, Connection, Table, and_, delete, insert, or_, select, text
from sqlalchemy import update as sql_update
from sqlalchemy.exc import IntegrityError

from policies.fhirdates import instant
from policies.sensitivity import Key, Node
from service.db import now_us
from service.errors import Conflict, Gone, InvalidRequest, NotFound, PreconditionFailed
from service.store import indexer, masks
from service.store.keyed import by_type_and_id
from service.store.schema import INDEX_TABLES, decision_classes, decisions, history, resources

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

#: Called in the writing transaction after every `write()` with (conn, stored, changes); an
#: exception rolls the whole write back. Consent materialisation registers itself here.
AFTER_WRITE: list[Callable[[Connection, list[Stored], Sequence[Change]], None]] = []
_INDEX_BY_NAME = {table.name: table for table in INDEX_TABLES}


@dataclass(frozen=True)
class Current:
    """What is stored now for a (type, id): enough to write its next version."""

    pk: int
    version: int
    deleted: bool


@dataclass(frozen=True)
class Change:
    """One version to write: `resource` None means delete. `method` is the HTTP method history records
    (POST, PUT, PATCH, DELETE); by default DELETE for a deletion, PUT over a stored resource, else POST."""

    type: str
    id: str
    resource: dict[str, Any] | None
    current: Current | None = None
    method: str | None = None

    def recorded_method(self) -> str:
        if self.method:
            return self.method
        return "DELETE" if self.resource is None else ("PUT" if self.current else "POST")


@dataclass(frozen=True)
class Stored:
    """One stored version of a resource."""

    pk: int
    type: str
    id: str
    version: int
    last_updated: int
    deleted: bool
    json: bytes | None
    patient_id: str | None = None
    method: str = ""

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'

    @property
    def last_modified(self) -> str:
        return instant(self.last_updated)

    def resource(self) -> dict[str, Any]:
        return orjson.loads(self.json) if self.json else {}


def check_id(resource_id: str) -> str:
    if not _ID.match(resource_id):
        raise InvalidRequest(f"{resource_id!r} is not a valid FHIR id ([A-Za-z0-9-.], at most 64 characters)")
    return resource_id


def new_id() -> str:
    return str(uuid.uuid4())


def current(conn: Connection, keys: Sequence[Key]) -> dict[Key, Current]:
    """The current version of each (type, id) of `keys` that exists (deleted ones included)."""
    found: dict[Key, Current] = {}
    for start in range(0, len(keys), 500):
        rows = conn.execute(
            select(resources.c.type, resources.c.id, resources.c.pk, resources.c.version, resources.c.deleted)
            .where(by_type_and_id(keys[start:start + 500])))
        found.update({(row.type, row.id): Current(row.pk, row.version, row.deleted) for row in rows})
    return found


def write(conn: Connection, changes: Sequence[Change]) -> list[Stored]:
    """Store the next version of each change (creations batched), with history and index rows."""
    if not changes:
        return []
    now = now_us()
    stored: list[Stored | None] = [None] * len(changes)
    index: list[indexer.Rows | None] = []
    fresh: list[tuple[int, dict[str, Any]]] = []
    touched_pks: list[int] = []
    judged: dict[int, dict[str, Any]] = {}  # updated rows by position (fresh ones are in `fresh`)
    new_rows: list[dict[str, Any]] = []
    nodes: dict[Key, Node] = {}
    for change in changes:
        row = _row(change, change.current.version + 1 if change.current else 1, now)
        if change.resource is None:
            index.append(None)
        else:
            nodes[(change.type, change.id)], references = masks.node(row["patient_id"], change.resource)
            index.append(indexer.extract(change.type, change.resource, references))
        row["clinical_low"], row["clinical_high"] = indexer.clinical_range(change.type, index[-1])
        new_rows.append(row)
    resolved, recomputed = masks.resolve(conn, nodes, [(c.type, c.id) for c in changes if c.resource is None])
    for position, (change, row) in enumerate(zip(changes, new_rows, strict=True)):
        version = row["version"]
        method = change.recorded_method()
        if change.resource is not None:
            row["sensitive_mask"] = resolved[(change.type, change.id)]
        if change.current is None:
            fresh.append((position, row))
        else:
            _update_row(conn, change.current, row)
            judged[position] = row
            touched_pks.append(change.current.pk)
            stored[position] = Stored(change.current.pk, change.type, change.id, version, now,
                                      change.resource is None, row["json"], row["patient_id"], method)
    if fresh:
        try:
            pks = conn.execute(insert(resources).returning(resources.c.pk, sort_by_parameter_order=True),
                               [row for _, row in fresh]).scalars().all()
        except IntegrityError as exc:
            raise Conflict("A resource with this id was created concurrently; retry the request") from exc
        for (position, row), pk in zip(fresh, pks, strict=True):
            stored[position] = Stored(pk, row["type"], row["id"], 1, now, False, row["json"], row["patient_id"],
                                      changes[position].recorded_method())
    done = [s for s in stored if s is not None]
    rows = [row for _, row in sorted([*fresh, *((p, r) for p, r in judged.items())])]
    _insert_rows(conn, history, _HISTORY_COLUMNS, [
        (s.pk, s.version, s.patient_id, now, s.method, s.deleted, row["sensitive_mask"], row["clinical_low"],
         row["clinical_high"], s.json) for s, row in zip(done, rows, strict=True)])
    if touched_pks:
        for table in INDEX_TABLES:
            conn.execute(delete(table).where(table.c.resource_pk.in_(touched_pks)))
    _insert_index(conn, [(s.pk, s.patient_id, rows) for s, rows in zip(done, index, strict=True) if rows])
    masks.apply(conn, recomputed)
    for hook in AFTER_WRITE:
        hook(conn, done, changes)
    return done


def _row(change: Change, version: int, now: int) -> dict[str, Any]:
    """The `resources` row of a new version (a deletion keeps no content); `write` sets its mask."""
    if change.resource is None:
        return {"type": change.type, "id": change.id, "patient_id": None, "version": version, "last_updated": now,
                "deleted": True, "sensitive_mask": 0, "json": None}
    payload = _stamp(change, version, now)  # sets the id, which a Patient's compartment is
    return {"type": change.type, "id": change.id, "patient_id": indexer.patient_of(change.type, change.resource),
            "version": version, "last_updated": now, "deleted": False, "sensitive_mask": 0, "json": payload}


def _stamp(change: Change, version: int, now: int) -> bytes:
    """Set id and meta.versionId/lastUpdated, then serialise the version to store."""
    resource = change.resource
    assert resource is not None
    meta = {**(resource.get("meta") or {}), "versionId": str(version), "lastUpdated": instant(now)}
    # resourceType, id and meta first, as FHIR servers conventionally serialise them.
    ordered = {"resourceType": resource["resourceType"], "id": change.id, "meta": meta}
    ordered.update((k, v) for k, v in resource.items() if k not in ordered)
    resource.clear()
    resource.update(ordered)
    return orjson.dumps(resource)


def _update_row(conn: Connection, existing: Current, row: dict[str, Any]) -> None:
    values = {k: v for k, v in row.items() if k not in ("type", "id")}
    result = conn.execute(sql_update(resources)
                          .where(and_(resources.c.pk == existing.pk, resources.c.version == existing.version))
                          .values(**values))
    if result.rowcount != 1:
        raise PreconditionFailed(
            f"{row['type']}/{row['id']} was changed concurrently (expected version {existing.version}); "
            "read it again and retry")


_HISTORY_COLUMNS = ("resource_pk", "version", "patient_id", "last_updated", "method", "deleted", "sensitive_mask",
                    "clinical_low", "clinical_high", "json")


def _insert_index(conn: Connection, items: list[tuple[int, str | None, indexer.Rows]]) -> None:
    batches: dict[tuple[str, tuple[str, ...]], list[tuple[Any, ...]]] = {}
    for pk, patient_id, rows_by_table in items:
        for table_name, rows in rows_by_table.items():
            for row in rows:
                batches.setdefault((table_name, tuple(row)), []).append((pk, patient_id, *row.values()))
    for (table_name, columns), batch in batches.items():
        _insert_rows(conn, _INDEX_BY_NAME[table_name], ("resource_pk", "patient_id", *columns), batch)


def _insert_rows(conn: Connection, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    """Insert `rows` (values in the order of `columns`) in the caller's transaction, straight
    through the driver: SQLite's executemany runs in C, and PostgreSQL takes them as one
    `COPY` stream; SQLAlchemy's per-row parameter processing would cost more than the inserts."""
    if not rows:
        return
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(_sqlite_insert(table.name, columns), rows)
        return
    with conn.connection.dbapi_connection.cursor() as cursor, \
            cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


@cache
def _sqlite_insert(table_name: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table_name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


# -- single-resource operations used by the API ------------------------------------------------

_COLUMNS = (resources.c.pk, resources.c.type, resources.c.id, resources.c.version, resources.c.last_updated,
            resources.c.deleted, resources.c.json, resources.c.patient_id)


def read(conn: Connection, resource_type: str, resource_id: str) -> Stored:
    """The current version; NotFound if it never existed, Gone if deleted."""
    row = conn.execute(select(*_COLUMNS).where(resources.c.type == resource_type,
                                               resources.c.id == resource_id)).first()
    if row is None:
        raise NotFound(f"{resource_type}/{resource_id} is not known")
    if row.deleted:
        raise Gone(f"{resource_type}/{resource_id} was deleted",
                   headers={"ETag": f'W/"{row.version}"'})
    return Stored(*row)


def vread(conn: Connection, resource_type: str, resource_id: str, version: int) -> Stored:
    """One version from history; Gone if that version records a deletion."""
    row = conn.execute(
        select(history.c.resource_pk, resources.c.type, resources.c.id, history.c.version,
               history.c.last_updated, history.c.deleted, history.c.json, history.c.patient_id, history.c.method)
        .join(resources, resources.c.pk == history.c.resource_pk)
        .where(resources.c.type == resource_type, resources.c.id == resource_id, history.c.version == version)
    ).first()
    if row is None:
        raise NotFound(f"{resource_type}/{resource_id} has no version {version}")
    if row.deleted:
        raise Gone(f"Version {version} of {resource_type}/{resource_id} is a deletion")
    return Stored(*row)


@dataclass(frozen=True)
class Version:
    """One entry of a history: the stored version, and whether it created the resource (its first
    version, or the first after a deletion)."""

    stored: Stored
    created: bool


def versions(conn: Connection, *, where: Sequence[ColumnElement[bool]] = (), at: tuple[int, int] | None = None,
             limit: int | None = None, offset: int = 0) -> list[Version]:
    """Versions newest first (by last update, then resource and version) that satisfy `where` (clauses
    on `history` and `resources`); with `at` (low, high µs), only those current at some instant of it."""
    previous, following = history.alias("previous"), history.alias("following")
    statement = (
        select(history.c.resource_pk, resources.c.type, resources.c.id, history.c.version,
               history.c.last_updated, history.c.deleted, history.c.json, history.c.patient_id, history.c.method,
               previous.c.deleted.label("previous_deleted"))
        .join(resources, resources.c.pk == history.c.resource_pk)
        .outerjoin(previous, and_(previous.c.resource_pk == history.c.resource_pk,
                                  previous.c.version == history.c.version - 1))
        .where(*where)
        .order_by(history.c.last_updated.desc(), history.c.resource_pk.desc(), history.c.version.desc())
        .offset(offset))
    if at is not None:
        statement = statement.outerjoin(following, and_(following.c.resource_pk == history.c.resource_pk,
                                                        following.c.version == history.c.version + 1)).where(
            history.c.last_updated <= at[1], or_(following.c.version.is_(None), following.c.last_updated > at[0]))
    if limit is not None:
        statement = statement.limit(limit)
    return [Version(Stored(*row[:9]), row.previous_deleted is None or bool(row.previous_deleted))
            for row in conn.execute(statement)]


def create(conn: Connection, resource_type: str, resource: dict[str, Any]) -> Stored:
    """Store a new resource under a server-assigned id (a client-sent id is replaced, as FHIR says)."""
    return write(conn, [Change(resource_type, new_id(), resource)])[0]


def update(conn: Connection, resource_type: str, resource_id: str, resource: dict[str, Any],
           if_match: int | None = None, method: str = "PUT") -> tuple[Stored, bool]:
    """Store the next version (or create with the client's id); returns (stored, created). `method`
    is what history records (PUT, or PATCH)."""
    check_id(resource_id)
    if resource.get("id") != resource_id:
        raise InvalidRequest(f"The resource id {resource.get('id')!r} must equal the id in the URL "
                             f"{resource_id!r}", expression=f"{resource_type}.id")
    existing = current(conn, [(resource_type, resource_id)]).get((resource_type, resource_id))
    if if_match is not None and (existing is None or existing.version != if_match):
        have = "does not exist" if existing is None else f"is at version {existing.version}"
        raise PreconditionFailed(f"If-Match expected version {if_match} but {resource_type}/{resource_id} {have}")
    created = existing is None or existing.deleted
    return write(conn, [Change(resource_type, resource_id, resource, existing, method)])[0], created


def remove(conn: Connection, resource_type: str, resource_id: str, if_match: int | None = None) -> Stored | None:
    """Delete (a new, deleted version); None if it was already deleted."""
    existing = current(conn, [(resource_type, resource_id)]).get((resource_type, resource_id))
    if existing is None:
        raise NotFound(f"{resource_type}/{resource_id} is not known")
    if if_match is not None and existing.version != if_match:
        raise PreconditionFailed(f"If-Match expected version {if_match} but {resource_type}/{resource_id} "
                                 f"is at version {existing.version}")
    if existing.deleted:
        return None
    return write(conn, [Change(resource_type, resource_id, None, existing)])[0]


def upsert(conn: Connection, items: Sequence[tuple[str, dict[str, Any]]]) -> list[Stored]:
    """Store many validated resources at once: with an id as update-or-create, without as create."""
    existing = current(conn, [(resource_type, check_id(resource["id"])) for resource_type, resource in items
                              if resource.get("id")])
    changes = []
    seen: set[tuple[str, str]] = set()
    for resource_type, resource in items:
        resource_id = resource.get("id") or new_id()
        if (resource_type, resource_id) in seen:
            raise InvalidRequest(f"{resource_type}/{resource_id} appears twice in one batch")
        seen.add((resource_type, resource_id))
        changes.append(Change(resource_type, resource_id, resource, existing.get((resource_type, resource_id))))
    return write(conn, changes)


#: A write of at least this many resources refreshes the planner's statistics afterwards.
LARGE_WRITE = 1_000
#: What a load writes most: the tables whose statistics steer the search and cohort plans, and the
#: consent decisions its new patients get.
_LOADED = (resources, history, *INDEX_TABLES, decisions, decision_classes)


class GrowingWrite:
    """When a write that keeps adding rows to `tables` refreshes their planner statistics: once it
    has added LARGE_WRITE rows, then each time that count doubles — one refresh per doubling, and
    from the first on, the statistics describe at least half of the rows the write has added.

    Without statistics, PostgreSQL takes a 500-value `IN` list to match every row and a one-value
    filter to match 0.5 %, so its look-ups by id used the index of a low-cardinality column and
    read every row written so far: a load or a refresh of decisions slowed down as it grew. On
    PostgreSQL `ANALYZE` counts the rows of the transaction running it, so this works inside one.
    """

    def __init__(self, tables: Sequence[Table] = _LOADED) -> None:
        self.tables = tuple(tables)
        self._next = LARGE_WRITE

    def added(self, conn: Connection, total: int) -> None:
        """`total` rows are added so far; refresh the statistics if that is due."""
        if total >= self._next:
            refresh_statistics(conn, self.tables)
            self._next = 2 * total


def refresh_statistics(conn: Connection, tables: Sequence[Table] = _LOADED) -> None:
    """Give the query planner statistics on `tables` (by default, those a load writes).

    SQLite `ANALYZE`s (sampled: `analysis_limit`) each of them that has none yet, then runs
    `PRAGMA optimize`, which refreshes the statistics that grew stale; PostgreSQL `ANALYZE`s them.
    """
    if conn.dialect.name != "sqlite":
        conn.execute(text(f"ANALYZE {', '.join(table.name for table in tables)}"))
        return
    has_stats = conn.scalar(text("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'"))
    analysed = set(conn.scalars(text("SELECT DISTINCT tbl FROM sqlite_stat1"))) if has_stats else set()
    conn.execute(text("PRAGMA analysis_limit = 1000"))
    try:
        for table in tables:
            if table.name not in analysed:
                conn.execute(text(f"ANALYZE {table.name}"))
        conn.execute(text("PRAGMA optimize"))
    finally:
        conn.execute(text("PRAGMA analysis_limit = 0"))
