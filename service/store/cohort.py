"""The consented rows an aggregate is computed on, bounded per patient, in SQL.

Every function that reads rows takes the caller's consent filter (`consented`, a
`search.RowFilter` over the resources table such as `service.release.restrict` returns)
and applies it to every row it reads: the cohort's Patients and each resource an
expression, a value or a bin looks at. It has no default: nothing here can be asked for
unfiltered rows.

The unit of privacy is the patient. SQL reduces each patient to one contribution, one
row per patient: a cohort member, their one bin (gender, age band, year; a code histogram
counts members per declared code), or their one value (the latest, mean, max, min or
count of their matching resources) clipped to the declared [lower, upper]; what is left
is counting or summing those rows. Bounds and bins come from the question, never from
the data. Cohorts and values are found from the index their expressions filter on, and
no query depends on the planner's statistics for that.
"""
from __future__ import annotations

import calendar
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from functools import lru_cache
from itertools import pairwise
from typing import Any

import orjson
from sqlalchemy import ColumnElement, Connection, Select, and_, bindparam, case, false, func, intersect, select
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression

from policies.fhirdates import date_range
from service.store.hints import unindexed
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
    *written, decision = conn.execute(_newest_writes(tuple(sorted(set(types)))), {"project": project_id}).one()
    return f"{max((w or 0 for w in written), default=0)}:{decision or 0}"


@lru_cache(maxsize=64)
def _newest_writes(types: tuple[str, ...]) -> Select[Any]:
    """SELECT the newest write instant of each of `types`, then of the decisions of project `:project`."""
    latest = [select(func.max(resources.c.last_updated)).where(resources.c.type == t).scalar_subquery()
              for t in types]
    decided = (select(func.max(decisions.c.updated)).where(decisions.c.project_id == bindparam("project"))
               .scalar_subquery())
    return select(*latest, decided)


def exact(conn: Connection, question: Question, consented: RowFilter) -> Exact:
    """The bounded aggregate over the rows `consented` keeps, and the patients of its cohort."""
    p, members = cohort_members(question.cohort, consented)
    group = question.group
    if group is not None and group.by != "code":
        return _binned(conn, group, p, members, consented)
    if question.value is not None:
        return _valued(conn, question, members, consented)
    result = Exact(patients=ids(conn, members))
    if question.measure == "count":
        result.count = len(result.patients)
    else:
        assert group is not None
        result.bins = {label: conn.execute(select(func.count()).select_from(
                           members.where(p.c.id.in_(having(coded, consented))).subquery())).scalar_one()
                       for label, coded in zip(group.bins, group.coded, strict=True)}
    return result


def _valued(conn: Connection, question: Question, members: Select[Any], consented: RowFilter) -> Exact:
    """A value aggregate over its cohort: the one clipped value of each cohort patient who has
    a matching resource (the values are read for every patient, found from the expression's
    index, and kept for the cohort's)."""
    assert question.value is not None
    result = Exact(patients=ids(conn, members))
    values = conn.execute(per_patient_values(question.value, consented)).all()
    result.values = [float(value) for patient_id, value in values if patient_id in result.patients]
    result.count = len(result.values)
    if question.measure != "quantile":
        result.total, result.values = math.fsum(result.values), []
    return result


def _binned(conn: Connection, group: Grouping, p: Any, members: Select[Any], consented: RowFilter) -> Exact:
    """A one-bin-per-patient histogram and its cohort, read together: each cohort patient with
    their bin (NULL, counted in none, when their key falls outside every declared bin)."""
    keyed = _bin_key(group, p, members, consented).subquery()
    labelled = select(keyed.c.id, _bin_label(group, keyed.c.key).label("bin")).subquery()
    found = Exact()
    for label, count, ids in conn.execute(select(labelled.c.bin, func.count(), _id_list(conn, labelled.c.id))
                                          .group_by(labelled.c.bin)):
        if label in group.bins:
            found.bins[label] = count
        found.patients.update(_loaded(conn, ids))
    return found


def _id_list(conn: Connection, column: Any) -> Any:
    """The aggregate collecting `column`'s values into one value: a JSON array on SQLite, an
    array on PostgreSQL. Read as one value, thousands of ids cost a fraction of as many rows."""
    return func.json_group_array(column) if conn.dialect.name == "sqlite" else func.array_agg(column)


def _loaded(conn: Connection, ids: Any) -> list[str]:
    """The ids `_id_list` collected (None: no row was aggregated)."""
    if ids is None:
        return []
    return orjson.loads(ids) if conn.dialect.name == "sqlite" else ids


def ids(conn: Connection, statement: Select[Any]) -> set[str]:
    """The ids (first column) `statement` selects, read as one aggregated value."""
    selected = statement.subquery()
    column = next(iter(selected.c))
    return set(_loaded(conn, conn.execute(select(_id_list(conn, column))).scalar_one()))


def having(expr: Expression, consented: RowFilter, *columns: Any) -> Select[Any]:
    """SELECT `columns` (by default patient_id) of the consented resources of `expr`:
    uncorrelated, so the database reads it once, starting from the index `expr` filters on.
    Rows an index found are read by their key: the type is then only checked on them."""
    typed = unindexed(resources.c.type) if _index_driven(expr) else resources.c.type
    return consented(select(*(columns or (resources.c.patient_id,))).where(
        typed == expr.resource_type, resources.c.deleted == false(), *expr.where))


