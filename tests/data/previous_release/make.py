"""Make the previous release's databases, with data in them, as the SQL dumps beside this file.

Run with the code of the previous release (7be16ab, legacy schema version 5), never today's:

    git worktree add --detach /tmp/prev 7be16ab
    cd /tmp/prev && PYTHONPATH=. /work/main/.venv/bin/python /work/main/tests/data/previous_release/make.py

It runs that release's `init-db` on a SQLite file and on a PostgreSQL schema, builds the research
world of that release's tests (three projects, synthetic patients in every consent situation, their
data), then writes through its API: a version history and a deletion, a research read, an
`$aggregate` answer (budget spent), a completed `$export` (files in the database), a portal
invitation of a patient with a medical record number, and an audit seal. The dumps
(`sqlite3 .dump`; `pg_dump --inserts`, loaded into the schema of the connection's search_path) are what
tests/test_upgrade_previous_release.py upgrades with today's code. The master key is
master.key.hex: a test key (SHA-256 of a fixed phrase), never a deployment's.

Data are synthetic (tests' made-up patients): no PHI. Run it again only to remake the dumps
of that same release; a later release's database is made by a later copy of this script.
"""
from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ["PASSERELLE_EXPORT_WORKER"] = "off"
sys.path.insert(0, os.getcwd())  # the previous release's checkout, run from its root

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from consent.patients import IDENTIFIER_TYPES, MEDICAL_RECORD_NUMBER  # noqa: E402
from service import db  # noqa: E402
from service.app import create_app  # noqa: E402
from service.export import Worker  # noqa: E402
from tests.backends import admin_url, postgres_url  # noqa: E402
from tests.fhir_helpers import create, observation, patient  # noqa: E402
from tests.research_world import bearer, build, token  # noqa: E402

SNOMED = "http://snomed.info/sct"
HYPERTENSION = "38341003"
if getattr(db, "SCHEMA_VERSION", None) != 5:
    raise SystemExit("Run this with the code of release 7be16ab (legacy schema version 5): see the docstring.")


def _ok(result) -> str:
    if result.exit_code != 0:
        raise SystemExit(f"{result.output}\n{result.exception!r}")
    return result.stdout


def populate(url: str, instance: Path) -> None:
    key_file = instance / "master.key"
    key_file.write_bytes(bytes.fromhex((HERE / "master.key.hex").read_text()))
    key_file.chmod(0o600)
    app = create_app({"TESTING": True, "DATABASE_URL": url, "INSTANCE_DIR": str(instance),
                      "MASTER_KEY_FILE": str(key_file), "EXPORT_POLL_SECONDS": 0})
    cli = app.test_cli_runner()
    _ok(cli.invoke(args=["init-db"]))
    client = app.test_client()
    custodian = {**bearer(token(client, app, "custodian")), "Content-Type": "application/fhir+json"}
    world = build(app, client, custodian)
    consented = world.patients["consented"]
    amended = create(client, custodian, observation(consented, value=131.0, when="2022-02-02T10:00:00Z"))
    assert client.put(f"/fhir/Observation/{amended['id']}", json={**amended, "status": "amended"},
                      headers=custodian).status_code == 200
    removed = create(client, custodian, observation(consented, value=132.0, when="2022-02-03T10:00:00Z"))
    assert client.delete(f"/fhir/Observation/{removed['id']}", headers=custodian).status_code in (200, 204)
    research = bearer(token(client, app, "research", world.project))
    assert client.get("/research/fhir/Observation", headers=research).status_code == 200
    question = {"resourceType": "Parameters", "parameter": [
        {"name": "measure", "valueString": "count"},
        {"name": "cohort", "valueString": f"Condition?code={SNOMED}|{HYPERTENSION}"},
        {"name": "epsilon", "valueDecimal": 0.5}]}
    answer = client.post("/research/fhir/$aggregate", json=question, headers={**research, "Idempotency-Key": "k1"})
    assert answer.status_code == 200, answer.get_json()
    worker = Worker(app)
    worker.beat()
    kickoff = client.get("/research/fhir/$export", headers={**research, "Prefer": "respond-async"})
    assert kickoff.status_code == 202, kickoff.get_json()
    worker.work()
    status = client.get(kickoff.headers["Content-Location"].replace("http://localhost", ""), headers=research)
    assert status.status_code == 200, status.status_code
    numbered = create(client, custodian, patient(family="Numbered", identifier=[{
        "type": {"coding": [{"system": IDENTIFIER_TYPES, "code": MEDICAL_RECORD_NUMBER}]}, "value": "MRN-0001"}]))
    _ok(cli.invoke(args=["patient", "invite", "--patient", numbered["id"],
                               "--base-url", "https://passerelle.example.org"]))
    _ok(cli.invoke(args=["audit", "seal"]))
    _ok(cli.invoke(args=["audit", "verify"]))
    app.extensions["passerelle.engine"].dispose()  # checkpoints SQLite's WAL into the file


def sqlite_dump(instance: Path) -> str:
    database = instance / "previous.db"
    populate(f"sqlite:///{database}", instance)
    return subprocess.run(["sqlite3", str(database), ".dump"], check=True, capture_output=True, text=True).stdout


def postgres_dump(instance: Path) -> str:
    server = admin_url(postgres_url(os.environ))
    schema = f"prev_{secrets.token_hex(4)}"
    admin = create_engine(server)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(server).update_query_dict({"options": f"-csearch_path={schema}"})
        populate(url.render_as_string(hide_password=False), instance)
        plain = make_url(server).set(drivername="postgresql")
        dump = subprocess.run(["pg_dump", "--schema", schema, "--inserts", "--no-owner", "--no-privileges",
                               "--no-comments", plain.render_as_string(hide_password=False)],
                              check=True, capture_output=True, text=True).stdout
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    # Only SQL a driver runs (no psql meta-command, no comment), creating its objects in the schema the
    # loading connection's search_path names: no creation of the schema, no reset of the path, no qualifier.
    skipped = (f"CREATE SCHEMA {schema};", "SELECT pg_catalog.set_config('search_path', '', false);")
    lines = [line for line in dump.splitlines()
             if line and not line.startswith(("\\", "--")) and line not in skipped]
    return re.sub(rf"\b{schema}\.", "", "\n".join(lines)) + "\n"


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        for name, dump in (("sqlite", sqlite_dump), ("postgresql", postgres_dump)):
            instance = Path(scratch) / name
            instance.mkdir()
            (HERE / f"{name}.sql").write_text(dump(instance))
            print(f"Wrote {HERE / f'{name}.sql'}", file=sys.stderr)


if __name__ == "__main__":
    main()
