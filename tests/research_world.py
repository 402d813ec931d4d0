"""A small world for research-path tests: three projects, patients in every consent situation.

Every patient has Observations with values unique to them (values survive
de-identification), so a test can tell exactly whose data a response carries.
"""
from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from consent import projects, writer
from consent.materialise import refresh
from service import db
from service.auth import register_client
from tests.fhir_helpers import create_all, observation, patient

SNOMED = "http://snomed.info/sct"
DEPRESSION = "370143000"
HYPERTENSION = "38341003"


@dataclass
class World:
    """Who is who: real ids by role, and the observation value that marks each patient."""

    project: str
    other_project: str
    aggregate_project: str
    patients: dict[str, str] = field(default_factory=dict)
    marker: dict[str, float] = field(default_factory=dict)
    conditions: dict[str, dict[str, str]] = field(default_factory=dict)


def token(client: FlaskClient, app: Flask, role: str, project_id: str | None = None) -> str:
    with app.app_context(), db.write() as conn:
        registered = register_client(conn, f"{role}-{project_id}", role, project_id)
    basic = base64.b64encode(f"{registered['client_id']}:{registered['client_secret']}".encode()).decode()
    response = client.post("/auth/token", data={"grant_type": "client_credentials"},
                           headers={"Authorization": f"Basic {basic}"})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["access_token"]


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def _condition(patient_id: str, code: str, onset: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "subject": {"reference": f"Patient/{patient_id}"},
            "code": {"coding": [{"system": SNOMED, "code": code}]}, "onsetDateTime": onset,
            "note": [{"text": "Discussed with the patient by phone."}]}


def build(app: Flask, client: FlaskClient, headers: dict[str, str]) -> World:
    """Create the projects, patients, their data and their consents."""
    with app.app_context(), db.write() as conn:
        ids = [projects.create(conn, name=name, tier=tier, epsilon=5.0).project_id
               for name, tier in (("A", "record"), ("B", "record"), ("C", "aggregate"))]
        refresh(conn)
    world = World(*ids)
    situations = ("consented", "aggregate_only", "refused", "silent", "no_mental_health", "recent_only",
                  "other_project")
    entries: list[tuple[str, dict[str, Any]]] = []
    for value, role in enumerate(situations, start=101):
        subject = {"reference": f"urn:uuid:{uuid.uuid4()}"}
        entries.append((subject["reference"], patient(
            family=f"Family{role}", given="Secret", gender="female", birthDate="1950-02-03",
            telecom=[{"system": "phone", "value": f"+33 6 00 00 0{value}"}])))
        entries += [(f"urn:uuid:{uuid.uuid4()}", {**resource, "subject": subject}) for resource in (
            observation("-", value=float(value), when="2019-06-01T10:00:00Z"),
            observation("-", value=float(value), when="2021-06-01T10:00:00Z"),
            _condition("-", DEPRESSION, "2021-01-01"), _condition("-", HYPERTENSION, "2021-01-01"))]
        world.marker[role] = float(value)
    # One transaction: the same validation, references and audit as one create each, at a fraction of the cost.
    made = iter(create_all(client, headers, entries))
    for role in situations:
        world.patients[role], _, _, depression, hypertension = (next(made) for _ in range(5))
        world.conditions[role] = {"depression": depression, "hypertension": hypertension}
    choices = {
        "consented": (world.project, "record", []),
        "aggregate_only": (world.project, "aggregate", []),
        "refused": (world.project, "none", []),
        "no_mental_health": (world.project, "record", ["mental-health"]),
        "other_project": (world.other_project, "record", []),
    }
    with app.app_context(), db.write() as conn:
        for role, (project_id, tier, exclude) in choices.items():
            writer.record(conn, writer.build(world.patients[role], project_id, tier, exclude, source="test"))
        recent = writer.build(world.patients["recent_only"], world.project, "record", [], source="test")
        recent["provision"]["provision"] = [{"type": "deny", "dataPeriod": {"end": "2019-12-31"}}]
        writer.record(conn, recent)
    return world
