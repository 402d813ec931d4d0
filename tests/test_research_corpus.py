"""The whole synthetic corpus through the research gate: valid R4B, and nothing identifying.

Patients are loaded through the custodian API as Synthea-style transaction Bundles,
all consent to record-level release, and everything a research client can take —
every search page of every type with `_include`, and a Bulk Data export — is checked:
every resource validates against the R4B models, and no name, address line, city,
phone, e-mail, identifier value or exact birth date of the source appears in the raw
bytes of any response or export file.
"""
from __future__ import annotations

from typing import Any

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class

from consent import projects, writer
from service import db, synthetic
from tests.research_world import bearer, token

PATIENTS = 12
SEED = 7


def _identifying(resource: dict[str, Any]) -> set[str]:
    """The strings of a source resource that must never reach a research partner."""
    found: set[str] = set()
    for name in resource.get("name") or ():
        found.update(name.get("given") or ())
        if name.get("family"):
            found.add(name["family"])
    for address in resource.get("address") or ():
        found.update(address.get("line") or ())
        if address.get("city"):
            found.add(address["city"])
    found.update(t["value"] for t in resource.get("telecom") or () if t.get("value"))
    found.update(i["value"] for i in resource.get("identifier") or () if i.get("value"))
    return {value for value in found if len(value) >= 4}


@pytest.fixture
def corpus(app, client, custodian_headers):
    for bundle in synthetic.organisation_bundles(SEED):
        assert client.post("/fhir", json=bundle, headers=custodian_headers).status_code == 200
    for bundle in synthetic.patient_bundles(PATIENTS, SEED):
        response = client.post("/fhir", json=bundle, headers=custodian_headers)
        assert response.status_code == 200, response.get_json()
    patients = client.get("/fhir/Patient?_count=100", headers=custodian_headers).get_json()["entry"]
    people = [e["resource"] for e in patients]
    staff = client.get("/fhir/Practitioner?_count=100", headers=custodian_headers).get_json().get("entry", [])
    with app.app_context(), db.write() as conn:
        # Every type a project can receive, directory types included, so all of them are checked.
        project = projects.create(conn, name="corpus", tier="record", epsilon=1.0,
                                  types=projects.PATIENT_DATA_TYPES + projects.DIRECTORY_TYPES).project_id
        for person in people:
            writer.record(conn, writer.build(person["id"], project, "record", [], source="test"))
    secrets = set()
    for resource in people + [e["resource"] for e in staff]:
        secrets |= _identifying(resource)
    birth_dates = {p["birthDate"] for p in people if len(p.get("birthDate", "")) == 10}
    return project, secrets, birth_dates, {p["id"] for p in people}


def _pages(client, headers, url: str) -> list[bytes]:
    pages = []
    while url:
        response = client.get(url.replace("http://localhost", ""), headers=headers)
        assert response.status_code == 200, response.get_json()
        pages.append(response.data)
        url = next((link["url"] for link in response.get_json()["link"] if link["relation"] == "next"), None)
    return pages


def _validate(resource: dict[str, Any]) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def _check(raw: bytes, secrets: set[str], real_ids: set[str]) -> None:
    for secret in secrets:
        assert secret.encode() not in raw, f"{secret!r} leaked"
    for real in real_ids:
        assert real.encode() not in raw, f"real id {real} leaked"


TYPES = ("Patient", "Encounter", "Condition", "Observation", "Procedure", "MedicationRequest", "Immunization",
         "AllergyIntolerance", "DiagnosticReport", "DocumentReference", "Organization", "Practitioner")


def test_every_searchable_resource_is_valid_and_carries_nothing_identifying(app, client, corpus):
    project, secrets, birth_dates, real_ids = corpus
    headers = bearer(token(client, app, "research", project))
    released = 0
    for resource_type in TYPES:
        include = "&_include=Observation:subject" if resource_type == "Observation" else ""
        for raw in _pages(client, headers, f"/research/fhir/{resource_type}?_count=50{include}"):
            _check(raw, secrets, real_ids)
            for entry in orjson.loads(raw).get("entry", []):
                _validate(entry["resource"])
                released += 1
                if entry["resource"]["resourceType"] == "Patient":
                    assert entry["resource"].get("birthDate", "") not in birth_dates
    assert released > PATIENTS * 10


def test_every_exported_resource_is_valid_and_carries_nothing_identifying(app, client, corpus, export_worker):
    project, secrets, birth_dates, real_ids = corpus
    headers = bearer(token(client, app, "research", project))
    app.config["EXPORT_POLL_SECONDS"] = 0
    kick = client.get("/research/fhir/$export", headers={**headers, "Prefer": "respond-async"})
    export_worker.work()
    manifest = client.get(kick.headers["Content-Location"].replace("http://localhost", ""), headers=headers)
    assert manifest.status_code == 200
    total = 0
    for item in manifest.get_json()["output"]:
        raw = client.get(item["url"].replace("http://localhost", ""), headers=headers).data
        _check(raw, secrets, real_ids)
        lines = raw.splitlines()
        assert len(lines) == item["count"]
        for line in lines:
            resource = orjson.loads(line)
            _validate(resource)
            if resource["resourceType"] == "Patient":
                assert resource.get("birthDate", "") not in birth_dates
        total += len(lines)
    assert total > PATIENTS * 10
