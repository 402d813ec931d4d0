"""`Patient/{id}/$everything` (FHIR R4 Patient-everything): the patient's compartment.

What is returned: the Patient and every current resource whose patient compartment is
that patient (the `patient_id` computed at ingest), ordered by type then id; and, with each
page (`search.mode` `include`), the current resources its entries refer to that are in no
patient's compartment (Practitioners, Organizations, Medications…): another patient's
resources are never added.

Parameters, applied to both: `_since` (resources updated at or after the instant), `_type`
(comma-separated types, repeatable), `start` and `end` (dates: a resource whose clinical
date — the one consent's data periods are judged on — ends before `start` or begins after
`end` is left out; one without a clinical date is kept), `_count` and the paging `_cursor`
this module writes (the type and id of the last entry of the page: a public name, nothing
internal). Other parameters are refused (400) naming them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson
from sqlalchemy import ColumnElement, Connection, and_, false, or_, select

from service.errors import InvalidRequest
from service.params import date_param, page_size
from service.references import targets
from service.store.keyed import by_type_and_id
from service.store.schema import resources
from service.validation import model_for

PARAMS = ("_since", "_type", "start", "end", "_count", "_cursor", "_format")


@dataclass
class EverythingQuery:
    count: int
    where: list[ColumnElement[bool]] = field(default_factory=list)
    after: tuple[str, str] | None = None
    echo: list[tuple[str, str]] = field(default_factory=list)



def parse(args: list[tuple[str, str]], *, default_count: int, max_count: int) -> EverythingQuery:
    query = EverythingQuery(count=default_count)
    for name, value in args:
        if name not in PARAMS:
            raise InvalidRequest(f"$everything does not support the parameter {name!r} (it takes "
                                 f"{', '.join(PARAMS[:5])})", expression=name)
        if name == "_count":
            query.count = page_size(value, max_count)
        elif name == "_since":
            query.where.append(resources.c.last_updated >= date_param(name, value)[0])
        elif name == "start":
            query.where.append(or_(resources.c.clinical_high.is_(None),
                                   resources.c.clinical_high >= date_param(name, value)[0]))
        elif name == "end":
            query.where.append(or_(resources.c.clinical_low.is_(None),
                                   resources.c.clinical_low <= date_param(name, value)[1]))
        elif name == "_type":
            types = [t.strip() for t in value.split(",") if t.strip()]
            unknown = [t for t in types if model_for(t) is None]
            if unknown or not types:
                raise InvalidRequest(f"_type: {', '.join(unknown) or repr(value)} is not a FHIR resource type",
                                     expression="_type")
            query.where.append(resources.c.type.in_(types))
        elif name == "_cursor":
            kind, _, last = value.partition("/")
            if not kind or not last:
                raise InvalidRequest("The paging cursor is invalid", expression="_cursor")
            query.after = (kind, last)
        if name not in ("_cursor", "_format"):
            query.echo.append((name, value))
    return query


_COLUMNS = (resources.c.type, resources.c.id, resources.c.json, resources.c.patient_id)


def page(conn: Connection, patient_id: str, query: EverythingQuery) -> tuple[list[Any], list[Any], bool]:
    """One page of the compartment's current resources, the resources outside any compartment they
    refer to, and whether more pages follow."""
    if query.count == 0:
        return [], [], False
    statement = (select(*_COLUMNS)
                 .where(resources.c.patient_id == patient_id, resources.c.deleted == false(), *query.where)
                 .order_by(resources.c.type, resources.c.id).limit(query.count + 1))
    if query.after is not None:
        kind, last = query.after
        statement = statement.where(or_(resources.c.type > kind, and_(resources.c.type == kind, resources.c.id > last)))
    rows = conn.execute(statement).all()
    matches = rows[:query.count]
    wanted: set[tuple[str, str]] = set()
    for row in matches:
        wanted |= targets(orjson.loads(row.json))
    wanted -= {(row.type, row.id) for row in matches}
    included = conn.execute(select(*_COLUMNS).where(
        by_type_and_id(sorted(wanted)), resources.c.patient_id.is_(None), resources.c.deleted == false(),
        *query.where).order_by(resources.c.type, resources.c.id)).all() if wanted else []
    return matches, included, len(rows) > query.count


def bundle(base: str, path: str, query: EverythingQuery, rows: list[Any], included: list[Any],
           more: bool) -> dict[str, Any]:
    """A searchset Bundle of one page; `path` like `/Patient/123/$everything`."""
    def link(relation: str, params: list[tuple[str, str]]) -> dict[str, str]:
        encoded = urlencode(params, safe=":|,/")
        return {"relation": relation, "url": f"{base}{path}" + (f"?{encoded}" if encoded else "")}

    here = list(query.echo)
    if not any(name == "_count" for name, _ in here):
        here.append(("_count", str(query.count)))
    current = [*here, ("_cursor", f"{query.after[0]}/{query.after[1]}")] if query.after else here
    links = [link("self", current)]
    if more:
        links.append(link("next", [*here, ("_cursor", f"{rows[-1].type}/{rows[-1].id}")]))
    result: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if query.after is None and not more and query.count > 0:  # `_count=0` reads nothing: no total
        result["total"] = len(rows)
    result["link"] = links
    entries = [{"fullUrl": f"{base}/{row.type}/{row.id}", "resource": orjson.Fragment(row.json),
                "search": {"mode": mode}} for mode, found in (("match", rows), ("include", included)) for row in found]
    if entries:
        result["entry"] = entries
    return result
