"""Free text never leaves: the data-type rules of de-identification, element by element.

Each case plants a name, a phone number, a record number, a street and an exact birth
date where a real feed put them, and checks that the default profile releases none of
them (and that the output still validates against R4B).
"""
from __future__ import annotations

from typing import Any

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class

from policies.deid import Deidentifier, Profile, ProfileError, parse_profile
from policies.pseudonym import PseudonymKey

FAMILY, PHONE, MRN, STREET, BIRTH = "Zoltowska", "+1-555-867-5309", "MRN-8675309", "42 Quillfeather Lane", "1987-06-15"
PLANTED = f"{FAMILY} {PHONE} {MRN} {STREET} born {BIRTH}"
SNOMED, LOINC, UCUM = "http://snomed.info/sct", "http://loinc.org", "http://unitsofmeasure.org"
RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
STORE = {("Patient", "p1"): 101, ("Encounter", "e1"): 201}


def release(profile: Profile, key: PseudonymKey, resource: dict[str, Any],
            patient: str | None = "p1") -> dict[str, Any]:
    deid = Deidentifier(profile, key, reference_year=2025, resolve_pk=lambda t, i: STORE.get((t, i)))
    released = deid.apply(resource, 900, patient)
    get_fhir_model_class(released["resourceType"]).model_validate(released)
    return released


def leaks(released: dict[str, Any]) -> list[str]:
    text = orjson.dumps(released).decode()
    return [p for p in (FAMILY, "867-5309", MRN, "Quillfeather", BIRTH) if p in text]


