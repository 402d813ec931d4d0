"""Shared fixtures: the real app on a real database, SQLite and PostgreSQL.

Every test that uses `app` runs once per backend. PostgreSQL runs when the server
`tests/backends.py` chooses answers; otherwise the PostgreSQL variant is skipped on a
laptop (one summary line says why) and fails in CI, where it must run.

A test that uses `world` starts on a database that already holds the world `world_recipe`
builds (tests/research_world.py's unless its module overrides `world_recipe`): each world is
built once per test process, backend and UTC day through the real API, and every such test
gets its own copy of that database, and of the master key it was built with, before its app starts.
"""
from __future__ import annotations

import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fhirpy import SyncFHIRClient
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Connection, Engine, TableClause, column, create_engine, text
from sqlalchemy.engine import make_url
from werkzeug.serving import make_server

from policies.deid import Profile, load_profile
from policies.keys import ensure_master_key
from policies.pseudonym import PseudonymKey
from service import db
from service.app import create_app
from service.cli import database
from service.config import load_config
from service.export import Worker
from service.store.schema import metadata
from tests.backends import admin_url, in_ci, postgres_problem, postgres_url
from tests.deid_helpers import DEFAULT_PROFILE, MASTER
from tests.research_world import World, bearer, build, token

# Every app a test builds runs export jobs only when the test runs a `Worker` (see the `export_worker` fixture).
os.environ["PASSERELLE_EXPORT_WORKER"] = "off"
PG_URL = postgres_url(os.environ)
IN_CI = in_ci(os.environ)
_PG_PROBLEM = postgres_problem(PG_URL)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line instead of a SKIPPED line per PostgreSQL variant."""
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if _PG_PROBLEM and isinstance(r.longrepr, tuple) and _PG_PROBLEM in r.longrepr[2]]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} PostgreSQL variants skipped: {_PG_PROBLEM}", yellow=True)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database, built once per test process and copied for each test."""
    path = tmp_path_factory.mktemp("template") / "passerelle.db"
    engine = db.make_engine(f"sqlite:///{path}")
    db.migrate(engine)
    engine.dispose()  # checkpoints the WAL into the file, so a plain copy is complete
    return path


@pytest.fixture(scope="session")
def pg_schema() -> Iterator[str]:
    """A private PostgreSQL schema, migrated once per test process and emptied before each test."""
    yield from _new_schema()


@pytest.fixture(scope="session")
def pg_engine(pg_schema: str) -> Iterator[Engine]:
    """An engine on `pg_schema`, for the fixtures that empty it or restore a world into it."""
    engine = db.make_engine(pg_schema)
    yield engine
    engine.dispose()


#: The table in which the migrations record the schema's revision (alembic's).
ALEMBIC_VERSION = TableClause("alembic_version", column("version_num"))
#: Every table of the schema, parents first.
_TABLES = (*metadata.sorted_tables, ALEMBIC_VERSION)
#: Each table's rows, as column → value mappings.
Rows = dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="session")
def pg_migrated(pg_engine: Engine) -> Rows:
    """The rows `pg_schema` holds as migrated (its revision, and the settings the revisions record, such as
    the serving floor), read before any test writes to it: what every test's copy of the SQLite template
    also starts with."""
    with pg_engine.connect() as conn:
        return {table.name: [dict(row._mapping) for row in conn.execute(table.select())] for table in _TABLES}


@pytest.fixture(scope="session")
def pg_snapshot_schema() -> Iterator[str]:
    """The name of a private PostgreSQL schema holding copies of the tables of the worlds built on `pg_schema`."""
    for url in _new_schema(migrated=False):
        yield make_url(url).query["options"].removeprefix("-csearch_path=")


@pytest.fixture(scope="session")
def pg_server_schema() -> Iterator[str]:
    """Another private PostgreSQL schema (migrated once per test process), for servers that serve it while
    other tests run: no fixture ever empties it."""
    yield from _new_schema()


@pytest.fixture
def pg_unmigrated_schema() -> Iterator[str]:
    """A new PostgreSQL schema no code has touched (no table), dropped after the test."""
    yield from _new_schema(migrated=False)


