"""A Medication is released only through a released resource that names it.

A Medication resource is about no patient, but which one a patient takes is theirs: even
to a project that declares Medication, one reaches the partner only while a medication
request (or administration, dispense, statement) that this project may receive names it.
"""
from __future__ import annotations

from typing import Any

import pytest

from consent import projects
from service import db
from tests.fhir_helpers import create, patient
from tests.gate_world import consent_to, pseudonym
from tests.research_world import bearer, token

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
TYPES = ("Patient", "MedicationRequest", "Medication")


def _medication(code: str) -> dict[str, Any]:
    return {"resourceType": "Medication", "code": {"coding": [{"system": RXNORM, "code": code}]}}


def _request(patient_id: str, medication_id: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
            "subject": {"reference": f"Patient/{patient_id}"},
            "medicationReference": {"reference": f"Medication/{medication_id}"}, **extra}


@pytest.fixture
def pharmacy(app, client, custodian_headers) -> dict[str, Any]:
    with app.app_context(), db.write() as conn:
        project = projects.create(conn, name="drugs", tier="record", epsilon=1.0, types=TYPES).project_id
    consenting = create(client, custodian_headers, patient(family="Yes"))["id"]
    refusing = create(client, custodian_headers, patient(family="No"))["id"]
    excluding = create(client, custodian_headers, patient(family="NoHiv"))["id"]
    consent_to(app, consenting, project, "record")
    consent_to(app, excluding, project, "record", ["hiv"])
    made = {name: create(client, custodian_headers, _medication(code))["id"]
            for name, code in (("taken", "197361"), ("refused", "310965"), ("unreferenced", "308136"),
                               ("hiv", "1999563"))}
    create(client, custodian_headers, _request(consenting, made["taken"]))
    create(client, custodian_headers, _request(refusing, made["refused"]))
    create(client, custodian_headers, _request(excluding, made["hiv"],
                                               meta={"security": [{"system": "http://terminology.hl7.org/"
                                                                   "CodeSystem/v3-ActCode", "code": "HIV"}]}))
    return {"project": project, "medications": made,
            "headers": bearer(token(client, app, "research", project))}


def _released(client, pharmacy) -> set[str]:
    body = client.get("/research/fhir/Medication?_count=100", headers=pharmacy["headers"]).get_json()
    return {e["resource"]["id"] for e in body.get("entry", [])}


def _pseudonyms(app, pharmacy, *names: str) -> set[str]:
    return {pseudonym(app, pharmacy["project"], f"Medication/{pharmacy['medications'][n]}") for n in names}


def test_a_medication_named_by_a_released_request_is_released(app, client, pharmacy):
    assert _released(client, pharmacy) == _pseudonyms(app, pharmacy, "taken")


@pytest.mark.parametrize("name", ["refused", "unreferenced", "hiv"])
def test_a_medication_no_released_request_names_is_not_readable(app, client, pharmacy, name):
    (hidden,) = _pseudonyms(app, pharmacy, name)
    assert client.get(f"/research/fhir/Medication/{hidden}", headers=pharmacy["headers"]).status_code == 404


def test_a_released_request_references_its_medication(app, client, pharmacy):
    body = client.get("/research/fhir/MedicationRequest?_include=MedicationRequest:medication",
                      headers=pharmacy["headers"]).get_json()
    included = {e["resource"]["id"] for e in body["entry"] if e["search"]["mode"] == "include"}
    assert included == _pseudonyms(app, pharmacy, "taken")
