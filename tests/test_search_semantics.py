"""Search semantics on the custodian API: totals with `_count=0`, booleans whose absence has a
meaning, modifiers (`:text`, `:of-type`, `:identifier`, refusals), chains and `_has` (one level).

Each test states one behaviour FHIR R4 defines (https://hl7.org/fhir/R4/search.html) and checks
the ids returned against the resources the test made.
"""
from __future__ import annotations

import pytest

from tests.fhir_helpers import create, ids, issue, observation, patient, search

LOINC = "http://loinc.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def _same(found: list[str], *made: dict) -> bool:
    return sorted(found) == sorted(m["id"] for m in made)


def _refused(client, headers, query: str, status: int = 400) -> dict:
    response = client.get(f"/fhir/{query}", headers=headers)
    assert response.status_code == status, response.get_json()
    return issue(response)


# -- _count=0 ------------------------------------------------------------------------------------


def test_count_zero_returns_the_total_and_no_entries(client, custodian_headers):
    subject = create(client, custodian_headers, patient())
    for value in (1, 2, 3):
        create(client, custodian_headers, observation(subject["id"], value=value))
    body = search(client, custodian_headers, f"Observation?patient={subject['id']}&_count=0")
    assert body["total"] == 3
    assert "entry" not in body


def test_count_zero_with_total_method_count_is_what_fhirpy_count_sends(client, custodian_headers):
    create(client, custodian_headers, patient(gender="male"))
    create(client, custodian_headers, patient(gender="female"))
    body = search(client, custodian_headers, "Patient?gender=male&_count=0&_totalMethod=count")
    assert body["total"] == 1


# -- booleans whose absence means false ------------------------------------------------------------


@pytest.fixture
def mortality(client, custodian_headers):
    return {
        "unstated": create(client, custodian_headers, patient(family="Unstated")),
        "alive": create(client, custodian_headers, patient(family="Alive", deceasedBoolean=False)),
        "dead": create(client, custodian_headers, patient(family="Dead", deceasedBoolean=True)),
        "dated": create(client, custodian_headers, patient(family="Dated", deceasedDateTime="2020-01-02")),
    }


def test_deceased_false_includes_patients_without_deceased(client, custodian_headers, mortality):
    found = ids(search(client, custodian_headers, "Patient?deceased=false"))
    assert _same(found, mortality["unstated"], mortality["alive"])


def test_deceased_true_includes_a_death_date(client, custodian_headers, mortality):
    found = ids(search(client, custodian_headers, "Patient?deceased=true"))
    assert _same(found, mortality["dead"], mortality["dated"])


def test_deceased_not_true_is_deceased_false(client, custodian_headers, mortality):
    found = ids(search(client, custodian_headers, "Patient?deceased:not=true"))
    assert _same(found, mortality["unstated"], mortality["alive"])


def test_deceased_false_with_an_empty_system_is_the_same_search(client, custodian_headers, mortality):
    found = ids(search(client, custodian_headers, "Patient?deceased=|false"))
    assert _same(found, mortality["unstated"], mortality["alive"])


def test_deceased_missing_finds_patients_without_the_element(client, custodian_headers, mortality):
    assert _same(ids(search(client, custodian_headers, "Patient?deceased:missing=true")), mortality["unstated"])


def test_deceased_false_counts_the_patients_without_deceased(client, custodian_headers, mortality):
    assert search(client, custodian_headers, "Patient?deceased=false&_summary=count")["total"] == 2


def test_active_matches_only_the_stated_value_as_its_expression_yields(client, custodian_headers):
    """`Patient.active` yields nothing when absent: only `:missing` finds those patients."""
    stated = create(client, custodian_headers, patient(active=True))
    unstated = create(client, custodian_headers, patient())
    assert _same(ids(search(client, custodian_headers, "Patient?active=true")), stated)
    assert _same(ids(search(client, custodian_headers, "Patient?active:missing=true")), unstated)


