"""Crash safety: gunicorn workers killed with SIGKILL in the middle of requests and jobs.

The real app is served by gunicorn with the settings of `deploy/gunicorn.conf.py` (several
workers, each running an export worker thread; the app preloaded, see `_gunicorn`) on SQLite
and on PostgreSQL. While clients keep sending
transaction Bundles, `$aggregate` questions and `$export` kick-offs, one worker at a time
is killed with SIGKILL, 20 times, each kill aimed at a worker that is, at that moment:

- inside the write transaction of a transaction Bundle it is serving (SQLite: it holds the
  WAL write lock, read from /proc/locks; PostgreSQL: its database session has a transaction
  id, read from pg_stat_activity and mapped to the worker through its socket);
- running an `$export` job (the job's owner in the database names the worker's pid);
- serving an `$aggregate` whose ε is already reserved in the ledger.

gunicorn replaces each killed worker. Afterwards:

- no Bundle is stored in part: each Bundle's Observations (tagged with the Bundle's key)
  are all there or none, and all there for every Bundle answered 200;
- every export job ends, completed (by another worker when its own was killed) with files
  whose parts hold exactly the lines the manifest counts, or failed;
- the budget ledger is the ε of the answered questions plus the ε of questions that
  failed after their reservation, never less: every recorded answer, and every answer a
  client received, has its spend; every spend belongs to one question sent; `spent`
  equals the sum of the spends;
- `flask --app wsgi audit verify` passes.

The last tests show, in one process, the two rules the export workers' recovery rests on.
"""
from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, text, update
from sqlalchemy.engine import make_url

from benchmarks.harness import Gunicorn
from policies import budget
from service import db
from service.export import LEASE_US, Worker
from service.store import jobs
from service.store.schema import (
    answers,
    budget_spends,
    budgets,
    export_files,
    export_jobs,
    export_parts,
    export_workers,
    resources,
)
from tests.fhir_helpers import observation
from tests.research_world import World

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORKERS = 3
#: What each of the 20 kills interrupts, in order: exports first, so that the jobs taken over from
#: killed workers end while the other kills go on.
KILLS = ("export", "bundle", "export", "aggregate") * 3 + ("bundle", "aggregate") * 4
#: Observations per transaction Bundle: small Bundles, many in flight.
BUNDLE_ENTRIES = 20
BUNDLE_SENDERS = 3
AGGREGATE_SENDERS = 3
#: Observations stored before serving starts, so that an export job runs long enough to be killed.
SEED_OBSERVATIONS = 1500
TAG = "urn:passerelle:test:crash-safety"
#: Each question's ε is unique (BASE + key µε), so a spend in the ledger names the question it paid for.
EPSILON_BASE_MICRO = 10_000
#: How long a kill may wait for its target to appear, and a replacement worker to serve.
AIM_SECONDS = 20.0
READY_SECONDS = 30.0
#: Exports killed mid-job are taken over once their worker's heartbeats stop (every second here, three missed).
EXPORTS_END_SECONDS = 45.0


# -- what the machine tells about processes, sockets and locks --------------------------------------


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def _tcp_connections() -> dict[tuple[int, int], int]:
    """(local port, remote port) → socket inode of every IPv4 TCP socket on this host."""
    table: dict[tuple[int, int], int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], int(fields[9])
        table[(int(local.split(":")[1], 16), int(remote.split(":")[1], 16))] = inode
    return table


