"""FHIR search: parse the parameters, build one SQL statement, page by keyset.

Every filter is a `pk IN (…)` subquery on an index table, so the database answers from
indexes and never scans stored JSON. A search in row order with a `system|code` token
filter is driven by that filter's index entries, which are in row order already: a page
reads about as many rows as it returns, however many match. Pages are cut by a keyset
cursor (the last row's sort key), never by OFFSET: deep pages cost the same as the
first, and each matching resource appears exactly once across pages.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    case,
    false,
    func,
    not_,
    or_,
    select,
    true,
)

from policies.fhirdates import DateFormatError, date_range
from service.errors import InvalidRequest, NotSupported
from service.store import repository
from service.store.indexer import normalise, parse_reference
from service.store.schema import idx_date, idx_quantity, idx_reference, idx_string, idx_token, resources
from service.store.searchparams import SearchParam, params_for

#: Parameters that shape the result rather than filter it.
RESULT_PARAMS = frozenset({"_count", "_sort", "_total", "_summary", "_include", "_format", "_pretty", "_cursor"})
_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
_MODIFIERS = {
    "token": {"", "not", "missing"},
    "string": {"", "exact", "contains", "missing"},
    "date": {"", "missing"},
    "quantity": {"", "missing"},
    "reference": {"", "missing"},
}
_TABLE_OF = {"token": idx_token, "string": idx_string, "date": idx_date, "quantity": idx_quantity,
             "reference": idx_reference}
#: The index entries that drive a search (`Driver`).
_DRIVER = idx_token.alias("driver")


@dataclass(frozen=True)
class Driver:
    """A filter whose index entries can drive the search in row order: one `system|code` (or
    `|code`) token value, which each resource has at most one entry for (the indexer keeps one
    per distinct value). `filter` is the clause it stands for; `entries` selects its entries
    in `_DRIVER`, whose (param, code, system, resource_pk) index lists them by row number."""

    filter: ColumnElement[bool]
    entries: tuple[ColumnElement[bool], ...]


@dataclass(frozen=True)
class SortKey:
    """One `_sort` component: a column or a per-resource aggregate of an index table."""

    name: str
    descending: bool


@dataclass
class Query:
    """A parsed search: what to match, how to order it, what to return."""

    resource_type: str
    where: list[ColumnElement[bool]] = field(default_factory=list)
    sort: list[SortKey] = field(default_factory=list)
    count: int = 20
    total: bool = False
    summary_count: bool = False
    includes: list[tuple[SearchParam, str | None]] = field(default_factory=list)
    #: The filter the statement starts from, when one can (`Driver`).
    driver: Driver | None = None
    #: The parameters kept, in order, for the self link (unknown ones dropped when lenient).
    echo: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Page:
    """One page of matches plus the included resources and paging anchors."""

    rows: list[Any]
    included: list[Any]
    total: int | None
    next_key: list[Any] | None
    previous_key: list[Any] | None


# -- parsing -----------------------------------------------------------------------------------


def parse(resource_type: str, args: Sequence[tuple[str, str]], *, default_count: int, max_count: int,
          strict: bool = True) -> Query:
    """Turn (name, value) pairs into a Query; unknown or malformed parameters → InvalidRequest."""
    known = params_for(resource_type)
    query = Query(resource_type, count=default_count)
    for raw_name, value in args:
        name, _, modifier = raw_name.partition(":")
        if name in RESULT_PARAMS:
            _result_param(query, known, name, modifier, value, max_count)
            if name not in ("_cursor", "_format", "_pretty"):
                query.echo.append((raw_name, value))
            continue
        param = known.get(name)
        if param is None or "." in name:
            if strict:
                reason = "chained parameters are not supported" if "." in name else \
                    f"{resource_type} has no search parameter {name!r}"
                raise InvalidRequest(f"Unknown search parameter {raw_name!r}: {reason}", expression=raw_name)
            continue
        if modifier not in _MODIFIERS[param.kind] and not (param.kind == "reference" and modifier[:1].isupper()):
            raise InvalidRequest(f"Modifier :{modifier} is not supported on {param.kind} parameter {name!r}",
                                 expression=raw_name)
        clause = _filter(param, modifier, value, raw_name)
        query.where.append(clause)
        query.echo.append((raw_name, value))
        query.driver = query.driver or _driver(param, modifier, value, clause)
    return query


def _driver(param: SearchParam, modifier: str, value: str, clause: ColumnElement[bool]) -> Driver | None:
    """The `Driver` a filter can be: a token parameter (not `_id`) with one value naming its code."""
    values = _split_values(value)
    if param.kind != "token" or param.name == "_id" or modifier or len(values) != 1:
        return None
    _, bar, code = values[0].partition("|")
    if not bar or not code:
        return None
    return Driver(clause, (_DRIVER.c.param == param.index_name, _token_clause(values[0], _DRIVER)))


def _result_param(query: Query, known: Mapping[str, SearchParam], name: str, modifier: str, value: str,
                  max_count: int) -> None:
    if name == "_count":
        if not value.isdigit():
            raise InvalidRequest(f"_count must be a non-negative integer, got {value!r}", expression="_count")
        query.count = min(int(value), max_count)
    elif name == "_total":
        if value not in ("none", "estimate", "accurate"):
            raise InvalidRequest("_total must be none, estimate or accurate", expression="_total")
        query.total = value != "none"
    elif name == "_summary":
        if value == "count":
            query.summary_count = query.total = True
        elif value != "false":
            raise NotSupported(f"_summary={value} is not supported (use count or false)", expression="_summary")
    elif name == "_sort":
        query.sort = [_sort_key(known, part) for part in value.split(",") if part]
    elif name == "_include":
        if modifier:
            raise NotSupported(f"_include:{modifier} is not supported", expression="_include")
        query.includes.append(_include(query.resource_type, known, value))


def _sort_key(known: Mapping[str, SearchParam], part: str) -> SortKey:
    descending = part.startswith("-")
    name = part.lstrip("-")
    param = known.get(name)
    if param is None or (param.kind == "reference" and name not in ("_id",)):
        raise InvalidRequest(f"Cannot sort by {name!r}", expression="_sort")
    return SortKey(name, descending)


def _include(resource_type: str, known: Mapping[str, SearchParam], value: str) -> tuple[SearchParam, str | None]:
    parts = value.split(":")
    if len(parts) not in (2, 3) or parts[0] != resource_type:
        raise InvalidRequest(f"_include={value!r} must be {resource_type}:<reference parameter>[:<type>]",
                             expression="_include")
    param = known.get(parts[1])
    if param is None or param.kind != "reference":
        raise InvalidRequest(f"_include: {parts[1]!r} is not a reference parameter of {resource_type}",
                             expression="_include")
    return param, parts[2] if len(parts) == 3 else param.target


# -- filters -----------------------------------------------------------------------------------


def _filter(param: SearchParam, modifier: str, value: str, raw_name: str) -> ColumnElement[bool]:
    if modifier == "missing":
        if value not in ("true", "false"):
            raise InvalidRequest(f"{raw_name} must be true or false", expression=raw_name)
        present = _exists(param, true())
        return not_(present) if value == "true" else present
    values = _split_values(value)
    if not values:
        raise InvalidRequest(f"Search parameter {raw_name!r} has an empty value", expression=raw_name)
    try:
        if param.name == "_id":
            return resources.c.id.in_(values)
        if param.name == "_lastUpdated":
            return or_(*(_date_clause(v, resources.c.last_updated, resources.c.last_updated) for v in values))
        if param.kind == "token":
            clause = _exists(param, or_(*(_token_clause(v) for v in values)))
            return not_(clause) if modifier == "not" else clause
        if param.kind == "string":
            return _exists(param, or_(*(_string_clause(v, modifier) for v in values)))
        if param.kind == "date":
            return _exists(param, or_(*(_date_clause(v, idx_date.c.low, idx_date.c.high) for v in values)))
        if param.kind == "quantity":
            return _exists(param, or_(*(_quantity_clause(v) for v in values)))
        return _exists(param, or_(*(_reference_clause(param, v, modifier) for v in values)))
    except (ValueError, InvalidOperation) as exc:
        raise InvalidRequest(f"Invalid value for {raw_name}: {exc}", expression=raw_name) from None


def _split_values(value: str) -> list[str]:
    """Split on unescaped commas (`\\,` is a literal comma)."""
    parts = re.split(r"(?<!\\),", value)
    return [p.replace("\\,", ",") for p in parts if p != ""]


def _exists(param: SearchParam, condition: ColumnElement[bool]) -> ColumnElement[bool]:
    """`pk IN (rows of the index table that match)`: an uncorrelated subquery, so the database
    starts from the (param, value) index instead of walking every resource of the type."""
    table = _TABLE_OF[param.kind]
    clauses = [table.c.param == param.index_name, condition]
    if param.kind == "reference" and param.target and param.index_name != param.name:
        clauses.append(table.c.target_type == param.target)
    return resources.c.pk.in_(select(table.c.resource_pk).where(*clauses))


def _token_clause(value: str, table: Any = idx_token) -> ColumnElement[bool]:
    if "|" not in value:
        return table.c.code == value
    system, code = value.split("|", 1)
    if not system:
        return and_(table.c.system.is_(None), table.c.code == code)
    if not code:
        return table.c.system == system
    return and_(table.c.system == system, table.c.code == code)


def _string_clause(value: str, modifier: str) -> ColumnElement[bool]:
    if modifier == "exact":
        return idx_string.c.exact == value
    needle = normalise(value)
    if modifier == "contains":
        escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return idx_string.c.value.like(f"%{escaped}%", escape="\\")
    # Prefix match as a range, so both databases use the (param, value) index.
    return and_(idx_string.c.value >= needle, idx_string.c.value < needle + "\U0010ffff")


def _prefix(value: str) -> tuple[str, str]:
    if value[:2] in _PREFIXES and not value[:2].isdigit():
        return value[:2], value[2:]
    return "eq", value


def _date_clause(value: str, low: Any, high: Any) -> ColumnElement[bool]:
    """Range semantics of FHIR date search (R4 §3.1.1.4.7): compare the two ranges."""
    prefix, text = _prefix(value)
    try:
        vlow, vhigh = date_range(text)
    except DateFormatError as exc:
        raise ValueError(str(exc)) from None
    contained = and_(low >= vlow, high <= vhigh)
    return {
        "eq": contained,
        "ne": not_(contained),
        "gt": high > vhigh,
        "lt": low < vlow,
        "ge": or_(high > vhigh, contained),
        "le": or_(low < vlow, contained),
        "sa": low > vhigh,
        "eb": high < vlow,
        "ap": and_(low <= vhigh + _approx(vlow, vhigh), high >= vlow - _approx(vlow, vhigh)),
    }[prefix]


def _approx(vlow: int, vhigh: int) -> int:
    # "ap": within 10% of the distance from now, at least the value's own precision.
    now = time.time_ns() // 1000
    return max(abs(now - vlow) // 10, vhigh - vlow)


def _quantity_clause(value: str) -> ColumnElement[bool]:
    prefix, text = _prefix(value)
    number_text, system, code = [*text.split("|"), "", ""][:3]
    number = Decimal(number_text)
    if not number.is_finite():
        raise ValueError(f"{number_text!r} is not a number")
    # Implicit precision: 5.4 means [5.35, 5.45).
    half = Decimal(1).scaleb(number.as_tuple().exponent) / 2
    lo, hi, n = float(number - half), float(number + half), float(number)
    column = idx_quantity.c.value
    clause = {
        "eq": and_(column >= lo, column < hi),
        "ne": or_(column < lo, column >= hi),
        "gt": column > n,
        "lt": column < n,
        "ge": column >= n,
        "le": column <= n,
        "sa": column > n,
        "eb": column < n,
        "ap": and_(column >= n - abs(n) * 0.1, column <= n + abs(n) * 0.1),
    }[prefix]
    if system:
        clause = and_(clause, idx_quantity.c.system == system)
    if code:
        clause = and_(clause, idx_quantity.c.code == code)
    return clause


def _reference_clause(param: SearchParam, value: str, modifier: str) -> ColumnElement[bool]:
    parsed = parse_reference(value)
    if parsed is None:
        raise ValueError(f"{value!r} is not a reference (Type/id, id, or an absolute URL)")
    target_type, target_id = parsed
    target_type = modifier or target_type
    clause = idx_reference.c.target_id == target_id
    if target_type:
        if param.target and target_type != param.target:
            raise ValueError(f"{param.name} refers to {param.target}, not {target_type}")
        clause = and_(clause, idx_reference.c.target_type == target_type)
    return clause


# -- ordering and keyset paging ----------------------------------------------------------------


def _sort_expression(resource_type: str, key: SortKey) -> ColumnElement[Any]:
    if key.name == "_id":
        return resources.c.id
    if key.name == "_lastUpdated":
        return resources.c.last_updated
    param = params_for(resource_type)[key.name]
    table = _TABLE_OF[param.kind]
    column = {"token": idx_token.c.code, "string": idx_string.c.value, "quantity": idx_quantity.c.value,
              "date": idx_date.c.high if key.descending else idx_date.c.low}[param.kind]
    # A resource with several values sorts by its first value in the requested direction.
    aggregate = func.max(column) if key.descending else func.min(column)
    return (select(aggregate).where(table.c.resource_pk == resources.c.pk, table.c.param == param.index_name)
            .scalar_subquery())


@dataclass(frozen=True)
class _Component:
    expression: ColumnElement[Any]
    descending: bool


def _components(query: Query) -> list[tuple[_Component, _Component | None]]:
    """Each sort key as (is-null flag, value): missing values sort last in either direction."""
    parts: list[tuple[_Component, _Component | None]] = []
    for key in query.sort:
        expr = _sort_expression(query.resource_type, key)
        if key.name in ("_id", "_lastUpdated"):
            parts.append((_Component(expr, key.descending), None))
        else:
            parts.append((_Component(case((expr.is_(None), 1), else_=0), False), _Component(expr, key.descending)))
    return parts


def _after(pairs: list[tuple[_Component, Any]], backwards: bool) -> ColumnElement[bool]:
    """Rows strictly after the anchor values in this order (or before, paging backwards)."""
    alternatives = []
    for i, (column, value) in enumerate(pairs):
        forward = column.descending == backwards
        beyond = column.expression > value if forward else column.expression < value
        alternatives.append(and_(*(c.expression == v for c, v in pairs[:i]), beyond))
    return or_(*alternatives)


def _ordered(query: Query, statement: Select[Any], anchor: list[Any] | None, backwards: bool
             ) -> tuple[Select[Any], int]:
    """Apply ORDER BY and the keyset condition; returns the statement and its number of key columns."""
    columns = [c for part in _components(query) for c in part if c is not None]
    columns.append(_Component(_DRIVER.c.resource_pk if query.driver else resources.c.pk, False))
    if anchor is not None:
        if len(anchor) != len(columns):
            raise InvalidRequest("The paging cursor does not belong to this search", expression="_cursor")
        # A missing sort value (flag 1) is NULL in every row that shares the flag: compare on the flag only.
        statement = statement.where(_after([(c, v) for c, v in zip(columns, anchor, strict=True)
                                            if v is not None], backwards))
    order = [c.expression.desc() if c.descending != backwards else c.expression.asc() for c in columns]
    statement = statement.add_columns(*(c.expression for c in columns)).order_by(*order)
    return statement, len(columns)


# -- execution ---------------------------------------------------------------------------------

#: Narrows a statement over `resources` to the rows a caller may receive. Every query function
#: here takes one and none has a default: the research gate passes its consent filter, the
#: custodian passes `custodian_view` by name.
RowFilter = Callable[[Select[Any]], Select[Any]]
#: What every result row carries, before the sort-key columns.
ROW_COLUMNS = (resources.c.pk, resources.c.type, resources.c.id, resources.c.json, resources.c.patient_id)


def custodian_view(statement: Select[Any]) -> Select[Any]:
    """The custodian's row filter: every stored row. Research paths never use it."""
    return statement


