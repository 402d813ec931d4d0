"""The custodian FHIR API: read, vread, create, update, delete, history and errors."""
from __future__ import annotations

import json

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from tests.fhir_helpers import create, issue, observation, patient, search


def test_metadata_is_a_valid_capability_statement_served_without_a_token(client):
    response = client.get("/fhir/metadata")
    assert response.status_code == 200
    assert response.mimetype == "application/fhir+json"
    statement = CapabilityStatement.model_validate(response.get_json())
    patient_entry = next(r for r in statement.rest[0].resource if r.type == "Patient")
    assert {"birthdate", "family", "identifier", "gender"} <= {p.name for p in patient_entry.searchParam}


def test_metadata_advertises_the_oauth_token_endpoint(client):
    security = client.get("/fhir/metadata").get_json()["rest"][0]["security"]
    uris = security["extension"][0]["extension"]
    assert uris == [{"url": "token", "valueUri": "http://localhost/auth/token"}]


def test_requests_without_a_token_get_401_operation_outcome(client):
    response = client.get("/fhir/Patient")
    assert response.status_code == 401
    assert issue(response)["code"] == "login"


def test_create_assigns_an_id_version_and_location(client, custodian_headers):
    response = client.post("/fhir/Patient", json=patient(id="client-chosen"), headers=custodian_headers)
    assert response.status_code == 201
    body = response.get_json()
    assert body["id"] != "client-chosen"
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"].endswith("Z")
    assert response.headers["ETag"] == 'W/"1"'
    assert response.headers["Location"] == f"http://localhost/fhir/Patient/{body['id']}/_history/1"


def test_read_returns_the_stored_resource_with_its_etag(client, custodian_headers):
    created = create(client, custodian_headers, patient())
    response = client.get(f"/fhir/Patient/{created['id']}", headers=custodian_headers)
    assert response.status_code == 200
    assert response.get_json() == created
    assert response.headers["ETag"] == 'W/"1"'


def test_read_of_an_unknown_id_is_404(client, custodian_headers):
    response = client.get("/fhir/Patient/nope", headers=custodian_headers)
    assert response.status_code == 404
    assert issue(response)["code"] == "not-found"


def test_an_unknown_resource_type_is_404(client, custodian_headers):
    response = client.get("/fhir/Unicorn/1", headers=custodian_headers)
    assert response.status_code == 404
    assert "Unicorn" in issue(response)["diagnostics"]


def test_update_creates_a_new_version_and_keeps_the_old(client, custodian_headers):
    created = create(client, custodian_headers, patient())
    changed = {**created, "gender": "male"}
    response = client.put(f"/fhir/Patient/{created['id']}", json=changed, headers=custodian_headers)
    assert response.status_code == 200
    assert response.get_json()["meta"]["versionId"] == "2"
    old = client.get(f"/fhir/Patient/{created['id']}/_history/1", headers=custodian_headers).get_json()
    assert "gender" not in old
    assert old["meta"]["versionId"] == "1"


def test_update_with_a_stale_if_match_is_412_and_changes_nothing(client, custodian_headers):
    created = create(client, custodian_headers, patient())
    url = f"/fhir/Patient/{created['id']}"
    client.put(url, json={**created, "gender": "male"}, headers=custodian_headers)
    response = client.put(url, json={**created, "gender": "female"},
                          headers={**custodian_headers, "If-Match": 'W/"1"'})
    assert response.status_code == 412
    assert client.get(url, headers=custodian_headers).get_json()["gender"] == "male"


def test_update_with_the_current_if_match_succeeds(client, custodian_headers):
    created = create(client, custodian_headers, patient())
    response = client.put(f"/fhir/Patient/{created['id']}", json={**created, "gender": "other"},
                          headers={**custodian_headers, "If-Match": 'W/"1"'})
    assert response.status_code == 200


def test_update_of_a_new_id_creates_it_with_the_clients_id(client, custodian_headers):
    response = client.put("/fhir/Patient/mrn-42", json=patient(id="mrn-42"), headers=custodian_headers)
    assert response.status_code == 201
    assert client.get("/fhir/Patient/mrn-42", headers=custodian_headers).status_code == 200


def test_update_whose_body_id_differs_from_the_url_is_400(client, custodian_headers):
    response = client.put("/fhir/Patient/a", json=patient(id="b"), headers=custodian_headers)
    assert response.status_code == 400
    assert client.get("/fhir/Patient/a", headers=custodian_headers).status_code == 404


def test_delete_then_read_is_410_gone(client, custodian_headers):
    created = create(client, custodian_headers, patient())
    url = f"/fhir/Patient/{created['id']}"
    assert client.delete(url, headers=custodian_headers).status_code == 204
    response = client.get(url, headers=custodian_headers)
    assert response.status_code == 410
    assert issue(response)["code"] == "deleted"


def test_deleted_resources_leave_search_results(client, custodian_headers):
    created = create(client, custodian_headers, patient(family="Gone"))
    client.delete(f"/fhir/Patient/{created['id']}", headers=custodian_headers)
    assert search(client, custodian_headers, "Patient?family=Gone").get("entry") is None


