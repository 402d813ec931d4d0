"""Planted identifiers written through `/fhir` and read back through `/research/fhir`.

The free text a real feed put in coded elements, units, waveforms, security labels and
extensions (on elements and on primitives) never reaches a research partner, and what
is released still validates against R4B.
"""
from __future__ import annotations

from typing import Any

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class

from consent import projects, writer
from service import db
from tests.fhir_helpers import create
from tests.research_world import bearer, token

FAMILY, PHONE, MRN, STREET, BIRTH = "Vandermolen", "555-201-7734", "MRN-4477120", "9 Larkspur Row", "1979-11-23"
PLANTED = f"{FAMILY} {PHONE} {MRN} {STREET} {BIRTH}"
SNOMED, LOINC, UCUM = "http://snomed.info/sct", "http://loinc.org", "http://unitsofmeasure.org"
RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"


def concept(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": PLANTED},
                       {"system": f"http://ehr.example/{FAMILY}", "code": MRN}], "text": PLANTED}


def planted_patient() -> dict[str, Any]:
    birth_time = {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                  "valueDateTime": f"{BIRTH}T08:00:00Z"}
    return {"resourceType": "Patient", "gender": "female", "birthDate": BIRTH,
            "_birthDate": {"extension": [birth_time, {"url": "http://ehr.example/note", "valueString": PLANTED}]},
            "maritalStatus": concept("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "M"),
            "address": [{"state": "MA", "extension": [{"url": "http://ehr.example/street", "valueString": STREET}],
                         "_state": {"extension": [{"url": "http://ehr.example/phone", "valueString": PHONE}]}}],
            "extension": [{"url": RACE, "extension": [
                {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238",
                                                       "code": "2106-3", "display": PLANTED}},
                {"url": "text", "valueString": PLANTED}]}]}


def planted_observation(patient_id: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final",
            "meta": {"security": [{"system": f"http://ehr.example/{FAMILY}", "code": MRN, "display": PLANTED}]},
            "code": concept(LOINC, "8867-4"), "subject": {"reference": f"Patient/{patient_id}"},
            "effectiveDateTime": "2021-05-06T07:08:09Z",
            "valueQuantity": {"value": 61, "unit": PLANTED, "system": UCUM, "code": "/min"},
            "component": [{"code": concept(LOINC, "72166-2"), "valueCodeableConcept": concept(SNOMED, "8517006")},
                          {"code": concept(LOINC, "8601-7"),
                           "valueSampledData": {"origin": {"value": 0, "unit": PLANTED}, "period": 4, "dimensions": 1,
                                                "data": PLANTED}}]}


@pytest.fixture
def released(app, client, custodian_headers) -> list[dict[str, Any]]:
    patient = create(client, custodian_headers, planted_patient())
    create(client, custodian_headers, planted_observation(patient["id"]))
    with app.app_context(), db.write() as conn:
        project = projects.create(conn, name="planted", tier="record", epsilon=1.0,
                                  types=("Patient", "Observation")).project_id
        writer.record(conn, writer.build(patient["id"], project, "record", [], source="test"))
    headers = bearer(token(client, app, "research", project))
    out = []
    for kind in ("Patient", "Observation"):
        response = client.get(f"/research/fhir/{kind}", headers=headers)
        assert response.status_code == 200, response.get_json()
        assert PLANTED.split()[0].encode() not in response.data
        out += [entry["resource"] for entry in response.get_json().get("entry", [])]
    return out


def test_planted_identifiers_written_through_the_api_are_not_released(released: list[dict[str, Any]]) -> None:
    text = orjson.dumps(released).decode()
    assert {r["resourceType"] for r in released} == {"Patient", "Observation"}
    assert [part for part in (FAMILY, PHONE, MRN, "Larkspur", BIRTH) if part in text] == []
    for resource in released:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def test_the_coded_content_around_the_planted_text_is_released(released: list[dict[str, Any]]) -> None:
    observation = next(r for r in released if r["resourceType"] == "Observation")
    assert observation["code"] == {"coding": [{"system": LOINC, "code": "8867-4"}]}
    assert observation["valueQuantity"] == {"value": 61, "system": UCUM, "code": "/min", "unit": "/min"}
    patient = next(r for r in released if r["resourceType"] == "Patient")
    assert patient["maritalStatus"] == {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                                                    "code": "M", "display": "Married"}]}
