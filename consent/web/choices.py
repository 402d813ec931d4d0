"""What the signed-in patient has chosen, what they may choose, and saving a change.

A choice is one of the engine's tiers (`none`, `aggregate`, `record`) minus some sensitive
categories, for one project or research-wide (future projects). What the portal shows as
the patient's current choice for a project is the materialised decision: what research
receives now, whatever set it (the deployment default, a paper form, the web form).

A change travels as a submitted form (`parse`), is planned against the database
(`prepare`: the project must exist and be active, the tier offered by it, the categories
known; otherwise `ChoiceRefused` and nothing is written), shown to the patient (the plan's
`effects`, predicted by the consent engine on the Consents the save would leave), then
re-planned and stored in one write transaction (`save`), through `consent/writer.py`, so the
decisions are materialised before it commits.

Precedence (consent/engine.py `governing`): the most recent active research Consent that
applies governs, research-wide and project-specific alike. So a save that changes the
research-wide choice dates it one second before the project choices it writes and re-records
every project choice the patient holds (same content, newer `dateTime`): those keep
governing their projects.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from flask_babel import lazy_gettext
from sqlalchemy import Connection, false, select

from consent import engine, projects, writer
from consent.materialise import consent_default
from consent.projects import PATIENT_DATA_TYPES, ProjectRecord
from consent.web.errors import PageError
from policies.sensitivity import ACT_CODE, CATEGORIES, LABEL_OF, LABELS
from policies.sensitivity import names as category_names
from service.store.repository import Stored
from service.store.schema import decisions, history, resources
from service.validation import validate

TIERS = engine.TIERS
#: What a form may ask for, and the fields each kind of form carries.
FORMS: dict[str, frozenset[str]] = {
    "project": frozenset({"kind", "project", "tier", "exclude"}),
    "research": frozenset({"kind", "tier", "exclude"}),
    "sensitive": frozenset({"kind", "exclude"}),
    "withdraw": frozenset({"kind"}),
}
#: Kinds of data, in the words the portal uses, by the resource types that carry them.
DATA_KINDS: dict[str, tuple[str, ...]] = {
    "about-you": ("Patient",),
    "conditions": ("AdverseEvent", "AllergyIntolerance", "ClinicalImpression", "Condition", "DetectedIssue",
                   "FamilyMemberHistory", "Flag", "RiskAssessment"),
    "results": ("BodyStructure", "DiagnosticReport", "ImagingStudy", "Media", "Observation", "Specimen"),
    "medicines": ("Immunization", "Medication", "MedicationAdministration", "MedicationDispense",
                  "MedicationRequest", "MedicationStatement"),
    "care": ("CarePlan", "CareTeam", "Device", "Encounter", "EpisodeOfCare", "Goal", "NutritionOrder",
             "Procedure", "ResearchSubject", "ServiceRequest", "SupplyDelivery"),
    "documents": ("Communication", "Composition", "DocumentReference", "List", "QuestionnaireResponse"),
    "billing": ("Claim", "Coverage", "ExplanationOfBenefit"),
    "providers": ("Location", "Organization", "Practitioner", "PractitionerRole"),
}
_KIND_OF = {t: kind for kind, types in DATA_KINDS.items() for t in types}
#: The consent engine's stand-in for a project that does not exist yet: what research-wide choices give.
FUTURE = engine.Project("", engine.RECORD, PATIENT_DATA_TYPES)


#: What the patient reads when a submitted choice is refused, by the rule that refused it.
REFUSALS = {
    "form": lazy_gettext("This form is not one the portal sent, so nothing was changed. Please start again from "
                         "your choices."),
    "project": lazy_gettext("This project is not open to choices, so nothing was changed."),
    "tier": lazy_gettext("This choice is not offered for this project, so nothing was changed."),
    "category": lazy_gettext("This kind of sensitive information is not one the portal knows, so nothing was "
                             "changed."),
}


class ChoiceRefused(PageError):
    """A submitted choice the portal does not allow; `reason` names the rule (a key of `REFUSALS`):
    `form` (a field that does not belong, or a malformed one), `project` (unknown or closed),
    `tier` (not offered by the project) or `category` (not a sensitive category); `detail` says
    what was wrong. Nothing is written."""

    def __init__(self, reason: str, detail: str):
        super().__init__(REFUSALS[reason])
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Choice:
    """A tier and the sensitive categories left out of it (none when the tier is `none`);
    `limited` when the decision also leaves out some kinds of data or dates."""

    tier: str
    excluded: tuple[str, ...] = ()
    limited: bool = False

    @staticmethod
    def of(decision: engine.Decision) -> Choice:
        if decision.tier == engine.NONE:
            return Choice("none")
        return Choice(decision.tier_name, decision.excluded_categories,
                      bool(decision.excluded_classes) or decision.period != (None, None)
                      or decision.valid != (None, None))

    @staticmethod
    def of_row(row: Any) -> Choice:
        """The choice a materialised `decisions` row holds."""
        if row.tier == engine.NONE:
            return Choice("none")
        return Choice(TIERS[row.tier], tuple(category_names(row.excluded_mask)),
                      bool(row.excluded_classes) or any(v is not None for v in (
                          row.period_start, row.period_end, row.valid_from, row.valid_until)))


def expressed(consent: dict[str, Any]) -> Choice:
    """What an active research Consent says on its own, uncapped by any project's tier."""
    project = replace(FUTURE, id=engine.bound_project(consent) or "")
    return Choice.of(engine.decide([{**consent, "status": "active"}], project, "deny"))