def test_instance_history_lists_every_version_newest_first(client, custodian_headers):
    created = create(client, custodian_headers, patient())
    url = f"/fhir/Patient/{created['id']}"
    client.put(url, json={**created, "gender": "male"}, headers=custodian_headers)
    client.delete(url, headers=custodian_headers)
    response = client.get(f"{url}/_history", headers=custodian_headers)
    body = response.get_json()
    Bundle.model_validate(body)
    assert body["type"] == "history"
    assert [e["request"]["method"] for e in body["entry"]] == ["DELETE", "PUT", "POST"]
    assert [e["response"]["etag"] for e in body["entry"]] == ['W/"3"', 'W/"2"', 'W/"1"']
    assert "resource" not in body["entry"][0]


def test_vread_of_a_deletion_is_410(client, custodian_headers):
    created = create(client, custodian_headers, patient())
    client.delete(f"/fhir/Patient/{created['id']}", headers=custodian_headers)
    response = client.get(f"/fhir/Patient/{created['id']}/_history/2", headers=custodian_headers)
    assert response.status_code == 410


def test_vread_of_an_unknown_version_is_404(client, custodian_headers):
    created = create(client, custodian_headers, patient())
    response = client.get(f"/fhir/Patient/{created['id']}/_history/9", headers=custodian_headers)
    assert response.status_code == 404


def test_a_resource_failing_the_r4b_model_is_400_naming_the_path_and_not_stored(client, custodian_headers):
    response = client.post("/fhir/Patient", json=patient(birthDate="1970-13-45"), headers=custodian_headers)
    assert response.status_code == 400
    found = issue(response)
    assert found["expression"] == ["Patient.birthDate"]
    assert "Patient.birthDate" in found["diagnostics"]
    assert search(client, custodian_headers, "Patient?_summary=count")["total"] == 0


def test_an_unknown_element_is_400(client, custodian_headers):
    response = client.post("/fhir/Patient", json=patient(favouriteColour="blue"), headers=custodian_headers)
    assert response.status_code == 400
    assert "favouriteColour" in issue(response)["diagnostics"]


def test_a_resource_type_that_differs_from_the_url_is_400(client, custodian_headers):
    response = client.post("/fhir/Observation", json=patient(), headers=custodian_headers)
    assert response.status_code == 400


def test_malformed_json_is_400(client, custodian_headers):
    response = client.post("/fhir/Patient", data=b'{"resourceType": "Patient",', headers=custodian_headers)
    assert response.status_code == 400
    assert "JSON" in issue(response)["diagnostics"]


def test_plain_application_json_is_accepted(client, custodian_headers):
    headers = {**custodian_headers, "Content-Type": "application/json"}
    response = client.post("/fhir/Patient", data=json.dumps(patient()), headers=headers)
    assert response.status_code == 201


def test_a_wrong_content_type_is_415(client, custodian_headers):
    headers = {**custodian_headers, "Content-Type": "application/fhir+xml"}
    response = client.post("/fhir/Patient", data="<Patient/>", headers=headers)
    assert response.status_code == 415
    assert issue(response)["code"] == "not-supported"


def test_asking_for_xml_is_406(client, custodian_headers):
    response = client.get("/fhir/Patient?_format=xml", headers=custodian_headers)
    assert response.status_code == 406


def test_a_body_over_the_limit_is_413(app, client, custodian_headers):
    app.config["MAX_CONTENT_LENGTH"] = 1000
    big = patient(family="x" * 2000)
    response = client.post("/fhir/Patient", json=big, headers=custodian_headers)
    assert response.status_code == 413
    assert issue(response)["code"] == "too-costly"


def test_conditional_create_returns_the_existing_match(client, custodian_headers):
    identifier = [{"system": "urn:mrn", "value": "M-1"}]
    first = create(client, custodian_headers, patient(identifier=identifier))
    response = client.post("/fhir/Patient", json=patient(identifier=identifier),
                           headers={**custodian_headers, "If-None-Exist": "identifier=urn:mrn|M-1"})
    assert response.status_code == 200
    assert response.get_json()["id"] == first["id"]
    assert search(client, custodian_headers, "Patient?_summary=count")["total"] == 1


def test_prefer_return_minimal_sends_no_body(client, custodian_headers):
    response = client.post("/fhir/Patient", json=patient(),
                           headers={**custodian_headers, "Prefer": "return=minimal"})
    assert response.status_code == 201
    assert response.data == b""
    assert response.headers["Location"]


def test_an_unsupported_method_is_405_operation_outcome(client, custodian_headers):
    created = create(client, custodian_headers, patient())
    response = client.post(f"/fhir/Patient/{created['id']}", json=patient(), headers=custodian_headers)
    assert response.status_code == 405
    assert issue(response)["code"] == "not-supported"


def test_observation_round_trips_with_its_references(client, custodian_headers):
    subject = create(client, custodian_headers, patient())
    created = create(client, custodian_headers, observation(subject["id"]))
    assert created["subject"] == {"reference": f"Patient/{subject['id']}"}
