"""References inside transaction and batch Bundles: conditional references to the Bundle's own
creates, narrative links to entries, and literal references that must resolve."""
from __future__ import annotations

from tests.fhir_helpers import create, issue, observation, patient, post_entry, search, transaction

PATIENT_URN = "urn:uuid:5b0e7a52-0000-4000-8000-00000000000a"
MRN = "http://hospital.example/mrn"


def _post_if_none_exist(resource: dict, condition: str, full_url: str | None = None) -> dict:
    entry = post_entry(resource, full_url)
    entry["request"]["ifNoneExist"] = condition
    return entry


def _stored(client, headers, response) -> list[dict]:
    assert response.status_code == 200, response.get_json()
    found = []
    for entry in response.get_json()["entry"]:
        location = entry["response"]["location"]
        kind, resource_id = location.split("/")[:2]
        found.append(client.get(f"/fhir/{kind}/{resource_id}", headers=headers).get_json())
    return found


def test_a_conditional_reference_resolves_to_a_patient_created_in_the_same_transaction(client, custodian_headers):
    new = patient(identifier=[{"system": MRN, "value": "T-1"}])
    bundle = transaction(post_entry(observation("placeholder")), _post_if_none_exist(new, f"identifier={MRN}|T-1"))
    bundle["entry"][0]["resource"]["subject"] = {"reference": f"Patient?identifier={MRN}|T-1"}
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    made_observation, made_patient = _stored(client, custodian_headers, response)
    assert made_observation["subject"]["reference"] == f"Patient/{made_patient['id']}"
    assert search(client, custodian_headers, f"Observation?subject=Patient/{made_patient['id']}")["entry"]


def test_a_conditional_reference_to_an_existing_patient_still_resolves_to_it(client, custodian_headers):
    existing = create(client, custodian_headers, patient(identifier=[{"system": MRN, "value": "T-2"}]))
    bundle = transaction(post_entry(observation(existing["id"])))
    bundle["entry"][0]["resource"]["subject"] = {"reference": f"Patient?identifier={MRN}|T-2"}
    [made] = _stored(client, custodian_headers, client.post("/fhir", json=bundle, headers=custodian_headers))
    assert made["subject"]["reference"] == f"Patient/{existing['id']}"


def test_a_conditional_reference_matching_nothing_is_412_and_stores_nothing(client, custodian_headers):
    bundle = transaction(post_entry(patient(family="Kept")), post_entry(observation("x")))
    bundle["entry"][1]["resource"]["subject"] = {"reference": f"Patient?identifier={MRN}|nobody"}
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    assert response.status_code == 412
    assert search(client, custodian_headers, "Patient?_summary=count")["total"] == 0


def test_a_urn_uuid_in_narrative_links_is_rewritten_to_the_entry(client, custodian_headers):
    narrative = {"status": "generated",
                 "div": f'<div xmlns="http://www.w3.org/1999/xhtml">Of <a href="{PATIENT_URN}">the patient</a></div>'}
    bundle = transaction(post_entry(patient(), PATIENT_URN),
                         post_entry(observation("x", text=narrative)))
    bundle["entry"][1]["resource"]["subject"] = {"reference": PATIENT_URN}
    made_patient, made_observation = _stored(client, custodian_headers,
                                             client.post("/fhir", json=bundle, headers=custodian_headers))
    assert f'href="Patient/{made_patient["id"]}"' in made_observation["text"]["div"]
    assert "urn:uuid" not in made_observation["text"]["div"]


def test_a_reference_to_a_patient_that_does_not_exist_fails_the_transaction(client, custodian_headers):
    bundle = transaction(post_entry(patient(family="Kept")), post_entry(observation("does-not-exist")))
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    assert response.status_code == 422
    found = issue(response)
    assert found["code"] == "not-found"
    assert found["expression"] == ["Observation.subject"]
    assert "Bundle.entry[1]" in found["diagnostics"] and "Patient/does-not-exist" in found["diagnostics"]
    assert search(client, custodian_headers, "Patient?_summary=count")["total"] == 0


def test_a_reference_may_name_another_entry_by_its_id(client, custodian_headers):
    put = {"resource": patient(id="in-bundle"), "request": {"method": "PUT", "url": "Patient/in-bundle"}}
    bundle = transaction(post_entry(observation("in-bundle")), put)
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    assert response.status_code == 200, response.get_json()


def test_a_reference_to_a_patient_deleted_in_the_same_transaction_does_not_resolve(client, custodian_headers):
    doomed = create(client, custodian_headers, patient())
    delete = {"request": {"method": "DELETE", "url": f"Patient/{doomed['id']}"}}
    response = client.post("/fhir", json=transaction(delete, post_entry(observation(doomed["id"]))),
                           headers=custodian_headers)
    assert response.status_code == 422
    assert client.get(f"/fhir/Patient/{doomed['id']}", headers=custodian_headers).status_code == 200


def test_a_batch_entry_with_a_dangling_reference_fails_alone(client, custodian_headers):
    subject = create(client, custodian_headers, patient())
    bundle = {"resourceType": "Bundle", "type": "batch",
              "entry": [post_entry(observation("nobody")), post_entry(observation(subject["id"]))]}
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    assert response.status_code == 200
    first, second = response.get_json()["entry"]
    assert first["response"]["status"].startswith("422")
    assert first["response"]["outcome"]["issue"][0]["code"] == "not-found"
    assert second["response"]["status"].startswith("201")


def test_a_batch_entry_referring_to_a_patient_the_batch_deletes_fails(client, custodian_headers):
    doomed = create(client, custodian_headers, patient())
    kept = create(client, custodian_headers, patient())
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        post_entry(observation(doomed["id"])), post_entry(observation(kept["id"])),
        {"request": {"method": "DELETE", "url": f"Patient/{doomed['id']}"}}]}
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    assert [e["response"]["status"][:3] for e in response.get_json()["entry"]] == ["422", "201", "204"]


def _batch_get(client, headers, url: str) -> dict:
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": url}}]}
    response = client.post("/fhir", json=bundle, headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["entry"][0]


def test_a_get_entry_of_a_version_reads_that_version(client, custodian_headers):
    made = create(client, custodian_headers, patient(family="First"))
    client.put(f"/fhir/Patient/{made['id']}", json={**made, "name": [{"family": "Second"}]}, headers=custodian_headers)
    entry = _batch_get(client, custodian_headers, f"Patient/{made['id']}/_history/1")
    assert entry["resource"]["name"][0]["family"] == "First"
    assert entry["response"]["etag"] == 'W/"1"'


def test_a_get_entry_of_a_history_or_an_operation_is_refused_not_answered_with_the_resource(client,
                                                                                          custodian_headers):
    made = create(client, custodian_headers, patient())
    for url in (f"Patient/{made['id']}/_history", "Patient/_history", f"Patient/{made['id']}/$everything"):
        entry = _batch_get(client, custodian_headers, url)
        assert entry["response"]["status"].startswith("400"), url
        assert "resource" not in entry
