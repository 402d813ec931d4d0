"""Helpers of the consent portal's tests: patients with a number, invitations, signing in.

Everything goes through the real app: the CLI for invitations, the pages for the rest.
"""
from __future__ import annotations

import json
import re
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from consent.patients import IDENTIFIER_TYPES
from consent.web import sessions

PASSPHRASE = "violet kettle harbour 42"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def patient_with_number(client: FlaskClient, custodian_headers: dict[str, str], patient_id: str,
                        number: str) -> None:
    """Store a Patient whose medical record number (identifier of type MR) is `number`."""
    resource: dict[str, Any] = {"resourceType": "Patient", "id": patient_id, "identifier": [
        {"type": {"coding": [{"system": IDENTIFIER_TYPES, "code": "MR"}]}, "system": "urn:mrn", "value": number}]}
    response = client.put(f"/fhir/Patient/{patient_id}", headers=custodian_headers, json=resource)
    assert response.status_code in (200, 201), response.get_json()


def cli(app: Flask, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=list(args))


def invite(app: Flask, patient: str, *extra: str, command: str = "invite") -> str:
    """Invite `patient` (id or number) with `patient invite`; returns the link's path and query."""
    result = cli(app, "patient", command, "--patient", patient, "--base-url", "http://localhost", *extra)
    assert result.exit_code == 0, result.output
    link = json.loads(result.stdout)["link"]
    return link.removeprefix("http://localhost")


def token_of(path: str) -> str:
    return path.split("/consent/invite/")[1].split("?")[0]


def csrf(page: TestResponse) -> str:
    found = _CSRF.search(page.get_data(as_text=True))
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


def accept(client: FlaskClient, link: str, passphrase: str = PASSPHRASE, confirm: str | None = None) -> TestResponse:
    """Open the invitation link and choose `passphrase`."""
    page = client.get(link)
    assert page.status_code == 200, page.get_data(as_text=True)
    return client.post(link.split("?")[0], data={"csrf_token": csrf(page), "passphrase": passphrase,
                                                 "confirm": passphrase if confirm is None else confirm})


def form_token(client: FlaskClient, **request: Any) -> str:
    """The CSRF token this browser's next form carries: the sign-in form's, or (signed in, when the
    sign-in page redirects) that of the sign-out forms of every signed-in page."""
    page = client.get("/consent/signin", **request)
    return csrf(page if page.status_code == 200 else client.get("/consent/signed-out", **request))


def sign_in(client: FlaskClient, number: str, passphrase: str = PASSPHRASE, **request: Any) -> TestResponse:
    return client.post("/consent/signin", data={"csrf_token": form_token(client, **request), "number": number,
                                                "passphrase": passphrase}, **request)


def session_cookie(client: FlaskClient) -> str | None:
    cookie = client.get_cookie(sessions.COOKIE, path="/consent")
    return cookie.value if cookie is not None else None


def signed_in_patient(app: Flask, client: FlaskClient, custodian_headers: dict[str, str], patient_id: str,
                      number: str) -> FlaskClient:
    """`client`, signed in as a newly invited patient who chose `PASSPHRASE`."""
    patient_with_number(client, custodian_headers, patient_id, number)
    response = accept(client, invite(app, number))
    assert response.status_code == 303, response.get_data(as_text=True)
    return client
