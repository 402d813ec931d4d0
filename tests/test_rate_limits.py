"""Rate limits (service/limits.py): per client on /auth/token (per address for unknown clients) and
on research endpoints, held in the database so that they hold across workers and nodes."""
from __future__ import annotations

import base64
import json
import logging

import pytest
from sqlalchemy import select

from consent import projects
from service import db
from service.app import create_app
from service.auth import register_client
from service.limits import RESEARCH_BUCKET
from service.store.schema import audit, rate_limits
from tests.fhir_helpers import issue
from tests.research_world import bearer


def _client(app, role="custodian", project_id=None) -> dict[str, str]:
    with app.app_context(), db.write() as conn:
        return register_client(conn, role, role, project_id)


def _ask(client, client_id: str, secret: str, **headers: str):
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return client.post("/auth/token", data={"grant_type": "client_credentials"},
                       headers={"Authorization": f"Basic {basic}", **headers})


def _assert_throttled(response) -> None:
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert issue(response)["code"] == "throttled"


@pytest.fixture
def second_app(app):
    """Another node on the same database and key: its own process state, shared tables."""
    other = create_app({key: app.config[key] for key in ("TESTING", "DATABASE_URL", "INSTANCE_DIR",
                                                         "MASTER_KEY_FILE")})
    yield other
    other.extensions["passerelle.engine"].dispose()


def test_token_requests_of_a_client_are_limited_and_other_clients_are_not(app, client):
    app.config["TOKEN_RATE_LIMIT"] = 3
    first, second = _client(app), _client(app)
    for _ in range(3):
        assert _ask(client, first["client_id"], first["client_secret"]).status_code == 200
    _assert_throttled(_ask(client, first["client_id"], first["client_secret"]))
    assert _ask(client, second["client_id"], second["client_secret"]).status_code == 200


def test_a_wrong_secret_counts_against_the_client_it_names(app, client):
    app.config["TOKEN_RATE_LIMIT"] = 2
    registered = _client(app)
    for _ in range(2):
        assert _ask(client, registered["client_id"], "guess").status_code == 401
    _assert_throttled(_ask(client, registered["client_id"], registered["client_secret"]))


def test_unknown_client_ids_are_counted_per_address(app, client):
    app.config["TOKEN_RATE_LIMIT"] = 2
    for n in range(2):
        assert _ask(client, f"made-up-{n}", "x").status_code == 401
    _assert_throttled(_ask(client, "made-up-2", "x"))
    # Behind the trusted proxy (127.0.0.1 by default), another client address has its own count.
    assert _ask(client, "made-up-3", "x", **{"X-Forwarded-For": "203.0.113.9"}).status_code == 401


def test_the_token_limit_holds_across_two_nodes_on_one_database(app, client, second_app):
    app.config["TOKEN_RATE_LIMIT"] = second_app.config["TOKEN_RATE_LIMIT"] = 4
    registered = _client(app)
    other = second_app.test_client()
    for node in (client, other, client, other):
        assert _ask(node, registered["client_id"], registered["client_secret"]).status_code == 200
    _assert_throttled(_ask(other, registered["client_id"], registered["client_secret"]))
    _assert_throttled(_ask(client, registered["client_id"], registered["client_secret"]))


def test_research_requests_are_limited_per_client_across_two_nodes(app, client, second_app):
    app.config["RESEARCH_RATE_LIMIT"] = second_app.config["RESEARCH_RATE_LIMIT"] = 4
    with app.app_context(), db.write() as conn:
        project_id = projects.create(conn, name="p", tier="record", epsilon=1.0).project_id
    first, second = _client(app, "research", project_id), _client(app, "research", project_id)
    headers = bearer(_ask(client, first["client_id"], first["client_secret"]).get_json()["access_token"])
    other = second_app.test_client()
    for node in (client, other, client, other):
        assert node.get("/research/fhir/Patient", headers=headers).status_code == 200
    _assert_throttled(client.get("/research/fhir/Patient", headers=headers))
    _assert_throttled(other.get("/research/fhir/Observation", headers=headers))
    others = bearer(_ask(client, second["client_id"], second["client_secret"]).get_json()["access_token"])
    assert other.get("/research/fhir/Patient", headers=others).status_code == 200


def test_custodian_requests_are_not_counted_as_research(app, client, custodian_headers):
    app.config["RESEARCH_RATE_LIMIT"] = 1
    for _ in range(3):
        assert client.get("/fhir/Patient", headers=custodian_headers).status_code == 200


def _research_client(app, client) -> tuple[dict[str, str], dict[str, str]]:
    """A research client of a new record-tier project, and headers with its token."""
    with app.app_context(), db.write() as conn:
        project_id = projects.create(conn, name="p", tier="record", epsilon=1.0).project_id
    registered = _client(app, "research", project_id)
    token = _ask(client, registered["client_id"], registered["client_secret"]).get_json()["access_token"]
    return registered, bearer(token)


def _research_count(app, client_id: str) -> int:
    with app.app_context(), db.read() as conn:
        return conn.scalar(select(rate_limits.c.count).where(rate_limits.c.bucket == RESEARCH_BUCKET + client_id))


def test_a_research_request_refused_past_the_limit_is_counted_too(app, client):
    app.config["RESEARCH_RATE_LIMIT"] = 2
    registered, headers = _research_client(app, client)
    assert [client.get("/research/fhir/Patient", headers=headers).status_code for _ in range(4)] == [200, 200,
                                                                                                      429, 429]
    assert _research_count(app, registered["client_id"]) == 4


def test_a_research_request_refused_past_the_limit_is_audited_and_logged_as_its_clients(app, client, caplog):
    app.config["RESEARCH_RATE_LIMIT"] = 1
    registered, headers = _research_client(app, client)
    assert client.get("/research/fhir/Patient", headers=headers).status_code == 200
    with caplog.at_level(logging.INFO, logger="passerelle.requests"):
        _assert_throttled(client.get("/research/fhir/Patient", headers=headers))
    assert json.loads(caplog.records[-1].getMessage())["client_id"] == registered["client_id"]
    with app.app_context(), db.read() as conn:
        failed = [json.loads(row.detail) for row in conn.execute(
            select(audit.c.detail).where(audit.c.actor == registered["client_id"], audit.c.action == "search"))]
    assert 429 in [entry.get("outcome") for entry in failed]


def test_a_research_request_refused_for_its_scope_is_counted(app, client):
    registered, _ = _research_client(app, client)
    response = client.post("/auth/token", data={"grant_type": "client_credentials", "scope": "system/Observation.rs"},
                           auth=(registered["client_id"], registered["client_secret"]))
    headers = bearer(response.get_json()["access_token"])
    assert client.get("/research/fhir/Patient", headers=headers).status_code == 403
    assert _research_count(app, registered["client_id"]) == 1
