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
from sqlalchemy.exc import OperationalError

from service.store.schema import metadata, schema_migrations

#: Bump when a migration step is added to MIGRATIONS.
SCHEMA_VERSION = 5


def now_us() -> int:
    """The current instant as integer microseconds since the epoch (UTC)."""
    return time.time_ns() // 1000


def make_engine(url: str, pool_size: int = 5, busy_seconds: float = 30.0) -> Engine:
    """Create an engine with the settings each backend needs for concurrent workers.

    `busy_seconds` is how long a statement waits for a lock before failing with a
    contention error (SQLite's busy timeout; PostgreSQL's lock_timeout).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": busy_seconds})
        _configure_sqlite(engine, int(busy_seconds * 1000))
        return engine
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    # Server options in the URL (e.g. a search_path) are kept beside the lock timeout.
    options = " ".join(filter(None, (parsed.query.get("options"), f"-c lock_timeout={int(busy_seconds * 1000)}")))
    return create_engine(parsed.difference_update_query(["options"]), pool_size=pool_size, max_overflow=pool_size,
                         pool_pre_ping=True, connect_args={"options": options})


def _configure_sqlite(engine: Engine, busy_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy's begin event (below) issue BEGIN itself instead of pysqlite.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A writer takes the lock up front: a deferred transaction that later upgrades
        # to a write can fail with SQLITE_BUSY without waiting for busy_timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("writer") else "BEGIN")


#: SQLSTATEs of PostgreSQL errors a retry can cure: serialization failure, deadlock, lock timeout.
_CONTENTION_STATES = frozenset({"40001", "40P01", "55P03"})


def is_contention(exc: OperationalError) -> bool:
    """Whether a database error means "busy, try again" (SQLite's lock, PostgreSQL's conflicts)."""
    state = getattr(exc.orig, "sqlstate", None)
    message = str(exc.orig).lower()
    return state in _CONTENTION_STATES or "database is locked" in message or "database is busy" in message


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def init_app(app: Flask) -> None:
    app.extensions["passerelle.engine"] = make_engine(app.config["DATABASE_URL"], app.config["DB_POOL_SIZE"],
                                                      app.config["DB_BUSY_SECONDS"])


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
        # Project keys are made with the project now, never on a research request's read path.
        "INSERT INTO project_keys (project_id, version, created) SELECT p.project_id, 1, p.created "
        "FROM projects p WHERE NOT EXISTS (SELECT 1 FROM project_keys k WHERE k.project_id = p.project_id)",
        # Export files now record what each line holds, so a download is judged against consent
        # again; earlier files cannot be, so they expire (and running jobs start again).
        "ALTER TABLE export_parts ADD COLUMN lines TEXT",
        "DELETE FROM export_parts",
        "DELETE FROM export_files",
        "UPDATE export_jobs SET state = 'expired' WHERE state = 'completed'",
        "UPDATE export_jobs SET state = 'accepted', owner = NULL, lease_until = NULL WHERE state = 'in-progress'",
        # Recorded $aggregate answers are versioned per project: its types' and decisions' newest writes.
        "CREATE INDEX IF NOT EXISTS ix_resources_type_last_updated ON resources (type, last_updated)",
        "CREATE INDEX IF NOT EXISTS ix_decisions_project_updated ON decisions (project_id, updated)",
        ),
    # The consent portal: projects in plain language (its own tables are new and need no step).
    3: ("ALTER TABLE projects ADD COLUMN plain_language TEXT",
        "ALTER TABLE projects ADD COLUMN ends VARCHAR(10)"),
    # Accountability (issue 13): the audit's new facts travel in each entry's hashed `detail`.
    4: (),
    # Type- and system-level history (issue 14): pages of versions newest first, from an index.
    5: ("CREATE INDEX IF NOT EXISTS ix_history_last_updated ON history (last_updated, resource_pk, version)",),
}
