"""The one gate: the only way data leaves Passerelle for research.

Every research output path (read, vread, search, `_include`, paging, `$export`,
`$aggregate`) composes the same three steps from here: the consent filter inside
the SQL statement (`restrict`), de-identification of each released resource
(`Release.render` / `Release.deidentify`), and an audit entry written before the
response leaves (`Release.audit`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Select, and_, exists, false, literal, not_, or_, select

from consent import engine, projects
from consent.projects import PATIENT_DATA_TYPES, ProjectRecord
from policies.deid import Deidentifier
from policies.pseudonym import PseudonymKey
from service import audit, db, keyring
from service.api.searchset import Render
from service.errors import Forbidden
from service.store import repository, search
from service.store.indexer import parse_reference
from service.store.schema import decision_classes, decisions, history, resources
from service.store.searchparams import COMPARTMENT, SearchParam, params_for

#: Resources about no patient that a research view may carry, as far as the profile allows.
NON_PATIENT_TYPES: tuple[str, ...] = ("Location", "Medication", "Organization", "Practitioner", "PractitionerRole")
#: Search parameters that would let a caller probe identifying or shifted values.
_WITHHELD_PARAMS = frozenset({"identifier", "telecom", "phone", "email", "_security", "_tag", "_profile",
                              "_lastUpdated"})
_RESULT_PARAMS = frozenset({"_count", "_total", "_summary", "_include", "_cursor", "_format", "_pretty"})
#: Stands for a pseudonym that resolves to nothing: no stored id can contain "~".
_NOTHING = "~"


def restrict(project_id: str, minimum_tier: int, now: int | None = None, table: Any = resources
             ) -> search.RowFilter:
    """The consent filter as SQL: only rows the project's decisions allow, inside the query.

    A patient-compartment row needs a decision of at least `minimum_tier` for its
    patient that is in force now, whose excluded categories do not meet the row's
    sensitivity mask, whose excluded classes do not include its type, and whose data
    period contains its clinical date (a row without one is withheld when a period
    applies; the Patient resource itself carries no clinical date and is exempt).
    `table` is the resources table or an alias of it.
    """
    instant = now if now is not None else db.now_us()
    r = table.c
    compartment = r.type.in_(sorted({"Patient", *COMPARTMENT}))
    in_period = or_(
        r.type == "Patient",
        and_(decisions.c.period_start.is_(None), decisions.c.period_end.is_(None)),
        and_(r.clinical_low.is_not(None),
             or_(decisions.c.period_start.is_(None), r.clinical_low >= decisions.c.period_start),
             or_(decisions.c.period_end.is_(None), r.clinical_high <= decisions.c.period_end)),
    )
    consented = exists(select(literal(1)).where(
        decisions.c.patient_id == r.patient_id,
        decisions.c.project_id == project_id,
        decisions.c.tier >= minimum_tier,
        r.sensitive_mask.op("&")(decisions.c.excluded_mask) == 0,
        or_(decisions.c.valid_from.is_(None), decisions.c.valid_from <= instant),
        or_(decisions.c.valid_until.is_(None), decisions.c.valid_until >= instant),
        in_period,
        # Correlate explicitly: two levels down, auto-correlation would not reach the outer row.
        not_(exists(select(literal(1)).where(
            decision_classes.c.patient_id == r.patient_id,
            decision_classes.c.project_id == project_id,
            decision_classes.c.resource_type == r.type).correlate(table))),
    ).correlate(table))

    def apply(statement: Select[Any]) -> Select[Any]:
        return statement.where(or_(and_(compartment, consented),
                                   and_(not_(compartment), r.type.in_(NON_PATIENT_TYPES))))
    return apply


@dataclass
class Release:
    """One research caller's view of the data: a project, its current key and profile."""

    project: ProjectRecord
    client_id: str
    key: PseudonymKey
    deid: Deidentifier

    # -- what the project may see ------------------------------------------------------------

    @property
    def types(self) -> tuple[str, ...]:
        return (*(self.project.types or PATIENT_DATA_TYPES), *NON_PATIENT_TYPES)

    def require_type(self, resource_type: str) -> None:
        if resource_type not in self.types:
            raise Forbidden(f"Project {self.project.project_id} may not receive {resource_type} resources")

    def records_filter(self) -> search.RowFilter:
        return restrict(self.project.project_id, engine.RECORD)

    # -- pseudonyms in, real ids out ---------------------------------------------------------

    def real_ids(self, conn: Connection, resource_type: str, pseudonyms: Iterable[str]) -> list[str]:
        """The stored ids behind pseudonyms of one type (unresolvable ones map to nothing)."""
        pks = [pk for p in pseudonyms if (pk := self.key.resolve(resource_type, p)) is not None]
        found: dict[int, str] = {}
        if pks:
            found = dict(conn.execute(select(resources.c.pk, resources.c.id)
                                      .where(resources.c.pk.in_(pks), resources.c.type == resource_type)).all())
        return [found[pk] for pk in pks if pk in found] or [_NOTHING]

    def translate(self, conn: Connection, resource_type: str, args: Sequence[tuple[str, str]]
                  ) -> list[tuple[str, str]]:
        """Check research search parameters and turn the pseudonyms in them into stored ids."""
        known = params_for(resource_type)
        out: list[tuple[str, str]] = []
        for raw_name, value in args:
            name, _, modifier = raw_name.partition(":")
            if name in _RESULT_PARAMS:
                if name == "_include":
                    target = value.split(":")[2] if value.count(":") == 2 else None
                    if target and target not in self.types:
                        raise Forbidden(f"Project {self.project.project_id} may not receive {target} resources")
                out.append((raw_name, value))
                continue
            if name == "_sort":
                raise Forbidden("_sort is not available on the research view: sort order would reveal real values")
            param = known.get(name)
            if param is None:
                out.append((raw_name, value))  # the parser reports it
                continue
            if not research_param_allowed(param):
                raise Forbidden(f"Search parameter {name!r} is not available on the research view: it would "
                                "reveal identifying or date-shifted values")
            if name == "_id":
                out.append((raw_name, ",".join(self.real_ids(conn, resource_type, value.split(",")))))
            elif param.kind == "reference" and modifier != "missing":
                out.append((raw_name, ",".join(self._real_references(conn, param.target, modifier, value))))
            else:
                out.append((raw_name, value))
        return out

    def _real_references(self, conn: Connection, target: str | None, modifier: str, value: str) -> list[str]:
        refs = []
        for item in value.split(","):
            parsed = parse_reference(item)
            kind = modifier or (parsed[0] if parsed else None) or target or "Patient"
            pseudonym = parsed[1] if parsed else item
            refs.extend(f"{kind}/{real}" for real in self.real_ids(conn, kind, [pseudonym]))
        return refs

    def visible_row(self, conn: Connection, resource_type: str, pseudonym: str, version: int | None) -> Any:
        """The stored row (or one version of it) behind a pseudonym, if this project may see it."""
        pk = self.key.resolve(resource_type, pseudonym)
        if pk is None:
            return None
        content = resources.c.json if version is None else history.c.json
        statement = (select(resources.c.pk, resources.c.type, resources.c.id, content, resources.c.patient_id)
                     .where(resources.c.pk == pk, resources.c.type == resource_type, resources.c.deleted == false()))
        if version is not None:
            statement = statement.join(history, and_(history.c.resource_pk == resources.c.pk,
                                                     history.c.version == version, history.c.deleted == false()))
        return conn.execute(self.records_filter()(statement)).first()

    # -- rendering -----------------------------------------------------------------------------

    def deidentify(self, conn: Connection, rows: Sequence[Any]) -> list[dict[str, Any]]:
        """De-identify stored rows (pk, type, id, json, patient_id) for this project."""
        loaded = [orjson.loads(row.json) for row in rows]
        pks = _reference_pks(conn, loaded)
        return [self.deid.apply(resource, row.pk, row.patient_id, pks)
                for resource, row in zip(loaded, rows, strict=True)]

    def render(self, conn: Connection, base: str, released: list[Any]) -> Render:
        """A searchset renderer that de-identifies and remembers which patients were released."""
        def render(rows: list[Any], mode: str) -> list[dict[str, Any]]:
            released.extend(rows)
            return [{"fullUrl": f"{base}/{res['resourceType']}/{res['id']}", "resource": res,
                     "search": {"mode": mode}} for res in self.deidentify(conn, rows)]
        return render

    def audit(self, action: str, detail: dict[str, Any], patients: Iterable[str], resources: int) -> None:
        """Record the release in its own transaction; if that fails, nothing is released."""
        with db.write() as conn:
            audit.record(conn, actor=self.client_id, action=action, project_id=self.project.project_id,
                         detail={**detail, "resources": resources}, patients=patients)


