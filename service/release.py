"""The one gate: the only way data leaves Passerelle for research.

A research caller holds one `Release` (its project, client, tier, key and profile) and
reaches stored data only through its methods: search (with `_include`), read, version
read, export rows and files, and the consented rows an aggregate or a training builds on. Each path
applies, in this order and nowhere else:

1. project and type checks (`Release.require_type`, `Release.translate`): only the types
   the project declared, directory types (Practitioner, Organization, …) only when declared;
2. the consent filter inside the SQL statement (`restrict`), judged on the row's own
   version: its patient, sensitivity mask, resource class and clinical dates; a row whose
   mask carries `CUSTODIAN_ONLY` (labelled custodian-only, as every RiskAssessment `$score`
   writes, or inheriting it) passes no research filter, whatever the consents (`_open`);
3. de-identification (`Release.deidentify`), where a reference survives only if its target
   would itself be released to this project (the reference look-up goes through the same
   filter), otherwise the element is removed; a released form may be remembered and given
   again, only for the same key, profile, row and reference look-ups (service/released_forms.py);
4. an audit entry naming the patients whose data left, written before the response leaves
   (`Release.audit`; for an `$aggregate` or `$train` answer, in the transaction that
   records it, `Release.record`): if it cannot be written, nothing is released.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

import orjson
from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    Select,
    String,
    TypeDecorator,
    and_,
    any_,
    bindparam,
    exists,
    false,
    func,
    literal_column,
    not_,
    or_,
    select,
    true,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import Grouping

from consent import engine, projects
from consent.projects import DIRECTORY_TYPES, PATIENT_DATA_TYPES, ProjectRecord
from policies import budget
from policies.deid import Deidentifier
from policies.pseudonym import PseudonymKey
from policies.sensitivity import CUSTODIAN_ONLY
from service import audit, db, keyring, released_forms
from service.api.searchset import run_search
from service.auth import Principal
from service.errors import Forbidden, InvalidRequest, NotFound
from service.store import cohort, features, jobs, project_groups, search
from service.store.hints import unindexed
from service.store.indexer import parse_reference
from service.store.schema import decision_classes, decisions, history, idx_reference, resources
from service.store.searchparams import COMPARTMENT, SearchParam, params_for
from service.validation import VERSION_NUMBER, model_for

#: Search parameters that would let a caller probe identifying or shifted values.
_WITHHELD_PARAMS = frozenset({"identifier", "telecom", "phone", "email", "_security", "_tag", "_profile",
                              "_lastUpdated"})
#: Modifiers that would let a caller probe identifying text or identifiers, and why.
_WITHHELD_MODIFIERS = {
    "text": "it searches free text and display names, which may identify",
    "identifier": "it searches identifiers",
    "of-type": "it searches identifiers",
}
_RESULT_PARAMS = frozenset({"_count", "_total", "_summary", "_include", "_revinclude", "_elements", "_cursor",
                            "_format", "_pretty"})
#: The result parameters the research view answers (no `_sort`: order would reveal real values);
#: also what a search link shows of them.
RESEARCH_RESULT_PARAMS = ("_count", "_total", "_summary", "_include", "_revinclude", "_elements")
#: Parameters a `_typeFilter` query may not hold: they shape a search's result, they filter nothing.
_NOT_FILTERS = frozenset({*search.RESULT_PARAMS, "_elements", "_revinclude", "_contained", "_containedType"})
#: Stands for a pseudonym that resolves to nothing: no stored id can contain "~".
_NOTHING = "~"
_COMPARTMENT_TYPES = frozenset({"Patient", *COMPARTMENT})
#: Directory types released only through a released row that names them, by the reference
#: parameter that does: a Medication alone says nothing, but which one a patient takes is theirs.
_THROUGH_REFERRERS = {"Medication": "medication"}
#: A "reference" member with a string value in JSON text. It cannot match inside a string
#: value, where every quote is escaped and the pattern allows no backslash before one.
#: The string's characters are `(?:[^"\\]|\\.)*` unrolled: the same strings, without an alternation per character.
_REFERENCE = re.compile(rb'"reference"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"')


@dataclass(frozen=True)
class Judged:
    """The columns consent judges a row on, and the tables they come from.

    `current(table)` judges the current version (the resources table or an alias of it);
    `version()` judges a row of `history` on that version's own patient, sensitivity and
    clinical dates (only the type and id, which never change, come from `resources`).
    """

    type: Any
    id: Any
    patient_id: Any
    sensitive_mask: Any
    clinical_low: Any
    clinical_high: Any
    tables: tuple[Any, ...]

    @classmethod
    def current(cls, table: Any = resources) -> Judged:
        c = table.c
        return cls(c.type, c.id, c.patient_id, c.sensitive_mask, c.clinical_low, c.clinical_high, (table,))

    @classmethod
    def version(cls) -> Judged:
        h = history.c
        return cls(resources.c.type, resources.c.id, h.patient_id, h.sensitive_mask, h.clinical_low,
                   h.clinical_high, (resources, history))


def restrict(project_id: str, minimum_tier: int, now: int | None = None, table: Any = resources, *,
             types: Iterable[str] = PATIENT_DATA_TYPES, whole_cohorts: bool = False) -> search.RowFilter:
    """The consent filter as SQL: only rows of `types` the project's decisions allow, inside the query.

    A patient-compartment row needs a decision of at least `minimum_tier` for its
    patient that is in force now, whose excluded categories do not meet the row's
    sensitivity mask, whose excluded classes do not include its type, and whose data
    period contains its clinical date (a row without one is withheld when a period
    applies; the Patient resource itself carries no clinical date and is exempt). A
    directory row (Practitioner, Organization, …) passes only if its type is in `types`;
    a Medication, which tells what a patient takes, only if a row of `types` that passes
    this filter names it as its medication (`_THROUGH_REFERRERS`). No custodian-only row
    passes (`_open`).
    `table` is the resources table, an alias of it, or a `Judged` (e.g. `Judged.version()`).
    `whole_cohorts` is for a statistical read, which reads every consented row of its types: with
    patient-compartment types only, the condition is then a plain conjunction, which PostgreSQL
    joins the decisions into (in parallel, and by hash: `db.statistics_read`). Otherwise a row's
    decision is probed row by row, which suits a read of rows found by key or read a page at a time
    (joined, a few rows by id were planned from every decision of the project).
    Everything but the instant is built once per (project, tier, types, table) and process.
    """
    allowed = _allowed(project_id, minimum_tier, now if now is not None else db.now_us(), table,
                       tuple(sorted(set(types))), whole_cohorts=whole_cohorts)
    return lambda statement: statement.where(allowed)


def _allowed(project_id: str, minimum_tier: int, instant: Any, table: Any, types: tuple[str, ...], *,
             whole_cohorts: bool = False) -> Any:
    """`restrict`'s condition on one row (`table`: as `restrict` takes it), judged at `instant`.

    `whole_cohorts` (with patient-compartment types only): a plain conjunction with no `OR`, the row's own
    tests beside the decision's `EXISTS`, which PostgreSQL turns into a join only when nothing but
    `AND` stands above it. Otherwise an `OR` of the alternatives, each probing per row."""
    judged = table if isinstance(table, Judged) else Judged.current(table)
    parts = _filter_parts(judged, project_id, minimum_tier, types)
    if parts.consented is None:
        return parts.directory
    if whole_cohorts and not set(types) - _COMPARTMENT_TYPES:
        return and_(parts.in_compartment, parts.consented.at(instant, beside=True))
    # `directory` stays an alternative when no directory type is asked for (`… OR false`): PostgreSQL then
    # keeps each decision test a probe of the row it judges; a lone EXISTS it would join, and it planned a
    # few rows found by id from every decision of the project.
    return or_(and_(parts.in_compartment, parts.consented.at(instant)), parts.directory,
               *(and_(is_target, named.at(instant)) for is_target, named in parts.through))


@dataclass(frozen=True)
class _Consented:
    """A patient-compartment row is released, but for the instant: what it must be by itself
    (`row`), and `EXISTS` a decision of the project that releases it, whose clauses that do not
    depend on the instant are built once, with the statement's correlation."""

    row: tuple[Any, ...]
    clauses: tuple[Any, ...]
    correlate: tuple[Any, ...]

    def at(self, instant: int, *, beside: bool = False) -> Any:
        """The decision must also be in force at `instant`. The row's own tests go inside the `EXISTS`
        (the form an `OR` of the filter's alternatives needs: PostgreSQL then probes the decision once
        per row), or `beside` it, where nothing but `AND` stands above the condition and PostgreSQL
        joins the decisions (they do not depend on the decision: the same rows pass)."""
        decided = exists(select(_ONE).where(
            *self.clauses,
            *(() if beside else self.row),
            or_(decisions.c.valid_from.is_(None), decisions.c.valid_from <= instant),
            or_(decisions.c.valid_until.is_(None), decisions.c.valid_until >= instant),
        ).correlate(*self.correlate))
        return and_(*self.row, decided) if beside else decided