def base_statement(query: Query, restrict: RowFilter) -> Select[Any]:
    """The matching resources of a query (no ordering), narrowed by `restrict`; joined to the
    driver's index entries, which stand for its filter, when the query has one."""
    where = [resources.c.type == query.resource_type, resources.c.deleted == false()]
    statement = select(*ROW_COLUMNS)
    if query.driver is None:
        where += query.where
    else:
        statement = statement.select_from(_DRIVER.join(resources, resources.c.pk == _DRIVER.c.resource_pk))
        where += [*query.driver.entries, *(c for c in query.where if c is not query.driver.filter)]
    return restrict(statement.where(*where))


def count(conn: Connection, query: Query, restrict: RowFilter) -> int:
    statement = base_statement(query, restrict).with_only_columns(func.count()).order_by(None)
    return conn.execute(statement).scalar_one()


def run(conn: Connection, query: Query, *, restrict: RowFilter, anchor: list[Any] | None = None,
        backwards: bool = False) -> Page:
    """Fetch one page after (or before) `anchor`, with total and includes as the query asks;
    matches and included resources alike are narrowed by `restrict`."""
    total = count(conn, query, restrict) if query.total else None
    if query.summary_count or query.count == 0:
        return Page([], [], total, None, None)
    statement, width = _ordered(query, base_statement(query, restrict), anchor, backwards)
    rows = conn.execute(statement.limit(query.count + 1)).all()
    more = len(rows) > query.count
    rows = rows[:query.count]
    if backwards:
        rows.reverse()
    keys = [list(row[len(ROW_COLUMNS):len(ROW_COLUMNS) + width]) for row in rows]
    has_next = more if not backwards else True
    has_previous = (anchor is not None) if not backwards else more
    if total is None and anchor is None and not more:
        total = len(rows)
    included = _included(conn, query, rows, restrict) if query.includes and rows else []
    return Page(
        rows=rows,
        included=included,
        total=total,
        next_key=keys[-1] if rows and has_next else None,
        previous_key=keys[0] if rows and has_previous else None,
    )


