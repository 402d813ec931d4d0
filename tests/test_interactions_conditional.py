"""Conditional create, update and delete on the custodian API, through fhirpy where it uses them
(`get_or_create`, `search(...).update`, `search(...).delete`) and the test client elsewhere."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fhirpy.base.exceptions import MultipleResourcesFound

from consent import writer
from tests.fhir_helpers import create, issue, observation, patient, search

MRN = "http://hospital.example/mrn"


def _with_mrn(value: str, **extra) -> dict:
    return patient(identifier=[{"system": MRN, "value": value}], **extra)


def _count(client, headers, query: str) -> int:
    return search(client, headers, f"{query}&_summary=count" if "?" in query else f"{query}?_summary=count")["total"]




# -- conditional create --------------------------------------------------------------------------

def test_fhirpy_get_or_create_creates_once_then_returns_the_same_patient(fhirpy, client, custodian_headers):
    wanted = fhirpy.resource("Patient", **_with_mrn("GOC-1"))
    first, created = fhirpy.resources("Patient").search(identifier=f"{MRN}|GOC-1").get_or_create(wanted)
    again, created_again = fhirpy.resources("Patient").search(identifier=f"{MRN}|GOC-1").get_or_create(wanted)
    assert (created, created_again) == (True, False)
    assert again.id == first.id
    assert _count(client, custodian_headers, f"Patient?identifier={MRN}|GOC-1") == 1


def test_a_post_with_a_search_on_the_url_matching_several_is_412_and_creates_nothing(client, custodian_headers):
    create(client, custodian_headers, _with_mrn("DUP"))
    create(client, custodian_headers, _with_mrn("DUP"))
    response = client.post(f"/fhir/Patient?identifier={MRN}|DUP", json=_with_mrn("DUP"), headers=custodian_headers)
    assert response.status_code == 412
    assert _count(client, custodian_headers, f"Patient?identifier={MRN}|DUP") == 2


def test_a_post_with_an_unknown_parameter_on_the_url_is_400_and_creates_nothing(client, custodian_headers):
    response = client.post("/fhir/Patient?nonsense=1", json=patient(), headers=custodian_headers)
    assert response.status_code == 400
    assert _count(client, custodian_headers, "Patient") == 0


def test_if_none_exist_and_a_search_on_the_url_together_are_400(client, custodian_headers):
    response = client.post(f"/fhir/Patient?identifier={MRN}|X", json=_with_mrn("X"),
                           headers={**custodian_headers, "If-None-Exist": f"identifier={MRN}|X"})
    assert response.status_code == 400


# -- conditional update --------------------------------------------------------------------------

def test_fhirpy_conditional_update_creates_when_nothing_matches_then_updates_the_match(fhirpy, client,
                                                                                       custodian_headers):
    query = fhirpy.resources("Patient").search(identifier=f"{MRN}|CU-1")
    made, created = query.update(fhirpy.resource("Patient", **_with_mrn("CU-1", gender="female")))
    again, created_again = query.update(fhirpy.resource("Patient", **_with_mrn("CU-1", gender="male")))
    assert (created, created_again) == (True, False)
    assert again.id == made.id and again.meta.versionId == "2"
    stored = client.get(f"/fhir/Patient/{made.id}", headers=custodian_headers).get_json()
    assert stored["gender"] == "male"


def test_conditional_update_matching_several_is_412_and_changes_nothing(fhirpy, client, custodian_headers):
    create(client, custodian_headers, _with_mrn("CU-2"))
    create(client, custodian_headers, _with_mrn("CU-2"))
    with pytest.raises(MultipleResourcesFound):
        fhirpy.resources("Patient").search(identifier=f"{MRN}|CU-2").update(
            fhirpy.resource("Patient", **_with_mrn("CU-2", gender="male")))
    assert _count(client, custodian_headers, "Patient?gender=male") == 0


def test_conditional_update_with_no_match_and_an_id_creates_under_that_id(client, custodian_headers):
    response = client.put(f"/fhir/Patient?identifier={MRN}|CU-3", json=_with_mrn("CU-3", id="chosen"),
                          headers=custodian_headers)
    assert response.status_code == 201
    assert response.get_json()["id"] == "chosen"


def test_conditional_update_whose_body_names_another_id_than_the_match_is_400(client, custodian_headers):
    create(client, custodian_headers, _with_mrn("CU-4"))
    response = client.put(f"/fhir/Patient?identifier={MRN}|CU-4", json=_with_mrn("CU-4", id="other"),
                          headers=custodian_headers)
    assert response.status_code == 400
    assert issue(response)["expression"] == ["Patient.id"]


def test_conditional_update_without_a_search_is_400(client, custodian_headers):
    assert client.put("/fhir/Patient", json=patient(), headers=custodian_headers).status_code == 400


def test_conditional_update_honours_if_match(client, custodian_headers):
    create(client, custodian_headers, _with_mrn("CU-5"))
    response = client.put(f"/fhir/Patient?identifier={MRN}|CU-5", json=_with_mrn("CU-5", gender="male"),
                          headers={**custodian_headers, "If-Match": 'W/"7"'})
    assert response.status_code == 412
    assert _count(client, custodian_headers, "Patient?gender=male") == 0


def _tier(client, headers, patient_id: str, project: str) -> str:
    response = client.get(f"/fhir/Consent/$explain?patient={patient_id}&project={project}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return next(p["valueCode"] for p in response.get_json()["parameter"] if p["name"] == "tier")


def test_a_conditionally_updated_consent_is_materialised_again(client, custodian_headers, world):
    consented = world.patients["consented"]
    assert _tier(client, custodian_headers, consented, world.project) == "record"
    refusal = writer.build(consented, world.project, "none", [], source="test")
    response = client.put(f"/fhir/Consent?patient={consented}", json=refusal, headers=custodian_headers)
    assert response.status_code == 200, response.get_json()
    assert _tier(client, custodian_headers, consented, world.project) == "none"


# -- conditional delete --------------------------------------------------------------------------

def test_fhirpy_conditional_delete_deletes_the_one_match(fhirpy, client, custodian_headers):
    made = create(client, custodian_headers, _with_mrn("CD-1"))
    fhirpy.resources("Patient").search(identifier=f"{MRN}|CD-1").delete()
    assert client.get(f"/fhir/Patient/{made['id']}", headers=custodian_headers).status_code == 410


def test_conditional_delete_matching_several_is_412_and_deletes_nothing(client, custodian_headers):
    create(client, custodian_headers, _with_mrn("CD-2"))
    create(client, custodian_headers, _with_mrn("CD-2"))
    response = client.delete(f"/fhir/Patient?identifier={MRN}|CD-2", headers=custodian_headers)
    assert response.status_code == 412
    assert _count(client, custodian_headers, f"Patient?identifier={MRN}|CD-2") == 2


def test_conditional_delete_matching_nothing_is_204(client, custodian_headers):
    assert client.delete(f"/fhir/Patient?identifier={MRN}|none", headers=custodian_headers).status_code == 204


def test_conditional_delete_without_a_search_is_400_and_deletes_nothing(client, custodian_headers):
    create(client, custodian_headers, patient())
    assert client.delete("/fhir/Patient", headers=custodian_headers).status_code == 400
    assert _count(client, custodian_headers, "Patient") == 1


# -- If-Modified-Since ------------------------------------------------------------------------------

def test_read_with_if_modified_since_at_or_after_the_last_update_is_304(client, custodian_headers):
    made = create(client, custodian_headers, patient())
    first = client.get(f"/fhir/Patient/{made['id']}", headers=custodian_headers)
    since = first.headers["Last-Modified"]
    response = client.get(f"/fhir/Patient/{made['id']}", headers={**custodian_headers, "If-Modified-Since": since})
    assert response.status_code == 304
    assert response.data == b""


def test_read_with_an_older_if_modified_since_is_200(client, custodian_headers):
    made = create(client, custodian_headers, patient())
    response = client.get(f"/fhir/Patient/{made['id']}",
                          headers={**custodian_headers, "If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"})
    assert response.status_code == 200
    assert response.get_json()["id"] == made["id"]


def test_if_none_match_takes_precedence_over_if_modified_since(client, custodian_headers):
    made = create(client, custodian_headers, patient())
    response = client.get(f"/fhir/Patient/{made['id']}", headers={
        **custodian_headers, "If-None-Match": 'W/"9"', "If-Modified-Since": "Mon, 01 Jan 2100 00:00:00 GMT"})
    assert response.status_code == 200


def test_observation_referring_to_an_unknown_patient_is_not_created_conditionally(client, custodian_headers):
    response = client.post("/fhir/Observation?code=8480-6", json=observation("nobody"), headers=custodian_headers)
    assert response.status_code == 422
    assert issue(response)["expression"] == ["Observation.subject"]


def test_a_conditional_create_whose_search_filters_nothing_is_400(client, custodian_headers):
    create(client, custodian_headers, patient())
    response = client.post("/fhir/Patient?_count=1", json=patient(family="New"), headers=custodian_headers)
    assert response.status_code == 400
    assert _count(client, custodian_headers, "Patient") == 1


def test_concurrent_conditional_creates_of_the_same_patient_create_it_once(app, base_url, fhirpy, client,
                                                                           custodian_headers):
    headers = {"Authorization": fhirpy.authorization, "Content-Type": "application/fhir+json"}
    url = f"{base_url}/fhir/Patient?identifier={MRN}|RACE"

    def post(_: int) -> int:
        return requests.post(url, json=_with_mrn("RACE"), headers=headers, timeout=60).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = sorted(pool.map(post, range(8)))
    assert statuses == [200] * 7 + [201]
    assert _count(client, custodian_headers, f"Patient?identifier={MRN}|RACE") == 1