def kinds_of(types: Iterable[str]) -> list[str]:
    """The kinds of data (keys of `DATA_KINDS`, in its order) that these resource types carry."""
    found = {_KIND_OF[t] for t in types}
    return [kind for kind in DATA_KINDS if kind in found]


@dataclass(frozen=True)
class Offer:
    """One active project as the patient sees it, with their current choice for it."""

    project: ProjectRecord
    current: Choice
    holds_own: bool

    @property
    def project_id(self) -> str:
        return self.project.project_id

    @property
    def offered(self) -> tuple[str, ...]:
        """The choices the project offers: up to its tier."""
        return TIERS[:self.project.max_tier + 1]

    @property
    def kinds(self) -> list[str]:
        """The kinds of data the project would receive."""
        return kinds_of(self.project.released_types)


@dataclass(frozen=True)
class Overview:
    """The patient's choices: per active project (oldest first) and research-wide, with the
    Consents they hold (`held`: the one `writer.current_for` would update, by project id or None)."""

    patient_id: str
    projects: tuple[Offer, ...]
    research_wide: Choice
    consents: tuple[dict[str, Any], ...] = field(repr=False)
    held: Mapping[str | None, dict[str, Any]] = field(repr=False)
    default: str = "deny"

    def offer(self, project_id: str) -> Offer:
        for offer in self.projects:
            if offer.project_id == project_id:
                return offer
        raise ChoiceRefused("project", f"project {project_id!r} is not open to choices")

    def excluded_everywhere(self) -> tuple[str, ...]:
        """The categories no project, present or future, receives from this patient."""
        choices = [self.research_wide, *(o.current for o in self.projects)]
        return tuple(c for c in CATEGORIES if all(ch.tier == "none" or c in ch.excluded for ch in choices))


def overview(conn: Connection, patient_id: str) -> Overview:
    """The patient's current choices, read in the caller's transaction."""
    rows = {row.project_id: row for row in conn.execute(select(decisions).where(decisions.c.patient_id == patient_id))}
    consents = tuple(orjson.loads(payload) for payload in conn.execute(select(resources.c.json).where(
        resources.c.type == "Consent", resources.c.patient_id == patient_id,
        resources.c.deleted == false())).scalars())
    default = consent_default(conn)
    offers = []
    held: dict[str | None, dict[str, Any]] = {}
    for project in projects.all_projects(conn):
        if project.status != "active":
            continue
        decided = rows.get(project.project_id)
        current = Choice.of_row(decided) if decided else Choice.of(engine.decide(consents, project.view(), default))
        own = writer.current_for(conn, patient_id, project.project_id)
        if own is not None:
            held[project.project_id] = own
        offers.append(Offer(project, current, own is not None))
    wide = writer.current_for(conn, patient_id, None)
    if wide is not None:
        held[None] = wide
    return Overview(patient_id, tuple(offers), Choice.of(engine.decide(consents, FUTURE, default)),
                    consents, held, default)


