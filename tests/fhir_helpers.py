"""Small builders shared by the FHIR API tests (no logic under test lives here)."""
from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient


def write_corpus(client: FlaskClient, headers: dict[str, str], patients: int, seed: int
                 ) -> tuple[list[dict[str, Any]], set[str]]:
    """The synthetic corpus (organisations and `patients` patients) written through the API: the stored
    Patients, and every identifying value of what was written and stored, the Patients' ids included."""
    from service import synthetic

    written: list[dict[str, Any]] = []
    for bundle in list(synthetic.organisation_bundles(seed)) + list(synthetic.patient_bundles(patients, seed)):
        response = client.post("/fhir", json=bundle, headers=headers)
        assert response.status_code == 200, response.get_json()
        written += [entry["resource"] for entry in bundle["entry"] if "resource" in entry]
    stored = client.get("/fhir/Patient?_count=100", headers=headers).get_json()["entry"]
    people = [entry["resource"] for entry in stored]
    secrets = {person["id"] for person in people}
    for resource in written + people:
        secrets |= identifying_values(resource)
    return people, secrets


def identifying_values(resource: dict[str, Any]) -> set[str]:
    """A resource's names, phones, identifiers and birth date (values of at least 4 characters): what
    no log line or metric label may carry."""
    found: set[str] = set()
    names = resource.get("name") or ()
    for name in [names] if isinstance(names, str) else names:  # an Organization's name is a string
        found.update([name] if isinstance(name, str) else name.get("given") or ())
        found.update([name["family"]] if isinstance(name, dict) and name.get("family") else [])
    found.update(t["value"] for t in resource.get("telecom") or () if t.get("value"))
    found.update(i["value"] for i in resource.get("identifier") or () if i.get("value"))
    found.update([resource["birthDate"]] if resource.get("birthDate") else [])
    return {value for value in found if len(value) >= 4}


def patient(family: str = "Dupont", given: str = "Jean", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family, "given": [given]}], **extra}


def observation(patient_id: str, code: str = "8480-6", value: float = 120.0, when: str = "2020-03-04T10:00:00Z",
                unit: str = "mm[Hg]", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
        **extra,
    }


def create(client: FlaskClient, headers: dict[str, str], resource: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def create_all(client: FlaskClient, headers: dict[str, str], entries: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Create every (fullUrl, resource) in one transaction Bundle (a resource may reference another
    by its `urn:uuid:` fullUrl); the ids the server gave, in order."""
    response = client.post("/fhir", json=transaction(*(post_entry(resource, url) for url, resource in entries)),
                           headers=headers)
    assert response.status_code == 200, response.get_json()
    return [entry["response"]["location"].split("/")[1] for entry in response.get_json()["entry"]]


def search(client: FlaskClient, headers: dict[str, str], query: str) -> dict[str, Any]:
    response = client.get(f"/fhir/{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


def issue(response: Any) -> dict[str, Any]:
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"][0]


def transaction(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def post_entry(resource: dict[str, Any], full_url: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}
    if full_url:
        entry["fullUrl"] = full_url
    return entry