@dataclass(frozen=True)
class _Named:
    """`EXISTS` a released referrer row that names the judged directory row (`_THROUGH_REFERRERS`)."""

    clauses: tuple[Any, ...]
    consented: _Consented
    join: Any
    correlate: tuple[Any, ...]

    def at(self, instant: int) -> Any:
        return exists(select(_ONE).select_from(self.join)
                      .where(*self.clauses, self.consented.at(instant)).correlate(*self.correlate))


@dataclass(frozen=True)
class _FilterParts:
    in_compartment: Any
    consented: _Consented | None
    directory: Any
    through: tuple[tuple[Any, _Named], ...]


@lru_cache(maxsize=512)
def _filter_parts(judged: Judged, project_id: str, minimum_tier: int, types: tuple[str, ...]) -> _FilterParts:
    """The instant-independent parts of `restrict` (type lists, decision and class clauses)."""
    wanted = set(types)
    in_compartment = sorted(wanted & _COMPARTMENT_TYPES)
    directory = wanted - _COMPARTMENT_TYPES
    directory_clause = and_(_one_of(judged.type, directory - set(_THROUGH_REFERRERS)), _open(judged))
    if not in_compartment:
        return _FilterParts(None, None, directory_clause, ())
    through = []
    for target, param in _THROUGH_REFERRERS.items():
        if target in directory:
            referrer = resources.alias(f"referrer_{target.lower()}")
            named = _Named((idx_reference.c.param == _constant(param), idx_reference.c.target_id == judged.id,
                            idx_reference.c.target_type == _constant(target), referrer.c.deleted == false(),
                            _one_of(referrer.c.type, in_compartment)),
                           _consented(Judged.current(referrer), project_id, minimum_tier),
                           idx_reference.join(referrer, referrer.c.pk == idx_reference.c.resource_pk),
                           judged.tables)
            through.append((judged.type == _constant(target), named))
    # Not an index key on SQLite: the statement's own conditions find its rows (a resource read by key).
    return _FilterParts(_one_of(unindexed(judged.type), in_compartment), _consented(judged, project_id, minimum_tier),
                        directory_clause, tuple(through))


def _one_of(column: Any, names: Iterable[str]) -> Any:
    """`column IN (names)` with the names written into the SQL (`_constant`), so a statement's compiled
    form is reused whole (an expanding list is rendered again at every execution); FALSE for no names."""
    chosen = sorted(names)
    return column.in_([_constant(name) for name in chosen]) if chosen else false()


#: Constants of the consent filter written into its SQL, not bound: a statement filtered by it then
#: carries only the parameters that change (project, tier, instant and the statement's own).
_ONE = literal_column("1")
_NAME = re.compile(r"[A-Za-z]+")


