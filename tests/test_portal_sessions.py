"""Portal sessions, CSRF, headers, cookies and error pages (consent/web/sessions.py, consent/web/__init__.py).

Sessions are database rows: a new id at sign-in, 30 minutes idle at most, ended by sign-out
(this device) or sign-out everywhere (every device). Every POST needs its CSRF token, or the
patient gets the "form expired" page and nothing changes. Every response under /consent/ has
the security headers, errors included, and every error there is an HTML page in the patient's
language; the API keeps its JSON OperationOutcome.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update

from consent.web import SECURITY_HEADERS, bp, sessions, views_account
from service import db
from service.store.schema import invitations, patient_accounts, rate_limits, web_sessions
from tests.portal_helpers import (
    accept,
    csrf,
    form_token,
    invite,
    patient_with_number,
    session_cookie,
    sign_in,
    signed_in_patient,
)
from tests.test_host import configure

TEMPLATES = Path(__file__).resolve().parent.parent / "consent" / "web" / "templates"
MINUTE_US = 60 * 1_000_000


@pytest.fixture
def patient(app: Flask, client: FlaskClient, custodian_headers: dict[str, str]) -> FlaskClient:
    """`client`, signed in as patient `pat-1` (number `MRN-1`)."""
    return signed_in_patient(app, client, custodian_headers, "pat-1", "MRN-1")


def sessions_of(app: Flask, patient_id: str) -> int:
    with app.app_context(), db.read() as conn:
        return conn.execute(select(func.count()).select_from(web_sessions)
                            .where(web_sessions.c.patient_id == patient_id)).scalar_one()


def idle(app: Flask, client: FlaskClient, minutes: int) -> None:
    """Make the client's session look idle for `minutes`."""
    id_hash = hashlib.sha256(session_cookie(client).encode()).hexdigest()
    with app.app_context(), db.write() as conn:
        conn.execute(update(web_sessions).where(web_sessions.c.id_hash == id_hash)
                     .values(last_seen=db.now_us() - minutes * MINUTE_US))


def text(response) -> str:
    return response.get_data(as_text=True)


def is_signed_in(client: FlaskClient) -> bool:
    """Whether the browser has a live session: the sign-in page then sends it on to the home page."""
    response = client.get("/consent/signin")
    assert response.status_code in (200, 302)
    return response.status_code == 302


# -- sessions --------------------------------------------------------------------------------------


def test_a_signed_in_page_without_a_session_sends_to_sign_in(client):
    response = client.get("/consent/")
    assert response.status_code == 302
    assert response.headers["Location"] == "/consent/signin"


def test_a_session_lives_while_used_and_ends_after_thirty_idle_minutes(app, patient):
    idle(app, patient, 29)
    assert is_signed_in(patient)  # and the idle clock restarts
    idle(app, patient, 31)
    response = patient.get("/consent/")
    assert response.status_code == 302 and response.headers["Location"] == "/consent/signin"
    assert sessions_of(app, "pat-1") == 0
    assert session_cookie(patient) is None  # the dead cookie is dropped


def test_abandoned_sessions_are_deleted_when_anyone_signs_in(app, custodian_headers, patient):
    idle(app, patient, 31)  # never comes back
    assert sessions_of(app, "pat-1") == 1
    signed_in_patient(app, app.test_client(), custodian_headers, "pat-2", "MRN-2")
    assert sessions_of(app, "pat-1") == 0


def test_a_form_posted_after_the_session_ended_gets_the_session_expired_page(app, patient):
    token = form_token(patient)
    idle(app, patient, 31)
    response = patient.post("/consent/signout", data={"csrf_token": token})
    assert response.status_code == 401
    assert "Your session has ended, so nothing was changed" in text(response)


def test_sign_out_ends_the_session_and_its_cookie_for_good(app, patient):
    stolen = session_cookie(patient)
    response = patient.post("/consent/signout", data={"csrf_token": form_token(patient)})
    assert response.status_code == 303 and response.headers["Location"] == "/consent/signed-out"
    assert session_cookie(patient) is None
    assert sessions_of(app, "pat-1") == 0
    replay = app.test_client()
    replay.set_cookie(sessions.COOKIE, stolen, path="/consent")
    assert not is_signed_in(replay)


def test_sign_out_everywhere_ends_every_session_of_the_patient_only(app, client, custodian_headers, patient):
    other_device = app.test_client()
    assert sign_in(other_device, "MRN-1").status_code == 303
    someone_else = signed_in_patient(app, app.test_client(), custodian_headers, "pat-2", "MRN-2")
    assert sessions_of(app, "pat-1") == 2
    response = patient.post("/consent/signout-everywhere", data={"csrf_token": form_token(patient)})
    assert response.status_code == 303
    assert "every device" in text(patient.get(response.headers["Location"]))
    assert sessions_of(app, "pat-1") == 0
    assert not is_signed_in(other_device)
    assert is_signed_in(someone_else)


