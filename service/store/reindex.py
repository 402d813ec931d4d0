"""Rebuild the search index of the stored resources from their current versions.

A release that indexes more of each resource (`indexer.extract`: e.g. the rows `:text`,
`:of-type` and `:identifier` read) answers those searches only for resources written
after it; `reindex` gives every stored resource the rows the running code extracts, as a
write of the same content would, without writing a new version, and records the index
version (`indexer.VERSION`) in `settings`. `flask --app wsgi init-db` runs it when the
recorded version differs from the running code's.
"""
from __future__ import annotations

from collections.abc import Callable

import orjson
from sqlalchemy import Connection, Engine, delete, false, insert, select

from service import db
from service.store import indexer, masks
from service.store.schema import INDEX_TABLES, resources, settings

SETTING = "search-index"
_BY_NAME = {table.name: table for table in INDEX_TABLES}


def stored_version(conn: Connection) -> str | None:
    """The index version the stored index rows were extracted with (None: never recorded)."""
    return conn.scalar(select(settings.c.value).where(settings.c.name == SETTING))


def reindex(engine: Engine, batch: int = 500, progress: Callable[[int], None] = lambda _: None) -> int:
    """Replace the index rows of every live resource, `batch` resources per write transaction
    (so writers wait at most one batch), then record `indexer.VERSION`; returns how many
    resources were indexed."""
    after, done = 0, 0
    while True:
        with db.write(engine) as conn:
            count, after = _reindex_batch(conn, after, batch)
            if count == 0:
                conn.execute(delete(settings).where(settings.c.name == SETTING))
                conn.execute(insert(settings).values(name=SETTING, value=indexer.VERSION))
                return done
        done += count
        progress(count)


def _reindex_batch(conn: Connection, after: int, batch: int) -> tuple[int, int]:
    """Reindex the next `batch` live resources past row `after`; (how many, the last row number)."""
    rows = conn.execute(select(resources.c.pk, resources.c.type, resources.c.patient_id, resources.c.json)
                        .where(resources.c.pk > after, resources.c.deleted == false())
                        .order_by(resources.c.pk).limit(batch)).all()
    if not rows:
        return 0, after
    pks = [row.pk for row in rows]
    for table in INDEX_TABLES:
        conn.execute(delete(table).where(table.c.resource_pk.in_(pks)))
    inserts: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        resource = orjson.loads(row.json)
        _, references = masks.node(row.patient_id, resource)
        for table_name, entries in indexer.extract(row.type, resource, references).items():
            inserts.setdefault(table_name, []).extend(
                {"resource_pk": row.pk, "patient_id": row.patient_id, **entry} for entry in entries)
    for table_name, entries in inserts.items():
        conn.execute(insert(_BY_NAME[table_name]), entries)
    return len(rows), pks[-1]
