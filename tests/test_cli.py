"""The `flask --app wsgi …` commands: init-db, ingest, demo-data, project group and export-worker."""
from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from service import db
from service.app import create_app
from service.store import migrations
from tests.fhir_helpers import create, patient, post_entry, transaction


def run(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=list(args))


def patient_count(client: FlaskClient, headers: dict[str, str]) -> int:
    response = client.get("/fhir/Patient?_summary=count", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["total"]


def status_of(client: FlaskClient, headers: dict[str, str], reference: str) -> int:
    return client.get(f"/fhir/{reference}", headers=headers).status_code


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


# --- init-db -------------------------------------------------------------------------

@pytest.fixture
def bare_app(database_url: str, tmp_path: Path) -> Iterator[Flask]:
    """The application before `init-db`: an empty database and no master key yet."""
    application = create_app({
        "TESTING": True,
        "DATABASE_URL": database_url,
        "INSTANCE_DIR": str(tmp_path / "instance"),
        "MASTER_KEY_FILE": str(tmp_path / "secrets" / "master.key"),
    })
    yield application
    application.extensions["passerelle.engine"].dispose()


def test_init_db_is_idempotent_and_records_the_newest_revision_once(bare_app: Flask):
    first, second = run(bare_app, "init-db"), run(bare_app, "init-db")
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    with db.read(bare_app.extensions["passerelle.engine"]) as conn:
        recorded = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    assert recorded == [migrations.head()]


def test_init_db_creates_a_missing_master_key_readable_by_its_owner_only(bare_app: Flask):
    key_file = Path(bare_app.config["MASTER_KEY_FILE"])
    result = run(bare_app, "init-db")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32


def test_init_db_keeps_an_existing_master_key(bare_app: Flask):
    key_file = Path(bare_app.config["MASTER_KEY_FILE"])
    run(bare_app, "init-db")
    key = key_file.read_bytes()
    result = run(bare_app, "init-db")
    assert result.exit_code == 0, result.output
    assert key_file.read_bytes() == key


def test_init_db_refuses_a_master_key_readable_by_group_with_a_readable_message(bare_app: Flask):
    key_file = Path(bare_app.config["MASTER_KEY_FILE"])
    key_file.parent.mkdir(parents=True)
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o640)
    result = run(bare_app, "init-db")
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert str(key_file) in result.stderr
    assert "chmod 600" in result.stderr


# --- ingest ------------------------------------------------------------------------------

@pytest.fixture
def ndjson_file(tmp_path: Path) -> Path:
    """Three valid Patients (lines 1, 3, 5), a bad birthDate (line 2), broken JSON (line 4)."""
    lines = [
        json.dumps(patient(id="nd-1", family="Un")),
        json.dumps(patient(id="nd-2", family="Deux", birthDate="1990-13-45")),
        json.dumps(patient(id="nd-3", family="Trois")),
        '{"resourceType": "Patient", "id": "nd-4",',
        json.dumps(patient(id="nd-5", family="Cinq")),
    ]
    path = tmp_path / "Patient.ndjson"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_ingest_ndjson_stores_every_valid_line(app, client, custodian_headers, ndjson_file):
    run(app, "ingest", str(ndjson_file))
    assert [status_of(client, custodian_headers, f"Patient/nd-{n}") for n in (1, 3, 5)] == [200, 200, 200]
    assert patient_count(client, custodian_headers) == 3


def test_ingest_ndjson_reports_each_bad_line_by_file_and_line_and_exits_non_zero(app, ndjson_file):
    result = run(app, "ingest", str(ndjson_file))
    assert result.exit_code != 0
    reported = [line for line in result.stderr.splitlines() if f"{ndjson_file}:" in line]
    assert len(reported) == 2
    assert f"{ndjson_file}:2: " in reported[0]
    assert "birthDate" in reported[0]
    assert f"{ndjson_file}:4: " in reported[1]


