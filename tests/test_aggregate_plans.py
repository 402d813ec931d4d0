"""How `$aggregate` reads its rows (issue 11): the resources an expression's index finds are
read by their key, whatever the planner's statistics, so the exact aggregate costs about what
the same question written by hand in SQL costs."""
from __future__ import annotations

import pytest

from service import db
from tests.plans import statements
from tests.test_aggregate import LOINC, WEIGHT, consent, exact, new_project, param, person, weights


# SQLite only: its plan follows from the statement's form; PostgreSQL's from its statistics.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_resources_an_expression_indexes_are_read_by_their_key(app, client, custodian_headers):
    project_id = new_project(app)
    for born in ("1950-01-01", "1980-01-01"):
        consent(app, person(client, custodian_headers, "female", born, weights_kg=(70.0, 72.0)), project_id)
    question = weights("mean", "latest", 0.0, 300.0, param("cohort", f"Observation?code={LOINC}|{WEIGHT}"))
    found = statements(app, "SELECT", lambda: exact(app, project_id, question), holding="idx_token")
    assert found
    with app.app_context(), db.read() as conn:
        raw = conn.connection.dbapi_connection.cursor()
        for statement, parameters in found:
            raw.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
            plan = " / ".join(row[3] for row in raw.fetchall())
            assert "SEARCH resources USING INTEGER PRIMARY KEY" in plan, plan
            assert "ix_resources_type_pk (type=? AND pk=?" not in plan, plan
