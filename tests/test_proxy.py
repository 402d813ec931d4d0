"""X-Forwarded-* trusted from the reverse proxy only (service/proxy.py, PASSERELLE_FORWARDED_ALLOW_IPS):
from it, the client address rate limits count and the HTTPS scheme (HSTS, Secure cookies) follow
its headers; from any other peer the headers change nothing."""
from __future__ import annotations

import logging

import pytest
from sqlalchemy import select

from service import db
from service.config import load_config
from service.limits import TOKEN_BUCKET
from service.store.schema import rate_limits

PROXY = {"REMOTE_ADDR": "10.0.0.2"}
OUTSIDER = {"REMOTE_ADDR": "198.51.100.7"}


@pytest.fixture
def behind_proxy(app):
    app.config["FORWARDED_ALLOW_IPS"] = load_config({"PASSERELLE_FORWARDED_ALLOW_IPS": "10.0.0.2"})[
        "FORWARDED_ALLOW_IPS"]
    return app


def counted_addresses(app) -> set[str]:
    """The addresses /auth/token counted requests of unknown clients for."""
    prefix = f"{TOKEN_BUCKET}address:"
    with app.app_context(), db.read() as conn:
        buckets = conn.execute(select(rate_limits.c.bucket)).scalars()
        return {bucket.removeprefix(prefix) for bucket in buckets if bucket.startswith(prefix)}


def ask_token(app, environ: dict[str, str], **headers: str) -> int:
    response = app.test_client().post("/auth/token", data={"grant_type": "client_credentials"},
                                      headers={"Authorization": "Basic bm8tc3VjaDp4", **headers},
                                      environ_base=environ)
    return response.status_code


def test_a_forwarded_for_from_an_untrusted_peer_does_not_change_the_client_address(behind_proxy):
    assert ask_token(behind_proxy, OUTSIDER, **{"X-Forwarded-For": "203.0.113.9"}) == 401
    assert counted_addresses(behind_proxy) == {"198.51.100.7"}


def test_the_trusted_proxy_names_the_client_by_the_address_it_appended(behind_proxy):
    assert ask_token(behind_proxy, PROXY, **{"X-Forwarded-For": "203.0.113.5, 203.0.113.9"}) == 401
    assert counted_addresses(behind_proxy) == {"203.0.113.9"}


def test_a_proxy_within_a_trusted_network_is_trusted(app):
    app.config["FORWARDED_ALLOW_IPS"] = load_config({"PASSERELLE_FORWARDED_ALLOW_IPS": "10.0.0.0/24"})[
        "FORWARDED_ALLOW_IPS"]
    assert ask_token(app, {"REMOTE_ADDR": "10.0.0.77"}, **{"X-Forwarded-For": "203.0.113.9"}) == 401
    assert counted_addresses(app) == {"203.0.113.9"}


def test_a_trusted_ipv4_proxy_seen_on_a_dual_stack_socket_is_trusted(behind_proxy):
    assert ask_token(behind_proxy, {"REMOTE_ADDR": "::ffff:10.0.0.2"}, **{"X-Forwarded-For": "203.0.113.9"}) == 401
    assert counted_addresses(behind_proxy) == {"203.0.113.9"}


def test_forwarded_proto_https_from_the_proxy_makes_the_request_secure(behind_proxy):
    response = behind_proxy.test_client().get("/fhir/metadata", headers={"X-Forwarded-Proto": "https"},
                                              environ_base=PROXY)
    assert "Strict-Transport-Security" in response.headers
    page = behind_proxy.test_client().get("/consent/signin?lang=fr", headers={"X-Forwarded-Proto": "https"},
                                          environ_base=PROXY)
    assert any(cookie.startswith("lang=") and "Secure" in cookie for cookie in page.headers.getlist("Set-Cookie"))


def test_forwarded_proto_https_from_elsewhere_changes_nothing(behind_proxy):
    response = behind_proxy.test_client().get("/fhir/metadata", headers={"X-Forwarded-Proto": "https"},
                                              environ_base=OUTSIDER)
    assert "Strict-Transport-Security" not in response.headers
    page = behind_proxy.test_client().get("/consent/signin?lang=fr", headers={"X-Forwarded-Proto": "https"},
                                          environ_base=OUTSIDER)
    cookies = [cookie for cookie in page.headers.getlist("Set-Cookie") if cookie.startswith("lang=")]
    assert cookies and "Secure" not in cookies[0]


def test_the_proxy_forwarded_host_is_the_host_the_app_checks(behind_proxy):
    assert behind_proxy.test_client().get("/fhir/metadata", headers={"X-Forwarded-Host": "evil.example"},
                                          environ_base=PROXY).status_code == 400
    assert behind_proxy.test_client().get("/fhir/metadata", headers={"X-Forwarded-Host": "localhost"},
                                          environ_base=PROXY).status_code == 200


def test_a_forwarded_host_from_elsewhere_is_ignored(behind_proxy):
    assert behind_proxy.test_client().get("/fhir/metadata", headers={"X-Forwarded-Host": "evil.example"},
                                          environ_base=OUTSIDER).status_code == 200


@pytest.mark.parametrize("value", ["10.0.0.300", "10.0.0.1/24", "proxy.internal", "10.0.0.2:80"])
def test_an_unreadable_proxy_list_is_refused(value):
    with pytest.raises(ValueError, match="PASSERELLE_FORWARDED_ALLOW_IPS"):
        load_config({"PASSERELLE_FORWARDED_ALLOW_IPS": value})


def test_an_ipv4_client_the_proxy_names_in_ipv6_form_is_counted_as_its_ipv4_address(behind_proxy):
    assert ask_token(behind_proxy, PROXY, **{"X-Forwarded-For": "::ffff:203.0.113.9"}) == 401
    assert ask_token(behind_proxy, PROXY, **{"X-Forwarded-For": "203.0.113.9"}) == 401
    assert counted_addresses(behind_proxy) == {"203.0.113.9"}


def test_an_ipv6_client_is_counted_by_its_64_prefix(behind_proxy):
    for client in ("2001:db8:5:7::1", "2001:db8:5:7:ffff::9", "2001:db8:5:8::1"):
        assert ask_token(behind_proxy, PROXY, **{"X-Forwarded-For": client}) == 401
    assert counted_addresses(behind_proxy) == {"2001:db8:5:7::/64", "2001:db8:5:8::/64"}


def test_a_proxy_on_this_host_that_is_not_trusted_is_named_in_one_warning_without_the_client(behind_proxy, caplog):
    client = behind_proxy.test_client()
    with caplog.at_level(logging.WARNING, logger="service.proxy"):
        client.get("/fhir/metadata", environ_base=OUTSIDER, headers={"X-Forwarded-For": "203.0.113.9"})
        client.get("/fhir/metadata", environ_base={"REMOTE_ADDR": "127.0.0.1"})
        for _ in range(3):
            client.get("/fhir/metadata", environ_base={"REMOTE_ADDR": "127.0.0.1"},
                       headers={"X-Forwarded-For": "203.0.113.9"})
    warnings = [record.getMessage() for record in caplog.records if record.name == "service.proxy"]
    assert len(warnings) == 1 and "PASSERELLE_FORWARDED_ALLOW_IPS" in warnings[0]
    assert "203.0.113.9" not in warnings[0]
