"""Two nodes on one PostgreSQL database behind the shipped nginx configuration, with TLS.

Two gunicorn instances (the settings of `deploy/gunicorn.conf.py`, 2 workers each) serve one
PostgreSQL schema with the same master key, as `PASSERELLE_BASE_URL=https://fhir.example.org`
behind nginx running `deploy/nginx.conf` itself — only its upstream servers, listening ports and
certificate paths are rewritten for loopback (`benchmarks.harness.nginx_conf`) — with a
self-signed certificate for fhir.example.org made here. The world starts once per test process.

Where a test needs "via node A … on node B" it addresses each node's own port (with the public
Host); everything else goes through nginx, whose access log names the node that answered each
request. Node A serves with `PASSERELLE_EXPORT_WORKER=off`, so that an export it accepts is run
by node B. The kill test restarts A with export workers, kills node B with SIGKILL in the middle
of exports and `$aggregate` questions, checks that A carries everything on, then brings the world
back as it was (B started again, A without export workers), so the tests hold in any order.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from sqlalchemy import select

from benchmarks.harness import PUBLIC_NAME, Endpoint, Gunicorn, Nginx, Reply
from consent import projects, writer
from policies import budget
from policies.keys import ensure_master_key
from service import db
from service.app import create_app
from service.auth import ASSERTION_TYPE, register_client
from service.cli import database
from service.store.schema import budget_spends, budgets, export_jobs
from tests.backends import in_ci
from tests.fhir_helpers import observation
from tests.portal_helpers import PASSPHRASE, accept, invite, patient_with_number
from tests.research_world import World, bearer, build, token

pytestmark = pytest.mark.nodes

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = f"https://{PUBLIC_NAME}"
#: Observations of the consenting patient besides the world's, so that an export job runs long enough to be
#: caught running when its node is killed.
SEED_OBSERVATIONS = 1000
#: The token endpoint's per-client limit on both nodes (per minute).
TOKEN_LIMIT = 6
QUESTIONS = 200
#: Each question's ε is unique (BASE + its number, in µε): every question is a new one that costs.
EPSILON_BASE_MICRO = 10_000
#: The ε of the project the 200 questions spend: about half of them fit.
AGGREGATE_BUDGET = 1.0
#: How often the nodes' export workers beat (PASSERELLE_EXPORT_HEARTBEAT_SECONDS): a worker silent for three
#: of its intervals has died (service/store/jobs.py) and its job is taken over then.
HEARTBEAT_SECONDS = 1
TAKEOVER_SECONDS = 3 * HEARTBEAT_SECONDS + 30


@dataclass
class Cluster:
    app: Flask  # in-process, on the same schema: sets the world up and reads the database
    nodes: dict[str, Gunicorn]
    nginx: Nginx
    world: World
    custodian: dict[str, str]
    research: dict[str, str]
    base_env: dict[str, str]
    tmp: Path

    @property
    def proxy(self) -> Endpoint:
        return self.nginx.endpoint()

    def node(self, name: str) -> Endpoint:
        """Node `name` addressed directly, as nginx addresses it (the public Host)."""
        return Endpoint(self.nodes[name].port, PUBLIC_NAME)

    def node_env(self, export_worker: str) -> dict[str, str]:
        return {**self.base_env, "PASSERELLE_EXPORT_WORKER": export_worker}

    def restart(self, name: str, export_worker: str) -> None:
        """Stop node `name` (at once, as `Gunicorn.__exit__` does) and start it again on its port, with
        `export_worker`."""
        old = self.nodes[name]
        old.__exit__(None, None, None)
        new = Gunicorn(self.node_env(export_worker), self.tmp / f"node-{name}-{uuid.uuid4().hex[:6]}.log",
                       preload=True, port=old.port)
        self.nodes[name] = new.start()
        new.wait_ready()

    def answered_by(self, since: int) -> dict[str, int]:
        """How many requests nginx logged after byte `since` of its access log each node answered."""
        names = list(self.nodes)
        return dict(zip(names, self.nginx.answered_by(since, [self.nodes[n].port for n in names]), strict=True))


def _seed(app: Flask, custodian: dict[str, str], world: World) -> None:
    entries = [{"resource": observation(world.patients["consented"], value=float(n)),
                "request": {"method": "POST", "url": "Observation"}} for n in range(SEED_OBSERVATIONS)]
    response = app.test_client().post("/fhir", json={"resourceType": "Bundle", "type": "transaction",
                                                     "entry": entries}, headers=custodian)
    assert response.status_code == 200, response.get_json()


@pytest.fixture(scope="session")
def cluster(pg_server_schema: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The two-node world, started once per test process that runs these tests (session scope: pytest-xdist
    may interleave them with other modules' tests, which would restart a module-scoped world)."""
    if shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin") is None:
        if in_ci(os.environ):
            pytest.fail("the two-node tests must run in CI: nginx is not installed (.ci/run installs it)")
        pytest.skip("nginx is not installed")
    tmp = tmp_path_factory.mktemp("nodes")
    key_file = tmp / "master.key"
    app = create_app({"DATABASE_URL": pg_server_schema, "INSTANCE_DIR": str(tmp), "MASTER_KEY_FILE": str(key_file),
                      "EXPORT_WORKER": "off"})
    ensure_master_key(str(key_file))
    with app.app_context(), db.write() as conn:
        database.record_settings(conn)  # what `init-db` does before the nodes start
    base_env = {**{k: v for k, v in os.environ.items() if not k.startswith("PASSERELLE_")},
                "PASSERELLE_DATABASE_URL": pg_server_schema, "PASSERELLE_MASTER_KEY_FILE": str(key_file),
                "PASSERELLE_INSTANCE_DIR": str(tmp), "PASSERELLE_BASE_URL": PUBLIC,
                "PASSERELLE_FORWARDED_ALLOW_IPS": "127.0.0.1", "PASSERELLE_LOG_LEVEL": "warning",
                "PASSERELLE_EXPORT_POLL_SECONDS": "0", "PASSERELLE_TOKEN_RATE_LIMIT": str(TOKEN_LIMIT),
                "PASSERELLE_EXPORT_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS)}
    nodes = {"A": Gunicorn({**base_env, "PASSERELLE_EXPORT_WORKER": "off"}, tmp / "node-A.log", preload=True),
             "B": Gunicorn({**base_env, "PASSERELLE_EXPORT_WORKER": "thread"}, tmp / "node-B.log", preload=True)}
    for node in nodes.values():
        node.start()
    try:
        client = app.test_client()
        with app.app_context(), db.write() as conn:
            registered = register_client(conn, "custodian", "custodian")
        custodian = bearer(client.post("/auth/token", data={"grant_type": "client_credentials"},
                                       auth=(registered["client_id"], registered["client_secret"])
                                       ).get_json()["access_token"])
        custodian["Content-Type"] = "application/fhir+json"
        world = build(app, client, custodian)  # while the nodes start
        _seed(app, custodian, world)
        research = bearer(token(client, app, "research", world.project))
        for node in nodes.values():
            node.wait_ready()
        with Nginx(tmp / "nginx", [node.port for node in nodes.values()]) as nginx:
            yield Cluster(app, nodes, nginx, world, custodian, research, base_env, tmp)
    finally:
        for node in nodes.values():
            node.kill()
        app.extensions["passerelle.engine"].dispose()


def _json_headers(headers: dict[str, str]) -> dict[str, str]:
    return {**headers, "Content-Type": "application/fhir+json"}


def _markers(reply: Reply) -> set[float]:
    assert reply.status == 200, reply.body[:300]
    return {entry["resource"]["valueQuantity"]["value"] for entry in reply.json().get("entry", [])}


# -- consent ------------------------------------------------------------------------------------------


def test_a_consent_withdrawn_via_node_a_is_enforced_by_node_b_on_the_next_request(cluster):
    """In the world's other project: no other test here reads its data."""
    world, marker = cluster.world, cluster.world.marker["other_project"]
    research = bearer(token(cluster.app.test_client(), cluster.app, "research", world.other_project))
    search = "/research/fhir/Observation?code=http://loinc.org|8480-6"
    assert marker in _markers(cluster.node("B").call("GET", search, headers=research))
    withdrawal = writer.build(world.patients["other_project"], world.other_project, "none", [], source="test")
    stored = cluster.node("A").call("POST", "/fhir/Consent", orjson.dumps(withdrawal), cluster.custodian)
    assert stored.status == 201, stored.body[:300]
    assert marker not in _markers(cluster.node("B").call("GET", search, headers=research))
    assert marker not in _markers(cluster.proxy.call("GET", search, headers=research))


# -- the privacy budget ----------------------------------------------------------------------------------


def test_200_concurrent_questions_over_both_nodes_spend_exactly_the_answered_epsilon_never_more(cluster):
    app = cluster.app
    with app.app_context(), db.write() as conn:
        project_id = projects.create(conn, name="aggregates", tier="aggregate", epsilon=AGGREGATE_BUDGET).project_id
    headers = _json_headers(bearer(token(app.test_client(), app, "research", project_id)))
    start = threading.Barrier(QUESTIONS)
    statuses: dict[int, int] = {}

    def ask(key: int) -> None:
        question = {"resourceType": "Parameters", "parameter": [
            {"name": "measure", "valueString": "count"},
            {"name": "cohort", "valueString": "Observation?code=http://loinc.org|8480-6"},
            {"name": "epsilon", "valueDecimal": (EPSILON_BASE_MICRO + key) / budget.MICRO}]}
        start.wait()
        statuses[EPSILON_BASE_MICRO + key] = cluster.proxy.call(
            "POST", "/research/fhir/$aggregate", orjson.dumps(question), headers, timeout=120).status

    logged = cluster.nginx.log_size()
    askers = [threading.Thread(target=ask, args=(key,)) for key in range(QUESTIONS)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    assert set(Counter(statuses.values())) <= {200, 403}, Counter(statuses.values())
    with app.app_context(), db.read() as conn:
        spent, total = conn.execute(select(budgets.c.spent_micro, budgets.c.total_micro)
                                    .where(budgets.c.project_id == project_id)).one()
        spends = Counter(conn.execute(select(budget_spends.c.epsilon_micro).where(
            budget_spends.c.project_id == project_id, budget_spends.c.kind == "query")).scalars())
    answered = {micro for micro, status in statuses.items() if status == 200}
    assert spent <= total
    assert spent == sum(answered) and set(spends) == answered and max(spends.values()) == 1
    assert all(micro > total - spent for micro in statuses.keys() - answered), "a question that fitted was refused"
    deadline = time.monotonic() + 10  # nginx logs a request once its answer is sent: the last lines may lag
    while sum((served := cluster.answered_by(logged)).values()) < QUESTIONS and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served["A"] > 0 and served["B"] > 0 and served["A"] + served["B"] == QUESTIONS, served


# -- export ---------------------------------------------------------------------------------------------


def _kick_off(endpoint: Endpoint, headers: dict[str, str], node_down: bool = False) -> str:
    """Start an export; with `node_down`, send it again after a 502, as a client does: nginx sends a
    kick-off to one node once (deploy/nginx.conf), and one it sends to a dead node is answered 502."""
    for _ in range(4 if node_down else 1):
        reply = endpoint.call("GET", "/research/fhir/$export?_type=Observation", headers={
            **headers, "Prefer": "respond-async"})
        if reply.status != 502:
            break
    assert reply.status == 202, reply.body[:300]
    location = reply.headers["Content-Location"]
    assert location.startswith(f"{PUBLIC}/research/fhir/_export/")
    return location.removeprefix(PUBLIC)


def _finished(endpoint: Endpoint, status_path: str, headers: dict[str, str], seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while (reply := endpoint.call("GET", status_path, headers=headers)).status == 202:
        assert time.monotonic() < deadline, f"{status_path} did not end: {reply.headers.get('X-Progress')}"
        time.sleep(0.2)
    assert reply.status == 200, reply.body[:300]
    return reply.json()


def _exported_ids(endpoint: Endpoint, manifest: dict[str, Any], headers: dict[str, str]) -> list[str]:
    ids: list[str] = []
    for output in manifest["output"]:
        reply = endpoint.call("GET", output["url"].removeprefix(PUBLIC), headers=headers)
        assert reply.status == 200, reply.body[:300]
        lines = reply.body.splitlines()
        assert len(lines) == output["count"]
        ids.extend(orjson.loads(line)["id"] for line in lines)
    return ids


class Owners:
    """Every (job, owner) the export_jobs table shows while it runs: a job run twice shows two owners."""

    def __init__(self, app: Flask):
        self.app, self.stopping = app, threading.Event()
        self.seen: set[tuple[str, str]] = set()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stopping.is_set():
            with self.app.app_context(), db.read() as conn:
                self.seen.update(conn.execute(select(export_jobs.c.job_id, export_jobs.c.owner)
                                              .where(export_jobs.c.owner.is_not(None))).all())
            time.sleep(0.02)

    def __enter__(self) -> Owners:
        self.thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)

    def of(self, job_id: str) -> set[str]:
        return {owner for job, owner in self.seen if job == job_id}


def _pid(owner: str) -> int:
    return int(owner.split("-")[-2])  # service.export.Worker ids: host-pid-random


#: What an Observation export of the world's record-level project holds: the world's record-visible
#: Observations (5, see tests/test_crash_safety.py) and the seeded ones.
EXPORTED = 5 + SEED_OBSERVATIONS


def test_an_export_accepted_by_node_a_is_run_once_by_node_b_and_served_whole_by_it(cluster):
    with Owners(cluster.app) as owners:
        status_paths = [_kick_off(cluster.node("A"), cluster.research) for _ in range(3)]
        manifests = [_finished(cluster.node("B"), path, cluster.research, 60) for path in status_paths]
    b_workers = set(cluster.nodes["B"].worker_pids())
    for path, manifest in zip(status_paths, manifests, strict=True):
        ran_by = owners.of(path.rsplit("/", 1)[1])
        assert len(ran_by) == 1 and {_pid(owner) for owner in ran_by} <= b_workers, ran_by
        ids = _exported_ids(cluster.node("B"), manifest, cluster.research)
        assert len(ids) == len(set(ids)) == EXPORTED


# -- limits, client assertions and portal sessions -----------------------------------------------------


def _basic_token(endpoint: Endpoint, client_id: str, secret: str) -> int:
    import base64

    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return endpoint.call("POST", "/auth/token", b"grant_type=client_credentials", {
        "Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"}).status


def test_the_token_limit_counts_a_clients_attempts_on_both_nodes_together(cluster):
    with cluster.app.app_context(), db.write() as conn:
        registered = register_client(conn, "limited", "custodian")
    attempts = [_basic_token(cluster.node(name), registered["client_id"], registered["client_secret"])
                for name in ("A", "B") * (TOKEN_LIMIT // 2)]
    assert attempts == [200] * TOKEN_LIMIT
    assert _basic_token(cluster.node("A"), registered["client_id"], registered["client_secret"]) == 429
    assert _basic_token(cluster.node("B"), registered["client_id"], registered["client_secret"]) == 429


def test_a_client_assertion_used_on_node_a_is_refused_as_a_replay_on_node_b(cluster):
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = {**jwt.get_algorithm_by_name("ES384").to_jwk(key.public_key(), as_dict=True), "kid": "k1"}
    with cluster.app.app_context(), db.write() as conn:
        client_id = register_client(conn, "backend", "custodian", jwks=json.dumps({"keys": [jwk]}))["client_id"]
    claims = {"iss": client_id, "sub": client_id, "aud": f"{PUBLIC}/auth/token", "exp": int(time.time()) + 240,
              "jti": str(uuid.uuid4())}
    form = (f"grant_type=client_credentials&client_assertion_type={ASSERTION_TYPE}&client_assertion="
            f"{jwt.encode(claims, key, algorithm='ES384', headers={'kid': 'k1'})}").encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    assert cluster.node("A").call("POST", "/auth/token", form, headers).status == 200
    replay = cluster.node("B").call("POST", "/auth/token", form, headers)
    assert replay.status == 401 and "already used" in replay.json()["error_description"]


@dataclass
class Browser:
    """Cookies kept across requests to any node, as one browser keeps them for one site."""

    cookies: dict[str, str] = field(default_factory=dict)

    def call(self, endpoint: Endpoint, method: str, path: str, form: dict[str, str] | None = None) -> Reply:
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())} if self.cookies else {}
        body = None
        if form is not None:
            from urllib.parse import urlencode

            body, headers["Content-Type"] = urlencode(form).encode(), "application/x-www-form-urlencoded"
        reply = endpoint.call(method, path, body, headers)
        for raw in reply.headers.get_all("Set-Cookie") or []:
            for name, morsel in SimpleCookie(raw).items():
                if morsel.value:
                    self.cookies[name] = morsel.value
                else:
                    self.cookies.pop(name, None)
        return reply

    def csrf(self, endpoint: Endpoint, path: str) -> str:
        page = self.call(endpoint, "GET", path)
        found = re.search(r'name="csrf_token" value="([^"]+)"', page.body.decode())
        assert found, page.body[:300]
        return found.group(1)


def test_a_portal_session_signed_in_on_node_a_serves_on_node_b_and_signing_out_on_b_ends_it_on_a(cluster):
    app, client = cluster.app, cluster.app.test_client()
    patient_with_number(client, cluster.custodian, "two-nodes-patient", "MRN-2N")
    assert accept(client, invite(app, "MRN-2N")).status_code == 303  # the passphrase is chosen
    browser, a, b = Browser(), cluster.node("A"), cluster.node("B")
    signed_in = browser.call(a, "POST", "/consent/signin", {
        "csrf_token": browser.csrf(a, "/consent/signin"), "number": "MRN-2N", "passphrase": PASSPHRASE})
    assert signed_in.status == 303, signed_in.body[:300]
    assert browser.call(b, "GET", "/consent/").status == 200
    signed_out = browser.call(b, "POST", "/consent/signout", {"csrf_token": browser.csrf(b, "/consent/")})
    assert signed_out.status == 303
    assert browser.call(a, "GET", "/consent/").status == 302  # to the sign-in page


# -- a node killed in the middle of work --------------------------------------------------------------


@dataclass
class Call:
    key: int
    started: float
    status: int | None = None  # None: the connection broke


class Questions:
    """Clients sending `$aggregate` questions (each of a unique ε) through nginx until stopped."""

    def __init__(self, cluster: Cluster, headers: dict[str, str], clients: int = 4):
        self.cluster, self.headers = cluster, headers
        self.calls: list[Call] = []
        self.keys = iter(range(1, 1_000_000))
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]

    def _loop(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                call = Call(next(self.keys), time.monotonic())
                self.calls.append(call)
            question = {"resourceType": "Parameters", "parameter": [
                {"name": "measure", "valueString": "count"},
                {"name": "cohort", "valueString": "Observation?code=http://loinc.org|8480-6"},
                {"name": "epsilon", "valueDecimal": (EPSILON_BASE_MICRO + call.key) / budget.MICRO}]}
            try:
                call.status = self.cluster.proxy.call("POST", "/research/fhir/$aggregate", orjson.dumps(question),
                                                      self.headers, timeout=60).status
            except OSError:
                call.status = None

    def __enter__(self) -> Questions:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=90)

    def in_flight(self) -> int:
        with self.lock:
            return sum(1 for call in self.calls if call.status is None)


def _unfinished(cluster: Cluster) -> int:
    with cluster.app.app_context(), db.read() as conn:
        return len(conn.execute(select(export_jobs.c.job_id).where(
            export_jobs.c.state.in_(("accepted", "in-progress")))).all())


def _running_on(cluster: Cluster, name: str) -> str | None:
    """A job a worker of node `name` is running now."""
    workers = set(cluster.nodes[name].worker_pids())
    with cluster.app.app_context(), db.read() as conn:
        for job_id, owner in conn.execute(select(export_jobs.c.job_id, export_jobs.c.owner)
                                          .where(export_jobs.c.state == "in-progress")):
            if _pid(owner) in workers:
                return job_id
    return None


def test_killing_node_b_mid_work_loses_and_duplicates_nothing_and_node_a_carries_on(cluster):
    """SIGKILL to node B's whole process group while one of its workers runs an export job and `$aggregate`
    questions are in flight through nginx. Questions sent from a second after the kill are all answered
    (nginx passes them to A); one in flight on B may fail (502) but then is not answered and, if it was
    paid for, that ε is the only spend without an answer. B's job is taken over by a worker of A once B's
    heartbeats are three intervals old (service/export.py), and every export ends whole, no line twice.
    `audit verify` passes."""
    cluster.restart("A", "thread")  # now both nodes run export workers
    try:
        _kill_b_mid_work(cluster)
    finally:
        cluster.restart("B", "thread")
        cluster.restart("A", "off")


def _kill_b_mid_work(cluster: Cluster) -> None:
    app, research = cluster.app, cluster.research
    with app.app_context(), db.write() as conn:
        budget.raise_budget(conn, cluster.world.project, 1000.0, actor="test")
    with Owners(app) as owners, Questions(cluster, _json_headers(research)) as questions:
        status_paths: list[str] = []
        deadline = time.monotonic() + 30
        while (job_id := _running_on(cluster, "B")) is None or questions.in_flight() == 0:
            assert time.monotonic() < deadline, "node B never ran an export job while questions were in flight"
            if _unfinished(cluster) < 2:
                status_paths.append(_kick_off(cluster.proxy, research))
            time.sleep(0.01)
        killed_workers = set(cluster.nodes["B"].worker_pids())
        cluster.nodes["B"].kill()
        killed_at = time.monotonic()
        status_paths.append(_kick_off(cluster.proxy, research, node_down=True))  # served by node A
        time.sleep(3)
    manifests = {path: _finished(cluster.proxy, path, research, TAKEOVER_SECONDS) for path in status_paths}
    for path, manifest in manifests.items():
        ids = _exported_ids(cluster.proxy, manifest, research)
        assert len(ids) == len(set(ids)) == EXPORTED, path
    finished_by = owners.of(job_id)
    assert any(_pid(owner) in killed_workers for owner in finished_by)
    with app.app_context(), db.read() as conn:
        final_owner = conn.execute(select(export_jobs.c.owner).where(export_jobs.c.job_id == job_id)).scalar_one()
    assert _pid(final_owner) in set(cluster.nodes["A"].worker_pids()), "the killed node's job was not taken over"

    late = [call for call in questions.calls if call.started > killed_at + 1]
    assert late and all(call.status == 200 for call in late), Counter(call.status for call in late)
    early = [call for call in questions.calls if call.started <= killed_at + 1]
    assert {call.status for call in early} <= {200, 502, None}
    _check_ledger(app, cluster.world.project, questions.calls)
    verified = subprocess.run([str(Path(sys.executable).parent / "flask"), "--app", "wsgi", "audit", "verify"],
                              cwd=ROOT, env=cluster.node_env("off"), capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _check_ledger(app: Flask, project_id: str, calls: list[Call]) -> None:
    """Every answered question paid once; a question paid but not answered is one whose node died under it."""
    sent = {EPSILON_BASE_MICRO + call.key: call for call in calls}
    with app.app_context(), db.read() as conn:
        spent = conn.execute(select(budgets.c.spent_micro).where(budgets.c.project_id == project_id)).scalar_one()
        spends = Counter(conn.execute(select(budget_spends.c.epsilon_micro).where(
            budget_spends.c.project_id == project_id, budget_spends.c.kind == "query")).scalars())
    assert spent == sum(spends.elements()) and max(spends.values()) == 1
    assert set(spends) <= set(sent), "a spend for no question asked"
    answered = {micro for micro, call in sent.items() if call.status == 200}
    assert answered <= set(spends), "an answer without its spend"
    assert all(sent[micro].status in (502, None) for micro in set(spends) - answered)
