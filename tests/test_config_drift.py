"""Configuration that cannot drift between nodes: the master key every node must share is
recorded (as a keyed fingerprint) at `init-db`, and a node with a missing or different key,
or a database schema other than its code's, refuses to serve — `/healthz` answers 503
naming the cause, requests answer 503, `flask` commands other than `init-db` exit non-zero
with one line, and gunicorn does not load the app. Settings every node must agree on (the
consent default regime) live in the database: `settings set` on one node is what every
other node uses, and it re-materialises every decision in the same transaction."""
from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import delete, insert, select, text

from consent import engine as consent_engine
from consent.materialise import consent_default
from policies.keys import ensure_master_key, fingerprint, load_master_key
from service import db, keyring
from service.app import create_app
from service.store import migrations
from service.store.schema import decisions, settings
from tests.fhir_helpers import create, patient

ROOT = Path(__file__).resolve().parent.parent


def run(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=list(args))


def refused_in_one_line(result: Result, cause: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert cause in line


def node(app: Flask, tmp_path: Path, name: str, key_file: Path | None = None) -> Flask:
    """Another node on the same database, with its own instance directory and (by default) the same key."""
    return create_app({"TESTING": True, "DATABASE_URL": app.config["DATABASE_URL"],
                       "INSTANCE_DIR": str(tmp_path / name),
                       "MASTER_KEY_FILE": str(key_file or app.config["MASTER_KEY_FILE"])})


@pytest.fixture
def nodes() -> Iterator[list[Flask]]:
    """Apps a test builds; their database pools are closed when it ends."""
    built: list[Flask] = []
    yield built
    for other in built:
        other.extensions["passerelle.engine"].dispose()


@pytest.fixture
def keyless(app: Flask, tmp_path: Path, nodes: list[Flask]) -> Flask:
    """A node whose master key file does not exist."""
    nodes.append(node(app, tmp_path, "keyless", tmp_path / "nowhere" / "master.key"))
    return nodes[-1]


@pytest.fixture
def stranger(app: Flask, tmp_path: Path, nodes: list[Flask]) -> Flask:
    """A node with a master key of its own (not the one the database was initialised with)."""
    key_file = tmp_path / "stranger" / "master.key"
    ensure_master_key(key_file)
    nodes.append(node(app, tmp_path, "stranger", key_file))
    return nodes[-1]


def tiers(app: Flask) -> dict[tuple[str, str], str]:
    with app.app_context(), db.read() as conn:
        return {(row.patient_id, row.project_id): consent_engine.TIERS[row.tier]
                for row in conn.execute(select(decisions))}


def new_project(app: Flask) -> str:
    result = run(app, "project", "create", "--name", "Study", "--tier", "record", "--epsilon", "1.0")
    assert result.exit_code == 0, result.output
    return result.stdout.split('"project_id":"')[1].split('"')[0]


# --- a healthy node ------------------------------------------------------------------------------------------

def test_healthz_names_the_database_the_key_and_the_schema_of_a_ready_node(client: FlaskClient):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "database": "ok", "key": "ok", "schema": "ok"}


def test_init_db_records_a_keyed_fingerprint_never_the_key_nor_its_plain_hash(app: Flask):
    key = load_master_key(app.config["MASTER_KEY_FILE"])
    with app.app_context(), db.read() as conn:
        stored = dict(conn.execute(select(settings.c.name, settings.c.value)).all())
    assert stored[keyring.FINGERPRINT] == fingerprint(key)
    for value in stored.values():
        for form in (key.hex(), hashlib.sha256(key).hexdigest(), hashlib.sha512(key).hexdigest()):
            assert form not in value


# --- a missing master key ---------------------------------------------------------------------------------------

def test_a_node_without_its_master_key_file_is_unhealthy_naming_the_key(keyless: Flask):
    response = keyless.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["key"] == "missing"
    assert response.get_json()["status"] == "unavailable"


def test_a_node_without_its_master_key_file_answers_503_to_every_request(keyless: Flask):
    response = keyless.test_client().get("/metadata")
    assert response.status_code == 503
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "key: missing" in outcome["issue"][0]["diagnostics"]


def test_a_node_without_its_master_key_file_refuses_commands_in_one_line(keyless: Flask):
    refused_in_one_line(run(keyless, "settings", "show"), "key: missing")
    refused_in_one_line(run(keyless, "consent", "refresh"), "key: missing")


