"""Request limits (service/limits.py): each capped, configurable, answered with an OperationOutcome."""
from __future__ import annotations

import io
from typing import Any

import orjson
import pytest
from werkzeug.datastructures import MultiDict

from consent.web import MAX_BODY_BYTES
from service.config import load_config
from tests.fhir_helpers import issue, patient


def _nested_bundle(levels: int) -> dict:
    extension: dict = {"url": "urn:x", "valueString": "leaf"}
    for _ in range(levels):
        extension = {"url": "urn:x", "extension": [extension]}
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient(extension=[extension]), "request": {"method": "POST", "url": "Patient"}}]}


def _transaction(entries: int) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient(family=f"F{i}"), "request": {"method": "POST", "url": "Patient"}}
        for i in range(entries)]}


def test_a_body_over_the_size_limit_is_413_on_every_api_route(app, client, custodian_headers):
    app.config["MAX_CONTENT_LENGTH"] = 1000
    for path in ("/fhir", "/fhir/Patient", "/fhir/Patient/x"):
        response = client.open(path, method="PUT" if path.endswith("/x") else "POST", data=b"{" + b" " * 2000 + b"}",
                               headers=custodian_headers)
        assert response.status_code == 413, path
        assert issue(response)["code"] == "too-costly"
        assert "1000 bytes" in issue(response)["diagnostics"]