def _owners(pids: set[int], connections: dict[tuple[int, int], int],
            pairs: set[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """The process (among `pids`) holding each (local port, remote port) socket."""
    wanted = {connections[pair]: pair for pair in pairs if pair in connections}
    found: dict[tuple[int, int], int] = {}
    for pid in pids:
        for inode in _socket_inodes(pid) & wanted.keys():
            found[wanted[inode]] = pid
    return found


def _sqlite_writer(database: Path) -> int | None:
    """The process holding SQLite's WAL write lock (byte 120 of the -shm file): it is inside a write
    transaction."""
    try:
        inode = os.stat(f"{database}-shm").st_ino
    except OSError:
        return None
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if fields[3] == "WRITE" and fields[5].endswith(f":{inode}") and fields[6] == "120":
            return int(fields[4])
    return None


# -- gunicorn ------------------------------------------------------------------------------------


def _gunicorn(app: Flask, log: Path) -> Gunicorn:
    """gunicorn with the shipped settings, preloaded (`benchmarks.harness.PRELOADED`: a worker gunicorn forks
    to replace a killed one serves at once; twenty cold starts would not fit the time this test may take),
    serving the test's database and key; `start()` starts it."""
    env = {**os.environ, "PASSERELLE_DATABASE_URL": app.config["DATABASE_URL"],
           "PASSERELLE_MASTER_KEY_FILE": app.config["MASTER_KEY_FILE"],
           "PASSERELLE_INSTANCE_DIR": app.config["INSTANCE_DIR"], "PASSERELLE_EXPORT_WORKER": "thread",
           "PASSERELLE_EXPORT_POLL_SECONDS": "0", "PASSERELLE_THREADS": "4", "PASSERELLE_LOG_LEVEL": "warning",
           "PASSERELLE_EXPORT_HEARTBEAT_SECONDS": "1"}
    return Gunicorn(env, log, WORKERS, preload=True)


def _ready_workers(app: Flask) -> set[int]:
    """Pids of the workers whose export thread has beaten (post_worker_init starts it: the worker serves)."""
    with app.app_context(), db.read() as conn:
        ids = conn.execute(select(export_workers.c.worker_id)).scalars()
        return {int(worker_id.split("-")[-2]) for worker_id in ids}


def _wait_serving(app: Flask, server: Gunicorn) -> set[int]:
    """Until every worker of the server is ready; returns their pids."""
    deadline = time.monotonic() + READY_SECONDS
    while True:
        assert server.process is not None and server.process.poll() is None, server.tail()
        workers = set(server.worker_pids())
        if len(workers) == WORKERS and workers <= _ready_workers(app):
            return workers
        assert time.monotonic() < deadline, f"workers {workers} did not all start: {server.tail()}"
        time.sleep(0.1)


def _wait_replaced(server: Gunicorn, killed: int) -> set[int]:
    """Until gunicorn has reaped the killed worker and forked its replacement; returns the workers' pids."""
    deadline = time.monotonic() + READY_SECONDS
    while (workers := set(server.worker_pids())) and (killed in workers or len(workers) < WORKERS):
        assert time.monotonic() < deadline, f"worker {killed} was not replaced: {server.tail()}"
        time.sleep(0.01)
    return workers


# -- the clients ---------------------------------------------------------------------------------


@dataclass
class Call:
    """One request: its client port while in flight, then its status (None if the connection broke)."""

    kind: str
    key: int
    port: int = 0
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    done: bool = False


class Traffic:
    """Clients that keep sending Bundles, $aggregate questions and $export kick-offs until stopped."""

    def __init__(self, port: int, custodian: dict[str, str], research: dict[str, str], patient_id: str):
        self.port, self.custodian, self.research, self.patient_id = port, custodian, research, patient_id
        self.calls: list[Call] = []
        self.jobs: list[str] = []
        self.unfinished: list[str] = []  # status URLs of the jobs not known to have ended
        self.lock = threading.Lock()
        self.keys = itertools.count(1)
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(send,), daemon=True)
                        for send in [self._bundle] * BUNDLE_SENDERS + [self._aggregate] * AGGREGATE_SENDERS
                        + [self._export]]

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=90)
        assert not any(thread.is_alive() for thread in self.threads), "a client never got its answer"

    def in_flight(self, kind: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.kind == kind and c.port and not c.done]

    def of(self, kind: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.kind == kind]

    def _loop(self, send: Callable[[], None]) -> None:
        while not self.stopping.is_set():
            send()

    def _send(self, kind: str, key: int, method: str, path: str, body: bytes | None,
              headers: dict[str, str]) -> Call:
        call = Call(kind, key)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.connect()
            call.port = conn.sock.getsockname()[1]
            with self.lock:
                self.calls.append(call)
            conn.request(method, path, body, headers)
            response = conn.getresponse()
            response.read()
            call.status, call.headers = response.status, dict(response.getheaders())
        except (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead):
            pass  # the worker serving it was killed: the status stays None
        finally:
            call.done = True
            conn.close()
        return call

    def _bundle(self) -> None:
        key = next(self.keys)
        tag = {"system": TAG, "code": f"bundle-{key}"}
        entries = [{"fullUrl": f"urn:uuid:{key:08d}-0000-4000-8000-{n:012d}",
                    "resource": observation(self.patient_id, value=float(n), meta={"tag": [tag]}),
                    "request": {"method": "POST", "url": "Observation"}} for n in range(BUNDLE_ENTRIES)]
        self._send("bundle", key, "POST", "/fhir", orjson.dumps(
            {"resourceType": "Bundle", "type": "transaction", "entry": entries}),
            {**self.custodian, "Content-Type": "application/fhir+json"})

    def _aggregate(self) -> None:
        key = next(self.keys)
        question = {"resourceType": "Parameters", "parameter": [
            {"name": "measure", "valueString": "count"},
            {"name": "cohort", "valueString": "Observation?code=http://loinc.org|8480-6"},
            {"name": "epsilon", "valueDecimal": (EPSILON_BASE_MICRO + key) / budget.MICRO}]}
        self._send("aggregate", key, "POST", "/research/fhir/$aggregate", orjson.dumps(question),
                   {**self.research, "Content-Type": "application/fhir+json"})

    def _export(self) -> None:
        """Keep a few export jobs queued or running: poll each, start another when one ends."""
        self.unfinished = [url for url in self.unfinished if self._send(
            "poll", 0, "GET", url.removeprefix(f"http://127.0.0.1:{self.port}"), None, self.research).status == 202]
        if len(self.unfinished) < 2 * WORKERS:
            call = self._send("export", next(self.keys), "GET", "/research/fhir/$export?_type=Observation",
                              None, {**self.research, "Prefer": "respond-async"})
            if call.status == 202:
                self.unfinished.append(call.headers["Content-Location"])
                self.jobs.append(call.headers["Content-Location"].rsplit("/", 1)[1])
        time.sleep(0.2)


