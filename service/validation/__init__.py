"""Validate incoming resources (once, at ingest): FHIR R4 and the R4B models both.

Validation costs far more than parsing, so it happens here only: what is stored is
known valid, and outputs are plain dicts checked against the R4 schema in tests
(tests/test_r4_schema.py). In order:

1. the resource type exists in R4 and in R4B (`model_for`);
2. the R4 JSON schema (`r4`): JSON types without coercion, only R4 elements, primitive
   patterns (no empty strings), required bindings that the schema enumerates;
3. the empty-element rules, invariants and required bindings on CodeableConcept and Coding
   (`invariants`, with `narrative` for txt-1/txt-2 and `bindings`);
4. the R4B model of fhir.resources (cardinalities, choice types, R4B's own rules).

The first problem found is refused with InvalidRequest: an OperationOutcome issue code
(`structure`, `value`, `code-invalid`, `required`, `invariant`) and the element's path.
"""
from __future__ import annotations

import re
from functools import cache
from typing import Any

from pydantic import ValidationError

from service.errors import InvalidRequest, NotFound
from service.validation import bindings, invariants, r4

_ABSTRACT = frozenset({"Resource", "DomainResource"})


def model_for(resource_type: str) -> type | None:
    """The R4B model class of a resource type, or None unless both FHIR R4 and R4B define it."""
    if resource_type not in r4.resource_types() or resource_type in _ABSTRACT:
        return None
    return _model(resource_type)


@cache
def _model(resource_type: str) -> type | None:
    # Imported here: the models take a noticeable time to import, and many commands never validate.
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.resource import Resource

    try:
        model = get_fhir_model_class(resource_type)
    except (ValueError, KeyError, AttributeError):
        return None
    # Data types (HumanName, …) are models too; only resources may be stored.
    return model if issubclass(model, Resource) and model.get_resource_type() == resource_type else None


def load() -> None:
    """Load everything validation reads, once per process, so that no request pays for it: the R4
    schema's compiled validator and its table of element types, the invariants' texts and the
    bindings' tables, and every R4B model, data types included. fhir.resources imports the model
    of an element's type the first time a resource holding one is validated: loading resource
    models alone left a server's first Bundles 2–3× slower than the next ones."""
    from fhir.resources.R4B import fhirtypes, get_fhir_model_class

    r4.validator()
    r4.element_types()
    invariants.definitions()
    bindings.by_type()
    for name in dir(fhirtypes):
        if name.endswith("Type") and name[:1].isupper():
            try:
                get_fhir_model_class(name[:-4])
            except ValueError:  # a primitive type: no model of its own
                continue


#: A version id as this server writes them: 1, 2, … (at most 9 digits, within the column's range).
VERSION_NUMBER = re.compile(r"[1-9][0-9]{0,8}")


def version_number(text: str, what: str) -> int:
    """The version a URL names; NotFound for anything this server never wrote as a version id."""
    if not VERSION_NUMBER.fullmatch(text):
        raise NotFound(f"{text!r} is not a version of {what}")
    return int(text)


def check_type(resource_type: str) -> None:
    """Refuse a URL that names no resource type of FHIR R4 and R4B (404, as the spec asks)."""
    if model_for(resource_type) is None:
        raise NotFound(f"Unknown resource type {resource_type!r}")


#: pydantic error types (fhir_core prefixes its own) → FHIR issue codes; any other is `value`.
_PYDANTIC_CODES = {"missing": "required", "extra_forbidden": "structure"}


def _issue_code(error_type: str) -> str:
    return _PYDANTIC_CODES.get(error_type.rpartition(".")[2], "value")


def _path(resource_type: str, loc: tuple[Any, ...]) -> str:
    parts = [resource_type]
    for item in loc:
        if isinstance(item, int):
            parts[-1] += f"[{item}]"
        elif item != "resource_type":
            parts.append(str(item))
        else:
            parts.append("resourceType")
    return ".".join(parts)


def validate(resource: Any, expected_type: str | None = None, *, where: str = "") -> str:
    """Check one resource; returns its type, or raises InvalidRequest naming the failing path.

    `where` is the FHIRPath of the resource in its request (`Bundle.entry[2].resource`): the
    issue's expression then starts there (`Bundle.entry[2].resource.gender`)."""
    prefix = f"{where}: " if where else ""

    def refuse(path: str, message: str, code: str) -> InvalidRequest:
        expression = f"{where}{path[len(resource_type):]}" if where else path
        return InvalidRequest(f"{prefix}{path}: {message}", expression=expression, code=code)

    if not isinstance(resource, dict):
        raise InvalidRequest(f"{prefix}a resource must be a JSON object", code="structure")
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or model_for(resource_type) is None:
        raise InvalidRequest(f"{prefix}resourceType {resource_type!r} is not a resource type of FHIR R4",
                             expression="resourceType", code="not-supported")
    if expected_type is not None and resource_type != expected_type:
        raise InvalidRequest(f"{prefix}resourceType {resource_type!r} does not match the URL's {expected_type!r}",
                             expression="resourceType")
    if problem := r4.check(resource):
        raise refuse(problem.path, problem.message, problem.code)
    if breach := invariants.check(resource):
        raise refuse(breach.path, f"{breach.key}: {breach.message}" if breach.key else breach.message, breach.code)
    try:
        model_for(resource_type).model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise refuse(_path(resource_type, first["loc"]), f"{first['msg']}{more}", _issue_code(first["type"])) from None
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"{prefix}{resource_type}: {exc}", code="value") from None
    return resource_type
