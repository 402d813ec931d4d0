"""`$aggregate`: differentially private answers with per-patient bounding done in SQL.

Order of work for one question (all in one write transaction, fail closed):
recorded answer? → reserve ε in the ledger → exact aggregate in SQL (one contribution
per patient per bin, values clipped to the declared bounds, consent applied) → noise
(policies/dp.py) → suppression of small noisy counts → record the answer → respond.

The unit of privacy is the patient. SQL reduces each patient to one row before any
aggregate: `count` counts patients, `histogram` counts patients per declared bin,
`sum`/`mean`/`quantile` use one reduced value per patient (latest, mean, max, min or
count of their matching Observations) clipped to [lower, upper]. Bounds and bins come
from the request, never from the data.
"""
from __future__ import annotations

import calendar
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import pairwise
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    case,
    false,
    func,
    literal,
    select,
)
from sqlalchemy.exc import IntegrityError

from consent import engine, projects
from consent.projects import PATIENT_DATA_TYPES, ProjectRecord
from policies import budget, dp
from service import audit, db
from service.errors import Forbidden, InvalidRequest
from service.release import restrict
from service.store import search
from service.store.fhirdates import date_range
from service.store.schema import decisions, idx_date, idx_quantity, idx_token, resources
from service.validation import model_for

MEASURES = ("count", "histogram", "sum", "mean", "quantile")
REDUCERS = ("latest", "mean", "max", "min", "count")
GENDERS = ("male", "female", "other", "unknown")
#: Code systems an aggregate may name; an unknown system is more likely a typo than a new terminology.
KNOWN_SYSTEMS = frozenset({
    "http://loinc.org", "http://snomed.info/sct", "http://www.nlm.nih.gov/research/umls/rxnorm",
    "http://hl7.org/fhir/sid/icd-10", "http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/cvx",
    "http://unitsofmeasure.org", "urn:oid:2.16.840.1.113883.6.238",
})
_KNOWN_PREFIXES = ("http://terminology.hl7.org/CodeSystem/", "http://hl7.org/fhir/")
#: Share of ε spent on the noisy count that decides suppression for sums and quantiles.
SUPPRESSION_SHARE = 0.25


@dataclass(frozen=True)
class Expression:
    """A FHIR search (`Type?params`) evaluated in SQL within one patient's compartment."""

    text: str
    resource_type: str
    args: tuple[tuple[str, str], ...]
    where: tuple[ColumnElement[bool], ...] = field(compare=False)


@dataclass(frozen=True)
class Value:
    expression: Expression
    reduce: str
    lower: float
    upper: float


@dataclass(frozen=True)
class Grouping:
    by: str
    bins: tuple[str, ...]
    edges: tuple[int, ...] = ()
    at: str = ""
    years: tuple[int, int] = (0, 0)
    codes: tuple[str, ...] = ()
    expression: Expression | None = None


@dataclass(frozen=True)
class Query:
    """One parsed, checked $aggregate request."""

    measure: str
    epsilon: float
    cohort: tuple[Expression, ...] = ()
    value: Value | None = None
    group: Grouping | None = None
    q: float | None = None

    def canonical(self) -> dict[str, Any]:
        """What identifies the question (hashed to recognise a repeated one)."""
        return {
            "measure": self.measure, "epsilon": repr(float(self.epsilon)), "q": repr(self.q),
            "cohort": sorted(e.text for e in self.cohort),
            "value": None if self.value is None else [self.value.expression.text, self.value.reduce,
                                                      repr(self.value.lower), repr(self.value.upper)],
            "group": None if self.group is None else [
                self.group.by, list(self.group.bins), list(self.group.edges), self.group.at,
                list(self.group.years), list(self.group.codes),
                self.group.expression.text if self.group.expression else None],
        }


# -- parsing the Parameters resource -----------------------------------------------------------


def _params(body: Any) -> list[dict[str, Any]]:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise InvalidRequest("$aggregate takes a Parameters resource")
    items = body.get("parameter") or []
    if not isinstance(items, list) or not all(isinstance(p, dict) and isinstance(p.get("name"), str) for p in items):
        raise InvalidRequest("Parameters.parameter must be a list of named parameters")
    return items