def concept(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": PLANTED}], "text": PLANTED}


def observation(**elements: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": "o1", "status": "final", "code": concept(LOINC, "8867-4"),
            "subject": {"reference": "Patient/p1"}, **elements}


# -- what a feed was seen to release verbatim -------------------------------------------------------

def test_codeable_concept_text_is_dropped(profile: Profile, key: PseudonymKey) -> None:
    released = release(profile, key, observation())
    assert released["code"] == {"coding": [{"system": LOINC, "code": "8867-4"}]}


def test_coding_display_is_dropped_when_the_terminology_table_has_no_display(profile: Profile,
                                                                            key: PseudonymKey) -> None:
    released = release(profile, key, observation())
    assert "display" not in released["code"]["coding"][0] and leaks(released) == []


def test_coding_display_is_replaced_by_the_display_of_the_shipped_table(profile: Profile, key: PseudonymKey) -> None:
    patient = {"resourceType": "Patient", "id": "p1",
               "maritalStatus": concept("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "M")}
    released = release(profile, key, patient)
    assert released["maritalStatus"] == {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                                                     "code": "M", "display": "Married"}]}


def test_a_coding_of_a_custom_code_system_is_dropped(profile: Profile, key: PseudonymKey) -> None:
    code = {"coding": [{"system": f"http://ehr.example/{FAMILY}/{PHONE}", "code": "x1"},
                       {"system": LOINC, "code": "8867-4"}]}
    released = release(profile, key, observation(code=code))
    assert released["code"] == {"coding": [{"system": LOINC, "code": "8867-4"}]}


@pytest.mark.parametrize("system", ["http://hl7.org/fhir/sid/us-ssn", "http://hl7.org/fhir/sid/us-npi",
                                    "http://hl7.org/fhir/sid/us-mbi"])
def test_a_coding_in_an_identifier_namespace_of_a_known_family_is_dropped(profile: Profile, key: PseudonymKey,
                                                                          system: str) -> None:
    code = {"coding": [{"system": system, "code": "123-45-6789"}, {"system": LOINC, "code": "8867-4"}]}
    released = release(profile, key, observation(code=code))
    assert released["code"] == {"coding": [{"system": LOINC, "code": "8867-4"}]}


def test_a_concept_left_without_any_coding_is_data_absent(profile: Profile, key: PseudonymKey) -> None:
    released = release(profile, key, observation(code={"coding": [{"system": "http://ehr.example/x", "code": "1"}],
                                                       "text": PLANTED}))
    assert "coding" not in released["code"] and leaks(released) == []


@pytest.mark.parametrize("system", ["urn:oid:2.16.840.1.113883.6.96", "2.16.840.1.113883.6.96",
                                    "http://snomed.info/sct/"])
def test_oid_aliases_of_a_known_system_are_released_as_its_canonical_uri(profile: Profile, key: PseudonymKey,
                                                                         system: str) -> None:
    released = release(profile, key, observation(code={"coding": [{"system": system, "code": "271649006"}]}))
    assert released["code"] == {"coding": [{"system": SNOMED, "code": "271649006"}]}


def test_coding_keeps_system_code_and_version(profile: Profile, key: PseudonymKey) -> None:
    code = {"coding": [{"system": LOINC, "version": "2.77", "code": "8867-4", "userSelected": True}]}
    assert release(profile, key, observation(code=code))["code"] == code


@pytest.mark.parametrize("version", [PLANTED, FAMILY, f"2.77 {FAMILY}", f"http://snomed.info/sct/{FAMILY}"])
def test_a_coding_version_that_is_not_a_version_is_dropped(profile: Profile, key: PseudonymKey, version: str) -> None:
    code = {"coding": [{"system": SNOMED, "version": version, "code": "271649006"}]}
    assert release(profile, key, observation(code=code))["code"] == {"coding": [{"system": SNOMED,
                                                                                 "code": "271649006"}]}


def test_goal_description_text_is_dropped(profile: Profile, key: PseudonymKey) -> None:
    goal = {"resourceType": "Goal", "id": "g1", "lifecycleStatus": "active", "subject": {"reference": "Patient/p1"},
            "description": concept(SNOMED, "281004")}
    released = release(profile, key, goal)
    assert released["description"] == {"coding": [{"system": SNOMED, "code": "281004"}]}


def test_patient_marital_status_text_is_dropped(profile: Profile, key: PseudonymKey) -> None:
    patient = {"resourceType": "Patient", "id": "p1", "maritalStatus": {"text": PLANTED}}
    assert "maritalStatus" not in release(profile, key, patient)


def test_discharge_disposition_text_is_dropped(profile: Profile, key: PseudonymKey) -> None:
    encounter = {"resourceType": "Encounter", "id": "e1", "status": "finished",
                 "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP",
                           "display": PLANTED},
                 "subject": {"reference": "Patient/p1"},
                 "hospitalization": {"dischargeDisposition": concept("http://www.nubc.org/patient-discharge", "01")}}
    released = release(profile, key, encounter)
    assert released["hospitalization"] == {"dischargeDisposition": {"coding": [
        {"system": "http://www.nubc.org/patient-discharge", "code": "01"}]}}
    assert released["class"]["display"] == "inpatient encounter"


def test_component_value_codeable_concept_text_is_dropped(profile: Profile, key: PseudonymKey) -> None:
    component = {"code": concept(LOINC, "72166-2"), "valueCodeableConcept": concept(SNOMED, "8517006")}
    released = release(profile, key, observation(component=[component]))
    assert released["component"][0]["valueCodeableConcept"] == {"coding": [{"system": SNOMED, "code": "8517006"}]}
    assert leaks(released) == []


def test_dosage_additional_instruction_text_is_dropped(profile: Profile, key: PseudonymKey) -> None:
    request = {"resourceType": "MedicationRequest", "id": "mr1", "status": "active", "intent": "order",
               "subject": {"reference": "Patient/p1"}, "medicationCodeableConcept": concept(SNOMED, "372687004"),
               "dosageInstruction": [{"sequence": 1, "additionalInstruction": [concept(SNOMED, "311504000")]}]}
    released = release(profile, key, request)
    assert released["dosageInstruction"] == [{"sequence": 1, "additionalInstruction": [
        {"coding": [{"system": SNOMED, "code": "311504000"}]}]}]


