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
    String,
    and_,
    case,
    false,
    func,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from policies.fhirdates import DateFormatError, date_range
from service import subsetting
from service.errors import InvalidRequest, NotSupported
from service.params import page_size
from service.store.indexer import normalise, parse_reference
from service.store.keyed import by_type_and_id
from service.store.schema import idx_date, idx_quantity, idx_reference, idx_string, idx_token, resources
from service.store.searchparams import (
    SearchParam,
    identifier_index,
    of_type_index,
    params_for,
    searchable_types,
    text_index,
)
from service.validation import model_for

#: Parameters that shape the result rather than filter it.
#: `_totalMethod` is how fhirpy's `count()` asks for a total (with `_count=0`): read as `_total`.
RESULT_PARAMS = frozenset({"_count", "_sort", "_total", "_summary", "_include", "_format", "_pretty", "_cursor",
                           "_totalMethod", "_revinclude", "_elements"})
_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
#: The modifiers each kind of parameter answers; a reference also takes a resource type (`subject:Patient`).
_MODIFIERS = {
    "token": {"", "not", "missing", "text", "of-type"},
    "string": {"", "exact", "contains", "missing"},
    "date": {"", "missing"},
    "quantity": {"", "missing"},
    "reference": {"", "missing", "identifier"},
}
#: Modifiers FHIR defines that this server refuses, and why.
_REFUSED_MODIFIERS = {
    "below": "no code system hierarchy (subsumption) is shipped with this server",
    "above": "no code system hierarchy (subsumption) is shipped with this server",
    "in": "no value sets are shipped with this server for search",
    "not-in": "no value sets are shipped with this server for search",
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


@dataclass(frozen=True)
class Include:
    """One `_include` (the `param` references of `source` rows, to `target` if given) or
    `_revinclude` (`reverse`: the `source` rows whose `param` refers to a resource in hand);
    `iterate`: applied to included resources too, up to `ITERATE_DEPTH` rounds."""

    reverse: bool
    source: str
    param: SearchParam
    target: str | None
    iterate: bool


#: How many rounds of `:iterate` includes follow the first (so at most 1 + ITERATE_DEPTH hops).
ITERATE_DEPTH = 2
#: A page's included resources at most: a search that would include more is refused.
MAX_INCLUDED = 1000


#: A filter over other resources, given the row filter that narrows them (chains, `_has`).
Reaching = Callable[["RowFilter"], ColumnElement[bool]]


@dataclass
class Query:
    """A parsed search: what to match, how to order it, what to return."""

    resource_type: str
    where: list[ColumnElement[bool]] = field(default_factory=list)
    sort: list[SortKey] = field(default_factory=list)
    count: int = 20
    total: bool = False
    summary_count: bool = False
    includes: list[Include] = field(default_factory=list)
    #: What `_summary` (true, text, data) or `_elements` keeps of each resource; None: all of it.
    subset: subsetting.Subset | None = None
    #: The filter the statement starts from, when one can (`Driver`).
    driver: Driver | None = None
    #: The parameters kept, in order, for the self link (unknown ones dropped when lenient).
    echo: list[tuple[str, str]] = field(default_factory=list)
    #: Filters that reach other resources (chains, `_has`), built for a row filter: the
    #: resources they reach are narrowed by it as the matches are (`base_statement`).
    reaching: list[Reaching] = field(default_factory=list)


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
    """Turn (name, value) pairs into a Query; unknown or malformed parameters → InvalidRequest
    (unknown ones are skipped instead when not `strict`), unsupported ones → NotSupported.
    `_count=0` asks for the total only, as `_summary=count` does."""
    known = params_for(resource_type)
    query = Query(resource_type, count=default_count)
    for raw_name, value in args:
        name, _, modifier = raw_name.partition(":")
        if name in RESULT_PARAMS:
            _result_param(query, known, name, modifier, value, max_count)
            if name not in ("_cursor", "_format", "_pretty"):
                query.echo.append((raw_name, value))
            continue
        try:
            if name == "_has":
                query.reaching.append(_has(resource_type, raw_name, value))
            elif "." in raw_name:
                query.reaching.append(_chain(resource_type, raw_name, value))
            else:
                param = _param(resource_type, name, raw_name)
                clause = _filter(param, modifier, value, raw_name)
                query.where.append(clause)
                query.driver = query.driver or _driver(param, modifier, value, clause)
        except _UnknownParameter:
            if strict:
                raise
            continue
        query.echo.append((raw_name, value))
    if query.count == 0:
        query.summary_count = query.total = True
    return query


class _UnknownParameter(InvalidRequest):
    """A parameter the type does not have (skipped under lenient handling)."""


def _param(resource_type: str, name: str, raw_name: str) -> SearchParam:
    param = params_for(resource_type).get(name)
    if param is None:
        raise _UnknownParameter(f"Unknown search parameter {raw_name!r}: {resource_type} has no search "
                                f"parameter {name!r}", expression=raw_name)
    return param


def _resource_type(name: str, raw_name: str) -> str:
    if model_for(name) is None:
        raise InvalidRequest(f"{raw_name}: {name!r} is not a FHIR resource type", expression=raw_name)
    return name


def _type_modifier(param: SearchParam, modifier: str, raw_name: str) -> str:
    """The resource type a reference parameter's type modifier names (`subject:Patient`)."""
    target = _resource_type(modifier, raw_name)
    if param.target and target != param.target:
        raise InvalidRequest(f"{raw_name}: {param.name} refers to {param.target}, not {target}", expression=raw_name)
    return target


def _chain(resource_type: str, raw_name: str, value: str) -> Reaching:
    """`subject:Patient.name=x`, `subject.name=x`: one level, as a semi-join over the index tables
    (the referring rows of the references whose target matches the chained filter)."""
    head, _, rest = raw_name.partition(".")
    name, _, type_name = head.partition(":")
    param = _param(resource_type, name, raw_name)
    if param.kind != "reference":
        raise InvalidRequest(f"{raw_name}: only reference parameters can be chained; {name!r} is a {param.kind}",
                             expression=raw_name)
    if "." in rest:
        raise NotSupported(f"{raw_name}: chains of more than one level are not supported", expression=raw_name)
    chained_name, _, chained_modifier = rest.partition(":")
    if chained_name == "_has" or not chained_name:
        raise NotSupported(f"{raw_name}: _has inside a chain is not supported", expression=raw_name)
    targets = _chain_targets(param, type_name, chained_name, raw_name)
    chained = _param(targets[0], chained_name, raw_name)
    condition = _filter(chained, chained_modifier, value, raw_name)
    # Nested `IN` lists, innermost first, so each database starts from the chained filter's
    # index entries: the targets that match, their ids, the references to them, the referrers.
    live = (resources.c.deleted == false(), condition)

    def build(restrict: RowFilter) -> ColumnElement[bool]:
        return or_(*(resources.c.pk.in_(select(idx_reference.c.resource_pk).where(
            idx_reference.c.param == param.index_name, idx_reference.c.target_type == target,
            idx_reference.c.target_id.in_(restrict(select(resources.c.id).where(resources.c.type == target, *live)))))
            for target in targets))
    return build


def _chain_targets(param: SearchParam, type_name: str, chained_name: str, raw_name: str) -> list[str]:
    """The types a chain reaches: the type modifier's, the parameter's target, or else every
    searchable type that has the chained parameter (which must then mean the same in each)."""
    if type_name:
        return [_type_modifier(param, type_name, raw_name)]
    if param.target:
        return [param.target]
    targets = [t for t in searchable_types() if chained_name in params_for(t)]
    if not targets:
        raise _UnknownParameter(f"Unknown search parameter {raw_name!r}: no type {param.name} may refer to "
                                f"has a search parameter {chained_name!r}", expression=raw_name)
    meanings = {(p.kind, p.index_name, p.target, p.missing_means) for p in (params_for(t)[chained_name]
                                                                          for t in targets)}
    if len(meanings) > 1:
        raise InvalidRequest(f"{raw_name}: {chained_name!r} means different things on the types {param.name} "
                             f"may refer to; name one ({param.name}:Type.{chained_name})", expression=raw_name)
    return targets


def _has(resource_type: str, raw_name: str, value: str) -> Reaching:
    """`_has:Observation:patient:code=x`: the resources some Observation matching `code=x` refers
    to through `patient`; one level."""
    parts = raw_name.split(":")
    if len(parts) >= 4 and parts[3] == "_has":
        raise NotSupported(f"{raw_name}: nested _has is not supported (one level only)", expression=raw_name)
    if len(parts) not in (4, 5) or not all(parts[1:4]):
        raise InvalidRequest(f"{raw_name} must be _has:<type>:<reference parameter>:<parameter>",
                             expression=raw_name)
    referrer = _resource_type(parts[1], raw_name)
    if "." in parts[3]:
        raise NotSupported(f"{raw_name}: chains inside _has are not supported", expression=raw_name)
    param = _param(referrer, parts[2], raw_name)
    if param.kind != "reference":
        raise InvalidRequest(f"{raw_name}: {parts[2]!r} is not a reference parameter of {referrer}",
                             expression=raw_name)
    if param.target and param.target != resource_type:
        raise InvalidRequest(f"{raw_name}: {referrer}.{parts[2]} refers to {param.target}, not {resource_type}",
                             expression=raw_name)
    condition = _filter(_param(referrer, parts[3], raw_name), parts[4] if len(parts) == 5 else "", value, raw_name)
    # Nested `IN` lists, innermost first: the referrers that match, their references, the ids referred to.
    live = (resources.c.type == referrer, resources.c.deleted == false(), condition)

    def build(restrict: RowFilter) -> ColumnElement[bool]:
        return resources.c.id.in_(select(idx_reference.c.target_id).where(
            # By row number first: the (param, …) index would read every reference of the parameter.
            _NotLookedUp(idx_reference.c.param) == param.index_name, idx_reference.c.target_type == resource_type,
            idx_reference.c.resource_pk.in_(restrict(select(resources.c.pk).where(*live)))))
    return build


class _NotLookedUp(FunctionElement[str]):
    """A column the database must not look rows up by (SQLite: unary `+`; others choose well
    by their statistics): steers SQLite, which the product runs without ANALYZE, to a better index."""

    name = "not_looked_up"
    inherit_cache = True
    type = String()


@compiles(_NotLookedUp)
def _column_itself(element: _NotLookedUp, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


@compiles(_NotLookedUp, "sqlite")
def _unary_plus(element: _NotLookedUp, compiler: Any, **kw: Any) -> str:
    return "+" + str(compiler.process(element.clauses, **kw))


def _driver(param: SearchParam, modifier: str, value: str, clause: ColumnElement[bool]) -> Driver | None:
    """The `Driver` a filter can be: a token parameter (not `_id`) with one value naming its code,
    which only resources with that index entry match (no `missing_means`)."""
    values = _split_values(value)
    if param.kind != "token" or param.name == "_id" or modifier or len(values) != 1 or param.missing_means:
        return None
    _, bar, code = values[0].partition("|")
    if not bar or not code:
        return None
    return Driver(clause, (_DRIVER.c.param == param.index_name, _token_clause(values[0], _DRIVER)))


def _result_param(query: Query, known: Mapping[str, SearchParam], name: str, modifier: str, value: str,
                  max_count: int) -> None:
    if name == "_count":
        query.count = page_size(value, max_count)
    elif name == "_total":
        if value not in ("none", "estimate", "accurate"):
            raise InvalidRequest("_total must be none, estimate or accurate", expression="_total")
        query.total = value != "none"
    elif name == "_totalMethod":
        if value not in ("none", "estimate", "count"):
            raise InvalidRequest("_totalMethod must be none, estimate or count", expression="_totalMethod")
        query.total = value != "none"
    elif name == "_summary":
        if value == "count":
            query.summary_count = query.total = True
        _subset(query, subsetting.Subset(summary=subsetting.summary(value)))
    elif name == "_elements":
        _subset(query, subsetting.Subset(elements=subsetting.elements(query.resource_type, value)))
    elif name == "_sort":
        query.sort = [_sort_key(known, part) for part in value.split(",") if part]
    elif name in ("_include", "_revinclude"):
        query.includes.append(_include(query.resource_type, name, modifier, value))


def _subset(query: Query, subset: subsetting.Subset) -> None:
    if subset.summary is None and subset.elements is None:
        return
    if query.subset is not None:
        raise InvalidRequest("Give one of _summary (true, text, data) and _elements, once", expression="_elements")
    query.subset = subset


def _sort_key(known: Mapping[str, SearchParam], part: str) -> SortKey:
    descending = part.startswith("-")
    name = part.lstrip("-")
    param = known.get(name)
    if param is None or (param.kind == "reference" and name not in ("_id",)):
        raise InvalidRequest(f"Cannot sort by {name!r}", expression="_sort")
    return SortKey(name, descending)


def _include(resource_type: str, name: str, modifier: str, value: str) -> Include:
    """`_include=Source:param[:Target]`, `_revinclude=Source:param[:Target]`; with `:iterate` (or
    its R3 name `:recurse`) the source may be any type, otherwise an `_include` starts from the
    searched type."""
    if modifier not in ("", "iterate", "recurse"):
        raise NotSupported(f"{name}:{modifier} is not supported (use {name} or {name}:iterate)", expression=name)
    iterate = bool(modifier)
    parts = value.split(":")
    if len(parts) not in (2, 3) or not all(parts) or model_for(parts[0]) is None:
        raise InvalidRequest(f"{name}={value!r} must be <type>:<reference parameter>[:<target type>]", expression=name)
    if name == "_include" and not iterate and parts[0] != resource_type:
        raise InvalidRequest(f"_include={value!r} must start from {resource_type} (or use _include:iterate)",
                             expression=name)
    param = params_for(parts[0]).get(parts[1])
    if param is None or param.kind != "reference":
        raise InvalidRequest(f"{name}: {parts[1]!r} is not a reference parameter of {parts[0]}", expression=name)
    target = parts[2] if len(parts) == 3 else param.target
    if target is not None and (model_for(target) is None or (param.target and target != param.target)):
        raise InvalidRequest(f"{name}={value!r}: {parts[0]}.{parts[1]} does not refer to {target}", expression=name)
    return Include(name == "_revinclude", parts[0], param, target, iterate)


# -- filters -----------------------------------------------------------------------------------


def _check_modifier(param: SearchParam, modifier: str, raw_name: str) -> None:
    if modifier in _REFUSED_MODIFIERS:
        raise NotSupported(f"Modifier :{modifier} is not supported ({raw_name}): {_REFUSED_MODIFIERS[modifier]}",
                           expression=raw_name)
    if param.kind == "reference" and modifier[:1].isupper():
        _type_modifier(param, modifier, raw_name)
    elif (modifier not in _MODIFIERS[param.kind] or (modifier and param.name in ("_id", "_lastUpdated"))
          or (modifier == "of-type" and param.name != "identifier")):
        raise InvalidRequest(f"Modifier :{modifier} is not supported on {param.kind} parameter {param.name!r}",
                             expression=raw_name)


def _filter(param: SearchParam, modifier: str, value: str, raw_name: str) -> ColumnElement[bool]:
    """The clause one parameter stands for, on `resources`; bad modifiers and values refused."""
    _check_modifier(param, modifier, raw_name)
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
            return _token_filter(param, modifier, values)
        if param.kind == "string":
            return _exists(param, or_(*(_string_clause(v, modifier) for v in values)))
        if param.kind == "date":
            return _exists(param, or_(*(_date_clause(v, idx_date.c.low, idx_date.c.high) for v in values)))
        if param.kind == "quantity":
            return _exists(param, or_(*(_quantity_clause(v) for v in values)))
        if modifier == "identifier":
            return _rows_in(idx_token, identifier_index(param), or_(*(_token_clause(v) for v in values)))
        return _exists(param, or_(*(_reference_clause(param, v, modifier) for v in values)))
    except (ValueError, InvalidOperation) as exc:
        raise InvalidRequest(f"Invalid value for {raw_name}: {exc}", expression=raw_name) from None


def _token_filter(param: SearchParam, modifier: str, values: list[str]) -> ColumnElement[bool]:
    """Token search; a resource without the element matches as its `missing_means` value would."""
    if modifier == "text":
        return _rows_in(idx_string, text_index(param), or_(*(_string_clause(v, "") for v in values)))
    if modifier == "of-type":
        return _rows_in(idx_token, of_type_index(param), or_(*(_of_type_clause(v) for v in values)))
    clause = _exists(param, or_(*(_token_clause(v) for v in values)))
    if param.missing_means is not None and any(_names_code(v, param.missing_means) for v in values):
        clause = or_(clause, not_(_exists(param, true())))
    return not_(clause) if modifier == "not" else clause


def _names_code(value: str, code: str) -> bool:
    """Whether a token search value names `code` with no system (`code` or `|code`)."""
    return value in (code, f"|{code}")


def _of_type_clause(value: str) -> ColumnElement[bool]:
    """`:of-type` takes `system|type-code|value` (the system may be empty)."""
    parts = value.split("|")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ValueError(f"{value!r} must be <type system>|<type code>|<identifier value>")
    system = idx_token.c.system.is_(None) if not parts[0] else idx_token.c.system == parts[0]
    return and_(system, idx_token.c.code == f"{parts[1]}|{parts[2]}"[:255])


def _rows_in(table: Any, index_name: str, condition: ColumnElement[bool]) -> ColumnElement[bool]:
    """`pk IN (rows of the index table under this name that match)`."""
    return resources.c.pk.in_(select(table.c.resource_pk).where(table.c.param == index_name, condition))


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

    def contained() -> ColumnElement[bool]:
        return and_(low >= vlow, high <= vhigh)

    # Only the prefix's clause is built: a list of hundreds of values would otherwise build nine per value.
    return {
        "eq": contained,
        "ne": lambda: not_(contained()),
        "gt": lambda: high > vhigh,
        "lt": lambda: low < vlow,
        "ge": lambda: or_(high > vhigh, contained()),
        "le": lambda: or_(low < vlow, contained()),
        "sa": lambda: low > vhigh,
        "eb": lambda: high < vlow,
        "ap": lambda: and_(low <= vhigh + _approx(vlow, vhigh), high >= vlow - _approx(vlow, vhigh)),
    }[prefix]()


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
    clause = {  # only the prefix's clause is built (see _date_clause)
        "eq": lambda: and_(column >= lo, column < hi),
        "ne": lambda: or_(column < lo, column >= hi),
        "gt": lambda: column > n,
        "lt": lambda: column < n,
        "ge": lambda: column >= n,
        "le": lambda: column <= n,
        "sa": lambda: column > n,
        "eb": lambda: column < n,
        "ap": lambda: and_(column >= n - abs(n) * 0.1, column <= n + abs(n) * 0.1),
    }[prefix]()
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
    driver's index entries, which stand for its filter, when the query has one. The resources
    a chain or `_has` reaches are narrowed by `restrict` too."""
    where = [resources.c.type == query.resource_type, resources.c.deleted == false()]
    statement = select(*ROW_COLUMNS)
    filters = conditions(query, restrict)
    if query.driver is not None:
        statement = statement.select_from(_DRIVER.join(resources, resources.c.pk == _DRIVER.c.resource_pk))
        where += query.driver.entries
        filters = [c for c in filters if c is not query.driver.filter]
    return restrict(statement.where(*where, *filters))


def conditions(query: Query, restrict: RowFilter) -> list[ColumnElement[bool]]:
    """What a query's filters stand for on `resources` (its type aside), the resources its chains
    and `_has` reach narrowed by `restrict`."""
    return [*query.where, *(reach(restrict) for reach in query.reaching)]


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
    """The resources the page's `_include` and `_revinclude` parameters bring in, each narrowed by
    `restrict` as the matches are: first those of the matches, then, for `:iterate` ones only, those
    of what the previous round brought, for at most `ITERATE_DEPTH` rounds more. No resource comes
    twice, nor one that is a match; more than `MAX_INCLUDED` is refused."""
    seen = {(row.type, row.id) for row in rows}
    included: list[Any] = []
    frontier = rows
    for depth in range(1 + ITERATE_DEPTH):
        rules = [rule for rule in query.includes if depth == 0 or rule.iterate]
        found = []
        for rule in rules:
            for row in _follow(conn, rule, frontier, restrict):
                if (row.type, row.id) not in seen:
                    seen.add((row.type, row.id))
                    found.append(row)
        if len(included) + len(found) > MAX_INCLUDED:
            raise InvalidRequest(f"The includes of this page would bring more than {MAX_INCLUDED} resources; "
                                 "narrow the search or lower _count", expression="_revinclude" if any(
                                     rule.reverse for rule in query.includes) else "_include")
        included += found
        frontier = found
        if not frontier:
            break
    return included


def _follow(conn: Connection, rule: Include, frontier: list[Any], restrict: RowFilter) -> list[Any]:
    """The live resources one include rule reaches from `frontier`, narrowed by `restrict`."""
    if rule.reverse:
        pairs = sorted({(row.type, row.id) for row in frontier if rule.target in (None, row.type)})
        if not pairs:
            return []
        by_type: dict[str, list[str]] = {}
        for target_type, target_id in pairs:
            by_type.setdefault(target_type, []).append(target_id)
        referring = select(idx_reference.c.resource_pk).where(
            idx_reference.c.param == rule.param.index_name,
            or_(*(and_(idx_reference.c.target_type == t, idx_reference.c.target_id.in_(ids))
                  for t, ids in by_type.items())))
        statement = select(*ROW_COLUMNS).where(resources.c.type == rule.source, resources.c.deleted == false(),
                                               resources.c.pk.in_(referring))
    else:
        pks = [row.pk for row in frontier if row.type == rule.source]
        if not pks:
            return []
        clauses = [idx_reference.c.resource_pk.in_(pks), idx_reference.c.param == rule.param.index_name,
                   idx_reference.c.target_type.is_not(None)]
        if rule.target:
            clauses.append(idx_reference.c.target_type == rule.target)
        targets = conn.execute(select(idx_reference.c.target_type, idx_reference.c.target_id).where(*clauses)).all()
        if not targets:
            return []
        statement = select(*ROW_COLUMNS).where(by_type_and_id(targets), resources.c.deleted == false())
    return conn.execute(restrict(statement).order_by(resources.c.pk).limit(MAX_INCLUDED + 1)).all()


def matching_ids(conn: Connection, resource_type: str, query_string: Sequence[tuple[str, str]],
                 limit: int = 2) -> list[str]:
    """Ids of resources matching a conditional-operation query (If-None-Exist, conditional refs)."""
    query = parse(resource_type, query_string, default_count=limit, max_count=limit)
    statement = (base_statement(query, custodian_view).with_only_columns(resources.c.id)
                 .order_by(resources.c.pk).limit(limit))
    return list(conn.execute(statement).scalars())