def _value(item: dict[str, Any], name: str) -> Any:
    for key, value in item.items():
        if key.startswith("value"):
            return value
    raise InvalidRequest(f"parameter {name!r} needs a value", expression=name)


def _one(items: list[dict[str, Any]], name: str, required: bool = False) -> Any:
    found = [p for p in items if p["name"] == name]
    if len(found) > 1:
        raise InvalidRequest(f"parameter {name!r} may appear only once", expression=name)
    if not found:
        if required:
            raise InvalidRequest(f"parameter {name!r} is required", expression=name)
        return None
    return found[0] if "part" in found[0] else _value(found[0], name)


#: Declared bounds beyond this are refused: sums of them could overflow, and no clinical value needs them.
MAX_BOUND = 1e9


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= MAX_BOUND:
        raise InvalidRequest(f"parameter {name!r} must be a finite number of magnitude at most {MAX_BOUND:g}",
                             expression=name)
    return float(value)


def _check_systems(args: list[tuple[str, str]], name: str) -> None:
    for key, value in args:
        for item in value.split(","):
            if "|" in item and key.partition(":")[0] not in ("value-quantity", "component-value-quantity"):
                system = item.split("|", 1)[0]
                if system and system not in KNOWN_SYSTEMS and not system.startswith(_KNOWN_PREFIXES):
                    raise InvalidRequest(f"{name}: unknown code system {system!r}", expression=name)


def expression(text: Any, name: str) -> Expression:
    """Parse `Type?params` with the FHIR search parser; errors name the parameter."""
    if not isinstance(text, str) or ("?" not in text and not text.isalpha()):
        raise InvalidRequest(f"{name} must be a FHIR search like Condition?code=system|code", expression=name)
    resource_type, _, query = text.partition("?")
    if model_for(resource_type) is None:
        raise InvalidRequest(f"{name}: {resource_type!r} is not a FHIR resource type", expression=name)
    args = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))  if query else []
    _check_systems(args, name)
    try:
        parsed = search.parse(resource_type, args, default_count=1, max_count=1)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{name}: {exc.message}", expression=name) from None
    if parsed.sort or parsed.includes:
        raise InvalidRequest(f"{name}: _sort and _include have no meaning in an aggregate", expression=name)
    return Expression(text, resource_type, tuple(args), tuple(parsed.where))


def _parts(item: dict[str, Any] | None, name: str) -> list[dict[str, Any]]:
    if item is None:
        return []
    parts = item.get("part")
    if not isinstance(parts, list):
        raise InvalidRequest(f"parameter {name!r} takes parts", expression=name)
    return parts


def _grouping(items: list[dict[str, Any]]) -> Grouping:
    parts = _parts(_one(items, "groupBy", required=True), "groupBy")
    by = _one(parts, "by", required=True)
    if by == "gender":
        return Grouping("gender", GENDERS)
    if by == "age-band":
        raw = _one(parts, "edges", required=True)
        try:
            edges = tuple(int(e) for e in str(raw).split(","))
        except ValueError:
            raise InvalidRequest("groupBy.edges must be whole years, e.g. 0,18,40,65,90",
                                 expression="groupBy.edges") from None
        if len(edges) < 2 or any(b <= a for a, b in pairwise(edges)) or edges[0] < 0:
            raise InvalidRequest("groupBy.edges must be at least two increasing ages", expression="groupBy.edges")
        at = _one(parts, "at") or datetime.now(UTC).date().isoformat()
        try:
            date.fromisoformat(str(at))
        except ValueError:
            raise InvalidRequest("groupBy.at must be a date (YYYY-MM-DD)", expression="groupBy.at") from None
        bins = tuple(f"{a}-{b - 1}" for a, b in pairwise(edges))
        return Grouping("age-band", bins, edges=edges, at=str(at))
    if by == "year":
        start, end = _one(parts, "from", required=True), _one(parts, "to", required=True)
        if not all(isinstance(y, int) and not isinstance(y, bool) for y in (start, end)) or not 1800 <= start <= end:
            raise InvalidRequest("groupBy.from and groupBy.to must be years with from ≤ to", expression="groupBy")
        if end - start > 200:
            raise InvalidRequest("groupBy year ranges are limited to 200 bins", expression="groupBy")
        return Grouping("year", tuple(str(y) for y in range(start, end + 1)), years=(start, end),
                        expression=expression(_one(parts, "expression", required=True), "groupBy.expression"))
    if by == "code":
        raw = _one(parts, "codes", required=True)
        codes = tuple(dict.fromkeys(c.strip() for c in str(raw).split(",") if c.strip()))
        if not codes or any("|" not in c for c in codes):
            raise InvalidRequest("groupBy.codes must list system|code values", expression="groupBy.codes")
        _check_systems([("code", c) for c in codes], "groupBy.codes")
        return Grouping("code", codes, codes=codes,
                        expression=expression(_one(parts, "expression", required=True), "groupBy.expression"))
    raise InvalidRequest(f"groupBy.by must be gender, age-band, year or code, not {by!r}", expression="groupBy.by")