# --- a different master key -------------------------------------------------------------------------------------

def test_a_node_with_another_master_key_is_unhealthy_and_refuses_requests(stranger: Flask):
    health = stranger.test_client().get("/healthz")
    assert health.status_code == 503
    assert health.get_json()["key"] == "mismatch"
    response = stranger.test_client().post("/auth/token", data={"grant_type": "client_credentials"})
    assert response.status_code == 503
    assert "key: mismatch" in response.get_json()["issue"][0]["diagnostics"]


def test_a_node_with_another_master_key_refuses_commands_in_one_line(stranger: Flask):
    refused_in_one_line(run(stranger, "project", "list"), "key: mismatch")


def test_init_db_with_another_master_key_refuses_and_keeps_the_recorded_fingerprint(app: Flask, stranger: Flask):
    with app.app_context(), db.read() as conn:
        before = keyring.recorded_fingerprint(conn)
    result = run(stranger, "init-db")
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "--replace-master-key" in result.stderr
    with app.app_context(), db.read() as conn:
        assert keyring.recorded_fingerprint(conn) == before
    assert app.test_client().get("/healthz").status_code == 200


def test_init_db_replace_master_key_adopts_the_new_key_and_the_old_node_becomes_unhealthy(app: Flask,
                                                                                          stranger: Flask):
    result = run(stranger, "init-db", "--replace-master-key")
    assert result.exit_code == 0, result.output
    assert stranger.test_client().get("/healthz").status_code == 200
    assert app.test_client().get("/healthz").get_json()["key"] == "mismatch"


def test_gunicorn_does_not_load_the_app_on_a_node_with_another_master_key(stranger: Flask):
    env = {**os.environ, "PASSERELLE_DATABASE_URL": stranger.config["DATABASE_URL"],
           "PASSERELLE_MASTER_KEY_FILE": stranger.config["MASTER_KEY_FILE"],
           "PASSERELLE_INSTANCE_DIR": stranger.config["INSTANCE_DIR"]}
    command = [str(ROOT / ".venv" / "bin" / "gunicorn"), "--bind", "127.0.0.1:0", "--workers", "1", "wsgi:app"]
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert finished.returncode != 0
    assert "Traceback" not in finished.stderr
    (line,) = [line for line in finished.stderr.splitlines() if "refuses to run" in line]
    assert "key: mismatch" in line


# --- the schema -------------------------------------------------------------------------------------------------

def test_a_database_behind_the_code_is_unhealthy_naming_the_schema(app: Flask, client: FlaskClient):
    with app.app_context(), db.write() as conn:
        conn.execute(text("DELETE FROM alembic_version"))  # what a database not yet migrated records
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["schema"] == "behind"
    refused_in_one_line(run(app, "settings", "show"), "schema: behind")


def migrated_by_a_newer_release(app: Flask, floor: str) -> None:
    """What a newer release's `init-db` records: a revision this code does not know, and the serving floor."""
    with app.app_context(), db.write() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'from_a_newer_release'"))
        conn.execute(delete(settings).where(settings.c.name == migrations.FLOOR_SETTING))
        conn.execute(insert(settings).values(name=migrations.FLOOR_SETTING, value=floor))


def test_a_database_a_newer_release_migrated_past_this_codes_serving_floor_is_unhealthy_as_ahead(
        app: Flask, client: FlaskClient):
    migrated_by_a_newer_release(app, floor="also_from_the_newer_release")
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["schema"] == "ahead"
    refused_in_one_line(run(app, "settings", "show"), "schema: ahead")


def test_a_database_a_newer_release_migrated_keeping_this_code_working_is_served_as_ahead_compatible(
        app: Flask, client: FlaskClient):
    migrated_by_a_newer_release(app, floor=migrations.head())
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "database": "ok", "key": "ok", "schema": "ahead-compatible"}
    assert run(app, "settings", "show").exit_code == 0
    assert client.get("/fhir/metadata").status_code == 200  # the node's first request: it is not refused


# --- the consent default regime, one for every node ------------------------------------------------------------

def test_a_consent_default_set_on_one_node_is_the_regime_of_another(app: Flask, client: FlaskClient, tmp_path: Path,
                                                                    nodes: list[Flask], custodian_headers):
    nodes.append(node(app, tmp_path, "second"))
    second = nodes[-1]
    project = new_project(second)
    result = run(app, "settings", "set", "consent-default", "aggregate")
    assert result.exit_code == 0, result.output
    assert run(second, "settings", "show").stdout.strip() == '{"consent-default":"aggregate"}'
    second_client = second.test_client()
    assert second_client.get("/healthz").status_code == 200
    patient_id = create(second_client, custodian_headers, patient())["id"]
    assert tiers(app)[(patient_id, project)] == "aggregate"


