"""Transaction and batch Bundles POSTed to the custodian base URL."""
from __future__ import annotations

import copy

from fhir.resources.R4B.bundle import Bundle

from tests.fhir_helpers import create, ids, issue, patient, search

PATIENT_URN = "urn:uuid:7f8a2f4e-0000-4000-8000-000000000001"


def _transaction(*entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def _post(resource: dict, full_url: str | None = None, **request: str) -> dict:
    entry = {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"], **request}}
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def _condition(subject: str) -> dict:
    return {"resourceType": "Condition", "subject": {"reference": subject},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]}}


def test_transaction_resolves_urn_uuid_references_to_new_ids(client, custodian_headers):
    bundle = _transaction(_post(patient(), PATIENT_URN), _post(_condition(PATIENT_URN)))
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    assert response.status_code == 200
    body = response.get_json()
    Bundle.model_validate(body)
    assert body["type"] == "transaction-response"
    assert [e["response"]["status"] for e in body["entry"]] == ["201 Created", "201 Created"]
    patient_id = body["entry"][0]["response"]["location"].split("/")[1]
    conditions = search(client, custodian_headers, f"Condition?patient={patient_id}")
    assert conditions["entry"][0]["resource"]["subject"]["reference"] == f"Patient/{patient_id}"


def test_an_invalid_entry_anywhere_leaves_the_database_unchanged(client, custodian_headers):
    bad = patient(birthDate="not-a-date")
    bundle = _transaction(_post(patient(family="Kept"), PATIENT_URN), _post(_condition(PATIENT_URN)), _post(bad))
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    assert response.status_code == 400
    assert "Bundle.entry[2]" in issue(response)["diagnostics"]
    assert search(client, custodian_headers, "Patient?_summary=count")["total"] == 0
    assert search(client, custodian_headers, "Condition?_summary=count")["total"] == 0


def test_a_failure_after_writes_rolls_back_the_whole_transaction(client, custodian_headers):
    existing = create(client, custodian_headers, patient(family="Before"))
    bundle = _transaction(
        _post(patient(family="New")),
        {"resource": {**existing, "gender": "male"},
         "request": {"method": "PUT", "url": f"Patient/{existing['id']}", "ifMatch": 'W/"7"'}},
    )
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    assert response.status_code == 412
    assert search(client, custodian_headers, "Patient?_summary=count")["total"] == 1
    after = client.get(f"/fhir/Patient/{existing['id']}", headers=custodian_headers).get_json()
    assert "gender" not in after


def test_an_unresolvable_urn_reference_fails_the_transaction(client, custodian_headers):
    response = client.post("/fhir", json=_transaction(_post(_condition("urn:uuid:missing"))),
                           headers=custodian_headers)
    assert response.status_code == 400
    assert "urn:uuid:missing" in issue(response)["diagnostics"]


def test_if_none_exist_reuses_the_existing_resource(client, custodian_headers):
    org = {"resourceType": "Organization", "name": "CHU", "identifier": [{"system": "urn:org", "value": "1"}]}
    first = client.post("/fhir", json=_transaction(_post(org, ifNoneExist="identifier=urn:org|1")),
                        headers=custodian_headers).get_json()
    second = client.post("/fhir", json=_transaction(_post(org, ifNoneExist="identifier=urn:org|1")),
                         headers=custodian_headers).get_json()
    assert first["entry"][0]["response"]["status"] == "201 Created"
    assert second["entry"][0]["response"]["status"] == "200 OK"
    assert second["entry"][0]["response"]["location"] == first["entry"][0]["response"]["location"]
    assert search(client, custodian_headers, "Organization?_summary=count")["total"] == 1


def test_conditional_references_resolve_to_the_single_match(client, custodian_headers):
    org = create(client, custodian_headers, {"resourceType": "Organization", "name": "CHU",
                                             "identifier": [{"system": "urn:org", "value": "9"}]})
    encounter = {"resourceType": "Encounter", "status": "finished",
                 "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                 "subject": {"reference": PATIENT_URN},
                 "serviceProvider": {"reference": "Organization?identifier=urn:org|9"}}
    body = client.post("/fhir", json=_transaction(_post(patient(), PATIENT_URN), _post(encounter)),
                       headers=custodian_headers).get_json()
    encounter_id = body["entry"][1]["response"]["location"].split("/")[1]
    stored = client.get(f"/fhir/Encounter/{encounter_id}", headers=custodian_headers).get_json()
    assert stored["serviceProvider"]["reference"] == f"Organization/{org['id']}"


