"""The audit names each entry's patients by their set, each distinct set stored once (service/audit.py,
`patient_sets`): a cohort asked many questions is stored once, and every reader (a patient's
disclosures, the patient form, AuditEvent read and search) still finds exactly the entries that named
each patient. Revision 0003 converts the per-entry rows of an older database into sets.

A record-tier project whose partner asks `$aggregate` questions over overlapping cohorts and searches
records, through the real API, on SQLite and PostgreSQL:
  ann: weight and hypertension   bob: hypertension   cat: weight   dan: neither
so the answer over everyone names {ann, bob, cat, dan}, the hypertension cohort {ann, bob} (a subset),
the weight cohort {ann, cat} (overlapping the other), and a weight search releases ann's and cat's
records (the weight cohort's set again).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, insert, select, text

from consent.web.disclosures import received
from service import audit, db, disclosures
from service.store import migrations
from service.store.schema import audit as audit_table
from service.store.schema import audit_head, audit_seals, patient_sets
from tests.research_world import bearer, token
from tests.test_aggregate import (
    HYPERTENSION,
    LOINC,
    SNOMED,
    WEIGHT,
    consent,
    count,
    new_project,
    param,
    person,
    post,
)
from tests.test_aggregate import ask as question

HYPERTENSIVE = f"Condition?code={SNOMED}|{HYPERTENSION}"
WEIGHED = f"Observation?code={LOINC}|{WEIGHT}"


def by_gender(cohort: str) -> dict[str, Any]:
    """A histogram by gender of the cohort."""
    return question(param("measure", "histogram"), param("groupBy", by="gender"), param("cohort", cohort))


@dataclass
class Partner:
    """The project, its research client's headers and its patients (name → id)."""

    project: str
    headers: dict[str, str]
    people: dict[str, str]


@pytest.fixture
def partner(app: Flask, client: FlaskClient, custodian_headers: dict[str, str]) -> Partner:
    project = new_project(app, tier="record", epsilon=100.0, cap=10.0, suppression=0)
    people = {
        "ann": person(client, custodian_headers, "female", "1950-02-03", (70.0,), (HYPERTENSION,)),
        "bob": person(client, custodian_headers, "male", "1990-05-05", (), (HYPERTENSION,)),
        "cat": person(client, custodian_headers, "female", "2010-01-01", (30.0,), ()),
        "dan": person(client, custodian_headers, "male", "1970-09-09"),
    }
    for patient_id in people.values():
        consent(app, patient_id, project, "record")
    return Partner(project, bearer(token(client, app, "research", project)), people)


def newest(app: Flask, action: str) -> int:
    with app.app_context(), db.read() as conn:
        return conn.scalar(select(func.max(audit_table.c.seq)).where(audit_table.c.action == action))


def ask(app: Flask, client: FlaskClient, partner: Partner, body: dict[str, Any]) -> int:
    """Ask a question; the sequence number of the entry auditing its answer."""
    response = post(client, partner.headers, body)
    assert response.status_code == 200, response.get_json()
    return newest(app, "aggregate")


