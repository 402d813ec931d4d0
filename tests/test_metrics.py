"""`GET /metrics` (service/metrics.py): Prometheus text that parses, counts that move with the work,
no label a patient could be found by, access only from the node's own host or with the metrics token,
and, under gunicorn, the counts of every worker summed.

Event counters are per process and the test process builds many apps: each test compares a scrape
before and after what it does. The test client's peer is 127.0.0.1 and it sends no forwarding header:
a direct connection from loopback unless a test says otherwise.
"""
from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from benchmarks.harness import Gunicorn
from consent import writer
from service import db, metrics
from service.app import create_app
from service.store import jobs
from service.store.schema import audit, audit_head, budget_spends, export_workers, projects, settings
from tests.fhir_helpers import create, observation, patient, post_entry, transaction, write_corpus
from tests.research_world import World

#: As nginx relays a request: the peer is the proxy on loopback, the client named in X-Forwarded-For.
RELAYED = {"X-Forwarded-For": "203.0.113.7"}
READS = "/fhir/<resource_type>/<resource_id>"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: FlaskClient, **kwargs: Any) -> Samples:
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)
    return parse(response.get_data(as_text=True))


def parse(text: str) -> Samples:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def _token(app: Flask) -> str:
    result = app.test_cli_runner().invoke(args=["metrics", "token"])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


# -- the format and what is counted --------------------------------------------------------------


def test_the_answer_is_prometheus_text_naming_every_metric(client: FlaskClient):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.headers["Cache-Control"] == "no-store"
    names = {family.name for family in text_string_to_metric_families(response.get_data(as_text=True))}
    assert names >= {"passerelle_http_requests", "passerelle_http_request_duration_seconds",
                     "passerelle_resources_written", "passerelle_consent_changes",
                     "passerelle_db_pool_connections_in_use", "passerelle_db_pool_size", "passerelle_export_jobs",
                     "passerelle_budget_epsilon_spent", "passerelle_budget_epsilon_total", "passerelle_audit_entries"}


def test_a_request_counts_under_its_route_template_method_and_status(client, custodian_headers):
    before = scrape(client)
    for _ in range(3):
        assert client.get("/fhir/Patient/no-such-patient", headers=custodian_headers).status_code == 404
    after = scrape(client)
    assert moved(before, after, "passerelle_http_requests_total", route=READS, method="GET", status="404") == 3
    assert moved(before, after, "passerelle_http_request_duration_seconds_count", route=READS, method="GET") == 3
    assert moved(before, after, "passerelle_http_request_duration_seconds_sum", route=READS, method="GET") > 0


def test_a_request_no_route_matched_counts_under_one_fixed_label_and_an_invented_method_as_other(client):
    before = scrape(client)
    client.get("/no/such/Patient-123?name=Dupont")
    client.open("/fhir/metadata", method="BREW")
    after = scrape(client)
    assert moved(before, after, "passerelle_http_requests_total", route=metrics.UNMATCHED, method="GET",
                 status="404") == 1
    assert moved(before, after, "passerelle_http_requests_total", route=metrics.UNMATCHED, method="other",
                 status="405") == 1


def test_resources_written_through_the_api_count_when_committed(client, custodian_headers):
    someone = create(client, custodian_headers, patient())["id"]
    before = scrape(client)
    bundle = transaction(*(post_entry(observation(someone, value=float(v))) for v in (1, 2, 3)))
    assert client.post("/fhir", json=bundle, headers=custodian_headers).status_code == 200
    refused = transaction(post_entry(observation(someone)), post_entry(observation("no-such-patient")))
    assert client.post("/fhir", json=refused, headers=custodian_headers).status_code >= 400
    after = scrape(client)
    assert moved(before, after, "passerelle_resources_written_total", path="api") == 3
    assert moved(before, after, "passerelle_resources_written_total", path="cli") == 0


def test_resources_ingested_by_the_cli_count_under_cli(app, client, tmp_path):
    ndjson = tmp_path / "patients.ndjson"
    ndjson.write_bytes(b"\n".join(orjson.dumps({**patient(given=f"P{n}"), "id": f"cli-{n}"}) for n in range(4)))
    before = scrape(client)
    result = app.test_cli_runner().invoke(args=["ingest", str(ndjson)])
    assert result.exit_code == 0, result.output
    after = scrape(client)
    assert moved(before, after, "passerelle_resources_written_total", path="cli") == 4
    assert moved(before, after, "passerelle_resources_written_total", path="api") == 0


