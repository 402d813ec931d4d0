"""Materialised decisions: one row per (patient, project), kept current in the writing transaction.

Research queries join `decisions` (and `decision_classes`) instead of evaluating
consents, so filtering happens in SQL, `total` counts only permitted data, and a
revocation is effective on the very next request. Every write that can change a
decision (a Consent, a Patient, a project) re-materialises the rows it affects
before its transaction commits. The default regime (for patients without a research
consent) lives in the database, one value for every node: `set_consent_default` changes it
and re-materialises everything in one transaction; `consent refresh` re-materialises
everything under the current one.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from sqlalchemy import Connection, and_, delete, false, insert, select, update

from consent import engine, projects
from policies.fhirdates import instant
from policies.sensitivity import mask as category_mask
from policies.sensitivity import names as category_names
from service.config import CONSENT_DEFAULTS
from service.db import now_us
from service.errors import NotFound, Unprocessable
from service.store import repository
from service.store.indexer import parse_reference
from service.store.repository import Change, Stored
from service.store.schema import decision_classes, decisions, history, resources, settings

_CHUNK = 1000


#: The `settings` row holding the default regime; a database without it (never through `init-db`) denies.
CONSENT_DEFAULT = "consent-default"


def consent_default(conn: Connection) -> str:
    """The default regime as the database holds it. On PostgreSQL the row stays share-locked until
    `conn`'s transaction ends (on SQLite the writer lock serialises instead), so no decision is ever
    materialised under a regime that `set_consent_default` is replacing."""
    return conn.scalar(select(settings.c.value).where(settings.c.name == CONSENT_DEFAULT)
                       .with_for_update(read=True)) or "deny"


def seed_consent_default(conn: Connection, value: str) -> bool:
    """Record `value` as the regime of a database that has none (`init-db`); True if it did."""
    if conn.scalar(select(settings.c.value).where(settings.c.name == CONSENT_DEFAULT)) is not None:
        return False
    conn.execute(insert(settings).values(name=CONSENT_DEFAULT, value=_checked(value)))
    return True


def set_consent_default(conn: Connection, value: str) -> int:
    """Make `value` every node's regime and re-materialise every decision under it, in the caller's
    transaction. The row (which `init-db` writes in every database it initialises) is updated
    first: writers holding the old regime finish before, and later ones wait and see the new one.
    Returns the number of decisions written."""
    if not conn.execute(update(settings).where(settings.c.name == CONSENT_DEFAULT)
                        .values(value=_checked(value))).rowcount:
        conn.execute(insert(settings).values(name=CONSENT_DEFAULT, value=value))
    return refresh(conn)


def _checked(value: str) -> str:
    if value not in CONSENT_DEFAULTS:
        raise Unprocessable(f"The consent default must be one of {', '.join(CONSENT_DEFAULTS)}, not {value!r}")
    return value


def _check_consent(conn: Connection, consent: dict[str, Any]) -> None:
    """Refuse a research Consent that cannot be enforced or names an unknown patient or project."""
    try:
        engine.check(consent)
    except engine.UnsupportedConsent as exc:
        raise Unprocessable(f"Consent not accepted: {exc}", expression="Consent.provision") from None
    if not engine.is_research(consent):
        return
    patient = parse_reference(consent["patient"]["reference"])
    if patient is None or _live(conn, "Patient", [patient[1]]) != {patient[1]}:
        raise Unprocessable(f"Consent.patient {consent['patient']['reference']!r} is not a known patient",
                            expression="Consent.patient")
    named = {engine.bound_project(consent)} | {
        ref.split("/", 1)[1] for ref in _actor_references(consent.get("provision") or {})
        if ref.startswith("ResearchStudy/")}
    named.discard(None)
    for project_id in sorted(named):
        try:
            projects.get(conn, project_id)
        except NotFound:
            raise Unprocessable(f"Consent names research project {project_id!r}, which is not known",
                                expression="Consent.provision") from None


def _actor_references(provision: dict[str, Any]) -> Iterable[str]:
    for actor in provision.get("actor") or ():
        yield (actor.get("reference") or {}).get("reference", "")
    for child in provision.get("provision") or ():
        yield from _actor_references(child)


def _live(conn: Connection, resource_type: str, ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), _CHUNK):
        found.update(conn.execute(select(resources.c.id).where(
            resources.c.type == resource_type, resources.c.id.in_(ids[start:start + _CHUNK]),
            resources.c.deleted == false())).scalars())
    return found


def _previous_patient(conn: Connection, stored: Stored) -> str | None:
    """The patient a deleted Consent belonged to (its last live version says)."""
    return conn.execute(select(history.c.patient_id).where(
        history.c.resource_pk == stored.pk, history.c.version == stored.version - 1)).scalar()


def on_write(conn: Connection, stored: list[Stored], changes: Sequence[Change]) -> None:
    """Repository hook: check written Consents and re-materialise the patients they affect."""
    affected: set[str] = set()
    for item, change in zip(stored, changes, strict=True):
        if item.type == "Consent":
            if change.resource is not None:
                _check_consent(conn, change.resource)
            # A new version may have moved the Consent to another patient: refresh both.
            affected.update(p for p in (item.patient_id, _previous_patient(conn, item) if item.version > 1 else None)
                            if p)
        elif item.type == "Patient":
            affected.add(item.id)
    if affected:
        refresh(conn, patient_ids=sorted(affected))


def overruled(consent: dict[str, Any], consents: Iterable[dict[str, Any]],
              project_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Pure: for each project the active research `consent` applies to (its own project, or
    every one of `project_ids` when research-wide) where another of the patient's `consents`
    governs instead (engine.governing: a more recent one), that Consent. Empty when `consent`
    governs wherever it applies, or is not an active research Consent (then it governs nothing
    by design: a withdrawal)."""
    if consent.get("status") != "active" or not engine.is_research(consent):
        return {}
    bound = engine.bound_project(consent)
    consents = list(consents)
    found: dict[str, dict[str, Any]] = {}
    for project_id in [bound] if bound else project_ids:
        winner = engine.governing(consents, project_id)
        if winner is not None and winner.get("id") != consent.get("id"):
            found[project_id] = winner
    return found


