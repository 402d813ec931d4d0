"""Specifications of the de-identification engine and of the shipped default profile."""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.deid import (
    DATA_ABSENT_REASON,
    TOP_CODED_AGE,
    DeidentificationError,
    Deidentifier,
    Profile,
    ProfileError,
    load_profile,
    parse_profile,
    shift_date,
)
from policies.pseudonym import PseudonymKey
from tests.deid_helpers import DEFAULT_PROFILE, MASTER

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
REFERENCE_YEAR = 2025
#: The stored rows the references in these tests point at: (type, id) → pk.
STORE: dict[tuple[str, str], int] = {
    ("Patient", "p1"): 101, ("Patient", "p2"): 102, ("Encounter", "e1"): 201, ("Practitioner", "dr1"): 301,
    ("Organization", "org1"): 401, ("Condition", "c1"): 501, ("Location", "loc1"): 601,
    ("Observation", "o1"): 701, ("Medication", "m1"): 801,
}
MASKED = {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "masked"}]}
#: The types a research project may receive (consent.projects and service.release).
RESEARCH_TYPES = ["AdverseEvent", "AllergyIntolerance", "BodyStructure", "CarePlan", "CareTeam", "Claim",
                  "ClinicalImpression", "Communication", "Composition", "Condition", "Coverage", "DetectedIssue",
                  "Device", "DiagnosticReport", "DocumentReference", "Encounter", "EpisodeOfCare",
                  "ExplanationOfBenefit", "FamilyMemberHistory", "Flag", "Goal", "ImagingStudy", "Immunization", "List",
                  "Location", "Media", "Medication", "MedicationAdministration", "MedicationDispense",
                  "MedicationRequest", "MedicationStatement", "NutritionOrder", "Observation", "Organization",
                  "Patient", "Practitioner", "PractitionerRole", "Procedure", "QuestionnaireResponse",
                  "ResearchSubject", "RiskAssessment", "ServiceRequest", "Specimen", "SupplyDelivery"]

# Identifying values planted in the resources below: none may ever be released.
FAMILY, GIVEN = "Zoltowska", "Marguerite"
PHONE, EMAIL = "+1-555-867-5309", "marguerite.zoltowska@example.org"
STREET, CITY, ZIP = "42 Quillfeather Lane", "Xanthorpe", "02134"
MRN, SSN = "MRN-8675309", "999-12-3456"
BIRTH = "1987-06-15"
DOCTOR = "Dr. Ignatius Brackenbury"


@pytest.fixture
def deid(profile: Profile, key: PseudonymKey) -> Deidentifier:
    return Deidentifier(profile, key, reference_year=REFERENCE_YEAR, resolve_pk=lambda t, i: STORE.get((t, i)))


def engine(rules: list[dict[str, Any]], key: PseudonymKey) -> Deidentifier:
    return Deidentifier(parse_profile({"rules": rules}), key, reference_year=REFERENCE_YEAR,
                        resolve_pk=lambda t, i: STORE.get((t, i)))


def validate(resource: dict[str, Any]) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def dumped(resource: dict[str, Any]) -> str:
    return orjson.dumps(resource).decode()


# -- realistic (Synthea-like) inputs, with identifying values planted where they hide -------------

def coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient", "id": "p1",
        "meta": {"versionId": "3", "lastUpdated": "2024-01-02T03:04:05.678Z", "source": "#ehr-feed-7",
                 "profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"],
                 "tag": [{"system": "http://ehr.example/tags", "code": FAMILY}]},
        "text": {"status": "generated", "div": f"<div xmlns=\"http://www.w3.org/1999/xhtml\">{GIVEN} {FAMILY}</div>"},
        "extension": [
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race", "extension": [
                {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3",
                                                       "display": "White"}},
                {"url": "text", "valueString": "White"}]},
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName", "valueString": "Quillfeather"},
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
             "valueAddress": {"city": CITY, "state": "MA", "country": "US"}},
            {"url": "http://ehr.example/fhir/nickname", "valueString": f"{GIVEN} {FAMILY}"},
            {"url": "http://synthetichealth.github.io/synthea/disability-adjusted-life-years", "valueDecimal": 0.42},
        ],
        "identifier": [
            {"system": "https://github.com/synthetichealth/synthea", "value": "7c2a4f4e-5b21-4c7b-9f0e-1d2c3b4a5f60"},
            {"type": coding("http://terminology.hl7.org/CodeSystem/v2-0203", "MR", "Medical Record Number"),
             "system": "http://hospital.example/mrn", "value": MRN, "assigner": {"display": "Xanthorpe General"}},
            {"type": coding("http://terminology.hl7.org/CodeSystem/v2-0203", "SS", "Social Security Number"),
             "system": "http://hl7.org/fhir/sid/us-ssn", "value": SSN},
        ],
        "name": [{"use": "official", "family": FAMILY, "given": [GIVEN], "prefix": ["Mrs."]}],
        "telecom": [{"system": "phone", "value": PHONE, "use": "home"}, {"system": "email", "value": EMAIL}],
        "gender": "female",
        "birthDate": BIRTH,
        "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                      "valueDateTime": f"{BIRTH}T04:05:06-05:00"}]},
        "deceasedDateTime": "2021-03-04T05:06:07-05:00",
        "address": [{"use": "home", "line": [STREET], "city": CITY, "district": "Middlesex", "state": "MA",
                     "postalCode": ZIP, "country": "US", "text": f"{STREET}, {CITY}",
                     "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/geolocation", "extension": [
                         {"url": "latitude", "valueDecimal": 42.36}, {"url": "longitude", "valueDecimal": -71.06}]}]}],
        "maritalStatus": coding("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "M", "Married"),
        "multipleBirthBoolean": False,
        "photo": [{"contentType": "image/png", "data": "aGVsbG8=", "title": f"{GIVEN} {FAMILY}"}],
        "contact": [{"name": {"family": FAMILY, "given": ["Casimir"]},
                     "telecom": [{"system": "phone", "value": PHONE}]}],
        "communication": [{"language": coding("urn:ietf:bcp:47", "en-US", "English (United States)"),
                           "preferred": True}],
        "generalPractitioner": [{"reference": "Practitioner/dr1", "display": DOCTOR}],
        "managingOrganization": {"reference": "Organization/org1", "display": "Xanthorpe General"},
    }


