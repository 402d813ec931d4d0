"""The suite's choice of databases: when CI is on, and which PostgreSQL server is used."""
from __future__ import annotations

import pytest

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
