"""`$aggregate`: differentially private answers to questions about consenting patients.

Order of work for one question:

1. parse and check everything that depends only on the question and the project (no
   database write, nothing spent): a 400 or 403 here is free;
2. in a short write transaction (`Release.reserve`), the answer already
   recorded for the same question on the same data, or ε reserved for computing it
   (403 `too-costly` when it does not fit);
3. in a read transaction, which blocks no writer however long it takes
   (`Release.aggregate_rows`), the exact aggregate over the consented rows, bounded per
   patient in SQL (`service/store/cohort.py`), each statement bounded in time
   (`PASSERELLE_STATISTICS_TIMEOUT_SECONDS`; past it 422 `too-costly`); then noise
   (`policies/dp.py`) and suppression of small noisy counts;
4. in another short write transaction (`Release.record`), the answer recorded
   with its audit entry naming the cohort's patients: if either cannot be written, nothing
   is released. A recorded answer given again is audited too (`Release.audit`), as a
   replay (nothing spent, no patient newly released).

Once ε is reserved it stays spent, whatever fails after: a failure of the computation may
depend on the data and must not be free. The answer's `remaining` is the budget left
once this question was paid for.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from itertools import pairwise
from typing import Any

from flask import current_app

from consent.projects import ProjectRecord
from policies import budget, dp
from service.errors import InvalidRequest
from service.parameters import (
    cohort_of,
    compiled,
    epsilon_of,
    expression,
    find,
    number,
    only,
    parameters,
    parts_of,
    string,
    value_of,
    valued_expression,
)
from service.release import Release
from service.store.cohort import GENDERS, REDUCERS, Exact, Expression, Grouping, Question, Value
from service.store.searchparams import params_for

MEASURES = ("count", "histogram", "sum", "mean", "quantile")
#: Measures of one value per patient (the `value` parameter).
VALUE_MEASURES = ("sum", "mean", "quantile")
#: Share of ε spent on the noisy count that decides suppression for sums and quantiles.
SUPPRESSION_SHARE = 0.25
#: Ages and years a question may name: nobody is older, no stored date is later.
MAX_AGE = 150
FIRST_YEAR, LAST_YEAR = 1800, 9999
#: Bins a histogram may ask for.
MAX_BINS = 200

_PARAMETERS = ("measure", "cohort", "value", "groupBy", "epsilon", "q")
_VALUE_PARTS = ("expression", "reduce", "lower", "upper")
_GROUP_PARTS = {"gender": (), "age-band": ("edges", "at"), "year": ("from", "to", "expression"),
                "code": ("codes", "expression")}


@dataclass(frozen=True)
class Query:
    """One parsed, checked $aggregate request: the question, the ε it spends and, for a quantile, q."""

    question: Question
    epsilon: float
    q: float | None = None

    def canonical(self) -> dict[str, Any]:
        """What identifies the request (hashed to recognise a repeated one): ε and q included,
        since the same question at another ε is another release."""
        question = self.question
        group = question.group
        return {
            "measure": question.measure, "epsilon": repr(float(self.epsilon)), "q": repr(self.q),
            "cohort": sorted(e.text for e in question.cohort),
            "value": None if question.value is None else [
                question.value.expression.text, question.value.reduce, repr(question.value.lower),
                repr(question.value.upper)],
            "group": None if group is None else [
                group.by, list(group.bins), list(group.edges), group.at, list(group.years),
                group.expression.text if group.expression else None],
        }


# -- parsing the Parameters resource -----------------------------------------------------------


def _bins(count: int) -> None:
    if count > MAX_BINS:
        raise InvalidRequest(f"a histogram has at most {MAX_BINS} bins, not {count}", expression="groupBy")


def _whole(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"parameter {name!r} must be a whole number from {low} to {high}", expression=name)
    return value


def _value_spec(items: list[dict[str, Any]], measure: str) -> Value:
    parts = parts_of(items, "value")
    if parts is None:
        raise InvalidRequest(f"parameter 'value' is required for measure {measure}", expression="value")
    only(parts, _VALUE_PARTS, "value.")
    reduce = value_of(parts, "reduce", "value.") or "latest"
    if reduce not in REDUCERS:
        raise InvalidRequest(f"value.reduce must be one of {', '.join(REDUCERS)}", expression="value.reduce")
    lower_raw, upper_raw = value_of(parts, "lower", "value."), value_of(parts, "upper", "value.")
    if lower_raw is None or upper_raw is None:
        raise InvalidRequest("value.lower and value.upper are required: bounds are declared, never taken "
                             "from the data", expression="value.lower" if lower_raw is None else "value.upper")
    lower, upper = number(lower_raw, "value.lower"), number(upper_raw, "value.upper")
    if not lower < upper:
        raise InvalidRequest("value.lower must be below value.upper", expression="value.lower")
    spec = valued_expression(value_of(parts, "expression", "value.", required=True), reduce, "value.expression")
    return Value(spec, reduce, lower, upper)


def _age_bands(parts: list[dict[str, Any]]) -> Grouping:
    raw = string(value_of(parts, "edges", "groupBy.", required=True), "groupBy.edges")
    try:
        edges = tuple(int(e) for e in raw.split(","))
    except ValueError:
        raise InvalidRequest("groupBy.edges must be whole years, e.g. 0,18,40,65,90",
                             expression="groupBy.edges") from None
    if len(edges) < 2 or any(b <= a for a, b in pairwise(edges)) or edges[0] < 0 or edges[-1] > MAX_AGE:
        raise InvalidRequest(f"groupBy.edges must be at least two increasing ages from 0 to {MAX_AGE}",
                             expression="groupBy.edges")
    at_raw = value_of(parts, "at", "groupBy.")
    try:
        at = datetime.now(UTC).date() if at_raw is None else date.fromisoformat(string(at_raw, "groupBy.at"))
    except ValueError:
        at = None
    if at is None or not FIRST_YEAR <= at.year <= LAST_YEAR:
        raise InvalidRequest(f"groupBy.at must be a date (YYYY-MM-DD) from {FIRST_YEAR} to {LAST_YEAR}",
                             expression="groupBy.at")
    bins = tuple(f"{a}-{b - 1}" for a, b in pairwise(edges))
    return Grouping("age-band", bins, edges=edges, at=at.isoformat())


def _years(parts: list[dict[str, Any]]) -> Grouping:
    start = _whole(value_of(parts, "from", "groupBy.", required=True), "groupBy.from", FIRST_YEAR, LAST_YEAR)
    end = _whole(value_of(parts, "to", "groupBy.", required=True), "groupBy.to", start, LAST_YEAR)
    _bins(end - start + 1)
    return Grouping("year", tuple(str(y) for y in range(start, end + 1)), years=(start, end),
                    expression=expression(value_of(parts, "expression", "groupBy.", required=True),
                                          "groupBy.expression"))


def _codes(parts: list[dict[str, Any]]) -> Grouping:
    raw = string(value_of(parts, "codes", "groupBy.", required=True), "groupBy.codes")
    codes = tuple(dict.fromkeys(c.strip() for c in raw.split(",") if c.strip()))
    if not codes or any("|" not in c for c in codes):
        raise InvalidRequest("groupBy.codes must list system|code values", expression="groupBy.codes")
    _bins(len(codes))
    of = expression(value_of(parts, "expression", "groupBy.", required=True), "groupBy.expression")
    if "code" not in params_for(of.resource_type):
        raise InvalidRequest(f"groupBy.expression: {of.resource_type} has no code to group by",
                             expression="groupBy.expression")
    coded = tuple(compiled(of.text, of.resource_type, [("code", c)], "groupBy.codes") for c in codes)
    return Grouping("code", codes, expression=of,
                    coded=tuple(Expression(of.text, of.resource_type, (*of.where, *c.where)) for c in coded))


def _grouping(items: list[dict[str, Any]]) -> Grouping:
    parts = parts_of(items, "groupBy")
    if parts is None:
        raise InvalidRequest("parameter 'groupBy' is required for measure histogram", expression="groupBy")
    by = value_of(parts, "by", "groupBy.", required=True)
    if not isinstance(by, str) or by not in _GROUP_PARTS:
        raise InvalidRequest(f"groupBy.by must be one of {', '.join(_GROUP_PARTS)}", expression="groupBy.by")
    only(parts, ("by", *_GROUP_PARTS[by]), "groupBy.")
    if by == "gender":
        return Grouping("gender", GENDERS)
    return {"age-band": _age_bands, "year": _years, "code": _codes}[by](parts)


def _absent(items: list[dict[str, Any]], name: str, measure: str) -> None:
    if find(items, name) is not None:
        raise InvalidRequest(f"{name} has no meaning for measure {measure}", expression=name)


def parse(body: Any, project: ProjectRecord, min_epsilon: float) -> Query:
    """Check every parameter against the question alone and the project's ε cap; errors name the parameter."""
    items = parameters(body, "$aggregate", _PARAMETERS)
    measure = value_of(items, "measure", required=True)
    if not isinstance(measure, str) or measure not in MEASURES:
        raise InvalidRequest(f"measure must be one of {', '.join(MEASURES)}", expression="measure")
    epsilon = epsilon_of(items, project, min_epsilon)
    cohort = cohort_of(items)
    value = _value_spec(items, measure) if measure in VALUE_MEASURES else _absent(items, "value", measure)
    group = _grouping(items) if measure == "histogram" else _absent(items, "groupBy", measure)
    q = None
    if measure == "quantile":
        q = number(value_of(items, "q", required=True), "q")
        if not 0 < q < 1:
            raise InvalidRequest("q must be between 0 and 1", expression="q")
    else:
        _absent(items, "q", measure)
    return Query(Question(measure, cohort, value, group), epsilon, q)


