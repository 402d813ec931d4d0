"""The server speaks FHIR R4 on the wire: its CapabilityStatements say 4.0.1, it honours
`fhirVersion=4.0` in Accept and Content-Type and refuses other versions and formats (406 for
what it cannot answer with, 415 for what it cannot read), and it serves no resource type R4
lacks."""
from __future__ import annotations

import json

import pytest

from tests.fhir_helpers import create, issue, patient


def test_the_custodian_capability_statement_declares_fhir_r4(client):
    assert client.get("/fhir/metadata").get_json()["fhirVersion"] == "4.0.1"


def test_the_research_capability_statement_declares_fhir_r4(client):
    assert client.get("/research/fhir/metadata").get_json()["fhirVersion"] == "4.0.1"


@pytest.mark.parametrize("version", ["4.0", "4.0.1"])
def test_accept_with_fhir_version_4_0_is_answered(client, custodian_headers, version):
    headers = {**custodian_headers, "Accept": f"application/fhir+json; fhirVersion={version}"}
    assert client.get("/fhir/Patient", headers=headers).status_code == 200


@pytest.mark.parametrize("version", ["4.3", "5.0", "3.0"])
def test_accept_with_another_fhir_version_is_406(client, custodian_headers, version):
    headers = {**custodian_headers, "Accept": f"application/fhir+json; fhirVersion={version}"}
    response = client.get("/fhir/Patient", headers=headers)
    assert response.status_code == 406
    assert issue(response)["code"] == "not-supported"


def test_accept_xml_is_406_with_an_operation_outcome(client, custodian_headers):
    response = client.get("/fhir/Patient", headers={**custodian_headers, "Accept": "application/fhir+xml"})
    assert response.status_code == 406
    assert "fhir+xml" in issue(response)["diagnostics"]


def test_format_xml_is_406(client, custodian_headers):
    response = client.get("/fhir/Patient?_format=xml", headers=custodian_headers)
    assert response.status_code == 406
    assert issue(response)["code"] == "not-supported"


def test_format_with_fhir_version_4_3_is_406(client, custodian_headers):
    response = client.get("/fhir/Patient", query_string={"_format": "application/fhir+json;fhirVersion=4.3"},
                          headers=custodian_headers)
    assert response.status_code == 406


def test_accept_xml_on_the_research_api_is_406(client, research):
    response = client.get("/research/fhir/Patient", headers={**research, "Accept": "application/fhir+xml"})
    assert response.status_code == 406


def test_accept_preferring_xml_but_admitting_json_is_answered_in_json(client, custodian_headers):
    headers = {**custodian_headers, "Accept": "application/fhir+xml;q=1.0, application/fhir+json;q=0.5"}
    response = client.get("/fhir/Patient", headers=headers)
    assert response.status_code == 200
    assert response.mimetype == "application/fhir+json"


def test_accept_anything_is_answered(client, custodian_headers):
    assert client.get("/fhir/Patient", headers={**custodian_headers, "Accept": "*/*"}).status_code == 200


def test_content_type_with_fhir_version_4_0_is_read(client, custodian_headers):
    headers = {**custodian_headers, "Content-Type": "application/fhir+json; fhirVersion=4.0"}
    assert client.post("/fhir/Patient", data=json.dumps(patient()), headers=headers).status_code == 201


def test_content_type_with_fhir_version_4_3_is_415_and_stores_nothing(client, custodian_headers):
    headers = {**custodian_headers, "Content-Type": "application/fhir+json; fhirVersion=4.3"}
    response = client.post("/fhir/Patient", data=json.dumps(patient()), headers=headers)
    assert response.status_code == 415
    assert "4.3" in issue(response)["diagnostics"]
    count = client.get("/fhir/Patient?_summary=count", headers=custodian_headers).get_json()["total"]
    assert count == 0


@pytest.mark.parametrize("resource_type", ["Citation", "SubscriptionTopic", "Ingredient"])
def test_a_resource_type_only_r4b_defines_is_404_on_the_custodian_api(client, custodian_headers, resource_type):
    response = client.get(f"/fhir/{resource_type}", headers=custodian_headers)
    assert response.status_code == 404
    assert issue(response)["code"] == "not-found"


def test_a_resource_type_r4b_no_longer_defines_is_404(client, custodian_headers):
    # EffectEvidenceSynthesis is R4's; the R4B models every resource is also checked against lack it.
    assert client.get("/fhir/EffectEvidenceSynthesis", headers=custodian_headers).status_code == 404


def test_a_resource_type_only_r4b_defines_is_404_on_the_research_api(client, research):
    assert client.get("/research/fhir/Citation", headers=research).status_code == 404


def test_the_capability_statement_lists_no_type_r4_lacks(client):
    listed = {entry["type"] for entry in client.get("/fhir/metadata").get_json()["rest"][0]["resource"]}
    assert "Citation" not in listed
    assert {"Patient", "Observation", "Consent"} <= listed


def test_a_created_resource_is_read_back_with_accept_fhir_version_4_0(client, custodian_headers):
    created = create(client, custodian_headers, patient())
    headers = {**custodian_headers, "Accept": "application/fhir+json; fhirVersion=4.0"}
    response = client.get(f"/fhir/Patient/{created['id']}", headers=headers)
    assert response.status_code == 200
    assert response.get_json()["id"] == created["id"]
