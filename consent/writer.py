"""Build and store the FHIR Consent for a simple choice (paper forms, the patient form).

A choice is a tier for one project (or all research) minus some sensitive
categories. It becomes an ordinary R4 Consent through the same write path as the
API, so it is validated, versioned and materialised the same way. A new choice for
the same patient and project is a new version of the same Consent, so the history
of what the patient said is kept.
"""
from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from pathlib import PurePath
from typing import Any

import orjson
from sqlalchemy import Connection, false, select

from consent import engine
from policies.fhirdates import DateFormatError, date_range
from policies.sensitivity import ACT_CODE, CATEGORIES, LABEL_OF
from service.db import now_us
from service.errors import InvalidRequest
from service.store import repository
from service.store.repository import Stored
from service.store.schema import resources
from service.validation import validate

_LOINC_PRIVACY = {"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}

#: How the choice reached Passerelle, as a Consent extension valued with v3 ParticipationMode.
METHOD_EXTENSION = "https://passerelle.example/fhir/StructureDefinition/consent-collection-method"
PARTICIPATION_MODE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode"
#: method → its ParticipationMode coding: the patient's own web form, or a signed paper form.
METHODS: dict[str, dict[str, str]] = {
    "web": {"system": PARTICIPATION_MODE, "code": "ONLINEWRIT", "display": "online written"},
    "paper": {"system": PARTICIPATION_MODE, "code": "HANDWRIT", "display": "handwritten"},
}
#: R5's Consent.verification.verifiedBy carried into R4: who at the custodian recorded a paper form.
VERIFIED_BY = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Consent.verification.verifiedBy"
#: Scanned forms a Consent may carry, by file suffix, and the most it may weigh.
ATTACHMENT_TYPES = {".pdf": "application/pdf", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                    ".tif": "image/tiff", ".tiff": "image/tiff"}
ATTACHMENT_MAX_BYTES = 10 * 1024 * 1024


def scanned_form(data: bytes, filename: str) -> dict[str, Any]:
    """The FHIR Attachment of a scanned consent form: base64 content, type, title, size and SHA-1."""
    suffix = PurePath(filename).suffix.lower()
    if suffix not in ATTACHMENT_TYPES:
        raise InvalidRequest(f"the scanned form {filename!r} must be one of {', '.join(sorted(ATTACHMENT_TYPES))}")
    if not data:
        raise InvalidRequest(f"the scanned form {filename!r} is empty")
    if len(data) > ATTACHMENT_MAX_BYTES:
        raise InvalidRequest(f"the scanned form {filename!r} is larger than {ATTACHMENT_MAX_BYTES // 2**20} MiB")
    return {"contentType": ATTACHMENT_TYPES[suffix], "data": base64.b64encode(data).decode(),
            "title": PurePath(filename).name, "size": len(data),
            "hash": base64.b64encode(hashlib.sha1(data).digest()).decode()}


def _moment(value: str, what: str) -> int:
    try:
        return date_range(value)[0]
    except DateFormatError:
        raise InvalidRequest(f"{what} {value!r} is not a date (YYYY-MM-DD) or a date and time") from None


def _signed(when: datetime | str | None) -> str:
    if when is None or isinstance(when, datetime):
        return (when or datetime.now(UTC)).isoformat(timespec="seconds")
    if _moment(when, "the signing date") > now_us():
        raise InvalidRequest(f"the signing date {when!r} is in the future")
    return when


def _period(period: tuple[str | None, str | None]) -> dict[str, str]:
    start, end = period
    low = _moment(start, "the period start") if start else None
    if end:
        _moment(end, "the period end")
        if low is not None and low > date_range(end)[1]:
            raise InvalidRequest(f"the period ends ({end}) before it starts ({start})")
    return {k: v for k, v in (("start", start), ("end", end)) if v}


def build(patient_id: str, project_id: str | None, tier: str, exclude: list[str], *, source: str,
          when: datetime | str | None = None, method: str = "paper", recorded_by: str | None = None,
          attachment: dict[str, Any] | None = None, period: tuple[str | None, str | None] | None = None
          ) -> dict[str, Any]:
    """The Consent resource expressing `tier` for a project (None: all research) without `exclude`.

    Who and how are always recorded: `performer` is the patient, who agrees on the web form
    (`method="web"`) or by signing a paper form (`method="paper"`), and the `METHOD_EXTENSION`
    says which. `when` is when the patient agreed (`dateTime`; a FHIR date or dateTime for a
    paper form, never in the future; default now). A paper form may add who recorded it
    (`verification`, with `VERIFIED_BY`) and its scan (`sourceAttachment`, see `scanned_form`).
    `period` (start, end; either may be None) bounds when the consent is in force
    (`provision.period`). `source` is the free text of `policyRule`.
    """
    if tier not in engine.TIERS:
        raise InvalidRequest(f"tier must be one of {', '.join(engine.TIERS)}")
    if method not in METHODS:
        raise InvalidRequest(f"method must be one of {', '.join(METHODS)}")
    if method == "web" and (recorded_by is not None or attachment is not None):
        raise InvalidRequest("a choice made on the web form has no recorder and no scanned form")
    unknown = sorted(set(exclude) - set(CATEGORIES))
    if unknown:
        raise InvalidRequest(f"unknown sensitive categories: {', '.join(unknown)} (known: {', '.join(CATEGORIES)})")
    provision: dict[str, Any] = {"type": "deny" if tier == "none" else "permit"}
    if period and any(period):
        provision["period"] = _period(period)
    if tier == "aggregate":
        provision["action"] = [{"coding": [{"system": engine.ACTION_SYSTEM, "code": "use"}]}]
    if tier != "none" and exclude:
        provision["provision"] = [{
            "type": "deny",
            "securityLabel": [{"system": ACT_CODE, "code": LABEL_OF[c]} for c in CATEGORIES if c in exclude],
        }]
    patient = {"reference": f"Patient/{patient_id}"}
    consent: dict[str, Any] = {
        "resourceType": "Consent",
        "extension": [{"url": METHOD_EXTENSION, "valueCoding": METHODS[method]}],
        "status": "active",
        "scope": {"coding": [{"system": engine.SCOPE_SYSTEM, "code": "research"}]},
        "category": [{"coding": [_LOINC_PRIVACY]}],
        "patient": patient,
        "dateTime": _signed(when),
        "performer": [dict(patient)],
        "policyRule": {"text": f"Passerelle research consent collected via {source}"},
        "provision": provision,
    }
    if attachment is not None:
        consent["sourceAttachment"] = attachment
    if recorded_by is not None:
        if not recorded_by.strip():
            raise InvalidRequest("the name of who recorded the form cannot be empty")
        consent["verification"] = [{
            "extension": [{"url": VERIFIED_BY, "valueReference": {"display": recorded_by.strip()}}],
            "verified": True, "verifiedWith": dict(patient),
            "verificationDate": datetime.now(UTC).isoformat(timespec="seconds")}]
    if project_id:
        consent["extension"].append({"url": engine.STUDY_CONTEXT,
                                     "valueReference": {"reference": f"ResearchStudy/{project_id}"}})
    validate(consent, "Consent")
    return consent


def how(consent: dict[str, Any]) -> dict[str, str | None]:
    """Who and how a Consent built here was made: `method` (web, paper; None when not recorded,
    e.g. a Consent written through the API) and `recorded_by` (a paper form's recorder)."""
    codings = [e.get("valueCoding") for e in consent.get("extension") or () if e.get("url") == METHOD_EXTENSION]
    method = next((name for name, coding in METHODS.items() if coding in codings), None)
    recorders = [e["valueReference"].get("display") for v in consent.get("verification") or ()
                 for e in v.get("extension") or () if e.get("url") == VERIFIED_BY and e.get("valueReference")]
    return {"method": method, "recorded_by": recorders[0] if recorders else None}


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
