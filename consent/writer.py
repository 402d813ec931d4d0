"""Build and store the FHIR Consent for a simple choice (paper forms, the patient form).

A choice is a tier for one project (or all research) minus some sensitive
categories. It becomes an ordinary R4 Consent through the same write path as the
API, so it is validated, versioned and materialised the same way. A new choice for
the same patient and project is a new version of the same Consent, so the history
of what the patient said is kept.
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, false, select

from consent import engine
from policies.sensitivity import ACT_CODE, CATEGORIES, LABEL_OF
from service.errors import InvalidRequest
from service.store import repository
from service.store.repository import Stored
from service.store.schema import resources
from service.validation import validate

_LOINC_PRIVACY = {"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}


def build(patient_id: str, project_id: str | None, tier: str, exclude: list[str], *, source: str,
          when: datetime | None = None) -> dict[str, Any]:
    """The Consent resource expressing `tier` for a project (None: all research) without `exclude`."""
    if tier not in engine.TIERS:
        raise InvalidRequest(f"tier must be one of {', '.join(engine.TIERS)}")
    unknown = sorted(set(exclude) - set(CATEGORIES))
    if unknown:
        raise InvalidRequest(f"unknown sensitive categories: {', '.join(unknown)} (known: {', '.join(CATEGORIES)})")
    provision: dict[str, Any] = {"type": "deny" if tier == "none" else "permit"}
    if tier == "aggregate":
        provision["action"] = [{"coding": [{"system": engine.ACTION_SYSTEM, "code": "use"}]}]
    if tier != "none" and exclude:
        provision["provision"] = [{
            "type": "deny",
            "securityLabel": [{"system": ACT_CODE, "code": LABEL_OF[c]} for c in CATEGORIES if c in exclude],
        }]
    consent: dict[str, Any] = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": engine.SCOPE_SYSTEM, "code": "research"}]},
        "category": [{"coding": [_LOINC_PRIVACY]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateTime": (when or datetime.now(UTC)).isoformat(timespec="seconds"),
        "policyRule": {"text": f"Passerelle research consent collected via {source}"},
        "provision": provision,
    }
    if project_id:
        consent["extension"] = [{"url": engine.STUDY_CONTEXT,
                                 "valueReference": {"reference": f"ResearchStudy/{project_id}"}}]
    validate(consent, "Consent")
    return consent


def current_for(conn: Connection, patient_id: str, project_id: str | None) -> dict[str, Any] | None:
    """The patient's active research Consent bound to exactly this project (or research-wide)."""
    rows = conn.execute(select(resources.c.json).where(
        resources.c.type == "Consent", resources.c.patient_id == patient_id, resources.c.deleted == false()))
    found = [c for c in map(orjson.loads, rows.scalars())
             if c.get("status") == "active" and engine.is_research(c) and engine.bound_project(c) == project_id]
    return max(found, key=lambda c: c.get("dateTime", ""), default=None)


def record(conn: Connection, consent: dict[str, Any]) -> Stored:
    """Store a built Consent: a new version of the same patient+project Consent when there is one."""
    patient_id = consent["patient"]["reference"].split("/", 1)[1]
    existing = current_for(conn, patient_id, engine.bound_project(consent))
    if existing is None:
        return repository.create(conn, "Consent", consent)
    consent["id"] = existing["id"]
    return repository.update(conn, "Consent", existing["id"], consent)[0]