def patients_of(rows: Iterable[Any]) -> set[str]:
    return {row.patient_id for row in rows if row.patient_id}


def _reference_pks(conn: Connection, loaded: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """Stored row numbers of everything the resources refer to, fetched in one query."""
    wanted: set[tuple[str, str]] = set()
    for resource in loaded:
        for reference in _references(resource):
            parsed = parse_reference(reference)
            if parsed and parsed[0]:
                wanted.add((parsed[0], parsed[1]))
    if not wanted:
        return {}
    rows = conn.execute(select(resources.c.type, resources.c.id, resources.c.pk)
                        .where(repository.by_type_and_id(wanted)))
    return {(t, i): pk for t, i, pk in rows}


def _references(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def open_release(conn: Connection, client_id: str, project_id: str | None, minimum_tier: int) -> Release:
    """The release view of a research client; refused if its project cannot receive at this tier."""
    if project_id is None:
        raise Forbidden("This client is not bound to a research project")
    project = projects.get(conn, project_id)
    if project.status != "active":
        raise Forbidden(f"Project {project_id} is closed and receives nothing more")
    if project.max_tier < minimum_tier:
        raise Forbidden(f"Project {project_id} may only receive aggregate results; record-level paths are refused")
    key = keyring.project_key(conn, project_id)
    profile = keyring.profile_for(project)
    return Release(project, client_id, key, Deidentifier(profile, key, reference_year=datetime.now(UTC).year))


def research_param_allowed(param: SearchParam) -> bool:
    """Whether the research view accepts a search parameter (none that probes identifying or dates)."""
    return param.name not in _WITHHELD_PARAMS and param.kind not in ("string", "date")


def research_capability_types() -> tuple[str, ...]:
    """Every type some research project could receive (what the research metadata lists)."""
    return tuple(sorted({*PATIENT_DATA_TYPES, *NON_PATIENT_TYPES}))