def chunked(body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """Test-client arguments sending `body` with `headers` as gunicorn hands over a chunked body: no
    Content-Length, and a stream the server ends."""
    return {"input_stream": io.BytesIO(body), "headers": {**headers, "Transfer-Encoding": "chunked"},
            "environ_overrides": {"wsgi.input_terminated": True}}


def test_a_body_without_content_length_over_the_size_limit_is_413_and_its_valid_prefix_is_not_stored(
        app, client, custodian_headers):
    app.config["MAX_CONTENT_LENGTH"] = 1000
    body = orjson.dumps(patient(family="Cut")) + b" " * 2000  # its first 1000 bytes are a whole Patient
    response = client.post("/fhir/Patient", **chunked(body, {**custodian_headers,
                                                             "Content-Type": "application/fhir+json"}))
    assert response.status_code == 413
    assert issue(response)["code"] == "too-costly" and "1000 bytes" in issue(response)["diagnostics"]
    assert client.get("/fhir/Patient?family=Cut", headers=custodian_headers).get_json()["total"] == 0


def test_a_body_without_content_length_within_the_size_limit_is_read_whole(app, client, custodian_headers):
    body = orjson.dumps(patient(family="Whole"))
    app.config["MAX_CONTENT_LENGTH"] = len(body)
    response = client.post("/fhir/Patient", **chunked(body, {**custodian_headers,
                                                             "Content-Type": "application/fhir+json"}))
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["name"][0]["family"] == "Whole"


def test_a_form_without_content_length_over_its_limit_is_413_on_the_token_route_and_the_patient_form(app, client):
    app.config["MAX_CONTENT_LENGTH"] = 1000
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    token = client.post("/auth/token", **chunked(b"grant_type=client_credentials&pad=" + b"x" * 2000, form))
    assert token.status_code == 413 and issue(token)["code"] == "too-costly"
    app.config["MAX_CONTENT_LENGTH"] = 10 * MAX_BODY_BYTES  # the portal's own, lower limit applies
    page = client.post("/consent/signin", **chunked(b"number=MRN-1&passphrase=" + b"x" * 2 * MAX_BODY_BYTES, form))
    assert page.status_code == 413 and page.mimetype == "text/html"


def test_a_deeply_nested_bundle_is_400_before_validation_not_a_crash(client, custodian_headers):
    response = client.post("/fhir", json=_nested_bundle(300), headers=custodian_headers)
    assert response.status_code == 400
    assert issue(response)["code"] == "invalid"
    assert "deeper than 64 levels" in issue(response)["diagnostics"]


def test_a_body_at_the_depth_limit_is_accepted_and_the_limit_is_configurable(app, client, custodian_headers):
    # Bundle → entry → [ ] → {entry} → resource → extension → [ ] → the nested extensions.
    assert client.post("/fhir", json=_nested_bundle(25), headers=custodian_headers).status_code == 200
    app.config["MAX_JSON_DEPTH"] = 20
    response = client.post("/fhir", json=_nested_bundle(25), headers=custodian_headers)
    assert response.status_code == 400
    assert "deeper than 20 levels" in issue(response)["diagnostics"]


def test_too_many_search_parameters_are_400_in_the_query_and_in_a_post_search(app, client, custodian_headers):
    app.config["MAX_SEARCH_PARAMS"] = 5
    assert client.get("/fhir/Patient?" + "&".join(["family=a"] * 5), headers=custodian_headers).status_code == 200
    response = client.get("/fhir/Patient?" + "&".join(["family=a"] * 6), headers=custodian_headers)
    assert response.status_code == 400
    assert issue(response)["diagnostics"] == "A request may carry at most 5 parameters; this one has 6"
    form = {**custodian_headers, "Content-Type": "application/x-www-form-urlencoded"}
    response = client.post("/fhir/Patient/_search?family=a&family=b", data="family=c&family=d&family=e&given=f",
                           headers=form)
    assert response.status_code == 400
    assert issue(response)["code"] == "invalid"


def test_a_multipart_search_body_counts_towards_the_parameter_limit(app, client, research):
    """The research search view reads `request.form`, multipart included: so does the limit."""
    app.config["MAX_SEARCH_PARAMS"] = 5
    headers = {"Authorization": research["Authorization"]}
    form = MultiDict([("code", "a"), ("code", "b"), ("code", "c"), ("_count", "2")])
    assert client.post("/research/fhir/Observation/_search?code=e", data=form, headers=headers,
                       content_type="multipart/form-data").status_code == 200
    response = client.post("/research/fhir/Observation/_search?code=e&code=f", data=form, headers=headers,
                           content_type="multipart/form-data")
    assert response.status_code == 400
    assert issue(response)["diagnostics"] == "A request may carry at most 5 parameters; this one has 6"


def test_a_bundle_over_the_entry_limit_is_413_and_nothing_is_stored(app, client, custodian_headers):
    app.config["MAX_BUNDLE_ENTRIES"] = 3
    response = client.post("/fhir", json=_transaction(4), headers=custodian_headers)
    assert response.status_code == 413
    assert issue(response) == {"severity": "error", "code": "too-costly", "expression": ["Bundle.entry"],
                               "diagnostics": "A Bundle may hold at most 3 entries; this one has 4"}
    batch = {**_transaction(4), "type": "batch"}
    assert client.post("/fhir", json=batch, headers=custodian_headers).status_code == 413
    assert client.get("/fhir/Patient", headers=custodian_headers).get_json().get("total", 0) == 0
    assert client.post("/fhir", json=_transaction(3), headers=custodian_headers).status_code == 200


def test_count_above_the_maximum_is_clamped_not_refused(app, client, custodian_headers):
    app.config["MAX_PAGE_SIZE"] = 2
    client.post("/fhir", json=_transaction(3), headers=custodian_headers)
    response = client.get("/fhir/Patient?_count=500", headers=custodian_headers)
    assert response.status_code == 200
    body = response.get_json()
    assert len(body["entry"]) == 2
    assert any(link["relation"] == "next" for link in body["link"])


@pytest.mark.parametrize("name", ["PASSERELLE_MAX_JSON_DEPTH", "PASSERELLE_MAX_SEARCH_PARAMS",
                                  "PASSERELLE_MAX_BUNDLE_ENTRIES", "PASSERELLE_TOKEN_RATE_LIMIT",
                                  "PASSERELLE_RESEARCH_RATE_LIMIT"])
def test_each_limit_is_read_from_the_environment_and_must_be_positive(name):
    key = {"PASSERELLE_MAX_JSON_DEPTH": "MAX_JSON_DEPTH", "PASSERELLE_MAX_SEARCH_PARAMS": "MAX_SEARCH_PARAMS",
           "PASSERELLE_MAX_BUNDLE_ENTRIES": "MAX_BUNDLE_ENTRIES", "PASSERELLE_TOKEN_RATE_LIMIT": "TOKEN_RATE_LIMIT",
           "PASSERELLE_RESEARCH_RATE_LIMIT": "RESEARCH_RATE_LIMIT"}[name]
    assert load_config({name: "7"})[key] == 7
    with pytest.raises(ValueError, match=name):
        load_config({name: "0"})
