"""The research gate attacked: every path to withheld data answers as if it did not exist.

Issue 9, §2 and §4, on the world of tests/gate_world.py. Each test tries one way through:
an old version, an undeclared type, a reference to something withheld (in every element
position and through search, read, version read, `_include` and `$export`), a consent
outside its validity period. The pseudonyms an attacker would try are computed with the
project's key (`gate_world.pseudonym`), as if learnt from an earlier response.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient

from consent.projects import DIRECTORY_TYPES
from service.validation import validate
from tests.fhir_helpers import create, observation
from tests.gate_world import HIV, HYPERTENSION, World, build, condition, consent_to, pseudonym, utc_day
from tests.research_world import bearer, token

#: What project `open` must never carry, by world name: the refusing patient and their data,
#: a's sensitive data, data outside a data period or of an excluded class, deleted data, the
#: patients whose consent is not in force, and the directory it does not declare.
WITHHELD_FROM_OPEN = ("b", "b_obs", "b_service_request", "b_procedure", "b_specimen", "b_hiv", "hiv", "sensitive_visit",
                      "hiv_visit", "in_hiv_visit",
                      "recent_old", "excluded_class_visit", "deleted_target", "ended", "ended_obs", "future",
                      "future_obs", "practitioner", "organization")


@pytest.fixture
def world_recipe():
    return build


@dataclass
class Researcher:
    """A research partner holding a token of one project: what an attacker can ask for."""

    app: Flask
    client: FlaskClient
    world: World
    project_id: str
    headers: dict[str, str]

    def get(self, path: str):
        return self.client.get(path.replace("http://localhost", ""), headers=self.headers)

    def search(self, query: str) -> dict[str, Any]:
        response = self.get(f"/research/fhir/{query}")
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    def pseudonym(self, reference: str) -> str:
        """This project's pseudonym of a stored `Type/id`."""
        return pseudonym(self.app, self.project_id, reference)

    def reference(self, reference: str) -> str:
        """The released form of a reference to the stored `Type/id`: `Type/<pseudonym>`."""
        return f"{reference.split('/')[0]}/{self.pseudonym(reference)}"

    def read(self, reference: str, version: str | None = None):
        """Read (or version-read) the stored resource `Type/id` by its pseudonym."""
        return self.get(f"/research/fhir/{self.reference(reference)}" + (f"/_history/{version}" if version else ""))

    def released(self, name: str) -> dict[str, Any]:
        """The released form of the world's Observation `name`, found by its marker value."""
        found = [o for o in _resources(self.search("Observation?_count=100"))
                 if o["valueQuantity"]["value"] == self.world.marker[name]]
        assert len(found) == 1, f"{name} is not released once"
        return found[0]

    def export(self, worker: Any) -> dict[str, bytes]:
        """Run a system `$export` to completion; the raw NDJSON of each file by resource type."""
        self.app.config["EXPORT_POLL_SECONDS"] = 0
        kick = self.client.get("/research/fhir/$export", headers={**self.headers, "Prefer": "respond-async"})
        assert kick.status_code == 202, kick.get_json()
        worker.work()
        done = self.get(kick.headers["Content-Location"])
        assert done.status_code == 200, done.data
        return {item["type"]: self.get(item["url"]).data for item in done.get_json()["output"]}


def _researcher(app, client, world: World, project_id: str) -> Researcher:
    return Researcher(app, client, world, project_id, bearer(token(client, app, "research", project_id)))


@pytest.fixture
def open_project(app, client, world) -> Researcher:
    return _researcher(app, client, world, world.open)


@pytest.fixture
def observations_project(app, client, world) -> Researcher:
    return _researcher(app, client, world, world.observations)


@pytest.fixture
def directory_project(app, client, world) -> Researcher:
    return _researcher(app, client, world, world.directory)


def _resources(bundle: dict[str, Any], mode: str | None = None) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if mode is None or e["search"]["mode"] == mode]


def _lines(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in raw.splitlines()]


def _stored(client, headers: dict[str, str], resource: dict[str, Any]) -> str:
    """Create a resource through the custodian API; its real `Type/id`."""
    return f"{resource['resourceType']}/{create(client, headers, resource)['id']}"


def _update(client, headers: dict[str, str], reference: str, resource: dict[str, Any]) -> None:
    response = client.put(f"/fhir/{reference}", json={**resource, "id": reference.split("/")[1]}, headers=headers)
    assert response.status_code in (200, 201), response.get_json()  # 201: an update that re-creates


# -- old versions: each judged on its own patient, sensitivity and clinical date ------------