def observation() -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": "o1",
        "meta": {"versionId": "1", "lastUpdated": "2024-01-02T03:04:05Z"},
        "text": {"status": "generated", "div": f"<div xmlns=\"http://www.w3.org/1999/xhtml\">{FAMILY} BP</div>"},
        "identifier": [{"system": "http://lab.example/accession", "value": MRN}],
        "status": "final",
        "category": [coding("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs",
                            "Vital signs")],
        "code": coding("http://loinc.org", "85354-9", "Blood pressure panel with all children optional"),
        "subject": {"reference": "Patient/p1", "display": f"{GIVEN} {FAMILY}"},
        "encounter": {"reference": "Encounter/e1"},
        "effectiveDateTime": "2020-03-04T10:11:12-05:00",
        "issued": "2020-03-04T10:11:12.345-05:00",
        "performer": [{"reference": "Practitioner/dr1", "display": DOCTOR}],
        "component": [
            {"code": coding("http://loinc.org", "8480-6", "Systolic blood pressure"),
             "valueQuantity": {"value": 127, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org",
                               "code": "mm[Hg]"}},
            {"code": coding("http://loinc.org", "8462-4", "Diastolic blood pressure"),
             "valueQuantity": {"value": 81, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org",
                               "code": "mm[Hg]"},
             "interpretation": [coding("http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "N",
                                       "Normal")]},
            {"code": coding("http://loinc.org", "8867-4", "Heart rate"), "valueString": f"{GIVEN} was calm"},
        ],
        "note": [{"authorString": DOCTOR, "time": "2020-03-04T10:30:00Z", "text": f"{GIVEN} {FAMILY}, call {PHONE}"}],
    }


def condition() -> dict[str, Any]:
    return {
        "resourceType": "Condition", "id": "c1",
        "clinicalStatus": coding("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"),
        "verificationStatus": coding("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed",
                                     "Confirmed"),
        "category": [coding("http://terminology.hl7.org/CodeSystem/condition-category", "encounter-diagnosis",
                            "Encounter Diagnosis")],
        "code": coding("http://snomed.info/sct", "44054006", "Diabetes mellitus type 2"),
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "onsetDateTime": "2015-07-08T09:10:11+02:00",
        "abatementString": f"after {GIVEN} moved to {CITY}",
        "recordedDate": "2015-07-09",
        "recorder": {"reference": "Practitioner/dr1", "display": DOCTOR},
        "note": [{"text": f"{FAMILY} family history"}],
    }


def encounter() -> dict[str, Any]:
    return {
        "resourceType": "Encounter", "id": "e1",
        "identifier": [{"use": "official", "system": "https://github.com/synthetichealth/synthea", "value": MRN}],
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"},
        "type": [coding("http://snomed.info/sct", "185349003", "Encounter for check up")],
        "subject": {"reference": "Patient/p1", "display": f"Mrs. {GIVEN} {FAMILY}"},
        "participant": [{"type": [coding("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "PPRF",
                                         "primary performer")],
                         "period": {"start": "2020-03-04T10:00:00-05:00", "end": "2020-03-04T10:45:00-05:00"},
                         "individual": {"reference": "Practitioner/dr1", "display": DOCTOR}}],
        "period": {"start": "2020-03-04T10:00:00-05:00", "end": "2020-03-04T10:45:00-05:00"},
        "reasonCode": [coding("http://snomed.info/sct", "44054006", "Diabetes mellitus type 2")],
        "hospitalization": {"preAdmissionIdentifier": {"value": MRN},
                            "dischargeDisposition": coding("http://terminology.hl7.org/CodeSystem/discharge-disposition",
                                                           "home", "Home")},
        "location": [{"location": {"reference": "Location/loc1", "display": "Xanthorpe General, room 12"}}],
        "serviceProvider": {"reference": "Organization/org1", "display": "Xanthorpe General"},
    }


def medication_request() -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest", "id": "mr1",
        "status": "active", "intent": "order",
        "medicationCodeableConcept": coding("http://www.nlm.nih.gov/research/umls/rxnorm", "860975",
                                            "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet"),
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "authoredOn": "2020-03-04T10:40:00-05:00",
        "requester": {"reference": "Practitioner/dr1", "display": DOCTOR},
        "reasonReference": [{"reference": "Condition/c1"}],
        "dosageInstruction": [{
            "sequence": 1, "text": f"Take one daily, {GIVEN}", "patientInstruction": f"Call {PHONE} if unwell",
            "timing": {"event": ["2020-03-05"], "repeat": {"frequency": 1, "period": 1, "periodUnit": "d",
                                                           "boundsPeriod": {"start": "2020-03-05"}}},
            "asNeededBoolean": False,
            "doseAndRate": [{"type": coding("http://terminology.hl7.org/CodeSystem/dose-rate-type", "ordered",
                                            "Ordered"), "doseQuantity": {"value": 1}}]}],
        "dispenseRequest": {"validityPeriod": {"start": "2020-03-04", "end": "2021-03-04"},
                            "numberOfRepeatsAllowed": 3, "quantity": {"value": 90, "unit": "tablet"}},
        "note": [{"text": f"{FAMILY} prefers generics"}],
    }


def organization() -> dict[str, Any]:
    return {
        "resourceType": "Organization", "id": "org1",
        "identifier": [{"system": "https://github.com/synthetichealth/synthea", "value": "org-77"}],
        "active": True,
        "type": [coding("http://terminology.hl7.org/CodeSystem/organization-type", "prov", "Healthcare Provider")],
        "name": "Xanthorpe General",
        "telecom": [{"system": "phone", "value": PHONE}],
        "address": [{"line": [STREET], "city": CITY, "state": "MA", "postalCode": ZIP}],
    }


