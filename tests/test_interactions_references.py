"""Literal references to resources on this server must resolve when a resource is created or updated."""
from __future__ import annotations

import json

from tests.fhir_helpers import create, issue, observation, patient, search


def _performer(reference: str) -> dict:
    return {"reference": reference}


def test_a_reference_to_a_patient_that_does_not_exist_is_422_not_found_naming_the_element(client,
                                                                                          custodian_headers):
    response = client.post("/fhir/Observation", json=observation("does-not-exist"), headers=custodian_headers)
    assert response.status_code == 422
    found = issue(response)
    assert found["code"] == "not-found"
    assert found["expression"] == ["Observation.subject"]
    assert "Patient/does-not-exist" in found["diagnostics"]
    assert search(client, custodian_headers, "Observation?_summary=count")["total"] == 0


def test_the_path_names_the_repetition(client, custodian_headers):
    subject = create(client, custodian_headers, patient())
    sent = observation(subject["id"], performer=[_performer(f"Patient/{subject['id']}"),
                                                 _performer("Practitioner/nobody")])
    response = client.post("/fhir/Observation", json=sent, headers=custodian_headers)
    assert response.status_code == 422
    assert issue(response)["expression"] == ["Observation.performer[1]"]


def test_an_update_to_a_dangling_reference_is_refused_and_changes_nothing(client, custodian_headers):
    subject = create(client, custodian_headers, patient())
    made = create(client, custodian_headers, observation(subject["id"]))
    changed = {**made, "subject": {"reference": "Patient/nobody"}}
    response = client.put(f"/fhir/Observation/{made['id']}", json=changed, headers=custodian_headers)
    assert response.status_code == 422
    stored = client.get(f"/fhir/Observation/{made['id']}", headers=custodian_headers).get_json()
    assert stored["meta"]["versionId"] == "1"


def test_a_reference_to_a_deleted_resource_does_not_resolve(client, custodian_headers):
    subject = create(client, custodian_headers, patient())
    client.delete(f"/fhir/Patient/{subject['id']}", headers=custodian_headers)
    response = client.post("/fhir/Observation", json=observation(subject["id"]), headers=custodian_headers)
    assert response.status_code == 422


def test_a_versioned_reference_and_one_under_this_servers_base_resolve(client, custodian_headers):
    subject = create(client, custodian_headers, patient())
    versioned = observation(subject["id"], subject={"reference": f"Patient/{subject['id']}/_history/1"})
    assert client.post("/fhir/Observation", json=versioned, headers=custodian_headers).status_code == 201
    absolute = observation(subject["id"], subject={"reference": f"http://localhost/fhir/Patient/{subject['id']}"})
    assert client.post("/fhir/Observation", json=absolute, headers=custodian_headers).status_code == 201
    missing = observation(subject["id"], subject={"reference": "http://localhost/fhir/Patient/nobody"})
    assert client.post("/fhir/Observation", json=missing, headers=custodian_headers).status_code == 422


def test_other_servers_contained_and_logical_references_are_not_checked(client, custodian_headers):
    subject = create(client, custodian_headers, patient())
    sent = observation(subject["id"], contained=[{"resourceType": "Practitioner", "id": "p1"}],
                       performer=[_performer("#p1"), _performer("https://elsewhere.example/fhir/Practitioner/9"),
                                  {"identifier": {"system": "urn:rpps", "value": "10001"}}])
    response = client.post("/fhir/Observation", json=sent, headers=custodian_headers)
    assert response.status_code == 201, response.get_json()


def test_a_resource_may_refer_to_itself_when_created_by_put(client, custodian_headers):
    sent = patient(id="self-link", link=[{"other": {"reference": "Patient/self-link"}, "type": "seealso"}])
    response = client.put("/fhir/Patient/self-link", json=sent, headers=custodian_headers)
    assert response.status_code == 201, response.get_json()


# -- bulk loads (CLI `ingest`) --------------------------------------------------------------------

def _ndjson(path, *resources: dict) -> str:
    path.write_text("\n".join(json.dumps(r) for r in resources) + "\n")
    return str(path)


def test_an_ndjson_load_may_refer_to_a_resource_later_in_the_load(app, tmp_path):
    observations = _ndjson(tmp_path / "1-Observation.ndjson", observation("later", id="obs-1"))
    patients = _ndjson(tmp_path / "2-Patient.ndjson", patient(id="later"))
    result = app.test_cli_runner().invoke(args=["ingest", observations, patients])
    assert result.exit_code == 0, result.output


def test_an_ndjson_load_reports_a_reference_that_never_resolves_and_exits_1(app, tmp_path, client,
                                                                            custodian_headers):
    loaded = _ndjson(tmp_path / "Observation.ndjson", observation("nobody", id="obs-2"))
    result = app.test_cli_runner().invoke(args=["ingest", loaded])
    assert result.exit_code == 1
    assert "Observation/obs-2 (stored): Observation.subject: 'Patient/nobody' does not resolve" in result.output
    assert client.get("/fhir/Observation/obs-2", headers=custodian_headers).status_code == 200