def test_a_write_whose_savepoint_is_rolled_back_counts_nothing(app, client):
    """As a batch entry that fails: only what its transaction commits is counted."""
    from service.store import repository

    before = scrape(client)
    with app.app_context(), db.write() as conn:
        with pytest.raises(RuntimeError), conn.begin_nested():
            repository.create(conn, "Patient", patient(given="Undone"))
            raise RuntimeError("the entry fails after its write")
        repository.create(conn, "Patient", patient(given="Kept"))
    with pytest.raises(RuntimeError), app.app_context(), db.write() as conn:
        repository.create(conn, "Patient", patient(given="Rolled back"))
        raise RuntimeError("the transaction fails")
    after = scrape(client)
    assert moved(before, after, "passerelle_resources_written_total", path="cli") == 1


def test_consent_changes_count_whichever_way_a_consent_is_written(app, client, custodian_headers, world: World):
    someone = world.patients["consented"]
    before = scrape(client)
    result = app.test_cli_runner().invoke(args=["consent", "set", "--patient", someone, "--project",
                                                world.other_project, "--tier", "aggregate"])
    assert result.exit_code == 0, result.output
    built = writer.build(someone, world.aggregate_project, "record", [], source="test", method="paper")
    create(client, custodian_headers, built)
    create(client, custodian_headers, observation(someone))
    after = scrape(client)
    assert moved(before, after, "passerelle_consent_changes_total", path="cli") == 1
    assert moved(before, after, "passerelle_consent_changes_total", path="api") == 1


def test_the_audit_chain_length_is_the_audit_head(app, client, custodian_headers):
    someone = create(client, custodian_headers, patient())["id"]
    client.get(f"/fhir/Patient/{someone}", headers=custodian_headers)
    with app.app_context(), db.read() as conn:
        head = conn.scalar(select(audit_head.c.seq))
    assert head > 0
    assert value(scrape(client), "passerelle_audit_entries") == head


def test_epsilon_spent_per_project_is_the_ledger_after_an_aggregate(app, client, world: World, research):
    question = {"resourceType": "Parameters", "parameter": [{"name": "measure", "valueString": "count"},
                                                           {"name": "epsilon", "valueDecimal": 0.25}]}
    assert client.post("/research/fhir/$aggregate", json=question, headers=research).status_code == 200
    with app.app_context(), db.read() as conn:
        ledger = conn.scalar(select(func.sum(budget_spends.c.epsilon_micro)).where(
            budget_spends.c.project_id == world.project, budget_spends.c.kind == "query")) / 1_000_000
        allotted = conn.scalar(select(projects.c.epsilon).where(projects.c.project_id == world.project))
    samples = scrape(client)
    assert ledger == pytest.approx(0.25)
    assert value(samples, "passerelle_budget_epsilon_spent", project=world.project) == pytest.approx(ledger)
    assert value(samples, "passerelle_budget_epsilon_total", project=world.project) == pytest.approx(allotted)
    assert value(samples, "passerelle_budget_epsilon_spent", project=world.other_project) == 0


def test_export_jobs_by_state_follow_a_kick_off_and_its_completion(client, research, export_worker):
    before = scrape(client)
    assert {state for (name, labels) in before if name == "passerelle_export_jobs" for _, state in labels} \
        == set(jobs.STATES)
    kick = client.get("/research/fhir/$export", headers={**research, "Prefer": "respond-async"})
    assert kick.status_code == 202, kick.get_json()
    queued = scrape(client)
    assert moved(before, queued, "passerelle_export_jobs", state="accepted") == 1
    export_worker.work()
    done = scrape(client)
    assert moved(before, done, "passerelle_export_jobs", state="accepted") == 0
    assert moved(before, done, "passerelle_export_jobs", state="completed") == 1


def test_the_pool_gauge_counts_a_connection_held_open(app, client):
    before = scrape(client)
    with app.extensions["passerelle.engine"].connect():
        during = scrape(client)
    after = scrape(client)
    assert moved(before, during, "passerelle_db_pool_connections_in_use") == 1
    assert moved(before, after, "passerelle_db_pool_connections_in_use") == 0
    assert value(during, "passerelle_db_pool_size") == app.extensions["passerelle.engine"].pool.size()


# -- no PHI in any label ---------------------------------------------------------------------------


