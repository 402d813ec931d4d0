"""Conformance: the FHIR clients people use, against a live server, over the calls they make.

fhirpy (its sync and its async client) and fhirclient (SMART on FHIR) speak HTTP to the
application served on a loopback port (`base_url`), on SQLite and on PostgreSQL. Each test
drives the library's own call, so the request on the wire is the one the library builds
(read in its source): fhirpy's `count()` sends `_count=0&_totalMethod=count`;
`get_or_create()` POSTs the resource with the search on the POST URL; a search set's
`update()`/`delete()` send `PUT`/`DELETE Type?search`; `elements()` adds `id` and
`resourceType` to `_elements`; fhirclient builds chains from `{"$type": …}` and posts a
transaction Bundle to the base URL.

The research API is driven through fhirpy with a research project's token: read and search
only, pseudonymised, no identifying element.
"""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import requests
from fhirclient import client as smart_client
from fhirclient.models.bundle import Bundle as SmartBundle
from fhirclient.models.observation import Observation as SmartObservation
from fhirclient.models.patient import Patient as SmartPatient
from fhirpy import AsyncFHIRClient, SyncFHIRClient
from fhirpy.base.exceptions import ForbiddenError, MultipleResourcesFound, OperationOutcome, ResourceNotFound
from fhirpy.base.searchset import Raw

from tests.research_world import World

T = TypeVar("T")

SYSTOLIC = "http://loinc.org|8480-6"
HEART_RATE = "http://loinc.org|8867-4"
MRN = "urn:oid:1.2.250.1.71.4.2.1"
SUBSETTED = ("http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "SUBSETTED")


@dataclass(frozen=True)
class Server:
    """A running server and a custodian's bearer token for it."""

    base: str
    token: str

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"

    @property
    def authorization(self) -> str:
        return f"Bearer {self.token}"

    def fhirpy(self, **headers: str) -> SyncFHIRClient:
        return SyncFHIRClient(self.fhir, authorization=self.authorization, extra_headers=headers or None,
                              requests_config={"timeout": 30})

    def async_fhirpy(self) -> AsyncFHIRClient:
        return AsyncFHIRClient(self.fhir, authorization=self.authorization)

    def smart(self) -> smart_client.FHIRClient:
        """fhirclient prepared from the CapabilityStatement, signing with a token obtained elsewhere."""
        smart = smart_client.FHIRClient(settings={"app_id": "conformance", "api_base": self.fhir})
        smart.prepare()
        smart.server.auth.access_token = self.token
        assert smart.ready
        return smart

    def get(self, path: str) -> requests.Response:
        """A plain GET, to check what a client's call left on the server."""
        return requests.get(f"{self.fhir}/{path}", timeout=30,
                            headers={"Authorization": self.authorization, "Accept": "application/fhir+json"})


@pytest.fixture
def server(base_url: str, custodian_token: str) -> Server:
    return Server(base_url, custodian_token)


@dataclass(frozen=True)
class Seeded:
    """Three patients (ids by key) and, per patient, a systolic blood pressure and a heart rate."""

    patients: dict[str, str]
    observations: dict[str, list[str]]


PEOPLE = {
    "ana": {"family": "Flores", "given": "Ana", "gender": "female", "birthDate": "1970-05-01"},
    "luis": {"family": "Flores", "given": "Luis", "gender": "male", "birthDate": "1990-07-02"},
    "paul": {"family": "Martin", "given": "Paul", "gender": "male", "birthDate": "1980-01-03"},
}


def _patient(fhir: SyncFHIRClient, key: str) -> Any:
    person = PEOPLE[key]
    return fhir.resource("Patient", identifier=[{"system": MRN, "value": key}],
                         name=[{"family": person["family"], "given": [person["given"]]}],
                         gender=person["gender"], birthDate=person["birthDate"])


def _observation(fhir: SyncFHIRClient, patient_id: str, code: str, value: float) -> Any:
    system, _, code_value = code.partition("|")
    return fhir.resource("Observation", status="final", code={"coding": [{"system": system, "code": code_value}]},
                         subject={"reference": f"Patient/{patient_id}"}, effectiveDateTime="2024-03-04T10:00:00Z",
                         valueQuantity={"value": value, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org",
                                        "code": "mm[Hg]"})


def _seed(server: Server) -> Seeded:
    fhir = server.fhirpy()
    patients: dict[str, str] = {}
    observations: dict[str, list[str]] = {}
    for n, key in enumerate(PEOPLE):
        patient = _patient(fhir, key)
        patient.save()
        patients[key] = patient.id
        made = [_observation(fhir, patient.id, SYSTOLIC, 120.0 + n),
                _observation(fhir, patient.id, HEART_RATE, 60.0 + n)]
        for observation in made:
            observation.save()
        observations[key] = [o.id for o in made]
    return Seeded(patients, observations)


@pytest.fixture
def seeded(server: Server) -> Seeded:
    return _seed(server)


def _entries(bundle: dict[str, Any], mode: str | None = None) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if mode is None or e["search"]["mode"] == mode]