# -- modifiers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["Observation?subject:Foo=1", "Observation?subject:patient=1",
                                   "Patient?organization:Practitioner=1", "Observation?code:exact=1",
                                   "Patient?gender:contains=f", "Patient?_id:not=1", "Patient?family:of-type=a|b|c",
                                   "Observation?code:of-type=a|b|c", "Patient?identifier:of-type=MR|123"])
def test_unknown_or_misplaced_modifiers_are_400_naming_the_parameter(client, custodian_headers, query):
    name = query.split("?")[1].split("=")[0]
    assert name in _refused(client, custodian_headers, query)["expression"][0]


@pytest.mark.parametrize("modifier", ["below", "above", "in", "not-in"])
def test_terminology_modifiers_are_refused_naming_the_modifier_and_why(client, custodian_headers, modifier):
    found = _refused(client, custodian_headers, f"Observation?code:{modifier}={LOINC}|8480-6")
    assert found["code"] == "not-supported"
    assert f":{modifier}" in found["diagnostics"]
    assert "shipped" in found["diagnostics"]


def test_a_type_modifier_restricts_a_reference_to_that_type(client, custodian_headers):
    subject = create(client, custodian_headers, patient())
    made = create(client, custodian_headers, observation(subject["id"]))
    assert ids(search(client, custodian_headers, f"Observation?subject:Patient={subject['id']}")) == [made["id"]]
    assert ids(search(client, custodian_headers, f"Observation?subject:Group={subject['id']}")) == []


def _observation_with(subject_id: str, code: dict) -> dict:
    resource = observation(subject_id)
    resource["code"] = code
    return resource


def test_text_matches_the_start_of_a_display_ignoring_case_and_accents(client, custodian_headers):
    subject = create(client, custodian_headers, patient())["id"]
    systolic = create(client, custodian_headers, _observation_with(
        subject, {"coding": [{"system": LOINC, "code": "8480-6", "display": "Systolic blood pressure"}]}))
    create(client, custodian_headers, _observation_with(
        subject, {"coding": [{"system": LOINC, "code": "8462-4", "display": "Diastolic blood pressure"}]}))
    assert ids(search(client, custodian_headers, "Observation?code:text=SYSTOLIC")) == [systolic["id"]]


def test_text_matches_a_codeable_concepts_text(client, custodian_headers):
    subject = create(client, custodian_headers, patient())["id"]
    made = create(client, custodian_headers, _observation_with(
        subject, {"coding": [{"system": LOINC, "code": "8480-6"}], "text": "Pression artérielle"}))
    assert ids(search(client, custodian_headers, "Observation?code:text=pression arterielle")) == [made["id"]]
    assert ids(search(client, custodian_headers, "Observation?code:text=8480")) == []


def test_of_type_matches_an_identifier_by_its_type_and_value(client, custodian_headers):
    def typed(code: str, value: str) -> list[dict]:
        return [{"type": {"coding": [{"system": V2_0203, "code": code}]}, "system": "urn:h", "value": value}]
    record = create(client, custodian_headers, patient(identifier=typed("MR", "4711")))
    create(client, custodian_headers, patient(identifier=typed("SS", "4711")))
    found = ids(search(client, custodian_headers, f"Patient?identifier:of-type={V2_0203}|MR|4711"))
    assert found == [record["id"]]
    assert ids(search(client, custodian_headers, f"Patient?identifier:of-type={V2_0203}|MR|4712")) == []


def test_of_type_needs_type_system_code_and_value(client, custodian_headers):
    _refused(client, custodian_headers, f"Patient?identifier:of-type={V2_0203}|MR")


def test_identifier_modifier_matches_a_reference_by_its_identifier(client, custodian_headers):
    by_mrn = create(client, custodian_headers, observation(
        "x", subject={"identifier": {"system": "urn:mrn", "value": "M-1"}, "type": "Patient"}))
    create(client, custodian_headers, observation(
        "x", subject={"identifier": {"system": "urn:mrn", "value": "M-2"}, "type": "Patient"}))
    assert ids(search(client, custodian_headers, "Observation?subject:identifier=urn:mrn|M-1")) == [by_mrn["id"]]
    assert ids(search(client, custodian_headers, "Observation?patient:identifier=urn:mrn|M-1")) == [by_mrn["id"]]
    assert ids(search(client, custodian_headers, "Observation?subject:identifier=M-2")) != [by_mrn["id"]]