def practitioner() -> dict[str, Any]:
    return {
        "resourceType": "Practitioner", "id": "dr1",
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "9999941899"}],
        "active": True,
        "name": [{"family": "Brackenbury", "given": ["Ignatius"], "prefix": ["Dr."]}],
        "telecom": [{"system": "email", "value": "ignatius.brackenbury@example.org"}],
        "address": [{"line": ["1 Hospital Way"], "city": CITY, "state": "MA"}],
        "gender": "male",
        "birthDate": "1960-02-03",
        "qualification": [{"identifier": [{"value": "MD-556677"}],
                           "code": coding("http://terminology.hl7.org/CodeSystem/v2-0360", "MD", "Doctor of Medicine"),
                           "period": {"start": "1990-01-01"}}],
    }


REALISTIC: dict[str, tuple[Callable[[], dict[str, Any]], int, str | None]] = {
    "Patient": (patient, 101, "p1"), "Observation": (observation, 701, "p1"), "Condition": (condition, 501, "p1"),
    "Encounter": (encounter, 201, "p1"), "MedicationRequest": (medication_request, 901, "p1"),
    "Organization": (organization, 401, None), "Practitioner": (practitioner, 301, None),
}


def release(deid: Deidentifier, kind: str) -> dict[str, Any]:
    build, pk, patient_id = REALISTIC[kind]
    return deid.apply(build(), pk, patient_id)


# -- outputs validate ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(REALISTIC))
def test_default_profile_output_validates_with_r4b(deid: Deidentifier, kind: str) -> None:
    validate(release(deid, kind))


@pytest.mark.parametrize("kind", RESEARCH_TYPES)
def test_required_elements_no_rule_keeps_become_data_absent_and_validate(deid: Deidentifier, kind: str) -> None:
    released = deid.apply({"resourceType": kind, "id": "x", "implicitRules": "http://example.org/rules"}, 1, "p1")
    validate(released)


# -- default deny and the methods ----------------------------------------------------------------

def test_default_deny_drops_every_element_no_rule_keeps(key: PseudonymKey) -> None:
    released = engine([{"path": "Patient.gender", "method": "keep"}], key).apply(patient(), 101, "p1")
    assert set(released) == {"resourceType", "id", "meta", "gender"}


def test_keys_that_are_not_fhir_elements_are_dropped_inside_kept_elements(key: PseudonymKey) -> None:
    source = {**condition(), "code": {**condition()["code"], "secretNote": FAMILY}, "flavour": "x"}
    released = engine([{"path": "Condition.code", "method": "keep"}], key).apply(source, 501, "p1")
    assert released["code"] == {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]}
    assert "flavour" not in released


def test_keep_releases_the_codes_and_values_of_the_element(key: PseudonymKey) -> None:
    released = engine([{"path": "Observation.component", "method": "keep"}], key).apply(observation(), 701, "p1")
    assert released["component"][0] == {
        "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
        "valueQuantity": {"value": 127, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}


def test_redact_removes_the_element(key: PseudonymKey) -> None:
    rules = [{"path": "Observation.category", "method": "redact"}, {"path": "Observation.status", "method": "keep"}]
    released = engine(rules, key).apply(observation(), 701, "p1")
    assert "category" not in released and released["status"] == "final"


def test_redacting_a_required_element_leaves_a_data_absent_reason(key: PseudonymKey) -> None:
    rules = [{"path": "Observation.code", "method": "redact"}, {"path": "Observation.status", "method": "redact"}]
    released = engine(rules, key).apply(observation(), 701, "p1")
    assert released["code"] == MASKED
    assert released["_status"] == MASKED and "status" not in released
    validate(released)


def test_first_matching_rule_wins(key: PseudonymKey) -> None:
    rules = [{"path": "Observation.component.code", "method": "redact"},
             {"path": "Observation.component", "method": "keep"}]
    released = engine(rules, key).apply(observation(), 701, "p1")
    assert all(c["code"] == MASKED for c in released["component"])  # redacted first, then required
    assert released["component"][0]["valueQuantity"]["value"] == 127


def test_a_choice_rule_applies_to_the_variants_its_method_transforms(key: PseudonymKey) -> None:
    rules = [{"path": "Observation.value[x]", "method": "dateshift"},
             {"path": "Observation.value[x]", "method": "redact"}]
    dated = {**observation(), "valueDateTime": "2020-03-04"}
    quantity = {**observation(), "valueQuantity": {"value": 5}}
    assert engine(rules, key).apply(dated, 701, "p1")["valueDateTime"] != "2020-03-04"
    assert "valueQuantity" not in engine(rules, key).apply(quantity, 701, "p1")


def test_a_concrete_choice_name_selects_one_variant(key: PseudonymKey) -> None:
    rules = [{"path": "Observation.valueString", "method": "redact"},
             {"path": "Observation.value[x]", "method": "keep"}]
    assert "valueString" not in engine(rules, key).apply({**observation(), "valueString": FAMILY}, 701, "p1")
    assert engine(rules, key).apply({**observation(), "valueInteger": 4}, 701, "p1")["valueInteger"] == 4


def test_pseudonymise_gives_a_keyed_stable_value(key: PseudonymKey) -> None:
    rules = [{"path": "Patient.identifier.value", "method": "pseudonymise"},
             {"path": "Patient.identifier.system", "method": "keep"}]
    first = engine(rules, key).apply(patient(), 101, "p1")["identifier"]
    again = engine(rules, key).apply(patient(), 101, "p1")["identifier"]
    other = engine(rules, PseudonymKey(MASTER, "project-b", 1)).apply(patient(), 101, "p1")["identifier"]
    assert first == again
    assert first[1] == {"system": "http://hospital.example/mrn", "value": key.pseudonymise_value(MRN)}
    assert [i["value"] for i in first] != [i["value"] for i in other]


def test_pseudonymise_on_an_identifier_replaces_its_value_and_drops_its_other_text(key: PseudonymKey) -> None:
    released = engine([{"path": "Patient.identifier", "method": "pseudonymise"}], key).apply(patient(), 101, "p1")
    mrn = released["identifier"][1]
    assert mrn["value"] == key.pseudonymise_value(MRN) and "system" not in mrn
    assert "assigner" not in mrn  # a reference with a display only: nothing to release
    assert MRN not in dumped(released) and SSN not in dumped(released)


def test_encrypt_is_reversible_by_the_custodian(key: PseudonymKey) -> None:
    released = engine([{"path": "Patient.name.family", "method": "encrypt"}], key).apply(patient(), 101, "p1")
    token = released["name"][0]["family"]
    assert token.startswith("enc:v1:") and key.decrypt(token) == FAMILY
    validate(released)


def test_generalize_birth_date_to_year(deid: Deidentifier) -> None:
    released = release(deid, "Patient")
    assert released["birthDate"] == "1987"
    assert "_birthDate" not in released  # the birth-time extension is not kept
    assert any(c["code"] == "ABSTRED" for c in released["meta"]["security"])


@pytest.mark.parametrize(("birth", "released_year", "marked"), [
    ("1936-12-31", "1936", False),  # 89 at most in 2025
    ("1935-01-01", "1935", True),   # 89 or 90: top-coded too, else the mark would single it out
    ("1921-04-05", "1935", True),
    ("1890", "1935", True),
])
def test_birth_years_implying_an_age_over_89_are_top_coded_and_marked(deid: Deidentifier, birth: str,
                                                                      released_year: str, marked: bool) -> None:
    released = deid.apply({**patient(), "birthDate": birth}, 101, "p1")
    assert released["birthDate"] == released_year
    assert any(e["url"] == TOP_CODED_AGE for e in released.get("extension", ())) is marked
    validate(released)


def test_postal_code_keeps_its_first_three_digits(deid: Deidentifier) -> None:
    assert release(deid, "Patient")["address"] == [{"state": "MA", "postalCode": "021", "country": "US"}]


def test_postal_code_of_a_sparse_three_digit_area_becomes_000(deid: Deidentifier) -> None:
    source = patient()
    source["address"][0]["postalCode"] = "03601"
    assert deid.apply(source, 101, "p1")["address"][0]["postalCode"] == "000"


# -- dates ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "days", "expected"), [
    ("2020-03-04", 10, "2020-03-14"),
    ("2020-12-25", 10, "2021-01-04"),
    ("2020-02-20", 9, "2020-02-29"),
    ("2020-03-04T10:11:12-05:00", -4, "2020-02-29T15:11:12Z"),
    ("2020-03-04T10:11:12.345Z", 1, "2020-03-05T10:11:12.345Z"),
    ("2020-03", 30, "2020-04"),
    ("2020-03", -20, "2020-02"),
    ("2020", 100, "2020"),
    ("not a date", 1, None),
    ("2020-13-01", 1, None),
    ("2020-03-04X", 1, None),
])
def test_shift_date_keeps_precision_and_writes_times_in_utc(value: str, days: int, expected: str | None) -> None:
    assert shift_date(value, days) == expected