def parse(body: Any, project: ProjectRecord) -> Query:
    """Check every parameter before anything is spent; errors name the parameter."""
    items = _params(body)
    known = {"measure", "cohort", "value", "groupBy", "epsilon", "q"}
    unknown = sorted({p["name"] for p in items} - known)
    if unknown:
        raise InvalidRequest(f"unknown parameter {unknown[0]!r}", expression=unknown[0])
    measure = _one(items, "measure", required=True)
    if measure not in MEASURES:
        raise InvalidRequest(f"measure must be one of {', '.join(MEASURES)}", expression="measure")
    epsilon = _number(_one(items, "epsilon", required=True), "epsilon")
    if not epsilon > 0:
        raise InvalidRequest("epsilon must be > 0", expression="epsilon")
    if epsilon > project.epsilon_cap:
        raise InvalidRequest(f"epsilon {epsilon} is above this project's per-query cap {project.epsilon_cap}",
                             expression="epsilon")
    cohort = tuple(expression(_value(p, "cohort"), "cohort") for p in items if p["name"] == "cohort")
    query = Query(measure, epsilon, cohort)
    if measure in ("sum", "mean", "quantile"):
        parts = _parts(_one(items, "value", required=True), "value")
        reduce = _one(parts, "reduce") or "latest"
        if reduce not in REDUCERS:
            raise InvalidRequest(f"value.reduce must be one of {', '.join(REDUCERS)}", expression="value.reduce")
        lower_raw, upper_raw = _one(parts, "lower"), _one(parts, "upper")
        if lower_raw is None or upper_raw is None:
            raise InvalidRequest("value.lower and value.upper are required: bounds are declared, never taken "
                                 "from the data", expression="value.lower" if lower_raw is None else "value.upper")
        lower, upper = _number(lower_raw, "value.lower"), _number(upper_raw, "value.upper")
        if not lower < upper:
            raise InvalidRequest("value.lower must be below value.upper", expression="value.lower")
        spec = expression(_one(parts, "expression", required=True), "value.expression")
        if reduce != "count" and "value-quantity" not in search.params_for(spec.resource_type):
            raise InvalidRequest(f"value.expression: {spec.resource_type} has no quantity value",
                                 expression="value.expression")
        query = Query(measure, epsilon, cohort, value=Value(spec, reduce, lower, upper))
        if measure == "quantile":
            q = _number(_one(items, "q", required=True), "q")
            if not 0 < q < 1:
                raise InvalidRequest("q must be between 0 and 1", expression="q")
            query = Query(measure, epsilon, cohort, value=query.value, q=q)
    elif _one(items, "value") is not None:
        raise InvalidRequest(f"value has no meaning for measure {measure}", expression="value")
    if measure == "histogram":
        query = Query(measure, epsilon, cohort, group=_grouping(items))
    elif _one(items, "groupBy") is not None:
        raise InvalidRequest("groupBy is only for measure histogram", expression="groupBy")
    return query


# -- the exact, bounded aggregate in SQL -----------------------------------------------------


@dataclass
class Exact:
    """Pre-noise aggregates (kept for tests of sensitivity; never released)."""

    count: int = 0
    total: float = 0.0
    values: list[float] = field(default_factory=list)
    bins: dict[str, int] = field(default_factory=dict)


