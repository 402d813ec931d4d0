"""Upgrading a populated database of the previous release (7be16ab, legacy schema version 5) with
this release's `init-db` loses nothing: every row of every table is still there and equal, the audit
chain verifies, the stored resources are served and research reads work.

The databases are tests/data/previous_release/{sqlite,postgresql}.sql, made by that release's own
code (make.py beside them says how)."""
from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import Result
from flask import Flask
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    inspect,
    select,
    text,
)

from service import audit, db
from service.app import create_app
from service.store import masks, migrations, reindex
from service.store.schema import audit as audit_table
from service.store.schema import metadata, projects, resources
from tests.research_world import bearer, token

FIXTURES = Path(__file__).resolve().parent / "data" / "previous_release"


@pytest.fixture(params=["sqlite", "postgresql"])
def previous_release(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a database the previous release made and filled, not yet touched by this release."""
    if request.param == "sqlite":
        target = tmp_path / "previous.db"
        with sqlite3.connect(target) as conn:
            conn.executescript((FIXTURES / "sqlite.sql").read_text())
        conn.close()
        return f"sqlite:///{target}"
    url = request.getfixturevalue("pg_unmigrated_schema")
    engine = db.make_engine(url)
    raw = engine.raw_connection()  # the dump is many statements: the driver's own cursor runs them at once
    try:
        with raw.cursor() as cursor:
            cursor.execute((FIXTURES / "postgresql.sql").read_text())
        raw.commit()
    finally:
        raw.close()
        engine.dispose()
    return url


@pytest.fixture
def node(previous_release: str, tmp_path: Path) -> Iterator[Flask]:
    """A node of this release on that database, with the master key it was initialised with."""
    key_file = tmp_path / "master.key"
    key_file.write_bytes(bytes.fromhex((FIXTURES / "master.key.hex").read_text()))
    key_file.chmod(0o600)
    application = create_app({"TESTING": True, "DATABASE_URL": previous_release, "INSTANCE_DIR": str(tmp_path),
                              "MASTER_KEY_FILE": str(key_file)})
    yield application
    application.extensions["passerelle.engine"].dispose()


def init_db(node: Flask) -> Result:
    result = node.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    return result


#: The `settings` rows that record which code wrote the rest (the serving floor, the versions of the sensitivity
#: classifier and of the search index): a release whose rules differ records its own.
RECORDS = (migrations.FLOOR_SETTING, masks.SETTING, reindex.SETTING)


#: Columns later revisions added to tables the baseline made (0003: `audit.patients`, 0004:
#: `export_workers.beat_every_us`).
ADDED_COLUMNS = {"audit": ("patients",), "export_workers": ("beat_every_us",)}


def baseline_columns(name: str) -> list[str]:
    """The columns of table `name` as the baseline made it."""
    return [column.name for column in metadata.tables[name].c if column.name not in ADDED_COLUMNS.get(name, ())]


def contents(engine: Engine) -> dict[str, tuple[int, str]]:
    """Every table of the database (but the records of the code that wrote it: Alembic's table and the
    `RECORDS` rows of `settings`; of tables given columns since the baseline, the baseline's columns) →
    (row count, SHA-256 of its sorted rows)."""
    found = {}
    with engine.connect() as conn:
        for name in inspect(conn).get_table_names():
            if name == "alembic_version":
                continue
            kept = " WHERE name NOT IN (:r0, :r1, :r2)" if name == "settings" else ""
            columns = ", ".join(baseline_columns(name)) if name in ADDED_COLUMNS else "*"
            query = text(f'SELECT {columns} FROM "{name}"{kept}')
            rows = sorted(orjson.dumps([bytes(v).hex() if isinstance(v, bytes | memoryview) else v for v in row])
                          for row in conn.execute(query, {f"r{i}": record for i, record in enumerate(RECORDS)}))
            found[name] = (len(rows), hashlib.sha256(b"\n".join(rows)).hexdigest())
    return found


def baseline_definitions(directory: Path) -> MetaData:
    """The live definitions of the tables the baseline revision creates (found by running it alone)."""
    engine = db.make_engine(f"sqlite:///{directory / 'baseline.db'}")
    with engine.begin() as conn:
        cfg = migrations.config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, migrations.BASELINE)
        created = set(inspect(conn).get_table_names())
    engine.dispose()
    chosen = MetaData()
    for table in metadata.sorted_tables:
        if table.name in created and table.name not in ADDED_COLUMNS:
            table.to_metadata(chosen)
        elif table.name in created:  # as the baseline made it: without the columns added since, nor their indexes
            kept = baseline_columns(table.name)
            Table(table.name, chosen,
                  *(Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable, autoincrement=False)
                    for c in table.c if c.name in kept),
                  *(Index(index.name, *(c.name for c in index.columns)) for index in table.indexes
                    if all(c.name in kept for c in index.columns)))
    # What revision 0003 replaced: the patients each entry names as rows of their own.
    Table("audit_patients", chosen, Column("seq", BigInteger, nullable=False),
          Column("patient_id", String(64), nullable=False),
          PrimaryKeyConstraint("patient_id", "seq", name="pk_audit_patients"))
    return chosen


def test_the_previous_release_made_the_schema_the_baseline_builds(node: Flask, tmp_path: Path):
    with node.extensions["passerelle.engine"].connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), baseline_definitions(tmp_path)) == []


def test_a_node_of_this_release_refuses_the_previous_release_database_until_init_db(node: Flask):
    assert node.test_client().get("/healthz").get_json()["schema"] == "behind"
    init_db(node)
    assert node.test_client().get("/healthz").get_json() == {
        "status": "ok", "database": "ok", "key": "ok", "schema": "ok"}


def test_init_db_upgrades_the_previous_release_keeping_every_row_of_every_table(node: Flask):
    engine = node.extensions["passerelle.engine"]
    before = contents(engine)
    assert before["resources"][0] > 40 and before["audit"][0] > 5 and before["export_parts"][0] > 0
    with engine.connect() as conn:
        named = sorted(tuple(row) for row in conn.execute(text("SELECT seq, patient_id FROM audit_patients")))
    assert named
    init_db(node)
    after = contents(engine)
    # Revision 0003 turned the rows of `audit_patients` into `patient_sets`: each entry names the same patients.
    assert {name: found for name, found in after.items() if name in before} == {
        name: found for name, found in before.items() if name != "audit_patients"}
    with db.read(engine) as conn:
        seqs = conn.execute(select(audit_table.c.seq)).scalars().all()
        assert sorted((seq, p) for seq, patients in audit.patients_named(conn, seqs).items() for p in patients) == named
    assert all(count == 0 for name, (count, _) in after.items()  # tables added since
               if name not in before and name != "patient_sets")
    with db.read(engine) as conn:
        assert migrations.current(conn) == (migrations.head(),)
        assert migrations.recorded_floor(conn) == migrations.serving_floor(migrations.script())


def test_an_upgraded_database_keeps_an_audit_chain_that_verifies(node: Flask):
    init_db(node)
    result = node.test_cli_runner().invoke(args=["audit", "verify"])
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.stdout)["intact"] is True


def test_an_upgraded_database_serves_every_stored_resource(node: Flask):
    init_db(node)
    client = node.test_client()
    headers = bearer(token(client, node, "custodian"))
    with db.read(node.extensions["passerelle.engine"]) as conn:
        stored = conn.execute(select(resources.c.type, resources.c.id, resources.c.version)
                              .where(resources.c.deleted.is_(False))).all()
    served = {}
    for kind, resource_id, _ in stored:
        response = client.get(f"/fhir/{kind}/{resource_id}", headers=headers)
        served[(kind, resource_id)] = (response.status_code, (response.get_json() or {}).get("meta", {}).get(
            "versionId"))
    assert served == {(kind, resource_id): (200, str(version)) for kind, resource_id, version in stored}


def test_a_research_read_works_on_an_upgraded_database(node: Flask):
    """A project of the previous release reads its consented patients' data through the gate."""
    init_db(node)
    with db.read(node.extensions["passerelle.engine"]) as conn:
        project_id = conn.execute(select(projects.c.project_id).where(projects.c.name == "A")).scalar_one()
    client = node.test_client()
    response = client.get("/research/fhir/Observation", headers=bearer(token(client, node, "research", project_id)))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["entry"]


def test_init_db_refuses_a_database_older_than_the_previous_release_and_changes_nothing(node: Flask):
    engine = node.extensions["passerelle.engine"]
    with db.write(engine) as conn:
        conn.execute(text("DELETE FROM schema_migrations WHERE version = 5"))
    before = contents(engine)
    result = node.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 1
    assert "legacy version 4" in result.output and migrations.LEGACY_RELEASE in result.output
    assert contents(engine) == before
    with db.read(engine) as conn:
        assert migrations.current(conn) == ()