def test_no_label_carries_a_name_phone_identifier_birth_date_resource_id_or_query_value(app, client,
                                                                                         custodian_headers):
    people, secrets = write_corpus(client, custodian_headers, 4, 11)
    for person in people:
        client.get(f"/fhir/Patient/{person['id']}", headers=custodian_headers)
        client.get(f"/fhir/Observation?subject=Patient/{person['id']}", headers=custodian_headers)
        client.get(f"/no-such-route/{person['id']}")
        for name in person.get("name", ()):
            client.get(f"/fhir/Patient?family={name['family']}", headers=custodian_headers)
        for identifier in person.get("identifier", ()):
            client.get(f"/fhir/Patient?identifier={identifier['value']}", headers=custodian_headers)
    assert len(secrets) > 4 * 4

    response = client.get("/metrics")
    text = response.get_data(as_text=True)
    assert not [secret for secret in secrets if secret in text]
    with app.app_context(), db.read() as conn:
        project_ids = set(conn.scalars(select(projects.c.project_id)))
    allowed = {
        "route": {rule.rule for rule in app.url_map.iter_rules()} | {metrics.UNMATCHED},
        "method": set(metrics.METHODS) | {"other"},
        "path": {"api", "cli"},
        "state": set(jobs.STATES),
        "project": project_ids,
    }
    for (_name, labels) in parse(text):
        for label, label_value in labels:
            if label == "status":
                assert label_value.isdigit() and len(label_value) == 3
            elif label != "le":
                assert label_value in allowed[label], (label, label_value)


# -- access ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("peer", "headers", "direct"), [
    ("127.0.0.1", {}, True),
    ("::1", {}, True),
    ("127.0.0.1", {"X-Forwarded-For": "203.0.113.7"}, False),  # relayed by a proxy on this host
    ("127.0.0.1", {"X-Forwarded-For": "127.0.0.1"}, False),  # a client of the proxy's host, relayed
    ("127.0.0.1", {"X-Forwarded-Proto": "https"}, False),
    ("127.0.0.1", {"Forwarded": "for=203.0.113.7"}, False),  # a header no proxy is trusted with
    ("10.0.0.2", {}, False),
    ("", {}, False),  # a Unix socket
    (None, {}, False),
])
def test_a_direct_connection_from_loopback_is_one_with_a_loopback_peer_and_no_forwarding_header(
        client, peer, headers, direct):
    response = client.get("/metrics", environ_base={"REMOTE_ADDR": peer}, headers=headers)
    assert response.status_code == (200 if direct else 401)


def test_a_request_relayed_by_a_proxy_without_the_token_is_refused(client: FlaskClient):
    response = client.get("/metrics", headers=RELAYED)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "metrics token" in response.get_json()["issue"][0]["diagnostics"]
    assert "passerelle_" not in response.get_data(as_text=True)


def test_a_request_from_another_host_without_the_token_is_refused(client: FlaskClient):
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "192.0.2.10"}).status_code == 401


def test_a_wrong_token_or_an_api_token_is_refused(app, client, custodian_token):
    _token(app)
    for wrong in ("not-the-token", custodian_token):
        response = client.get("/metrics", headers={**RELAYED, "Authorization": f"Bearer {wrong}"})
        assert response.status_code == 401


def test_the_metrics_token_is_accepted_through_the_proxy(app, client):
    token = _token(app)
    scrape(client, headers={**RELAYED, "Authorization": f"Bearer {token}"})
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "192.0.2.10"},
                      headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_only_a_keyed_hash_of_the_token_is_stored(app):
    token = _token(app)
    with app.app_context(), db.read() as conn:
        stored = conn.execute(select(settings.c.value).where(settings.c.name == metrics.TOKEN_SETTING)).scalars().all()
    assert len(stored) == 1 and token not in stored[0]
    assert stored[0] != hashlib.sha256(token.encode()).hexdigest()


def test_a_new_token_replaces_the_previous_one(app, client):
    first, second = _token(app), _token(app)
    assert client.get("/metrics", headers={**RELAYED, "Authorization": f"Bearer {first}"}).status_code == 401
    scrape(client, headers={**RELAYED, "Authorization": f"Bearer {second}"})


def test_a_revoked_token_is_refused_and_loopback_still_answered(app, client):
    token = _token(app)
    result = app.test_cli_runner().invoke(args=["metrics", "revoke"])
    assert result.exit_code == 0, result.output
    assert client.get("/metrics", headers={**RELAYED, "Authorization": f"Bearer {token}"}).status_code == 401
    scrape(client)
    again = app.test_cli_runner().invoke(args=["metrics", "revoke"])
    assert again.exit_code == 1 and "no metrics token" in again.output


