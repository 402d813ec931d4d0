"""An independent check: the official FHIR R4 JSON schema (the specification's
`fhir.schema.json`, shipped in service/validation/data) judges what the server generates,
stores and releases — synthetic data, resources read back, research reads, searches and
exports after de-identification, CapabilityStatements and OperationOutcomes.

The schema is applied here as published, through its top-level `oneOf` over every resource
type and with jsonschema_rs, not through the server's validation code.
"""
from __future__ import annotations

from typing import Any

import jsonschema_rs
import orjson
import pytest

from service import synthetic
from service.validation.r4 import DATA
from tests.test_export import _files, _manifest

SAMPLE_PATIENTS = 4


SCHEMA = orjson.loads((DATA / "fhir-r4.schema.json").read_bytes())


@pytest.fixture(scope="module")
def r4() -> Any:
    return jsonschema_rs.Draft6Validator(SCHEMA)


def _why(resource: dict[str, Any]) -> list[str]:
    """What the definition of the resource's own type says is wrong (the `oneOf` only says none matched)."""
    one_type = jsonschema_rs.Draft6Validator({"$ref": f"#/definitions/{resource.get('resourceType')}",
                                              "definitions": SCHEMA["definitions"]})
    return [f"{'/'.join(map(str, e.instance_path))}: {e.message[:300]}" for e in one_type.iter_errors(resource)][:3]


def assert_valid_r4(validator: Any, resource: dict[str, Any]) -> None:
    assert validator.is_valid(resource), (
        f"{resource.get('resourceType')}/{resource.get('id')} is not valid R4: {_why(resource)}")


def test_synthetic_patient_bundles_are_valid_r4(r4):
    for bundle in synthetic.patient_bundles(SAMPLE_PATIENTS, 0):
        assert_valid_r4(r4, bundle)


def test_synthetic_organisation_bundles_are_valid_r4(r4):
    for bundle in synthetic.organisation_bundles(0):
        assert_valid_r4(r4, bundle)


def test_demo_data_read_back_from_the_custodian_api_is_valid_r4(app, client, custodian_headers, r4):
    """The searchset of each of the types the demo data has most of, after one load of it (~800 resources)."""
    result = app.test_cli_runner().invoke(args=["demo-data", "--patients", "2"])
    assert result.exit_code == 0, result.output
    for resource_type in ("Patient", "Observation", "Condition", "Encounter", "MedicationRequest"):
        searchset = client.get(f"/fhir/{resource_type}?_count=50", headers=custodian_headers).get_json()
        assert searchset["entry"], resource_type
        assert_valid_r4(r4, searchset)


def test_capability_statements_are_valid_r4(client, r4):
    assert_valid_r4(r4, client.get("/fhir/metadata").get_json())
    assert_valid_r4(r4, client.get("/research/fhir/metadata").get_json())


def test_an_operation_outcome_is_valid_r4(client, custodian_headers, r4):
    refused = client.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "x"}, headers=custodian_headers)
    assert refused.status_code == 400
    assert_valid_r4(r4, refused.get_json())


@pytest.mark.parametrize("resource_type", ["Patient", "Observation", "Condition"])
def test_research_search_results_are_valid_r4(client, world, research, r4, resource_type):
    searchset = client.get(f"/research/fhir/{resource_type}", headers=research).get_json()
    assert searchset["resourceType"] == "Bundle", searchset
    assert_valid_r4(r4, searchset)


def test_a_research_read_is_valid_r4(client, world, research, r4):
    searchset = client.get("/research/fhir/Patient", headers=research).get_json()
    first = searchset["entry"][0]["resource"]
    assert_valid_r4(r4, client.get(f"/research/fhir/Patient/{first['id']}", headers=research).get_json())


def test_research_export_files_are_valid_r4(app, client, world, research, export_worker, r4):
    files = _files(client, _manifest(app, client, export_worker, research), research)
    assert files
    for content in files.values():
        for line in content.splitlines():
            assert_valid_r4(r4, orjson.loads(line))