def _within_patient(expr: Expression, project_id: str, now: int, patient: Any) -> Select[Any]:
    statement = select(literal(1)).where(resources.c.type == expr.resource_type, resources.c.deleted == false(),
                                         resources.c.patient_id == patient.c.id, *expr.where)
    return restrict(project_id, engine.AGGREGATE, now)(statement)


def cohort(query: Query, project_id: str, now: int) -> tuple[Any, Select[Any]]:
    """(p, SELECT p.pk, p.id …): consenting patients (tier ≥ aggregate) matching every cohort expression."""
    p = resources.alias("p")
    statement = select(p.c.pk, p.c.id).where(p.c.type == "Patient", p.c.deleted == false())
    statement = restrict(project_id, engine.AGGREGATE, now, p)(statement)
    for expr in query.cohort:
        statement = statement.where(_within_patient(expr, project_id, now, p).exists())
    return p, statement


def _clip(column: Any, lower: float, upper: float) -> Any:
    return case((column < lower, lower), (column > upper, upper), else_=column)


def _per_patient_values(query: Query, project_id: str, now: int, members: Select[Any]) -> Select[Any]:
    """One clipped value per cohort patient: the contribution bound every mechanism relies on."""
    assert query.value is not None
    spec = query.value
    row = (select(resources.c.patient_id.label("pid"), idx_quantity.c.value.label("v"),
                  # Undated values last on both databases (PostgreSQL puts NULLs first when descending).
                  func.row_number().over(partition_by=resources.c.patient_id,
                                         order_by=(resources.c.clinical_low.is_(None), resources.c.clinical_low.desc(),
                                                   resources.c.pk.desc()))
                  .label("rn"))
           .join(idx_quantity, and_(idx_quantity.c.resource_pk == resources.c.pk,
                                    idx_quantity.c.param == "value-quantity"))
           .where(resources.c.type == spec.expression.resource_type, resources.c.deleted == false(),
                  resources.c.patient_id.in_(members.with_only_columns(members.selected_columns[1])),
                  *spec.expression.where))
    if spec.reduce == "count":
        row = (select(resources.c.patient_id.label("pid"), func.count().label("v"))
               .where(resources.c.type == spec.expression.resource_type, resources.c.deleted == false(),
                      resources.c.patient_id.in_(members.with_only_columns(members.selected_columns[1])),
                      *spec.expression.where))
        row = restrict(project_id, engine.AGGREGATE, now)(row).group_by(resources.c.patient_id)
        values = row.subquery()
        return select(_clip(values.c.v, spec.lower, spec.upper).label("v"))
    row = restrict(project_id, engine.AGGREGATE, now)(row).subquery()
    if spec.reduce == "latest":
        per_patient = select(row.c.v.label("v")).where(row.c.rn == 1).subquery()
    else:
        reducer = {"mean": func.avg, "max": func.max, "min": func.min}[spec.reduce]
        per_patient = select(reducer(row.c.v).label("v")).group_by(row.c.pid).subquery()
    return select(_clip(per_patient.c.v, spec.lower, spec.upper).label("v"))


def _years_before(at: date, years: int) -> int:
    """The last instant of the day on which someone born then turns `years` at `at`."""
    year = at.year - years
    day = min(at.day, calendar.monthrange(year, at.month)[1])
    return date_range(date(year, at.month, day).isoformat())[1]


def _bin_label(group: Grouping, p: Any, project_id: str, now: int) -> Any:
    if group.by == "gender":
        gender = (select(idx_token.c.code).where(idx_token.c.resource_pk == p.c.pk, idx_token.c.param == "gender")
                  .limit(1).scalar_subquery())
        return case((gender.in_(GENDERS[:3]), gender), else_="unknown")
    if group.by == "age-band":
        born = (select(func.min(idx_date.c.low)).where(idx_date.c.resource_pk == p.c.pk,
                                                       idx_date.c.param == "birthdate").scalar_subquery())
        at = date.fromisoformat(group.at)
        bounds = [_years_before(at, edge) for edge in group.edges]
        whens = [(born > bounds[0], None)]
        whens += [(born > bounds[i + 1], label) for i, label in enumerate(group.bins)]
        return case(*whens, else_=None)
    assert group.expression is not None and group.by == "year"
    first = (_within_patient(group.expression, project_id, now, p)
             .with_only_columns(func.min(resources.c.clinical_low)).scalar_subquery())
    starts = [date_range(str(y))[0] for y in range(group.years[0], group.years[1] + 2)]
    whens = [(first < starts[0], None)]
    whens += [(first < starts[i + 1], label) for i, label in enumerate(group.bins)]
    return case(*whens, else_=None)


