"""Chains, `_has`, `_count=0` totals and the new modifiers on /research/fhir, attacked.

On the world of tests/gate_world.py (project `open`: patient `a` consents excluding HIV and
sexual health, `b` refuses). A chain or `_has` reaches other resources: each reached resource
must itself pass the consent filter, so nothing withheld can make a released resource match
(or not match), nor change a total. Identifying values (names, identifiers, telecom, dates,
display text) cannot be probed through a chain, `_has` or a modifier: those are refused.
Each attack is first shown to find something on the custodian API, so an empty research
answer means the gate held, not that the query was wrong.
"""
from __future__ import annotations

from typing import Any

import pytest

from tests.fhir_helpers import ids, search
from tests.gate_world import CHECK_UP, HIV, SEXUAL_HEALTH_VISIT, SNOMED, World, build, consent_to, pseudonym
from tests.research_world import bearer, token
from tests.test_export import _files, _manifest, _markers


@pytest.fixture
def world_recipe():
    return build


@pytest.fixture
def researcher(app, client, world) -> dict[str, str]:
    """Headers of a research client of project `open`."""
    return bearer(token(client, app, "research", world.open))


def _research(client, headers, query: str) -> dict[str, Any]:
    response = client.get(f"/research/fhir/{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def _values(bundle: dict[str, Any]) -> list[float]:
    return sorted(e["resource"]["valueQuantity"]["value"] for e in bundle.get("entry", [])
                  if e["resource"]["resourceType"] == "Observation")


def _total(client, headers, query: str) -> int:
    body = _research(client, headers, f"{query}{'&' if '?' in query else '?'}_count=0")
    assert "entry" not in body
    return body["total"]


def _real_id(world: World, name: str) -> str:
    return world.refs[name].split("/")[1]


# -- _count=0 --------------------------------------------------------------------------------------


def test_count_zero_totals_only_what_the_project_may_see(client, world, researcher):
    visible = _research(client, researcher, "Observation?_count=100")
    assert _total(client, researcher, "Observation") == len(visible["entry"])


def test_count_zero_total_drops_a_patient_who_withdraws(app, client, world, researcher):
    before = _total(client, researcher, "Observation")
    consent_to(app, world.patients["a"], world.open, "none")
    a_markers = {201.0, 202.0, 203.0, 204.0, 206.0, 207.0}
    assert _total(client, researcher, "Observation") == before - len(a_markers & set(world.marker.values()))


# -- chains reach only released resources -----------------------------------------------------------


def test_a_chain_does_not_match_through_a_withheld_target(client, custodian_headers, world, researcher):
    """a's Observations point at b's sexual-health visit; b refuses: the visit reaches nothing."""
    query = f"Observation?encounter:Encounter.type={SNOMED}|{SEXUAL_HEALTH_VISIT}"
    assert len(ids(search(client, custodian_headers, query))) == 2
    assert _values(_research(client, researcher, query)) == []
    assert _total(client, researcher, query) == 0


def test_a_chain_matches_only_through_released_targets(client, custodian_headers, world, researcher):
    """Three visits are check-ups; only the routine one is released (HIV data, an excluded class)."""
    query = f"Observation?encounter:Encounter.type={SNOMED}|{CHECK_UP}"
    assert len(ids(search(client, custodian_headers, query))) == 3
    assert _values(_research(client, researcher, query)) == [world.marker["in_routine_visit"]]


def test_a_chain_does_not_match_a_released_resource_through_a_refusing_patient(client, custodian_headers, world,
                                                                                 researcher):
    """a's `crossing` Observation names b as performer: b's own data decides nothing for the project."""
    query = "Observation?performer:Patient.gender=female"
    assert ids(search(client, custodian_headers, query)) == [_real_id(world, "crossing")]
    assert _values(_research(client, researcher, query)) == []


def test_a_chain_total_is_the_total_of_released_targets(app, client, world, researcher):
    everyone = _total(client, researcher, "Observation")
    assert _total(client, researcher, "Observation?subject:Patient.gender=female") == everyone
    consent_to(app, world.patients["a"], world.open, "none")
    assert _total(client, researcher, "Observation?subject:Patient.gender=female") == _total(
        client, researcher, "Observation")


def test_a_chain_in_a_type_filter_exports_only_through_released_targets(app, client, world, researcher,
                                                                        export_worker):
    query = f"Observation%3Fencounter%3AEncounter.type%3D{SNOMED}%7C{CHECK_UP}"
    manifest = _manifest(app, client, export_worker, researcher,
                         f"/research/fhir/$export?_type=Observation&_typeFilter={query}")
    assert _markers(_files(client, manifest, researcher)["Observation"]) == [world.marker["in_routine_visit"]]


# -- _has reaches only released resources -----------------------------------------------------------


def test_has_does_not_reveal_a_withheld_diagnosis(client, custodian_headers, world, researcher):
    """a's HIV Condition is withheld (a excludes HIV) and b refuses: no patient has it for the project."""
    query = f"Patient?_has:Condition:subject:code={SNOMED}|{HIV}"
    assert sorted(ids(search(client, custodian_headers, query))) == sorted(
        [world.patients["a"], world.patients["b"]])
    assert _research(client, researcher, query).get("entry", []) == []
    assert _total(client, researcher, query) == 0


def test_has_does_not_reveal_a_refusing_patients_data(client, custodian_headers, world, researcher):
    query = f"Patient?_has:Observation:patient:value-quantity={world.marker['b_obs']}"
    assert ids(search(client, custodian_headers, query)) == [world.patients["b"]]
    assert _total(client, researcher, query) == 0


def test_has_finds_a_consenting_patient_by_released_data(app, client, world, researcher):
    query = f"Patient?_has:Observation:patient:value-quantity={world.marker['a_plain']}"
    found = _research(client, researcher, query)["entry"]
    assert [e["resource"]["id"] for e in found] == [pseudonym(app, world.open, world.refs["a"])]


def test_has_stops_matching_when_the_patient_withdraws(app, client, world, researcher):
    query = f"Patient?_has:Observation:patient:value-quantity={world.marker['a_plain']}"
    consent_to(app, world.patients["a"], world.open, "none")
    assert _total(client, researcher, query) == 0


def test_has_by_pseudonym_finds_only_released_referrers(app, client, world, researcher):
    released = pseudonym(app, world.open, world.refs["a_plain"])
    withheld = pseudonym(app, world.open, world.refs["b_obs"])
    assert _total(client, researcher, f"Patient?_has:Observation:patient:_id={released}") == 1
    assert _total(client, researcher, f"Patient?_has:Observation:patient:_id={withheld}") == 0


# -- identifying values cannot be probed ------------------------------------------------------------


@pytest.mark.parametrize("query", [
    "Observation?subject:Patient.name=GateAFamily", "Observation?subject:Patient.family=GateA",
    "Observation?subject:Patient.given=Hidden", "Observation?subject:Patient.identifier=x",
    "Observation?subject:Patient.birthdate=1961", "Observation?subject:Patient.phone=1",
    "Observation?subject:Patient.email=a@b", "Observation?subject:Patient.telecom=1",
    "Observation?subject:Patient.address-city=Paris", "Observation?subject:Patient._lastUpdated=gt2000",
    "Observation?patient:Patient.name=GateAFamily", "Patient?general-practitioner:Practitioner.name=Gate",
    "Patient?_has:Observation:patient:date=2021", "Patient?_has:Observation:patient:_lastUpdated=gt2000",
    "Patient?_has:Observation:patient:_security=x", "Observation?subject:Patient.identifier:of-type=a|MR|1",
    "Observation?code:text=blood", "Patient?_has:Observation:patient:code:text=blood",
    "Observation?subject:Patient.language:text=fr", "Observation?subject:identifier=urn:mrn|1",
    "Observation?patient:identifier=1", "Patient?identifier:of-type=a|MR|1",
    "Observation?encounter:missing=true", "Observation?subject:Patient.general-practitioner:missing=false",
])
def test_identifying_probes_are_refused(client, world, researcher, query):
    response = client.get(f"/research/fhir/{query}", headers=researcher)
    assert response.status_code == 403, response.get_json()
    assert response.get_json()["issue"][0]["code"] == "forbidden"


@pytest.mark.parametrize("query", ["Observation?subject:Patient.gender=female",
                                   "Observation?encounter:Encounter.status=finished",
                                   "Patient?_has:Condition:subject:code=1"])
def test_a_chain_or_has_to_a_type_the_project_does_not_receive_is_refused(app, client, world, query):
    observations_only = bearer(token(client, app, "research", world.observations))
    response = client.get(f"/research/fhir/{query}", headers=observations_only)
    assert response.status_code == 403, response.get_json()


def test_an_untyped_chain_is_refused_asking_for_the_type(client, world, researcher):
    response = client.get("/research/fhir/Observation?subject.gender=female", headers=researcher)
    assert response.status_code == 400
    assert "subject:Type.gender" in response.get_json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize("query", ["Observation?subject:Patient.general-practitioner.name=x",
                                   "Patient?_has:Observation:patient:_has:Condition:subject:code=1"])
def test_deeper_chains_and_nested_has_are_refused(client, world, researcher, query):
    response = client.get(f"/research/fhir/{query}", headers=researcher)
    assert response.status_code in (400, 403)