def _new_schema(migrated: bool = True) -> Iterator[str]:
    if _PG_PROBLEM:
        if IN_CI:
            pytest.fail(f"PostgreSQL tests must run in CI: {_PG_PROBLEM}")
        pytest.skip(_PG_PROBLEM)
    schema = f"t_{secrets.token_hex(6)}"
    admin = create_engine(admin_url(PG_URL))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(admin_url(PG_URL)).update_query_dict({"options": f"-csearch_path={schema}"})
    rendered = url.render_as_string(hide_password=False)
    if migrated:
        engine = db.make_engine(rendered)
        db.migrate(engine)
        engine.dispose()
    try:
        yield rendered
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh migrated database, a SQLite file or a private PostgreSQL schema: empty or, when the test
    uses `world`, holding the world (and then `tmp_path` holds the master key it was built with)."""
    snapshot = None
    if "world_snapshot" in request.fixturenames:
        snapshot = request.getfixturevalue("world_snapshot")
        shutil.copy(snapshot.master_key, tmp_path / "master.key")  # with its mode (600)
    if request.param == "sqlite":
        target = tmp_path / "passerelle.db"
        shutil.copyfile(snapshot.database if snapshot else request.getfixturevalue("sqlite_template"), target)
        yield f"sqlite:///{target}"
        return
    migrated = request.getfixturevalue("pg_migrated")
    with request.getfixturevalue("pg_engine").begin() as conn:
        _empty(conn)
        if snapshot:
            for table in snapshot.tables:
                conn.execute(text(f'INSERT INTO "{table}" SELECT * FROM {snapshot.database.format(table)}'))
        else:
            _restore(conn, migrated)
    yield request.getfixturevalue("pg_schema")


def _empty(conn: Connection) -> None:
    """Empty the tables of the connection's schema, its revision's record included. DELETE, not TRUNCATE:
    on tables this small it is many times faster, and only from the tables holding rows (one query finds
    them)."""
    holding = set(conn.execute(text(" UNION ALL ".join(
        f"SELECT '{table.name}' WHERE EXISTS (SELECT FROM \"{table.name}\")" for table in _TABLES
    ))).scalars())
    for table in reversed(_TABLES):
        if table.name in holding:
            conn.execute(table.delete())


def _restore(conn: Connection, rows: Rows) -> None:
    """Insert `rows` into the tables of the connection's schema (after `_empty`)."""
    for table in _TABLES:
        if rows[table.name]:
            conn.execute(table.insert(), rows[table.name])


#: What builds a world through the real app: (app, client, custodian headers) -> what tests need to know of it.
Recipe = Callable[[Flask, FlaskClient, dict[str, str]], Any]


@dataclass(frozen=True)
class Snapshot:
    """A built world: what its recipe returned, the master key it was built with, and its database: a SQLite
    file, or on PostgreSQL the name (`"schema"."wN_{}"`) of the copy of each of its non-empty `tables`."""

    made: Any
    master_key: Path
    database: Path | str
    tables: tuple[str, ...] = ()


class Worlds:
    """The worlds of one test process, each built the first time a test asks for it on a backend on a UTC day
    (a world may hold dates relative to today), in a database of its own (SQLite) or on `pg_schema`."""

    def __init__(self, request: pytest.FixtureRequest, directory: Path):
        self.request, self.directory = request, directory
        self.built: dict[tuple[str, Recipe, str], Snapshot] = {}

    def snapshot(self, backend: str, recipe: Recipe) -> Snapshot:
        key = (backend, recipe, datetime.now(UTC).date().isoformat())
        if key not in self.built:
            self.built[key] = self._build(backend, recipe, self.directory / str(len(self.built)))
        return self.built[key]

    def _build(self, backend: str, recipe: Recipe, directory: Path) -> Snapshot:
        directory.mkdir()
        if backend == "sqlite":
            path = directory / "passerelle.db"
            shutil.copyfile(self.request.getfixturevalue("sqlite_template"), path)
            url = f"sqlite:///{path}"
        else:
            url = self.request.getfixturevalue("pg_schema")
            migrated = self.request.getfixturevalue("pg_migrated")
            with self.request.getfixturevalue("pg_engine").begin() as conn:
                _empty(conn)
                _restore(conn, migrated)
        application = initialised_app(url, directory)
        client = application.test_client()
        made = recipe(application, client, bearer(custodian_bearer(application, client)))
        close_app(application)  # on SQLite, checkpoints the WAL into the file
        if backend == "sqlite":
            return Snapshot(made, directory / "master.key", path)
        copy = f'"{self.request.getfixturevalue("pg_snapshot_schema")}"."w{len(self.built)}_{{}}"'
        tables = []
        with self.request.getfixturevalue("pg_engine").begin() as conn:
            for table in _TABLES:
                if conn.execute(text(f'SELECT EXISTS (SELECT FROM "{table.name}")')).scalar_one():
                    conn.execute(text(f'CREATE TABLE {copy.format(table.name)} AS SELECT * FROM "{table.name}"'))
                    tables.append(table.name)
        return Snapshot(made, directory / "master.key", copy, tuple(tables))