# -- aiming the kills ------------------------------------------------------------------------------


class Aim:
    """Finds, among the live workers, one in the middle of a kind of work."""

    def __init__(self, app: Flask, server: Gunicorn, traffic: Traffic, database_url: str):
        self.app, self.server, self.traffic = app, server, traffic
        url = make_url(database_url)
        self.sqlite = url.get_backend_name() == "sqlite"
        self.database = Path(url.database or "")
        self.database_port = url.port or 5432

    def _serving(self, calls: list[Call], workers: set[int]) -> dict[int, Call]:
        """Worker pid → a call of `calls` it is serving now."""
        pairs = {(self.server.port, c.port): c for c in calls}
        owners = _owners(workers, _tcp_connections(), set(pairs))
        return {pid: pairs[pair] for pair, pid in owners.items()}

    def _in_write_transaction(self, workers: set[int]) -> set[int]:
        if self.sqlite:
            writer = _sqlite_writer(self.database)
            return {writer} & workers
        with self.app.app_context(), db.read() as conn:
            ports = set(conn.execute(text(
                "SELECT client_port FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND client_port IS NOT NULL"
            )).scalars())
        return set(_owners(workers, _tcp_connections(), {(p, self.database_port) for p in ports}).values())

    def bundle(self, workers: set[int]) -> int | None:
        serving = self._serving(self.traffic.in_flight("bundle"), workers)
        writing = self._in_write_transaction(set(serving))
        return min(writing) if writing else None

    def export(self, workers: set[int]) -> int | None:
        with self.app.app_context(), db.read() as conn:
            owners = conn.execute(select(export_jobs.c.owner).where(export_jobs.c.state == "in-progress")).scalars()
            running = {int(owner.split("-")[-2]) for owner in owners}
        return min(running & workers) if running & workers else None

    def aggregate(self, workers: set[int]) -> int | None:
        serving = self._serving(self.traffic.in_flight("aggregate"), workers)
        if not serving:
            return None
        with self.app.app_context(), db.read() as conn:
            reserved = set(conn.execute(select(budget_spends.c.epsilon_micro).where(
                budget_spends.c.epsilon_micro.in_([EPSILON_BASE_MICRO + c.key for c in serving.values()]))
            ).scalars())
        paid = [pid for pid, call in serving.items() if EPSILON_BASE_MICRO + call.key in reserved]
        return min(paid) if paid else None