def test_ingest_of_a_transaction_bundle_file_stores_it_with_references_resolved(app, client, custodian_headers,
                                                                                 tmp_path):
    subject = "urn:uuid:0b2f6a3e-6f1c-4c55-9f5e-2d1c6f0d7a10"
    observation = {"resourceType": "Observation", "status": "final",
                   "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                   "subject": {"reference": subject}}
    path = write_json(tmp_path / "bundle.json",
                      transaction(post_entry(patient(family="Transaction"), subject), post_entry(observation)))
    result = run(app, "ingest", str(path))
    assert result.exit_code == 0, result.output
    found = client.get("/fhir/Patient?family=Transaction", headers=custodian_headers).get_json()
    patient_id = found["entry"][0]["resource"]["id"]
    stored = client.get("/fhir/Observation", headers=custodian_headers).get_json()["entry"][0]["resource"]
    assert stored["subject"]["reference"] == f"Patient/{patient_id}"


def test_ingest_of_a_collection_bundle_stores_each_resource(app, client, custodian_headers, tmp_path):
    collection = {"resourceType": "Bundle", "type": "collection",
                  "entry": [{"resource": patient(id="col-1")}, {"resource": patient(id="col-2")}]}
    result = run(app, "ingest", str(write_json(tmp_path / "collection.json", collection)))
    assert result.exit_code == 0, result.output
    assert [status_of(client, custodian_headers, f"Patient/col-{n}") for n in (1, 2)] == [200, 200]


def test_ingest_of_a_transaction_with_one_invalid_entry_stores_nothing_and_reports_the_file(
        app, client, custodian_headers, tmp_path):
    path = write_json(tmp_path / "broken.json", transaction(
        post_entry(patient(family="Valide")),
        post_entry(patient(family="Invalide", birthDate="not-a-date")),
    ))
    result = run(app, "ingest", str(path))
    assert result.exit_code != 0
    assert f"{path}: " in result.stderr
    assert "entry[1]" in result.stderr
    assert patient_count(client, custodian_headers) == 0


# --- demo-data ---------------------------------------------------------------------------

def test_demo_data_loads_the_requested_number_of_patients(app, client, custodian_headers):
    result = run(app, "demo-data", "--patients", "3", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert patient_count(client, custodian_headers) == 3


def test_demo_data_if_empty_skips_a_database_that_already_holds_patients(app, client, custodian_headers):
    run(app, "demo-data", "--patients", "3", "--seed", "1")
    result = run(app, "demo-data", "--patients", "3", "--seed", "2", "--if-empty")
    assert result.exit_code == 0, result.output
    assert patient_count(client, custodian_headers) == 3


def test_demo_data_ndjson_writes_files_without_touching_the_database(app, client, custodian_headers, tmp_path):
    out = tmp_path / "ndjson"
    result = run(app, "demo-data", "--patients", "3", "--seed", "1", "--ndjson", str(out))
    assert result.exit_code == 0, result.output
    resources = [json.loads(line) for path in sorted(out.rglob("*.ndjson"))
                 for line in path.read_text().splitlines() if line.strip()]
    assert sum(r["resourceType"] == "Patient" for r in resources) == 3
    assert patient_count(client, custodian_headers) == 0


# --- project group -------------------------------------------------------------------------

@pytest.fixture
def project_id(app: Flask) -> str:
    result = run(app, "project", "create", "--name", "Cohort study", "--tier", "record", "--epsilon", "1")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["project_id"]


@pytest.fixture
def group_id(client: FlaskClient, custodian_headers: dict[str, str]) -> str:
    return create(client, custodian_headers, {"resourceType": "Group", "type": "person", "actual": True})["id"]


def groups_of(app: Flask, project_id: str) -> list[str]:
    result = run(app, "project", "group", "list", "--project", project_id)
    assert result.exit_code == 0, result.output
    return [json.loads(line)["group_id"] for line in result.stdout.splitlines()]


def test_project_group_add_attaches_a_group_that_list_then_shows(app, project_id, group_id):
    result = run(app, "project", "group", "add", "--project", project_id, "--group", group_id)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"project_id": project_id, "group_id": group_id, "attached": True}
    assert groups_of(app, project_id) == [group_id]


def test_project_group_remove_detaches_it(app, project_id, group_id):
    run(app, "project", "group", "add", "--project", project_id, "--group", group_id)
    result = run(app, "project", "group", "remove", "--project", project_id, "--group", group_id)
    assert result.exit_code == 0, result.output
    assert groups_of(app, project_id) == []


def test_project_group_add_refuses_an_unknown_project(app, group_id):
    result = run(app, "project", "group", "add", "--project", "no-such-project", "--group", group_id)
    assert result.exit_code == 1
    assert "Project 'no-such-project' is not known" in result.stderr


def test_project_group_add_refuses_an_unknown_group(app, project_id):
    result = run(app, "project", "group", "add", "--project", project_id, "--group", "no-such-group")
    assert result.exit_code == 1
    assert "Group/no-such-group is not known" in result.stderr
    assert groups_of(app, project_id) == []


def test_project_group_add_refuses_a_deleted_group(app, client, custodian_headers, project_id, group_id):
    assert client.delete(f"/fhir/Group/{group_id}", headers=custodian_headers).status_code in (200, 204)
    result = run(app, "project", "group", "add", "--project", project_id, "--group", group_id)
    assert result.exit_code == 1
    assert f"Group/{group_id} was deleted" in result.stderr
    assert groups_of(app, project_id) == []


def test_project_group_add_refuses_a_group_already_attached(app, project_id, group_id):
    run(app, "project", "group", "add", "--project", project_id, "--group", group_id)
    result = run(app, "project", "group", "add", "--project", project_id, "--group", group_id)
    assert result.exit_code == 1
    assert "already attached" in result.stderr
    assert groups_of(app, project_id) == [group_id]


def test_project_group_remove_refuses_a_group_not_attached(app, project_id, group_id):
    result = run(app, "project", "group", "remove", "--project", project_id, "--group", group_id)
    assert result.exit_code == 1
    assert "is not attached" in result.stderr


# --- export-worker -------------------------------------------------------------------------

def test_export_worker_once_runs_the_queued_jobs_and_says_how_many(app, client, project_id, export_worker):
    created = json.loads(run(app, "client", "create", "--name", "partner", "--role", "research",
                             "--project", project_id).stdout)
    granted = client.post("/auth/token", data={"grant_type": "client_credentials"},
                          auth=(created["client_id"], created["client_secret"])).get_json()
    headers = {"Authorization": f"Bearer {granted['access_token']}"}
    kick = client.get("/research/fhir/Patient/$export", headers={**headers, "Prefer": "respond-async"})
    assert kick.status_code == 202, kick.get_json()

    result = run(app, "export-worker", "--once")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"jobs": 1}
    app.config["EXPORT_POLL_SECONDS"] = 0
    assert client.get(kick.headers["Content-Location"], headers=headers).status_code == 200
