"""The public base URL comes from configuration, never from a request's Host header.

With `PASSERELLE_BASE_URL` every link and the token audience use it, and only its host
and `PASSERELLE_TRUSTED_HOSTS` are served; without it only loopback hosts are served.
"""
from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from service.auth import ASSERTION_TYPE
from service.config import load_config
from tests.fhir_helpers import create, issue, patient
from tests.test_auth import KEY_MAKERS, assertion, jwks_client, public_jwk

BASE = "https://fhir.example.org"


def configure(app: Flask, **env: str) -> None:
    """Apply host settings to a running test app as the environment would set them."""
    loaded = load_config(env)
    app.config.update(BASE_URL=loaded["BASE_URL"], EXTRA_HOSTS=loaded["EXTRA_HOSTS"])


#: A public base URL and one more trusted host name, as behind a reverse proxy.
PROXIED = {"PASSERELLE_BASE_URL": BASE, "PASSERELLE_TRUSTED_HOSTS": "node1.internal"}


@pytest.fixture
def behind_proxy(app: Flask) -> Flask:
    configure(app, **PROXIED)
    return app


def signed_by_new_client(app: Flask, audience: str) -> str:
    """A client assertion for `audience`, from a newly registered private_key_jwt client."""
    private_key = KEY_MAKERS["ES384"]()
    client_id = jwks_client(app, public_jwk(private_key, "ES384"))
    return assertion(private_key, "ES384", client_id, aud=audience)


def post_signed(client: FlaskClient, signed: str, **request: Any) -> TestResponse:
    return client.post("/auth/token", data={"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                                            "client_assertion": signed}, **request)


# -- the token audience ------------------------------------------------------------------------


def test_forged_host_with_a_matching_audience_gets_no_token(app, client):
    signed = signed_by_new_client(app, "http://other.example/auth/token")
    response = post_signed(client, signed, headers={"Host": "other.example"})
    assert response.status_code == 400
    assert "other.example" in issue(response)["diagnostics"]


def test_audience_is_the_configured_base_even_on_a_trusted_host(behind_proxy, client):
    signed = signed_by_new_client(behind_proxy, "http://node1.internal/auth/token")
    response = post_signed(client, signed, headers={"Host": "node1.internal"})
    assert response.status_code == 401
    assert "audience" in response.get_json()["error_description"].lower()


def test_assertion_for_the_configured_base_earns_a_token(behind_proxy, client):
    signed = signed_by_new_client(behind_proxy, f"{BASE}/auth/token")
    response = post_signed(client, signed, headers={"Host": "node1.internal"})
    assert response.status_code == 200, response.get_json()


def test_smart_configuration_names_the_configured_token_endpoint(behind_proxy, client):
    response = client.get("/.well-known/smart-configuration", headers={"Host": "node1.internal"})
    assert response.get_json()["token_endpoint"] == f"{BASE}/auth/token"


# -- links -------------------------------------------------------------------------------------


def test_bundle_links_use_the_configured_base_whatever_the_host(app, client, custodian_headers):
    create(client, custodian_headers, patient())
    configure(app, **PROXIED)
    response = client.get("/fhir/Patient", headers={**custodian_headers, "Host": "node1.internal:8000"})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    urls = [link["url"] for link in body["link"]] + [entry["fullUrl"] for entry in body["entry"]]
    assert urls and all(url.startswith(f"{BASE}/fhir/") for url in urls)


def test_location_uses_the_configured_base(app, client, custodian_headers):
    configure(app, **PROXIED)
    response = client.post("/fhir/Patient", json=patient(), headers={**custodian_headers, "Host": "node1.internal"})
    assert response.headers["Location"].startswith(f"{BASE}/fhir/Patient/")


# -- which hosts are served --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "fhir.example.org.evil.example", "node1.internal.evil"])
def test_a_host_neither_configured_nor_trusted_is_400_naming_it_and_the_setting(behind_proxy, client, host):
    response = client.get("/fhir/metadata", headers={"Host": host})
    assert response.status_code == 400
    diagnostics = issue(response)["diagnostics"]
    assert host in diagnostics and "PASSERELLE_TRUSTED_HOSTS" in diagnostics


@pytest.mark.parametrize("host", ["fhir.example.org", "FHIR.example.org:443", "node1.internal:8000"])
def test_the_configured_and_trusted_hosts_are_served_on_any_port(behind_proxy, client, host):
    assert client.get("/fhir/metadata", headers={"Host": host}).status_code == 200


def test_with_a_base_url_loopback_is_not_served_unless_trusted(behind_proxy, client):
    assert client.get("/fhir/metadata", headers={"Host": "127.0.0.1:8000"}).status_code == 400
    configure(behind_proxy, PASSERELLE_BASE_URL=BASE, PASSERELLE_TRUSTED_HOSTS="127.0.0.1")
    assert client.get("/fhir/metadata", headers={"Host": "127.0.0.1:8000"}).status_code == 200


@pytest.mark.parametrize("host", ["localhost", "localhost:5000", "127.0.0.1:8000", "[::1]:8000"])
def test_loopback_is_served_without_configuration_with_its_own_links(client, host):
    response = client.get("/fhir/metadata", headers={"Host": host})
    assert response.status_code == 200
    assert response.get_json()["implementation"]["url"] == f"http://{host}/fhir"


@pytest.mark.parametrize("host", ["other.example", "10.0.0.5:8000", "localhost.evil.example"])
def test_without_configuration_another_host_is_400_naming_the_base_url_setting(client, host):
    response = client.get("/fhir/metadata", headers={"Host": host})
    assert response.status_code == 400
    diagnostics = issue(response)["diagnostics"]
    assert host in diagnostics and "PASSERELLE_BASE_URL" in diagnostics


@pytest.mark.parametrize("host", ["bad host", "user@localhost", ""])
def test_a_malformed_host_is_400(client, host):
    assert client.get("/fhir/metadata", headers={"Host": host}).status_code == 400


def test_the_host_is_checked_before_the_token(client):
    response = client.get("/fhir/Patient", headers={"Host": "other.example"})
    assert response.status_code == 400


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["fhir.example.org", "ftp://fhir.example.org", "https://fhir.example.org/fhir",
                                   "https://user@fhir.example.org", "https://fhir.example.org:99999",
                                   "https://fhir.example.org?x", "https://bad host"])
def test_a_base_url_that_is_not_scheme_host_port_is_a_readable_error(value):
    with pytest.raises(ValueError, match="PASSERELLE_BASE_URL must be scheme://host"):
        load_config({"PASSERELLE_BASE_URL": value})


def test_the_base_url_loses_a_trailing_slash():
    assert load_config({"PASSERELLE_BASE_URL": "https://fhir.example.org:8443/"})["BASE_URL"] == (
        "https://fhir.example.org:8443")


def test_trusted_hosts_without_a_base_url_is_a_readable_error():
    with pytest.raises(ValueError, match="PASSERELLE_TRUSTED_HOSTS needs PASSERELLE_BASE_URL"):
        load_config({"PASSERELLE_TRUSTED_HOSTS": "node1.internal"})


@pytest.mark.parametrize("value", ["http://node1.internal", "node1.internal:8000", "bad host"])
def test_a_trusted_host_that_is_not_a_host_name_is_a_readable_error(value):
    with pytest.raises(ValueError, match="PASSERELLE_TRUSTED_HOSTS lists host names"):
        load_config({"PASSERELLE_BASE_URL": BASE, "PASSERELLE_TRUSTED_HOSTS": value})
