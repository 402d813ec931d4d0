"""Result shaping on the research API, attacked: `_revinclude`, `:iterate`, `_elements`, `_summary`.

On the world of tests/gate_world.py (what project `open` must never carry is
`WITHHELD_FROM_OPEN`). Whatever an include brings goes through the consent filter and
de-identification exactly as a match does: a `_revinclude` never brings a withheld patient's
resource nor a withheld class, an `:iterate` cannot walk from released data to withheld data
through a resource both point at (an Encounter, a Practitioner), and a subset (`_elements`,
`_summary`) is taken of the de-identified resource, so it never holds an element
de-identification removed.
"""
from __future__ import annotations

from typing import Any

import pytest

from tests.fhir_helpers import create, observation
from tests.gate_world import World, build
from tests.test_gate import WITHHELD_FROM_OPEN, Researcher, _researcher, _resources

SUBSETTED = ("http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "SUBSETTED")


@pytest.fixture
def world_recipe():
    return _build


def _build(app, client, custodian_headers) -> World:
    """The gate world, with the refusing patient's data pointing at what a's released data points at too."""
    world = build(app, client, custodian_headers)
    for name, extra in (("b_in_routine_visit", {"encounter": world.ref("routine_visit")}),
                        ("b_by_doctor", {"performer": [world.ref("practitioner")]})):
        made = create(client, custodian_headers, observation(world.patients["b"], value=len(world.marker) + 900.0,
                                                             **extra))
        world.refs[name] = f"Observation/{made['id']}"
        world.marker[name] = len(world.marker) + 900.0
    return world


@pytest.fixture
def open_project(app, client, world) -> Researcher:
    return _researcher(app, client, world, world.open)


@pytest.fixture
def directory_project(app, client, world) -> Researcher:
    return _researcher(app, client, world, world.directory)


@pytest.fixture
def observations_project(app, client, world) -> Researcher:
    return _researcher(app, client, world, world.observations)


WITHHELD = (*WITHHELD_FROM_OPEN, "b_in_routine_visit", "b_by_doctor")


def _assert_nothing_withheld(researcher: Researcher, world: World, raw: bytes, withheld: tuple[str, ...]) -> None:
    for name in withheld:
        if name in world.refs:
            assert researcher.pseudonym(world.refs[name]).encode() not in raw, name
        if name in world.marker:
            assert f'"value":{world.marker[name]}'.encode() not in raw.replace(b" ", b""), name
    for real in world.patients.values():
        assert real.encode() not in raw


# -- includes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", [
    "Patient?_revinclude=Observation:subject&_count=100",
    "Patient?_revinclude=Observation:patient&_revinclude=Condition:subject&_revinclude=Encounter:subject&_count=100",
    "Encounter?_revinclude=Observation:encounter&_count=100",
    "Encounter?_revinclude=Condition:encounter&_revinclude:iterate=Observation:encounter&_count=100",
    "Observation?_include=Observation:encounter&_revinclude:iterate=Observation:encounter"
    "&_include:iterate=Observation:subject&_count=100",
    "Observation?_include=Observation:subject&_revinclude:iterate=Observation:subject"
    "&_revinclude:iterate=Condition:subject&_include:iterate=Condition:encounter&_count=100",
])
def test_includes_never_bring_withheld_data(open_project, world, query):
    response = open_project.get(f"/research/fhir/{query}")
    assert response.status_code == 200, response.get_json()
    assert _resources(response.get_json(), "include")  # the query does include something
    _assert_nothing_withheld(open_project, world, response.data, WITHHELD)


@pytest.mark.parametrize("query", [
    # Each reaches only withheld data: a's data points at the refusing patient and at their data.
    "Condition?_include=Condition:encounter&_revinclude:iterate=Observation:encounter"
    "&_include:iterate=Observation:performer&_include:iterate=Observation:based-on&_count=100",
    "Condition?_include=Condition:asserter&_revinclude:iterate=Observation:performer&_count=100",
    "Observation?_include=Observation:performer&_include=Observation:based-on"
    "&_revinclude:iterate=Observation:subject&_count=100",
])
def test_includes_through_withheld_data_bring_nothing(open_project, world, query):
    response = open_project.get(f"/research/fhir/{query}")
    assert response.status_code == 200, response.get_json()
    assert {r["resourceType"] for r in _resources(response.get_json(), "include")} <= {"Encounter"}
    _assert_nothing_withheld(open_project, world, response.data, WITHHELD)


def test_revinclude_brings_the_released_referrers_only(open_project, world):
    patient = open_project.pseudonym(f"Patient/{world.patients['a']}")
    body = open_project.search(f"Patient?_id={patient}&_revinclude=Observation:subject&_count=100")
    markers = sorted(o["valueQuantity"]["value"] for o in _resources(body, "include"))
    released = sorted(o["valueQuantity"]["value"] for o in _resources(open_project.search(
        f"Observation?subject=Patient/{patient}&_count=100"), "match"))
    assert markers == released and markers


def test_a_shared_encounter_does_not_bring_a_withheld_patients_observation(open_project, world):
    visit = open_project.reference(world.refs["routine_visit"])
    body = open_project.search(f"Encounter?_id={visit.split('/')[1]}&_revinclude=Observation:encounter")
    markers = {o["valueQuantity"]["value"] for o in _resources(body, "include")}
    assert markers == {world.marker["in_routine_visit"]}