def test_dates_are_shifted_by_the_patient_offset(deid: Deidentifier, key: PseudonymKey) -> None:
    offset, rounding = key.date_offset_days("p1"), deid.profile.round_times
    released = release(deid, "Observation")
    assert released["effectiveDateTime"] == shift_date("2020-03-04T10:11:12-05:00", offset, rounding)
    assert released["issued"] == shift_date("2020-03-04T10:11:12.345-05:00", offset, rounding)


def test_period_start_and_end_are_both_shifted(deid: Deidentifier, key: PseudonymKey) -> None:
    offset, rounding = key.date_offset_days("p1"), deid.profile.round_times
    assert release(deid, "Encounter")["period"] == {"start": shift_date("2020-03-04T10:00:00-05:00", offset, rounding),
                                                    "end": shift_date("2020-03-04T10:45:00-05:00", offset, rounding)}


def test_intervals_between_dates_of_one_patient_are_preserved(deid: Deidentifier) -> None:
    onset = date.fromisoformat(release(deid, "Condition")["onsetDateTime"][:10])
    seen = date.fromisoformat(release(deid, "Observation")["effectiveDateTime"][:10])
    assert (seen - onset) == (date(2020, 3, 4) - date(2015, 7, 8))


def test_different_patients_get_different_shifts(deid: Deidentifier) -> None:
    released = {deid.apply(observation(), 701, f"patient-{i}")["effectiveDateTime"] for i in range(20)}
    assert len(released) > 10


def test_dates_inside_a_kept_element_are_shifted_too(deid: Deidentifier, key: PseudonymKey) -> None:
    period = release(deid, "Encounter")["participant"][0]["period"]
    assert period["start"] == shift_date("2020-03-04T10:00:00-05:00", key.date_offset_days("p1"),
                                         deid.profile.round_times)


def test_a_date_named_by_a_keep_rule_is_released_unshifted(key: PseudonymKey) -> None:
    released = engine([{"path": "Observation.effective[x]", "method": "keep"}], key).apply(observation(), 701, "p1")
    assert released["effectiveDateTime"] == "2020-03-04T10:11:12-05:00"


def test_dates_of_a_resource_of_no_patient_are_removed(deid: Deidentifier) -> None:
    released = release(deid, "Practitioner")
    assert "birthDate" not in released and "period" not in released["qualification"][0]


def test_no_original_clinical_date_is_released(deid: Deidentifier) -> None:
    for kind, (build, _pk, patient_id) in REALISTIC.items():
        if patient_id is None:
            continue
        source, released = build(), dumped(release(deid, kind))
        for day in set(re.findall(r"\d{4}-\d{2}-\d{2}", dumped(source))):
            assert day not in released, (kind, day)


# -- ids and references --------------------------------------------------------------------------

def test_resource_id_is_the_pseudonym_of_its_row(deid: Deidentifier, key: PseudonymKey) -> None:
    assert release(deid, "Patient")["id"] == key.pseudonym("Patient", 101)


@pytest.mark.parametrize(("reference", "expected_suffix"), [
    ("Patient/p1", ""),
    ("Patient/p1/_history/2", "/_history/2"),
])
def test_every_reference_form_is_rewritten_to_the_targets_pseudonym(deid: Deidentifier, key: PseudonymKey,
                                                                    reference: str, expected_suffix: str) -> None:
    source = {**observation(), "subject": {"reference": reference}}
    released = deid.apply(source, 701, "p1")
    assert released["subject"] == {"reference": f"Patient/{key.pseudonym('Patient', 101)}{expected_suffix}"}


