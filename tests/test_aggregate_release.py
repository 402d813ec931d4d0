"""What an `$aggregate` answer costs and what the audit trail says of it (issue 9 §1, §4).

Every computed answer is audited through the gate with the consenting cohort members it
was computed on, the question and ε; ε stays spent when the computation fails; ε is part
of the question, so the same question at another ε is a new release.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from flask import Flask
from sqlalchemy import select

from consent import engine
from service import aggregate, db
from service.audit import patients_named
from service.release import release_for
from service.store.schema import audit
from tests.research_world import bearer, token
from tests.test_aggregate import (
    HYPERTENSION,
    SNOMED,
    consent,
    count,
    new_project,
    person,
    post,
    spent,
    top,
)

CONDITION = f"Condition?code={SNOMED}|{HYPERTENSION}"


def aggregate_entries(app: Flask) -> list[tuple[dict[str, Any], set[str]]]:
    """Each `aggregate` audit entry's detail and patients, oldest first."""
    with app.app_context(), db.read() as conn:
        entries = conn.execute(select(audit.c.seq, audit.c.detail).where(audit.c.action == "aggregate")
                               .order_by(audit.c.seq)).all()
        named = patients_named(conn, [e.seq for e in entries])
        return [(json.loads(e.detail), set(named[e.seq])) for e in entries]


@pytest.fixture
def project(app: Flask) -> str:
    return new_project(app)


@pytest.fixture
def research(app, client, project) -> dict[str, str]:
    return bearer(token(client, app, "research", project))


def test_an_answer_is_audited_with_the_consenting_cohort_the_question_and_epsilon(
        app, client, custodian_headers, project, research):
    ill = [person(client, custodian_headers, "female", "1960-01-01", codes=(HYPERTENSION,)) for _ in range(3)]
    well = person(client, custodian_headers, "male", "1960-01-01")
    for patient_id in (*ill[:2], well):
        consent(app, patient_id, project, "aggregate")
    consent(app, ill[2], project, "none")
    assert post(client, research, count(CONDITION, epsilon=0.25)).status_code == 200
    ((detail, patients),) = aggregate_entries(app)
    assert patients == set(ill[:2])  # neither the refusing patient nor the one outside the cohort
    assert detail["epsilon"] == 0.25
    assert detail["query"]["measure"] == "count" and detail["query"]["cohort"] == [CONDITION]


def test_a_replayed_answer_is_audited_as_a_replay_that_spent_nothing(app, client, project, research):
    post(client, research, count())
    post(client, research, count())
    (first, _), (replay, patients) = aggregate_entries(app)
    assert (replay["replayed"], replay["epsilon"], patients) == (True, 0.0, set())
    assert replay["query_hash"] == first["query_hash"]


class FailingRandomness(np.random.RandomState):
    """A source of randomness that fails when noise is drawn, after the exact aggregate is computed."""

    def random(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no randomness left")

    random_sample = random


def test_epsilon_stays_spent_when_the_computation_fails(app, project):
    with app.test_request_context():
        release = release_for("partner", project, engine.AGGREGATE)
        with pytest.raises(RuntimeError, match="no randomness left"):
            aggregate.answer(release, count(epsilon=0.5), None, random_state=FailingRandomness(0))
    assert spent(app, project) == 0.5  # a failure may depend on the data: it is never free
    assert aggregate_entries(app) == []  # and nothing was released


def test_the_same_question_at_another_epsilon_is_a_new_release(app, client, project, research):
    first = post(client, research, count(epsilon=0.5)).get_json()
    second = post(client, research, count(epsilon=0.25)).get_json()
    assert (top(first, "epsilon"), top(second, "epsilon")) == (0.5, 0.25)
    assert spent(app, project) == 0.75
    assert top(second, "remaining") == 9.25


@contextmanager
def _refusing_inserts(app: Flask, table: str) -> Iterator[None]:
    """While open, the database itself refuses every new row of `table` (as a full disk or a lost
    connection would); PostgreSQL's schema is shared by the process's tests, so it is undone after."""
    with app.app_context(), db.write() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} "
                                 "BEGIN SELECT RAISE(ABORT, 'refused'); END")
        else:
            conn.exec_driver_sql(f"CREATE FUNCTION refuse_{table}() RETURNS trigger AS "
                                 "$$ BEGIN RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql")
            conn.exec_driver_sql(f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} "
                                 f"FOR EACH ROW EXECUTE FUNCTION refuse_{table}()")
    try:
        yield
    finally:
        with app.app_context(), db.write() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql(f"DROP TRIGGER refuse_{table}")
            else:
                conn.exec_driver_sql(f"DROP TRIGGER refuse_{table} ON {table}")
                conn.exec_driver_sql(f"DROP FUNCTION refuse_{table}()")


def test_an_answer_that_cannot_be_recorded_is_neither_released_nor_audited(app, project):
    with _refusing_inserts(app, "answers"), app.test_request_context():
        release = release_for("partner", project, engine.AGGREGATE)
        with pytest.raises(Exception, match="refused"):
            aggregate.answer(release, count(epsilon=0.5), None)
    assert spent(app, project) == 0.5
    assert aggregate_entries(app) == []  # the audit names only what was released