def _constant(name: str) -> Any:
    """A type or parameter name as an SQL string constant (only letters: nothing to escape)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a name: {name!r}")
    return literal_column(f"'{name}'", String)


def _open(judged: Judged) -> Any:
    """The row is not custodian-only (policies.sensitivity.CUSTODIAN_ONLY): no consent releases one.

    Written as a range, which for a mask is the same test (masks are never negative and no
    category bit lies above CUSTODIAN_ONLY; a negative one fails it), so that the planner
    estimates it from the column's statistics: PostgreSQL gives `mask & bit = 0` a fixed 0.5 %
    (one of the misestimates that planned the full-scale `$aggregate` cohort at 66 rows for 99,877).
    """
    return judged.sensitive_mask.between(literal_column("0", BigInteger),
                                         literal_column(str(CUSTODIAN_ONLY - 1), BigInteger))


def _consented(judged: Judged, project_id: str, minimum_tier: int) -> _Consented:
    """A decision of the project that releases this patient-compartment row (`_Consented.at` an instant).

    What does not depend on the decision (the row is not custodian-only, and no class the patient
    excluded from the project is the row's type) is kept apart, for `_Consented.at` to place."""
    in_period = or_(
        judged.type == _constant("Patient"),
        and_(decisions.c.period_start.is_(None), decisions.c.period_end.is_(None)),
        and_(judged.clinical_low.is_not(None),
             or_(decisions.c.period_start.is_(None), judged.clinical_low >= decisions.c.period_start),
             or_(decisions.c.period_end.is_(None), judged.clinical_high <= decisions.c.period_end)),
    )
    # Correlated explicitly: inside the decision's EXISTS it is two levels down, where auto-correlation
    # would not reach the judged row.
    excluded_class = exists(select(_ONE).where(
        decision_classes.c.patient_id == judged.patient_id,
        decision_classes.c.project_id == project_id,
        decision_classes.c.resource_type == judged.type).correlate(*judged.tables))
    return _Consented((_open(judged), not_(excluded_class)), (
        decisions.c.patient_id == judged.patient_id,
        decisions.c.project_id == project_id,
        decisions.c.tier >= minimum_tier,
        judged.sensitive_mask.op("&")(decisions.c.excluded_mask) == 0,
        in_period,
    ), judged.tables)


@dataclass
class Release:
    """One research caller's view of the data: a project, its tier, its current key and profile."""

    project: ProjectRecord
    client_id: str
    tier: int
    key: PseudonymKey
    deid: Deidentifier
    #: The read transaction search and read use (`record_release`); None: each opens its own.
    reading: Connection | None = field(default=None, repr=False)

    # -- what the project may see ------------------------------------------------------------

    @property
    def types(self) -> tuple[str, ...]:
        """The resource types this project receives, by any path."""
        return self.project.released_types

    def require_type(self, resource_type: str) -> None:
        if resource_type not in self.types:
            raise Forbidden(f"Project {self.project.project_id} may not receive {resource_type} resources")

    def require_statistical(self, expressions: Iterable[cohort.Expression]) -> None:
        """Refuse a computed answer's (`$aggregate`, `$train`) search that names an identifying
        value: an identifier, telecom, name, address or other text (string parameters, the
        `_WITHHELD_MODIFIERS`), a resource by id (`_id`, references). They have no statistical use,
        they could single a patient out, and the question is kept in the ledger and the audit.
        Dates and codes are allowed: the answer is noised, not de-identified."""
        for expr in expressions:
            params = params_for(expr.resource_type)
            for key, _ in parse_qsl(expr.text.partition("?")[2], keep_blank_values=True):
                name, _, modifier = key.partition(":")
                param = params.get(name)
                if name in _WITHHELD_PARAMS or name == "_id" or modifier in _WITHHELD_MODIFIERS or (
                        param is not None and param.kind in ("string", "reference")):
                    raise InvalidRequest(f"{expr.text}: {key} names identifying values, which a computed answer "
                                         "may not search by")

    def rows_filter(self, now: int | None = None, table: Any = resources) -> search.RowFilter:
        """The consent filter at this release's tier over the project's types, judged at `now`,
        or by default at the instant each statement it filters runs (`_standing_filter`)."""
        if now is None:
            return _standing_filter(self.project.project_id, self.tier, self.types, table)
        return restrict(self.project.project_id, self.tier, now, table, types=self.types)

    # -- pseudonyms in, real ids out ---------------------------------------------------------

    def real_ids(self, conn: Connection, resource_type: str, pseudonyms: Iterable[str]) -> list[str]:
        """The stored ids behind pseudonyms of one type that this project may receive (any other
        pseudonym maps to nothing: searching by a withheld resource finds nothing)."""
        pks = [pk for p in pseudonyms if (pk := self.key.resolve(resource_type, p)) is not None]
        found: dict[int, str] = {}
        if pks:
            found = dict(conn.execute(_filtered(_IDS_OF_PKS, self.rows_filter()),
                                      {"pks": _padded(set(pks)), "resource_type": resource_type}).all())
        return [found[pk] for pk in pks if pk in found] or [_NOTHING]

    def translate(self, conn: Connection, resource_type: str, args: Sequence[tuple[str, str]]
                  ) -> list[tuple[str, str]]:
        """Check research search parameters and turn the pseudonyms in them into stored ids."""
        out: list[tuple[str, str]] = []
        for raw_name, value in args:
            name, _, modifier = raw_name.partition(":")
            if name in _RESULT_PARAMS:
                if name in ("_include", "_revinclude"):
                    self._check_include(value)
                out.append((raw_name, value))
                continue
            if name == "_sort":
                raise Forbidden("_sort is not available on the research view: sort order would reveal real values")
            if name == "_has":
                out.append((raw_name, self._has_value(conn, resource_type, raw_name, value)))
            elif "." in raw_name:
                out.append((raw_name, self._chained_value(conn, resource_type, raw_name, value)))
            else:
                out.append((raw_name, self._filter_value(conn, resource_type, name, modifier, value)))
        return out

    def _filter_value(self, conn: Connection, resource_type: str, name: str, modifier: str, value: str) -> str:
        """One filter's value as the parser gets it: refused if the research view may not search
        by it (`research_param_allowed`, `_WITHHELD_MODIFIERS`), its pseudonyms turned into stored ids."""
        param = params_for(resource_type).get(name)
        if param is None:
            return value  # the parser reports it
        if not research_param_allowed(param):
            raise Forbidden(f"Search parameter {name!r} is not available on the research view: it would "
                            "reveal identifying or date-shifted values")
        if modifier in _WITHHELD_MODIFIERS:
            raise Forbidden(f"Modifier :{modifier} ({name}:{modifier}) is not available on the research view: "
                            f"{_WITHHELD_MODIFIERS[modifier]}")
        if param.kind == "reference" and modifier == "missing":
            raise Forbidden(f"{name}:missing is not available on the research view: it would reveal references "
                            "to resources the project does not receive")
        if name == "_id":
            return ",".join(self.real_ids(conn, resource_type, value.split(",")))
        if param.kind == "reference" and (not modifier or modifier[:1].isupper()):
            return ",".join(self._real_references(conn, param.target, modifier, value))
        return value

    def _chained_value(self, conn: Connection, resource_type: str, raw_name: str, value: str) -> str:
        """A chain (`subject:Patient.gender`) to a type the project receives, by a parameter the research
        view allows on that type; the parser narrows the resources it reaches by the consent filter."""
        head, _, rest = raw_name.partition(".")
        name, _, type_name = head.partition(":")
        param = params_for(resource_type).get(name)
        if param is None or param.kind != "reference" or "." in rest:
            return value  # the parser reports it
        if not research_param_allowed(param):
            raise Forbidden(f"Search parameter {name!r} is not available on the research view")
        target = type_name or param.target
        if not target:
            raise InvalidRequest(f"{raw_name}: name the type the chain reaches on the research view "
                                 f"({name}:Type.{rest})", expression=raw_name)
        self.require_type(target)
        chained, _, modifier = rest.partition(":")
        return self._filter_value(conn, target, chained, modifier, value)

    def _has_value(self, conn: Connection, resource_type: str, raw_name: str, value: str) -> str:
        """A `_has` over a type the project receives, by parameters the research view allows on it;
        the parser narrows the referring resources by the consent filter."""
        parts = raw_name.split(":")
        if len(parts) not in (4, 5) or "." in parts[3] or parts[3] == "_has":
            return value  # the parser reports it
        self.require_type(parts[1])
        param = params_for(parts[1]).get(parts[2])
        if param is not None and not research_param_allowed(param):
            raise Forbidden(f"Search parameter {parts[2]!r} is not available on the research view")
        return self._filter_value(conn, parts[1], parts[3], parts[4] if len(parts) == 5 else "", value)

    def _check_include(self, value: str) -> None:
        """Refuse an `_include` or `_revinclude` (`:iterate` alike) that starts from, or reaches, a type
        the project may not receive (what it brings is then filtered as matches are: search.py)."""
        parts = value.split(":")
        if len(parts) not in (2, 3) or not all(parts) or model_for(parts[0]) is None:
            return  # malformed: the parser refuses it
        param = params_for(parts[0]).get(parts[1])
        target = parts[2] if len(parts) == 3 else (param.target if param else None)
        for named in (parts[0], target):
            if named and named not in self.types:
                raise Forbidden(f"Project {self.project.project_id} may not receive {named} resources")

    def _real_references(self, conn: Connection, target: str | None, modifier: str, value: str) -> list[str]:
        refs = []
        for item in value.split(","):
            parsed = parse_reference(item)
            kind = modifier or (parsed[0] if parsed else None) or target or "Patient"
            pseudonym = parsed[1] if parsed else item
            refs.extend(f"{kind}/{real}" for real in self.real_ids(conn, kind, [pseudonym]))
        return refs

    # -- search, read, version read -----------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        if self.reading is not None:
            yield self.reading
        else:
            with db.read() as conn:
                yield conn

    def search(self, resource_type: str, args: Sequence[tuple[str, str]], base: str) -> dict[str, Any]:
        """A searchset Bundle of what this project may see, `_include`d resources filtered alike."""
        self.require_type(resource_type)
        echo = [(k, v) for k, v in args if k.partition(":")[0] not in ("_cursor", "_pretty") and
                (k.partition(":")[0] not in search.RESULT_PARAMS or k.partition(":")[0] in RESEARCH_RESULT_PARAMS)]
        released: list[Any] = []
        with self._read() as conn:
            real = self.translate(conn, resource_type, args)

            def render(rows: list[Any], mode: str) -> list[dict[str, Any]]:
                released.extend(rows)
                return [{"fullUrl": f"{base}/{form.resource_type}/{form.id}", "resource": form.json,
                         "search": {"mode": mode}} for form in self.released_forms(conn, rows)]

            body = run_search(conn, resource_type, real, base=base, view=f"project:{self.project.project_id}",
                              strict=True, render=render, restrict=self.rows_filter(), echo=echo)
        self.audit("search", {"type": resource_type, "query": echo}, patients_of(released), len(released))
        return body

    def read(self, resource_type: str, pseudonym: str, version: int | None = None) -> bytes:
        """One resource (or one version of it) by pseudonym, as JSON text; NotFound unless this
        project may see it."""
        self.require_type(resource_type)
        with self._read() as conn:
            row = self._visible_row(conn, resource_type, pseudonym, version)
            if row is None:
                raise NotFound(f"{resource_type}/{pseudonym} is not known")
            resource = self.released_forms(conn, [row])[0].json
        self.audit("read", {"type": resource_type, "id": pseudonym, "version": version}, patients_of([row]), 1)
        return resource

    def _visible_row(self, conn: Connection, resource_type: str, pseudonym: str, version: int | None) -> Any:
        pk = self.key.resolve(resource_type, pseudonym)
        if pk is None:
            return None
        if version is None:
            return conn.execute(_filtered(_CURRENT_ROW, self.rows_filter()),
                                {"pk": pk, "resource_type": resource_type}).first()
        return conn.execute(_filtered(_VERSION_ROW, self.rows_filter(table=Judged.version())),
                            {"pk": pk, "resource_type": resource_type, "version": version}).first()

    def visible_versions(self, conn: Connection, versions: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
        """Which (row, version) pairs this project may receive now, each judged on its own version."""
        wanted = sorted(set(versions))
        visible: set[tuple[int, int]] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            statement = (select(history.c.resource_pk, history.c.version)
                         .join(resources, resources.c.pk == history.c.resource_pk)
                         .where(resources.c.pk.in_({pk for pk, _ in chunk}),
                                tuple_(history.c.resource_pk, history.c.version).in_(chunk),
                                history.c.deleted == false()))
            visible.update(tuple(row) for row in conn.execute(self.rows_filter(table=Judged.version())(statement)))
        return visible

    # -- export --------------------------------------------------------------------------------

    def require_group(self, group_id: str) -> None:
        """Refuse a Group the custodian did not attach to this project, or deleted, exactly as an unknown id."""
        with db.read() as conn:
            if not project_groups.available(conn, self.project.project_id, group_id):
                raise NotFound(f"Group/{group_id} is not known")

    def export_criteria(self, resource_type: str, queries: Sequence[str]) -> Any:
        """The condition `_typeFilter` queries of one type stand for (a row matching any of them),
        each held to the research search rules as on /research/fhir (`translate`: withheld and
        identifying parameters are refused, pseudonyms become stored ids); None without queries."""
        if not queries:
            return None
        alternatives = []
        with db.read() as conn:
            for text in queries:
                args = parse_qsl(text, keep_blank_values=True)
                shaping = sorted({name for name, _ in args if name.partition(":")[0] in _NOT_FILTERS})
                if shaping or not args:
                    raise InvalidRequest(f"_typeFilter {resource_type}?{text}: "
                                         + (f"{shaping[0]} is not a search filter" if shaping else "no filter"),
                                         expression="_typeFilter")
                query = search.parse(resource_type, self.translate(conn, resource_type, args), default_count=1,
                                     max_count=1)
                alternatives.append(and_(*search.conditions(query, self.rows_filter())))
        return or_(*alternatives)

    def export_patients(self, references: Sequence[str], group_id: str | None) -> list[str]:
        """The stored ids behind the `patient` references of an export (`Patient/<pseudonym>`), each of a
        patient this project may receive now (and a member of the Group, for a Group export). Any other,
        unknown or not, is refused with the same answer, so a refusal tells nothing about who exists."""
        found = []
        with db.read() as conn:
            members = None
            if group_id is not None:
                members = set(conn.execute(project_groups.members(self.project.project_id, group_id)).scalars())
            for reference in references:
                parsed = parse_reference(reference)
                real = (self.real_ids(conn, "Patient", [parsed[1]])[0]
                        if parsed and parsed[0] in ("Patient", None) else _NOTHING)
                if real == _NOTHING or (members is not None and real not in members):
                    raise InvalidRequest(f"patient {reference!r} is not a patient of this export",
                                         expression="patient")
                found.append(real)
        return found

    def export_rows(self, resource_type: str, *, after: int, until: int, since: int | None, group_id: str | None,
                    limit: int, criteria: Any = None, patients: Sequence[str] | None = None
                    ) -> list[tuple[jobs.Line, dict[str, Any]]]:
        """The next batch of an export: at most `limit` rows of one type past row number `after`, last
        written in (`since`, `until`], of the members of an available Group when `group_id` is given,
        of the `patients` when given (stored ids), matching `criteria` (`export_criteria`) when given;
        each de-identified and keyed by what its line holds (row, version, patient)."""
        self.require_type(resource_type)
        statement = (select(*search.ROW_COLUMNS, resources.c.version)
                     .where(resources.c.type == resource_type, resources.c.deleted == false(),
                            resources.c.pk > after, resources.c.last_updated <= until))
        if since is not None:
            statement = statement.where(resources.c.last_updated > since)
        if group_id is not None:
            statement = statement.where(resources.c.patient_id.in_(
                project_groups.members(self.project.project_id, group_id)))
        if patients is not None:
            statement = statement.where(resources.c.patient_id.in_(list(patients)))
        if criteria is not None:
            statement = statement.where(criteria)
        with db.read() as conn:
            rows = conn.execute(self.rows_filter()(statement).order_by(resources.c.pk).limit(limit)).all()
            # Each row is exported once: remembering its form would only push out the forms asked again.
            released = self.deidentify(conn, rows)
        return [((row.pk, row.version, row.patient_id), resource)
                for row, resource in zip(rows, released, strict=True)]

    def export_deleted(self, resource_type: str, *, after: int, until: int, since: int, group_id: str | None,
                       limit: int, patients: Sequence[str] | None = None) -> list[tuple[jobs.Line, dict[str, Any]]]:
        """The next batch of deletions for an export's `deleted` files: at most `limit` rows of one type
        past row number `after`, deleted in (`since`, `until`], each as a transaction Bundle of one
        DELETE entry naming its pseudonym.

        Only deletions the project may learn of: of a resource whose version current at `since` (the
        earlier export's transactionTime) was live and passes the consent filter now, judged on that
        version (its patient, sensitivity, class and clinical dates) — a resource the earlier export
        could have carried, judged by what the project may receive today. The line is keyed by that
        version, so a download judges it again (`export_file`). A resource created after `since` is
        left out, as is one whose version at `since` the project may not receive now; so are
        deletion times (they are real write times).
        """
        self.require_type(resource_type)
        at_since = (select(func.max(history.c.version)).where(history.c.resource_pk == resources.c.pk,
                                                               history.c.last_updated <= since)
                    .correlate(resources).scalar_subquery())
        statement = (select(resources.c.pk, history.c.version, history.c.patient_id)
                     .join(history, history.c.resource_pk == resources.c.pk)
                     .where(resources.c.type == resource_type, resources.c.deleted == true(), resources.c.pk > after,
                            resources.c.last_updated > since, resources.c.last_updated <= until,
                            history.c.version == at_since, history.c.deleted == false()))
        if group_id is not None:
            statement = statement.where(history.c.patient_id.in_(
                project_groups.members(self.project.project_id, group_id)))
        if patients is not None:
            statement = statement.where(history.c.patient_id.in_(list(patients)))
        with db.read() as conn:
            rows = conn.execute(self.rows_filter(table=Judged.version())(statement)
                                .order_by(resources.c.pk).limit(limit)).all()
        return [((row.pk, row.version, row.patient_id), {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"request": {"method": "DELETE", "url": f"{resource_type}/{self.key.pseudonym(resource_type, row.pk)}"}}]})
            for row in rows]

    def export_file(self, job_id: str, file_no: int) -> Iterator[bytes]:
        """One NDJSON file of this project's completed export, holding only the lines it may receive now.

        Every line is judged again on the stored version it was written from
        (`visible_versions`, part by part): a withdrawal, or a category, class or data
        period excluded since the export, removes it. The audit entry names the patients
        whose lines the file carries and is written before the first byte leaves. NotFound
        for an unknown file or job, another project's job, or one not completed.
        """
        kept: list[bytes] = []  # per part, one 0/1 byte per line
        patients: set[str] = set()
        with db.read() as conn:
            parts = jobs.file_part_count(conn, self.project.project_id, job_id, file_no)
            if parts is None:
                raise NotFound(f"Export file {file_no} of job {job_id} is not known")
            for part in range(parts):
                lines = jobs.part_lines(conn, job_id, file_no, part)
                visible = self.visible_versions(conn, [(pk, version) for pk, version, _ in lines])
                keep = bytes((pk, version) in visible for pk, version, _ in lines)
                patients.update(patient for (_, _, patient), carried in zip(lines, keep, strict=True)
                                if carried and patient)
                kept.append(keep)
        self.audit("export-download", {"job": job_id, "file": file_no}, patients, sum(map(sum, kept)))

        def stream() -> Iterator[bytes]:
            for part, keep in enumerate(kept):
                content = jobs.part_content(job_id, file_no, part)
                if content is None:  # cancelled or expired meanwhile: nothing more leaves
                    return
                yield b"".join(line for line, carried in zip(content.splitlines(keepends=True), keep, strict=True)
                               if carried)
        return stream()

    # -- rendering -----------------------------------------------------------------------------

    def deidentify(self, conn: Connection, rows: Sequence[Any]) -> list[dict[str, Any]]:
        """De-identify stored rows (pk, type, id, json, patient_id) for this project.

        References are rewritten only to targets this project may receive now; any other
        reference element is removed (required ones get a data-absent-reason).
        """
        pks = self._released_targets(conn, [row.json for row in rows])
        return [self.deid.apply(orjson.loads(row.json), row.pk, row.patient_id, pks) for row in rows]

    def released_forms(self, conn: Connection, rows: Sequence[Any]) -> list[released_forms.Form]:
        """The released forms of stored rows, as `deidentify` makes them, kept and given again
        under the conditions of service/released_forms.py."""
        pks = self._released_targets(conn, [row.json for row in rows])
        forms = released_forms.of_app()
        return [forms.release(self.deid, row, pks) for row in rows]

    def _released_targets(self, conn: Connection, stored: list[bytes]) -> dict[tuple[str, ...], int]:
        """Row numbers of the referenced resources this project may receive: (type, id) → pk
        judged on the current version, and (type, id, version) → pk for versioned references,
        judged on that version (for every reference in the stored JSON, and possibly more)."""
        current: set[tuple[str, str]] = set()
        versioned: set[tuple[str, str, str]] = set()
        receivable = frozenset(self.types)
        for reference in _references(stored):
            parsed = parse_reference(reference)
            if parsed and parsed[0] in receivable:
                current.add((parsed[0], parsed[1]))
                version = reference.rpartition("/_history/")[2] if "/_history/" in reference else ""
                if VERSION_NUMBER.fullmatch(version):
                    versioned.add((parsed[0], parsed[1], version))
        if not current:
            return {}
        # SQLite looks up the pairs asked for; PostgreSQL every (type, id) of the lists' product,
        # and only the pairs asked for are kept.
        dialect = conn.dialect.name
        lists = ({"pairs": sorted(current)} if dialect == "sqlite"
                 else {"types": sorted({t for t, _ in current}), "ids": sorted({i for _, i in current})})
        found: dict[tuple[str, ...], int] = {
            (t, i): pk for t, i, pk in conn.execute(_filtered(_TARGETS[dialect], self.rows_filter()), lists)
            if (t, i) in current}
        if versioned:
            rows = conn.execute(_filtered(_VERSIONED_TARGETS[dialect], self.rows_filter(table=Judged.version())),
                                {"triples": sorted((t, i, int(v)) for t, i, v in versioned)} if dialect == "sqlite"
                                else {**lists, "versions": sorted({int(v) for _, _, v in versioned})})
            for t, i, v, pk in rows:
                if (t, i, str(v)) in versioned:
                    found[(t, i, str(v))] = pk
        return found

    def audit(self, action: str, detail: dict[str, Any], patients: Iterable[str], resources: int) -> None:
        """Record the release in its own transaction; if that fails, nothing is released."""
        with db.write() as conn:
            audit.record(conn, actor=self.client_id, action=action, project_id=self.project.project_id,
                         detail={**detail, "resources": resources}, patients=patients)

    # -- aggregates ----------------------------------------------------------------------------

    def aggregate_filter(self, now: int, types: Iterable[str]) -> search.RowFilter:
        """The consent filter aggregates are computed under: rows whose patient's decision
        reaches the aggregate tier at `now`, of those of `types` (the question's) that are the
        project's types or Patient (the unit). Naming only the types a question reads keeps
        the filter's type test short; a type outside the project's is never let through."""
        allowed = {"Patient", *self.types}
        return restrict(self.project.project_id, engine.AGGREGATE, now,
                        types=tuple(t for t in types if t in allowed), whole_cohorts=True)

    def reserve(self, types: Iterable[str], canonical: str, epsilon: float, idempotency_key: str | None
                ) -> budget.Claim:
        """In a short write transaction: the answer recorded for this request (its `canonical`
        text, `budget.canonical_text`) on the data of `types` it reads (nothing spent), or ε
        reserved for computing it (`budget.claim`, which keeps the question in the history)."""
        with db.write() as conn:
            version = cohort.data_version(conn, self.project.project_id, types)
            return budget.claim(conn, self.project.project_id, budget.text_hash(canonical), version, epsilon,
                                idempotency_key=idempotency_key, actor=self.client_id, question=canonical)

    def budget(self) -> dict[str, Any]:
        """The project's privacy budget and its history (`budget.status`); spends nothing."""
        with db.read() as conn:
            return budget.status(conn, self.project.project_id)

    def aggregate_rows(self, question: cohort.Question) -> tuple[cohort.Exact, str]:
        """In a read transaction, which holds up no writer: the exact aggregate over the consented
        rows with the patients of its cohort, and the data version read before it. Bounded in
        time (`db.statistics_read`)."""
        with db.statistics_read() as conn:
            version = cohort.data_version(conn, self.project.project_id, question.types)
            return cohort.exact(conn, question, self.aggregate_filter(db.now_us(), question.types)), version

    def training_rows(self, design: features.Design, types: Iterable[str]) -> tuple[features.Matrix, str]:
        """In a read transaction, which holds up no writer: one row per consented cohort patient
        (`features.rows`, under the aggregate filter over `types`, the types the design reads)
        and the data version read before them. Bounded in time (`db.statistics_read`)."""
        types = tuple(types)
        with db.statistics_read() as conn:
            version = cohort.data_version(conn, self.project.project_id, types)
            return features.rows(conn, design, self.aggregate_filter(db.now_us(), types)), version

    def record(self, action: str, query_hash: str, data_version: str, response: Any, idempotency_key: str | None,
               detail: dict[str, Any], patients: Iterable[str]) -> Any:
        """In one short write transaction: record a computed answer and its audit entry (`action`,
        `detail`, naming the `patients` it was computed on); returns the answer to release (the
        first one, if the same request was answered meanwhile). If either cannot be written,
        neither is and nothing is released."""
        with db.write() as conn:
            # The budget row is locked first, as every writer that audits a budget change does.
            released = budget.record_answer(conn, self.project.project_id, query_hash, data_version, response,
                                            idempotency_key)
            audit.record(conn, actor=self.client_id, action=action, project_id=self.project.project_id,
                         detail={**detail, "resources": 0}, patients=patients)
            return released


