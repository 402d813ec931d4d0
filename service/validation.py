"""Validate incoming resources against the FHIR R4B models (once, at ingest).

Validation costs far more than parsing, so it happens here only: what is stored is
known valid, and outputs are plain dicts checked against the models in tests.
"""
from __future__ import annotations

import re
from functools import cache
from typing import Any

from pydantic import ValidationError

from service.errors import InvalidRequest, NotFound

_ABSTRACT = frozenset({"Resource", "DomainResource"})


@cache
def model_for(resource_type: str) -> type | None:
    """The R4B model class of a resource type, or None if FHIR R4B has no such resource."""
    if not resource_type[:1].isupper() or resource_type in _ABSTRACT:
        return None
    # Imported here: the models take a noticeable time to import, and many commands never validate.
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.resource import Resource

    try:
        model = get_fhir_model_class(resource_type)
    except (ValueError, KeyError, AttributeError):
        return None
    # Data types (HumanName, …) are models too; only resources may be stored.
    return model if issubclass(model, Resource) and model.get_resource_type() == resource_type else None


#: A version id as this server writes them: 1, 2, … (at most 9 digits, within the column's range).
VERSION_NUMBER = re.compile(r"[1-9][0-9]{0,8}")


def version_number(text: str, what: str) -> int:
    """The version a URL names; NotFound for anything this server never wrote as a version id."""
    if not VERSION_NUMBER.fullmatch(text):
        raise NotFound(f"{text!r} is not a version of {what}")
    return int(text)


def check_type(resource_type: str) -> None:
    """Refuse a URL that names no FHIR R4B resource type (404, as the spec asks)."""
    if model_for(resource_type) is None:
        raise NotFound(f"Unknown resource type {resource_type!r}")


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
    """Check one resource; returns its type, or raises InvalidRequest naming the failing path."""
    prefix = f"{where}: " if where else ""
    if not isinstance(resource, dict):
        raise InvalidRequest(f"{prefix}a resource must be a JSON object")
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or model_for(resource_type) is None:
        raise InvalidRequest(f"{prefix}resourceType {resource_type!r} is not a FHIR R4B resource type",
                             expression="resourceType")
    if expected_type is not None and resource_type != expected_type:
        raise InvalidRequest(f"{prefix}resourceType {resource_type!r} does not match the URL's {expected_type!r}",
                             expression="resourceType")
    try:
        model_for(resource_type).model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = _path(resource_type, first["loc"])
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise InvalidRequest(f"{prefix}{path}: {first['msg']}{more}", expression=path) from None
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"{prefix}{resource_type}: {exc}") from None
    return resource_type