def _check_types(release: Release, question: Question) -> None:
    """Only over data the project receives (each expression's type, and Patient when bins read it),
    searched by no identifying value."""
    named = {e.resource_type for e in question.expressions}
    if question.group is not None and question.group.by in ("gender", "age-band"):
        named.add("Patient")
    for resource_type in sorted(named):
        release.require_type(resource_type)
    release.require_statistical(question.expressions)


# -- noise, suppression, the answer ------------------------------------------------------------


def _cell(released: dp.Released, label: str | None, suppressed: bool) -> dict[str, Any]:
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
    eps, question = query.epsilon, query.question
    if question.measure == "count":
        released = dp.Count(eps).release(found.count, random_state=random_state)
        return [_cell(released, None, dp.suppress(released, threshold))]
    if question.measure == "histogram":
        assert question.group is not None
        histogram = dp.Histogram(eps, question.group.bins, question.group.bins_per_patient
                                 ).release(found.bins, random_state=random_state)
        return [_cell(r, label, dp.suppress(r, threshold)) for label, r in histogram.bins.items()]
    assert question.value is not None
    lower, upper = question.value.lower, question.value.upper
    if question.measure == "mean":
        released = dp.BoundedMean(eps, lower, upper).release(found.total, found.count, random_state=random_state)
        return [_cell(released, None, dp.suppress(released, threshold))]
    # Sums and quantiles carry no count: a quarter of ε buys the noisy count that decides suppression.
    gate = dp.Count(eps * SUPPRESSION_SHARE).release(found.count, random_state=random_state)
    rest = eps * (1 - SUPPRESSION_SHARE)
    if question.measure == "sum":
        released = dp.BoundedSum(rest, lower, upper).release(found.total, random_state=random_state)
    else:
        assert query.q is not None
        released = dp.Quantile(rest, query.q, lower, upper).release(found.values, random_state=random_state)
    return [_cell(released, None, dp.suppress(gate, threshold))]


