"""Recorded `$aggregate` answers go stale only when data the question reads changes (issue 9 §3).

A recorded answer is replayed for free while its data version holds. That version used
to change with any write anywhere, so a partner watching `remaining` saw the custodian's
activity (an Organization written, another project's consent). Now it covers only the
resource types the question reads (Patient always) and the project's own decisions.
"""
from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.fhir_helpers import create, observation
from tests.research_world import bearer, token
from tests.test_aggregate import (
    HYPERTENSION,
    LOINC,
    SNOMED,
    WEIGHT,
    cli,
    consent,
    count,
    new_project,
    person,
    post,
    results,
    spent,
    top,
)

CONDITION = f"Condition?code={SNOMED}|{HYPERTENSION}"
WEIGHED = f"Observation?code={LOINC}|{WEIGHT}"


@pytest.fixture
def projects(app: Flask) -> tuple[str, str]:
    return new_project(app), new_project(app)


@pytest.fixture
def people(app: Flask, client: FlaskClient, custodian_headers: dict[str, str], projects: tuple[str, str]
           ) -> list[str]:
    """Three patients with a weight and hypertension, consenting to both projects."""
    made = [person(client, custodian_headers, "female", "1960-01-01", (70.0,), (HYPERTENSION,)) for _ in range(3)]
    for patient_id in made:
        for project_id in projects:
            consent(app, patient_id, project_id, "aggregate")
    return made


@pytest.fixture
def research(app: Flask, client: FlaskClient, projects: tuple[str, str]) -> dict[str, str]:
    return bearer(token(client, app, "research", projects[0]))


def asked_twice(client: FlaskClient, research: dict[str, str], body: dict[str, Any], between: Any) -> tuple[Any, Any]:
    first = post(client, research, body)
    between()
    second = post(client, research, body)
    assert first.status_code == second.status_code == 200
    return first.get_json(), second.get_json()


def test_an_organization_written_does_not_make_an_answer_stale(app, client, custodian_headers, projects, people,
                                                                research):
    first, second = asked_twice(client, research, count(CONDITION), lambda: create(
        client, custodian_headers, {"resourceType": "Organization", "name": "Another clinic"}))
    assert results(second) == results(first)
    assert top(second, "remaining") == top(first, "remaining") == 9.5
    assert spent(app, projects[0]) == 0.5


def test_a_write_of_a_type_the_question_does_not_read_leaves_its_answer_recorded(
        app, client, custodian_headers, projects, people, research):
    first, second = asked_twice(client, research, count(CONDITION), lambda: create(
        client, custodian_headers, observation(people[0], code=WEIGHT, value=71.0, unit="kg")))
    assert results(second) == results(first)
    assert spent(app, projects[0]) == 0.5


def test_an_observation_written_makes_a_question_about_observations_stale(
        app, client, custodian_headers, projects, people, research):
    asked_twice(client, research, count(WEIGHED), lambda: create(
        client, custodian_headers, observation(people[0], code=WEIGHT, value=71.0, unit="kg")))
    assert spent(app, projects[0]) == 1.0


def test_a_patient_written_makes_every_question_stale(app, client, custodian_headers, projects, people, research):
    asked_twice(client, research, count(CONDITION),
                lambda: person(client, custodian_headers, "male", "1970-01-01"))
    assert spent(app, projects[0]) == 1.0


def test_a_consent_changed_for_another_project_does_not_make_an_answer_stale(app, client, projects, people,
                                                                              research):
    first, second = asked_twice(client, research, count(CONDITION), lambda: cli(
        app, "consent", "set", "--patient", people[0], "--project", projects[1], "--tier", "none"))
    assert results(second) == results(first)
    assert spent(app, projects[0]) == 0.5


def test_a_consent_changed_for_this_project_makes_the_answer_stale(app, client, projects, people, research):
    asked_twice(client, research, count(CONDITION), lambda: cli(
        app, "consent", "set", "--patient", people[0], "--project", projects[0], "--tier", "none"))
    assert spent(app, projects[0]) == 1.0


def test_a_refresh_that_changes_no_decision_leaves_answers_recorded(app, client, projects, people, research):
    def refresh() -> None:
        assert app.test_cli_runner().invoke(args=["consent", "refresh"]).exit_code == 0

    asked_twice(client, research, count(CONDITION), refresh)
    assert spent(app, projects[0]) == 0.5