def _ids(resources: Any) -> set[str]:
    return {r["id"] for r in resources}


# -- fhirpy (sync): create, read, update, delete -------------------------------------------------


def test_fhirpy_create_read_update_delete(server: Server):
    fhir = server.fhirpy()
    patient = _patient(fhir, "ana")
    patient.save()
    assert patient["meta"]["versionId"] == "1"
    assert fhir.reference("Patient", patient.id).to_resource()["gender"] == "female"
    patient["gender"] = "other"
    patient.save()
    assert patient["meta"]["versionId"] == "2"
    assert fhir.get("Patient", patient.id)["gender"] == "other"
    patient.delete()
    with pytest.raises(ResourceNotFound):
        fhir.get("Patient", patient.id)


def test_fhirpy_asking_for_fhir_version_4_0_is_served(server: Server, seeded: Seeded):
    fhir = server.fhirpy(Accept="application/fhir+json; fhirVersion=4.0")
    assert fhir.get("Patient", seeded.patients["ana"])["id"] == seeded.patients["ana"]
    assert len(fhir.resources("Patient").fetch()) == 3


def test_fhirpy_reads_an_earlier_version(server: Server):
    fhir = server.fhirpy()
    patient = _patient(fhir, "ana")
    patient.save()
    patient["gender"] = "other"
    patient.save()
    first = fhir.reference("Patient", patient.id).execute("_history/1", method="get")
    assert (first["meta"]["versionId"], first["gender"]) == ("1", "female")


def test_fhirpy_refresh_reloads_the_current_version(server: Server):
    fhir = server.fhirpy()
    patient = _patient(fhir, "ana")
    patient.save()
    stale = fhir.reference("Patient", patient.id).to_resource()
    patient["gender"] = "other"
    patient.save()
    assert stale.refresh()["gender"] == "other"


def test_fhirpy_put_with_a_new_id_creates_the_resource(server: Server):
    fhir = server.fhirpy()
    patient = _patient(fhir, "ana")
    patient["id"] = "chosen-by-client"
    patient.save()
    assert fhir.get("Patient", "chosen-by-client")["meta"]["versionId"] == "1"


# -- fhirpy (sync): search -------------------------------------------------------------------------


def test_fhirpy_search_combines_several_parameters(server: Server, seeded: Seeded):
    found = server.fhirpy().resources("Patient").search(family="Flores", gender="male", birthdate__ge="1985").fetch()
    assert _ids(found) == {seeded.patients["luis"]}


def test_fhirpy_search_with_a_token_and_a_reference(server: Server, seeded: Seeded):
    found = server.fhirpy().resources("Observation").search(
        code=SYSTOLIC, subject=f"Patient/{seeded.patients['paul']}").fetch_all()
    assert _ids(found) == {seeded.observations["paul"][0]}


def test_fhirpy_search_sorts(server: Server, seeded: Seeded):
    found = server.fhirpy().resources("Patient").sort("-birthdate").fetch()
    assert [p.id for p in found] == [seeded.patients[k] for k in ("luis", "paul", "ana")]


def test_fhirpy_first_and_get(server: Server, seeded: Seeded):
    patients = server.fhirpy().resources("Patient")
    assert patients.search(identifier=f"{MRN}|paul").get().id == seeded.patients["paul"]
    assert patients.search(family="Nobody").first() is None
    with pytest.raises(MultipleResourcesFound):
        patients.search(family="Flores").get()


def test_fhirpy_follows_next_links_to_the_last_page(server: Server, seeded: Seeded):
    search = server.fhirpy().resources("Observation").limit(2)
    first_page = search.fetch_raw()
    assert len(first_page["entry"]) == 2
    assert any(link["relation"] == "next" for link in first_page["link"])
    every = search.fetch_all()
    assert sorted(o.id for o in every) == sorted(i for ids in seeded.observations.values() for i in ids)


def test_fhirpy_summary_count_gives_the_total_and_no_entries(server: Server, seeded: Seeded):
    bundle = server.fhirpy().resources("Observation").search(code=SYSTOLIC, _summary="count").fetch_raw()
    assert bundle["total"] == 3
    assert "entry" not in bundle


