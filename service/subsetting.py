"""`_summary` and `_elements`: which top-level elements of a resource a search returns.

The element lists come from the FHIR models' metadata (fhir.resources, the R4B models
Passerelle validates with, `service.validation.model_for`), never typed by hand: an element
is a summary element when its field carries the StructureDefinition's isSummary flag
(`summary_element_property`), and mandatory when the model requires it (min 1: a required
field, `element_required` for a primitive, `one_of_many_required` for a choice). A choice
element is named by its base name (`value`) or by one of its types (`valueQuantity`).

- `_summary=true`: the summary elements; `text`: `text` and the mandatory elements;
  `data`: everything but `text`; `false`: everything; (`count` is a total, search.py).
- `_elements=a,b`: those elements and the mandatory ones.

`resourceType`, `id` and `meta` are always kept, as is the `_x` sibling (a primitive's id and
extensions) of each kept element `x`. A subsetted resource carries the SUBSETTED tag in
`meta.tag`, so that nobody mistakes it for the whole resource. Subsetting only removes
elements: on the research view it runs on the de-identified resource (service/release.py),
so it can never bring back an element de-identification removed.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from service.errors import InvalidRequest
from service.validation import model_for

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED",
             "display": "subsetted"}
SUMMARY_VALUES = ("true", "text", "data", "count", "false")
_ALWAYS = frozenset({"resourceType", "id", "meta"})


@dataclass(frozen=True)
class _Catalog:
    """The top-level elements of one resource type, by JSON name."""

    #: Each JSON name's element (its base name): `valueQuantity` → `value`, `status` → `status`.
    element_of: dict[str, str]
    summary: frozenset[str]
    mandatory: frozenset[str]


@cache
def _catalog(resource_type: str) -> _Catalog:
    model = model_for(resource_type)
    if model is None:
        raise InvalidRequest(f"{resource_type!r} is not a resource type this server holds")
    element_of: dict[str, str] = {}
    summary: set[str] = set()
    mandatory: set[str] = set()
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if not extra.get("element_property"):
            continue
        json_name = info.alias or name
        base = str(extra.get("one_of_many") or json_name)
        element_of[json_name] = base
        if extra.get("summary_element_property"):
            summary.add(base)
        if info.is_required() or extra.get("element_required") or extra.get("one_of_many_required"):
            mandatory.add(base)
    return _Catalog(element_of, frozenset(summary), frozenset(mandatory))


@dataclass(frozen=True)
class Subset:
    """What a search asked to keep of each resource: a `_summary` mode or an `_elements` list
    (element base names), never both."""

    summary: str | None = None
    elements: frozenset[str] | None = None

    def applies(self, *, match: bool) -> bool:
        """Whether it subsets a match (`match`) or an included resource (which `_elements` leaves whole)."""
        return match or self.elements is None

    def apply(self, resource: dict[str, Any], *, match: bool) -> dict[str, Any]:
        """The resource as this subset returns it, subsetted ones tagged. Changes `resource` in place."""
        if not self.applies(match=match):
            return resource
        catalog = _catalog(resource["resourceType"])
        if self.summary == "data":
            if "text" not in resource:
                return resource
            resource.pop("text")
        else:
            wanted = _ALWAYS | catalog.mandatory | (
                catalog.summary if self.summary == "true" else {"text"} if self.summary == "text"
                else self.elements or frozenset())
            for key in list(resource):
                name = key[1:] if key.startswith("_") else key
                if key not in _ALWAYS and catalog.element_of.get(name, name) not in wanted:
                    del resource[key]
        meta = resource["meta"] = dict(resource.get("meta") or {})
        meta["tag"] = [*(meta.get("tag") or []), SUBSETTED]
        return resource


def summary(value: str) -> str | None:
    """A `_summary` value, checked; None for `false` and `count` (which subset nothing)."""
    if value not in SUMMARY_VALUES:
        raise InvalidRequest(f"_summary must be one of {', '.join(SUMMARY_VALUES)}", expression="_summary")
    return None if value in ("false", "count") else value


def elements(resource_type: str, value: str) -> frozenset[str]:
    """The element base names an `_elements` value lists (`Type.element` accepted for the searched
    type), each checked against the type's elements."""
    catalog = _catalog(resource_type)
    names = set()
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        name = item.removeprefix(f"{resource_type}.")
        if name in _ALWAYS:
            continue
        if name not in catalog.element_of and name not in catalog.element_of.values():
            raise InvalidRequest(f"_elements: {resource_type} has no element {item!r}", expression="_elements")
        names.add(catalog.element_of.get(name, name))
    return frozenset(names)