def test_an_old_version_coded_with_an_excluded_category_is_withheld(world, open_project, client,
                                                                     custodian_headers):
    reference = _stored(client, custodian_headers, condition(world.patients["a"], HIV))
    _update(client, custodian_headers, reference, condition(world.patients["a"], HYPERTENSION))
    assert open_project.read(reference).status_code == 200
    assert open_project.read(reference, "2").status_code == 200
    assert open_project.read(reference, "1").status_code == 404


def test_an_old_version_is_judged_on_its_own_content_not_the_current_ones(world, open_project, client,
                                                                           custodian_headers):
    reference = _stored(client, custodian_headers, condition(world.patients["a"], HYPERTENSION))
    _update(client, custodian_headers, reference, condition(world.patients["a"], HIV))
    assert open_project.read(reference).status_code == 404
    assert open_project.read(reference, "2").status_code == 404
    response = open_project.read(reference, "1")
    assert response.status_code == 200
    assert response.get_json()["code"]["coding"][0]["code"] == HYPERTENSION


def test_an_old_version_about_a_refusing_patient_is_withheld(world, open_project, client, custodian_headers):
    reference = _stored(client, custodian_headers, observation(world.patients["b"], value=801.0))
    _update(client, custodian_headers, reference, observation(world.patients["a"], value=802.0))
    current = open_project.read(reference)
    assert current.status_code == 200 and current.get_json()["valueQuantity"]["value"] == 802.0
    response = open_project.read(reference, "1")
    assert response.status_code == 404
    assert b"801" not in response.data


def test_an_old_version_outside_the_consented_data_period_is_withheld(world, open_project, client,
                                                                       custodian_headers):
    recent = world.patients["recent"]
    reference = _stored(client, custodian_headers, observation(recent, value=901.0, when="2019-06-01T10:00:00Z"))
    _update(client, custodian_headers, reference, observation(recent, value=902.0, when="2021-06-01T10:00:00Z"))
    assert open_project.read(reference).status_code == 200
    assert open_project.read(reference, "2").status_code == 200
    assert open_project.read(reference, "1").status_code == 404


def test_a_version_that_is_a_deletion_is_not_found(world, open_project, client, custodian_headers):
    reference = _stored(client, custodian_headers, observation(world.patients["a"], value=1001.0))
    assert client.delete(f"/fhir/{reference}", headers=custodian_headers).status_code in (200, 204)
    _update(client, custodian_headers, reference, observation(world.patients["a"], value=1002.0))
    assert open_project.read(reference, "3").status_code == 200
    response = open_project.read(reference, "2")
    assert response.status_code == 404
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_a_deleted_resource_is_not_found_by_read_or_version_read(world, open_project):
    assert open_project.read(world.refs["deleted_target"]).status_code == 404
    assert open_project.read(world.refs["deleted_target"], "1").status_code == 404


@pytest.mark.parametrize("version", ["0", "-1", "+1", "1.0", "1e0", "%C2%B2", "99999999999999999999"])
def test_a_version_id_that_names_no_version_is_not_found(world, open_project, version):
    response = open_project.read(world.refs["a_plain"], version)
    assert response.status_code == 404
    assert response.get_json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("spelling", ["01", "%D9%A1"])  # zero-padded; ARABIC-INDIC DIGIT ONE
def test_another_spelling_of_a_withheld_version_is_withheld_too(world, open_project, client, custodian_headers,
                                                                  spelling):
    reference = _stored(client, custodian_headers, condition(world.patients["a"], HIV))
    _update(client, custodian_headers, reference, condition(world.patients["a"], HYPERTENSION))
    assert open_project.read(reference, spelling).status_code == 404


def test_the_version_history_of_a_resource_is_not_listed(world, open_project, client, custodian_headers):
    reference = _stored(client, custodian_headers, condition(world.patients["a"], HIV))
    _update(client, custodian_headers, reference, condition(world.patients["a"], HYPERTENSION))
    response = open_project.get(f"/research/fhir/{open_project.reference(reference)}/_history")
    assert response.status_code in (404, 405)
    assert response.get_json()["resourceType"] == "OperationOutcome"
    assert HIV.encode() not in response.data


# -- project resource types -------------------------------------------------------------------


