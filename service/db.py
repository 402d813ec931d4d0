"""Database engines and transactions: one module owns every connection.

SQLite is the embedded default and PostgreSQL (psycopg 3) the scale-out backend; the
rest of the code only sees SQLAlchemy Core connections from `read()` and `write()`.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flask import Flask, current_app
from sqlalchemy import Connection, Engine, create_engine, event, insert, inspect, select
from sqlalchemy.engine import make_url

from service.store.schema import metadata, schema_migrations

#: Bump when a migration step is added to MIGRATIONS.
SCHEMA_VERSION = 2


def now_us() -> int:
    """The current instant as integer microseconds since the epoch (UTC)."""
    return time.time_ns() // 1000


def make_engine(url: str, pool_size: int = 5) -> Engine:
    """Create an engine with the settings each backend needs for concurrent workers."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 30})
        _configure_sqlite(engine)
        return engine
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy's begin event (below) issue BEGIN itself instead of pysqlite.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A writer takes the lock up front: a deferred transaction that later upgrades
        # to a write can fail with SQLITE_BUSY without waiting for busy_timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("writer") else "BEGIN")


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def init_app(app: Flask) -> None:
    app.extensions["passerelle.engine"] = make_engine(app.config["DATABASE_URL"], app.config["DB_POOL_SIZE"])


def engine() -> Engine:
    return current_app.extensions["passerelle.engine"]


@contextmanager
def read(eng: Engine | None = None) -> Iterator[Connection]:
    """A read-only transaction: a consistent snapshot for multi-statement reads."""
    eng = eng or engine()
    with eng.connect() as conn, conn.begin():
        yield conn


@contextmanager
def write(eng: Engine | None = None) -> Iterator[Connection]:
    """One write transaction: commits on success, rolls back everything on any error."""
    eng = eng or engine()
    with eng.connect() as conn:
        conn.execution_options(writer=True)
        with conn.begin():
            yield conn


def migrate(eng: Engine) -> int:
    """Create or migrate the schema; idempotent. Returns the schema version.

    A new database gets the whole schema from the table definitions and every version
    marked applied. An existing one runs, in order, the steps of each version it lacks
    (columns and indexes added to existing tables), then gains any new table.
    """
    with write(eng) as conn:
        applied: set[int] = set()
        if inspect(conn).has_table(schema_migrations.name):
            applied = set(conn.scalars(select(schema_migrations.c.version)))
        fresh = not applied  # every release records its versions when it creates its tables
        if fresh:
            metadata.create_all(conn, checkfirst=True)
        for version in range(1, SCHEMA_VERSION + 1):
            if version not in applied:
                if not fresh:
                    for step in MIGRATIONS.get(version, ()):
                        conn.exec_driver_sql(step)
                conn.execute(insert(schema_migrations).values(version=version, applied=now_us()))
        metadata.create_all(conn, checkfirst=True)
    return SCHEMA_VERSION


#: Statements that bring a schema of version N-1 to version N (version 1 is the first
#: release's tables). New tables need no step: `migrate` creates them from the metadata.
#: Each step must run on SQLite and on PostgreSQL.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # Per-version consent attributes (old versions are judged on their own content).
    2: ("ALTER TABLE history ADD COLUMN sensitive_mask BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE history ADD COLUMN clinical_low BIGINT",
        "ALTER TABLE history ADD COLUMN clinical_high BIGINT",
        # Versions written before carry the current row's attributes; an older version's
        # sensitivity is unknown, so it counts as every category (withheld from anyone who
        # excluded one) until it is classified again.
        "UPDATE history SET sensitive_mask = COALESCE((SELECT r.sensitive_mask FROM resources r "
        "WHERE r.pk = history.resource_pk AND r.version = history.version), 31), "
        "clinical_low = (SELECT r.clinical_low FROM resources r "
        "WHERE r.pk = history.resource_pk AND r.version = history.version), clinical_high = "
        "(SELECT r.clinical_high FROM resources r WHERE r.pk = history.resource_pk AND r.version = history.version)",
        ),
}
