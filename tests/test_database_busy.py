"""A busy database answers 503 with Retry-After, never a 500, and changes nothing.

SQLite has one writer at a time: while another process (a `consent set`, an `ingest`)
holds the write lock longer than the busy timeout, a write request must say "try
again", as an OperationOutcome, and leave the database as it was.
"""
from __future__ import annotations

import sqlite3

import pytest

from policies.keys import ensure_master_key
from service import db
from service.app import create_app
from service.cli import database
from tests.fhir_helpers import issue, patient


@pytest.fixture
def busy_app(tmp_path):
    path = tmp_path / "busy.db"
    application = create_app({"TESTING": True, "DATABASE_URL": f"sqlite:///{path}", "INSTANCE_DIR": str(tmp_path),
                              "MASTER_KEY_FILE": str(tmp_path / "master.key"), "DB_BUSY_SECONDS": 0.2})
    ensure_master_key(application.config["MASTER_KEY_FILE"])
    db.migrate(application.extensions["passerelle.engine"])
    with application.app_context(), db.write() as conn:
        database.record_settings(conn)  # as `init-db` does
    yield application, path
    application.extensions["passerelle.engine"].dispose()


@pytest.fixture
def headers(busy_app):
    from service.auth import register_client

    application, _ = busy_app
    with application.app_context(), db.write() as conn:
        registered = register_client(conn, "busy custodian", "custodian")
    response = application.test_client().post("/auth/token", data={"grant_type": "client_credentials"},
                                              auth=(registered["client_id"], registered["client_secret"]))
    return {"Authorization": f"Bearer {response.get_json()['access_token']}"}


def test_a_write_blocked_by_another_writer_answers_503_and_stores_nothing(busy_app, headers):
    application, path = busy_app
    client = application.test_client()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        response = client.post("/fhir/Patient", json=patient(), headers=headers)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert issue(response)["code"] == "transient"
    assert client.get("/fhir/Patient?_summary=count", headers=headers).get_json()["total"] == 0