def test_a_shared_practitioner_does_not_bring_a_withheld_patients_observation(directory_project, world):
    body = directory_project.search("Observation?_include=Observation:performer"
                                    "&_revinclude:iterate=Observation:performer&_include:iterate=Observation:subject"
                                    "&_count=100")
    included = _resources(body, "include")
    assert {r["resourceType"] for r in included} == {"Practitioner"}  # no Patient: not declared
    assert world.marker["b_by_doctor"] not in {o["valueQuantity"]["value"] for o in _resources(body, "match")}
    raw = directory_project.get("/research/fhir/Practitioner?_revinclude=Observation:performer&_count=100").data
    _assert_nothing_withheld(directory_project, world, raw, ("b", "b_obs", "b_by_doctor", "b_in_routine_visit"))


@pytest.mark.parametrize("query", ["Patient?_revinclude=Condition:subject",
                                   "Observation?_revinclude=Condition:asserter",
                                   "Observation?_include:iterate=Patient:general-practitioner",
                                   "Observation?_revinclude:iterate=Encounter:subject"])
def test_an_include_from_or_to_a_type_the_project_does_not_receive_is_refused(observations_project, query):
    response = observations_project.get(f"/research/fhir/{query}")
    assert response.status_code == 403


def test_include_iterate_is_kept_in_the_research_paging_links(open_project):
    body = open_project.search("Observation?_count=1&_include=Observation:subject"
                               "&_revinclude:iterate=Observation:subject")
    following = next(link["url"] for link in body["link"] if link["relation"] == "next")
    assert "_revinclude:iterate=Observation:subject" in following
    assert open_project.get(following).status_code == 200


def test_included_patients_are_audited_as_released(open_project, world, app):
    from sqlalchemy import select

    from service import db
    from service.audit import patients_named
    from service.store.schema import audit

    patient = open_project.pseudonym(f"Observation/{world.refs['a_plain'].split('/')[1]}")
    open_project.search(f"Observation?_id={patient}&_include=Observation:subject")
    with app.app_context(), db.read() as conn:
        seq = conn.execute(select(audit.c.seq).order_by(audit.c.seq.desc()).limit(1)).scalar_one()
        named = set(patients_named(conn, [seq])[seq])
    assert world.patients["a"] in named


# -- subsets ----------------------------------------------------------------------------------------


def _by_id(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{r['resourceType']}/{r['id']}": r for r in _resources(bundle, "match") + _resources(bundle, "include")}


def _within(subset: dict[str, Any], whole: dict[str, Any]) -> None:
    """Every element of `subset` is in `whole` with the same value (the SUBSETTED tag aside)."""
    for key, value in subset.items():
        assert key in whole, key
        if key == "meta":
            tags = [t for t in value.get("tag", []) if (t["system"], t["code"]) != SUBSETTED]
            assert {**value, "tag": tags} == {**whole["meta"], "tag": whole["meta"].get("tag", [])}
        else:
            assert value == whole[key], key


@pytest.mark.parametrize(("resource_type", "subset"), [
    ("Patient", "_elements=name,telecom,identifier,birthDate,address,generalPractitioner,managingOrganization,text"),
    ("Patient", "_elements=identifier,name"),
    ("Patient", "_summary=true"),
    ("Patient", "_summary=text"),
    ("Patient", "_summary=data"),
    ("Observation", "_elements=subject,performer,focus,derivedFrom,hasMember,encounter,note,specimen,basedOn"),
    ("Observation", "_summary=true&_include=Observation:subject&_include=Observation:encounter"),
    ("Observation", "_elements=performer&_include=Observation:subject&_revinclude:iterate=Observation:subject"),
    ("Condition", "_elements=asserter,evidence,note,subject,encounter"),
    ("Encounter", "_summary=true&_revinclude=Observation:encounter"),
])
def test_a_subset_holds_nothing_the_whole_research_resource_does_not(open_project, world, resource_type, subset):
    whole = _by_id(open_project.search(f"{resource_type}?_count=100&_include=Observation:subject"
                                       if resource_type == "Observation" else f"{resource_type}?_count=100"))
    for extra in ("&_include=Observation:subject", "&_include=Observation:encounter",
                  "&_revinclude=Observation:encounter", "&_revinclude:iterate=Observation:subject"):
        if extra.strip("&") in subset:
            whole.update(_by_id(open_project.search(f"{resource_type}?_count=100{extra}")))
    response = open_project.get(f"/research/fhir/{resource_type}?_count=100&{subset}")
    assert response.status_code == 200, response.get_json()
    shaped = _by_id(response.get_json())
    assert shaped
    for key, resource in shaped.items():
        _within(resource, whole[key])
    _assert_nothing_withheld(open_project, world, response.data, WITHHELD)
    assert all(name.encode() not in response.data for name in world.names)


def test_elements_on_research_is_tagged_and_keeps_the_pseudonymous_id(open_project, world):
    body = open_project.search("Patient?_elements=gender&_count=100")
    for patient in _resources(body, "match"):
        assert set(patient) == {"resourceType", "id", "meta", "gender"}
        assert SUBSETTED in {(t["system"], t["code"]) for t in patient["meta"]["tag"]}
        assert patient["id"] not in world.patients.values()


def test_elements_is_echoed_in_research_links(open_project):
    body = open_project.search("Patient?_elements=gender&_count=1")
    assert "_elements=gender" in next(link["url"] for link in body["link"] if link["relation"] == "self")


@pytest.mark.parametrize("query", ["Observation?_include=*", "Observation?_revinclude=Nope:subject",
                                   "Observation?_include:deep=Observation:subject", "Patient?_elements=nope",
                                   "Patient?_summary=true&_elements=gender"])
def test_a_malformed_shaping_parameter_is_refused_on_research_as_on_the_custodian_api(open_project, query):
    response = open_project.get(f"/research/fhir/{query}")
    assert response.status_code == 400, response.get_json()