def test_fhirpy_search_by_id_and_last_updated(server: Server, seeded: Seeded):
    fhir = server.fhirpy()
    two = f"{seeded.patients['ana']},{seeded.patients['paul']}"
    assert _ids(fhir.resources("Patient").search(_id=two).fetch()) == {seeded.patients["ana"], seeded.patients["paul"]}
    stamp = fhir.get("Patient", seeded.patients["paul"])["meta"]["lastUpdated"]
    assert fhir.resources("Patient").search(_lastUpdated__gt=stamp).fetch() == []  # Paul was the last one
    assert seeded.patients["paul"] in _ids(fhir.resources("Patient").search(_lastUpdated__ge=stamp).fetch())


def test_fhirpy_string_modifiers(server: Server, seeded: Seeded):
    patients = server.fhirpy().resources("Patient")
    assert len(patients.search(name__contains="lor").fetch()) == 2
    assert patients.search(family__exact="flores").fetch() == []
    assert len(patients.search(family__exact="Flores").fetch()) == 2


def test_fhirpy_token_not_modifier(server: Server, seeded: Seeded):
    found = server.fhirpy().resources("Patient").search(gender__not="male").fetch()
    assert _ids(found) == {seeded.patients["ana"]}


def test_fhirpy_boolean_false_matches_resources_without_the_element(server: Server, seeded: Seeded):
    found = server.fhirpy().resources("Patient").search(deceased=False).fetch()
    assert _ids(found) == set(seeded.patients.values())


def test_fhirpy_token_text_modifier_searches_the_display(server: Server):
    fhir = server.fhirpy()
    observation = fhir.resource("Observation", status="final", code={"coding": [
        {"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"}]})
    observation.save()
    found = fhir.resources("Observation").search(code__text="systolic").fetch()
    assert _ids(found) == {observation.id}


def test_fhirpy_identifier_of_type_modifier(server: Server):
    fhir = server.fhirpy()
    v2 = "http://terminology.hl7.org/CodeSystem/v2-0203"
    patient = fhir.resource("Patient", identifier=[{"type": {"coding": [{"system": v2, "code": "MR"}]},
                                                    "system": MRN, "value": "typed"}])
    patient.save()
    found = fhir.resources("Patient").search(identifier__of_type=f"{v2}|MR|typed").fetch()
    assert _ids(found) == {patient.id}


def test_fhirpy_reference_identifier_modifier(server: Server, seeded: Seeded):
    fhir = server.fhirpy()
    observation = fhir.resource("Observation", status="final", code={"text": "by identifier"},
                                subject={"identifier": {"system": MRN, "value": "outside"}})
    observation.save()
    found = fhir.resources("Observation").search(Raw(**{"subject:identifier": f"{MRN}|outside"})).fetch()
    assert _ids(found) == {observation.id}


def test_fhirpy_unknown_type_modifier_is_refused_naming_it(server: Server, seeded: Seeded):
    with pytest.raises(OperationOutcome) as refused:
        server.fhirpy().resources("Observation").search(subject__Foo="x").fetch()
    assert "subject:Foo" in str(refused.value)


def test_fhirpy_below_without_a_shipped_hierarchy_is_refused_naming_it(server: Server, seeded: Seeded):
    with pytest.raises(OperationOutcome) as refused:
        server.fhirpy().resources("Observation").search(code__below=SYSTOLIC).fetch()
    assert ":below" in str(refused.value)


def test_fhirpy_count_answers_the_number_of_matches(server: Server, seeded: Seeded):
    assert server.fhirpy().resources("Patient").search(family="Flores").count() == 2


def test_fhirpy_include_brings_each_observations_subject(server: Server, seeded: Seeded):
    bundle = server.fhirpy().resources("Observation").search(code=SYSTOLIC).include(
        "Observation", "subject").fetch_raw()
    assert len(_entries(bundle, "match")) == 3
    assert _ids(_entries(bundle, "include")) == set(seeded.patients.values())


def test_fhirpy_revinclude_brings_the_observations_of_each_patient(server: Server, seeded: Seeded):
    bundle = server.fhirpy().resources("Patient").search(identifier=f"{MRN}|ana").revinclude(
        "Observation", "subject").fetch_raw()
    assert _ids(_entries(bundle, "match")) == {seeded.patients["ana"]}
    assert _ids(_entries(bundle, "include")) == set(seeded.observations["ana"])


def test_fhirpy_include_iterate_follows_the_included_resources_references(server: Server, seeded: Seeded):
    fhir = server.fhirpy()
    organization = fhir.resource("Organization", name="Clinique du Parc")
    organization.save()
    ana = fhir.reference("Patient", seeded.patients["ana"]).to_resource()
    ana["managingOrganization"] = {"reference": f"Organization/{organization.id}"}
    ana.save()
    bundle = fhir.resources("Observation").search(subject=f"Patient/{seeded.patients['ana']}").include(
        "Observation", "subject").include("Patient", "organization", iterate=True).fetch_raw()
    assert _ids(_entries(bundle, "include")) == {seeded.patients["ana"], organization.id}


