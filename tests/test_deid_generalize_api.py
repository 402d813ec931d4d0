"""Ages, dates and places written through `/fhir` and read back through `/research/fhir`."""
from __future__ import annotations

from typing import Any

import pytest

from consent import projects, writer
from policies.deid import TOP_CODED_AGE
from service import db
from tests.fhir_helpers import create
from tests.research_world import bearer, token

UCUM = "http://unitsofmeasure.org"


@pytest.fixture
def released(app, client, custodian_headers) -> dict[str, dict[str, Any]]:
    patient = create(client, custodian_headers, {
        "resourceType": "Patient", "gender": "male", "birthDate": "1931-02-03",
        "address": [{"city": "Lyon", "postalCode": "69003", "country": "France"},
                    {"city": "Saint-Denis", "postalCode": "97400", "country": "France"}]})
    subject = {"reference": f"Patient/{patient['id']}"}
    create(client, custodian_headers, {
        "resourceType": "Condition", "subject": subject,
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
        "onsetAge": {"value": 95, "unit": "years", "system": UCUM, "code": "a"}})
    create(client, custodian_headers, {
        "resourceType": "Observation", "status": "final", "subject": subject,
        "code": {"coding": [{"system": "http://loinc.org", "code": "30525-0"}]},
        "effectiveDateTime": "2021-07-01T10:17:43+02:00",
        "valueQuantity": {"value": 1200, "unit": "months", "system": UCUM, "code": "mo"}})
    with app.app_context(), db.write() as conn:
        project = projects.create(conn, name="places", tier="record", epsilon=1.0,
                                  types=("Patient", "Condition", "Observation")).project_id
        writer.record(conn, writer.build(patient["id"], project, "record", [], source="test"))
    headers = bearer(token(client, app, "research", project))
    out = {}
    for kind in ("Patient", "Condition", "Observation"):
        response = client.get(f"/research/fhir/{kind}", headers=headers)
        assert response.status_code == 200, response.get_json()
        [entry] = response.get_json()["entry"]
        out[kind] = entry["resource"]
    return out


def marked(resource: dict[str, Any]) -> bool:
    return any(e["url"] == TOP_CODED_AGE for e in resource.get("extension", ()))


def test_a_french_patient_is_released_with_the_departement(released: dict[str, dict[str, Any]]) -> None:
    assert [a["postalCode"] for a in released["Patient"]["address"]] == ["69", "974"]


def test_an_onset_age_over_89_is_released_top_coded(released: dict[str, dict[str, Any]]) -> None:
    condition = released["Condition"]
    assert condition["onsetAge"] == {"value": 90, "comparator": ">=", "unit": "a", "system": UCUM, "code": "a"}
    assert marked(condition)


def test_an_age_observation_is_released_top_coded_in_utc_to_the_hour(released: dict[str, dict[str, Any]]) -> None:
    observation = released["Observation"]
    assert observation["valueQuantity"]["value"] == 90 and marked(observation)
    assert observation["effectiveDateTime"].endswith("T08:00:00Z")
