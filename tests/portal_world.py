"""A small world for the consent portal's tests: projects of each tier, one closed, patients with
sensitive data, a paper consent, and portal sessions opened the way sign-in opens them.

- `heart`: record tier, plain-language text in French and English, an end date.
- `sleep`: aggregate tier, receives Patient, Observation and Condition only, no plain text.
- `closed`: record tier, closed (receives nothing; patients are not offered it).
- `alice`: no consent at all (the deployment default governs).
- `bob`: a research-wide "Statistics only" choice, then a paper "Pseudonymised records" form for
  `heart` recorded by the custodian (method paper, recorded by "Nurse Martin").
Each patient has an Observation with a value unique to them and a depression Condition
(mental health, a sensitive category).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from consent import projects, writer
from consent.patients import IDENTIFIER_TYPES, MEDICAL_RECORD_NUMBER
from consent.web import sessions
from service import db
from service.store.schema import decisions, resources
from tests.fhir_helpers import create, observation, patient

SNOMED = "http://snomed.info/sct"
DEPRESSION = "370143000"
HEART_TEXT = {
    "en": {"title": "Heart failure after 60", "purpose": "To learn which treatments keep people out of hospital.",
           "sponsor": "University Hospital of Lyon"},
    "fr": {"title": "L'insuffisance cardiaque après 60 ans",
           "purpose": "Savoir quels traitements évitent l'hôpital.", "sponsor": "Hôpital universitaire de Lyon"},
}


@dataclass
class Portal:
    heart: str
    sleep: str
    closed: str
    alice: str
    bob: str
    marker: dict[str, float]


def mrn(value: str) -> list[dict[str, Any]]:
    return [{"type": {"coding": [{"system": IDENTIFIER_TYPES, "code": MEDICAL_RECORD_NUMBER}]}, "value": value}]


def build_portal(app: Flask, client: FlaskClient, headers: dict[str, str]) -> Portal:
    with app.app_context(), db.write() as conn:
        heart = projects.create(conn, name="heart", tier="record", epsilon=5.0, plain=HEART_TEXT,
                                ends="2099-12-31").project_id
        sleep = projects.create(conn, name="sleep", tier="aggregate", epsilon=5.0,
                                types=("Patient", "Observation", "Condition")).project_id
        closed = projects.create(conn, name="closed", tier="record", epsilon=5.0).project_id
        projects.close(conn, closed)
    ids, marker = {}, {}
    for value, name in enumerate(("alice", "bob"), start=501):
        made = create(client, headers, patient(family=name.title(), given="Test", gender="female",
                                               birthDate="1960-01-01", identifier=mrn(f"MRN-{value}")))
        ids[name], marker[name] = made["id"], float(value)
        create(client, headers, observation(made["id"], value=float(value)))
        create(client, headers, {"resourceType": "Condition", "subject": {"reference": f"Patient/{made['id']}"},
                                 "code": {"coding": [{"system": SNOMED, "code": DEPRESSION}]},
                                 "onsetDateTime": "2020-01-01"})
    with app.app_context(), db.write() as conn:
        writer.record(conn, writer.build(ids["bob"], None, "aggregate", [], source="test", method="paper",
                                         when="2024-01-10"))
        writer.record(conn, writer.build(ids["bob"], heart, "record", [], source="paper form", method="paper",
                                         when="2024-03-01", recorded_by="Nurse Martin"))
    return Portal(heart, sleep, closed, ids["alice"], ids["bob"], marker)


def sign_in(app: Flask, client: FlaskClient, patient_id: str, lang: str | None = None) -> str:
    """Open a portal session for the patient as sign-in does, set its cookie; returns its CSRF token."""
    with app.app_context(), db.write() as conn:
        secret = sessions.start(conn, patient_id, lang, db.now_us())
        session = sessions.resume(conn, secret, db.now_us())
    assert session is not None
    client.set_cookie(sessions.COOKIE, secret, path=sessions.COOKIE_PATH)
    return session.csrf


def tier(app: Flask, patient_id: str, project_id: str) -> tuple[int, int]:
    """The materialised (tier, excluded categories mask) of a patient for a project."""
    with app.app_context(), db.read() as conn:
        row = conn.execute(select(decisions.c.tier, decisions.c.excluded_mask).where(
            decisions.c.patient_id == patient_id, decisions.c.project_id == project_id)).one()
    return row.tier, row.excluded_mask


def consent_count(app: Flask) -> int:
    """How many Consent versions are stored, all patients together (a change writes at least one)."""
    with app.app_context(), db.read() as conn:
        return conn.execute(select(func.sum(resources.c.version)).where(resources.c.type == "Consent")).scalar() or 0


def now() -> datetime:
    return datetime.now(UTC)