@pytest.mark.parametrize("reference", ["http://ehr.example/fhir/Patient/p1",
                                       "https://ehr.example/base/fhir/Patient/p1/_history/7"])
def test_an_absolute_reference_names_another_servers_resource_and_is_removed(deid: Deidentifier,
                                                                            reference: str) -> None:
    """This server stores references to its own base as relative ones (service/references.py): an
    absolute URL names another server's resource, never the local one with the same type and id."""
    released = deid.apply({**observation(), "subject": {"reference": reference}}, 701, "p1")
    assert "subject" not in released


def test_a_reference_can_be_followed_to_the_released_target(deid: Deidentifier) -> None:
    target = release(deid, "Patient")
    assert release(deid, "Observation")["subject"]["reference"] == f"Patient/{target['id']}"
    assert release(deid, "Condition")["encounter"]["reference"] == f"Encounter/{release(deid, 'Encounter')['id']}"


def test_urn_uuid_references_get_a_consistent_pseudonym_uuid(deid: Deidentifier, key: PseudonymKey) -> None:
    uuid = "9b2f3f6e-8a38-4d42-a6a4-2a6b1b0c9e11"
    one = deid.apply({**observation(), "subject": {"reference": f"urn:uuid:{uuid}"}}, 701, "p1")
    two = deid.apply({**condition(), "subject": {"reference": f"urn:uuid:{uuid}"}}, 501, "p1")
    assert one["subject"] == two["subject"] == {"reference": f"urn:uuid:{key.pseudonymise_uuid(uuid)}"}


def test_contained_references_stay_local_and_the_contained_resource_is_deidentified(key: PseudonymKey) -> None:
    rules = [{"path": "MedicationRequest.contained", "method": "keep"},
             {"path": "MedicationRequest.medication[x]", "method": "keep"},
             {"path": "Medication.code", "method": "keep"}]
    source = {**medication_request(), "medicationReference": {"reference": "#med"},
              "contained": [{"resourceType": "Medication", "id": "med", "code": coding(RXNORM, "1", "x"),
                             "batch": {"lotNumber": "LOT-1"}, "text": {"status": "generated", "div": FAMILY}}]}
    del source["medicationCodeableConcept"]
    released = engine(rules, key).apply(source, 901, "p1")
    assert released["medicationReference"] == {"reference": "#med"}
    assert released["contained"] == [{"resourceType": "Medication", "id": "med",
                                      "code": {"coding": [{"system": RXNORM, "code": "1"}]}}]
    validate(released)


def test_a_reference_to_an_unreleased_contained_resource_is_removed(key: PseudonymKey) -> None:
    rules = [{"path": "Observation.subject", "method": "keep"}, {"path": "Observation.code", "method": "keep"}]
    source = {**observation(), "subject": {"reference": "#someone"},
              "contained": [{"resourceType": "Patient", "id": "someone"}]}
    assert "subject" not in engine(rules, key).apply(source, 701, "p1")


def test_keys_that_are_not_elements_of_their_object_are_dropped_wherever_they_sit(deid: Deidentifier,
                                                                                   key: PseudonymKey) -> None:
    # At the root, in an object, in an item of a repeating object, in a Coding, in a Quantity
    # and in a contained resource: the released form is the one of the resource without them.
    stray = {"patientName": FAMILY, "resourceType": "Patient", "fullUrl": f"urn:{MRN}"}
    clean, planted = observation(), observation()
    planted.update(patientName=FAMILY, fullUrl=f"urn:{MRN}")
    planted["code"].update(stray)
    planted["category"][0]["coding"][0].update(stray)
    planted["component"][1].update(stray)
    planted["component"][0]["valueQuantity"].update(stray)
    assert dumped(deid.apply(planted, 701, "p1")) == dumped(deid.apply(clean, 701, "p1"))

    rules = [{"path": "MedicationRequest.contained", "method": "keep"},
             {"path": "MedicationRequest.medication[x]", "method": "keep"},
             {"path": "Medication.code", "method": "keep"}]
    contained = {"resourceType": "Medication", "id": "med", "code": coding(RXNORM, "1", "x")}
    clean = {**medication_request(), "medicationReference": {"reference": "#med"}, "contained": [contained]}
    planted = {**clean, "contained": [{**contained, **stray, "resourceType": "Medication"}]}
    released = engine(rules, key)
    assert dumped(released.apply(planted, 901, "p1")) == dumped(released.apply(clean, 901, "p1"))


def test_an_unresolvable_reference_is_removed_with_its_type(deid: Deidentifier) -> None:
    source = {**observation(), "performer": [{"reference": "Practitioner/unknown", "type": "Practitioner",
                                              "display": DOCTOR}, {"reference": "Practitioner/gone"}]}
    assert "performer" not in deid.apply(source, 701, "p1")


def test_a_versioned_reference_absent_from_the_mapping_is_removed(deid: Deidentifier) -> None:
    source = {**observation(), "subject": {"reference": "Patient/p1/_history/1"}}
    assert "subject" not in deid.apply(source, 701, "p1", {("Patient", "p1"): 101})


def test_a_versioned_reference_the_mapping_names_is_kept(deid: Deidentifier, key: PseudonymKey) -> None:
    source = {**observation(), "subject": {"reference": "Patient/p1/_history/1"}}
    released = deid.apply(source, 701, "p1", {("Patient", "p1"): 101, ("Patient", "p1", "1"): 101})
    assert released["subject"] == {"reference": f"Patient/{key.pseudonym('Patient', 101)}/_history/1"}


@pytest.mark.parametrize("reference", ["Patient?identifier=123", "urn:oid:1.2.3", "a/b/Patient/p1", "Patient",
                                       "urn:uuid:not-a-uuid"])
def test_references_that_name_nothing_stored_are_removed(deid: Deidentifier, reference: str) -> None:
    released = deid.apply({**condition(), "recorder": {"reference": reference}}, 501, "p1")
    assert "recorder" not in released


