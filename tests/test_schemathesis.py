"""Schemathesis against a live server: every operation of /openapi.json, with a custodian's and a
research client's token, on SQLite and PostgreSQL. No answer is a 5xx, and every 4xx of a FHIR
route is an OperationOutcome.

The examples per operation are bounded (`EXAMPLES`, for valid and for invalid requests each); each
example is generated once and sent with each token.
"""
from __future__ import annotations

import json
from typing import Any

import requests
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from service.api.openapi import is_fhir
from service.export import Worker

EXAMPLES = 4


def problems(method: str, path: str, response: schemathesis.Response) -> list[str]:
    """What is wrong with one answer: a 5xx anywhere, or a 4xx of a FHIR route that is no OperationOutcome."""
    where = f"{method} {response.request.path_url} → {response.status_code}"
    if response.status_code >= 500:
        return [f"{where}: a server error: {response.text[:300]}"]
    if 400 <= response.status_code < 500 and is_fhir(path):
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        if not (isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" and body.get("issue")):
            return [f"{where}: a FHIR error that is no OperationOutcome: {response.text[:300]}"]
        media_type = response.headers.get("content-type", [""])[0]
        if not media_type.startswith("application/fhir+json"):
            return [f"{where}: an OperationOutcome as {media_type!r}"]
    return []


def examine(operation: schemathesis.APIOperation, mode: GenerationMode, base_url: str,
            tokens: list[dict[str, str]], session: requests.Session, worker: Worker) -> list[str]:
    """`EXAMPLES` requests generated for one operation in one mode, each sent with every token, and what was
    wrong with the answers."""
    found: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        generated = case.headers or {}
        for token in tokens:
            worker.beat()  # an export worker is alive, so $export is accepted (it beats at most every few seconds)
            case.headers = {**generated, **token}
            response = case.call(base_url=base_url, session=session, timeout=30)
            found.extend(problems(operation.method.upper(), operation.path, response))

    try:
        run()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE, f"{operation.label}: no valid request can be generated"
        # Nothing of this operation can be made invalid (no parameters, no body).
    return found


def fuzz(base_url: str, tokens: list[dict[str, str]], worker: Worker) -> list[str]:
    """Every operation of the live server's own document, valid and invalid requests alike, with each token."""
    schema = schemathesis.openapi.from_dict(requests.get(f"{base_url}/openapi.json", timeout=30).json())
    session = requests.Session()
    session.trust_env = False  # a loopback server: no proxy, no ~/.netrc looked up for every request
    return [problem for result in schema.get_all_operations()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
            for problem in examine(result.ok(), mode, base_url, tokens, session, worker)]


def test_no_operation_answers_5xx_and_fhir_errors_are_operation_outcomes(
        app: Flask, base_url: str, custodian_headers: dict[str, str], research: dict[str, str],
        export_worker: Worker) -> None:
    tokens = [{"Authorization": headers["Authorization"]} for headers in (custodian_headers, research)]
    found = fuzz(base_url, tokens, export_worker)
    assert not found, json.dumps(sorted(set(found)), indent=1, ensure_ascii=False)


# -- what it found, pinned ---------------------------------------------------------------------


def test_an_export_file_number_beyond_any_stored_one_is_not_found(client: FlaskClient,
                                                                   research: dict[str, str]) -> None:
    """Was a 500 on PostgreSQL: the number overflowed the INTEGER column in the query."""
    response = client.get("/research/fhir/_export/some-job/file/177896634429300", headers=research)
    assert response.status_code == 404
    assert response.get_json()["resourceType"] == "OperationOutcome"
