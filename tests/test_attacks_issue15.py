"""Attacks on the deployment of issue 15: the reverse proxy's trust (service/proxy.py), the shipped
nginx configuration run for real in front of a gunicorn node (benchmarks/harness.py), `/metrics`
(service/metrics.py), `/healthz` and what the image's build context may hold.

A hostile research partner or patient-form user reaches the service through nginx only; an outsider
on the private network may also reach a node's port directly.
"""
from __future__ import annotations

import contextlib
import http.client
import ipaddress
import os
import re
import secrets
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
import yaml
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete, func, select, update

from benchmarks.harness import PUBLIC_NAME, Backend, Database, Gunicorn, Instance, Nginx
from consent import projects
from consent.materialise import refresh
from service import db, keyring, metrics
from service.config import load_config
from service.limits import TOKEN_BUCKET
from service.store import migrations
from service.store.schema import export_jobs, rate_limits, settings
from tests.backends import in_ci, postgres_problem, postgres_url
from tests.portal_helpers import sign_in
from tests.test_deploy_config import ignored

#: One xdist worker runs the module: each worker running some of it would start nginx and a node of its own.
pytestmark = pytest.mark.xdist_group("attacks-issue15")

ROOT = Path(__file__).resolve().parent.parent
PROXY = {"REMOTE_ADDR": "10.0.0.2"}
#: The request /auth/token answers 401 to (an unknown client): cheap, and counted per address.
UNKNOWN_CLIENT = {"Authorization": "Basic bm8tc3VjaDp4"}
TOKEN_FORM = b"grant_type=client_credentials"
#: The stack's node refuses bodies above this (PASSERELLE_MAX_BODY_BYTES).
NODE_BODY_LIMIT = 4096
#: The stack's node's /auth/token limit per address and minute (PASSERELLE_TOKEN_RATE_LIMIT).
NODE_TOKEN_LIMIT = 3


def trust(app: Flask, proxies: str) -> Flask:
    app.config["FORWARDED_ALLOW_IPS"] = load_config({"PASSERELLE_FORWARDED_ALLOW_IPS": proxies})[
        "FORWARDED_ALLOW_IPS"]
    return app


def buckets(app: Flask, prefix: str) -> list[tuple[str, int]]:
    with app.app_context(), db.read() as conn:
        rows = conn.execute(select(rate_limits.c.bucket, rate_limits.c.count)
                            .where(rate_limits.c.bucket.startswith(prefix))).all()
    return sorted((bucket.removeprefix(prefix), count) for bucket, count in rows)


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(sample.name, tuple(sorted(sample.labels.items())))
            for family in text_string_to_metric_families(text) for sample in family.samples}


# -- proxy trust, in process -------------------------------------------------------------------------


def test_metrics_refuse_a_request_relayed_by_a_loopback_proxy_that_is_not_trusted(app):
    trust(app, "10.0.0.2")  # nginx trusted at its private address, yet another relay runs on this host
    response = app.test_client().get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1"},
                                     headers={"X-Forwarded-For": "203.0.113.9"})
    assert response.status_code == 401
    assert "passerelle_" not in response.get_data(as_text=True)


@pytest.mark.parametrize("header", ["X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"])
def test_the_trusted_proxy_naming_loopback_as_the_client_does_not_open_metrics(app, header):
    trust(app, "10.0.0.2")
    value = {"X-Forwarded-For": "127.0.0.1", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "localhost"}[header]
    response = app.test_client().get("/metrics", environ_base=PROXY, headers={header: value})
    assert response.status_code == 401


def test_a_client_chosen_header_naming_loopback_from_another_host_does_not_open_metrics(app):
    for header in ("X-Real-IP", "Forwarded", "X-Forwarded-For"):
        response = app.test_client().get("/metrics", environ_base={"REMOTE_ADDR": "198.51.100.7"},
                                         headers={header: "127.0.0.1" if header != "Forwarded" else "for=127.0.0.1"})
        assert response.status_code == 401, header