def exact(conn: Connection, query: Query, project_id: str, now: int | None = None) -> Exact:
    """The bounded, consented aggregate before noise."""
    now = now if now is not None else db.now_us()
    p, members = cohort(query, project_id, now)
    result = Exact()
    if query.measure == "count":
        result.count = conn.execute(select(func.count()).select_from(members.subquery())).scalar_one()
    elif query.measure == "histogram":
        group = query.group
        assert group is not None
        if group.by == "code":
            assert group.expression is not None
            for code in group.codes:
                coded = search.parse(group.expression.resource_type, [("code", code)], default_count=1,
                                     max_count=1).where
                spec = Expression(group.expression.text, group.expression.resource_type, (),
                                  (*group.expression.where, *coded))
                statement = members.where(_within_patient(spec, project_id, now, p).exists())
                result.bins[code] = conn.execute(select(func.count()).select_from(statement.subquery())).scalar_one()
        else:
            labelled = members.add_columns(_bin_label(group, p, project_id, now).label("bin")).subquery()
            rows = conn.execute(select(labelled.c.bin, func.count()).where(labelled.c.bin.is_not(None))
                                .group_by(labelled.c.bin))
            result.bins = {label: n for label, n in rows if label in group.bins}
    else:
        values = _per_patient_values(query, project_id, now, members).subquery()
        if query.measure == "quantile":
            result.values = [float(v) for v in conn.execute(select(values.c.v)).scalars()]
            result.count = len(result.values)
        else:
            count, total = conn.execute(select(func.count(), func.sum(values.c.v))).one()
            result.count, result.total = count, float(total or 0.0)
    return result


# -- noise, suppression, the answer ------------------------------------------------------------


def _cell(released: dp.Released, threshold: int, label: str | None, suppressed: bool) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    if label is not None:
        parts.append({"name": "bin", "valueString": label})
    parts.append({"name": "suppressed", "valueBoolean": suppressed})
    if not suppressed:
        value = released.value
        parts.append({"name": "value", "valueInteger": int(value)} if isinstance(value, int) and not
                     isinstance(value, bool) else {"name": "value", "valueDecimal": float(value)})
        if released.interval is not None:
            low, high = released.interval
            parts.append({"name": "interval", "part": [{"name": "low", "valueDecimal": float(low)},
                                                       {"name": "high", "valueDecimal": float(high)}]})
    parts.append({"name": "mechanism", "valueString": released.mechanism})
    return {"name": "result", "part": parts}


def noisy(query: Query, found: Exact, threshold: int, random_state: Any = None) -> list[dict[str, Any]]:
    """Draw the noise for each cell and apply suppression to noisy counts only."""
    eps = query.epsilon
    if query.measure == "count":
        released = dp.Count(eps).release(found.count, random_state=random_state)
        return [_cell(released, threshold, None, dp.suppress(released, threshold))]
    if query.measure == "histogram":
        assert query.group is not None
        k = len(query.group.codes) if query.group.by == "code" else 1
        histogram = dp.Histogram(eps, query.group.bins, k).release(found.bins, random_state=random_state)
        return [_cell(r, threshold, label, dp.suppress(r, threshold)) for label, r in histogram.bins.items()]
    assert query.value is not None
    lower, upper = query.value.lower, query.value.upper
    if query.measure == "mean":
        released = dp.BoundedMean(eps, lower, upper).release(found.total, found.count, random_state=random_state)
        return [_cell(released, threshold, None, dp.suppress(released, threshold))]
    # Sums and quantiles carry no count: a quarter of ε buys the noisy count that decides suppression.
    gate = dp.Count(eps * SUPPRESSION_SHARE).release(found.count, random_state=random_state)
    rest = eps * (1 - SUPPRESSION_SHARE)
    if query.measure == "sum":
        released = dp.BoundedSum(rest, lower, upper).release(found.total, random_state=random_state)
    else:
        assert query.q is not None
        released = dp.Quantile(rest, query.q, lower, upper).release(found.values, random_state=random_state)
    return [_cell(released, threshold, None, dp.suppress(gate, threshold))]


