"""`GET /healthz`: what a load balancer asks before sending a node traffic."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from service.app import create_app

#: Nothing listens on port 1, so connecting is refused at once.
UNREACHABLE_DATABASE = "postgresql://postgres@127.0.0.1:1/none"


@pytest.fixture
def app_without_database(tmp_path: Path) -> Iterator[Flask]:
    """The real application configured with a database server that does not answer."""
    application = create_app({
        "TESTING": True,
        "DATABASE_URL": UNREACHABLE_DATABASE,
        "INSTANCE_DIR": str(tmp_path),
        "MASTER_KEY_FILE": str(tmp_path / "master.key"),
    })
    yield application
    application.extensions["passerelle.engine"].dispose()


def test_healthz_is_200_without_a_token_when_the_database_answers(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"


def test_healthz_is_503_when_the_database_is_unreachable(app_without_database: Flask):
    response = app_without_database.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["status"] == "unavailable"


def test_healthz_does_not_reveal_the_database_address_when_it_fails(app_without_database: Flask):
    body = app_without_database.test_client().get("/healthz").get_data(as_text=True)
    assert "127.0.0.1" not in body
    assert "postgres" not in body
