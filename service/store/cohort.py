"""The consented rows an aggregate is computed on, bounded per patient, in SQL.

Every function that reads rows takes the caller's consent filter (`consented`, a
`search.RowFilter` over the resources table such as `service.release.restrict` returns)
and applies it to every row it reads: the cohort's Patients and each resource an
expression, a value or a bin looks at. It has no default: nothing here can be asked for
unfiltered rows.

The unit of privacy is the patient. SQL reduces each patient to one contribution before
any aggregate: a count counts patients, a histogram counts patients per declared bin,
and a value is one number per patient (the latest, mean, max, min or count of their
matching resources) clipped to the declared [lower, upper]. Bounds and bins come from
the question, never from the data.
"""
from __future__ import annotations

import calendar
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from itertools import pairwise
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, and_, case, false, func, literal, select

from policies.fhirdates import date_range
from service.store.schema import decisions, idx_date, idx_quantity, idx_token, resources
from service.store.search import RowFilter

#: How one patient's matching values are reduced to the one value they contribute.
REDUCERS = ("latest", "mean", "max", "min", "count")
#: Gender bins (administrative gender; anything else or nothing counts as "unknown").
GENDERS = ("male", "female", "other", "unknown")


@dataclass(frozen=True)
class Expression:
    """A FHIR search (`Type?params`) compiled to the conditions one patient's resource must meet."""

    text: str
    resource_type: str
    where: tuple[ColumnElement[bool], ...] = field(compare=False)


@dataclass(frozen=True)
class Value:
    """One value per patient: `reduce` over their `expression` resources, clipped to [lower, upper]."""

    expression: Expression
    reduce: str
    lower: float
    upper: float


@dataclass(frozen=True)
class Grouping:
    """Declared bins, labelled `bins`.

    `gender`; `age-band`: ages in whole years at date `at`, cut at `edges`; `year`: the year
    (from `years[0]` to `years[1]`) of the patient's earliest `expression` resource; `code`:
    one bin per expression in `coded`, aligned with `bins`, where a patient counts in every
    bin they have a resource for.
    """

    by: str
    bins: tuple[str, ...]
    edges: tuple[int, ...] = ()
    at: str = ""
    years: tuple[int, int] = (0, 0)
    expression: Expression | None = None
    coded: tuple[Expression, ...] = ()

    @property
    def bins_per_patient(self) -> int:
        """The most bins one patient can count in: every coded bin, or one."""
        return len(self.coded) if self.by == "code" else 1


@dataclass(frozen=True)
class Question:
    """What an aggregate is computed on: the measure, the cohort every patient must match, and
    the value (sum, mean, quantile) or the bins (histogram) it is about."""

    measure: str
    cohort: tuple[Expression, ...] = ()
    value: Value | None = None
    group: Grouping | None = None

    @property
    def expressions(self) -> tuple[Expression, ...]:
        extra = (self.value.expression,) if self.value else ()
        if self.group is not None:
            extra += (*((self.group.expression,) if self.group.expression else ()), *self.group.coded)
        return (*self.cohort, *extra)

    @property
    def types(self) -> tuple[str, ...]:
        """Every resource type the answer reads rows of: Patient (the unit) and each expression's."""
        return tuple(sorted({"Patient", *(e.resource_type for e in self.expressions)}))


@dataclass
class Exact:
    """A bounded aggregate before noise (never released as such), and the cohort it was computed on."""

    count: int = 0
    total: float = 0.0
    values: list[float] = field(default_factory=list)
    bins: dict[str, int] = field(default_factory=dict)
    patients: set[str] = field(default_factory=set)


def data_version(conn: Connection, project_id: str, types: Iterable[str]) -> str:
    """Changes whenever a resource of one of `types` or one of the project's decisions is written.

    Reads only the newest write instants, one index look-up per type (resources
    (type, last_updated)) and one for the decisions (project_id, updated), never row content.
    """
    latest = [select(func.max(resources.c.last_updated)).where(resources.c.type == t).scalar_subquery()
              for t in sorted(set(types))]
    decided = select(func.max(decisions.c.updated)).where(decisions.c.project_id == project_id).scalar_subquery()
    *written, decision = conn.execute(select(*latest, decided)).one()
    return f"{max((w or 0 for w in written), default=0)}:{decision or 0}"