def test_practitioner_qualification_code_text_is_dropped(profile: Profile, key: PseudonymKey) -> None:
    practitioner = {"resourceType": "Practitioner", "id": "dr1",
                    "qualification": [{"code": concept("http://terminology.hl7.org/CodeSystem/v2-0360", "MD")}]}
    released = release(profile, key, practitioner, patient=None)
    assert released["qualification"] == [{"code": {"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/v2-0360", "code": "MD"}]}}]


def test_quantity_unit_is_the_ucum_code_never_the_written_unit(profile: Profile, key: PseudonymKey) -> None:
    quantity = {"value": 72, "unit": PLANTED, "system": UCUM, "code": "/min"}
    released = release(profile, key, observation(valueQuantity=quantity))
    assert released["valueQuantity"] == {"value": 72, "unit": "/min", "system": UCUM, "code": "/min"}


@pytest.mark.parametrize("quantity", [
    {"value": 72, "unit": PLANTED, "system": "http://ehr.example/units", "code": "beats"},
    {"value": 72, "unit": "beats", "system": UCUM, "code": PLANTED},
    {"value": 72, "unit": PLANTED},
])
def test_a_quantity_without_a_well_formed_ucum_code_keeps_only_its_value(profile: Profile, key: PseudonymKey,
                                                                         quantity: dict[str, Any]) -> None:
    assert release(profile, key, observation(valueQuantity=quantity))["valueQuantity"] == {"value": 72}


def test_quantity_comparator_is_kept_only_when_it_is_a_comparator(profile: Profile, key: PseudonymKey) -> None:
    kept = release(profile, key, observation(valueQuantity={"value": 5, "comparator": "<"}))
    dropped = release(profile, key, observation(valueQuantity={"value": 5, "comparator": FAMILY}))
    assert kept["valueQuantity"] == {"value": 5, "comparator": "<"} and dropped["valueQuantity"] == {"value": 5}


def sampled(data: str) -> dict[str, Any]:
    return {"origin": {"value": 0, "system": UCUM, "code": "mV"}, "period": 10, "dimensions": 1, "data": data}


@pytest.mark.parametrize("data", ["1 -2.5 3E2 E L U 0.001", "7"])
def test_sampled_data_that_is_a_list_of_numbers_is_released(profile: Profile, key: PseudonymKey, data: str) -> None:
    assert release(profile, key, observation(valueSampledData=sampled(data)))["valueSampledData"]["data"] == data


@pytest.mark.parametrize("data", [PLANTED, "1 2 Zoltowska", "1  2", " 1 2", "1,2", "0x1F", ""])
def test_sampled_data_that_is_not_a_list_of_numbers_is_dropped(profile: Profile, key: PseudonymKey,
                                                              data: str) -> None:
    released = release(profile, key, observation(valueSampledData=sampled(data)))
    assert "data" not in released["valueSampledData"] and leaks(released) == []


def test_meta_security_keeps_only_codes_of_known_systems_with_the_tables_display(profile: Profile,
                                                                                 key: PseudonymKey) -> None:
    meta = {"security": [{"system": "http://ehr.example/labels", "code": FAMILY, "display": PLANTED},
                         {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R",
                          "display": PLANTED},
                         {"system": "urn:oid:2.16.840.1.113883.5.4", "code": "HIV", "display": PLANTED}],
            "tag": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST",
                     "display": PLANTED}]}
    released = release(profile, key, observation(meta=meta))
    assert released["meta"]["security"] == [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R", "display": "restricted"},
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV",
         "display": "HIV/AIDS information sensitivity"},
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "PSEUDED",
         "display": "pseudonymized"}]
    assert "tag" not in released["meta"]


def test_meta_version_id_is_released_only_as_a_version_number(profile: Profile, key: PseudonymKey) -> None:
    assert "versionId" not in release(profile, key, observation(meta={"versionId": MRN}))["meta"]