@pytest.mark.parametrize("include", ["Observation:patient", "Observation:subject:Patient", "Observation:encounter"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_an_include_of_a_type_the_project_does_not_receive_is_refused(world, observations_project, client,
                                                                       include, method):
    if method == "GET":
        response = observations_project.get(f"/research/fhir/Observation?_include={include}")
    else:
        response = client.post("/research/fhir/Observation/_search", data={"_include": include},
                               headers=observations_project.headers)
    assert response.status_code == 403
    assert response.get_json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("include", ["Observation:subject", "Observation:performer"])
def test_an_include_through_a_many_typed_parameter_carries_only_the_projects_types(world, observations_project,
                                                                                   include):
    body = observations_project.search(f"Observation?_include={include}&_count=100")
    assert {r["resourceType"] for r in _resources(body)} == {"Observation"}


@pytest.mark.parametrize("resource_type", ["Patient", "Encounter", "Condition", "Practitioner", "Organization"])
def test_a_search_of_a_type_the_project_does_not_receive_is_refused(world, observations_project, resource_type):
    assert observations_project.get(f"/research/fhir/{resource_type}").status_code == 403


def test_a_patient_is_not_readable_by_a_project_that_does_not_receive_patients(world, observations_project):
    assert observations_project.read(world.refs["a"]).status_code == 403


@pytest.mark.parametrize("element", ["subject", "encounter", "performer"])
def test_a_reference_to_a_type_the_project_does_not_receive_is_removed(world, observations_project, element):
    assert element not in observations_project.released("in_routine_visit")


def test_an_export_carries_only_the_projects_types(world, observations_project, export_worker):
    files = observations_project.export(export_worker)
    assert set(files) == {"Observation"}
    assert all("subject" not in o for o in _lines(files["Observation"]))


def test_an_export_of_a_type_the_project_does_not_receive_is_refused(world, observations_project, client):
    response = client.get("/research/fhir/$export?_type=Patient",
                          headers={**observations_project.headers, "Prefer": "respond-async"})
    assert response.status_code == 400


# -- directory types: released only to projects that declare them ----------------------------


@pytest.mark.parametrize("resource_type", DIRECTORY_TYPES)
def test_a_project_that_does_not_declare_a_directory_type_cannot_search_it(world, open_project, resource_type):
    assert open_project.get(f"/research/fhir/{resource_type}").status_code == 403


@pytest.mark.parametrize("name", ["practitioner", "organization"])
def test_a_project_that_does_not_declare_a_directory_type_cannot_read_it(world, open_project, name):
    assert open_project.read(world.refs[name]).status_code == 403


def test_references_to_undeclared_directory_types_are_removed(world, open_project):
    assert "performer" not in open_project.released("in_routine_visit")
    patients = _resources(open_project.search("Patient?_count=100"))
    assert all("generalPractitioner" not in p and "managingOrganization" not in p for p in patients)
    encounters = _resources(open_project.search("Encounter?_count=100"))
    assert all("participant" not in e and "serviceProvider" not in e for e in encounters)


@pytest.mark.parametrize("query", ["Observation?_include=Observation:performer",
                                   "Encounter?_include=Encounter:participant",
                                   "Patient?_include=Patient:general-practitioner"])
def test_an_include_carries_no_undeclared_directory_type(world, open_project, query):
    body = open_project.search(f"{query}&_count=100")
    assert not {r["resourceType"] for r in _resources(body)} & set(DIRECTORY_TYPES)


def test_an_export_carries_no_undeclared_directory_type(world, open_project, export_worker):
    assert not set(open_project.export(export_worker)) & set(DIRECTORY_TYPES)


def test_a_project_that_declares_practitioner_receives_practitioners_and_no_other_directory_type(
        world, directory_project):
    practitioners = _resources(directory_project.search("Practitioner"))
    assert [p["id"] for p in practitioners] == [directory_project.pseudonym(world.refs["practitioner"])]
    assert "name" not in practitioners[0]
    assert directory_project.get("/research/fhir/Organization").status_code == 403


def test_a_reference_to_a_declared_directory_type_is_kept_and_readable(world, directory_project):
    performers = [p["reference"] for p in directory_project.released("in_routine_visit")["performer"]]
    assert performers == [directory_project.reference(world.refs["practitioner"])]
    assert directory_project.get(f"/research/fhir/{performers[0]}").status_code == 200


def test_an_include_carries_a_declared_directory_type_only(world, directory_project):
    body = directory_project.search("Observation?_include=Observation:performer&_count=100")
    assert [r["resourceType"] for r in _resources(body, "include")] == ["Practitioner"]


# -- the research CapabilityStatement says only what the research API does ------------------


def test_research_metadata_advertises_no_version_history(client):
    body = client.get("/research/fhir/metadata").get_json()
    interactions = {i["code"] for r in body["rest"][0]["resource"] for i in r["interaction"]}
    assert "history-instance" not in interactions and "history-type" not in interactions
    assert "vread" in interactions


def test_research_metadata_advertises_no_sort(client):
    rest = client.get("/research/fhir/metadata").get_json()["rest"][0]
    names = {p["name"] for p in rest.get("searchParam", [])}
    names |= {p["name"] for r in rest["resource"] for p in r.get("searchParam", [])}
    assert "_sort" not in names


# -- references to withheld resources are removed, by every path ----------------------------


def test_a_reference_to_a_withheld_sensitive_encounter_is_removed(world, open_project):
    response = open_project.get("/research/fhir/Observation?_count=100")
    released = next(o for o in _resources(response.get_json())
                    if o["valueQuantity"]["value"] == world.marker["in_sensitive_visit"])
    assert "encounter" not in released
    assert open_project.pseudonym(world.refs["sensitive_visit"]).encode() not in response.data


def test_a_removed_reference_leaves_no_type_or_display_behind(world, open_project):
    assert "encounter" not in open_project.released("typed_sensitive_visit")


@pytest.mark.parametrize("element", ["performer", "focus", "hasMember", "derivedFrom", "basedOn", "partOf",
                                     "specimen"])
def test_a_reference_to_a_refusing_patients_data_is_removed(world, open_project, element):
    assert element not in open_project.released("crossing")


def test_references_to_a_refusing_patient_inside_backbone_elements_are_removed(world, open_project):
    response = open_project.read(world.refs["asserted_by_b"])
    released = response.get_json()
    assert "asserter" not in released
    assert all("detail" not in evidence for evidence in released.get("evidence", []))
    for name in ("b", "b_obs"):
        assert open_project.pseudonym(world.refs[name]).encode() not in response.data


def test_a_reference_to_another_patients_withheld_condition_is_removed_and_the_resource_stays_valid(
        world, open_project):
    response = open_project.read(world.refs["routine_visit"])
    assert response.status_code == 200
    released = response.get_json()
    assert "reasonReference" not in released
    assert all("reference" not in d["condition"] for d in released.get("diagnosis", []))
    assert open_project.pseudonym(world.refs["b_hiv"]).encode() not in response.data
    validate(released, "Encounter")


def test_a_visit_for_an_excluded_category_is_withheld_with_what_was_measured_during_it(world, open_project):
    assert open_project.read(world.refs["hiv_visit"]).status_code == 404
    assert world.marker["in_hiv_visit"] not in [o["valueQuantity"]["value"] for o in
                                                _resources(open_project.search("Observation?_count=100"))]


def test_a_reference_to_a_resource_of_an_excluded_class_is_removed(world, open_project):
    assert "encounter" not in open_project.released("no_encounters_obs")


def test_a_reference_to_data_outside_the_data_period_is_removed(world, open_project):
    assert "derivedFrom" not in open_project.released("recent_new")


def test_a_reference_to_a_deleted_resource_is_removed(world, open_project):
    assert "derivedFrom" not in open_project.released("points_at_deleted")


def test_a_reference_to_a_released_resource_is_kept_and_readable(world, open_project):
    encounter = open_project.released("in_routine_visit")["encounter"]["reference"]
    assert encounter == open_project.reference(world.refs["routine_visit"])
    assert open_project.get(f"/research/fhir/{encounter}").status_code == 200


@pytest.mark.parametrize(("name", "element"), [("in_sensitive_visit", "encounter"), ("crossing", "performer")])
def test_withheld_references_are_removed_in_a_version_read(world, open_project, name, element):
    response = open_project.read(world.refs[name], "1")
    assert response.status_code == 200
    assert element not in response.get_json()


def test_withheld_references_are_removed_in_included_resources(world, open_project):
    response = open_project.get("/research/fhir/Observation?_include=Observation:encounter&_count=100")
    included = _resources(response.get_json(), "include")
    assert [e["resourceType"] for e in included] == ["Encounter"]
    assert "reasonReference" not in included[0]
    assert open_project.pseudonym(world.refs["b_hiv"]).encode() not in response.data


def test_withheld_references_are_removed_in_an_export(world, open_project, export_worker):
    files = open_project.export(export_worker)
    observations = {o["valueQuantity"]["value"]: o for o in _lines(files["Observation"])}
    assert "encounter" not in observations[world.marker["in_sensitive_visit"]]
    assert "performer" not in observations[world.marker["crossing"]]
    for name in ("sensitive_visit", "b", "b_obs"):
        assert all(open_project.pseudonym(world.refs[name]).encode() not in raw for raw in files.values()), name


@pytest.mark.parametrize(("parameter", "name"), [("encounter", "sensitive_visit"), ("performer", "b")])
def test_a_search_by_a_withheld_reference_finds_nothing(world, open_project, parameter, name):
    found = open_project.search(f"Observation?{parameter}={open_project.reference(world.refs[name])}")
    assert _resources(found) == []


def test_a_versioned_reference_to_a_withheld_version_is_removed(world, open_project, client, custodian_headers):
    a = world.patients["a"]
    target = _stored(client, custodian_headers, condition(a, HIV))
    _update(client, custodian_headers, target, condition(a, HYPERTENSION))
    create(client, custodian_headers, observation(a, value=1101.0, derivedFrom=[
        {"reference": f"{target}/_history/1"}]))
    world.marker["versioned"] = 1101.0
    assert "derivedFrom" not in open_project.released("versioned")


def test_a_versioned_reference_to_a_released_version_is_kept_and_one_to_no_stored_version_removed(
        world, open_project, client, custodian_headers):
    a = world.patients["a"]
    target = _stored(client, custodian_headers, condition(a, HYPERTENSION))
    _update(client, custodian_headers, target, {**condition(a, HYPERTENSION), "note": [{"text": "revised"}]})
    create(client, custodian_headers, observation(a, value=1102.0, derivedFrom=[
        {"reference": f"{target}/_history/1"}, {"reference": f"{target}/_history/7"}]))
    world.marker["versioned_released"] = 1102.0
    assert open_project.released("versioned_released")["derivedFrom"] == [
        {"reference": f"{open_project.reference(target)}/_history/1"}]


# -- _include with cross-patient references ----------------------------------------------------


@pytest.mark.parametrize("query", ["Observation?_include=Observation:performer",
                                   "Observation?_include=Observation:performer:Patient",
                                   "Condition?_include=Condition:asserter"])
def test_an_include_carries_no_refusing_patient(world, open_project, query):
    response = open_project.get(f"/research/fhir/{query}&_count=100")
    assert response.status_code == 200
    assert _resources(response.get_json(), "include") == []
    assert open_project.pseudonym(world.refs["b"]).encode() not in response.data


# -- the consent's validity period -------------------------------------------------------------


@pytest.mark.parametrize("role", ["ended", "future"])
def test_a_consent_outside_its_validity_period_releases_nothing(world, open_project, role):
    markers = [o["valueQuantity"]["value"] for o in _resources(open_project.search("Observation?_count=100"))]
    assert world.marker[f"{role}_obs"] not in markers
    assert open_project.read(world.refs[role]).status_code == 404


def test_a_consent_within_its_validity_period_releases(app, world, open_project):
    consent_to(app, world.patients["ended"], world.open, "record", period={"start": utc_day(-1), "end": utc_day(1)})
    assert open_project.released("ended_obs")["valueQuantity"]["value"] == world.marker["ended_obs"]


# -- nothing identifying or withheld in any raw response ----------------------------------------


def _every_response(researcher: Researcher, worker: Any) -> bytes:
    """Raw bodies of every search, include, read, version read and export file a project gets."""
    bodies = []
    for resource_type in ("Observation", "Patient", "Encounter", "Condition", "Practitioner", "Organization"):
        response = researcher.get(f"/research/fhir/{resource_type}?_count=100")
        bodies.append(response.data)
        for resource in _resources(response.get_json()) if response.status_code == 200 else []:
            path = f"/research/fhir/{resource_type}/{resource['id']}"
            bodies += [researcher.get(path).data, researcher.get(f"{path}/_history/1").data]
    for include in ("performer", "subject", "patient", "encounter", "based-on"):
        bodies.append(researcher.get(f"/research/fhir/Observation?_include=Observation:{include}&_count=100").data)
    bodies += researcher.export(worker).values()
    return b"\n".join(bodies)


@pytest.mark.parametrize("project", ["open", "observations", "directory"])
def test_no_real_id_name_or_withheld_pseudonym_appears_in_any_response(app, client, world, export_worker, project):
    researcher = _researcher(app, client, world, getattr(world, project))
    raw = _every_response(researcher, export_worker)
    for reference in world.refs.values():
        assert reference.split("/")[1].encode() not in raw, reference
    for name in world.names:
        assert name.encode() not in raw, name
    withheld = set(WITHHELD_FROM_OPEN)
    if project != "open":  # no Patient, Encounter or Condition at all
        withheld |= {"a", "routine_visit", "asserted_by_b"}
    if project == "directory":
        withheld.discard("practitioner")
    for name in sorted(withheld):
        assert researcher.pseudonym(world.refs[name]).encode() not in raw, name
