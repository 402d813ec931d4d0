"""Conditional update and delete as transaction entries follow the same rules as on the REST API."""
from __future__ import annotations

from tests.fhir_helpers import create, issue, patient, search, transaction

MRN = "http://hospital.example/mrn"


def _with_mrn(value: str, **extra) -> dict:
    return patient(identifier=[{"system": MRN, "value": value}], **extra)


def _put(resource: dict, url: str) -> dict:
    return {"resource": resource, "request": {"method": "PUT", "url": url}}


def test_a_conditional_update_entry_matching_nothing_creates_under_the_bodys_id(client, custodian_headers):
    response = client.post("/fhir", json=transaction(_put(_with_mrn("TX-1", id="tx-chosen"),
                                                          f"Patient?identifier={MRN}|TX-1")),
                           headers=custodian_headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["entry"][0]["response"]["location"].startswith("Patient/tx-chosen/")


def test_a_conditional_update_entry_updates_the_one_match(client, custodian_headers):
    made = create(client, custodian_headers, _with_mrn("TX-2"))
    response = client.post("/fhir", json=transaction(_put(_with_mrn("TX-2", gender="male"),
                                                          f"Patient?identifier={MRN}|TX-2")),
                           headers=custodian_headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["entry"][0]["response"]["location"] == f"Patient/{made['id']}/_history/2"


def test_a_conditional_update_entry_naming_another_id_than_the_match_is_400(client, custodian_headers):
    create(client, custodian_headers, _with_mrn("TX-3"))
    response = client.post("/fhir", json=transaction(_put(_with_mrn("TX-3", id="other"),
                                                          f"Patient?identifier={MRN}|TX-3")),
                           headers=custodian_headers)
    assert response.status_code == 400
    assert issue(response)["expression"] == ["Patient.id"]


def test_a_conditional_delete_entry_matching_several_is_412_and_deletes_nothing(client, custodian_headers):
    create(client, custodian_headers, _with_mrn("TX-4"))
    create(client, custodian_headers, _with_mrn("TX-4"))
    entry = {"request": {"method": "DELETE", "url": f"Patient?identifier={MRN}|TX-4"}}
    response = client.post("/fhir", json=transaction(entry), headers=custodian_headers)
    assert response.status_code == 412
    assert search(client, custodian_headers, f"Patient?identifier={MRN}|TX-4&_summary=count")["total"] == 2