def search(app: Flask, client: FlaskClient, partner: Partner, query: str) -> int:
    """Search records; the sequence number of the entry auditing the release."""
    response = client.get(f"/research/fhir/{query}", headers=partner.headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["entry"]
    return newest(app, "search")


@pytest.fixture
def released(app: Flask, client: FlaskClient, partner: Partner) -> dict[str, list[int]]:
    """The releases to the partner: patient name → the entries that carried their data, oldest first."""
    everyone = ask(app, client, partner, count())
    hypertensive = ask(app, client, partner, count(HYPERTENSIVE))
    weighed = ask(app, client, partner, count(WEIGHED))
    records = search(app, client, partner, WEIGHED)
    return {"ann": [everyone, hypertensive, weighed, records], "bob": [everyone, hypertensive],
            "cat": [everyone, weighed, records], "dan": [everyone]}


def stored_rows(app: Flask) -> int:
    with app.app_context(), db.read() as conn:
        return conn.scalar(select(func.count()).select_from(patient_sets))


def test_two_answers_over_the_same_cohort_store_its_patients_once(app, client, partner):
    before = stored_rows(app)
    ask(app, client, partner, count(HYPERTENSIVE))
    ask(app, client, partner, by_gender(HYPERTENSIVE))
    assert stored_rows(app) - before == 2


def test_a_search_releasing_an_answered_cohorts_records_stores_no_patient(app, client, partner):
    ask(app, client, partner, count(WEIGHED))
    before = stored_rows(app)
    search(app, client, partner, WEIGHED)
    assert stored_rows(app) == before


def test_a_patients_disclosures_list_exactly_the_releases_that_carried_them(app, partner, released):
    with app.app_context(), db.read() as conn:
        found = {name: [r["seq"] for r in disclosures.disclosures(conn, patient_id)["releases"]]
                 for name, patient_id in partner.people.items()}
    assert found == released


def test_the_patient_form_counts_exactly_the_releases_that_carried_the_patient(app, partner, released):
    today = datetime.now(UTC).date()
    with app.app_context(), db.read() as conn:
        found = {name: [(r.project.project_id, r.record_days, r.answers) for r in received(conn, patient_id)]
                 for name, patient_id in partner.people.items()}
    assert found == {"ann": [(partner.project, ((today, 1),), 3)], "bob": [(partner.project, (), 2)],
                     "cat": [(partner.project, ((today, 1),), 2)], "dan": [(partner.project, (), 1)]}


def test_the_project_report_counts_each_patient_once(app, partner, released):
    with app.app_context(), db.read() as conn:
        report = disclosures.project_report(conn, partner.project)
    assert (report["patients"], report["patients_in_aggregates"]) == (2, 4)


def event_patients(event: dict[str, Any]) -> set[str]:
    return {e["what"]["reference"] for e in event.get("entity", ()) if e.get("role", {}).get("code") == "1"}


def test_each_audit_event_read_names_exactly_its_entrys_patients(client, custodian_headers, partner, released):
    by_entry: dict[int, set[str]] = {}
    for name, seqs in released.items():
        for seq in seqs:
            by_entry.setdefault(seq, set()).add(f"Patient/{partner.people[name]}")
    found = {seq: event_patients(client.get(f"/fhir/AuditEvent/{seq}", headers=custodian_headers).get_json())
             for seq in by_entry}
    assert found == by_entry


def test_an_audit_event_search_by_patient_finds_exactly_the_entries_naming_them(client, custodian_headers,
                                                                                partner, released):
    """(The custodian's writes that made the patients name them too: the entries before the releases.)"""
    first = min(min(seqs) for seqs in released.values())
    found = {}
    for name, patient_id in partner.people.items():
        response = client.get(f"/fhir/AuditEvent?patient=Patient/{patient_id}&_count=100", headers=custodian_headers)
        assert response.status_code == 200, response.get_json()
        found[name] = sorted(seq for e in response.get_json().get("entry", ())
                             if (seq := int(e["resource"]["id"])) >= first)
    assert found == released


# -- revision 0003 converts an older database ------------------------------------------------------------------


@pytest.fixture
def old_database(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of the test's backend, built by the revisions up to 0002 (per-entry patient rows)."""
    url = f"sqlite:///{tmp_path / 'old.db'}" if database_url.startswith("sqlite") \
        else request.getfixturevalue("pg_unmigrated_schema")
    engine = db.make_engine(url)
    with engine.begin() as conn:
        cfg = migrations.config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    engine.dispose()
    yield url


#: What the entries of the old database name: sets shared, overlapping, one a subset of another, and none.
NAMED = [["p1", "p2"], ["p1", "p2", "p3"], ["p1", "p2"], [], ["p3"], ["p2", "p1"], ["p4"]] * 10


def test_revision_0003_converts_each_entrys_patients_keeping_disclosures_and_the_chain(app, old_database):
    """The entries (more than a seal's worth) are written by this code on the app's database, then copied
    into the older schema with the patients each names as rows of `audit_patients`; the upgrade must give
    back the same disclosures and a chain that verifies."""
    with app.app_context(), db.write() as conn:
        seqs = [audit.record(conn, actor="client", action="aggregate" if i % 2 else "search", project_id="project",
                             detail={"epsilon": 0.5}, patients=patients) for i, patients in enumerate(NAMED)]
    columns = [c for c in audit_table.c if c.name != "patients"]
    with app.app_context(), db.read() as conn:
        entries = [row._asdict() for row in conn.execute(select(*columns).order_by(audit_table.c.seq))]
        head = [row._asdict() for row in conn.execute(select(audit_head))]
        seals = [row._asdict() for row in conn.execute(select(audit_seals))]
    assert seals
    engine = db.make_engine(old_database)
    with engine.begin() as conn:
        conn.execute(insert(audit_table), entries)
        conn.execute(insert(audit_head), head)
        conn.execute(insert(audit_seals), seals)
        conn.execute(text("INSERT INTO audit_patients (seq, patient_id) VALUES (:seq, :patient_id)"),
                     [{"seq": seq, "patient_id": p} for seq, patients in zip(seqs, NAMED, strict=True)
                      for p in set(patients)])
    db.migrate(engine)
    expected = {p: [seq for seq, patients in zip(seqs, NAMED, strict=True) if p in patients]
                for p in ("p1", "p2", "p3", "p4")}
    with app.app_context(), engine.connect() as conn:
        found = {p: [r["seq"] for r in disclosures.disclosures(conn, p)["releases"]] for p in expected}
        intact, checked, message = audit.verify(conn)
        stored = conn.scalar(select(func.count()).select_from(patient_sets))
        sets = {row.seq: row.patients for row in conn.execute(select(audit_table.c.seq, audit_table.c.patients)
                                                                .where(audit_table.c.seq.in_(seqs)))}
    engine.dispose()
    assert found == expected
    assert (intact, checked) == (True, len(entries)), message
    assert stored == 2 + 3 + 1 + 1
    # The ids this code gives the same sets: a later entry naming one of them stores nothing again.
    assert sets == {seq: audit.set_id(patients) if patients else None
                    for seq, patients in zip(seqs, NAMED, strict=True)}
