"""The FHIR R4 JSON schema (data/fhir-r4.schema.json) and what is read from it: the R4
resource types, the type of each complex element, and a strict validator of raw JSON.

The schema is the specification's own (see data/README.md). It refuses a JSON type that
is not the element's (`"12"` for a decimal, `"true"` for a boolean), an element R4 does not
define, a string failing its primitive type's pattern (which also refuses `""`), and a code
outside an enumerated required binding: the schema writes the codes of each `code` element
bound to a required value set as an `enum`.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import orjson

DATA = Path(__file__).resolve().parent / "data"
#: The element whose value is any resource (contained, Bundle.entry.resource, …).
RESOURCE = "ResourceList"


@cache
def schema() -> dict[str, Any]:
    """The R4 JSON schema, as shipped."""
    return orjson.loads((DATA / "fhir-r4.schema.json").read_bytes())


@cache
def resource_types() -> frozenset[str]:
    """Every resource type of FHIR R4 (the schema's discriminator)."""
    return frozenset(schema()["discriminator"]["mapping"])


def _target(prop: dict[str, Any]) -> str | None:
    ref = prop.get("$ref") or prop.get("items", {}).get("$ref")
    return ref.rsplit("/", 1)[1] if ref else None


@cache
def element_types() -> dict[str, dict[str, str]]:
    """For each complex type, backbone element and resource: its elements whose values are
    objects, with their type (`RESOURCE` for an element holding any resource)."""
    definitions = schema()["definitions"]
    complex_types = {name for name, d in definitions.items() if "properties" in d} | {RESOURCE}
    return {name: {prop: target for prop, spec in d["properties"].items()
                   if (target := _target(spec)) in complex_types}
            for name, d in definitions.items() if "properties" in d}


def _dispatching(definitions: dict[str, Any]) -> dict[str, Any]:
    """The schema's definitions with `ResourceList` choosing the definition by `resourceType`
    (the published `oneOf` tries every resource and reports only that none matched)."""
    types = sorted(resource_types())
    return {**definitions, RESOURCE: {
        "type": "object", "required": ["resourceType"],
        "properties": {"resourceType": {"enum": types}},
        "allOf": [{"if": {"properties": {"resourceType": {"const": name}}},
                   "then": {"$ref": f"#/definitions/{name}"}} for name in types]}}


@cache
def validator() -> Any:
    """The compiled validator of the R4 schema, `ResourceList` dispatching on `resourceType`."""
    import jsonschema_rs  # compiled once per process (~0.2 s)

    return jsonschema_rs.Draft7Validator({"$ref": f"#/definitions/{RESOURCE}",
                                          "definitions": _dispatching(schema()["definitions"])})


class Problem(NamedTuple):
    """The first way a resource breaks the schema: FHIR issue code, element path, what is wrong."""

    code: str
    path: str
    message: str


def fhir_path(resource_type: str, location: Any) -> str:
    """`Patient` + ["name", 0, "family"] → `Patient.name[0].family`."""
    text = resource_type
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _describe(error: Any, resource_type: str) -> Problem:
    import jsonschema_rs

    kind, value = error.kind, error.instance
    path = fhir_path(resource_type, error.instance_path)
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Enum):
        codes = ", ".join(map(str, kind.options))
        return Problem("code-invalid", path,
                       f"{value!r} is not a code of the element's required value set ({codes})")
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Type):
        return Problem("structure", path, f"{orjson.dumps(value).decode()} has the wrong JSON type for this "
                                          "element (FHIR JSON has no coercion: numbers and booleans are "
                                          "written unquoted, strings quoted)")
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.AdditionalProperties):
        names = ", ".join(kind.unexpected)
        return Problem("structure", f"{path}.{kind.unexpected[0]}", f"{names}: no such element in FHIR R4")
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Required):
        return Problem("required", path, error.message)
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Pattern):
        if value == "":
            return Problem("structure", path, "an empty string (FHIR JSON has no empty strings: leave the "
                                              "element out)")
        return Problem("value", path, f"{value!r} is not a valid value of this element's type")
    return Problem("structure", path, error.message)


def check(resource: dict[str, Any]) -> Problem | None:
    """The first problem the R4 schema finds in a resource (whose `resourceType` is an R4 type), or None."""
    schema_validator = validator()
    if schema_validator.is_valid(resource):
        return None
    return _describe(next(iter(schema_validator.iter_errors(resource))), resource["resourceType"])