# -- the test ------------------------------------------------------------------------------------


def _seed(app: Flask, client: FlaskClient, custodian_headers: dict[str, str], world: World) -> None:
    """Enough Observations of the consenting patient that an export job runs a while; budget to spend."""
    entries = [{"resource": observation(world.patients["consented"], value=float(n)),
                "request": {"method": "POST", "url": "Observation"}} for n in range(SEED_OBSERVATIONS)]
    response = client.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
                           headers=custodian_headers)
    assert response.status_code == 200, response.get_json()
    with app.app_context(), db.write() as conn:
        budget.raise_budget(conn, world.project, 1000.0, actor="test")


def test_workers_killed_mid_bundle_export_and_aggregate_leave_everything_whole(
        app, client, database_url, tmp_path, world, research, custodian_headers):
    killed: list[tuple[str, int, int]] = []  # (kind, pid, instant of the kill)
    server = _gunicorn(app, tmp_path / "gunicorn.log").start()
    try:
        _seed(app, client, custodian_headers, world)  # while gunicorn starts
        workers = _wait_serving(app, server)
        with Traffic(server.port, custodian_headers, research, world.patients["consented"]) as traffic:
            aim = Aim(app, server, traffic, database_url)
            for kind in KILLS:
                deadline = time.monotonic() + AIM_SECONDS
                while (target := getattr(aim, kind)(workers)) is None:
                    assert time.monotonic() < deadline, f"no worker was in the middle of {kind} work; killed {killed}"
                    time.sleep(0.005)
                os.kill(target, signal.SIGKILL)
                killed.append((kind, target, db.now_us()))
                workers = _wait_replaced(server, target)
        _wait_exports_end(app, server)
    finally:
        server.kill()
    _check_bundles(app, traffic)
    _check_exports(app, traffic, {pid: at for kind, pid, at in killed})
    _check_ledger(app, world.project, traffic)
    _check_audit(server)


def _wait_exports_end(app: Flask, server: Gunicorn) -> None:
    """Until no export job is queued or running any more."""
    deadline = time.monotonic() + EXPORTS_END_SECONDS
    while True:
        with app.app_context(), db.read() as conn:
            running = dict(conn.execute(select(export_jobs.c.job_id, export_jobs.c.state).where(
                export_jobs.c.state.in_(("accepted", "in-progress")))).all())
        if not running:
            return
        assert time.monotonic() < deadline, f"export jobs never ended: {running}\n{server.tail()}"
        time.sleep(0.2)


def _check_bundles(app: Flask, traffic: Traffic) -> None:
    stored: Counter[str] = Counter()
    with app.app_context(), db.read() as conn:
        for raw in conn.execute(select(resources.c.json).where(resources.c.type == "Observation",
                                                               resources.c.deleted.is_(False))).scalars():
            for tag in orjson.loads(raw).get("meta", {}).get("tag", []):
                if tag.get("system") == TAG:
                    stored[tag["code"]] += 1
    partial = {code: n for code, n in stored.items() if n != BUNDLE_ENTRIES}
    assert not partial, f"Bundles stored in part: {partial}"
    calls = traffic.of("bundle")
    answered = {f"bundle-{c.key}" for c in calls if c.status == 200}
    assert answered <= set(stored), f"Bundles answered 200 but not stored: {answered - set(stored)}"
    refused = {f"bundle-{c.key}" for c in calls if c.status is not None and c.status != 200}
    assert not refused & set(stored), "Bundles refused but stored"
    assert any(c.status is None for c in calls), "no Bundle was interrupted"