def test_an_unresolvable_required_reference_becomes_data_absent(deid: Deidentifier) -> None:
    released = deid.apply({**condition(), "subject": {"reference": "Patient/not-stored", "display": FAMILY}}, 501, "p1")
    assert released["subject"] == MASKED
    validate(released)


def test_reference_display_and_identifier_are_always_dropped(key: PseudonymKey) -> None:
    source = {**encounter(), "subject": {"reference": "Patient/p1", "display": FAMILY,
                                         "identifier": {"system": "http://hospital.example/mrn", "value": MRN}}}
    released = engine([{"path": "Encounter.subject", "method": "keep"}], key).apply(source, 201, "p1")
    assert released["subject"] == {"reference": f"Patient/{key.pseudonym('Patient', 101)}"}


def test_prefetched_row_numbers_are_used_and_the_resolver_is_asked_once_per_target(
        profile: Profile, key: PseudonymKey) -> None:
    asked: list[tuple[str, str]] = []

    def resolver(kind: str, ident: str) -> int | None:
        asked.append((kind, ident))
        return None

    deid = Deidentifier(profile, key, reference_year=REFERENCE_YEAR, resolve_pk=resolver)
    source = {**observation(), "hasMember": [{"reference": "Observation/x"}] * 3}
    released = deid.apply(source, 701, "p1", {("Patient", "p1"): 101, ("Encounter", "e1"): 201})
    assert released["subject"]["reference"] == f"Patient/{key.pseudonym('Patient', 101)}"
    assert asked.count(("Observation", "x")) == 1 and ("Patient", "p1") not in asked


# -- what the engine always removes --------------------------------------------------------------

def test_narrative_text_is_dropped(deid: Deidentifier) -> None:
    assert all("text" not in release(deid, kind) for kind in REALISTIC)


def test_notes_are_dropped(deid: Deidentifier) -> None:
    assert all("note" not in release(deid, kind) for kind in ("Observation", "Condition", "MedicationRequest"))


def test_free_text_values_are_dropped(deid: Deidentifier) -> None:
    released = release(deid, "Observation")
    assert [c.get("valueString") for c in released["component"]] == [None, None, None]
    assert "abatementString" not in release(deid, "Condition")


def test_extensions_are_dropped_unless_a_rule_keeps_their_url(deid: Deidentifier) -> None:
    urls = [e["url"] for e in release(deid, "Patient")["extension"]]
    assert urls == ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
                    "http://synthetichealth.github.io/synthea/disability-adjusted-life-years"]


def test_a_kept_extension_keeps_only_the_sub_extensions_its_rule_lists(deid: Deidentifier) -> None:
    assert release(deid, "Patient")["extension"][0] == {
        "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
        "extension": [{"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238",
                                                             "code": "2106-3"}}]}


def test_inside_a_kept_extension_dates_are_shifted_and_references_rewritten(key: PseudonymKey) -> None:
    rules = [{"path": "*.extension", "url": "http://x/seen-by", "method": "keep", "extensions": ["who", "when"]},
             {"path": "Observation.code", "method": "keep"}]
    source = {**observation(), "extension": [{"url": "http://x/seen-by", "extension": [
        {"url": "who", "valueReference": {"reference": "Practitioner/dr1", "display": DOCTOR}},
        {"url": "when", "valueDateTime": "2020-03-04"}]}]}
    released = engine(rules, key).apply(source, 701, "p1")
    assert released["extension"] == [{"url": "http://x/seen-by", "extension": [
        {"url": "who", "valueReference": {"reference": f"Practitioner/{key.pseudonym('Practitioner', 301)}"}},
        {"url": "when", "valueDateTime": shift_date("2020-03-04", key.date_offset_days("p1"))}]}]


def test_extensions_of_primitive_values_are_kept_only_where_their_rule_says_primitives(key: PseudonymKey) -> None:
    rules = [{"path": "*.extension", "url": DATA_ABSENT_REASON, "method": "keep", "values": ["code"],
              "primitives": True},
             {"path": "*.extension", "url": "http://x/who", "method": "keep", "values": ["string"]},
             {"path": "Observation.status", "method": "keep"}, {"path": "Observation.code", "method": "keep"}]
    source = {**observation(), "_status": {"id": "s", "extension": [
        {"url": DATA_ABSENT_REASON, "valueCode": "unknown"}, {"url": "http://x/who", "valueString": FAMILY}]}}
    released = engine(rules, key).apply(source, 701, "p1")
    assert released["_status"] == {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "unknown"}]}


def test_an_element_with_an_unknown_modifier_extension_is_removed(key: PseudonymKey) -> None:
    source = observation()
    source["component"][0]["modifierExtension"] = [{"url": "http://x/negated", "valueBoolean": True}]
    released = engine([{"path": "Observation.component", "method": "keep"}], key).apply(source, 701, "p1")
    assert [c["code"]["coding"][0]["code"] for c in released["component"]] == ["8462-4", "8867-4"]


def test_a_resource_with_an_unknown_modifier_extension_is_withheld(deid: Deidentifier) -> None:
    source = {**observation(), "modifierExtension": [{"url": "http://x/not-done", "valueBoolean": True}]}
    released = deid.apply(source, 701, "p1")
    assert set(released) == {"resourceType", "id", "meta", "_status", "code"}
    assert {c["code"] for c in released["meta"]["security"]} == {"PSEUDED", "REDACTED"}
    validate(released)


def test_meta_keeps_version_and_security_and_is_labelled_pseudonymised(deid: Deidentifier) -> None:
    source = {**observation(), "meta": {**observation()["meta"], "security": [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}], "source": "#feed"}}
    assert deid.apply(source, 701, "p1")["meta"] == {"versionId": "1", "security": [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY",
         "display": "psychiatry disorder information sensitivity"},
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "PSEUDED",
         "display": "pseudonymized"}]}


def test_the_input_is_not_modified(deid: Deidentifier) -> None:
    for kind, (build, pk, patient_id) in REALISTIC.items():
        source = build()
        before = copy.deepcopy(source)
        deid.apply(source, pk, patient_id)
        assert source == before, kind