def exact(conn: Connection, question: Question, consented: RowFilter) -> Exact:
    """The bounded aggregate over the rows `consented` keeps, and the patients of its cohort."""
    p, members = _cohort(question, consented)
    result = Exact(patients=set(conn.execute(members).scalars()))
    if question.measure == "count":
        result.count = len(result.patients)
    elif question.measure == "histogram":
        assert question.group is not None
        result.bins = _histogram(conn, question.group, p, members, consented)
    else:
        assert question.value is not None
        values = _per_patient_values(question.value, members, consented).subquery()
        if question.measure == "quantile":
            result.values = [float(v) for v in conn.execute(select(values.c.v)).scalars()]
            result.count = len(result.values)
        else:
            count, total = conn.execute(select(func.count(), func.sum(values.c.v))).one()
            result.count, result.total = count, float(total or 0.0)
    return result


def _within_patient(expr: Expression, patient_id: Any, consented: RowFilter) -> Select[Any]:
    """A consented resource of `expr` that belongs to the patient `patient_id` (a correlated column)."""
    return consented(select(literal(1)).where(resources.c.type == expr.resource_type, resources.c.deleted == false(),
                                              resources.c.patient_id == patient_id, *expr.where))


def _cohort(question: Question, consented: RowFilter) -> tuple[Any, Select[Any]]:
    """(p, SELECT p.id …): consented Patients matching every cohort expression.

    `p` is a subquery of the consented Patient rows, so the expressions' own statements over
    `resources` stay uncorrelated with it and each gets the consent filter itself.
    """
    p = consented(select(resources.c.pk, resources.c.id)
                  .where(resources.c.type == "Patient", resources.c.deleted == false())).subquery("p")
    members = select(p.c.id)
    for expr in question.cohort:
        members = members.where(_within_patient(expr, p.c.id, consented).exists())
    return p, members


def _histogram(conn: Connection, group: Grouping, p: Any, members: Select[Any], consented: RowFilter
               ) -> dict[str, int]:
    if group.by == "code":
        return {label: conn.execute(select(func.count()).select_from(
                    members.where(_within_patient(coded, p.c.id, consented).exists()).subquery())).scalar_one()
                for label, coded in zip(group.bins, group.coded, strict=True)}
    labelled = members.add_columns(_bin_label(group, p, consented).label("bin")).subquery()
    rows = conn.execute(select(labelled.c.bin, func.count()).where(labelled.c.bin.is_not(None))
                        .group_by(labelled.c.bin))
    return {label: n for label, n in rows if label in group.bins}


def _clip(column: Any, lower: float, upper: float) -> Any:
    return case((column < lower, lower), (column > upper, upper), else_=column)


def _per_patient_values(spec: Value, members: Select[Any], consented: RowFilter) -> Select[Any]:
    """One clipped value per cohort patient: the contribution bound every mechanism relies on."""
    matching = (resources.c.type == spec.expression.resource_type, resources.c.deleted == false(),
                resources.c.patient_id.in_(members), *spec.expression.where)
    if spec.reduce == "count":
        counted = consented(select(resources.c.patient_id, func.count().label("v")).where(*matching))
        values = counted.group_by(resources.c.patient_id).subquery()
        return select(_clip(values.c.v, spec.lower, spec.upper).label("v"))
    row = consented(
        select(resources.c.patient_id.label("pid"), idx_quantity.c.value.label("v"),
               # Undated values last on both databases (PostgreSQL puts NULLs first when descending).
               func.row_number().over(partition_by=resources.c.patient_id,
                                      order_by=(resources.c.clinical_low.is_(None), resources.c.clinical_low.desc(),
                                                resources.c.pk.desc()))
               .label("rn"))
        .join(idx_quantity, and_(idx_quantity.c.resource_pk == resources.c.pk,
                                 idx_quantity.c.param == "value-quantity"))
        .where(*matching)).subquery()
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


def _bin_label(group: Grouping, p: Any, consented: RowFilter) -> Any:
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
    first = (_within_patient(group.expression, p.c.id, consented)
             .with_only_columns(func.min(resources.c.clinical_low)).scalar_subquery())
    first_year, last_year = group.years
    starts = [date_range(f"{y:04d}")[0] for y in range(first_year, last_year + 1)]
    starts.append(date_range(f"{last_year:04d}")[1] + 1)
    whens = [(first < starts[0], None)]
    whens += [(first < end, label) for (_, end), label in zip(pairwise(starts), group.bins, strict=True)]
    return case(*whens, else_=None)
