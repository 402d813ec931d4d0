"""Bulk loads leave the query planner statistics on what they wrote."""
from __future__ import annotations

import json
from pathlib import Path

from flask import Flask
from sqlalchemy import Connection, text

from service import db
from service.ingest import ingest
from service.store.repository import LARGE_WRITE
from tests.fhir_helpers import patient, post_entry, transaction


def analysed_tables(conn: Connection) -> set[str]:
    """The tables whose planner statistics describe their current rows: on SQLite, those in
    sqlite_stat1 (each test has a fresh file); on PostgreSQL, whose schema a test process reuses
    and whose statistics outlive the rows, the non-empty tables whose `reltuples` (set by ANALYZE)
    equals their row count (autovacuum waits for 50 changed rows: these tests write fewer)."""
    if conn.dialect.name == "sqlite":
        if not conn.scalar(text("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'")):
            return set()
        return set(conn.scalars(text("SELECT DISTINCT tbl FROM sqlite_stat1")))
    estimated = dict(conn.execute(text(
        "SELECT relname, reltuples FROM pg_class WHERE relkind = 'r' AND relnamespace = current_schema()::regnamespace"
    )).all())
    return {name for name, rows in estimated.items()
            if rows > 0 and rows == conn.scalar(text(f'SELECT count(*) FROM "{name}"'))}


def test_a_cli_ingest_leaves_planner_statistics_on_the_tables_it_wrote(app: Flask, tmp_path: Path):
    path = tmp_path / "Patient.ndjson"
    path.write_text("\n".join(json.dumps(patient(id=f"stat-{n}", family=f"F{n}")) for n in range(20)) + "\n")
    with db.read(app.extensions["passerelle.engine"]) as conn:
        assert "resources" not in analysed_tables(conn)
    result = app.test_cli_runner().invoke(args=["ingest", str(path)])
    assert result.exit_code == 0, result.output
    with db.read(app.extensions["passerelle.engine"]) as conn:
        assert {"resources", "history", "idx_string"} <= analysed_tables(conn)


def test_a_transaction_bundle_of_many_entries_leaves_planner_statistics(app: Flask, client, custodian_headers):
    bundle = transaction(*(post_entry(patient(family=f"F{n}")) for n in range(LARGE_WRITE)))
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    assert response.status_code == 200, response.get_json()
    with db.read(app.extensions["passerelle.engine"]) as conn:
        assert {"resources", "history", "idx_string"} <= analysed_tables(conn)


def test_demo_data_leaves_planner_statistics(app: Flask):
    result = app.test_cli_runner().invoke(args=["demo-data", "--patients", "2"])
    assert result.exit_code == 0, result.output
    with db.read(app.extensions["passerelle.engine"]) as conn:
        assert {"resources", "history", "idx_string"} <= analysed_tables(conn)


def test_a_long_ingest_gives_the_planner_statistics_before_it_ends(app: Flask, tmp_path: Path):
    # Without them, PostgreSQL (autovacuum off) looked up each chunk's ids by scanning every
    # resource of their type: a load slowed down as it grew, to ~250 resources/s at 200k.
    first, second = tmp_path / "1.ndjson", tmp_path / "2.ndjson"
    first.write_text("".join(json.dumps(patient(id=f"big-{n}", family=f"F{n}")) + "\n" for n in range(LARGE_WRITE)))
    second.write_text(json.dumps(patient(id="late", family="Late")) + "\n")
    engine = app.extensions["passerelle.engine"]
    seen: list[set[str]] = []

    def after_each_file(_size: int) -> None:
        with db.read(engine) as conn:
            seen.append(analysed_tables(conn))

    with app.app_context():
        report = ingest(engine, [first, second], after_each_file)
    assert report.stored == LARGE_WRITE + 1
    assert {"resources", "history", "idx_string"} <= seen[0]


def test_a_new_project_over_many_patients_leaves_planner_statistics_on_its_decisions(app: Flask, tmp_path: Path):
    # Materialising a project's decisions writes a row per patient in one transaction; on PostgreSQL
    # without statistics each chunk's look-up read every decision written so far (100k patients: over six
    # minutes and still slowing when stopped; 12 s with them).
    path = tmp_path / "Patient.ndjson"
    path.write_text("".join(json.dumps(patient(id=f"p-{n}", family=f"F{n}")) + "\n" for n in range(LARGE_WRITE)))
    runner = app.test_cli_runner()
    assert runner.invoke(args=["ingest", str(path)]).exit_code == 0
    made = runner.invoke(args=["project", "create", "--name", "study", "--tier", "aggregate", "--epsilon", "1"])
    assert made.exit_code == 0, made.output
    with db.read(app.extensions["passerelle.engine"]) as conn:
        assert conn.scalar(text("SELECT count(*) FROM decisions")) == LARGE_WRITE
        assert "decisions" in analysed_tables(conn)