def _included(conn: Connection, query: Query, rows: list[Any], restrict: RowFilter) -> list[Any]:
    pks = [row.pk for row in rows]
    targets: set[tuple[str, str]] = set()
    for param, target_type in query.includes:
        clauses = [idx_reference.c.resource_pk.in_(pks), idx_reference.c.param == param.index_name,
                   idx_reference.c.target_type.is_not(None)]
        if target_type:
            clauses.append(idx_reference.c.target_type == target_type)
        targets.update(conn.execute(select(idx_reference.c.target_type, idx_reference.c.target_id)
                                    .where(*clauses)).all())
    matched = {(row.type, row.id) for row in rows}
    wanted = sorted(targets - matched)
    if not wanted:
        return []
    statement = (select(*ROW_COLUMNS)
                 .where(repository.by_type_and_id(wanted), resources.c.deleted == false())
                 .order_by(resources.c.pk))
    return conn.execute(restrict(statement)).all()


def matching_ids(conn: Connection, resource_type: str, query_string: Sequence[tuple[str, str]],
                 limit: int = 2) -> list[str]:
    """Ids of resources matching a conditional-operation query (If-None-Exist, conditional refs)."""
    query = parse(resource_type, query_string, default_count=limit, max_count=limit)
    statement = (base_statement(query, custodian_view).with_only_columns(resources.c.id)
                 .order_by(resources.c.pk).limit(limit))
    return list(conn.execute(statement).scalars())

