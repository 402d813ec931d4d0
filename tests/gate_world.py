"""A test world for attacking the research gate: versions, cross-patient references, directories.

Three projects: `open` receives every patient-data type, `observations` declares only
Observation, `directory` declares Observation and Practitioner. Patients:

- `a` consents to all three at record tier, excluding sexual health and HIV;
- `b` refuses the open project (and, by the default regime, receives nothing elsewhere);
- `recent` consents to the open project for data from 2020 on only;
- `no_encounters` consents to the open project except the Encounter class;
- `ended` and `future` consent to the open project with a validity period that ended
  yesterday or starts tomorrow.

Nothing carries a security label: sensitivity comes from codes only. Every Observation
has a value unique to it (`World.marker`), which survives de-identification, so a test
can tell exactly which resource a response carries. Resources are named (`World.refs`,
real `Type/id`); `pseudonym` gives the name a project would see for any of them, which
is what an attacker holding an earlier response, or guessing, would try.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from consent import projects, writer
from consent.materialise import refresh
from service import db, keyring
from service.store.schema import resources
from tests.fhir_helpers import observation, patient, transaction

SNOMED = "http://snomed.info/sct"
HIV = "86406008"
HYPERTENSION = "38341003"
SEXUAL_HEALTH_VISIT = "105629000"
CHECK_UP = "185349003"
ENCOUNTER_CLASS = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}
#: What the consenting patient `a` excludes from every project.
A_EXCLUDES = ["sexual-health", "hiv"]


@dataclass
class World:
    """Project ids, real patient ids by role, real references and Observation markers by name."""

    open: str
    observations: str
    directory: str
    patients: dict[str, str] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    marker: dict[str, float] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    def ref(self, name: str) -> dict[str, str]:
        return {"reference": self.refs[name]}


def pseudonym(app: Flask, project_id: str, reference: str) -> str:
    """The pseudonym project `project_id` gives the stored resource `Type/id`."""
    kind, real_id = reference.split("/")
    with app.app_context(), db.write() as conn:
        pk = conn.execute(select(resources.c.pk).where(resources.c.type == kind, resources.c.id == real_id)
                          ).scalar_one()
        return keyring.project_key(conn, project_id).pseudonym(kind, pk)


def condition(patient_id: str, code: str, onset: str = "2021-01-01", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Condition", "subject": {"reference": f"Patient/{patient_id}"},
            "code": {"coding": [{"system": SNOMED, "code": code}]}, "onsetDateTime": onset, **extra}


def encounter(patient_id: str, code: str, start: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Encounter", "status": "finished", "class": ENCOUNTER_CLASS,
            "type": [{"coding": [{"system": SNOMED, "code": code}]}],
            "subject": {"reference": f"Patient/{patient_id}"},
            "period": {"start": start, "end": start}, **extra}


def consent_to(app: Flask, patient_id: str, project_id: str, tier: str, exclude: list[str] | None = None,
               **root: Any) -> None:
    """Record a consent through consent/writer.py; `root` adds keys to the root provision."""
    choice = writer.build(patient_id, project_id, tier, exclude or [], source="test")
    choice["provision"].update(root)
    with app.app_context(), db.write() as conn:
        writer.record(conn, choice)


def utc_day(offset: int) -> str:
    return (datetime.now(UTC).date() + timedelta(days=offset)).isoformat()


class _Builder:
    """Names resources and sends them through the custodian API, many per transaction Bundle
    (`flush`), each with the id it was given here, and records them in the world."""

    def __init__(self, client: FlaskClient, headers: dict[str, str], world: World):
        self.client, self.headers, self.world = client, headers, world
        self.pending: list[dict[str, Any]] = []

    def add(self, name: str, resource: dict[str, Any]) -> str:
        made = {**resource, "id": uuid.uuid4().hex}
        self.pending.append(made)
        self.world.refs[name] = f"{made['resourceType']}/{made['id']}"
        return made["id"]

    def observe(self, name: str, role: str, value: float, when: str = "2021-06-01T10:00:00Z", **extra: Any) -> None:
        self.world.marker[name] = value
        self.add(name, observation(self.world.patients[role], value=value, when=when, **extra))

    def person(self, role: str, **extra: Any) -> None:
        family = f"Gate{role.capitalize()}Family"
        self.world.names.append(family)
        self.world.patients[role] = self.add(role, patient(family=family, given="Hidden", gender="female",
                                                           birthDate="1961-04-05", **extra))

    def flush(self) -> None:
        """Create what was added, in one transaction (the same validation and audit as one create each)."""
        entries = [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                   for r in self.pending]
        response = self.client.post("/fhir", json=transaction(*entries), headers=self.headers)
        assert response.status_code == 200, response.get_json()
        self.pending = []


def build(app: Flask, client: FlaskClient, headers: dict[str, str]) -> World:
    """Create the projects, the directory, the patients, their data and their consents."""
    with app.app_context(), db.write() as conn:
        made = [projects.create(conn, name=name, tier="record", epsilon=5.0, types=types).project_id
                for name, types in (("open", None), ("observations", ("Observation",)),
                                    ("directory", ("Observation", "Practitioner")))]
        refresh(conn)
    world = World(*made)
    w = _Builder(client, headers, world)
    world.names += ["GateDoctorFamily", "Gate Clinic Incorporated"]
    w.add("practitioner", {"resourceType": "Practitioner", "name": [{"family": "GateDoctorFamily"}]})
    w.add("organization", {"resourceType": "Organization", "name": "Gate Clinic Incorporated"})

    w.person("a", generalPractitioner=[world.ref("practitioner")], managingOrganization=world.ref("organization"))
    for role in ("b", "recent", "no_encounters", "ended", "future"):
        w.person(role)
    a, b = world.patients["a"], world.patients["b"]

    # The refusing patient's data, which a's data points at.
    w.observe("b_obs", "b", 301.0)
    w.add("b_service_request", {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                                "subject": world.ref("b"), "code": {"coding": [{"system": SNOMED,
                                                                                "code": CHECK_UP}]}})
    w.add("b_procedure", {"resourceType": "Procedure", "status": "completed", "subject": world.ref("b")})
    w.add("b_specimen", {"resourceType": "Specimen", "subject": world.ref("b")})
    w.add("b_hiv", condition(b, HIV))

    # a's withheld data (sensitive by code only) and a's ordinary data that points at it.
    w.add("hiv", condition(a, HIV))
    # b's sexual-health visit, which a's Observations point at (across patients nothing is inherited).
    w.add("sensitive_visit", encounter(b, SEXUAL_HEALTH_VISIT, "2021-03-01",
                                       reasonCode=[{"coding": [{"system": SNOMED, "code": SEXUAL_HEALTH_VISIT}]}]))
    w.add("routine_visit", encounter(
        a, CHECK_UP, "2021-03-02", participant=[{"individual": world.ref("practitioner")}],
        serviceProvider=world.ref("organization"), reasonReference=[world.ref("b_hiv")],
        diagnosis=[{"condition": world.ref("b_hiv")}]))
    # A visit whose diagnosis is a's HIV condition is HIV data too, and so is what was measured during it.
    w.add("hiv_visit", encounter(a, CHECK_UP, "2021-03-04", reasonReference=[world.ref("hiv")],
                                 diagnosis=[{"condition": world.ref("hiv")}]))
    w.observe("in_sensitive_visit", "a", 201.0, encounter=world.ref("sensitive_visit"))
    w.observe("typed_sensitive_visit", "a", 202.0, encounter={
        "reference": world.refs["sensitive_visit"], "type": "Encounter", "display": "Sexual health clinic"})
    w.observe("in_routine_visit", "a", 203.0, encounter=world.ref("routine_visit"),
              performer=[world.ref("practitioner"), world.ref("organization")])
    w.observe("in_hiv_visit", "a", 208.0, encounter=world.ref("hiv_visit"))
    w.observe("crossing", "a", 204.0, performer=[world.ref("b")], focus=[world.ref("b")],
              hasMember=[world.ref("b_obs")], derivedFrom=[world.ref("b_obs")],
              basedOn=[world.ref("b_service_request")], partOf=[world.ref("b_procedure")],
              specimen=world.ref("b_specimen"))
    w.add("asserted_by_b", condition(a, HYPERTENSION, asserter=world.ref("b"),
                                     evidence=[{"detail": [world.ref("b_obs")]}]))
    w.observe("deleted_target", "a", 205.0)
    w.observe("points_at_deleted", "a", 206.0, derivedFrom=[world.ref("deleted_target")])
    w.flush()
    response = client.delete(f"/fhir/{world.refs['deleted_target']}", headers=headers)
    assert response.status_code in (200, 204), response.get_json()
    w.observe("a_plain", "a", 207.0)

    # Data outside a data period, of an excluded class, and of consents not in force.
    w.observe("recent_old", "recent", 401.0, when="2019-06-01T10:00:00Z")
    w.observe("recent_new", "recent", 402.0, derivedFrom=[world.ref("recent_old")])
    w.add("excluded_class_visit", encounter(world.patients["no_encounters"], CHECK_UP, "2021-03-03"))
    w.observe("no_encounters_obs", "no_encounters", 501.0, encounter=world.ref("excluded_class_visit"))
    w.observe("ended_obs", "ended", 601.0)
    w.observe("future_obs", "future", 701.0)
    w.flush()

    for project_id in made:
        consent_to(app, a, project_id, "record", A_EXCLUDES)
    consent_to(app, b, world.open, "none")
    consent_to(app, world.patients["recent"], world.open, "record",
               provision=[{"type": "deny", "dataPeriod": {"end": "2019-12-31"}}])
    consent_to(app, world.patients["no_encounters"], world.open, "record", provision=[
        {"type": "deny", "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Encounter"}]}])
    consent_to(app, world.patients["ended"], world.open, "record",
               period={"start": "2020-01-01", "end": utc_day(-1)})
    consent_to(app, world.patients["future"], world.open, "record", period={"start": utc_day(1)})
    return world
