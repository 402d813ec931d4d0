"""The suite's choice of databases: when CI is on, which PostgreSQL server is used, and the engine an app
built for a test is given."""
from __future__ import annotations

import pytest

from service import db
from service.app import create_app
from tests.backends import DEFAULT_POSTGRES_URL, in_ci, postgres_problem, postgres_url


@pytest.mark.parametrize("value", ["1", "yes", "true", "on", "TRUE", "Yes", " true "])
def test_any_true_value_of_ci_means_ci(value: str) -> None:
    assert in_ci({"CI": value})


@pytest.mark.parametrize("value", ["", "0", "no", "false", "off", "False"])
def test_ci_is_off_when_unset_or_false(value: str) -> None:
    assert not in_ci({"CI": value})
    assert not in_ci({})


def test_the_local_postgres_server_is_used_when_no_url_is_given() -> None:
    assert postgres_url({}) == DEFAULT_POSTGRES_URL


def test_a_given_url_names_the_postgres_server() -> None:
    url = "postgresql://ci@db.example:5433/suite"
    assert postgres_url({"PASSERELLE_TEST_DATABASE_URL": url}) == url


def test_an_empty_url_switches_postgres_off() -> None:
    assert postgres_problem(postgres_url({"PASSERELLE_TEST_DATABASE_URL": ""})) == \
        "PASSERELLE_TEST_DATABASE_URL is empty"


def test_a_server_that_does_not_answer_is_explained_in_one_line() -> None:
    problem = postgres_problem("postgresql://postgres@127.0.0.1:1/test")
    assert problem is not None
    assert problem.startswith("PostgreSQL at postgresql://postgres@127.0.0.1:1/test does not answer (")
    assert "\n" not in problem


def test_an_app_given_an_engine_uses_it_and_makes_none(tmp_path) -> None:
    given = db.make_engine(f"sqlite:///{tmp_path / 'passerelle.db'}")
    made = create_app({"TESTING": True, "DATABASE_URL": given.url.render_as_string(), "INSTANCE_DIR": str(tmp_path),
                       "MASTER_KEY_FILE": str(tmp_path / "master.key")})
    shared = create_app({"TESTING": True, "DATABASE_URL": given.url.render_as_string(),
                         "INSTANCE_DIR": str(tmp_path), "MASTER_KEY_FILE": str(tmp_path / "master.key")},
                        engine=given)
    assert shared.extensions["passerelle.engine"] is given
    assert made.extensions["passerelle.engine"] is not given
    made.extensions["passerelle.engine"].dispose()
    given.dispose()