@pytest.mark.parametrize("resource", [{"resourceType": "Nonsense", "id": "x"}, {"id": "x"}, ["not", "a", "dict"]])
def test_input_that_is_not_a_resource_is_refused(deid: Deidentifier, resource: Any) -> None:
    with pytest.raises(DeidentificationError):
        deid.apply(resource, 1, None)


# -- leaks ---------------------------------------------------------------------------------------

PLANTED = [FAMILY, GIVEN, PHONE, EMAIL, STREET, CITY, ZIP, MRN, SSN, BIRTH, DOCTOR, "Quillfeather", "Brackenbury",
           "9999941899", "MD-556677", "org-77", "7c2a4f4e", "Xanthorpe General", "42.36", "#ehr-feed-7",
           "2024-01-02T03:04:05"]


@pytest.mark.parametrize("kind", sorted(REALISTIC))
def test_no_planted_identifier_is_released(deid: Deidentifier, kind: str) -> None:
    released = dumped(release(deid, kind))
    assert [value for value in PLANTED if value in released] == []


# -- profiles ------------------------------------------------------------------------------------

def test_the_default_profile_loads() -> None:
    assert load_profile(DEFAULT_PROFILE).name == "passerelle-default"


def test_a_yaml_profile_loads_like_json(tmp_path: Path, key: PseudonymKey) -> None:
    target = tmp_path / "small.yaml"
    target.write_text("name: small\nrules:\n  - path: Patient.gender\n    method: keep\n")
    released = Deidentifier(load_profile(target), key, reference_year=REFERENCE_YEAR).apply(patient(), 101, "p1")
    assert released["gender"] == "female" and "name" not in released


@pytest.mark.parametrize(("rules", "message"), [
    ([{"path": "Patient.gender", "method": "scramble"}], "unknown method 'scramble'"),
    ([{"path": "Patient..gender", "method": "keep"}], "bad path"),
    ([{"path": "patient.gender", "method": "keep"}], "bad path"),
    ([{"path": "Patient", "method": "keep"}], "bad path"),
    ([{"path": "Pateint.gender", "method": "keep"}], "unknown resource type 'Pateint'"),
    ([{"path": "HumanName.family", "method": "keep"}], "unknown resource type 'HumanName'"),
    ([{"path": "Patient.brithDate", "method": "keep"}], "no element 'brithDate' (did you mean 'birthDate'?)"),
    ([{"path": "Observation.value", "method": "keep"}], "did you mean 'value[x]'"),
    ([{"path": "Patient.gender.code", "method": "keep"}], "it is a primitive (code)"),
    ([{"path": "Observation.subject.display", "method": "keep"}], "references are rewritten by the engine"),
    ([{"path": "Patient.birthDate", "method": "generalize"}], "generalize needs either 'to'"),
    ([{"path": "Patient.birthDate", "method": "generalize", "to": "decade"}], "'to' must be 'year' or 'month'"),
    ([{"path": "Patient.address.postalCode", "method": "generalize", "countries": {"FR": {"digits": 0}}}],
     "'digits' is a length from 1 to 9"),
    ([{"path": "Patient.gender", "method": "dateshift"}], "cannot apply to code"),
    ([{"path": "Patient.gender", "method": "keep", "to": "year"}], "takes no ['to']"),
    ([{"path": "Patient.gender", "methd": "keep"}], "unknown keys ['methd']"),
    ([{"path": "Patient.id", "method": "keep"}], "managed by the engine"),
    ([{"path": "*.meta", "method": "keep"}], "managed by the engine"),
    ([{"path": "*.extension", "method": "keep"}], "needs the extension's 'url'"),
    ([{"path": "*.extension", "url": "http://x", "method": "dateshift"}], "an extension is kept or redacted"),
    ([{"path": "*.extension", "url": "http://x", "method": "keep", "extensions": "text"}],
     "'extensions' lists the 'url's of the sub-extensions"),
    ([{"path": "*.extension", "url": "http://x", "method": "keep", "values": ["Codeing"]}],
     "'Codeing' is not a type an extension value can have (did you mean 'Coding'?)"),
    ([{"path": "*.extension", "url": "http://x", "method": "keep", "values": "Coding"}],
     "'values' lists the FHIR types"),
    ([{"path": "*.extension", "url": "http://x", "method": "keep", "primitives": "yes"}],
     "'primitives' is true or false"),
    ([{"path": "Patient.gender", "method": "keep", "values": ["code"]}], "only a rule with a 'url' takes them"),
    ([{"path": "*.extension", "url": "http://x", "method": "redact", "values": ["code"]}], "takes no ['values']"),
    ([{"path": "Patient.gender", "url": "http://x", "method": "keep"}], "a rule with a 'url'"),
    ([{"path": "Patient.extension.valueString", "method": "keep"}], "extensions are selected by URL"),
    ([{"path": "Patient.name", "method": "keep"}, {"path": "Patient.name.family", "method": "redact"}],
     "rule 2 (Patient.name.family) can never apply: rule 1"),
    ([{"path": "*.code", "method": "keep"}, {"path": "Observation.code", "method": "redact"}], "can never apply"),
    ([], "'rules' must be a non-empty list"),
    (["Patient.gender"], "a rule is an object"),
])
def test_a_bad_profile_is_refused_with_a_clear_message(rules: list[Any], message: str) -> None:
    with pytest.raises(ProfileError) as caught:
        parse_profile({"name": "bad", "rules": rules}, source="bad.json")
    assert message in str(caught.value)
    assert str(caught.value).startswith("bad.json")