# -- a submitted change ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A change the patient asked for: one project's choice, the research-wide choice, the
    sensitive categories to leave out everywhere, or withdrawal from all research."""

    kind: str
    project_id: str | None = None
    tier: str | None = None
    exclude: tuple[str, ...] = ()

    def fields(self) -> list[tuple[str, str]]:
        """The form fields that carry this request again (the confirmation page's hidden fields)."""
        out = [("kind", self.kind)]
        if self.project_id is not None:
            out.append(("project", self.project_id))
        if self.tier is not None:
            out.append(("tier", self.tier))
        out.extend(("exclude", c) for c in self.exclude)
        return out


def _single(fields: Mapping[str, Sequence[str]], name: str) -> str:
    values = fields.get(name) or ()
    if len(values) != 1 or not values[0]:
        raise ChoiceRefused("form", f"the form must carry exactly one {name}")
    return values[0]


def parse(fields: Mapping[str, Sequence[str]]) -> Request:
    """The request a submitted form carries (field name → values); refused when a field is
    missing, repeated, unknown to that kind of form (a patient id, say), or names an unknown
    tier or category."""
    kind = _single(fields, "kind")
    if kind not in FORMS:
        raise ChoiceRefused("form", f"unknown kind of form {kind!r}")
    unexpected = sorted(set(fields) - FORMS[kind])
    if unexpected:
        raise ChoiceRefused("form", f"unexpected form fields: {', '.join(unexpected)}")
    exclude = tuple(fields.get("exclude") or ())
    unknown = sorted(set(exclude) - set(CATEGORIES))
    if unknown:
        raise ChoiceRefused("category", f"unknown sensitive categories: {', '.join(unknown)}")
    request = Request(kind, exclude=tuple(c for c in CATEGORIES if c in exclude))
    if "tier" in FORMS[kind]:
        tier = _single(fields, "tier")
        if tier not in TIERS:
            raise ChoiceRefused("tier", f"unknown choice {tier!r}")
        request = replace(request, tier=tier, exclude=() if tier == "none" else request.exclude)
    if "project" in FORMS[kind]:
        request = replace(request, project_id=_single(fields, "project"))
    return request


@dataclass(frozen=True)
class Effect:
    """What research receives before and after, for a project (None: future projects)."""

    project_id: str | None
    before: Choice
    after: Choice


@dataclass(frozen=True)
class Plan:
    """The Consents a save writes, in order, and what they change."""

    request: Request
    consents: tuple[dict[str, Any], ...]
    effects: tuple[Effect, ...]
    #: Projects whose own choice stays: re-recorded unchanged because the research-wide choice changes.
    kept: tuple[str, ...] = ()
    #: Where a choice written here would not govern, because a more recent Consent does (None: research-wide).
    overruled: tuple[str | None, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.consents


def with_exclusions(consent: dict[str, Any], add: Iterable[str], remove: Iterable[str]) -> dict[str, Any]:
    """A copy of a held Consent leaving out the categories `add` too, and no longer leaving out
    `remove` where a plain deny of security labels did. Everything else it says is kept, so
    the copy never releases more than the patient allowed beyond what `remove` names."""
    copy = orjson.loads(orjson.dumps(consent))
    copy.pop("meta", None)
    root = copy["provision"]
    if root.get("type") != "permit":
        return copy
    add, remove = set(add), set(remove)
    children = []
    for child in root.get("provision") or ():
        plain = (child.get("type") == "deny" and set(child) <= {"type", "securityLabel"}
                 and all(label.get("system") == ACT_CODE for label in child.get("securityLabel") or ()))
        if plain:
            labels = [label for label in child.get("securityLabel") or ()
                      if LABELS.get(label.get("code")) not in remove]
            add -= {LABELS.get(label.get("code")) for label in labels}
            if not labels:
                continue
            child = {**child, "securityLabel": labels}
        children.append(child)
    if add:
        children.append({"type": "deny", "securityLabel": [{"system": ACT_CODE, "code": LABEL_OF[c]}
                                                            for c in CATEGORIES if c in add]})
    if children:
        root["provision"] = children
    else:
        root.pop("provision", None)
    return copy


def _web(consent: dict[str, Any], when: datetime) -> dict[str, Any]:
    """A held Consent the patient changed on the web form: dated `when`, made by the patient on the
    web form (no paper recorder or scan any more; the earlier versions keep them)."""
    for key in ("verification", "sourceAttachment"):
        consent.pop(key, None)
    consent["performer"] = [dict(consent["patient"])]
    method = {"url": writer.METHOD_EXTENSION, "valueCoding": writer.METHODS["web"]}
    consent["extension"] = [method, *(e for e in consent.get("extension") or ()
                                      if e.get("url") != writer.METHOD_EXTENSION)]
    consent["dateTime"] = when.isoformat(timespec="seconds")
    validate(consent, "Consent")
    return consent


def _build(state: Overview, project_id: str | None, choice: Choice, when: datetime) -> dict[str, Any]:
    return writer.build(state.patient_id, project_id, choice.tier, list(choice.excluded), source="web form",
                        method="web", when=when)


def plan(state: Overview, request: Request, when: datetime) -> Plan:
    """Pure: the Consents that carry out `request` for the patient of `state`, and their effects."""
    moment = when.astimezone(UTC).replace(microsecond=0)
    wide_moment = moment - timedelta(seconds=1)
    wide: dict[str, Any] | None = None
    own: dict[str, dict[str, Any]] = {}
    if request.kind == "project":
        assert request.project_id is not None and request.tier is not None
        offer = state.offer(request.project_id)
        if request.tier not in offer.offered:
            raise ChoiceRefused("tier", f"project {request.project_id} does not offer {request.tier!r}")
        own[offer.project_id] = _build(state, offer.project_id, Choice(request.tier, request.exclude), moment)
    elif request.kind == "research":
        assert request.tier is not None
        wide = _build(state, None, Choice(request.tier, request.exclude), wide_moment)
    elif request.kind == "withdraw":
        wide = _build(state, None, Choice("none"), wide_moment)
        own = {o.project_id: _build(state, o.project_id, Choice("none"), moment) for o in state.projects}
    else:
        everywhere = set(state.excluded_everywhere())
        add, remove = set(request.exclude) - everywhere, everywhere - set(request.exclude)
        if None in state.held:
            wide = _web(with_exclusions(state.held[None], add, remove), wide_moment)
        elif state.research_wide.tier != "none":
            excluded = (set(state.research_wide.excluded) | add) - remove
            if excluded != set(state.research_wide.excluded):
                wide = _build(state, None, Choice(state.research_wide.tier, tuple(excluded)), wide_moment)
        own = {project_id: _web(with_exclusions(held, add, remove), moment)
               for project_id, held in state.held.items() if project_id is not None}
    # Writing what the patient already holds changes nothing: leave it out.
    if wide is not None and _same(state.held.get(None), wide):
        wide = None
    own = {p: c for p, c in own.items() if not _same(state.held.get(p), c)}
    kept = []
    if wide is not None:
        for offer in state.projects:
            held = state.held.get(offer.project_id)
            if held is not None and offer.project_id not in own:
                copy = orjson.loads(orjson.dumps(held))
                copy.pop("meta", None)
                copy["dateTime"] = moment.isoformat(timespec="seconds")
                own[offer.project_id] = copy
                kept.append(offer.project_id)
    written = ([wide] if wide is not None else []) + [own[o.project_id] for o in state.projects
                                                       if o.project_id in own]
    for consent in written:
        held = state.held.get(engine.bound_project(consent))
        if held is not None:
            consent["id"] = held["id"]
    replaced = {c.get("id") for c in written}
    after = [c for c in state.consents if c.get("id") not in replaced] + written
    effects, overruled = [], []
    for offer in state.projects:
        predicted = Choice.of(engine.decide(after, offer.project.view(), state.default))
        if predicted != offer.current:
            effects.append(Effect(offer.project_id, offer.current, predicted))
        if offer.project_id in own and engine.governing(after, offer.project_id) is not own[offer.project_id]:
            overruled.append(offer.project_id)
    future = Choice.of(engine.decide(after, FUTURE, state.default))
    if future != state.research_wide:
        effects.append(Effect(None, state.research_wide, future))
    if wide is not None and engine.governing(after, FUTURE.id) is not wide:
        overruled.append(None)
    return Plan(request, tuple(written), tuple(effects), tuple(kept), tuple(overruled))


def _same(held: dict[str, Any] | None, consent: dict[str, Any]) -> bool:
    return held is not None and held.get("provision") == consent.get("provision")


def prepare(conn: Connection, patient_id: str, fields: Mapping[str, Sequence[str]],
            when: datetime | None = None) -> Plan:
    """The plan of a submitted form for this patient, checked against the database now."""
    return plan(overview(conn, patient_id), parse(fields), when or datetime.now(UTC))


def save(conn: Connection, patient_id: str, fields: Mapping[str, Sequence[str]]) -> tuple[Plan, list[Stored]]:
    """Re-check and store a submitted change in the caller's write transaction (one per save),
    which materialises the patient's decisions before it commits."""
    planned = prepare(conn, patient_id, fields)
    return planned, [writer.record(conn, consent) for consent in planned.consents]


# -- what the patient said, version by version ------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """One stored version of one of the patient's research Consents."""

    consent_id: str
    version: int
    recorded: int
    signed: str | None
    project_id: str | None
    choice: Choice | None  # None when the version is not in force (status other than active)
    status: str
    method: str | None
    recorded_by: str | None
    resource: dict[str, Any] = field(repr=False)


def versions(conn: Connection, patient_id: str, since: int | None = None) -> list[Version]:
    """Every version (newest first) about this patient of their live research Consents, recorded
    at or after `since` when given."""
    query = (select(resources.c.id, history.c.version, history.c.last_updated, history.c.json)
             .join(resources, resources.c.pk == history.c.resource_pk)
             .where(resources.c.patient_id == patient_id, resources.c.type == "Consent",
                    history.c.patient_id == patient_id, history.c.deleted == false())
             .order_by(history.c.last_updated.desc(), history.c.version.desc()))
    if since is not None:
        query = query.where(history.c.last_updated >= since)
    found = []
    for row in conn.execute(query):
        consent = orjson.loads(row.json)
        if not engine.is_research(consent):
            continue
        how = writer.how(consent)
        found.append(Version(row.id, row.version, row.last_updated, consent.get("dateTime"),
                             engine.bound_project(consent),
                             expressed(consent) if consent.get("status") == "active" else None,
                             consent.get("status", ""), how["method"], how["recorded_by"], consent))
    return found


def bundle(conn: Connection, patient_id: str) -> dict[str, Any]:
    """The patient's Consents as they stand (every scope), as a FHIR Bundle of type collection."""
    consents = [orjson.loads(payload) for payload in conn.execute(
        select(resources.c.json).where(resources.c.type == "Consent", resources.c.patient_id == patient_id,
                                       resources.c.deleted == false()).order_by(resources.c.pk)).scalars()]
    return {"resourceType": "Bundle", "type": "collection",
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
            "entry": [{"fullUrl": f"Consent/{c['id']}", "resource": c} for c in consents]}