def test_fhirpy_elements_returns_only_the_elements_asked_for_marked_subsetted(server: Server, seeded: Seeded):
    found = server.fhirpy().resources("Patient").search(family="Flores").elements("gender").fetch()
    assert len(found) == 2
    for patient in found:
        assert set(patient) - {"meta"} == {"resourceType", "id", "gender"}
        assert SUBSETTED in {(t["system"], t["code"]) for t in patient["meta"]["tag"]}


def test_fhirpy_summary_true_returns_the_summary_elements_only(server: Server):
    fhir = server.fhirpy()
    patient = _patient(fhir, "ana")
    patient["maritalStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                                            "code": "M"}]}
    patient.save()
    found = fhir.resources("Patient").search(_summary="true").fetch()
    assert [p.id for p in found] == [patient.id]
    assert found[0]["gender"] == "female" and found[0]["name"]
    assert "maritalStatus" not in found[0]
    assert SUBSETTED in {(t["system"], t["code"]) for t in found[0]["meta"]["tag"]}


def test_fhirpy_summary_data_leaves_out_the_narrative(server: Server):
    fhir = server.fhirpy()
    patient = _patient(fhir, "ana")
    patient["text"] = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">Ana Flores</div>'}
    patient.save()
    found = fhir.resources("Patient").search(_summary="data").fetch()
    assert "text" not in found[0] and found[0]["gender"] == "female"


def test_fhirpy_summary_text_keeps_the_narrative_and_mandatory_elements(server: Server):
    fhir = server.fhirpy()
    patient = _patient(fhir, "ana")
    patient["text"] = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">Ana Flores</div>'}
    patient.save()
    found = fhir.resources("Patient").search(_summary="text").fetch()
    assert found[0]["text"]["div"] == patient["text"]["div"]
    assert "gender" not in found[0] and "name" not in found[0]


def test_fhirpy_chained_search_on_the_subjects_name(server: Server, seeded: Seeded):
    found = server.fhirpy().resources("Observation").search(subject__Patient__name="Martin").fetch_all()
    assert _ids(found) == set(seeded.observations["paul"])


def test_fhirpy_has_finds_patients_by_their_observations(server: Server, seeded: Seeded):
    fhir = server.fhirpy()
    fhir.resource("Observation", status="final", code={"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
                  subject={"reference": f"Patient/{seeded.patients['luis']}"}).save()
    found = fhir.resources("Patient").has("Observation", "subject", code="http://loinc.org|2339-0").fetch()
    assert _ids(found) == {seeded.patients["luis"]}


# -- fhirpy (sync): conditional interactions ----------------------------------------------------


def test_fhirpy_get_or_create_creates_once_and_then_finds_it(server: Server):
    fhir = server.fhirpy()
    search = fhir.resources("Patient").search(identifier=f"{MRN}|ana")
    first, created = search.get_or_create(_patient(fhir, "ana"))
    again, created_again = search.get_or_create(_patient(fhir, "ana"))
    assert (created, created_again) == (True, False)
    assert again.id == first.id
    assert len(search.fetch_all()) == 1


def test_fhirpy_get_or_create_with_several_matches_is_refused(server: Server, seeded: Seeded):
    fhir = server.fhirpy()
    search = fhir.resources("Patient").search(family="Flores")
    with pytest.raises(MultipleResourcesFound):
        search.get_or_create(_patient(fhir, "ana"))
    assert len(search.fetch_all()) == 2


def test_fhirpy_conditional_update_creates_then_updates_the_one_match(server: Server):
    fhir = server.fhirpy()
    search = fhir.resources("Patient").search(identifier=f"{MRN}|ana")
    made, created = search.update(_patient(fhir, "ana"))
    changed = _patient(fhir, "ana")
    changed["gender"] = "other"
    updated, created_again = search.update(changed)
    assert (created, created_again) == (True, False)
    assert updated.id == made.id
    assert fhir.get("Patient", made.id)["meta"]["versionId"] == "2"
    assert fhir.get("Patient", made.id)["gender"] == "other"


def test_fhirpy_conditional_update_with_several_matches_is_refused(server: Server, seeded: Seeded):
    fhir = server.fhirpy()
    with pytest.raises(MultipleResourcesFound):
        fhir.resources("Patient").search(family="Flores").update(_patient(fhir, "ana"))
    assert fhir.get("Patient", seeded.patients["ana"])["meta"]["versionId"] == "1"


def test_fhirpy_conditional_delete_removes_the_match(server: Server, seeded: Seeded):
    fhir = server.fhirpy()
    fhir.resources("Patient").search(identifier=f"{MRN}|paul").delete()
    assert server.get(f"Patient/{seeded.patients['paul']}").status_code == 410
    assert _ids(fhir.resources("Patient").fetch_all()) == {seeded.patients["ana"], seeded.patients["luis"]}


def test_fhirpy_patch_changes_only_the_elements_it_names(server: Server, seeded: Seeded):
    patched = server.fhirpy().reference("Patient", seeded.patients["ana"]).patch(gender="other")
    assert (patched["gender"], patched["meta"]["versionId"]) == ("other", "2")
    assert patched["name"][0]["family"] == "Flores"


def test_fhirpy_patch_with_none_removes_the_element(server: Server, seeded: Seeded):
    fhir = server.fhirpy()
    fhir.patch("Patient", seeded.patients["ana"], birthDate=None)
    assert "birthDate" not in fhir.get("Patient", seeded.patients["ana"])


def test_fhirpy_conditional_patch_changes_the_one_match(server: Server, seeded: Seeded):
    fhir = server.fhirpy()
    patched = fhir.resources("Patient").search(identifier=f"{MRN}|luis").patch(active=True)
    assert (patched.id, patched["active"], patched["meta"]["versionId"]) == (seeded.patients["luis"], True, "2")


def test_fhirpy_fhirpath_patch_replaces_an_element(server: Server, seeded: Seeded):
    fhir = server.fhirpy(**{"Content-Type": "application/fhir+json"})
    patched = fhir.execute(f"Patient/{seeded.patients['paul']}", method="patch", data={
        "resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
            {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Patient.birthDate"},
            {"name": "value", "valueDate": "1981-02-03"}]}]})
    assert (patched["birthDate"], patched["meta"]["versionId"]) == ("1981-02-03", "2")