def _check_exports(app: Flask, traffic: Traffic, killed: dict[int, int]) -> None:
    """Every job ended, whole; a job completed by a worker that was killed later (it ran jobs before the one it
    was killed in) completed before its kill, never after."""
    ttl_us = app.config["EXPORT_TTL_SECONDS"] * 1_000_000
    with app.app_context(), db.read() as conn:
        ended = conn.execute(select(export_jobs.c.job_id, export_jobs.c.state, export_jobs.c.owner,
                                    export_jobs.c.expires)).all()
        assert {job.job_id for job in ended} >= set(traffic.jobs)
        for job in ended:
            assert job.state in ("completed", "failed"), job
            if job.state == "failed":
                continue
            owner = int(job.owner.split("-")[-2])
            assert owner not in killed or job.expires - ttl_us <= killed[owner], \
                f"job {job.job_id} completed by worker {owner} after it was killed"
            files = dict(conn.execute(select(export_files.c.file_no, export_files.c.count)
                                      .where(export_files.c.job_id == job.job_id)).all())
            lines: dict[int, list[str]] = {}
            for part in conn.execute(select(export_parts.c.file_no, export_parts.c.content).where(
                    export_parts.c.job_id == job.job_id).order_by(export_parts.c.file_no, export_parts.c.part)):
                lines.setdefault(part.file_no, []).extend(
                    orjson.loads(line)["id"] for line in bytes(part.content).splitlines())
            assert {n: len(ids) for n, ids in lines.items()} == files, f"job {job.job_id}: parts ≠ manifest"
            assert all(len(set(ids)) == len(ids) for ids in lines.values()), f"job {job.job_id}: a line twice"
    assert any(job.state == "completed" for job in ended), "no export completed"


def _check_ledger(app: Flask, project_id: str, traffic: Traffic) -> None:
    calls = {EPSILON_BASE_MICRO + c.key: c for c in traffic.of("aggregate")}
    with app.app_context(), db.read() as conn:
        spent = conn.execute(select(budgets.c.spent_micro).where(budgets.c.project_id == project_id)).scalar_one()
        spends = list(conn.execute(select(budget_spends.c.epsilon_micro).where(
            budget_spends.c.project_id == project_id, budget_spends.c.kind == "query")).scalars())
        recorded = [round(json.loads(r)["epsilon"] * budget.MICRO) for r in conn.execute(
            select(answers.c.response).where(answers.c.project_id == project_id)).scalars()]
    assert spent == sum(spends), "the budget's spent ε is not the sum of its spends"
    assert len(set(spends)) == len(spends), "a question was paid twice"
    assert set(spends) <= set(calls), "a spend for no question asked"
    received = {micro for micro, c in calls.items() if c.status == 200}
    assert received <= set(recorded), "an answer was released without being recorded"
    assert set(recorded) <= set(spends), "an answer was recorded without being paid for"
    unanswered = set(spends) - set(recorded)
    assert all(calls[micro].status is None or calls[micro].status >= 500 for micro in unanswered), \
        "a spend without an answer for a question that did not fail"
    assert unanswered, "no question was killed after its reservation"
    assert spent >= sum(received)