def test_settings_set_consent_default_refreshes_every_decision(app: Flask, client: FlaskClient, custodian_headers):
    project = new_project(app)
    ids = [create(client, custodian_headers, patient(family=name))["id"] for name in ("A", "B", "C")]
    assert {tiers(app)[(i, project)] for i in ids} == {"none"}
    result = run(app, "settings", "set", "consent-default", "record")
    assert result.exit_code == 0, result.output
    assert {tiers(app)[(i, project)] for i in ids} == {"record"}


def test_a_consent_default_whose_refresh_fails_changes_neither_the_regime_nor_any_decision(
        app: Flask, client: FlaskClient, custodian_headers):
    project = new_project(app)
    ids = [create(client, custodian_headers, patient(family=name))["id"] for name in ("A", "B")]
    before = tiers(app)
    with app.app_context(), db.write() as conn:  # the database itself refuses the new decisions
        if db.is_sqlite(conn.engine):
            conn.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON decisions WHEN NEW.tier = 2 "
                              "BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        else:
            conn.execute(text("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                              "IF NEW.tier = 2 THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$"))
            conn.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON decisions FOR EACH ROW "
                              "EXECUTE FUNCTION refuse()"))
    try:
        result = run(app, "settings", "set", "consent-default", "record")
    finally:  # PostgreSQL's schema is shared by the process's tests: the trigger must not outlive this one
        with app.app_context(), db.write() as conn:
            conn.execute(text("DROP TRIGGER refuse" + ("" if db.is_sqlite(conn.engine) else " ON decisions")))
            if not db.is_sqlite(conn.engine):
                conn.execute(text("DROP FUNCTION refuse()"))
    assert result.exit_code != 0
    assert tiers(app) == before and {before[(i, project)] for i in ids} == {"none"}
    with app.app_context(), db.read() as conn:
        assert consent_default(conn) == "deny"


def test_a_regime_change_waits_for_a_transaction_materialising_under_the_old_regime(app: Flask, tmp_path: Path,
                                                                                     nodes: list[Flask]):
    nodes.append(node(app, tmp_path, "second"))
    second = nodes[-1]
    new_project(app)
    outcome: list[Result] = []
    with app.app_context(), db.write() as conn:
        assert consent_default(conn) == "deny"  # held until this transaction ends
        changer = threading.Thread(target=lambda: outcome.append(
            run(second, "settings", "set", "consent-default", "aggregate")))
        changer.start()
        time.sleep(0.5)
        assert changer.is_alive() and not outcome
        assert consent_default(conn) == "deny"
    changer.join(timeout=30)
    assert outcome[0].exit_code == 0, outcome[0].output
    with app.app_context(), db.read() as conn:
        assert consent_default(conn) == "aggregate"


def test_the_environment_only_seeds_a_new_database_and_a_differing_one_is_warned(database_url: str, tmp_path: Path,
                                                                                  nodes: list[Flask],
                                                                                  monkeypatch: pytest.MonkeyPatch):
    config = {"TESTING": True, "DATABASE_URL": database_url, "INSTANCE_DIR": str(tmp_path),
              "MASTER_KEY_FILE": str(tmp_path / "master.key")}
    monkeypatch.setenv("PASSERELLE_CONSENT_DEFAULT", "aggregate")
    nodes.append(create_app(config))
    first = run(nodes[-1], "init-db")
    assert first.exit_code == 0, first.output
    assert run(nodes[-1], "settings", "show").stdout.strip() == '{"consent-default":"aggregate"}'
    monkeypatch.setenv("PASSERELLE_CONSENT_DEFAULT", "record")
    nodes.append(create_app(config))
    again = run(nodes[-1], "init-db")
    assert again.exit_code == 0, again.output
    assert "PASSERELLE_CONSENT_DEFAULT=record is ignored" in again.stderr
    shown = run(nodes[-1], "settings", "show")
    assert shown.stdout.strip() == '{"consent-default":"aggregate"}'
    assert "PASSERELLE_CONSENT_DEFAULT=record is ignored" in shown.stderr