def test_fhirpy_json_patch_changes_one_element(server: Server, seeded: Seeded):
    fhir = server.fhirpy(**{"Content-Type": "application/json-patch+json"})
    patched = fhir.execute(f"Patient/{seeded.patients['ana']}", method="patch",
                           data=[{"op": "replace", "path": "/gender", "value": "other"}])  # type: ignore[arg-type]
    assert (patched["gender"], patched["meta"]["versionId"]) == ("other", "2")
    assert fhir.get("Patient", seeded.patients["ana"])["name"][0]["family"] == "Flores"


def test_fhirpy_json_patch_with_a_failing_test_changes_nothing(server: Server, seeded: Seeded):
    fhir = server.fhirpy(**{"Content-Type": "application/json-patch+json"})
    path = f"Patient/{seeded.patients['ana']}"
    fhir.execute(path, method="patch", data=[{"op": "add", "path": "/active", "value": True}])  # type: ignore[arg-type]
    with pytest.raises(OperationOutcome):
        fhir.execute(path, method="patch",
                     data=[{"op": "test", "path": "/gender", "value": "male"},  # type: ignore[arg-type]
                           {"op": "replace", "path": "/gender", "value": "other"}])
    assert (fhir.get("Patient", seeded.patients["ana"])["meta"]["versionId"],
            fhir.get("Patient", seeded.patients["ana"])["gender"]) == ("2", "female")


# -- fhirpy (sync): history, $everything, Bundles -----------------------------------------------


def test_fhirpy_instance_history_lists_every_version_newest_first(server: Server):
    fhir = server.fhirpy()
    patient = _patient(fhir, "ana")
    patient.save()
    patient["gender"] = "other"
    patient.save()
    history = fhir.reference("Patient", patient.id).execute("_history", method="get")
    assert (history["type"], history["total"]) == ("history", 2)
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]


def test_fhirpy_history_says_how_each_version_was_made(server: Server):
    fhir = server.fhirpy()
    patient = _patient(fhir, "ana")
    patient["id"] = "put-made"
    patient.save()  # PUT to a new id: a create
    patient["gender"] = "other"
    patient.save()
    patient.delete()
    history = fhir.reference("Patient", "put-made").execute("_history", method="get")
    made = [(e["request"]["method"], e["response"]["status"].split()[0]) for e in history["entry"]]
    assert made == [("DELETE", "204"), ("PUT", "200"), ("PUT", "201")]


