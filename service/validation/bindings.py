"""Required bindings on CodeableConcept and Coding elements (`Condition.clinicalStatus`, …).

The R4 schema enumerates the codes of required bindings on `code` elements only; the others
are data generated from the R4 StructureDefinitions and value sets
(data/required-codings.json, keyed by the schema definition and element holding them). A
CodeableConcept conforms when one of its codings is a (system, code) of the value set, a
Coding when it is one; a CodeableConcept with text alone does not.
"""
from __future__ import annotations

from functools import cache
from typing import Any, NamedTuple

import orjson

from service.validation.r4 import DATA


class Binding(NamedTuple):
    value_set: str
    codes: frozenset[tuple[str, str]]


@cache
def by_type() -> dict[str, dict[str, Binding]]:
    """Schema definition → element → its required binding."""
    data = orjson.loads((DATA / "required-codings.json").read_bytes())["bindings"]
    return {holder: {element: Binding(spec["valueSet"].split("|")[0], frozenset(map(tuple, spec["codes"])))
                     for element, spec in elements.items()}
            for holder, elements in data.items()}


def _conforms(value: Any, codes: frozenset[tuple[str, str]]) -> bool:
    if not isinstance(value, dict):
        return True  # the schema has judged its JSON type
    codings = value.get("coding") if "coding" in value or "text" in value else [value]
    return any(isinstance(c, dict) and (c.get("system"), c.get("code")) in codes for c in codings or ())


def check(node: dict[str, Any], bindings: dict[str, Binding]) -> tuple[str, str] | None:
    """(element, message) for the first element of `node` outside its required value set, or None."""
    for element, binding in bindings.items():
        if element not in node:
            continue
        values = node[element] if isinstance(node[element], list) else [node[element]]
        for value in values:
            if not _conforms(value, binding.codes):
                shown = ", ".join(sorted(f"{system}|{code}" for system, code in binding.codes))
                return element, (f"no coding of the required value set {binding.value_set} ({shown})")
    return None
