"""`$aggregate` cannot be used against the service (issue 9 §3).

A tiny ε is refused before anything is spent; ε is reserved and committed before the
computation, which then runs with no write transaction open (tokens keep being issued
meanwhile); every error that depends only on the question is a 400 OperationOutcome
raised before ε is reserved, whatever JSON a client sends.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event

from service import db
from service.auth import register_client
from service.config import load_config
from tests.fhir_helpers import issue
from tests.research_world import bearer, token
from tests.test_aggregate import (
    LOINC,
    SNOMED,
    WEIGHT,
    ask,
    count,
    histogram,
    new_project,
    param,
    post,
    spent,
    weights,
)

# -- a tiny ε ------------------------------------------------------------------------------


@pytest.fixture
def project(app: Flask) -> str:
    return new_project(app, epsilon=100.0, cap=1.0)


@pytest.fixture
def research(app: Flask, client: FlaskClient, project: str) -> dict[str, str]:
    return bearer(token(client, app, "research", project))


def test_an_epsilon_below_the_minimum_is_refused_before_anything_is_spent(app, client, project, research):
    """ε = 1e-300 once made the interval computation loop for ever, holding the budget's write lock."""
    response = post(client, research, count(epsilon=1e-300))
    assert response.status_code == 400
    outcome = issue(response)
    assert outcome["expression"] == ["epsilon"]
    assert "at least 0.001" in outcome["diagnostics"] and "PASSERELLE_MIN_EPSILON" in outcome["diagnostics"]
    assert spent(app, project) == 0.0


def test_the_minimum_epsilon_comes_from_the_configuration(app, client, project, research):
    assert load_config({"PASSERELLE_MIN_EPSILON": "0.05"})["MIN_EPSILON"] == 0.05
    assert load_config({})["MIN_EPSILON"] == 0.001
    app.config["MIN_EPSILON"] = 0.05
    assert post(client, research, count(epsilon=0.04)).status_code == 400
    assert post(client, research, count(epsilon=0.05)).status_code == 200
    assert spent(app, project) == 0.05


# -- ε is committed first, the computation holds no write lock --------------------------------