#: The instant a standing filter judges consent at: read each time a statement runs.
_RUN_INSTANT = bindparam("consent_instant", callable_=db.now_us, type_=BigInteger())
#: The statements `Release` runs with parameters, built and compiled once per consent filter.
_LIVE = (resources.c.pk == bindparam("pk"), resources.c.type == bindparam("resource_type"),
         resources.c.deleted == false())
_CURRENT_ROW = select(*search.ROW_COLUMNS).where(*_LIVE)
_VERSION_ROW = (select(resources.c.pk, resources.c.type, resources.c.id, history.c.json, history.c.patient_id)
                .join(history, history.c.resource_pk == resources.c.pk)
                .where(*_LIVE, history.c.version == bindparam("version"), history.c.deleted == false()))
_IDS_OF_PKS = select(resources.c.pk, resources.c.id).where(
    resources.c.pk.in_(bindparam("pks", expanding=True)), resources.c.type == bindparam("resource_type"),
    resources.c.deleted == false())


class _JsonList(TypeDecorator[list[Any]]):
    """A list bound as one JSON array (the text SQLite's `json_each` reads)."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: list[Any] | None, dialect: Any) -> str | None:
        return None if value is None else orjson.dumps(value).decode()


def _listed(name: str) -> Any:
    """SQLite: the list parameter `name` (one JSON array) as a table of its values (column `value`)."""
    return func.json_each(bindparam(name, type_=_JsonList())).table_valued("value").alias(f"listed_{name}")


def _item(listed: Any, index: int) -> Any:
    """SQLite: item `index` of each value of a `_listed` table (each value a JSON array)."""
    return func.json_extract(listed.c.value, literal_column(f"'$[{index}]'"))


def _any(name: str, item: Any) -> Any:
    """PostgreSQL: any value of the list parameter `name` (an array of `item` values), to compare with."""
    return any_(bindparam(name, type_=ARRAY(item)))


def _targets_statements() -> tuple[dict[str, Select[Any]], dict[str, Select[Any]]]:
    """The look-ups of referenced resources (`Release._released_targets`), per dialect, each list one
    parameter whatever its length, so that each statement's SQL is one for every list.

    SQLite: the current rows of the (type, id) pairs in the JSON array `pairs`, and the versions of
    the (type, id, version) triples in `triples`; each row is found through the unique index on
    (type, id) by the items of a listed value, the only index the join can use, so the plan does
    not depend on the database's statistics. PostgreSQL: the current rows whose type and id are in
    the arrays `types` and `ids`, and those rows' versions in the array `versions`.
    """
    pairs, triples = _listed("pairs"), _listed("triples")
    columns = (resources.c.type, resources.c.id, resources.c.pk)
    versioned_columns = (resources.c.type, resources.c.id, history.c.version, resources.c.pk)
    live = resources.c.deleted == false()
    postgresql_live = (resources.c.type == _any("types", String), resources.c.id == _any("ids", String), live)
    with_version = (history.c.resource_pk == resources.c.pk, history.c.deleted == false())
    return ({"sqlite": select(*columns).select_from(pairs.join(resources, and_(
                 resources.c.type == _item(pairs, 0), resources.c.id == _item(pairs, 1)))).where(live),
             "postgresql": select(*columns).where(*postgresql_live)},
            {"sqlite": select(*versioned_columns).select_from(triples.join(resources, and_(
                 resources.c.type == _item(triples, 0), resources.c.id == _item(triples, 1))).join(
                 history, and_(*with_version, history.c.version == _item(triples, 2)))).where(live),
             "postgresql": select(*versioned_columns).join(history, and_(*with_version))
             .where(*postgresql_live, history.c.version == _any("versions", Integer))})


_TARGETS, _VERSIONED_TARGETS = _targets_statements()


@lru_cache(maxsize=512)
def _standing_filter(project_id: str, tier: int, types: tuple[str, ...], table: Any) -> search.RowFilter:
    """`restrict` built once per (project, tier, types, table), judging consent at the instant each
    statement it filters runs. It holds no answer: every statement reads the decisions anew."""
    judged = table if isinstance(table, Judged) else Judged.current(table)
    wanted = tuple(sorted(set(types)))
    columns = tuple(f"{c.table.name}.{c.name}" for c in (
        judged.type, judged.id, judged.patient_id, judged.sensitive_mask, judged.clinical_low, judged.clinical_high))
    allowed = _Standing(_allowed(project_id, tier, _RUN_INSTANT, judged, wanted), (project_id, tier, wanted, columns))
    return lambda statement: statement.where(allowed)


class _Standing(Grouping[Any]):
    """A standing filter's condition, in parentheses, known to SQLAlchemy's statement cache by what
    built it (`_standing_filter`'s arguments, the judged columns by name) instead of by a walk over
    its hundred-odd elements at every execution. Everything in its SQL and its parameters follows from
    those arguments, so a statement compiled with one is right for any other with the same key; its
    one changing value, the instant, is a callable parameter that every execution reads anew."""

    inherit_cache = False

    def __init__(self, condition: Any, key: tuple[Any, ...]) -> None:
        super().__init__(condition)
        self.key = key

    def _gen_cache_key(self, anon_map: Any, bindparams: list[Any]) -> tuple[Any, ...]:
        return (_Standing, self.key)


@lru_cache(maxsize=2048)
def _filtered(statement: Select[Any], row_filter: search.RowFilter) -> Select[Any]:
    """`statement` under a standing filter, as one object, so its compiled form is found at once."""
    return row_filter(statement)


def _padded(values: set[Any]) -> list[Any]:
    """The values sorted, the last one repeated up to a power of two: the SQL of an expanded
    `IN` list then takes few forms, and the database finds each one already prepared."""
    ordered = sorted(values)
    return ordered + ordered[-1:] * ((1 << (len(ordered) - 1).bit_length()) - len(ordered))


def patients_of(rows: Iterable[Any]) -> set[str]:
    return {row.patient_id for row in rows if row.patient_id}


def _references(stored: Iterable[bytes]) -> set[str]:
    """The string value of every "reference" member in stored JSON documents, found without parsing
    them (and perhaps a few more values, of keys that end in an escaped quote and "reference")."""
    raw = {value for text in stored for value in _REFERENCE.findall(text)}
    return {orjson.loads(b'"' + value + b'"') if b"\\" in value else value.decode() for value in raw}


def release_for(client_id: str, project_id: str | None, minimum_tier: int) -> Release:
    """The release view of a research client, read in a transaction of its own; refused if its
    project is closed or cannot receive at this tier."""
    with db.read() as conn:
        return _release_in(conn, client_id, project_id, minimum_tier)


@contextmanager
def record_release(principal: Principal) -> Iterator[Release]:
    """The record-level release of a research caller (`caller_release`), whose search and read run in
    one read transaction."""
    with db.read() as conn:
        yield caller_release(principal, engine.RECORD, conn)


def caller_release(principal: Principal, minimum_tier: int, reading: Connection | None = None) -> Release:
    """The release view of a research caller (refused as by `release_for`) on its project and key version
    as they were read with its token (`auth.authenticate`), so not read again."""
    if principal.project is None:
        raise Forbidden("This client is not bound to a research project")
    project = _receiving(principal.project, minimum_tier)
    return _release(principal.client_id, project, minimum_tier,
                    keyring.key_at(project.project_id, principal.key_version), reading)


def _release_in(conn: Connection, client_id: str, project_id: str | None, minimum_tier: int) -> Release:
    if project_id is None:
        raise Forbidden("This client is not bound to a research project")
    project = _receiving(projects.get(conn, project_id), minimum_tier)
    return _release(client_id, project, minimum_tier, keyring.project_key(conn, project_id), None)


def _receiving(project: ProjectRecord, minimum_tier: int) -> ProjectRecord:
    """`project`, refused if it is closed or cannot receive at `minimum_tier`."""
    if project.status != "active":
        raise Forbidden(f"Project {project.project_id} is closed and receives nothing more")
    if project.max_tier < minimum_tier:
        raise Forbidden(f"Project {project.project_id} may only receive aggregate results; "
                        "record-level paths are refused")
    return project


def _release(client_id: str, project: ProjectRecord, tier: int, key: PseudonymKey,
             reading: Connection | None) -> Release:
    return Release(project, client_id, tier, key,
                   Deidentifier(keyring.profile_for(project), key, reference_year=datetime.now(UTC).year), reading)


def research_param_allowed(param: SearchParam) -> bool:
    """Whether the research view accepts a search parameter (none that probes identifying or dates)."""
    return param.name not in _WITHHELD_PARAMS and param.kind not in ("string", "date")


def research_capability_types() -> tuple[str, ...]:
    """Every type some research project could receive (what the research metadata lists)."""
    return tuple(sorted({*PATIENT_DATA_TYPES, *DIRECTORY_TYPES}))
