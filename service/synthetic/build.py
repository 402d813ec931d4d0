"""Plain-dict builders for FHIR R4B datatypes, dates and ids.

Generation must be fast, so nothing here touches pydantic: every helper returns a
fresh dict (never a shared one: consumers may mutate what they receive).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from itertools import pairwise
from random import Random
from typing import Any, TypeVar

Resource = dict[str, Any]
T = TypeVar("T")
#: (system, code, display)
Code = tuple[str, str, str]

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
UCUM = "http://unitsofmeasure.org"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
ORG_SYSTEM = "https://passerelle.example/org"
ROLE_SYSTEM = "https://passerelle.example/practitioner-role"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"

#: Ages and histories are computed against this date, never the wall clock.
REFERENCE_DATE = date(2026, 1, 1)
YEAR = 365.2425

#: v3 information-sensitivity labels and their displays.
SENSITIVITY: dict[str, str] = {
    "PSY": "psychiatry information sensitivity",
    "HIV": "HIV/AIDS information sensitivity",
    "SEX": "sexuality and reproductive health information sensitivity",
    "SUD": "substance use disorder information sensitivity",
    "GDIS": "genetic disease information sensitivity",
}


#: The bits a version 4 UUID fixes (RFC 9562): the version nibble and the variant's two top bits.
_UUID_KEEP = ~((0xF000 << 64) | (0xC000 << 48))
_UUID_SET = (0x4000 << 64) | (0x8000 << 48)


def new_id(rng: Random) -> str:
    """A random (version 4) UUID drawn from `rng`, so it is reproducible (`str(uuid.UUID(int=…, version=4))`,
    formatted directly: it is the generator's most frequent call)."""
    h = f"{rng.getrandbits(128) & _UUID_KEEP | _UUID_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def coding(code: Code) -> dict[str, str]:
    return {"system": code[0], "code": code[1], "display": code[2]}


def concept(code: Code) -> dict[str, Any]:
    return {"coding": [coding(code)], "text": code[2]}


def quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def security(labels: tuple[str, ...]) -> dict[str, Any]:
    """meta with the sensitivity labels, plus the restricted confidentiality real EHRs add."""
    tags = [{"system": ACT_CODE, "code": label, "display": SENSITIVITY[label]} for label in labels]
    tags.append({"system": CONFIDENTIALITY, "code": "R", "display": "restricted"})
    return {"security": tags}


def at(day: date, minutes: int, tz: timezone) -> datetime:
    """`minutes` after midnight of `day`, in `tz` (always whole minutes: stable output)."""
    return datetime.combine(day, time(), tz) + timedelta(minutes=minutes)


def between(rng: Random, start: datetime, end: datetime) -> datetime:
    """A whole-minute instant in [start, end) (start itself when the span is empty)."""
    span = int((end - start).total_seconds() // 60)
    return start + timedelta(minutes=rng.randrange(span)) if span > 0 else start


def years_between(start: date, end: date) -> float:
    return (end - start).days / YEAR


def interpolate(table: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise-linear lookup in ((x, y), …) sorted by x, flat beyond both ends."""
    if x <= table[0][0]:
        return table[0][1]
    for (x0, y0), (x1, y1) in pairwise(table):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return table[-1][1]


def step(table: tuple[tuple[float, T], ...], x: float, default: T) -> T:
    """The value of the last (threshold, value) row whose threshold `x` reaches, else `default`."""
    value = default
    for threshold, row in table:
        if x >= threshold:
            value = row
    return value


@dataclass(frozen=True)
class Refs:
    """How generated resources point at each other.

    In a transaction Bundle (Synthea style) references inside the patient's bundle are
    `urn:uuid:` fullUrls and organisations/practitioners are conditional references;
    as stored resources (NDJSON) every reference is `Type/id`.
    """

    conditional: bool

    def local(self, resource_type: str, resource_id: str) -> str:
        return f"urn:uuid:{resource_id}" if self.conditional else f"{resource_type}/{resource_id}"

    def external(self, resource_type: str, resource_id: str, system: str, value: str) -> str:
        if self.conditional:
            return f"{resource_type}?identifier={system}|{value}"
        return f"{resource_type}/{resource_id}"


IN_BUNDLE = Refs(conditional=True)
STORED = Refs(conditional=False)