def test_fhirpy_type_history_lists_the_versions_of_that_type(server: Server, seeded: Seeded):
    fhir = server.fhirpy()
    fhir.delete("Patient", seeded.patients["paul"])
    history = fhir.execute("Patient/_history", method="get")
    assert history["type"] == "history"
    listed = [(e["fullUrl"].rsplit("/", 1)[-1], e["request"]["method"]) for e in history["entry"]]
    assert sorted(listed) == sorted([*((pid, "POST") for pid in seeded.patients.values()),
                                     (seeded.patients["paul"], "DELETE")])


def test_fhirpy_system_history_lists_every_version(server: Server, seeded: Seeded):
    history = server.fhirpy().execute("_history", method="get", params={"_count": 100})
    assert history["type"] == "history"
    types = [e["resource"]["resourceType"] for e in history["entry"]]
    assert sorted(types) == ["Observation"] * 6 + ["Patient"] * 3


def test_fhirpy_everything_returns_the_patient_and_their_compartment(server: Server, seeded: Seeded):
    bundle = server.fhirpy().reference("Patient", seeded.patients["ana"]).execute("$everything", method="get")
    assert bundle["resourceType"] == "Bundle"
    assert _ids(_entries(bundle)) == {seeded.patients["ana"], *seeded.observations["ana"]}


def test_fhirpy_everything_with_type_keeps_only_those_types(server: Server, seeded: Seeded):
    fhir = server.fhirpy()
    condition = fhir.resource("Condition", subject={"reference": f"Patient/{seeded.patients['ana']}"},
                              code={"text": "asthma"})
    condition.save()
    bundle = fhir.reference("Patient", seeded.patients["ana"]).execute("$everything", method="get",
                                                                        params={"_type": "Condition"})
    assert _ids(_entries(bundle)) - {seeded.patients["ana"]} == {condition.id}


def test_fhirpy_everything_since_keeps_what_changed_after(server: Server, seeded: Seeded):
    fhir = server.fhirpy()
    since = fhir.get("Observation", seeded.observations["ana"][1])["meta"]["lastUpdated"]
    condition = fhir.resource("Condition", subject={"reference": f"Patient/{seeded.patients['ana']}"},
                              code={"text": "asthma"})
    condition.save()
    bundle = fhir.reference("Patient", seeded.patients["ana"]).execute("$everything", method="get",
                                                                        params={"_since": since})
    assert _ids(_entries(bundle)) == {seeded.observations["ana"][1], condition.id}


def test_fhirpy_instance_history_since_keeps_the_later_versions(server: Server):
    fhir = server.fhirpy()
    patient = _patient(fhir, "ana")
    patient.save()
    patient["gender"] = "other"
    patient.save()
    since = patient["meta"]["lastUpdated"]
    history = fhir.reference("Patient", patient.id).execute("_history", method="get", params={"_since": since})
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2"]


