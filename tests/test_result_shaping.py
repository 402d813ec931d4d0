"""Search result parameters on the custodian API: `_revinclude`, `_include:iterate`, `_elements`, `_summary`.

FHIR R4 search §3.1.1.5: `_revinclude` brings the resources that refer to the matches;
`:iterate` applies an include to included resources too (here for at most
1 + `search.ITERATE_DEPTH` hops); `_elements` and `_summary=true|text|data` return a subset of
each resource (mandatory elements kept) tagged SUBSETTED.
"""
from __future__ import annotations

from typing import Any

import pytest

from service.store import search as store_search
from tests.fhir_helpers import create, ids, issue, observation, patient, search

SUBSETTED = ("http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "SUBSETTED")
NARRATIVE = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">Ana</div>'}


def _resources(bundle: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


def _tags(resource: dict[str, Any]) -> set[tuple[str, str]]:
    return {(t["system"], t["code"]) for t in resource.get("meta", {}).get("tag", [])}


@pytest.fixture
def ana(client, custodian_headers) -> dict[str, Any]:
    """A patient with a narrative, a marital status and two Observations (one deleted later by some tests)."""
    made = create(client, custodian_headers, patient(family="Flores", given="Ana", gender="female",
                                                     birthDate="1980-01-02", text=NARRATIVE, maritalStatus={
                                                         "coding": [{"system": "http://terminology.hl7.org/"
                                                                               "CodeSystem/v3-MaritalStatus",
                                                                     "code": "M"}]}))
    made["observations"] = [create(client, custodian_headers, observation(made["id"], value=v))["id"]
                            for v in (120.0, 130.0)]
    return made


# -- _revinclude --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["Observation:subject", "Observation:patient", "Observation:subject:Patient"])
def test_revinclude_brings_the_resources_that_refer_to_each_match(client, custodian_headers, ana, value):
    other = create(client, custodian_headers, patient(family="Other"))
    create(client, custodian_headers, observation(other["id"], value=99.0))
    bundle = search(client, custodian_headers, f"Patient?_id={ana['id']}&_revinclude={value}")
    assert ids(bundle) == [ana["id"]]
    assert sorted(ids(bundle, "include")) == sorted(ana["observations"])


def test_revinclude_leaves_out_deleted_referrers(client, custodian_headers, ana):
    assert client.delete(f"/fhir/Observation/{ana['observations'][0]}", headers=custodian_headers).status_code \
        in (200, 204)
    bundle = search(client, custodian_headers, f"Patient?_id={ana['id']}&_revinclude=Observation:subject")
    assert ids(bundle, "include") == [ana["observations"][1]]


def test_revinclude_of_a_parameter_the_type_lacks_is_refused(client, custodian_headers, ana):
    response = client.get("/fhir/Patient?_revinclude=Observation:nope", headers=custodian_headers)
    assert response.status_code == 400
    assert issue(response)["expression"] == ["_revinclude"]


def test_revinclude_is_kept_in_the_paging_links(client, custodian_headers, ana):
    create(client, custodian_headers, patient(family="Flores", given="Bea"))
    bundle = search(client, custodian_headers, "Patient?family=Flores&_count=1&_revinclude=Observation:subject")
    following = next(link["url"] for link in bundle["link"] if link["relation"] == "next")
    assert "_revinclude=Observation:subject" in following


# -- _include:iterate -----------------------------------------------------------------------------------


def test_include_iterate_follows_the_included_resources_references(client, custodian_headers):
    organization = create(client, custodian_headers, {"resourceType": "Organization", "name": "Clinique du Parc"})
    owner = create(client, custodian_headers, patient(managingOrganization={
        "reference": f"Organization/{organization['id']}"}))
    measured = create(client, custodian_headers, observation(owner["id"]))
    bundle = search(client, custodian_headers, f"Observation?_id={measured['id']}&_include=Observation:subject"
                                               "&_include:iterate=Patient:organization")
    assert sorted(ids(bundle, "include")) == sorted([owner["id"], organization["id"]])


def test_include_iterate_stops_after_a_bounded_number_of_hops(client, custodian_headers):
    chain: list[str] = []
    for level in range(6):
        parent = {"partOf": {"reference": f"Organization/{chain[-1]}"}} if chain else {}
        chain.append(create(client, custodian_headers, {"resourceType": "Organization", "name": f"L{level}",
                                                         **parent})["id"])
    bottom = chain[-1]
    bundle = search(client, custodian_headers, f"Organization?_id={bottom}&_include:iterate=Organization:partof")
    hops = 1 + store_search.ITERATE_DEPTH
    assert sorted(ids(bundle, "include")) == sorted(chain[-1 - hops:-1])
    assert len(ids(bundle, "include")) == 3


def test_revinclude_iterate_and_include_iterate_together(client, custodian_headers, ana):
    bundle = search(client, custodian_headers, f"Observation?_id={ana['observations'][0]}"
                                               "&_include=Observation:subject&_revinclude:iterate=Observation:subject")
    assert sorted(ids(bundle, "include")) == sorted([ana["id"], ana["observations"][1]])


@pytest.mark.parametrize(("query", "expression"), [
    ("Observation?_include=Patient:organization", "_include"),  # another type without :iterate
    ("Observation?_include:deep=Observation:subject", "_include"),
    ("Observation?_include=Observation:subject:Nope", "_include"),
    ("Observation?_include=Observation:encounter:Patient", "_include"),
    ("Observation?_include=*", "_include"),
])
def test_a_malformed_include_is_refused_naming_it(client, custodian_headers, query, expression):
    response = client.get(f"/fhir/{query}", headers=custodian_headers)
    assert response.status_code == 400
    assert issue(response)["expression"] == [expression]


# -- _elements ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["gender", "resourceType,gender", "Patient.gender"])
def test_elements_returns_only_the_elements_asked_for_tagged_subsetted(client, custodian_headers, ana, value):
    found = _resources(search(client, custodian_headers, f"Patient?_id={ana['id']}&_elements={value}"), "match")
    assert set(found[0]) == {"resourceType", "id", "meta", "gender"}
    assert SUBSETTED in _tags(found[0])
    assert found[0]["meta"]["versionId"] == "1"


def test_elements_keeps_the_mandatory_elements(client, custodian_headers, ana):
    found = _resources(search(client, custodian_headers, f"Observation?_id={ana['observations'][0]}"
                                                         "&_elements=value"), "match")[0]
    assert set(found) == {"resourceType", "id", "meta", "status", "code", "valueQuantity"}  # status, code: 1..1


def test_elements_keeps_a_primitives_extensions(client, custodian_headers):
    made = create(client, custodian_headers, patient(birthDate="1970-01-01", _birthDate={"extension": [{
        "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": "1970-01-01T10:00:00Z"}]}))
    found = _resources(search(client, custodian_headers, f"Patient?_id={made['id']}&_elements=birthDate"), "match")
    assert set(found[0]) == {"resourceType", "id", "meta", "birthDate", "_birthDate"}


def test_elements_leaves_included_resources_whole(client, custodian_headers, ana):
    bundle = search(client, custodian_headers, f"Observation?_id={ana['observations'][0]}"
                                               "&_include=Observation:subject&_elements=status")
    included = _resources(bundle, "include")[0]
    assert included["name"] and SUBSETTED not in _tags(included)


@pytest.mark.parametrize("value", ["nope", "gender,nope", "Observation.status"])
def test_elements_naming_no_element_of_the_type_is_refused(client, custodian_headers, value):
    response = client.get(f"/fhir/Patient?_elements={value}", headers=custodian_headers)
    assert response.status_code == 400
    assert issue(response)["expression"] == ["_elements"]


# -- _summary -----------------------------------------------------------------------------------------


def test_summary_true_keeps_the_summary_elements_only(client, custodian_headers, ana):
    found = _resources(search(client, custodian_headers, f"Patient?_id={ana['id']}&_summary=true"), "match")[0]
    assert found["gender"] == "female" and found["name"] and found["birthDate"]
    assert "maritalStatus" not in found and "text" not in found  # neither is a summary element of Patient
    assert SUBSETTED in _tags(found)


def test_summary_true_on_observations_keeps_code_subject_and_value_not_category(client, custodian_headers, ana):
    found = _resources(search(client, custodian_headers, f"Observation?_id={ana['observations'][0]}"
                                                         "&_summary=true"), "match")[0]
    assert {"code", "subject", "effectiveDateTime", "valueQuantity", "status"} <= set(found)
    assert "category" not in found


def test_summary_text_keeps_the_narrative_and_mandatory_elements(client, custodian_headers, ana):
    found = _resources(search(client, custodian_headers, f"Patient?_id={ana['id']}&_summary=text"), "match")[0]
    assert set(found) == {"resourceType", "id", "meta", "text"}
    observation_text = _resources(search(client, custodian_headers, f"Observation?_id={ana['observations'][0]}"
                                                                    "&_summary=text"), "match")[0]
    assert set(observation_text) == {"resourceType", "id", "meta", "status", "code"}


def test_summary_data_leaves_out_the_narrative_only(client, custodian_headers, ana):
    full = _resources(search(client, custodian_headers, f"Patient?_id={ana['id']}"), "match")[0]
    found = _resources(search(client, custodian_headers, f"Patient?_id={ana['id']}&_summary=data"), "match")[0]
    assert set(full) - set(found) == {"text"}
    assert SUBSETTED in _tags(found)


def test_summary_false_returns_the_whole_resource_untagged(client, custodian_headers, ana):
    full = _resources(search(client, custodian_headers, f"Patient?_id={ana['id']}"), "match")[0]
    assert _resources(search(client, custodian_headers, f"Patient?_id={ana['id']}&_summary=false"), "match")[0] == full
    assert SUBSETTED not in _tags(full)


def test_summary_applies_to_included_resources_too(client, custodian_headers, ana):
    bundle = search(client, custodian_headers, f"Observation?_id={ana['observations'][0]}"
                                               "&_include=Observation:subject&_summary=true")
    assert "maritalStatus" not in _resources(bundle, "include")[0]


@pytest.mark.parametrize("query", ["_summary=bogus", "_summary=true&_elements=gender",
                                   "_elements=gender&_summary=data"])
def test_a_bad_summary_or_both_subsets_are_refused(client, custodian_headers, query):
    response = client.get(f"/fhir/Patient?{query}", headers=custodian_headers)
    assert response.status_code == 400
    assert issue(response)["expression"][0] in ("_summary", "_elements")


def test_summary_count_still_answers_the_total_only(client, custodian_headers, ana):
    bundle = search(client, custodian_headers, f"Patient?_id={ana['id']}&_summary=count")
    assert bundle["total"] == 1 and "entry" not in bundle