@pytest.fixture(scope="session")
def worlds(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Worlds:
    return Worlds(request, tmp_path_factory.mktemp("worlds"))


def initialised_app(database_url: str, directory: Path) -> Flask:
    """The real application on `database_url`, migrated and initialised, with its own master key in
    `directory` (`close_app` it when done).

    On PostgreSQL, where every test of the process uses the same schema, the apps share one engine: its
    pool, whose connections stay open from test to test, and its compiled statements, which an engine
    compiles once each."""
    application = create_app({
        "TESTING": True,
        "DATABASE_URL": database_url,
        "INSTANCE_DIR": str(directory),
        "MASTER_KEY_FILE": str(directory / "master.key"),
    }, engine=_shared_engine(database_url))
    ensure_master_key(application.config["MASTER_KEY_FILE"])
    db.migrate(application.extensions["passerelle.engine"])
    with application.app_context(), db.write() as conn:
        database.record_settings(conn)  # as `init-db` does: this node's key and the regime
    return application


#: The engines apps share, by database URL and the pool size and busy timeout the environment configures.
_ENGINES: dict[tuple[str, int, int], Engine] = {}


def _shared_engine(database_url: str) -> Engine | None:
    if make_url(database_url).get_backend_name() != "postgresql":
        return None  # a SQLite file per test: an engine per file
    configured = load_config()
    key = (database_url, configured["DB_POOL_SIZE"], configured["DB_BUSY_SECONDS"])
    if key not in _ENGINES:
        _ENGINES[key] = db.make_engine(*key)
    return _ENGINES[key]


def close_app(application: Flask) -> None:
    """Done with an app `initialised_app` built: its own engine is disposed (on SQLite, that checkpoints the
    WAL into the file); a shared one is left as it is, its idle connections ready for the next test."""
    engine = application.extensions["passerelle.engine"]
    if engine not in _ENGINES.values():
        engine.dispose()


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Iterator[Flask]:
    """The real application on an initialised database, with its own master key."""
    application = initialised_app(database_url, tmp_path)
    yield application
    close_app(application)


@pytest.fixture
def base_url(app: Flask) -> Iterator[str]:
    """The application served over HTTP on a free loopback port until the test ends (loopback
    hosts are served without PASSERELLE_BASE_URL, so the Host checks accept it)."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    # Polled for shutdown every 10 ms (the default 0.5 s was most of a short test's teardown).
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, name="live-server",
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


@pytest.fixture
def fhirpy(base_url: str, custodian_token: str) -> SyncFHIRClient:
    """fhirpy's synchronous client on the live custodian API, with a custodian's token."""
    return SyncFHIRClient(f"{base_url}/fhir", authorization=f"Bearer {custodian_token}")


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def custodian_token(app: Flask, client: FlaskClient) -> str:
    """A bearer token of a freshly registered custodian client, from the real token endpoint."""
    return custodian_bearer(app, client)


def custodian_bearer(app: Flask, client: FlaskClient) -> str:
    """Register a custodian client; its bearer token, from the real token endpoint."""
    return token(client, app, "custodian")


@pytest.fixture
def custodian_headers(custodian_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {custodian_token}", "Content-Type": "application/fhir+json"}


@pytest.fixture
def export_worker(app: Flask) -> Worker:
    """A live export worker of this app (it has recorded its heartbeat); `export_worker.work()` runs the queue."""
    worker = Worker(app)
    worker.beat()
    return worker


@pytest.fixture
def world_recipe() -> Recipe:
    """What builds `world`: the research world of tests/research_world.py (three projects, patients in every
    consent situation), unless the test's module overrides this fixture."""
    return build


@pytest.fixture
def world_snapshot(request: pytest.FixtureRequest, worlds: Worlds, world_recipe: Recipe) -> Snapshot:
    """The built world the test's database starts with (see `database_url`)."""
    return worlds.snapshot(request.node.callspec.params["database_url"], world_recipe)


@pytest.fixture
def world(app: Flask, world_snapshot: Snapshot) -> Any:
    """What `world_recipe` returned when it built the world the test's database started with (a copy)."""
    return deepcopy(world_snapshot.made)


@pytest.fixture
def research(app: Flask, client: FlaskClient, world: World) -> dict[str, str]:
    """Headers of a research client of the world's record-level project."""
    return bearer(token(client, app, "research", world.project))


@pytest.fixture(scope="session")
def profile() -> Profile:
    """The shipped default de-identification profile."""
    return load_profile(DEFAULT_PROFILE)


@pytest.fixture(scope="session")
def key() -> PseudonymKey:
    """A pseudonym key of project `project-a`, version 1, under the tests' fixed master key."""
    return PseudonymKey(MASTER, "project-a", 1)