# -- CSRF ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "", "forged-token"])
def test_sign_out_without_the_right_token_is_refused_and_changes_nothing(app, patient, token):
    data = {} if token is None else {"csrf_token": token}
    response = patient.post("/consent/signout", data=data)
    assert response.status_code == 400
    assert "This form has expired" in text(response)
    assert sessions_of(app, "pat-1") == 1
    assert is_signed_in(patient)


def test_every_form_of_the_portal_needs_the_token(app, patient):
    """Whatever the page, a POST without the session's token gets the "form expired" page."""
    posts = sorted(rule.rule for rule in app.url_map.iter_rules()
                   if rule.endpoint.startswith(f"{bp.name}.") and "POST" in rule.methods)
    assert "/consent/signin" in posts and "/consent/signout" in posts
    for path in posts:
        url = re.sub(r"<(?:[a-z]+:)?[a-z_]+>", "x", path)
        response = patient.post(url, data={"csrf_token": "forged-token"})
        assert response.status_code == 400 and "This form has expired" in text(response), url
    assert sessions_of(app, "pat-1") == 1 and is_signed_in(patient)


def test_the_session_token_is_not_the_pre_session_one(app, patient):
    nonce = patient.get_cookie(sessions.FORM_COOKIE, path="/consent")
    assert nonce is not None
    response = patient.post("/consent/signout", data={"csrf_token": nonce.value})
    assert response.status_code == 400
    assert sessions_of(app, "pat-1") == 1


@pytest.mark.parametrize("token", [None, "forged-token"])
def test_sign_in_without_the_right_token_is_refused_before_anything_is_counted(
        app, client, custodian_headers, token):
    patient_with_number(client, custodian_headers, "pat-1", "MRN-1")
    assert accept(app.test_client(), invite(app, "MRN-1")).status_code == 303
    client.get("/consent/signin")
    data = {"number": "MRN-1", "passphrase": "violet kettle harbour 42"}
    response = client.post("/consent/signin", data=data if token is None else {**data, "csrf_token": token})
    assert response.status_code == 400 and "This form has expired" in text(response)
    assert session_cookie(client) is None
    with app.app_context(), db.read() as conn:
        assert conn.execute(select(rate_limits).where(
            rate_limits.c.bucket.startswith(views_account.SIGN_IN_BUCKET))).all() == []
        assert conn.execute(select(patient_accounts.c.failed)).scalar_one() == 0


def test_an_invitation_posted_without_the_token_stays_unused(app, client, custodian_headers):
    patient_with_number(client, custodian_headers, "pat-1", "MRN-1")
    link = invite(app, "MRN-1")
    client.get(link)
    response = client.post(link.split("?")[0], data={"passphrase": "violet kettle harbour 42",
                                                     "confirm": "violet kettle harbour 42"})
    assert response.status_code == 400
    with app.app_context(), db.read() as conn:
        assert conn.execute(select(invitations.c.used)).scalar_one() is None
        assert conn.execute(select(patient_accounts.c.passphrase)).scalar_one() is None


def test_a_token_from_another_browser_is_refused(app, client, custodian_headers):
    patient_with_number(client, custodian_headers, "pat-1", "MRN-1")
    link = invite(app, "MRN-1")
    attacker = app.test_client()
    token = csrf(attacker.get("/consent/signin"))
    client.get(link)
    response = client.post(link.split("?")[0], data={"csrf_token": token, "passphrase": "violet kettle harbour 42",
                                                     "confirm": "violet kettle harbour 42"})
    assert response.status_code == 400


# -- headers, cookies, errors ----------------------------------------------------------------------


def _assert_secure_headers(response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.status_code)
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]


def test_every_portal_response_has_the_security_headers(app, client, custodian_headers):
    patient_with_number(client, custodian_headers, "pat-1", "MRN-1")
    link = invite(app, "MRN-1")
    responses = [
        client.get("/consent/signin"),
        client.get(link),
        client.get("/consent/signed-out"),
        client.get("/consent/static/portal.css"),
        client.get("/consent/"),                                      # redirect to sign-in
        client.get("/consent/no-such-page"),                          # 404
        client.delete("/consent/signin"),                             # 405
        client.post("/consent/signin", data={}),                      # 400, form expired
        client.get("/consent/invite/unknown"),                        # 410
        client.get("/consent/signin", headers={"Host": "evil.example"}),  # 400, refused Host
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 302, 404, 405, 400, 410, 400]
    for response in responses:
        _assert_secure_headers(response)