def test_forwarded_prefix_and_port_from_the_trusted_proxy_change_no_link(app, custodian_headers):
    trust(app, "10.0.0.2")
    response = app.test_client().post(
        "/fhir/Patient", json={"resourceType": "Patient", "gender": "female"}, environ_base=PROXY,
        headers={**custodian_headers, "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Host": "localhost",
                 "X-Forwarded-Prefix": "/evil", "X-Forwarded-Port": "4444", "Forwarded": "host=evil.example"})
    assert response.status_code == 201, response.get_json()
    location = response.headers["Location"]
    assert location.startswith("http://localhost/fhir/Patient/"), location
    assert "evil" not in location and "4444" not in location


def test_a_forwarded_host_from_the_trusted_proxy_cannot_name_a_host_outside_the_base_url(app, custodian_headers):
    trust(app, "10.0.0.2")
    app.config["BASE_URL"] = f"https://{PUBLIC_NAME}"
    response = app.test_client().get("/fhir/Patient", environ_base=PROXY, headers={
        **custodian_headers, "Host": PUBLIC_NAME, "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"})
    assert response.status_code == 400
    assert "evil.example" not in response.headers.get("Location", "")


def test_the_last_hop_the_trusted_proxy_names_is_the_client_whatever_the_client_prepended(app):
    trust(app, "10.0.0.2")
    client = app.test_client()
    for forged in ("127.0.0.1, 203.0.113.9", "198.51.100.1,203.0.113.9", "unknown, 203.0.113.9"):
        client.post("/auth/token", data={"grant_type": "client_credentials"}, environ_base=PROXY,
                    headers={**UNKNOWN_CLIENT, "X-Forwarded-For": forged})
    assert buckets(app, f"{TOKEN_BUCKET}address:") == [("203.0.113.9", 3)]


def test_an_ipv6_client_cannot_escape_the_token_limit_by_rotating_addresses_within_its_prefix(app):
    trust(app, "10.0.0.2")
    app.config["TOKEN_RATE_LIMIT"] = 2
    client = app.test_client()
    statuses = [client.post("/auth/token", data={"grant_type": "client_credentials"}, environ_base=PROXY,
                            headers={**UNKNOWN_CLIENT, "X-Forwarded-For": f"2001:db8:5:7::{n:x}"}).status_code
                for n in range(1, 5)]
    assert statuses[2:] == [429, 429], statuses


def test_two_addresses_of_one_ipv6_prefix_share_the_portal_sign_in_bucket(app):
    trust(app, "10.0.0.2")
    for n in (1, 2):
        sign_in(app.test_client(), "MRN-404", "wrong passphrase", environ_base=PROXY,
                headers={"X-Forwarded-For": f"2001:db8:5:7::{n:x}"})
    assert len(buckets(app, "portal-sign-in:")) == 1