def test_the_text_sub_extension_of_us_core_race_is_dropped(profile: Profile, key: PseudonymKey) -> None:
    race = {"url": RACE, "extension": [
        {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3",
                                               "display": PLANTED}},
        {"url": "detailed", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2108-9"}},
        {"url": "detailed", "valueString": PLANTED},
        {"url": "text", "valueString": PLANTED}]}
    released = release(profile, key, {"resourceType": "Patient", "id": "p1", "extension": [race]})
    assert released["extension"] == [{"url": RACE, "extension": [
        {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3"}},
        {"url": "detailed", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2108-9"}}]}]


def test_a_kept_extension_left_with_nothing_but_its_url_is_dropped(profile: Profile, key: PseudonymKey) -> None:
    race = {"url": RACE, "extension": [{"url": "text", "valueString": PLANTED}]}
    assert "extension" not in release(profile, key, {"resourceType": "Patient", "id": "p1", "extension": [race]})


def test_extensions_on_a_primitive_are_dropped(profile: Profile, key: PseudonymKey) -> None:
    planted = {"extension": [{"url": RACE, "extension": [
        {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3"}}]},
        {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": f"{BIRTH}T04:05:06Z"},
        {"url": "http://ehr.example/street", "valueString": PLANTED}]}
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": BIRTH, "_birthDate": planted, "gender": "female",
               "_gender": planted,
               "address": [{"state": "MA", "_state": planted, "extension": planted["extension"][1:],
                            "line": [STREET], "_line": [planted]}]}
    released = release(profile, key, patient)
    assert not [k for k in orjson.loads(orjson.dumps(released)) if k.startswith("_")]
    assert released["address"] == [{"state": "MA"}] and leaks(released) == []


# -- data types inside a kept element obey their own rules ------------------------------------------

def keep(*paths: str) -> Profile:
    return parse_profile({"rules": [{"path": path, "method": "keep"} for path in paths]})


def test_an_annotation_inside_a_kept_element_releases_no_text(key: PseudonymKey) -> None:
    plan = {"resourceType": "CarePlan", "id": "cp1", "status": "active", "intent": "plan",
            "subject": {"reference": "Patient/p1"},
            "activity": [{"progress": [{"authorString": FAMILY, "text": PLANTED, "time": "2020-01-01"}],
                          "detail": {"status": "completed", "description": PLANTED}}]}
    released = release(keep("CarePlan.activity"), key, plan)
    assert leaks(released) == [] and released["activity"][0]["detail"] == {"status": "completed"}


def test_a_human_name_inside_a_kept_element_releases_no_name(key: PseudonymKey) -> None:
    patient = {"resourceType": "Patient", "id": "p1", "contact": [{"name": {"use": "official", "family": FAMILY,
                                                                             "given": [MRN], "text": PLANTED}}]}
    released = release(keep("Patient.contact"), key, patient)
    assert released["contact"] == [{"name": {"use": "official"}}]


def test_an_attachment_inside_a_kept_element_releases_no_title_url_or_data(key: PseudonymKey) -> None:
    patient = {"resourceType": "Patient", "id": "p1", "photo": [
        {"contentType": "image/png", "title": PLANTED, "url": f"http://ehr.example/{FAMILY}.png",
         "data": "WnlsdG93c2th"}]}
    released = release(keep("Patient.photo"), key, patient)
    assert "photo" not in released


def test_an_identifier_inside_a_kept_element_releases_no_value_or_system(key: PseudonymKey) -> None:
    patient = {"resourceType": "Patient", "id": "p1", "identifier": [
        {"use": "usual", "system": f"http://ehr.example/{FAMILY}", "value": MRN}]}
    released = release(keep("Patient.identifier"), key, patient)
    assert released["identifier"] == [{"use": "usual"}]


def test_a_code_inside_a_kept_element_is_released_only_from_its_value_set(profile: Profile,
                                                                         key: PseudonymKey) -> None:
    def request(unit: str) -> dict[str, Any]:
        return {"resourceType": "MedicationRequest", "id": "mr1", "status": "active", "intent": "order",
                "subject": {"reference": "Patient/p1"}, "medicationCodeableConcept": concept(SNOMED, "372687004"),
                "dosageInstruction": [{"timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": unit}}}]}
    assert release(profile, key, request("d"))["dosageInstruction"][0]["timing"]["repeat"]["periodUnit"] == "d"
    assert "periodUnit" not in release(profile, key, request(FAMILY))["dosageInstruction"][0]["timing"]["repeat"]


def test_a_reference_type_that_is_not_a_resource_type_is_dropped(profile: Profile, key: PseudonymKey) -> None:
    released = release(profile, key, observation(encounter={"reference": "Encounter/e1", "type": PLANTED}))
    assert set(released["encounter"]) == {"reference"}


def test_money_keeps_its_value_and_an_iso_currency_code(key: PseudonymKey) -> None:
    claim = {"resourceType": "Claim", "id": "cl1", "status": "active", "use": "claim",
             "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "oral"}]},
             "patient": {"reference": "Patient/p1"}, "created": "2020-01-01", "priority": {"text": "normal"},
             "provider": {"reference": "Patient/p1"}, "insurance": [],
             "total": {"value": 12.5, "currency": "USD"}}
    assert release(keep("Claim.total"), key, claim)["total"] == {"value": 12.5, "currency": "USD"}
    assert release(keep("Claim.total"), key, {**claim, "total": {"value": 1, "currency": FAMILY}})["total"] == {
        "value": 1}


# -- the profile options --------------------------------------------------------------------------

def test_a_profile_may_add_code_systems_to_the_allowlist(key: PseudonymKey) -> None:
    local = "http://hospital.example/codes/lab"
    profile = parse_profile({"code_systems": [local], "rules": [{"path": "Observation.code", "method": "keep"}]})
    released = release(profile, key, observation(code={"coding": [{"system": local, "code": "K+", "display": "x"}]}))
    assert released["code"] == {"coding": [{"system": local, "code": "K+"}]}


def test_two_profiles_in_one_process_each_release_only_their_own_code_systems(key: PseudonymKey) -> None:
    local = "http://hospital.example/codes/lab"
    rules = [{"path": "Observation.code", "method": "keep"}]
    listing, other = parse_profile({"code_systems": [local], "rules": rules}), parse_profile({"rules": rules})
    source = observation(code={"coding": [{"system": local, "code": "K+"}, {"system": LOINC, "code": "8867-4"}]},
                         meta={"security": [{"system": local, "code": "K+"}]})
    for _ in range(2):  # each profile remembers the codings it released: the second time answers from there
        by_listing, by_other = release(listing, key, source), release(other, key, source)
        assert [c["system"] for c in by_listing["code"]["coding"]] == [local, LOINC]
        assert [c["system"] for c in by_other["code"]["coding"]] == [LOINC]
        assert {"system": local, "code": "K+"} in by_listing["meta"]["security"]
        assert local not in orjson.dumps(by_other).decode()


def test_a_named_string_inside_a_coding_is_released_by_the_rule_that_names_it(key: PseudonymKey) -> None:
    profile = parse_profile({"rules": [{"path": "Observation.code.text", "method": "keep"},
                                       {"path": "Observation.code", "method": "keep"}]})
    assert release(profile, key, observation())["code"]["text"] == PLANTED


def test_an_extension_value_of_a_listed_string_type_is_released(key: PseudonymKey) -> None:
    url = "http://hospital.example/ward"
    profile = parse_profile({"rules": [{"path": "*.extension", "url": url, "method": "keep", "values": ["string"]}]})
    released = release(profile, key, {"resourceType": "Patient", "id": "p1",
                                      "extension": [{"url": url, "valueString": "B2"}]})
    assert released["extension"] == [{"url": url, "valueString": "B2"}]


@pytest.mark.parametrize("systems", ["http://x", [1], ["no-scheme"]])
def test_a_profile_with_bad_code_systems_is_refused(systems: Any) -> None:
    with pytest.raises(ProfileError, match="'code_systems' must be a list of code system URIs"):
        parse_profile({"code_systems": systems, "rules": [{"path": "Patient.gender", "method": "keep"}]})
