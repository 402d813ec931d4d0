"""History Bundles (FHIR R4 §3.1.0.9): of one resource, of a type, or of the whole server.

Parameters: `_count`, `_since` (versions updated at or after the instant), `_at` (versions
current at some point of the date's range), `_lastUpdated` (a date with the prefixes
eq ne gt lt ge le sa eb, repeatable, applied to each version's lastUpdated) and the
paging `_cursor` this module writes. Any other parameter is refused (400) naming it.

Each entry carries `request.method` and `request.url` as the version was written (POST
`Type`; PUT, PATCH and DELETE `Type/id`) and `response.status` (201 for the version that
created the resource, 200 for an update, 204 for a deletion), `etag` and `lastModified`;
deletions carry no resource. Pages are newest first; the first page fixes the instant the
history is read up to, so later pages neither repeat nor skip versions when writes arrive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import ColumnElement, Connection, and_, not_

from service.db import now_us
from service.errors import InvalidRequest
from service.params import date_param, page_size
from service.store import repository
from service.store.repository import Version
from service.store.schema import history, resources

PARAMS = ("_count", "_since", "_at", "_lastUpdated", "_cursor", "_format")
_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")


@dataclass
class HistoryQuery:
    count: int
    till: int
    offset: int = 0
    at: tuple[int, int] | None = None
    where: list[ColumnElement[bool]] = field(default_factory=list)
    echo: list[tuple[str, str]] = field(default_factory=list)



def _last_updated(value: str) -> ColumnElement[bool]:
    prefix, text = (value[:2], value[2:]) if value[:2] in _PREFIXES else ("eq", value)
    low, high = date_param("_lastUpdated", text)
    at = history.c.last_updated
    within = and_(at >= low, at <= high)
    return {"eq": within, "ne": not_(within), "gt": at > high, "sa": at > high, "lt": at < low, "eb": at < low,
            "ge": at >= low, "le": at <= high}[prefix]


def parse(args: list[tuple[str, str]], *, default_count: int, max_count: int) -> HistoryQuery:
    """The history parameters of a request; 400 naming any parameter history does not take."""
    query = HistoryQuery(count=default_count, till=now_us())
    for name, value in args:
        if name not in PARAMS:
            raise InvalidRequest(f"Unknown or unsupported history parameter {name!r} (history takes "
                                 f"{', '.join(PARAMS[:4])})", expression=name)
        if name == "_count":
            query.count = page_size(value, max_count)
        elif name == "_since":
            query.where.append(history.c.last_updated >= date_param("_since", value)[0])
        elif name == "_at":
            query.at = date_param("_at", value)
        elif name == "_lastUpdated":
            query.where.append(_last_updated(value))
        elif name == "_cursor":
            till, _, offset = value.partition(".")
            if not (till.isdigit() and offset.isdigit() and len(till) <= 18 and len(offset) <= 18):
                raise InvalidRequest("The paging cursor is invalid", expression="_cursor")
            query.till, query.offset = int(till), int(offset)
        if name not in ("_cursor", "_format"):
            query.echo.append((name, value))
    query.where.append(history.c.last_updated <= query.till)
    return query


def read(conn: Connection, query: HistoryQuery, resource_type: str | None = None,
         resource_id: str | None = None) -> tuple[list[Version], bool]:
    """One page of versions (of a resource, a type or every type) and whether more follow."""
    where = list(query.where)
    if resource_type is not None:
        where.append(resources.c.type == resource_type)
    if resource_id is not None:
        where.append(resources.c.id == resource_id)
    if query.count == 0:
        return [], False
    found = repository.versions(conn, where=where, at=query.at, limit=query.count + 1, offset=query.offset)
    return found[:query.count], len(found) > query.count


def _entry(base: str, version: Version) -> dict[str, Any]:
    stored = version.stored
    url = f"{stored.type}/{stored.id}"
    entry: dict[str, Any] = {"fullUrl": f"{base}/{url}"}
    if not stored.deleted:
        entry["resource"] = stored.resource()
    method = stored.method or ("DELETE" if stored.deleted else "PUT")
    status = "204 No Content" if stored.deleted else ("201 Created" if version.created else "200 OK")
    entry["request"] = {"method": method, "url": stored.type if method == "POST" else url}
    entry["response"] = {"status": status, "etag": stored.etag, "lastModified": stored.last_modified}
    return entry


def bundle(base: str, path: str, query: HistoryQuery, found: list[Version], more: bool) -> dict[str, Any]:
    """The history Bundle of one page; `path` like `/Patient/_history`."""
    def link(relation: str, params: list[tuple[str, str]]) -> dict[str, str]:
        encoded = urlencode(params, safe=":|,")
        return {"relation": relation, "url": f"{base}{path}" + (f"?{encoded}" if encoded else "")}

    here = [*query.echo, ("_count", str(query.count))] if ("_count", str(query.count)) not in query.echo \
        else list(query.echo)
    links = [link("self", [*here, ("_cursor", f"{query.till}.{query.offset}")] if query.offset else here)]
    if more:
        links.append(link("next", [*here, ("_cursor", f"{query.till}.{query.offset + query.count}")]))
    result: dict[str, Any] = {"resourceType": "Bundle", "type": "history"}
    if query.offset == 0 and not more and query.count > 0:  # `_count=0` reads nothing: no total
        result["total"] = len(found)
    result["link"] = links
    if found:
        result["entry"] = [_entry(base, version) for version in found]
    return result


def patients(found: list[Version]) -> set[str]:
    """The patients whose data a page of history shows (whom its audit entry names)."""
    return {v.stored.patient_id for v in found if v.stored.patient_id}