#: Rules that parse alone, for profiles whose rules may shadow one another: nested paths, a choice
#: (`value[x]`) and its typed names, `*` and a resource type, extensions by URL, a transforming method.
SHADOWING_CANDIDATES = [
    {"path": "Patient.name", "method": "keep"}, {"path": "Patient.name.family", "method": "redact"},
    {"path": "*.code", "method": "keep"}, {"path": "Observation.code", "method": "redact"},
    {"path": "Observation.code.coding", "method": "keep"}, {"path": "Observation.value[x]", "method": "keep"},
    {"path": "Observation.value[x]", "method": "dateshift"}, {"path": "Observation.valueQuantity", "method": "redact"},
    {"path": "Observation.valueQuantity.value", "method": "keep"},
    {"path": "Observation.component", "method": "keep"},
    {"path": "Observation.component.value[x]", "method": "redact"},
    {"path": "Observation.component.valueQuantity", "method": "keep"},
    {"path": "Observation.effective[x]", "method": "dateshift"},
    {"path": "Observation.effectiveDateTime", "method": "keep"}, {"path": "*.identifier", "method": "redact"},
    {"path": "Patient.birthDate", "method": "dateshift"}, {"path": "Patient.birthDate", "method": "keep"},
    {"path": "*.extension", "url": "http://a", "method": "keep"},
    {"path": "Patient.extension", "url": "http://a", "method": "redact"},
    {"path": "Patient.extension", "url": "http://b", "method": "keep"},
]


def _decides(earlier: dict[str, str], later: dict[str, str]) -> bool:
    """The rule's definition, pair by pair: `earlier` keeps or redacts (or selects the same extension
    at the same path as) everything `later` names, for the same or every resource type."""
    (scope, *segments), (later_scope, *later_segments) = earlier["path"].split("."), later["path"].split(".")
    if scope not in ("*", later_scope) or ("url" in earlier) != ("url" in later):
        return False
    if "url" in earlier:
        return earlier["url"] == later["url"] and segments == later_segments
    if earlier["method"] not in ("keep", "redact") or len(segments) > len(later_segments):
        return False
    return all(a == b or (a.endswith("[x]") and b.startswith(a[:-3]) and b[len(a) - 3:len(a) - 2].isupper())
               for a, b in zip(segments, later_segments, strict=False))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(SHADOWING_CANDIDATES), min_size=1, max_size=12))
def test_a_rule_is_refused_exactly_when_an_earlier_rule_decides_it(rules: list[dict[str, str]]) -> None:
    shadowed = next(((later, earlier) for later, rule in enumerate(rules)
                     for earlier in range(later) if _decides(rules[earlier], rule)), None)
    if shadowed is None:
        assert parse_profile({"rules": rules}).rules
        return
    later, earlier = shadowed
    with pytest.raises(ProfileError, match=re.escape(
            f"rule {later + 1} ({rules[later]['path']}) can never apply: rule {earlier + 1} "
            f"({rules[earlier]['path']}, {rules[earlier]['method']}) comes first")):
        parse_profile({"rules": rules})


@pytest.mark.parametrize(("name", "text", "message"), [
    ("broken.json", '{"rules": [', "not valid JSON"),
    ("broken.yaml", "rules: [unclosed", "not valid YAML"),
    ("list.json", "[]", "a profile is an object"),
    ("extra.json", '{"rules": [{"path": "Patient.gender", "method": "keep"}], "rulez": []}', "unknown profile keys"),
])
def test_a_malformed_profile_file_is_refused(tmp_path: Path, name: str, text: str, message: str) -> None:
    target = tmp_path / name
    target.write_text(text)
    with pytest.raises(ProfileError, match=re.escape(message)):
        load_profile(target)


def test_a_missing_profile_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read the profile"):
        load_profile(tmp_path / "absent.json")


def test_every_wildcard_rule_of_the_default_profile_names_a_real_element() -> None:
    data = json.loads(DEFAULT_PROFILE.read_text())
    for rule in data["rules"]:
        if not rule["path"].startswith("*.") or "url" in rule:
            continue
        tail = rule["path"][2:]

        def names_element(kind: str, tail: str = tail, rule: dict[str, Any] = rule) -> bool:
            try:
                parse_profile({"rules": [{**rule, "path": f"{kind}.{tail}"}]})
            except ProfileError:
                return False
            return True

        assert any(names_element(kind) for kind in RESEARCH_TYPES), rule["path"]


# -- the whole synthetic data set ----------------------------------------------------------------

def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return []


def _identifying(resource: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(values that must not appear even inside a longer string, values that must not be released whole)."""
    anywhere: set[str] = {i["value"] for i in resource.get("identifier", ()) if "value" in i}
    whole: set[str] = set()
    for name in resource.get("name", ()) if isinstance(resource.get("name"), list) else ():
        for part in [name.get("family"), *name.get("given", ())]:
            (anywhere if part and len(part) >= 5 else whole).add(part)
    if isinstance(resource.get("name"), str):
        anywhere.add(resource["name"])
    anywhere.update(t["value"] for t in resource.get("telecom", ()))
    for address in resource.get("address", ()):
        anywhere.update(address.get("line", ()))
        whole.update(filter(None, [address.get("city"), address.get("postalCode")]))
    if resource["resourceType"] == "Patient":
        anywhere.add(resource["birthDate"])
        anywhere.update(e["valueString"] for e in resource.get("extension", ()) if "valueString" in e)
    for content in resource.get("content", ()):
        anywhere.update(filter(None, [content.get("attachment", {}).get("data")]))
    return anywhere - {None}, whole - {None}


def test_the_synthetic_data_set_deidentifies_to_valid_resources_without_leaks(profile: Profile,
                                                                              key: PseudonymKey) -> None:
    from service.store.indexer import patient_of
    from service.synthetic import ndjson_resources

    resources = list(ndjson_resources(20, seed=11))
    pks = {(r["resourceType"], r["id"]): pk for pk, r in enumerate(resources, start=1)}
    deid = Deidentifier(profile, key, reference_year=REFERENCE_YEAR)
    anywhere: set[str] = set()
    whole: set[str] = set()
    released = []
    for pk, resource in enumerate(resources, start=1):
        found_anywhere, found_whole = _identifying(resource)
        anywhere |= found_anywhere
        whole |= found_whole
        released.append(deid.apply(resource, pk, patient_of(resource["resourceType"], resource), pks))
    assert {r["resourceType"] for r in released} >= {"Patient", "Observation", "Condition", "Encounter",
                                                      "MedicationRequest", "Organization", "Practitioner"}
    for resource in released:
        validate(resource)
    strings = _strings(released)
    text = "\x00".join(strings)
    assert sorted(whole.intersection(strings)) == []
    assert sorted(p for p in anywhere if p in text) == []
