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
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from service.errors import TooCostly
from service.store import migrations


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


def init_app(app: Flask, given: Engine | None = None) -> None:
    """The app's engine: `given`, else one made from its config."""
    app.extensions["passerelle.engine"] = given if given is not None else make_engine(
        app.config["DATABASE_URL"], app.config["DB_POOL_SIZE"], app.config["DB_BUSY_SECONDS"])


def engine() -> Engine:
    return current_app.extensions["passerelle.engine"]


@contextmanager
def read(eng: Engine | None = None) -> Iterator[Connection]:
    """A read-only transaction: a consistent snapshot for multi-statement reads."""
    eng = eng or engine()
    with eng.connect() as conn, conn.begin():
        yield conn


@contextmanager
def statistics_read() -> Iterator[Connection]:
    """The read transaction (`read`) a statistical answer is computed in: no statement of it runs
    longer than PASSERELLE_STATISTICS_TIMEOUT_SECONDS (at least 1 ms on PostgreSQL): one that does
    is interrupted and `errors.TooCostly` raised. PostgreSQL's `statement_timeout` is set for this
    transaction only; SQLite's progress handler only while it lasts.

    On PostgreSQL the transaction's statements are planned without nested loops where another join
    will do: a statistical answer reads a cohort, and joined by hash its cost grows with the rows read
    whatever the planner's statistics say. With none (rows just written, autovacuum not yet by), a
    filter on a consent decision is estimated at one row, and nested loops over the real hundreds
    re-read every inner row for each outer one: a 240-patient training took seconds per statement."""
    seconds = current_app.config["STATISTICS_TIMEOUT_SECONDS"]
    with read() as conn:
        try:
            if is_sqlite(conn.engine):
                with _sqlite_bound(conn, seconds):
                    yield conn
            else:
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, round(seconds * 1000))}; "
                                     "SET LOCAL enable_nestloop = off")
                yield conn
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != "57014" and str(exc.orig) != "interrupted":
                raise
            raise TooCostly(f"Computing this answer took longer than {seconds:g} s "
                            "(PASSERELLE_STATISTICS_TIMEOUT_SECONDS); ask a smaller question") from exc


@contextmanager
def _sqlite_bound(conn: Connection, seconds: float) -> Iterator[None]:
    """Interrupt any statement of `conn` still running `seconds` after it started."""
    started = [time.monotonic()]

    def start(*_: object) -> None:
        started[0] = time.monotonic()

    raw = conn.connection.driver_connection
    event.listen(conn, "before_cursor_execute", start)
    raw.set_progress_handler(lambda: time.monotonic() - started[0] > seconds, 1000)  # type: ignore[union-attr]
    try:
        yield
    finally:
        raw.set_progress_handler(None, 0)  # type: ignore[union-attr]
        event.remove(conn, "before_cursor_execute", start)


@contextmanager
def write(eng: Engine | None = None) -> Iterator[Connection]:
    """One write transaction: commits on success, rolls back everything on any error."""
    eng = eng or engine()
    with eng.connect() as conn:
        conn.execution_options(writer=True)
        with conn.begin():
            yield conn


@contextmanager
def migration_lock(eng: Engine | None = None) -> Iterator[Connection]:
    """One write transaction holding the migration lock (migrations.lock): a second one waits until
    it ends. Raises migrations.MigrationBusy, having changed nothing, when that wait passes the busy
    timeout (PASSERELLE_DB_BUSY_SECONDS)."""
    waiting = True
    try:
        with write(eng) as conn:  # SQLite waits here (BEGIN IMMEDIATE), PostgreSQL in `lock`
            migrations.lock(conn)
            waiting = False
            yield conn
    except OperationalError as exc:
        if waiting and is_contention(exc):
            raise migrations.MigrationBusy() from None
        raise


def migrate(eng: Engine) -> str:
    """Bring the schema to this code's newest revision (service/store/migrations); idempotent.
    Returns that revision.

    An up-to-date database costs one read. Otherwise one write transaction holds the migration
    lock, so nodes running `init-db` at once migrate once: the others wait, then find nothing to do.
    On PostgreSQL the revisions run in that transaction (all or nothing). Raises
    migrations.MigrationRefused, changing nothing, for a database of a release older than the
    baseline or newer than this code, and migrations.MigrationBusy when another node holds the lock
    for longer than the busy timeout.
    """
    with read(eng) as conn:
        if migrations.up_to_date(conn):
            return migrations.head()
    with migration_lock(eng) as conn:
        migrations.upgrade(conn)
    return migrations.head()