def test_portal_errors_are_pages_in_the_patients_language(client):
    for response, status in ((client.get("/consent/no-such-page", headers={"Accept-Language": "fr"}), 404),
                             (client.delete("/consent/signin", headers={"Accept-Language": "fr"}), 405),
                             (client.get("/consent/signin", headers={"Host": "evil.example",
                                                                     "Accept-Language": "fr"}), 400)):
        assert response.status_code == status
        assert response.mimetype == "text/html"
        assert 'lang="fr"' in text(response) and "Désolé, cela n’a pas fonctionné" in text(response)
        assert "OperationOutcome" not in text(response) and "evil.example" not in text(response)


def test_the_api_keeps_its_json_errors_and_its_headers(client):
    for response in (client.get("/no-such-path"), client.delete("/healthz"), client.get("/consentx")):
        assert response.mimetype == "application/fhir+json"
        assert response.get_json()["resourceType"] == "OperationOutcome"
        assert "Content-Security-Policy" not in response.headers
    assert client.delete("/healthz").headers["Allow"]


def test_portal_pages_take_no_bearer_token_but_the_host_check_still_applies(app, client):
    assert client.get("/consent/signin").status_code == 200
    configure(app, PASSERELLE_BASE_URL="https://portal.example.org")
    assert client.get("/consent/signin", headers={"Host": "portal.example.org"}).status_code == 200
    assert client.get("/consent/signin", headers={"Host": "localhost"}).status_code == 400


def _cookie_flags(response, name: str) -> str:
    headers = [h for h in response.headers.getlist("Set-Cookie") if h.startswith(f"{name}=")]
    assert headers, f"no {name} cookie set"
    return headers[0]


def test_cookies_are_httponly_samesite_lax_and_scoped_to_the_portal(app, client, custodian_headers):
    patient_with_number(client, custodian_headers, "pat-1", "MRN-1")
    response = accept(client, invite(app, "MRN-1"))
    flags = _cookie_flags(response, sessions.COOKIE)
    assert "HttpOnly" in flags and "SameSite=Lax" in flags and "Path=/consent" in flags
    assert "Secure" not in flags  # plain http, on a loopback test client
    assert "Expires" not in flags and "Max-Age" not in flags  # ends with the browser


def test_cookies_are_secure_under_https(app, client, custodian_headers):
    patient_with_number(client, custodian_headers, "pat-1", "MRN-1")
    link = invite(app, "MRN-1")
    https = app.test_client()
    page = https.get(link, base_url="https://localhost")
    assert "Secure" in _cookie_flags(page, sessions.FORM_COOKIE)
    response = https.post(link.split("?")[0], base_url="https://localhost",
                          data={"csrf_token": csrf(page), "passphrase": "violet kettle harbour 42",
                                "confirm": "violet kettle harbour 42"})
    assert "Secure" in _cookie_flags(response, sessions.COOKIE)
    configure(app, PASSERELLE_BASE_URL="https://portal.example.org")  # TLS ends at the proxy
    behind_proxy = app.test_client().get("/consent/signin?lang=fr", headers={"Host": "portal.example.org"})
    assert "Secure" in _cookie_flags(behind_proxy, "lang")


# -- every view declares its access; no inline style or script -------------------------------------


def test_every_portal_view_is_signed_in_or_public(app):
    undeclared = sorted(rule.endpoint for rule in app.url_map.iter_rules()
                        if rule.endpoint.startswith(f"{bp.name}.") and rule.endpoint != f"{bp.name}.static"
                        and getattr(app.view_functions[rule.endpoint], "portal_access", None) is None)
    assert undeclared == [], f"mark these views @signed_in or @public (consent/web/sessions.py): {undeclared}"


def test_a_portal_view_without_a_declaration_is_refused(app):
    app.add_url_rule("/consent/undeclared", "consent_web.undeclared", lambda: "reached")
    response = app.test_client().get("/consent/undeclared")
    assert response.status_code == 500
    assert "reached" not in text(response)


def test_no_template_has_inline_style_or_script():
    """The CSP forbids them; the printable letter (a file, never served) is the one exception."""
    offending = {}
    for template in TEMPLATES.glob("*.html"):
        if template.name == "letter.html":
            continue
        source = template.read_text(encoding="utf-8")
        found = re.findall(r"<script|<style|\sstyle=|\son[a-z]+=|javascript:", source, re.IGNORECASE)
        if found:
            offending[template.name] = found
    assert offending == {}
