"""Property: under the default profile, no text planted in a string-typed element is released.

Resources are generated from the R4B element definitions (the ones the engine compiles
its plans from): every element to a few levels deep, one form of each choice, a marker
string in every element of a text type (string, markdown, URIs, ids, binary), and
extensions — with sub-extensions — on complex elements and on primitives (`_x`). Code
systems, units and extension URLs are drawn from known ones and from markers, so that
codings, quantities and extensions are both kept and dropped. Only the string elements
a rule of the profile names are spared a marker: releasing those is the rule's purpose.
"""
from __future__ import annotations

import json
import random
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.deid import Deidentifier, _elements, load_profile
from policies.pseudonym import PseudonymKey
from tests.deid_helpers import DEFAULT_PROFILE

PROFILE = load_profile(DEFAULT_PROFILE)
TEXT_TYPES = frozenset({"string", "markdown", "uri", "url", "canonical", "oid", "uuid", "id", "base64Binary", "xhtml"})
TYPES = ["AllergyIntolerance", "CarePlan", "CareTeam", "Claim", "Condition", "Device", "DiagnosticReport",
         "DocumentReference", "Encounter", "ExplanationOfBenefit", "Goal", "ImagingStudy", "Immunization",
         "Medication", "MedicationAdministration", "MedicationRequest", "Observation", "Organization", "Patient",
         "Practitioner", "PractitionerRole", "Procedure", "QuestionnaireResponse", "ServiceRequest", "Specimen"]
SYSTEMS = ["http://loinc.org", "http://snomed.info/sct", "urn:oid:2.16.840.1.113883.6.96", "http://unitsofmeasure.org",
           "http://terminology.hl7.org/CodeSystem/v3-ActCode", "urn:oid:2.16.840.1.113883.6.238"]
EXTENSIONS = [str(r.url) for r in PROFILE.rules if r.url] + ["ombCategory", "detailed", "text"]
REFERENCES = ["Patient/p1", "Encounter/e1", "#c1"]
#: Paths a rule of the default profile names (its own purpose is to release them).
NAMED = {rule["path"].split(".", 1)[1] if rule["path"].startswith("*.") else rule["path"]
         for rule in json.loads(DEFAULT_PROFILE.read_text())["rules"]
         if rule["method"] != "redact" and "url" not in rule}
VALUES = {"boolean": True, "integer": 3, "positiveInt": 2, "unsignedInt": 1, "decimal": 1.5, "integer64": 7,
          "date": "2020-01-02", "dateTime": "2020-01-02T03:04:05+01:00", "instant": "2020-01-02T03:04:05Z",
          "time": "10:11:12", "code": "abc"}
MAX_DEPTH = 3


class Planter:
    """Builds one resource, remembering every marker it planted."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.markers: list[str] = []

    def marker(self) -> str:
        text = "Q" + "".join(self.rng.choice("ABCDEFGHJKMNPRSTVWXYZ") for _ in range(10)) + "Q"
        self.markers.append(text)
        return text

    def either(self, known: list[str]) -> str:
        return self.rng.choice(known) if self.rng.random() < 0.6 else self.marker()

    def resource(self, kind: str) -> dict[str, Any]:
        return {"resourceType": kind, "id": "r1", **self.fill(kind, kind, 0)}

    def fill(self, type_name: str, path: str, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        chosen: dict[str, str] = {}
        for element in _elements(type_name).values():
            if element.name.endswith("[x]"):
                chosen.setdefault(element.name, self.rng.choice(
                    [e.key for e in _elements(type_name).values() if e.name == element.name]))
                if chosen[element.name] != element.key:
                    continue
            if element.type == "Resource" or element.key == "modifierExtension" or (element.key == "id" and not depth):
                continue  # a modifier extension would withhold the element: nothing to see
            value = self.value(type_name, element, f"{path}.{element.key}", depth)
            if value is None:
                continue
            out[element.key] = [value] if element.many else value
            if element.primitive:
                out["_" + element.key] = [self.extended()] if element.many else self.extended()
        return out

    def value(self, owner: str, element: Any, path: str, depth: int) -> Any:
        if owner in ("Coding", "Quantity") and element.key == "system":
            return self.either(SYSTEMS)
        if owner == "Reference" and element.key == "reference":
            return self.either(REFERENCES)
        if owner == "Extension" and element.key == "url":
            return self.either(EXTENSIONS)
        if element.primitive:
            if element.type in TEXT_TYPES:
                return "MA" if self.named(path) else self.marker()
            if element.type == "code" and element.codes:
                return sorted(element.codes)[0]
            return VALUES.get(element.type, "x")
        if depth >= MAX_DEPTH and element.type not in ("Coding", "Quantity"):
            return None
        if depth > MAX_DEPTH + 1:
            return None
        return self.fill(element.type, path, depth + 1)

    def named(self, path: str) -> bool:
        kind, _, rest = path.partition(".")
        return f"{kind}.{rest}" in NAMED or rest in NAMED

    def extended(self) -> dict[str, Any]:
        return {"extension": [{"url": self.either(EXTENSIONS), "valueString": self.marker(),
                               "extension": [{"url": self.either(EXTENSIONS), "valueString": self.marker()}]}]}


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(TYPES), seed=st.integers(0, 2**32))
def test_no_marker_planted_in_a_string_element_is_released(kind: str, seed: int) -> None:
    planter = Planter(random.Random(seed))
    resource = planter.resource(kind)
    pks = {("Patient", "p1"): 1, ("Encounter", "e1"): 2}
    deid = Deidentifier(PROFILE, PseudonymKey(bytes(32), "property", 1), reference_year=2025)
    released = orjson.dumps(deid.apply(resource, 9, "p1", pks)).decode()
    assert [m for m in planter.markers if m in released] == []