def test_identifier_modifier_on_a_parameter_of_one_target_type(client, custodian_headers):
    made = create(client, custodian_headers, patient(
        managingOrganization={"identifier": {"system": "urn:siret", "value": "123"}}))
    assert ids(search(client, custodian_headers, "Patient?organization:identifier=urn:siret|123")) == [made["id"]]


def test_text_matches_an_identifiers_type_text(client, custodian_headers):
    made = create(client, custodian_headers, patient(identifier=[{"type": {"text": "Numéro de sécurité sociale"},
                                                                  "value": "1"}]))
    assert ids(search(client, custodian_headers, "Patient?identifier:text=numero de secu")) == [made["id"]]


def test_a_reference_typed_by_a_logical_model_url_is_stored_and_found_by_identifier(client, custodian_headers):
    model = "http://example.org/fhir/StructureDefinition/AVeryLongLogicalModelNameForAnEquipmentRegistry"
    made = create(client, custodian_headers, observation(
        "x", subject={"identifier": {"system": "urn:dev", "value": "D-1"}, "type": model}))
    assert ids(search(client, custodian_headers, "Observation?subject:identifier=urn:dev|D-1")) == [made["id"]]


def test_patient_identifier_ignores_a_subject_of_another_type(client, custodian_headers):
    create(client, custodian_headers, observation(
        "x", subject={"identifier": {"system": "urn:mrn", "value": "M-1"}, "type": "Group"}))
    assert ids(search(client, custodian_headers, "Observation?patient:identifier=urn:mrn|M-1")) == []


# -- chains -----------------------------------------------------------------------------------------


@pytest.fixture
def families(client, custodian_headers):
    """Two patients, each with one Observation; Flores has a general practitioner."""
    doctor = create(client, custodian_headers, {"resourceType": "Practitioner", "name": [{"family": "Okafor"}]})
    flores = create(client, custodian_headers, patient(
        family="Flores", gender="female", generalPractitioner=[{"reference": f"Practitioner/{doctor['id']}"}]))
    other = create(client, custodian_headers, patient(family="Nguyen", gender="male"))
    return {
        "doctor": doctor, "flores": flores, "other": other,
        "flores_obs": create(client, custodian_headers, observation(flores["id"], code="1234-5")),
        "other_obs": create(client, custodian_headers, observation(other["id"], code="8480-6")),
    }


def test_a_typed_chain_finds_resources_whose_target_matches(client, custodian_headers, families):
    found = ids(search(client, custodian_headers, "Observation?subject:Patient.name=flores"))
    assert found == [families["flores_obs"]["id"]]


def test_an_untyped_chain_finds_resources_whose_target_matches(client, custodian_headers, families):
    assert ids(search(client, custodian_headers, "Observation?subject.name=flores")) == [families["flores_obs"]["id"]]


def test_a_chain_through_a_typed_parameter(client, custodian_headers, families):
    found = ids(search(client, custodian_headers, "Patient?general-practitioner:Practitioner.family=okafor"))
    assert found == [families["flores"]["id"]]


def test_a_chain_takes_the_chained_parameters_modifier(client, custodian_headers, families):
    assert ids(search(client, custodian_headers, "Observation?subject:Patient.name:exact=Flores")) == [
        families["flores_obs"]["id"]]
    assert ids(search(client, custodian_headers, "Observation?subject:Patient.gender:not=female")) == [
        families["other_obs"]["id"]]


def test_a_chain_and_a_filter_combine(client, custodian_headers, families):
    assert ids(search(client, custodian_headers, "Observation?subject:Patient.gender=female&code=8480-6")) == []
    body = search(client, custodian_headers, "Observation?subject:Patient.gender=female&_summary=count")
    assert body["total"] == 1


