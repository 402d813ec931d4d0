"""Each reported sensitive-data case, end to end: written through /fhir without any security
label, then withheld by /research/fhir from a project whose patient excluded its category
(and released when the patient excluded another one)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from consent import projects, writer
from consent.materialise import refresh
from policies.sensitivity import CATEGORIES
from service import db
from tests.fhir_helpers import create, patient
from tests.gate_world import pseudonym
from tests.research_world import bearer, token

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD9 = "http://hl7.org/fhir/sid/icd-9-cm"
AMBULATORY = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}
HYPERTENSION = {"coding": [{"system": SNOMED, "code": "38341003"}]}

Make = Callable[[dict[str, Any]], str]


def concept(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def subject(p: str) -> dict[str, Any]:
    return {"reference": f"Patient/{p}"}


def condition(p: str, code: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Condition", "subject": subject(p), "code": code, "onsetDateTime": "2021-01-01", **extra}


def observation(p: str, code: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "subject": subject(p), "code": code,
            "effectiveDateTime": "2021-06-01T10:00:00Z", **extra}


def prescription(p: str, **medication: Any) -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "status": "active", "intent": "order", "subject": subject(p),
            "authoredOn": "2021-06-01", **medication}


def encounter(p: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Encounter", "status": "finished", "class": AMBULATORY, "subject": subject(p),
            "period": {"start": "2021-06-01", "end": "2021-06-01"}, **extra}


def _medication_reference(make: Make, p: str) -> str:
    medication = make({"resourceType": "Medication", "code": concept(RXNORM, "1433873")})
    return make(prescription(p, medicationReference={"reference": medication}))


def _during_encounter(make: Make, p: str) -> str:
    visit = make(encounter(p, reasonCode=[concept(SNOMED, "86406008")]))
    return make(observation(p, concept(LOINC, "8867-4"), encounter={"reference": visit},
                            valueQuantity={"value": 70, "unit": "/min"}))


def _diagnosis(make: Make, p: str) -> str:
    hiv = make(condition(p, concept(SNOMED, "86406008")))
    return make(encounter(p, diagnosis=[{"condition": {"reference": hiv}}], reasonReference=[{"reference": hiv}]))


#: case → (category excluded, builder returning the `Type/id` that must be withheld).
CASES: dict[str, tuple[str, Callable[[Make, str], str]]] = {
    "hiv-in-condition-evidence": ("hiv", lambda make, p: make(condition(
        p, HYPERTENSION, evidence=[{"code": [concept(SNOMED, "86406008")]}]))),
    "snomed-40780007": ("hiv", lambda make, p: make(condition(p, concept(SNOMED, "40780007")))),
    "snomed-86406008-written-with-its-oid": ("hiv", lambda make, p: make(condition(
        p, concept("urn:oid:2.16.840.1.113883.6.96", "86406008")))),
    "icd9-042": ("hiv", lambda make, p: make(condition(p, concept(ICD9, "042")))),
    "loinc-24467-3-cd4": ("hiv", lambda make, p: make(observation(
        p, concept(LOINC, "24467-3"), valueQuantity={"value": 350, "unit": "/uL"}))),
    "loinc-20447-9-hiv-rna": ("hiv", lambda make, p: make(observation(
        p, concept(LOINC, "20447-9"), valueQuantity={"value": 40, "unit": "{copies}/mL"}))),
    "loinc-7917-8": ("hiv", lambda make, p: make(observation(
        p, concept(LOINC, "7917-8"), valueCodeableConcept=concept(SNOMED, "10828004")))),
    "component-value-165816005": ("hiv", lambda make, p: make(observation(
        p, concept(LOINC, "8867-4"), component=[{"code": concept(LOINC, "8867-4"),
                                                 "valueCodeableConcept": concept(SNOMED, "165816005")}]))),
    "rxnorm-1433873-dolutegravir": ("hiv", lambda make, p: make(prescription(
        p, medicationCodeableConcept=concept(RXNORM, "1433873")))),
    "rxnorm-312831-risperidone": ("mental-health", lambda make, p: make(prescription(
        p, medicationCodeableConcept=concept(RXNORM, "312831")))),
    "medication-reference-to-an-hiv-drug": ("hiv", _medication_reference),
    "diagnostic-report-conclusion-code": ("hiv", lambda make, p: make({
        "resourceType": "DiagnosticReport", "status": "final", "subject": subject(p),
        "code": concept(LOINC, "57698-3"), "conclusionCode": [concept(SNOMED, "86406008")]})),
    "care-plan-activity-detail-code": ("mental-health", lambda make, p: make({
        "resourceType": "CarePlan", "status": "active", "intent": "plan", "subject": subject(p),
        "activity": [{"detail": {"status": "in-progress", "code": concept(SNOMED, "228557008")}}]})),
    "goal-description": ("hiv", lambda make, p: make({
        "resourceType": "Goal", "lifecycleStatus": "active", "subject": subject(p),
        "description": {"text": "Charge virale VIH indétectable"}})),
    "encounter-service-type": ("mental-health", lambda make, p: make(encounter(
        p, serviceType=concept(SNOMED, "394587001")))),
    "cbt-procedure-228557008": ("mental-health", lambda make, p: make({
        "resourceType": "Procedure", "status": "completed", "subject": subject(p),
        "code": concept(SNOMED, "228557008"), "performedDateTime": "2021-06-01"})),
    "lower-case-hiv-label": ("hiv", lambda make, p: make(observation(
        p, concept(LOINC, "8867-4"), valueQuantity={"value": 70, "unit": "/min"},
        meta={"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "hiv"}]}))),
    "generator-loinc-70274-6-gad7": ("mental-health", lambda make, p: make(observation(
        p, concept(LOINC, "70274-6"), valueQuantity={"value": 12, "unit": "{score}"}))),
    "generator-loinc-75626-2-audit-c": ("substance-use", lambda make, p: make(observation(
        p, concept(LOINC, "75626-2"), valueQuantity={"value": 8, "unit": "{score}"}))),
    "generator-loinc-82667-7-dast10": ("substance-use", lambda make, p: make(observation(
        p, concept(LOINC, "82667-7"), valueQuantity={"value": 6, "unit": "{score}"}))),
    "generator-rxnorm-1483744-naltrexone": ("substance-use", lambda make, p: make(prescription(
        p, medicationCodeableConcept=concept(RXNORM, "1483744")))),
    "observation-during-a-sensitive-encounter": ("hiv", _during_encounter),
    "encounter-whose-diagnosis-is-a-sensitive-condition": ("hiv", _diagnosis),
}


def _status_for(app: Flask, client: FlaskClient, headers: dict[str, str], case: str, excluded: str) -> int:
    """Build the case for a new patient who excludes `excluded`; the research read's status."""
    with app.app_context(), db.write() as conn:
        project = projects.create(conn, name=f"Study {case}", tier="record", epsilon=1.0).project_id
        refresh(conn)
    patient_id = create(client, headers, patient(family="Sensible"))["id"]

    def make(resource: dict[str, Any]) -> str:
        made = create(client, headers, resource)
        return f"{made['resourceType']}/{made['id']}"

    reference = CASES[case][1](make, patient_id)
    with app.app_context(), db.write() as conn:
        writer.record(conn, writer.build(patient_id, project, "record", [excluded], source="test"))
    research = bearer(token(client, app, "research", project))
    resource_type = reference.split("/")[0]
    return client.get(f"/research/fhir/{resource_type}/{pseudonym(app, project, reference)}",
                      headers=research).status_code


@pytest.mark.parametrize("case", CASES)
def test_a_reported_case_is_withheld_from_a_patient_who_excluded_its_category(app, client, custodian_headers, case):
    assert _status_for(app, client, custodian_headers, case, CASES[case][0]) == 404


@pytest.mark.parametrize("case", CASES)
def test_a_reported_case_is_released_when_the_patient_excluded_another_category(app, client, custodian_headers,
                                                                                case):
    other = next(c for c in CATEGORIES if c != CASES[case][0])
    assert _status_for(app, client, custodian_headers, case, other) == 200
