"""Security headers on every response (service/headers.py)."""
from __future__ import annotations

from flask import Response

from service.headers import DEFAULT_CSP, secure


def test_every_response_says_nosniff_api_errors_and_portal_alike(client, custodian_headers):
    for path, headers in (("/fhir/metadata", {}), ("/fhir/Patient", custodian_headers), ("/fhir/Patient", {}),
                          ("/nowhere", {}), ("/consent/signin", {}), ("/.well-known/smart-configuration", {})):
        assert client.get(path, headers=headers).headers["X-Content-Type-Options"] == "nosniff", path


def test_hsts_only_over_https_or_behind_a_proxy_that_says_so(client):
    assert "Strict-Transport-Security" not in client.get("/fhir/metadata").headers
    secure = client.get("/fhir/metadata", base_url="https://localhost")
    assert secure.headers["Strict-Transport-Security"].startswith("max-age=31536000")
    # The test client's peer is 127.0.0.1, a trusted proxy by default (service/proxy.py).
    proxied = client.get("/fhir/metadata", headers={"X-Forwarded-Proto": "https"})
    assert "Strict-Transport-Security" in proxied.headers


def test_hsts_when_the_public_base_url_is_https(app, client):
    app.config["BASE_URL"] = "https://fhir.example.org"
    response = client.get("/fhir/metadata", headers={"Host": "fhir.example.org"})
    assert "Strict-Transport-Security" in response.headers


def test_the_portal_keeps_its_own_strict_csp(client):
    response = client.get("/consent/signin")
    assert response.mimetype == "text/html"
    assert "style-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"


def test_other_html_gets_a_restrictive_csp_and_json_none(app, client):
    with app.test_request_context("/some-page"):
        assert secure(Response("<p>hi</p>", mimetype="text/html")).headers["Content-Security-Policy"] == DEFAULT_CSP
        own = Response("<p>hi</p>", mimetype="text/html", headers={"Content-Security-Policy": "default-src 'self'"})
        assert secure(own).headers["Content-Security-Policy"] == "default-src 'self'"
    assert "Content-Security-Policy" not in client.get("/fhir/metadata").headers