def _transaction(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def test_fhirpy_transaction_links_entries_by_urn_uuid(server: Server):
    patient_urn = "urn:uuid:2f5e8a0c-1d3b-4c5e-9f7a-0b1c2d3e4f5a"
    fhir = server.fhirpy()
    result = fhir.execute("", method="post", data=_transaction(
        {"fullUrl": patient_urn, "resource": {"resourceType": "Patient", "name": [{"family": "Urn"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "weight"},
                      "subject": {"reference": patient_urn}},
         "request": {"method": "POST", "url": "Observation"}}))
    assert result["type"] == "transaction-response"
    statuses = [e["response"]["status"].split()[0] for e in result["entry"]]
    assert statuses == ["201", "201"]
    patient_id = result["entry"][0]["response"]["location"].split("/")[1]
    observations = fhir.resources("Observation").search(subject=f"Patient/{patient_id}").fetch()
    assert len(observations) == 1


def test_fhirpy_transaction_resolves_a_conditional_reference_to_a_resource_it_creates(server: Server):
    fhir = server.fhirpy()
    result = fhir.execute("", method="post", data=_transaction(
        {"fullUrl": "urn:uuid:6a1e7c2e-0b8f-4f7e-9c3a-5d2b1e0f9a87",
         "resource": {"resourceType": "Patient", "identifier": [{"system": MRN, "value": "new"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "weight"},
                      "subject": {"reference": f"Patient?identifier={MRN}|new"}},
         "request": {"method": "POST", "url": "Observation"}}))
    patient_id = result["entry"][0]["response"]["location"].split("/")[1]
    observation_id = result["entry"][1]["response"]["location"].split("/")[1]
    assert fhir.get("Observation", observation_id)["subject"]["reference"] == f"Patient/{patient_id}"


def test_fhirpy_transaction_rewrites_urn_uuid_links_in_narrative(server: Server):
    patient_urn = "urn:uuid:9b0e4d7c-3f1a-4e2b-8c6d-5a4f3e2d1c0b"
    fhir = server.fhirpy()
    div = f'<div xmlns="http://www.w3.org/1999/xhtml">Of <a href="{patient_urn}">the patient</a></div>'
    result = fhir.execute("", method="post", data=_transaction(
        {"fullUrl": patient_urn, "resource": {"resourceType": "Patient", "name": [{"family": "Urn"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "weight"},
                      "text": {"status": "generated", "div": div}, "subject": {"reference": patient_urn}},
         "request": {"method": "POST", "url": "Observation"}}))
    patient_ref = "/".join(result["entry"][0]["response"]["location"].split("/")[:2])
    observation_id = result["entry"][1]["response"]["location"].split("/")[1]
    stored = fhir.get("Observation", observation_id)
    assert f'href="{patient_ref}"' in stored["text"]["div"] and "urn:uuid" not in stored["text"]["div"]


def test_fhirpy_batch_answers_each_entry_on_its_own(server: Server, seeded: Seeded):
    result = server.fhirpy().execute("", method="post", data={"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{seeded.patients['ana']}"}},
        {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
    ]})
    assert result["type"] == "batch-response"
    assert [e["response"]["status"].split()[0] for e in result["entry"]] == ["200", "404"]


# -- fhirpy (async) ------------------------------------------------------------------------------



def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run an async client's scenario in a thread of its own: a session fixture (playwright's sync API, in
    tests/browser) keeps an event loop running in the test's thread once a browser test ran there, and
    asyncio.run refuses to start another one in it."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def test_async_fhirpy_create_read_search_delete(server: Server):
    async def scenario() -> None:
        fhir = server.async_fhirpy()
        patient = fhir.resource("Patient", name=[{"family": "Async"}], gender="female")
        await patient.save()
        assert (await fhir.reference("Patient", patient.id).to_resource())["gender"] == "female"
        found = await fhir.resources("Patient").search(family="Async").fetch()
        assert [p.id for p in found] == [patient.id]
        await patient.delete()
        assert await fhir.resources("Patient").search(family="Async").fetch() == []

    _run(scenario())


def test_async_fhirpy_fetch_all_follows_every_page(server: Server, seeded: Seeded):
    async def every() -> list[str]:
        return [o.id for o in await server.async_fhirpy().resources("Observation").limit(4).fetch_all()]

    assert sorted(_run(every())) == sorted(i for ids in seeded.observations.values() for i in ids)


def test_async_fhirpy_count_answers_the_number_of_matches(server: Server, seeded: Seeded):
    async def count() -> int:
        return await server.async_fhirpy().resources("Observation").search(code=HEART_RATE).count()

    assert _run(count()) == 3


def test_async_fhirpy_get_or_create_never_makes_a_duplicate(server: Server):
    async def twice() -> tuple[list[bool], int]:
        fhir = server.async_fhirpy()
        search = fhir.resources("Patient").search(identifier=f"{MRN}|luis")
        patient = fhir.resource("Patient", identifier=[{"system": MRN, "value": "luis"}])
        created = [(await search.get_or_create(patient))[1] for _ in range(2)]
        return created, len(await search.fetch_all())

    assert _run(twice()) == ([True, False], 1)


# -- fhirclient (SMART on FHIR) -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/fhir", "/research/fhir"])
def test_fhirclient_parses_each_capability_statement_as_r4(server: Server, path: str):
    smart = smart_client.FHIRClient(settings={"app_id": "conformance", "api_base": f"{server.base}{path}"})
    smart.prepare()  # reads `metadata` into fhirclient's strict R4 model, which refuses what R4 lacks
    statement = smart.server.capabilityStatement
    assert statement.fhirVersion == "4.0.1"
    assert {i.code for r in statement.rest[0].resource for i in r.interaction} >= {"read", "search-type"}


def test_fhirclient_create_read_update_delete(server: Server):
    smart = server.smart()
    new = SmartPatient({"name": [{"family": "Smart", "given": ["Client"]}], "gender": "female"})
    created = new.create(smart.server)
    patient = SmartPatient.read(created["id"], smart.server)
    assert patient.name[0].family == "Smart"
    patient.gender = "other"
    assert patient.update()["meta"]["versionId"] == "2"
    assert SmartPatient.read_from(f"Patient/{patient.id}/_history/1", smart.server).gender == "female"
    patient.delete()
    assert server.get(f"Patient/{patient.id}").status_code == 410


def test_fhirclient_search_with_include_parses_as_r4(server: Server, seeded: Seeded):
    search = SmartObservation.where({"code": SYSTOLIC}).include("subject")
    bundles = list(search.perform_iter(server.smart().server))
    entries = [e for bundle in bundles for e in bundle.entry or []]
    systolic = {ids[0] for ids in seeded.observations.values()}
    assert {e.resource.id for e in entries if e.search.mode == "match"} == systolic
    assert {e.resource.id for e in entries if e.search.mode == "include"} == set(seeded.patients.values())


def test_fhirclient_search_pages_through_every_result(server: Server, seeded: Seeded):
    search = SmartObservation.where({"_count": "2"})
    found = [r.id for r in search.perform_resources_iter(server.smart().server)]
    assert sorted(found) == sorted(i for ids in seeded.observations.values() for i in ids)


def test_fhirclient_revinclude(server: Server, seeded: Seeded):
    search = SmartPatient.where({"identifier": f"{MRN}|paul"}).include("subject", SmartObservation, reverse=True)
    bundle = next(search.perform_iter(server.smart().server))
    assert {e.resource.id for e in bundle.entry if e.search.mode == "include"} == set(seeded.observations["paul"])


def test_fhirclient_chained_search(server: Server, seeded: Seeded):
    search = SmartObservation.where({"subject": {"$type": "Patient", "name": "Martin"}})
    found = {r.id for r in search.perform_resources_iter(server.smart().server)}
    assert found == set(seeded.observations["paul"])


def test_fhirclient_posts_a_transaction_to_the_base(server: Server):
    bundle = SmartBundle(_transaction(
        {"fullUrl": "urn:uuid:0d4c6b1a-8e2f-4a3b-9c5d-7e6f5a4b3c2d",
         "resource": {"resourceType": "Patient", "name": [{"family": "Bundled"}]},
         "request": {"method": "POST", "url": "Patient"}}))
    response = bundle.create(server.smart().server)
    assert response["type"] == "transaction-response"
    assert response["entry"][0]["response"]["status"].startswith("201")


# -- the research API through fhirpy ---------------------------------------------------------------


@pytest.fixture
def researcher(base_url: str, world: World, research: dict[str, str]) -> Iterator[SyncFHIRClient]:
    yield SyncFHIRClient(f"{base_url}/research/fhir", authorization=research["Authorization"],
                         requests_config={"timeout": 30})


def test_research_fhirpy_search_returns_pseudonymised_patients_without_identifiers(
        researcher: SyncFHIRClient, world: World):
    found = researcher.resources("Patient").limit(2).fetch_all()
    assert len(found) == 3  # consented, no_mental_health, recent_only
    assert not _ids(found) & set(world.patients.values())
    for patient in found:
        assert not {"name", "telecom", "identifier", "address"} & set(patient)


def test_research_fhirpy_reads_what_a_search_returned(researcher: SyncFHIRClient, world: World):
    observation = researcher.resources("Observation").first()
    subject = observation["subject"]["reference"]
    assert subject.split("/")[1] not in world.patients.values()
    assert researcher.reference(reference=subject).to_resource().id == subject.split("/")[1]
    mine = researcher.resources("Observation").search(subject=subject).fetch_all()
    assert {o["subject"]["reference"] for o in mine} == {subject}


def test_research_fhirpy_include_carries_pseudonymised_subjects(researcher: SyncFHIRClient, world: World):
    bundle = researcher.resources("Observation").include("Observation", "subject").limit(100).fetch_raw()
    included = _entries(bundle, "include")
    assert len(included) == 3
    assert not _ids(included) & set(world.patients.values())


def test_research_fhirpy_count_counts_only_what_the_project_may_see(researcher: SyncFHIRClient, world: World):
    assert researcher.resources("Observation").count() == 5


def test_research_fhirpy_cannot_write(researcher: SyncFHIRClient, world: World):
    with pytest.raises(OperationOutcome):
        researcher.resource("Patient", gender="female").save()


def test_research_fhirpy_chain_over_an_identifying_parameter_is_refused(researcher: SyncFHIRClient, world: World):
    with pytest.raises(ForbiddenError, match="'name'"):
        researcher.resources("Observation").search(subject__Patient__name="Familyconsented").fetch()


def test_research_fhirpy_chain_over_an_allowed_parameter_finds_pseudonymised_rows(
        researcher: SyncFHIRClient, world: World):
    found = researcher.resources("Observation").search(subject__Patient__gender="female").fetch_all()
    assert len(found) == 5  # every visible Observation: the world's patients are all female
    assert not {o["subject"]["reference"].split("/")[1] for o in found} & set(world.patients.values())


def test_research_fhirpy_has_finds_the_visible_patients(researcher: SyncFHIRClient, world: World):
    found = researcher.resources("Patient").has("Observation", "subject", code="http://loinc.org|8480-6").fetch()
    assert len(found) == 3
    assert not _ids(found) & set(world.patients.values())
