"""How `$aggregate` reads its rows (issue 11): the resources an expression's index finds are
read by their key, whatever the planner's statistics, so the exact aggregate costs about what
the same question written by hand in SQL costs. On PostgreSQL a statistical read joins the
consent decisions by hash, while any other read keeps probing each row's decision."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from consent import engine
from service import db
from service.release import restrict
from service.store.schema import metadata, resources
from tests.plans import statements
from tests.test_aggregate import LOINC, WEIGHT, ask, consent, count, exact, new_project, param, person, weights


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


def group(*parts: dict) -> dict:
    return {"name": "groupBy", "part": list(parts)}


def _questions() -> dict[str, dict]:
    cohort = param("cohort", f"Observation?code={LOINC}|{WEIGHT}")
    return {
        "count": count(f"Observation?code={LOINC}|{WEIGHT}"),
        "age bands": ask(param("measure", "histogram"), group(param("by", "age-band"), param("edges", "0,50,100"),
                                                              {"name": "at", "valueDate": "2024-01-01"}), cohort),
        "gender": ask(param("measure", "histogram"), group(param("by", "gender")), cohort),
        "latest weight": weights("mean", "latest", 0.0, 300.0, cohort),
        "mean weight": weights("sum", "mean", 0.0, 300.0),
    }


@pytest.fixture
def weighed(app, client, custodian_headers) -> str:
    """A project whose consenting patients have weights, and one patient who did not consent."""
    project_id = new_project(app)
    for born in ("1950-01-01", "1980-01-01", "2001-01-01"):
        consent(app, person(client, custodian_headers, "female", born, weights_kg=(70.0, 72.0)), project_id)
    person(client, custodian_headers, "male", "1970-01-01", weights_kg=(90.0,))
    return project_id


def _plans(app, project_id: str, question: dict) -> list[str]:
    """The PostgreSQL plan of every statement the exact aggregate runs over the resources, planned in
    the transaction a statistical answer is computed in."""
    found = statements(app, "SELECT", lambda: exact(app, project_id, question), holding="FROM resources")
    assert found
    with app.app_context(), db.statistics_read() as conn:
        raw = conn.connection.dbapi_connection.cursor()
        plans = []
        for statement, parameters in found:
            raw.execute(f"EXPLAIN {statement}", parameters)
            plans.append("\n".join(row[0] for row in raw.fetchall()))
    return plans


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("asked", list(_questions()))
def test_postgresql_joins_the_consent_decisions_instead_of_probing_them_row_by_row(app, weighed, asked):
    """A decision `EXISTS` under an `OR` is a sub-plan run once per row, which no parallel worker may
    run: at 100k patients that doubled the time of a count. Joined, the plan is free to choose."""
    for plan in _plans(app, weighed, _questions()[asked]):
        assert "SubPlan" not in plan, plan


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("asked", list(_questions()))
def test_postgresql_sees_every_column_an_aggregate_tests_as_itself(app, weighed, asked):
    """SQLite's hint (`+column`: check it, never start from it) is not written for PostgreSQL, which plans
    from statistics and would estimate an expression such as `param || ''` at half a percent of the rows
    whatever they hold (it planned a scan of 850k value rows as 2k)."""
    found = statements(app, "SELECT", lambda: exact(app, weighed, _questions()[asked]), holding="FROM resources")
    assert found and [statement for statement, _ in found if "||" in statement or "(+" in statement] == []


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgresql_joins_a_cohort_by_hash_even_when_its_statistics_say_it_is_empty(app, client, custodian_headers):
    """Statistics taken before the data was written (autovacuum not yet by) estimate every filter at one
    row; nested loops over the real rows then re-read the inner rows once per outer row."""
    with app.app_context(), db.write() as conn:
        conn.exec_driver_sql("ANALYZE " + ", ".join(table.name for table in metadata.sorted_tables))  # this schema's
    project_id = new_project(app)
    for i in range(8):
        consent(app, person(client, custodian_headers, "female", f"{1940 + i}-01-01", weights_kg=(70.0 + i,)),
                project_id)
    for asked, question in _questions().items():
        for plan in _plans(app, project_id, question):
            assert "Nested Loop" not in plan, (asked, plan)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_read_of_rows_by_id_probes_each_rows_decision_even_with_patient_compartment_types_only(app, weighed):
    """Only a statistical read's filter is written to be joined. Joined, a look-up of a few rows by id
    (a search page's reference targets) was planned from every decision of the project: at 100k
    resources it took 90 ms instead of one, and research searches ran at a twentieth of the custodian's."""
    with app.app_context(), db.read() as conn:
        ids = conn.execute(select(resources.c.id).where(resources.c.type == "Patient")).scalars().all()
        read = restrict(weighed, engine.RECORD, types=("Encounter", "Patient"))(
            select(resources.c.pk).where(resources.c.type == "Patient", resources.c.id.in_(ids)))
        plan = "\n".join(conn.exec_driver_sql("EXPLAIN " + str(read.compile(
            dialect=conn.dialect, compile_kwargs={"literal_binds": True}))).scalars())
    assert len(ids) == 4 and "SubPlan" in plan, plan