def test_a_token_made_on_one_node_opens_the_metrics_of_another_on_the_same_database(app, client, tmp_path):
    other = create_app({"TESTING": True, "DATABASE_URL": app.config["DATABASE_URL"], "INSTANCE_DIR": str(tmp_path),
                        "MASTER_KEY_FILE": app.config["MASTER_KEY_FILE"]})
    try:
        token = _token(app)
        response = other.test_client().get("/metrics", headers={**RELAYED, "Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        parse(response.get_data(as_text=True))
    finally:
        other.extensions["passerelle.engine"].dispose()


def test_making_and_revoking_the_token_are_audited(app):
    _token(app)
    app.test_cli_runner().invoke(args=["metrics", "revoke"])
    with app.app_context(), db.read() as conn:
        actions = conn.scalars(select(audit.c.action).order_by(audit.c.seq)).all()
    assert actions[-2:] == ["metrics-token", "metrics-token-revoke"]


# -- under gunicorn: every worker counts, a scrape sums them ---------------------------------------


WORKERS = 2
ROUTE = "/.well-known/smart-configuration"


def _beaten(app: Flask) -> set[int]:
    """The pids of the worker processes whose export thread has beaten (service/export.py's worker ids)."""
    with app.app_context(), db.read() as conn:
        return {int(worker_id.split("-")[-2]) for worker_id in conn.scalars(select(export_workers.c.worker_id))}


@pytest.fixture
def gunicorn(app: Flask, tmp_path: Path) -> Iterator[tuple[Gunicorn, str, Path]]:
    """The shipped `gunicorn -c deploy/gunicorn.conf.py wsgi:app`, 2 workers, on a free loopback port, its
    metrics directory holding a stale file of an earlier run."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"left by an earlier run")
    env = {**os.environ, "PASSERELLE_DATABASE_URL": app.config["DATABASE_URL"],
           "PASSERELLE_MASTER_KEY_FILE": app.config["MASTER_KEY_FILE"], "PASSERELLE_INSTANCE_DIR": str(tmp_path),
           "PASSERELLE_THREADS": "2", "PASSERELLE_EXPORT_WORKER": "thread", "PASSERELLE_LOG_LEVEL": "warning",
           "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    log = tmp_path / "gunicorn.log"
    with Gunicorn(env, log, workers=WORKERS) as server:
        yield server, f"http://127.0.0.1:{server.port}", log


def _until(check: Any, what: str, log: Path, seconds: float = 60.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        try:
            found = check()
        except (requests.ConnectionError, requests.Timeout):  # no worker has started serving yet
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: {log.read_text(errors='replace')[-3000:]}"
        time.sleep(0.2)


# Summing the workers' files does not depend on the database (the gauges read from it are tested above on both).
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_under_gunicorn_a_scrape_sums_every_workers_counts(app, gunicorn):
    server, base, log = gunicorn
    per_worker = app.extensions["passerelle.engine"].pool.size()

    def samples() -> Samples:
        response = requests.get(f"{base}/metrics", timeout=10)
        assert response.status_code == 200, response.text
        return parse(response.text)

    def pools_of(count: int) -> bool:
        return value(samples(), "passerelle_db_pool_size") == count * per_worker

    # Each worker's export thread uses its pool at once: the node's pool is every live worker's.
    _until(lambda: pools_of(WORKERS), "both workers' pools", log)
    assert not (log.parent / "metrics" / "counter_999999.db").exists()
    sent = 40
    for _ in range(sent):  # a connection each: gunicorn's workers take them as they come
        assert requests.get(f"{base}{ROUTE}", timeout=10).status_code == 200
    counted = value(samples(), "passerelle_http_requests_total", route=ROUTE, method="GET", status="200")
    assert counted == sent

    workers = set(server.worker_pids())
    assert len(workers) == WORKERS
    os.kill(min(workers), signal.SIGKILL)
    # The killed worker's counts stay; its live gauge goes with it (child_exit), its replacement's comes
    # once the replacement's export thread has used its pool (its heartbeat is then in the database).
    _until(lambda: _beaten(app) - workers, "the replacement worker's heartbeat", log)
    after = samples()
    assert value(after, "passerelle_db_pool_size") == WORKERS * per_worker
    assert value(after, "passerelle_http_requests_total", route=ROUTE, method="GET", status="200") == sent


def test_apps_sharing_an_engine_count_its_connections_and_writes_once(app, client, custodian_headers):
    other = create_app({"TESTING": True, "DATABASE_URL": app.config["DATABASE_URL"],
                        "INSTANCE_DIR": app.config["INSTANCE_DIR"], "MASTER_KEY_FILE": app.config["MASTER_KEY_FILE"]},
                       engine=app.extensions["passerelle.engine"])
    before = scrape(client)
    with other.extensions["passerelle.engine"].connect():
        during = scrape(client)
    create(client, custodian_headers, patient())
    after = scrape(client)
    assert moved(before, during, "passerelle_db_pool_connections_in_use") == 1
    assert moved(before, after, "passerelle_resources_written_total", path="api") == 1