def answer(release: Release, body: Any, idempotency_key: str | None, random_state: Any = None) -> dict[str, Any]:
    """Answer one $aggregate request: the recorded answer, or one computed after ε is reserved."""
    query = parse(body, release.project, current_app.config["MIN_EPSILON"])
    _check_types(release, query.question)
    canonical = query.canonical()
    question = budget.canonical_text(canonical)
    query_hash = budget.text_hash(question)
    claim = release.reserve(query.question.types, question, query.epsilon, idempotency_key)
    response = claim.answer
    if response is None:
        found, version = release.aggregate_rows(query.question)
        cells = noisy(query, found, release.project.suppression, random_state)
        response = release.record(
            "aggregate", query_hash, version,
            {"measure": query.question.measure, "epsilon": query.epsilon, "cells": cells}, idempotency_key,
            {"query": canonical, "query_hash": query_hash, "epsilon": query.epsilon}, found.patients)
    else:
        release.audit("aggregate", {"query": canonical, "query_hash": query_hash, "epsilon": 0.0,
                                    "replayed": True}, (), 0)
    return {"resourceType": "Parameters", "parameter": [
        {"name": "measure", "valueCode": response["measure"]},
        {"name": "epsilon", "valueDecimal": response["epsilon"]},
        {"name": "remaining", "valueDecimal": claim.remaining},
        *response["cells"],
    ]}
