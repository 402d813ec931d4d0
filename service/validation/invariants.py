"""FHIR R4 invariants, one Python check per invariant key, and the walk that applies them.

The keys, their texts and the specification's FHIRPath expressions are data
(data/invariants.json, generated from the R4 StructureDefinitions); each check below
computes that expression in Python (FHIRPath evaluated per element would cost more than the
rest of the ingest). The walk follows the element types of the R4 schema, so a check keyed
on a type (qty-3 on Quantity, Age, …) runs wherever that type occurs, contained resources
and Bundle entries included. It also refuses the empty elements FHIR JSON forbids (an empty
array, an object without a value or children: ele-1) and, through `bindings`, codings outside
the required value sets the schema does not enumerate.
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import cache
from typing import Any, NamedTuple

import orjson

from service.validation import bindings, narrative
from service.validation.r4 import DATA, RESOURCE, element_types, resource_types


class Breach(NamedTuple):
    """An invariant (or the empty-element rule) that does not hold, where, and why."""

    code: str
    key: str | None
    path: str
    message: str


@cache
def definitions() -> dict[str, dict[str, Any]]:
    """The specification's text of each invariant checked here (key → path, human, expression)."""
    return orjson.loads((DATA / "invariants.json").read_bytes())


def _has_value(node: dict[str, Any]) -> bool:
    return any(key.startswith("value") for key in node)


def _ext_1(node: dict[str, Any]) -> bool:
    """extension.exists() != value.exists()"""
    return ("extension" in node) != _has_value(node)


def _obs_6(node: dict[str, Any]) -> bool:
    """dataAbsentReason.empty() or value.empty()"""
    return "dataAbsentReason" not in node or not _has_value(node)


def _pat_1(node: dict[str, Any]) -> bool:
    """name.exists() or telecom.exists() or address.exists() or organization.exists()"""
    return any(key in node for key in ("name", "telecom", "address", "organization"))


def _qty_3(node: dict[str, Any]) -> bool:
    """code.empty() or system.exists()"""
    return "code" not in node or "system" in node


def _instant(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _per_1(node: dict[str, Any]) -> bool:
    """start.hasValue().not() or end.hasValue().not() or (start <= end)

    As FHIRPath compares them: two dateTimes with a time zone as instants, two dates (or
    partial dates) at their common precision; a comparison FHIRPath leaves empty (equal at the
    common precision, a date against a dateTime) does not break the invariant."""
    start, end = node.get("start"), node.get("end")
    if not isinstance(start, str) or not isinstance(end, str):
        return True
    if "T" in start and "T" in end:
        first, last = _instant(start), _instant(end)
        return first is None or last is None or first <= last
    if "T" in start or "T" in end:
        return True
    common = min(len(start), len(end))
    return start[:common] <= end[:common]


def _dom_2(node: dict[str, Any]) -> bool:
    """contained.contained.empty()"""
    return not any("contained" in item for item in node.get("contained", ()) if isinstance(item, dict))


def _dom_4(node: dict[str, Any]) -> bool:
    """contained.meta.versionId.empty() and contained.meta.lastUpdated.empty()"""
    return not any({"versionId", "lastUpdated"} & set(item.get("meta") or ())
                   for item in node.get("contained", ()) if isinstance(item, dict))


Check = Callable[[dict[str, Any]], bool]
#: Checks by the type they constrain (schema definition names: backbone elements are `Type_Part`).
BY_TYPE: dict[str, tuple[tuple[str, Check], ...]] = {
    "Extension": (("ext-1", _ext_1),),
    "Observation": (("obs-6", _obs_6),),
    "Patient_Contact": (("pat-1", _pat_1),),
    "Period": (("per-1", _per_1),),
    **{quantity: (("qty-3", _qty_3),) for quantity in ("Quantity", "Age", "Count", "Distance", "Duration")},
}
#: Checks every resource (DomainResource) gets.
ON_RESOURCES: tuple[tuple[str, Check], ...] = (("dom-2", _dom_2), ("dom-4", _dom_4))


def _empty(node: dict[str, Any]) -> bool:
    """ele-1 (`hasValue() or (children().count() > id.count())`) fails: no child but an id."""
    return not node or (len(node) == 1 and "id" in node)


def _element(node: dict[str, Any], type_name: str | None, types: dict[str, dict[str, str]],
             resources: frozenset[str], coded: dict[str, dict[str, bindings.Binding]]
             ) -> tuple[Breach, list[str]] | None:
    """The first breach in an element and the path to it below the element (built only on a breach)."""
    if type_name == RESOURCE:
        type_name = node.get("resourceType")
    if _empty(node):
        return Breach("invariant", "ele-1", "", f"{definitions()['ele-1']['human']} (an empty element)"), []
    children = types.get(type_name, _NONE) if type_name else _NONE
    for key, value in node.items():
        if type(value) is list:
            if not value:
                return Breach("structure", None, "", "an empty array (FHIR JSON has no empty arrays: leave the "
                                                     "element out)"), [f".{key}"]
            child = children.get(key)
            for index, item in enumerate(value):
                if type(item) is dict and (found := _element(item, child, types, resources, coded)):
                    found[1].append(f".{key}[{index}]")
                    return found
        elif type(value) is dict and (found := _element(value, children.get(key), types, resources, coded)):
            found[1].append(f".{key}")
            return found
    if type_name in coded and (outside := bindings.check(node, coded[type_name])):
        return Breach("code-invalid", None, "", outside[1]), [f".{outside[0]}"]
    for key, check in BY_TYPE.get(type_name, ()) if type_name else ():
        if not check(node):
            return Breach("invariant", key, "", definitions()[key]["human"]), []
    if type_name in resources:
        for key, check in ON_RESOURCES:
            if not check(node):
                return Breach("invariant", key, "", definitions()[key]["human"]), []
    elif type_name == "Narrative" and isinstance(node.get("div"), str) and (broken := narrative.check(node["div"])):
        return Breach("invariant", broken.key, "", f"{broken.message} ({definitions()[broken.key]['human']})"), [
            ".div"]
    return None


_NONE: dict[str, str] = {}


def check(resource: dict[str, Any]) -> Breach | None:
    """The first invariant, empty-element rule or required coding a schema-valid resource breaks, or None."""
    found = _element(resource, resource["resourceType"], element_types(), resource_types(), bindings.by_type())
    if found is None:
        return None
    breach, below = found
    return breach._replace(path=resource["resourceType"] + "".join(reversed(below)))
