"""Schema migrations: a database made by the first release gains what later versions need.

The first release's schema is recreated from today's by removing what version 2 added
(the per-version consent columns of `history`, the line index of export parts) and
forgetting that version 2 ran; the migration must then bring back the columns, fill them
without widening any release, give every existing project the key it would now have
received when it was created, and expire the export files it cannot judge again.
"""
from __future__ import annotations

from sqlalchemy import func, inspect, select, text

from consent import projects
from service import audit, db
from service.store.schema import history, project_keys, schema_migrations
from tests.fhir_helpers import create, observation, patient
from tests.research_world import bearer, build, token

_VERSION_2_COLUMNS = ("sensitive_mask", "clinical_low", "clinical_high")
_VERSION_3_COLUMNS = ("plain_language", "ends")
#: (table, column) of each column a step of version 4 adds: a new step adds its columns here.
_VERSION_4_COLUMNS: tuple[tuple[str, str], ...] = ()


def _as_version_3(app) -> None:
    """Turn the app's database back into what a version-3 release made."""
    with app.app_context(), db.write() as conn:
        for table, column in _VERSION_4_COLUMNS:
            conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        conn.execute(schema_migrations.delete().where(schema_migrations.c.version > 3))


def _as_version_2(app) -> None:
    """Turn the app's database back into what a version-2 release made."""
    _as_version_3(app)
    with app.app_context(), db.write() as conn:
        for column in _VERSION_3_COLUMNS:
            conn.execute(text(f"ALTER TABLE projects DROP COLUMN {column}"))
        conn.execute(schema_migrations.delete().where(schema_migrations.c.version > 2))


def _as_first_release(app) -> None:
    """Turn the app's database back into what the first release's `init-db` made."""
    _as_version_2(app)
    with app.app_context(), db.write() as conn:
        for column in _VERSION_2_COLUMNS:
            conn.execute(text(f"ALTER TABLE history DROP COLUMN {column}"))
        conn.execute(text("ALTER TABLE export_parts DROP COLUMN lines"))
        conn.execute(schema_migrations.delete().where(schema_migrations.c.version > 1))
        conn.execute(project_keys.delete())


def _project(app) -> str:
    with app.app_context(), db.write() as conn:
        project_id = projects.create(conn, name="older", tier="record", epsilon=1.0).project_id
    return project_id


def test_version_2_adds_the_per_version_consent_columns_to_history(app, client, custodian_headers):
    made = create(client, custodian_headers, patient())
    reading = create(client, custodian_headers, observation(made["id"], when="2021-03-04T10:00:00Z"))
    client.put(f"/fhir/Observation/{reading['id']}", json={**reading, "status": "amended"},
               headers=custodian_headers)
    _as_first_release(app)
    assert db.migrate(app.extensions["passerelle.engine"]) == db.SCHEMA_VERSION
    with app.app_context(), db.read() as conn:
        rows = {row.version: row for row in conn.execute(
            select(history.c.version, history.c.sensitive_mask, history.c.clinical_low)
            .where(history.c.resource_pk == select(func.max(history.c.resource_pk)).scalar_subquery()))}
    assert rows[2].sensitive_mask == 0 and rows[2].clinical_low is not None  # the current version, as stored
    assert rows[1].sensitive_mask == 31  # unknown sensitivity: every category until classified again


def test_version_2_gives_each_existing_project_its_first_key(app):
    project_id = _project(app)
    _as_first_release(app)
    db.migrate(app.extensions["passerelle.engine"])
    with app.app_context(), db.read() as conn:
        versions = list(conn.execute(select(project_keys.c.version)
                                     .where(project_keys.c.project_id == project_id)).scalars())
    assert versions == [1]


def test_migrating_twice_changes_nothing(app):
    engine = app.extensions["passerelle.engine"]
    db.migrate(engine)
    with app.app_context(), db.read() as conn:
        applied = sorted(conn.execute(select(schema_migrations.c.version)).scalars())
    assert applied == list(range(1, db.SCHEMA_VERSION + 1))


def test_a_new_project_has_its_key_before_any_research_request(app):
    with app.app_context(), db.write() as conn:
        project_id = projects.create(conn, name="new", tier="record", epsilon=1.0).project_id
    with app.app_context(), db.read() as conn:
        versions = list(conn.execute(select(project_keys.c.version)
                                     .where(project_keys.c.project_id == project_id)).scalars())
    assert versions == [1]


def test_version_2_expires_the_export_files_it_cannot_judge_again(app, client, custodian_headers, export_worker):
    """Files written before each line recorded its stored version cannot be filtered at download."""
    world = build(app, client, custodian_headers)
    headers = bearer(token(client, app, "research", world.project))
    app.config["EXPORT_POLL_SECONDS"] = 0
    status_url = client.get("/research/fhir/$export", headers={**headers, "Prefer": "respond-async"}
                            ).headers["Content-Location"].replace("http://localhost", "")
    export_worker.work()
    assert client.get(status_url, headers=headers).status_code == 200
    _as_first_release(app)
    db.migrate(app.extensions["passerelle.engine"])
    assert client.get(status_url, headers=headers).status_code == 410


def test_version_3_gives_existing_projects_room_for_plain_language(app):
    project_id = _project(app)
    _as_version_2(app)
    assert db.migrate(app.extensions["passerelle.engine"]) == db.SCHEMA_VERSION
    with app.app_context(), db.read() as conn:
        row = conn.execute(text("SELECT plain_language, ends FROM projects WHERE project_id = :p"),
                           {"p": project_id}).one()
    assert tuple(row) == (None, None)


def test_version_4_keeps_the_audit_chain_a_version_3_node_wrote(app, client, custodian_headers):
    """Entries written before version 4 (no request id, no outcome) still verify, and the chain goes on."""
    with app.app_context(), db.write() as conn:
        audit.record(conn, actor="cli:older", action="keys-rotate", project_id=None, detail={"key_version": 2})
    _as_version_3(app)
    assert db.migrate(app.extensions["passerelle.engine"]) == db.SCHEMA_VERSION
    with app.app_context(), db.read() as conn:
        assert {(t, c["name"]) for t, _ in _VERSION_4_COLUMNS for c in inspect(conn).get_columns(t)
                } >= set(_VERSION_4_COLUMNS)
    create(client, custodian_headers, patient())
    with app.app_context(), db.read() as conn:
        intact, count, _ = audit.verify(conn)
    assert intact and count >= 2