@contextmanager
def during_computation(app: Flask, action: Callable[[], Any]) -> Iterator[list[Any]]:
    """Run `action` in another thread at the first consent-filtered statement of this thread
    (the computation), waiting at most 10 s for it; yields the list its result lands in."""
    engine = app.extensions["passerelle.engine"]
    request_thread, outcome = threading.get_ident(), []

    def pause(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if threading.get_ident() == request_thread and "decision_classes" in statement and not outcome:
            outcome.append("computing")
            worker = threading.Thread(target=lambda: outcome.append(action()), daemon=True)
            worker.start()
            worker.join(10)

    event.listen(engine, "before_cursor_execute", pause)
    try:
        yield outcome
    finally:
        event.remove(engine, "before_cursor_execute", pause)


def test_the_spend_is_committed_before_the_computation_starts(app, client, project, research):
    with during_computation(app, lambda: spent(app, project)) as outcome:
        assert post(client, research, count(epsilon=0.5)).status_code == 200
    assert outcome == ["computing", 0.5]  # another connection already saw the reservation


def test_a_token_is_issued_while_an_aggregate_is_computing(app, client, project, research):
    with app.app_context(), db.write() as conn:
        other = register_client(conn, "another partner", "research", project)

    def issue_token() -> int:
        return app.test_client().post("/auth/token", data={"grant_type": "client_credentials"},
                                      auth=(other["client_id"], other["client_secret"])).status_code

    with during_computation(app, issue_token) as outcome:
        assert post(client, research, count(epsilon=0.5)).status_code == 200
    assert outcome == ["computing", 200]  # the token's write did not wait for the aggregate


# -- errors that depend only on the question are free ------------------------------------------

CONDITION = f"Condition?code={SNOMED}|38341003"
QUESTION_ONLY: dict[str, tuple[dict[str, Any], str]] = {
    "value sent as a string, not parts": (
        ask(param("measure", "sum"), param("value", f"Observation?code={LOINC}|{WEIGHT}")), "value"),
    "age-band edges above any human age": (
        histogram(param("by", "age-band"), param("edges", "0,18,100000")), "groupBy.edges"),
    "years beyond 9999": (
        histogram(param("by", "year"), param("from", 9990), param("to", 10001), param("expression", "Condition")),
        "groupBy.to"),
    "a cohort ending with &": (count(f"{CONDITION}&"), "cohort"),
    "an empty pair in a cohort": (count(f"Condition?&code={SNOMED}|38341003"), "cohort"),
    "groupBy code on a type without codes": (
        histogram(param("by", "code"), param("codes", f"{SNOMED}|38341003"), param("expression", "Patient")),
        "groupBy.expression"),
    "groupBy code on a directory type": (
        histogram(param("by", "code"), param("codes", f"{SNOMED}|38341003"), param("expression", "Organization")),
        "groupBy.expression"),
    "a cohort over a directory type": (count("Organization?name=clinic"), "cohort"),
    "a part that is not a parameter": (
        ask(param("measure", "histogram"), {"name": "groupBy", "part": ["gender"]}), "groupBy"),
    "an unknown part": (ask(param("measure", "sum"), param("value", expression=f"Observation?code={LOINC}|{WEIGHT}",
                                                           lower=0.0, upper=200.0, clip=True)), "value.clip"),
    "q for a measure without quantiles": (ask(param("measure", "count"), param("q", 0.5)), "q"),
    "a result parameter in a cohort": (count(f"{CONDITION}&_count=5"), "cohort"),
    "more bins than allowed": (
        histogram(param("by", "code"), param("codes", ",".join(f"{SNOMED}|{n}" for n in range(201))),
                  param("expression", "Condition")), "groupBy"),
    "an age-band date before 1800": (
        histogram(param("by", "age-band"), param("edges", "0,18,40"), param("at", "0001-01-01")), "groupBy.at"),
}


@pytest.mark.parametrize("case", list(QUESTION_ONLY))
def test_a_question_only_error_is_a_400_before_epsilon_is_reserved(app, client, project, research, case):
    body, expression = QUESTION_ONLY[case]
    response = post(client, research, body)
    assert response.status_code == 400, response.get_json()
    assert issue(response)["expression"] == [expression]
    assert spent(app, project) == 0.0


# -- fuzz: wrong JSON in every parameter --------------------------------------------------------

VALID = {
    "count": count(CONDITION),
    "sum": weights("sum", "count", 0, 5, param("cohort", CONDITION)),
    "quantile": weights("quantile", "latest", 0, 200, param("q", 0.5)),
    "age-band": histogram(param("by", "age-band"), param("edges", "0,18,65"), param("at", "2025-01-01")),
    "year": histogram(param("by", "year"), param("from", 2018), param("to", 2020),
                      param("expression", f"Observation?code={LOINC}|{WEIGHT}")),
    "code": histogram(param("by", "code"), param("codes", f"{SNOMED}|38341003"), param("expression", "Condition")),
}
JUNK = (None, True, -1, 1.5, 1e308, "", "0,x", [1], {"name": "x"})


def mutations(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every parameter and part with its value replaced by each kind of junk, turned into
    parts, or stripped of its value; and the list of parts replaced by junk."""
    def slots(items: list[dict[str, Any]], path: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        for i, item in enumerate(items):
            yield (*path, i)
            yield from slots(item.get("part", []), (*path, i))

    for path in slots(body["parameter"], ()):
        for junk in (*JUNK, "parts", "no value"):
            mutated = copy.deepcopy(body)
            item: dict[str, Any] = {"part": mutated["parameter"]}
            for i in path:
                item = item["part"][i]
            if "part" in item:
                item["part"] = junk
            else:
                key = next(k for k in item if k.startswith("value"))
                del item[key]
                if junk == "parts":
                    item["part"] = [{"name": "x", "valueString": "y"}]
                elif junk != "no value":
                    item[key] = junk
            yield mutated


@pytest.mark.parametrize("name", list(VALID))
def test_no_junk_in_any_parameter_is_a_server_error_or_spends_on_a_refusal(app, client, project, research, name):
    assert post(client, research, VALID[name]).status_code == 200
    for mutated in mutations(VALID[name]):
        before = spent(app, project)
        response = post(client, research, mutated)
        assert response.status_code in (200, 400, 403), (mutated, response.get_json())
        if response.status_code != 200:
            assert issue(response)["severity"] == "error"
            assert spent(app, project) == before, mutated