def test_a_chain_takes_missing_on_the_chained_parameter(client, custodian_headers, families):
    nobody = create(client, custodian_headers, patient(family="Nogender"))
    made = create(client, custodian_headers, observation(nobody["id"]))
    assert ids(search(client, custodian_headers, "Observation?subject:Patient.gender:missing=true")) == [made["id"]]


def test_a_chain_skips_a_deleted_target(client, custodian_headers, families):
    assert client.delete(f"/fhir/Patient/{families['flores']['id']}", headers=custodian_headers).status_code in (
        200, 204)
    assert ids(search(client, custodian_headers, "Observation?subject:Patient.name=flores")) == []


def test_a_chain_self_link_keeps_the_chain(client, custodian_headers, families):
    body = search(client, custodian_headers, "Observation?subject:Patient.name=flores")
    assert "subject:Patient.name=flores" in body["link"][0]["url"]


@pytest.mark.parametrize("query", ["Observation?subject:Patient.organization.name=x",
                                   "Observation?subject.general-practitioner.name=x"])
def test_a_chain_of_two_levels_is_refused_naming_it(client, custodian_headers, query):
    found = _refused(client, custodian_headers, query)
    assert found["code"] == "not-supported"
    assert query.split("?")[1].split("=")[0] in found["diagnostics"]


@pytest.mark.parametrize("query", ["Observation?code.name=x", "Observation?subject:Foo.name=x",
                                   "Observation?subject:Patient.colour=x", "Patient?organization:Patient.name=x",
                                   "Observation?subject:Patient.name:fuzzy=x"])
def test_a_malformed_chain_is_400(client, custodian_headers, query):
    _refused(client, custodian_headers, query)


def test_an_unknown_chained_parameter_is_skipped_when_lenient(client, custodian_headers, families):
    response = client.get("/fhir/Observation?subject:Patient.colour=x",
                          headers={**custodian_headers, "Prefer": "handling=lenient"})
    assert response.status_code == 200
    assert len(ids(response.get_json())) == 2


# -- _has -------------------------------------------------------------------------------------------


def test_has_finds_the_resources_referred_to_by_matching_ones(client, custodian_headers, families):
    found = ids(search(client, custodian_headers, "Patient?_has:Observation:patient:code=1234-5"))
    assert found == [families["flores"]["id"]]


def test_has_with_a_system_and_a_modifier(client, custodian_headers, families):
    assert ids(search(client, custodian_headers, f"Patient?_has:Observation:subject:code={LOINC}|8480-6")) == [
        families["other"]["id"]]
    assert ids(search(client, custodian_headers, "Patient?_has:Observation:patient:code:not=1234-5")) == [
        families["other"]["id"]]


def test_has_counts_each_referred_resource_once(client, custodian_headers, families):
    create(client, custodian_headers, observation(families["flores"]["id"], code="1234-5"))
    assert search(client, custodian_headers, "Patient?_has:Observation:patient:code=1234-5&_count=0")["total"] == 1


def test_has_ignores_deleted_referrers(client, custodian_headers, families):
    client.delete(f"/fhir/Observation/{families['flores_obs']['id']}", headers=custodian_headers)
    assert ids(search(client, custodian_headers, "Patient?_has:Observation:patient:code=1234-5")) == []


def test_nested_has_is_refused_naming_it(client, custodian_headers):
    name = "_has:Observation:patient:_has:AuditEvent:entity:agent"
    found = _refused(client, custodian_headers, f"Patient?{name}=x")
    assert found["code"] == "not-supported"
    assert name in found["diagnostics"]


@pytest.mark.parametrize("name", ["_has:Observation:patient", "_has:Foo:patient:code",
                                  "_has:Observation:code:code", "_has:Observation:colour:code",
                                  "_has:Observation:patient:colour", "_has:Encounter:service-provider:status"])
def test_a_malformed_has_is_400(client, custodian_headers, name):
    _refused(client, custodian_headers, f"Patient?{name}=x")