def data_version(conn: Connection) -> str:
    """Changes whenever any resource or any consent decision changes (both columns are indexed)."""
    stored = conn.execute(select(func.max(resources.c.last_updated))).scalar() or 0
    decided = conn.execute(select(func.max(decisions.c.updated))).scalar() or 0
    return f"{stored}:{decided}"


def _check_project(project: ProjectRecord, query: Query) -> None:
    """Only an open project, and only over the resource types it may receive."""
    if project.status != "active":
        raise Forbidden(f"Project {project.project_id} is closed and receives nothing more")
    if project.max_tier < engine.AGGREGATE:
        raise Forbidden(f"Project {project.project_id} may not receive aggregates")
    allowed = set(project.types or PATIENT_DATA_TYPES)
    named = [e.resource_type for e in query.cohort]
    named += [query.value.expression.resource_type] if query.value else []
    named += [query.group.expression.resource_type] if query.group and query.group.expression else []
    refused = sorted(set(named) - allowed)
    if refused:
        raise Forbidden(f"Project {project.project_id} may not use {', '.join(refused)} data")


def answer(project_id: str, client_id: str, body: Any, idempotency_key: str | None,
           random_state: Any = None) -> dict[str, Any]:
    """Answer one $aggregate request: recorded, or computed after ε is reserved.

    One write transaction holds the reservation, the computation and the recorded
    answer. If the computation fails, the reservation is still committed before the
    error propagates: a failure that depends on the data must not be free, since it too
    says something about the data.
    """
    with db.read() as conn:
        project = projects.get(conn, project_id)
    query = parse(body, project)
    _check_project(project, query)
    query_hash = budget.canonical_hash(query.canonical())
    failure: Exception | None = None
    with db.write() as conn:
        project = projects.get(conn, project_id)  # re-read: a close may have raced the request
        _check_project(project, query)
        version = data_version(conn)
        recorded = budget.recorded_answer(conn, project_id, query_hash, version, idempotency_key)
        if recorded is not None:
            if idempotency_key is not None:
                with suppress(IntegrityError), conn.begin_nested():
                    budget.bind_key(conn, project_id, idempotency_key, query_hash, recorded)
        else:
            # On failure the reservation still commits with this transaction; nothing is answered.
            recorded, failure = _compute(conn, project, query, query_hash, version, client_id, idempotency_key,
                                         random_state)
        remaining = budget.status(conn, project_id, history_limit=0)["remaining"]
    if failure is not None or recorded is None:
        raise failure or RuntimeError("no answer was computed")
    return {"resourceType": "Parameters", "parameter": [
        {"name": "measure", "valueCode": recorded["measure"]},
        {"name": "epsilon", "valueDecimal": recorded["epsilon"]},
        {"name": "remaining", "valueDecimal": remaining},
        *recorded["cells"],
    ]}


def _compute(conn: Connection, project: ProjectRecord, query: Query, query_hash: str, version: str,
             client_id: str, idempotency_key: str | None, random_state: Any
             ) -> tuple[dict[str, Any] | None, Exception | None]:
    """Reserve, compute, record: (answer, None), or (None, the error) with the reservation kept."""
    budget.reserve(conn, project.project_id, query.epsilon, query_hash=query_hash,
                   idempotency_key=idempotency_key, actor=client_id)
    try:
        with conn.begin_nested():
            cells = noisy(query, exact(conn, query, project.project_id), project.suppression, random_state)
    except Exception as exc:  # the savepoint undoes the computation only, never the spend
        return None, exc
    recorded = {"measure": query.measure, "epsilon": query.epsilon, "cells": cells}
    budget.record_answer(conn, project.project_id, query_hash, version, recorded, idempotency_key)
    audit.record(conn, actor=client_id, action="aggregate", project_id=project.project_id,
                 detail={"query": query.canonical(), "epsilon": query.epsilon})
    return recorded, None