def test_a_conditional_reference_without_match_fails_with_412(client, custodian_headers):
    encounter = {"resourceType": "Encounter", "status": "finished",
                 "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                 "serviceProvider": {"reference": "Organization?identifier=urn:org|absent"}}
    response = client.post("/fhir", json=_transaction(_post(encounter)), headers=custodian_headers)
    assert response.status_code == 412
    assert search(client, custodian_headers, "Encounter?_summary=count")["total"] == 0


def test_transaction_deletes_and_updates_with_put(client, custodian_headers):
    doomed = create(client, custodian_headers, patient(family="Doomed"))
    bundle = _transaction(
        {"request": {"method": "DELETE", "url": f"Patient/{doomed['id']}"}},
        {"resource": patient(id="fixed-id", family="Put"), "request": {"method": "PUT", "url": "Patient/fixed-id"}},
    )
    body = client.post("/fhir", json=bundle, headers=custodian_headers).get_json()
    assert [e["response"]["status"] for e in body["entry"]] == ["204 No Content", "201 Created"]
    assert client.get(f"/fhir/Patient/{doomed['id']}", headers=custodian_headers).status_code == 410
    assert client.get("/fhir/Patient/fixed-id", headers=custodian_headers).status_code == 200


def test_transaction_get_entries_return_reads_and_searches(client, custodian_headers):
    existing = create(client, custodian_headers, patient(family="Read"))
    bundle = _transaction({"request": {"method": "GET", "url": f"Patient/{existing['id']}"}},
                          {"request": {"method": "GET", "url": "Patient?family=read"}})
    body = client.post("/fhir", json=bundle, headers=custodian_headers).get_json()
    assert body["entry"][0]["resource"]["id"] == existing["id"]
    assert ids(body["entry"][1]["resource"]) == [existing["id"]]


def test_the_same_resource_twice_in_a_transaction_is_400(client, custodian_headers):
    entry = {"resource": patient(id="twice"), "request": {"method": "PUT", "url": "Patient/twice"}}
    response = client.post("/fhir", json=_transaction(entry, copy.deepcopy(entry)), headers=custodian_headers)
    assert response.status_code == 400


def test_batch_reports_each_entry_and_keeps_the_good_ones(client, custodian_headers):
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        _post(patient(family="Good")),
        _post(patient(birthDate="bad")),
        {"request": {"method": "GET", "url": "Patient/unknown"}},
    ]}
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    assert response.status_code == 200
    body = response.get_json()
    Bundle.model_validate(body)
    assert body["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses[0] == "201 Created"
    assert statuses[1].startswith("400")
    assert statuses[2].startswith("404")
    assert body["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert search(client, custodian_headers, "Patient?_summary=count")["total"] == 1


def test_a_bundle_of_another_type_is_refused(client, custodian_headers):
    response = client.post("/fhir", json={"resourceType": "Bundle", "type": "collection"}, headers=custodian_headers)
    assert response.status_code == 400
    assert issue(response)["expression"] == ["Bundle.type"]


def test_synthetic_synthea_style_bundles_load_unchanged(client, custodian_headers):
    from service import synthetic

    for bundle in synthetic.organisation_bundles(seed=3):
        assert client.post("/fhir", json=bundle, headers=custodian_headers).status_code == 200
    for bundle in synthetic.patient_bundles(2, seed=3):
        response = client.post("/fhir", json=bundle, headers=custodian_headers)
        assert response.status_code == 200, response.get_json()
        statuses = {e["response"]["status"] for e in response.get_json()["entry"]}
        assert statuses == {"201 Created"}
    assert search(client, custodian_headers, "Patient?_summary=count")["total"] == 2
    encounters = search(client, custodian_headers, "Encounter?_count=1")
    provider = encounters["entry"][0]["resource"]["serviceProvider"]["reference"]
    assert provider.startswith("Organization/") and "?" not in provider
