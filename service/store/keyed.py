"""Resources selected by their (type, id) keys."""
from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import ColumnElement, and_, false, or_

from service.store.schema import resources


def by_type_and_id(pairs: Iterable[tuple[str, str]]) -> ColumnElement[bool]:
    """Rows for these (type, id) pairs, grouped per type so both databases use the unique
    (type, id) index (a row-value `IN (VALUES …)` makes SQLite scan the whole index)."""
    ids: dict[str, list[str]] = {}
    for resource_type, resource_id in pairs:
        ids.setdefault(resource_type, []).append(resource_id)
    return or_(false(), *(and_(resources.c.type == t, resources.c.id.in_(sorted(v))) for t, v in sorted(ids.items())))
