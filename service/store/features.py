"""The rows a model is trained on or applied to: one row per patient, in SQL.

`rows` takes the caller's consent filter (`consented`, a `search.RowFilter` over the
resources table: `service.release.Release.aggregate_filter` for training, the custodian's
own filter for scoring) and applies it to every row it reads, as `service/store/cohort.py`
does: the cohort's Patients and each resource a feature or the label looks at. It has no
default.

Each patient of the cohort (consented Patients matching every cohort expression) gives one
row, whatever the number of their resources: each feature is one value per patient
(`cohort.per_patient_values`: the latest, mean, max, min or count of their matching
resources; `has`: 1 if they have one, else 0; `age` in years from their birth date;
`gender`: 1 female, 0 male), clipped to the feature's declared [lower, upper] in SQL; a
patient without a value gets the declared `missing` value, never one from the data.

With an index date, features read only resources whose clinical date starts before it
(undated resources are left out) and the label only those whose clinical date starts on or
after it, and before the end of the horizon when there is one; ages are taken at the index
date (otherwise at `Design.at`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Float, Select, and_, case, cast, func, select

from service.store import cohort
from service.store.cohort import Expression, Value
from service.store.hints import unindexed
from service.store.schema import idx_date, idx_token, resources
from service.store.search import RowFilter

#: Microseconds in a year of 365.25 days: ages are fractional years.
YEAR_US = 365.25 * 86_400 * 1_000_000


@dataclass(frozen=True)
class Column:
    """One value per patient. `kind`: `expression` (`expression` reduced by `reduce`), `has`
    (1 if the patient has an `expression` resource, else 0), or `builtin` (`source` `age` or
    `gender`). Clipped to [lower, upper]; `missing` for a patient without a value, or None
    to leave such a patient out (a regression label)."""

    kind: str
    source: str
    lower: float
    upper: float
    missing: float | None
    reduce: str | None = None
    expression: Expression | None = None


@dataclass(frozen=True)
class Design:
    """What the rows hold: `features` in order, the optional `label`, the `cohort` every patient
    must match (empty: every consented Patient), the index date and the horizon after it (µs),
    and `at`, the instant ages are taken at without an index date."""

    features: tuple[Column, ...]
    at: int
    cohort: tuple[Expression, ...] = ()
    label: Column | None = None
    index: int | None = None
    horizon: int | None = None


@dataclass(frozen=True)
class Matrix:
    """One row per patient, sorted by patient id: `values[i]` holds the features of
    `patients[i]` in the design's order; `labels[i]` their label (None without a label)."""

    patients: list[str]
    values: list[list[float]]
    labels: list[float] | None


def before_index(design: Design) -> tuple[Any, ...]:
    """The condition every resource a feature reads meets: dated before the index date (none without one)."""
    return () if design.index is None else (resources.c.clinical_low < design.index,)


def _label_window(design: Design) -> tuple[Any, ...]:
    """The condition every resource the label reads meets: dated on or after the index date and
    before the end of the horizon (none without an index date)."""
    if design.index is None:
        return ()
    if design.horizon is None:
        return (resources.c.clinical_low >= design.index,)
    return resources.c.clinical_low >= design.index, resources.c.clinical_low < design.index + design.horizon


def rows(conn: Connection, design: Design, consented: RowFilter) -> Matrix:
    """The design's rows over the cohort patients `consented` keeps (module docstring)."""
    p, members = cohort.cohort_members(design.cohort, consented)
    patients = sorted(cohort.ids(conn, members))
    columns = [_values(conn, column, p, consented, before_index(design),
                       design.index if design.index is not None else design.at) for column in design.features]
    labels = None
    if design.label is not None:
        found = _values(conn, design.label, p, consented, _label_window(design), design.at)
        if design.label.missing is None:
            patients = [patient for patient in patients if patient in found]
        labels = [found.get(patient, design.label.missing) for patient in patients]
    values = [[found.get(patient, column.missing) for found, column in zip(columns, design.features, strict=True)]
              for patient in patients]
    return Matrix(patients, values, labels)  # type: ignore[arg-type]


def _dated(expression: Expression, dated: tuple[Any, ...]) -> Expression:
    return Expression(expression.text, expression.resource_type, (*expression.where, *dated))


def _values(conn: Connection, column: Column, p: Any, consented: RowFilter, dated: tuple[Any, ...],
            at: int) -> dict[str, float]:
    """Patient id → the column's clipped value, for the patients that have one (`has`: 1)."""
    if column.kind == "builtin":
        return {pid: float(v) for pid, v in conn.execute(_builtin(column, p, at)) if v is not None}
    assert column.expression is not None
    expression = _dated(column.expression, dated)
    if column.kind == "has":
        having = cohort.having(expression, consented).subquery()
        ones = select(p.c.id).where(p.c.id.in_(select(having.c.patient_id)))
        return dict.fromkeys(cohort.ids(conn, ones), 1.0)
    assert column.reduce is not None
    spec = Value(expression, column.reduce, column.lower, column.upper)
    return {pid: float(v) for pid, v in conn.execute(cohort.per_patient_values(spec, consented))}


def _builtin(column: Column, p: Any, at: int) -> Select[Any]:
    """SELECT id, value of every Patient of `p`: age in years at `at` from the birth date, or
    gender as 1 (female), 0 (male) or NULL (anything else), clipped to the column's bounds."""
    if column.source == "age":
        born = p.join(idx_date, and_(idx_date.c.resource_pk == p.c.pk,
                                     unindexed(idx_date.c.param) == "birthdate"))
        age = cast(at - func.min(idx_date.c.low), Float) / YEAR_US
        return select(p.c.id, cohort.clip(age, column.lower, column.upper)).select_from(born).group_by(p.c.id)
    gendered = p.join(idx_token, and_(idx_token.c.resource_pk == p.c.pk,
                                      unindexed(idx_token.c.param) == "gender"))
    code = func.min(idx_token.c.code)
    return (select(p.c.id, case((code == "female", 1.0), (code == "male", 0.0), else_=None))
            .select_from(gendered).group_by(p.c.id))