def _check_audit(server: Gunicorn) -> None:
    verified = subprocess.run([str(BIN / "flask"), "--app", "wsgi", "audit", "verify"], cwd=ROOT, env=server.env,
                              capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr


# -- a worker that died, and one that comes back after its job was taken over -----------------------


def _claimed_job(app: Flask, client: FlaskClient, research: dict[str, str], *, silent_us: int, lease_us: int) -> str:
    """A job that worker "A" claimed with a lease of `lease_us` from now, and whose last heartbeat was
    `silent_us` ago."""
    app.config["EXPORT_POLL_SECONDS"] = 0
    kick = client.get("/research/fhir/$export?_type=Observation", headers={**research, "Prefer": "respond-async"})
    assert kick.status_code == 202, kick.get_json()
    job_id = kick.headers["Content-Location"].rsplit("/", 1)[1]
    Worker(app, "A").beat()
    with app.app_context(), db.write() as conn:
        conn.execute(update(export_jobs).where(export_jobs.c.job_id == job_id).values(
            state="in-progress", owner="A", lease_until=db.now_us() + lease_us, progress="starting"))
        conn.execute(update(export_workers).where(export_workers.c.worker_id == "A")
                     .values(last_beat=export_workers.c.last_beat - silent_us))
    return job_id


def _status(client: FlaskClient, research: dict[str, str], job_id: str) -> Any:
    return client.get(f"/research/fhir/_export/{job_id}", headers=research)


def test_a_job_whose_worker_fell_silent_is_taken_over_before_its_lease_ends(app, client, world, research,
                                                                            export_worker):
    """A worker killed mid-job beats no more: another takes its job over without waiting out the lease."""
    job_id = _claimed_job(app, client, research, silent_us=16_000_000, lease_us=LEASE_US)
    assert export_worker.work() == 1
    done = _status(client, research, job_id)
    assert done.status_code == 200, done.get_json()
    assert [f["count"] for f in done.get_json()["output"]] == [5]  # the world's record-visible Observations


def test_a_worker_is_gone_three_of_its_own_heartbeat_intervals_after_its_last_beat(app, client, world, research,
                                                                                     export_worker):
    """Worker "A" declared a 1 s heartbeat (its node's PASSERELLE_EXPORT_HEARTBEAT_SECONDS): 3.5 s after its
    last beat a worker whose own interval is 5 s takes its job over."""
    app.config["EXPORT_HEARTBEAT_SECONDS"] = 1.0
    job_id = _claimed_job(app, client, research, silent_us=3_500_000, lease_us=LEASE_US)
    assert export_worker.work() == 1
    assert _status(client, research, job_id).status_code == 200


def test_a_worker_silent_for_less_than_three_of_its_own_intervals_keeps_its_job(app, client, world, research,
                                                                                export_worker):
    """Worker "A" declared a 5 s heartbeat: 3.5 s after its last beat it is alive to every worker, however
    often that worker beats itself."""
    job_id = _claimed_job(app, client, research, silent_us=3_500_000, lease_us=LEASE_US)
    app.config["EXPORT_HEARTBEAT_SECONDS"] = 1.0
    assert Worker(app, "B").work() == 0
    with app.app_context(), db.read() as conn:
        assert conn.execute(select(export_jobs.c.owner).where(export_jobs.c.job_id == job_id)).scalar_one() == "A"


def test_a_worker_whose_job_was_taken_over_can_no_longer_change_it(app, client, world, research, export_worker):
    """A worker too slow to renew its lease loses its job to another; what it does after changes nothing."""
    job_id = _claimed_job(app, client, research, silent_us=0, lease_us=-1)
    assert export_worker.work() == 1
    manifest = _status(client, research, job_id).get_json()
    with app.app_context():  # "A" carries on where it was: it ends its file, then fails on an error
        assert not jobs.add_file(job_id, "A", 0, "Observation", 3, LEASE_US)
        jobs.fail(job_id, "A", "the export failed; ask the data custodian")
    after = _status(client, research, job_id)
    assert after.status_code == 200, after.get_json()
    assert after.get_json() == manifest
    url = manifest["output"][0]["url"].replace("http://localhost", "")
    assert len(client.get(url, headers=research).data.splitlines()) == 5


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_claim_skips_a_job_another_worker_is_claiming_and_takes_the_next(app, client, world, research,
                                                                         export_worker):
    """On PostgreSQL, workers of several nodes claim at once: a claim passes over the job whose row another
    claim holds locked (`FOR UPDATE SKIP LOCKED`) and takes the next queued one, instead of waiting for
    that claim to end and then finding that job taken and none for itself."""
    app.config["EXPORT_POLL_SECONDS"] = 0
    first, second = (client.get("/research/fhir/$export?_type=Observation", headers={
        **research, "Prefer": "respond-async"}).headers["Content-Location"].rsplit("/", 1)[1] for _ in range(2))
    claimed: list[str | None] = []

    def claim() -> None:
        with app.app_context():
            claimed.append(jobs.claim("B", LEASE_US))

    with app.app_context(), db.write() as other:  # another worker, inside its claim of the oldest job
        other.execute(select(export_jobs.c.job_id).where(export_jobs.c.job_id == first).with_for_update())
        claimer = threading.Thread(target=claim)
        claimer.start()
        claimer.join(timeout=10)
        waited = claimer.is_alive()
    claimer.join()
    assert not waited, "the claim waited for the other worker's"
    assert claimed == [second]