def test_the_form_cookies_are_secure_and_hsts_sent_when_the_trusted_proxy_says_https(app):
    trust(app, "10.0.0.2")
    response = app.test_client().get("/consent/signin", environ_base=PROXY,
                                     headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"})
    cookies = response.headers.getlist("Set-Cookie")
    assert cookies and all("Secure" in cookie for cookie in cookies), cookies
    assert "Strict-Transport-Security" in response.headers


def test_an_outsider_saying_https_gets_no_hsts_and_cannot_make_a_cookie_insecure_behind_an_https_base(app):
    trust(app, "10.0.0.2")
    outsider = {"REMOTE_ADDR": "198.51.100.7"}
    plain = app.test_client().get("/consent/signin", environ_base=outsider, headers={"X-Forwarded-Proto": "https"})
    assert "Strict-Transport-Security" not in plain.headers
    app.config["BASE_URL"] = f"https://{PUBLIC_NAME}"
    downgraded = app.test_client().get("/consent/signin", environ_base=PROXY, headers={
        "Host": PUBLIC_NAME, "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http"})
    cookies = downgraded.headers.getlist("Set-Cookie")
    assert cookies and all("Secure" in cookie for cookie in cookies), cookies
    assert "Strict-Transport-Security" in downgraded.headers


# -- /metrics: tokens, labels ------------------------------------------------------------------------


def test_a_metrics_token_of_another_deployment_is_refused(app, tmp_path):
    other = Instance(Database(f"sqlite:///{tmp_path / 'other.db'}", "sqlite"), tmp_path / "other")
    try:
        with other.app.app_context(), db.write(other.engine) as conn:
            foreign = metrics.new_token(conn)
    finally:
        other.close()
    with app.app_context(), db.write() as conn:
        metrics.new_token(conn)
    for presented in (foreign, "", " ", f"{foreign} extra", "Basic " + foreign):
        response = app.test_client().get("/metrics", environ_base={"REMOTE_ADDR": "192.0.2.10"},
                                         headers={"Authorization": presented if presented.startswith("Basic")
                                                  else f"Bearer {presented}"})
        assert response.status_code == 401, presented


def test_the_metrics_token_is_no_api_credential(app):
    with app.app_context(), db.write() as conn:
        token = metrics.new_token(conn)
    for path in ("/fhir/Patient", "/research/fhir/Patient", "/fhir/AuditEvent"):
        response = app.test_client().get(path, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, path


def test_a_flood_of_invented_paths_methods_and_queries_adds_no_metric_series(app):
    client = app.test_client()
    client.get("/no-such-route/warm-up?family=warm")
    client.open("/fhir/warm-up", method="BREW")
    client.get("/fhir/Patient/warm-up")
    client.get("/metrics")
    before = series(client.get("/metrics").get_data(as_text=True))
    for n in range(150):
        marker = secrets.token_hex(6)
        client.get(f"/{marker}/{n}?family={marker}")
        client.open(f"/fhir/{marker}", method=f"X{marker.upper()}")
        client.get(f"/fhir/Patient/{marker}", headers={"User-Agent": marker, "X-Request-ID": marker})
    text = client.get("/metrics").get_data(as_text=True)
    after = series(text)
    assert after == before, sorted(after - before)[:20]
    assert not re.search(r"X[0-9A-F]{12}|/[0-9a-f]{12}", text)


# -- /healthz ------------------------------------------------------------------------------------------


def test_healthz_names_no_revision_fingerprint_or_path(app):
    response = app.test_client().get("/healthz", environ_base={"REMOTE_ADDR": "198.51.100.7"})
    assert response.status_code == 200
    body = response.get_data(as_text=True)
    assert set(orjson.loads(body)) == {"status", "database", "key", "schema"}
    with app.app_context(), db.read() as conn:
        fingerprint = keyring.recorded_fingerprint(conn)
    for secret in (fingerprint, migrations.head(), app.config["MASTER_KEY_FILE"], app.config["DATABASE_URL"]):
        assert secret and secret not in body


def test_an_unhealthy_node_names_the_cause_but_no_revision_or_fingerprint(app):
    with app.app_context(), db.write() as conn:
        conn.execute(update(settings).where(settings.c.name == keyring.FINGERPRINT).values(value="0" * 64))
    response = app.test_client().get("/healthz", environ_base={"REMOTE_ADDR": "198.51.100.7"})
    assert response.status_code == 503
    body = response.get_data(as_text=True)
    assert orjson.loads(body)["key"] == "mismatch"
    assert "0" * 16 not in body and migrations.head() not in body


# -- the image's build context ----------------------------------------------------------------------


def dockerignore() -> list[str]:
    return [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_every_key_like_file_of_the_checkout_stays_out_of_the_image():
    keyish = re.compile(r"(master\.key|\.key$|\.pem$|\.p12$|\.crt$|pgpass|\.env$)")
    skipped = {".venv", ".git", "node_modules"}
    found = [path.relative_to(ROOT).as_posix() for path in ROOT.rglob("*")
             if path.is_file() and keyish.search(path.name) and not skipped & set(path.relative_to(ROOT).parts)]
    assert [path for path in found if not ignored(path, dockerignore())] == []


@pytest.mark.parametrize("path", ["passerelle.db", "passerelle.db-wal", "backup/passerelle-2026-11-30.db",
                                  "passerelle.sqlite3", "passerelle-2026-11-30.dump", "dump.sql.gz"])
def test_database_files_and_dumps_anywhere_in_the_checkout_stay_out_of_the_image(path):
    assert ignored(path, dockerignore())


def test_no_image_instruction_carries_key_material():
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    assert not re.search(r"(?im)^\s*(ENV|ARG|LABEL)\b.*(KEY|SECRET|PASSWORD|TOKEN)\w*\s*=\s*[^/\s]", text)
    assert "master.key" not in re.sub(r"(?m)^\s*#.*$", "", text).replace("/run/secrets/master.key", "")


def test_no_container_of_the_compose_network_can_be_given_the_trusted_proxys_address():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    (pool,) = compose["networks"]["backend"]["ipam"]["config"]
    dynamic = ipaddress.ip_network(pool.get("ip_range", pool["subnet"]))
    fixed = {ipaddress.ip_address(service["networks"]["backend"]["ipv4_address"])
             for service in compose["services"].values()
             if (service.get("networks") or {}).get("backend", {}).get("ipv4_address")}
    assert fixed and not [address for address in fixed if address in dynamic]


# -- through the shipped nginx, in front of a real gunicorn node -------------------------------------


@dataclass
class Stack:
    instance: Instance
    node: Gunicorn
    nginx: Nginx
    custodian: str

    def raw(self, data: bytes, port: int | None = None, tls: bool = True) -> bytes:
        """`data` sent as is on a new connection (TLS to nginx, unless `port` names another), everything
        the server answers until it closes the connection."""
        raw = socket.create_connection(("127.0.0.1", port or self.nginx.https_port), timeout=10)
        sock = ssl.create_default_context(cafile=str(self.nginx.certificate)).wrap_socket(
            raw, server_hostname=PUBLIC_NAME) if tls else raw
        with sock:
            sock.sendall(data)
            received = b""
            try:
                while chunk := sock.recv(65536):
                    received += chunk
            except (ConnectionResetError, TimeoutError):
                pass
        return received

    def request(self, line: str, headers: dict[str, str] | None = None, body: bytes = b"", **where: Any) -> bytes:
        fields = {"Host": PUBLIC_NAME, **(headers or {}), "Connection": "close"}
        head = f"{line}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields.items()) + "\r\n"
        return self.raw(head.encode() + body, **where)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One gunicorn node (its database of its own: no other fixture empties it while it serves) behind the
    shipped nginx configuration, as https://fhir.example.org."""
    problems = [] if shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin") else ["nginx is missing"]
    if request.param == "postgresql" and (problem := postgres_problem(postgres_url(os.environ))):
        problems.append(problem)
    if problems:
        if in_ci(os.environ):
            pytest.fail(f"the attacks through nginx must run in CI: {'; '.join(problems)}")
        pytest.skip("; ".join(problems))
    tmp = tmp_path_factory.mktemp(f"stack-{request.param}")
    backend = Backend(request.param, tmp)
    instance = Instance(backend.new("attacks"), tmp / "instance")
    custodian = instance.token(instance.register("custodian"))
    node = Gunicorn(instance.env(PASSERELLE_BASE_URL=f"https://{PUBLIC_NAME}",
                                 PASSERELLE_FORWARDED_ALLOW_IPS="127.0.0.1",
                                 PASSERELLE_TOKEN_RATE_LIMIT=str(NODE_TOKEN_LIMIT),
                                 PASSERELLE_MAX_BODY_BYTES=str(NODE_BODY_LIMIT)), tmp / "node.log", workers=1)
    try:
        with node, Nginx(tmp / "nginx", [node.port]) as nginx:
            yield Stack(instance, node, nginx, custodian)
    finally:
        instance.close()
        backend.drop_all()


def test_rotating_every_forwarding_header_through_nginx_stays_in_the_clients_one_bucket(stack):
    with stack.instance.app.app_context(), db.write(stack.instance.engine) as conn:
        conn.execute(delete(rate_limits).where(rate_limits.c.bucket.startswith(f"{TOKEN_BUCKET}address:")))
    statuses = []
    for n in range(NODE_TOKEN_LIMIT + 2):
        forged = f"203.0.113.{n}"
        statuses.append(status_of(stack.request("POST /auth/token HTTP/1.1", {
            **UNKNOWN_CLIENT, "Content-Type": "application/x-www-form-urlencoded",
            "Content-Length": str(len(TOKEN_FORM)), "X-Forwarded-For": forged, "X-Real-IP": forged,
            "Forwarded": f"for={forged}", "X_Forwarded_For": forged, "x-forwarded-for": f"{forged}, {forged}",
            "True-Client-IP": forged}, TOKEN_FORM)))
    assert statuses[:NODE_TOKEN_LIMIT] == [401] * NODE_TOKEN_LIMIT
    assert statuses[NODE_TOKEN_LIMIT:] == [429, 429]
    assert buckets(stack.instance.app, f"{TOKEN_BUCKET}address:") == [("127.0.0.1", NODE_TOKEN_LIMIT + 2)]


def http2(stack: Stack, path: str, *options: str) -> tuple[str, int]:
    """(HTTP version, status) of curl's request for `path` over HTTP/2 to nginx, with `options`."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    done = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_version} %{http_code}", "--http2",
                           "--cacert", str(stack.nginx.certificate),
                           "--resolve", f"{PUBLIC_NAME}:{stack.nginx.https_port}:127.0.0.1", *options,
                           f"https://{PUBLIC_NAME}:{stack.nginx.https_port}{path}"],
                          capture_output=True, text=True, timeout=30)
    version, status = done.stdout.split()
    return version, int(status)


def test_forwarding_headers_over_http2_pick_no_bucket_and_name_no_host(stack):
    before = dict(buckets(stack.instance.app, f"{TOKEN_BUCKET}address:")).get("127.0.0.1", 0)
    assert http2(stack, "/auth/token", "-u", "no-such:x", "-d", "grant_type=client_credentials",
                 "-H", "X-Forwarded-For: 203.0.113.5", "-H", "X-Real-IP: 203.0.113.5",
                 "-H", "Forwarded: for=203.0.113.5") in (("2", 401), ("2", 429))
    assert buckets(stack.instance.app, f"{TOKEN_BUCKET}address:") == [("127.0.0.1", before + 1)]
    assert http2(stack, "/fhir/metadata", "-H", "Host: evil.example") == ("2", 400)
    assert http2(stack, "/metrics") == ("2", 404)


@pytest.mark.parametrize("line", [
    "GET /metrics;x=1 HTTP/1.1", "GET /metrics%3Bx HTTP/1.1", "GET /metrics%20 HTTP/1.1", "GET /metrics%09 HTTP/1.1",
    "GET /metrics. HTTP/1.1", "GET /metrics%2F HTTP/1.1", "GET /%2fmetrics HTTP/1.1", "GET /METRICS HTTP/1.1",
    "GET /Metrics HTTP/1.1", "GET /fhir/../metrics HTTP/1.1", "GET /fhir/%2e%2e/metrics HTTP/1.1",
    "GET /./metrics HTTP/1.1", "GET ///metrics HTTP/1.1", "GET /metrics? HTTP/1.1", "GET /metrics#x HTTP/1.1",
    "GET /%6d%65%74%72%69%63%73 HTTP/1.1", "HEAD /metrics HTTP/1.1", "GET https://fhir.example.org/metrics HTTP/1.1",
    "GET http://127.0.0.1/metrics HTTP/1.1", "GET /metrics HTTP/1.0",
])
def test_no_spelling_of_metrics_is_answered_through_nginx(stack, line):
    answer = stack.request(line)
    assert status_of(answer) in (400, 404), answer[:300]
    assert b"passerelle_" not in answer


def test_metrics_without_a_host_over_http_1_0_is_not_answered_through_nginx(stack):
    answer = stack.raw(b"GET /metrics HTTP/1.0\r\n\r\n")
    assert status_of(answer) == 404 and b"passerelle_" not in answer


def test_a_request_without_a_host_through_nginx_links_to_the_public_base(stack):
    answer = stack.raw(b"GET /fhir/metadata HTTP/1.0\r\n\r\n")
    assert status_of(answer) == 200
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["implementation"]["url"] == f"https://{PUBLIC_NAME}/fhir"


def test_the_metrics_token_is_no_key_through_nginx(stack):
    with stack.instance.app.app_context(), db.write(stack.instance.engine) as conn:
        token = metrics.new_token(conn)
    answer = stack.request("GET /metrics HTTP/1.1", {"Authorization": f"Bearer {token}"})
    assert status_of(answer) == 404 and b"passerelle_" not in answer


@pytest.mark.parametrize("host", ["evil.example", "localhost", "127.0.0.1", f"{PUBLIC_NAME}.evil.example",
                                  f"{PUBLIC_NAME}@evil.example", f"evil.example#{PUBLIC_NAME}", "evil.example:443"])
def test_a_host_other_than_the_public_one_is_refused_through_nginx(stack, host):
    answer = stack.request("GET /fhir/Patient HTTP/1.1", {"Host": host, "Authorization": f"Bearer {stack.custodian}"})
    assert status_of(answer) == 400
    assert host.encode() not in answer.split(b"\r\n\r\n")[0]


def test_an_absolute_form_request_line_cannot_choose_the_host(stack):
    answer = stack.request("GET https://evil.example/fhir/Patient HTTP/1.1",
                           {"Authorization": f"Bearer {stack.custodian}"})
    assert status_of(answer) == 400


def test_a_second_host_header_is_refused_by_nginx(stack):
    answer = stack.raw(f"GET /fhir/metadata HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nHost: evil.example\r\n"
                       "Connection: close\r\n\r\n".encode())
    assert status_of(answer) == 400


@pytest.mark.parametrize("path", ["//evil.example/", "/%2f%2fevil.example", "/\\evil.example",
                                  "/x?next=//evil.example"])
@pytest.mark.parametrize("host", [PUBLIC_NAME, "evil.example"])
def test_the_https_redirect_never_leaves_the_public_host(stack, path, host):
    answer = stack.request(f"GET {path} HTTP/1.1", {"Host": host}, port=stack.nginx.http_port, tls=False)
    assert status_of(answer) == 301
    (location,) = re.findall(rb"\r\nLocation: ([^\r]*)", answer)
    assert location.startswith(f"https://{PUBLIC_NAME}/".encode()), location


def test_a_crlf_in_the_path_never_splits_the_redirect(stack):
    answer = stack.raw(b"GET /a%0d%0aSet-Cookie:%20x=1 HTTP/1.1\r\nHost: fhir.example.org\r\nConnection: close\r\n\r\n",
                       port=stack.nginx.http_port, tls=False)
    head = answer.split(b"\r\n\r\n")[0]
    assert b"\r\nSet-Cookie" not in head


def test_content_length_with_chunked_encoding_is_refused_by_nginx(stack):
    smuggled = (b"POST /fhir/Patient HTTP/1.1\r\nHost: fhir.example.org\r\nContent-Type: application/fhir+json\r\n"
                b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                b"GET /metrics HTTP/1.1\r\nHost: fhir.example.org\r\nConnection: close\r\n\r\n")
    answer = stack.raw(smuggled)
    assert status_of(answer) == 400
    assert b"passerelle_" not in answer and answer.count(b"HTTP/1.1 ") == 1


def test_content_length_with_chunked_encoding_is_refused_by_a_node_reached_directly(stack):
    smuggled = (b"POST /fhir/Patient HTTP/1.1\r\nHost: fhir.example.org\r\nContent-Type: application/fhir+json\r\n"
                b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                b"GET /metrics HTTP/1.1\r\nHost: fhir.example.org\r\nConnection: close\r\n\r\n")
    answer = stack.raw(smuggled, port=stack.node.port, tls=False)
    assert status_of(answer) == 400
    assert b"passerelle_" not in answer


@pytest.mark.parametrize("framing", [
    "Transfer-Encoding: xchunked", "Transfer-Encoding : chunked", "Transfer-Encoding: chunked, identity",
    "Transfer-Encoding: identity, chunked", "Transfer-Encoding:\tchunked", "Transfer-encoding: CHUNKED",
    "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity", " Transfer-Encoding: chunked",
    "Content-Length: 5\r\nContent-Length: 50", "Content-Length: 5, 50",
])
def test_no_framing_trick_smuggles_a_loopback_request_to_the_node_past_nginx(stack, framing):
    """A request the node would read out of another's body comes from nginx's loopback address without
    X-Forwarded-For: /metrics would answer it."""
    smuggled = (f"POST /fhir/Patient HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nContent-Type: application/fhir+json\r\n"
                f"{framing}\r\n\r\n0\r\n\r\nGET /metrics HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\n"
                "Connection: close\r\n\r\n").encode()
    answers = [stack.raw(smuggled), stack.request("GET /fhir/metadata HTTP/1.1")]
    assert not [answer for answer in answers if b"passerelle_" in answer]


def chunked(data: bytes) -> bytes:
    """`data` in the chunked transfer coding, 500 bytes a chunk."""
    pieces = [data[i:i + 500] for i in range(0, len(data), 500)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def _chunked_patient(size: int) -> bytes:
    """A Patient of about `size` bytes, chunked."""
    return chunked(orjson.dumps({"resourceType": "Patient", "gender": "other",
                                 "name": [{"text": "x" * max(0, size - 80)}]}))


CHUNKED = {"Content-Type": "application/fhir+json", "Transfer-Encoding": "chunked"}


def test_a_chunked_body_over_the_limit_is_refused_through_nginx(stack):
    headers = {"Authorization": f"Bearer {stack.custodian}", **CHUNKED}
    small = stack.request("POST /fhir/Patient HTTP/1.1", headers, _chunked_patient(1000))
    assert status_of(small) == 201, small[:600]
    large = stack.request("POST /fhir/Patient HTTP/1.1", headers, _chunked_patient(4 * NODE_BODY_LIMIT))
    assert status_of(large) == 413, large[:600]


def test_a_chunked_body_over_the_limit_is_refused_by_a_node_reached_directly(stack):
    headers = {"Authorization": f"Bearer {stack.custodian}", **CHUNKED}
    large = stack.request("POST /fhir/Patient HTTP/1.1", headers, _chunked_patient(4 * NODE_BODY_LIMIT),
                          port=stack.node.port, tls=False)
    assert status_of(large) == 413, large[:600]


def test_a_chunked_body_over_the_limit_is_never_stored_even_when_its_cut_prefix_is_valid_json(stack):
    resource = orjson.dumps({"resourceType": "Patient", "gender": "unknown"}) + b" " * (4 * NODE_BODY_LIMIT)
    answer = stack.request("POST /fhir/Patient HTTP/1.1", {"Authorization": f"Bearer {stack.custodian}", **CHUNKED},
                           chunked(resource), port=stack.node.port, tls=False)
    assert status_of(answer) == 413, answer[:600]


def _client(version: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    """A client offering only `version` and `ciphers` (every one of which this OpenSSL can offer)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    offered = {cipher["name"] for cipher in context.get_ciphers() if cipher["protocol"] != "TLSv1.3"}
    assert offered == set(ciphers.split(":")), offered
    context.minimum_version = context.maximum_version = version
    return context


def _handshake(stack: Stack, context: ssl.SSLContext) -> None:
    context.load_verify_locations(stack.nginx.certificate)
    with socket.create_connection(("127.0.0.1", stack.nginx.https_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=PUBLIC_NAME):
        pass


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_before_1_2_is_refused_even_with_a_suite_nginx_offers(stack, version):
    context = _client(ssl.TLSVersion[version], "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA")
    with pytest.raises(ssl.SSLError):
        _handshake(stack, context)


@pytest.mark.parametrize("ciphers", [
    "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384",  # CBC
    "ECDHE-ECDSA-CAMELLIA128-SHA256:ECDHE-ECDSA-ARIA128-GCM-SHA256",
    "ECDHE-ECDSA-NULL-SHA:AECDH-AES128-SHA:ADH-AES128-GCM-SHA256",  # no encryption, no authentication
])
def test_tls_1_2_suites_outside_the_aead_ecdhe_list_are_refused(stack, ciphers):
    context = _client(ssl.TLSVersion.TLSv1_2, ciphers)
    with pytest.raises(ssl.SSLError):
        _handshake(stack, context)


def test_a_client_saying_http_through_nginx_still_gets_hsts_and_secure_cookies(stack):
    answer = stack.request("GET /consent/signin HTTP/1.1", {"X-Forwarded-Proto": "http", "X-Forwarded-Ssl": "off"})
    head = answer.split(b"\r\n\r\n")[0].decode()
    assert status_of(answer) == 200
    assert "Strict-Transport-Security: max-age=" in head
    cookies = re.findall(r"\r\nSet-Cookie: ([^\r]*)", head)
    assert cookies and all("Secure" in cookie for cookie in cookies), cookies


def test_a_node_being_down_writes_no_search_value_to_the_proxys_logs(stack):
    marker = f"Zyx{secrets.token_hex(4)}"
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        down = unused.getsockname()[1]  # nothing listens there: a node that is down
    with Nginx(stack.nginx.dir.parent / f"down-{secrets.token_hex(3)}", [down]) as nginx:
        reply = nginx.endpoint().call("GET", f"/fhir/Patient?family={marker}&identifier=MRN-{marker}")
        assert reply.status == 502
    logs = [nginx.dir / "error.log", nginx.dir / "access.log"]
    logs += [Path(path) for path in re.findall(r"^\s*error_log\s+(/\S+)", nginx.conf.read_text(), re.MULTILINE)]
    written = "".join(path.read_text(errors="replace") for path in logs if path.is_file())
    assert marker not in written


# -- a node that dies after doing the work, before answering ------------------------------------------


class DiesBeforeAnswering(socketserver.BaseRequestHandler):
    """An upstream that hands the request it reads to the real node, waits for the node's whole answer
    (the work is done and committed) and then drops the connection without a byte: a node killed between
    its commit and its response."""

    node_port: ClassVar[int]
    #: The status of each answer the node gave and this upstream dropped.
    relayed: ClassVar[list[int]]

    def handle(self) -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            received += chunk
        head, body = received.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        while len(body) < int(headers.get("Content-Length", 0)):
            body += self.request.recv(65536)
        conn = http.client.HTTPConnection("127.0.0.1", self.node_port, timeout=30)
        conn.request(method, target, body=body or None, headers={**headers, "Connection": "close"})
        answer = conn.getresponse()
        answer.read()
        conn.close()
        self.relayed.append(answer.status)


@contextlib.contextmanager
def behind_a_node_that_dies_before_answering(stack: Stack) -> Iterator[tuple[Nginx, type[DiesBeforeAnswering]]]:
    """The shipped nginx in front of two upstreams: one that dies after the work (`DiesBeforeAnswering`),
    then the stack's node."""
    dying = type("Dying", (DiesBeforeAnswering,), {"node_port": stack.node.port, "relayed": []})
    relay = socketserver.ThreadingTCPServer(("127.0.0.1", 0), dying)
    relay.daemon_threads = True
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    try:
        with Nginx(stack.nginx.dir.parent / f"relay-{secrets.token_hex(3)}",
                   [relay.server_address[1], stack.node.port]) as nginx:
            yield nginx, dying
    finally:
        relay.shutdown()
        relay.server_close()


def test_one_export_kick_off_through_nginx_makes_one_job_even_if_its_node_dies_before_answering(stack):
    app = stack.instance.app
    with app.app_context(), db.write(stack.instance.engine) as conn:
        project = projects.create(conn, name="relay", tier="record", epsilon=5.0).project_id
        refresh(conn)
    research = stack.instance.token(stack.instance.register("research", project))
    with behind_a_node_that_dies_before_answering(stack) as (nginx, dying):
        sent = 0
        while not dying.relayed and sent < 4:
            reply = nginx.endpoint().call("GET", "/research/fhir/$export?_type=Observation", headers={
                "Authorization": f"Bearer {research}", "Prefer": "respond-async"})
            assert reply.status in (202, 502), reply.body[:300]  # 502: the node died, nothing is repeated
            sent += 1
    assert dying.relayed == [202], "the dying node never did the work"
    with app.app_context(), db.read(stack.instance.engine) as conn:
        made = conn.scalar(select(func.count()).select_from(export_jobs).where(export_jobs.c.project_id == project))
    assert made == sent


def test_a_conditional_update_stored_by_a_node_that_died_is_never_answered_as_a_conflict(stack):
    custodian = {"Authorization": f"Bearer {stack.custodian}", "Content-Type": "application/fhir+json"}
    with behind_a_node_that_dies_before_answering(stack) as (nginx, dying):
        answers = []
        while not dying.relayed and len(answers) < 4:
            created = stack.nginx.endpoint().call("POST", "/fhir/Patient", orjson.dumps(
                {"resourceType": "Patient", "gender": "female"}), custodian).json()
            update = {**created, "gender": "male"}
            reply = nginx.endpoint().call("PUT", f"/fhir/Patient/{created['id']}", orjson.dumps(update), {
                **custodian, "If-Match": f'W/"{created["meta"]["versionId"]}"'})
            answers.append(reply.status)
    assert dying.relayed == [200], "the dying node never did the work"
    assert answers[-1] in (200, 502), answers  # the truth, or the proxy's "the node failed"; never 412
