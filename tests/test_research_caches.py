"""What the research path remembers between requests, and what it still reads every time:
pseudonyms are remembered per key, the key version for at most `keyring.VERSION_TTL`
seconds, and consent is judged at each request's own instant."""
from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from consent import engine, writer
from policies.pseudonym import PseudonymError, PseudonymKey
from service import db, keyring
from service.app import create_app
from service.errors import NotFound
from service.release import release_for
from service.store.schema import resources
from tests.deid_helpers import MASTER
from tests.fhir_helpers import create, patient
from tests.research_world import bearer, build, token


def _first_subject(client, headers) -> str:
    body = client.get("/research/fhir/Observation?_count=1", headers=headers).get_json()
    return body["entry"][0]["resource"]["subject"]["reference"]


def test_a_remembered_pseudonym_is_the_computed_one() -> None:
    remembering = PseudonymKey(MASTER, "project-a", 1)
    first = remembering.pseudonym("Patient", 42)
    assert remembering.pseudonym("Patient", 42) == first == PseudonymKey(MASTER, "project-a", 1).pseudonym(
        "Patient", 42)
    assert remembering.resolve("Patient", first) == 42


def test_a_remembered_row_number_does_not_let_true_through() -> None:
    key = PseudonymKey(MASTER, "project-a", 1)
    key.pseudonym("Patient", 1)
    with pytest.raises(PseudonymError):
        key.pseudonym("Patient", True)


def test_a_remembered_pseudonym_is_never_given_for_another_type() -> None:
    key = PseudonymKey(MASTER, "project-a", 1)
    assert key.pseudonym("Patient", 7) != key.pseudonym("Observation", 7)


def test_a_rotation_on_another_node_takes_effect_within_the_version_ttl(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    research = bearer(token(client, app, "research", world.project))
    before = _first_subject(client, research)
    other_node = create_app({key: app.config[key] for key in ("TESTING", "DATABASE_URL", "INSTANCE_DIR",
                                                              "MASTER_KEY_FILE")})
    try:
        with other_node.app_context(), db.write() as conn:
            assert keyring.rotate(conn, world.project) == 2
    finally:
        other_node.extensions["passerelle.engine"].dispose()
    time.sleep(keyring.VERSION_TTL)
    after = _first_subject(client, research)
    assert after != before
    assert client.get(f"/research/fhir/{before}", headers=research).status_code == 404


def test_consent_is_judged_at_each_instant_asked(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    later = create(client, custodian_headers, patient(family="Later"))["id"]
    with app.app_context(), db.write() as conn:
        consent = writer.build(later, world.project, "record", [], source="test")
        consent["provision"]["period"] = {"start": "2030-01-01"}
        writer.record(conn, consent)
    in_2031 = 1_924_992_000_000_000  # 2031-01-01 in microseconds
    rows = select(resources.c.id).where(resources.c.type == "Patient", resources.c.id == later)
    with app.app_context():
        release = release_for("a-client", world.project, engine.RECORD)
        with db.read() as conn:
            seen = [conn.execute(release.rows_filter(now=instant)(rows)).scalars().all()
                    for instant in (in_2031, None, in_2031)]
    assert seen == [[later], [], [later]]


def _pseudonym_of(app, project_id: str, patient_id: str) -> str:
    with app.app_context(), db.read() as conn:
        pk = conn.execute(select(resources.c.pk).where(resources.c.type == "Patient",
                                                       resources.c.id == patient_id)).scalar_one()
        return keyring.project_key(conn, project_id).pseudonym("Patient", pk)


def test_the_standing_consent_filter_judges_each_statement_at_the_instant_it_runs(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    brief = create(client, custodian_headers, patient(family="Brief"))["id"]
    ends = datetime.now(UTC) + timedelta(seconds=2)
    with app.app_context(), db.write() as conn:
        writer.record(conn, writer.build(brief, world.project, "record", [], source="test",
                                         period=(None, ends.isoformat(timespec="seconds"))))
    pseudonym = _pseudonym_of(app, world.project, brief)
    with app.app_context():
        release = release_for("a-client", world.project, engine.RECORD)
        assert release.read("Patient", pseudonym)["id"] == pseudonym
        time.sleep(max(0.0, (ends - datetime.now(UTC)).total_seconds()) + 1.1)
        with pytest.raises(NotFound):
            release.read("Patient", pseudonym)


def test_the_standing_consent_filter_sees_a_withdrawal_at_once(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    consented = world.patients["consented"]
    pseudonym = _pseudonym_of(app, world.project, consented)
    research = bearer(token(client, app, "research", world.project))
    found = client.get(f"/research/fhir/Observation?patient=Patient/{pseudonym}", headers=research).get_json()
    assert client.get(f"/research/fhir/Patient/{pseudonym}", headers=research).status_code == 200
    assert found["entry"]
    with app.app_context(), db.write() as conn:
        writer.record(conn, writer.build(consented, world.project, "none", [], source="test"))
    assert client.get(f"/research/fhir/Patient/{pseudonym}", headers=research).status_code == 404
    after = client.get(f"/research/fhir/Observation?patient=Patient/{pseudonym}", headers=research).get_json()
    assert "entry" not in after
