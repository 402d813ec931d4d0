"""Key rotation, re-identification by the custodian, and the tamper-evident audit trail."""
from __future__ import annotations

import json

from sqlalchemy import select, update

from service import db
from service.store.schema import audit
from tests.research_world import bearer, build, token


def _cli(app, *args):
    return app.test_cli_runner().invoke(args=list(args))


def _first_subject(client, headers) -> str:
    body = client.get("/research/fhir/Observation?_count=1", headers=headers).get_json()
    return body["entry"][0]["resource"]["subject"]["reference"]


def test_reidentify_maps_a_pseudonym_back_and_is_audited(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    research = bearer(token(client, app, "research", world.project))
    subject = _first_subject(client, research)
    result = _cli(app, "reidentify", "--project", world.project, "--pseudonym", subject)
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["type"] == "Patient" and found["id"] in world.patients.values()
    with app.app_context(), db.read() as conn:
        actions = list(conn.execute(select(audit.c.action)).scalars())
    assert "reidentify" in actions


def test_reidentify_refuses_a_pseudonym_of_another_project(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    research = bearer(token(client, app, "research", world.project))
    subject = _first_subject(client, research)
    result = _cli(app, "reidentify", "--project", world.other_project, "--pseudonym", subject)
    assert result.exit_code != 0
    assert "not a pseudonym" in result.output


def test_key_rotation_changes_pseudonyms_and_old_ones_stop_resolving(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    research = bearer(token(client, app, "research", world.project))
    before = _first_subject(client, research)
    result = _cli(app, "keys", "rotate", "--project", world.project)
    assert json.loads(result.stdout)["key_version"] == 2
    after = _first_subject(client, research)
    assert after != before
    assert client.get(f"/research/fhir/{before}", headers=research).status_code == 404
    assert client.get(f"/research/fhir/{after}", headers=research).status_code == 200
    old = _cli(app, "reidentify", "--project", world.project, "--pseudonym", before)
    assert json.loads(old.stdout)["key_version"] == 1


def test_every_research_release_is_audited_with_its_patients(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    research = bearer(token(client, app, "research", world.project))
    client.get("/research/fhir/Observation?_count=100", headers=research)
    with app.app_context(), db.read() as conn:
        row = conn.execute(select(audit).where(audit.c.action == "search")).first()
    detail = json.loads(row.detail)
    assert detail["type"] == "Observation" and detail["resources"] == 5
    assert row.project_id == world.project


def test_audit_verify_accepts_an_intact_chain(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    research = bearer(token(client, app, "research", world.project))
    for _ in range(3):
        client.get("/research/fhir/Patient", headers=research)
    result = _cli(app, "audit", "verify")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["entries"] >= 3


def test_audit_verify_detects_an_altered_entry(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    research = bearer(token(client, app, "research", world.project))
    client.get("/research/fhir/Patient", headers=research)
    client.get("/research/fhir/Observation", headers=research)
    with app.app_context(), db.write() as conn:
        conn.execute(update(audit).where(audit.c.seq == 1).values(detail="{}"))
    result = _cli(app, "audit", "verify")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["intact"] is False