def overruled_warnings(conn: Connection, written: Sequence[dict[str, Any]]) -> list[str | None]:
    """For each Consent just written (as stored, with its id), a warning line when it does not
    govern the decision because a more recent Consent does (`overruled`: for a research-wide
    Consent, on the active projects), else None. The write itself stands."""
    def patient_of(consent: dict[str, Any]) -> str | None:
        reference = (consent.get("patient") or {}).get("reference", "")
        governs = consent.get("status") == "active" and engine.is_research(consent)
        return reference.split("/", 1)[1] if governs and reference.startswith("Patient/") else None

    patient_ids = sorted({p for p in map(patient_of, written) if p})
    held: dict[str, list[dict[str, Any]]] = {}
    for chunk in _patient_chunks(conn, patient_ids):
        for patient_id, payload in conn.execute(select(resources.c.patient_id, resources.c.json).where(
                resources.c.type == "Consent", resources.c.patient_id.in_(chunk), resources.c.deleted == false())):
            held.setdefault(patient_id, []).append(orjson.loads(payload))
    active = [p.project_id for p in projects.all_projects(conn) if p.status == "active"] if patient_ids else []
    warnings: list[str | None] = []
    for consent in written:
        patient = patient_of(consent)
        winners = overruled(consent, held.get(patient, ()), active) if patient else {}
        if not winners:
            warnings.append(None)
            continue
        by = "; ".join(f"project {project_id}: Consent/{w.get('id')} of {w.get('dateTime', 'no date')}"
                       for project_id, w in winners.items())
        warnings.append(f"Consent/{consent.get('id')} is stored but does not change the decision: a more recent "
                        f"Consent governs ({by})")
    return warnings


