"""Values of the request parameters that searches, histories, `$everything` and AuditEvent
searches share, each read one way: `_count` and a date or instant naming a range."""
from __future__ import annotations

from policies.fhirdates import DateFormatError, date_range
from service.errors import InvalidRequest


def page_size(value: str, max_count: int) -> int:
    """`_count`: a non-negative integer, clamped to `max_count` (FHIR lets a server return fewer);
    anything else is a 400 naming `_count`."""
    if not value.isdigit():
        raise InvalidRequest(f"_count must be a non-negative integer, got {value!r}", expression="_count")
    return max_count if len(value) > 9 else min(int(value), max_count)


def date_param(name: str, value: str) -> tuple[int, int]:
    """The range (µs, both ends included) a date or instant parameter `name` names; 400 naming it otherwise."""
    try:
        return date_range(value)
    except (DateFormatError, ValueError) as exc:
        raise InvalidRequest(f"{name}: {value!r} is not a FHIR date or instant ({exc})", expression=name) from None
