"""Patients as the custodian and the patients themselves name them: by id or by patient number.

A patient's number is the value of their medical record number: the identifier whose
`type` is HL7 v2-0203 `MR`. The custodian's commands accept either the resource id or
that number; the patient portal signs patients in with the number.
"""
from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import Connection, and_, false, select

from service.errors import InvalidRequest, NotFound
from service.store.schema import idx_token, resources

IDENTIFIER_TYPES = "http://terminology.hl7.org/CodeSystem/v2-0203"
MEDICAL_RECORD_NUMBER = "MR"


def numbers(patient: dict[str, Any]) -> list[str]:
    """The patient's medical record numbers, in the order the resource lists them."""
    found = []
    for identifier in patient.get("identifier") or ():
        codings = (identifier.get("type") or {}).get("coding") or ()
        typed = any(c.get("system") == IDENTIFIER_TYPES and c.get("code") == MEDICAL_RECORD_NUMBER for c in codings)
        if typed and identifier.get("value"):
            found.append(identifier["value"])
    return found


def patient_number(conn: Connection, patient_id: str) -> str:
    """The first medical record number of a live patient; refused if they have none."""
    stored = conn.execute(select(resources.c.json).where(
        resources.c.type == "Patient", resources.c.id == patient_id, resources.c.deleted == false())).scalar()
    if stored is None:
        raise NotFound(f"Patient {patient_id!r} is not known")
    found = numbers(orjson.loads(stored))
    if not found:
        raise InvalidRequest(f"Patient {patient_id!r} has no medical record number (an identifier of type MR)")
    return found[0]


def resolve(conn: Connection, text: str) -> str:
    """The id of the live patient named by `text`: their resource id, or else their medical record number.

    Refused when nothing matches, or when the number belongs to several patients.
    """
    text = text.strip()
    if not text:
        raise InvalidRequest("a patient id or medical record number is required")
    live = and_(resources.c.type == "Patient", resources.c.deleted == false())
    if conn.execute(select(resources.c.id).where(live, resources.c.id == text)).first() is not None:
        return text
    indexed = select(idx_token.c.resource_pk).where(idx_token.c.param == "identifier", idx_token.c.code == text)
    candidates = conn.execute(select(resources.c.id, resources.c.json).where(live, resources.c.pk.in_(indexed))).all()
    matching = sorted(row.id for row in candidates if text in numbers(orjson.loads(row.json)))
    if not matching:
        raise NotFound(f"No patient has the id or medical record number {text!r}")
    if len(matching) > 1:
        raise InvalidRequest(f"The medical record number {text!r} belongs to {len(matching)} patients; "
                             "use the patient id")
    return matching[0]