def _rows(patient_id: str, project_id: str, decision: engine.Decision, now: int
          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    row = {
        "patient_id": patient_id, "project_id": project_id, "tier": decision.tier,
        "excluded_mask": category_mask(decision.excluded_categories),
        "excluded_classes": ",".join(decision.excluded_classes),
        "period_start": decision.period[0], "period_end": decision.period[1],
        "valid_from": decision.valid[0], "valid_until": decision.valid[1],
        "consent": decision.consent, "basis": json.dumps(list(decision.basis)), "updated": now,
    }
    classes = [{"patient_id": patient_id, "project_id": project_id, "resource_type": c}
               for c in decision.excluded_classes]
    return row, classes


def _dated(row: dict[str, Any], stored: dict[str, Any] | None) -> dict[str, Any]:
    """`row`, keeping the stored row's `updated` when nothing else about the decision changed."""
    if stored is not None and all(stored[k] == v for k, v in row.items() if k != "updated"):
        return {**row, "updated": stored["updated"]}
    return row


def _patient_chunks(conn: Connection, patient_ids: Sequence[str] | None) -> Iterable[list[str]]:
    if patient_ids is not None:
        for start in range(0, len(patient_ids), _CHUNK):
            yield list(patient_ids[start:start + _CHUNK])
        return
    last = ""
    while True:
        chunk = list(conn.execute(
            select(resources.c.id).where(resources.c.type == "Patient", resources.c.id > last)
            .order_by(resources.c.id).limit(_CHUNK)).scalars())
        if not chunk:
            return
        yield chunk
        last = chunk[-1]


def refresh(conn: Connection, *, patient_ids: Sequence[str] | None = None,
            project_ids: Sequence[str] | None = None) -> int:
    """Recompute the decisions of these patients (all if None) for these projects (all if None),
    under the default regime the database holds (`consent_default`).

    A decision that comes out identical to the stored one keeps its `updated` instant, which
    versions the project's recorded aggregate answers: an unrelated change (another
    project's consent) does not make them stale. A refresh of many patients refreshes the
    planner's statistics on the decisions as it writes them (`repository.GrowingWrite`).
    """
    default = consent_default(conn)
    chosen = [p for p in projects.all_projects(conn) if project_ids is None or p.project_id in project_ids]
    if not chosen:
        return 0
    views = [p.view() for p in chosen]
    if patient_ids is not None and conn.dialect.name == "postgresql":
        # Serialise concurrent refreshes of the same patients (SQLite's writer lock already does).
        conn.execute(select(resources.c.pk).where(resources.c.type == "Patient",
                                                  resources.c.id.in_(list(patient_ids))).with_for_update())
    defaults = {view.id: engine.default_decision(default, view) for view in views}
    now = now_us()
    written = 0
    growth = repository.GrowingWrite((decisions, decision_classes))
    for chunk in _patient_chunks(conn, patient_ids):
        project_filter = decisions.c.project_id.in_([v.id for v in views])
        stored = {(r.patient_id, r.project_id): r._asdict() for r in conn.execute(
            select(decisions).where(decisions.c.patient_id.in_(chunk), project_filter))}
        conn.execute(delete(decisions).where(decisions.c.patient_id.in_(chunk), project_filter))
        conn.execute(delete(decision_classes).where(
            and_(decision_classes.c.patient_id.in_(chunk), decision_classes.c.project_id.in_([v.id for v in views]))))
        live = _live(conn, "Patient", chunk)
        consents: dict[str, list[dict[str, Any]]] = {}
        for patient_id, payload in conn.execute(select(resources.c.patient_id, resources.c.json).where(
                resources.c.type == "Consent", resources.c.patient_id.in_(chunk), resources.c.deleted == false())):
            consents.setdefault(patient_id, []).append(orjson.loads(payload))
        rows, classes = [], []
        for patient_id in sorted(live):
            for view in views:
                own = consents.get(patient_id)
                decision = engine.decide(own, view, default) if own else defaults[view.id]
                row, excluded = _rows(patient_id, view.id, decision, now)
                rows.append(_dated(row, stored.get((patient_id, view.id))))
                classes.extend(excluded)
        if rows:
            conn.execute(insert(decisions), rows)
            written += len(rows)
        if classes:
            conn.execute(insert(decision_classes), classes)
        growth.added(conn, written)
    return written


def explain(conn: Connection, patient_id: str, project_id: str) -> dict[str, Any]:
    """The materialised decision for one patient and project, with its basis."""
    projects.get(conn, project_id)
    if not _live(conn, "Patient", [patient_id]):
        raise NotFound(f"Patient {patient_id!r} is not known")
    row = conn.execute(select(decisions).where(decisions.c.patient_id == patient_id,
                                               decisions.c.project_id == project_id)).first()
    if row is None:
        raise NotFound(f"No decision is materialised for Patient/{patient_id} and project {project_id}; "
                       "run `flask --app wsgi consent refresh`")
    excluded_categories = category_names(row.excluded_mask)
    period = None
    if row.period_start is not None or row.period_end is not None:
        period = {"start": instant(row.period_start) if row.period_start is not None else None,
                  "end": instant(row.period_end) if row.period_end is not None else None}
    valid = None
    if row.valid_from is not None or row.valid_until is not None:
        valid = {"start": instant(row.valid_from) if row.valid_from is not None else None,
                 "end": instant(row.valid_until) if row.valid_until is not None else None}
    return {
        "patient": patient_id,
        "project": project_id,
        "tier": engine.TIERS[row.tier],
        "excluded": excluded_categories + [c for c in row.excluded_classes.split(",") if c],
        "period": period,
        "valid": valid,
        "basis": json.loads(row.basis),
    }


repository.AFTER_WRITE.append(on_write)