def _index_driven(expr: Expression) -> bool:
    """Whether one of `expr`'s conditions is `pk IN (rows of an index table)`."""
    return any(isinstance(c, BinaryExpression) and c.left is resources.c.pk and c.operator is operators.in_op
               for c in expr.where)


def cohort_members(cohort: Iterable[Expression], consented: RowFilter) -> tuple[Any, Select[Any]]:
    """(p, SELECT p.id …): consented Patients matching every expression of `cohort`.

    `p` is a subquery of the consented Patient rows, so the expressions' own statements over
    `resources` stay uncorrelated with it and each gets the consent filter itself. Several
    expressions are one INTERSECT, whose statements the database plans one at a time: their
    conditions never become one join problem, however many there are.
    """
    p = consented(select(resources.c.pk, resources.c.id)
                  .where(resources.c.type == "Patient", resources.c.deleted == false())).subquery("p")
    matching = [having(expr, consented) for expr in cohort]
    if len(matching) > 1:
        matching = [intersect(*matching)]  # type: ignore[list-item]
    members = select(p.c.id).where(*(p.c.id.in_(statement) for statement in matching))
    return p, members


def clip(column: Any, lower: float, upper: float) -> Any:
    return case((column < lower, lower), (column > upper, upper), else_=column)


def per_patient_values(spec: Value, consented: RowFilter) -> Select[Any]:
    """SELECT pid, v: one clipped value per patient with a matching resource: the
    contribution bound every mechanism relies on."""
    if spec.reduce == "count":
        values = having(spec.expression, consented, resources.c.patient_id.label("pid"), func.count().label("v")) \
            .group_by(resources.c.patient_id).subquery()
        return select(values.c.pid, clip(values.c.v, spec.lower, spec.upper).label("v"))
    row = (having(
        spec.expression, consented, resources.c.patient_id.label("pid"), idx_quantity.c.value.label("v"),
        # Undated values last on both databases (PostgreSQL puts NULLs first when descending).
        func.row_number().over(partition_by=resources.c.patient_id,
                               order_by=(resources.c.clinical_low.is_(None), resources.c.clinical_low.desc(),
                                         resources.c.pk.desc()))
        .label("rn"))
        .join(idx_quantity, and_(idx_quantity.c.resource_pk == resources.c.pk,
                                 unindexed(idx_quantity.c.param) == "value-quantity"))).subquery()
    if spec.reduce == "latest":
        per_patient = select(row.c.pid, row.c.v).where(row.c.rn == 1).subquery()
    else:
        reducer = {"mean": func.avg, "max": func.max, "min": func.min}[spec.reduce]
        per_patient = select(row.c.pid, reducer(row.c.v).label("v")).group_by(row.c.pid).subquery()
    return select(per_patient.c.pid, clip(per_patient.c.v, spec.lower, spec.upper).label("v"))


def _years_before(at: date, years: int) -> int:
    """The last instant of the day on which someone born then turns `years` at `at`."""
    year = at.year - years
    day = min(at.day, calendar.monthrange(year, at.month)[1])
    return date_range(date(year, at.month, day).isoformat())[1]


def _bin_key(group: Grouping, p: Any, members: Select[Any], consented: RowFilter) -> Select[Any]:
    """SELECT id, key: each cohort patient once, with what their bin is decided on, computed
    once (gender code, birth date, earliest `expression` date; NULL if none is known)."""
    if group.by == "gender":
        gender = p.outerjoin(idx_token, and_(idx_token.c.resource_pk == p.c.pk,
                                             unindexed(idx_token.c.param) == "gender"))
        return members.add_columns(func.min(idx_token.c.code).label("key")).select_from(gender).group_by(p.c.id)
    if group.by == "age-band":
        born = p.outerjoin(idx_date, and_(idx_date.c.resource_pk == p.c.pk,
                                          unindexed(idx_date.c.param) == "birthdate"))
        return members.add_columns(func.min(idx_date.c.low).label("key")).select_from(born).group_by(p.c.id)
    assert group.expression is not None and group.by == "year"
    first = (having(group.expression, consented, resources.c.patient_id,
                     func.min(resources.c.clinical_low).label("first"))
             .group_by(resources.c.patient_id).subquery())
    return members.add_columns(first.c.first.label("key")).select_from(p.outerjoin(first, first.c.patient_id == p.c.id))


def _bin_label(group: Grouping, key: Any) -> Any:
    """The declared bin of a patient's `key` (from `_bin_key`), or NULL if it falls in none."""
    if group.by == "gender":
        return case((key.in_(GENDERS[:3]), key), else_="unknown")
    if group.by == "age-band":
        at = date.fromisoformat(group.at)
        bounds = [_years_before(at, edge) for edge in group.edges]
        whens = [(key > bounds[0], None)]
        whens += [(key > bounds[i + 1], label) for i, label in enumerate(group.bins)]
        return case(*whens, else_=None)
    first_year, last_year = group.years
    starts = [date_range(f"{y:04d}")[0] for y in range(first_year, last_year + 1)]
    starts.append(date_range(f"{last_year:04d}")[1] + 1)
    whens = [(key < starts[0], None)]
    whens += [(key < end, label) for (_, end), label in zip(pairwise(starts), group.bins, strict=True)]
    return case(*whens, else_=None)
