"""The API contract: /openapi.json describes every route of the app, /docs renders it from the
installed Swagger UI package, and the CapabilityStatements list the operations with their
OperationDefinitions."""
from __future__ import annotations

import re

import pytest
from flask import Flask, Response
from flask.testing import FlaskClient

from service.api import capability, openapi
from service.validation import model_for

FHIR_JSON = "application/fhir+json"


def test_every_route_and_method_is_in_the_document(app: Flask, client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    assert document["openapi"] == "3.1.0"
    served = {(method.lower(), openapi.openapi_path(rule)) for method, rule in openapi.routes(app)}
    described = {(method, path) for path, item in document["paths"].items() for method in item}
    assert served == described
    assert {"/fhir/{resource_type}", "/research/fhir/$aggregate", "/auth/token", "/consent/signin", "/healthz",
            "/openapi.json", "/docs"} <= set(document["paths"])


def test_a_route_without_a_description_fails(app: Flask) -> None:
    app.add_url_rule("/undescribed", "undescribed", lambda: "")
    with pytest.raises(openapi.Undescribed, match="GET /undescribed"):
        openapi.document(app)


def test_every_description_names_a_route(app: Flask) -> None:
    served = {(method, openapi.openapi_path(rule)) for method, rule in openapi.routes(app)}
    assert set(openapi.OPERATIONS) <= served


def test_fhir_errors_are_operation_outcomes_and_portal_forms_are_form_bodies(client: FlaskClient) -> None:
    paths = client.get("/openapi.json").get_json()["paths"]
    read = paths["/fhir/{resource_type}/{resource_id}"]["get"]
    assert read["responses"]["4XX"]["content"][FHIR_JSON]["schema"] == {"$ref": "#/components/schemas/OperationOutcome"}
    assert read["security"] == [{"bearer": []}]
    assert {p["name"]: p["in"] for p in read["parameters"]} == {"resource_type": "path", "resource_id": "path",
                                                                "_format": "query", "If-None-Match": "header",
                                                                "If-Modified-Since": "header"}
    explain = {p["name"]: p["required"] for p in paths["/fhir/Consent/$explain"]["get"]["parameters"]}
    assert explain == {"patient": True, "project": True}
    signin = paths["/consent/signin"]["post"]
    form = signin["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]
    assert set(form["required"]) == {"csrf_token", "number", "passphrase"}
    assert {"200", "303", "4XX"} <= set(signin["responses"])
    assert "text/html" in signin["responses"]["4XX"]["content"]
    token = paths["/auth/token"]["post"]
    assert token["security"] == [] and "4XX" in token["responses"]
    file_no = paths["/research/fhir/_export/{job_id}/file/{file_no}"]["get"]["parameters"][1]
    assert file_no["name"] == "file_no" and file_no["schema"]["type"] == "integer"


def _assets(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', page)


def test_docs_renders_the_document_with_swagger_ui_from_the_package(client: FlaskClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "<script>" not in html and "http" not in html  # no inline script, nothing from elsewhere
    policy = dict(directive.strip().split(" ", 1) for directive in page.headers["Content-Security-Policy"].split(";"))
    assert policy["script-src"] == "'self'" and policy["connect-src"] == "'self'" and policy["default-src"] == "'none'"
    assets = _assets(html)
    assert "/docs/static/swagger-ui-bundle.js" in assets
    for asset in assets:
        served: Response = client.get(asset)
        assert served.status_code == 200, asset
        if asset.startswith("/docs/static/"):
            assert served.data == (openapi.SWAGGER_UI / asset.removeprefix("/docs/static/")).read_bytes()
    initializer = client.get("/docs/swagger-initializer.js").get_data(as_text=True)
    assert '"/openapi.json"' in initializer
    assert client.get("/docs/static/../../../etc/passwd").status_code == 404


def _operations(statement: dict) -> dict[str, str]:
    rest = statement["rest"][0]
    found = {f"system ${op['name']}": op["definition"] for op in rest.get("operation", [])}
    for resource in rest["resource"]:
        found |= {f"{resource['type']} ${op['name']}": op["definition"] for op in resource.get("operation", [])}
    return found


@pytest.mark.parametrize(("metadata", "expected"), [
    ("/fhir/metadata", {"Consent $explain", "ResearchStudy $budget"}),
    ("/research/fhir/metadata", {"system $export", "Patient $export", "system $aggregate", "system $budget"}),
])
def test_capability_statements_list_the_operations_with_definitions_they_serve(
        client: FlaskClient, metadata: str, expected: set[str]) -> None:
    operations = _operations(client.get(metadata).get_json())
    assert expected <= set(operations)
    for definition_url in operations.values():
        path = definition_url.removeprefix("http://localhost")
        answer = client.get(path)
        assert answer.status_code == 200 and answer.mimetype == FHIR_JSON, path
        definition = answer.get_json()
        assert definition["url"] == definition_url
        model_for("OperationDefinition").model_validate(definition)


def test_every_operation_has_a_valid_definition() -> None:
    for operation in capability.OPERATIONS:
        definition = capability.operation_definition("https://passerelle.example/fhir", operation)
        model_for("OperationDefinition").model_validate(definition)
        assert definition["url"] == f"https://passerelle.example/fhir/OperationDefinition/{operation.id}"


def test_other_operation_definitions_are_stored_resources_as_before(
        client: FlaskClient, custodian_headers: dict[str, str]) -> None:
    stored = {"resourceType": "OperationDefinition", "id": "local-op", "name": "LocalOp", "status": "draft",
              "kind": "operation", "code": "local", "system": True, "type": False, "instance": False}
    headers = {**custodian_headers, "Content-Type": FHIR_JSON}
    assert client.put("/fhir/OperationDefinition/local-op", json=stored, headers=headers).status_code == 201
    read = client.get("/fhir/OperationDefinition/local-op", headers=custodian_headers)
    assert read.status_code == 200 and read.get_json()["code"] == "local"
    assert client.get("/fhir/OperationDefinition/local-op").status_code == 401
