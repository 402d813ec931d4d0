"""Who received my data (consent/web/disclosures.py): read from the audit of real releases.

Research clients of the world's projects (tests/portal_world.py) search, read and ask
`$aggregate` questions through the real research API; what each patient is told is then
compared with what those responses carried.
"""
from __future__ import annotations

from datetime import UTC, datetime

import pytest
from flask import Flask

from consent import projects
from consent.web import disclosures
from service import db
from tests.portal_world import Portal, build_portal
from tests.research_world import bearer, token

AGGREGATE = "/research/fhir/$aggregate"


@pytest.fixture
def world_recipe():
    return build_portal


@pytest.fixture
def portal(world: Portal) -> Portal:
    return world


def count(epsilon: float) -> dict:
    return {"resourceType": "Parameters", "parameter": [{"name": "measure", "valueString": "count"},
                                                        {"name": "epsilon", "valueDecimal": epsilon}]}


def received(app: Flask, patient_id: str) -> list[disclosures.Received]:
    with app.app_context(), db.read() as conn:
        return disclosures.received(conn, patient_id)


def test_nothing_is_listed_before_any_release(app, portal):
    assert received(app, portal.alice) == [] and received(app, portal.bob) == []


def test_record_releases_are_listed_by_day_for_the_patients_whose_records_left(app, client, portal):
    heart = bearer(token(client, app, "research", portal.heart))
    body = client.get("/research/fhir/Observation", headers=heart).get_json()
    values = [e["resource"]["valueQuantity"]["value"] for e in body["entry"]]
    assert values == [portal.marker["bob"]]  # only bob consented to heart receiving records
    first = body["entry"][0]["resource"]["id"]
    assert client.get(f"/research/fhir/Observation/{first}", headers=heart).status_code == 200
    today = datetime.now(UTC).date()
    [bob] = received(app, portal.bob)
    assert (bob.project.project_id, bob.record_days, bob.answers, bob.epsilon) == (portal.heart, ((today, 2),), 0, 0)
    assert received(app, portal.alice) == []
    with app.app_context(), db.write() as conn:
        projects.close(conn, portal.heart)
    assert [r.project.project_id for r in received(app, portal.bob)] == [portal.heart]  # closed, still told


def test_statistical_answers_count_only_when_the_cohort_included_the_patient(app, client, portal):
    heart = bearer(token(client, app, "research", portal.heart))
    sleep = bearer(token(client, app, "research", portal.sleep))
    assert client.post(AGGREGATE, json=count(0.5), headers=sleep).status_code == 200
    assert client.post(AGGREGATE, json=count(0.5), headers=sleep).status_code == 200  # replayed: nothing new
    assert client.post(AGGREGATE, json=count(0.25), headers=heart).status_code == 200
    assert client.post(AGGREGATE, json={**count(0.5), "parameter": [
        *count(0.5)["parameter"], {"name": "cohort", "valueString": "Observation?code=http://loinc.org|8480-6"}]},
        headers=heart).status_code == 200
    by_project = {r.project.project_id: r for r in received(app, portal.bob)}
    assert (by_project[portal.sleep].answers, by_project[portal.sleep].epsilon) == (1, 0.5)
    assert (by_project[portal.heart].answers, by_project[portal.heart].epsilon) == (2, 0.75)
    assert by_project[portal.heart].record_days == ()
    assert received(app, portal.alice) == []  # alice consented to nothing: in no cohort
