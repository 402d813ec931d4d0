"""Research projects: a FHIR ResearchStudy plus Passerelle's release settings.

The ResearchStudy (title, description, sponsor = recipient Organization, purpose,
period) is an ordinary stored resource the custodian can read and search; the
settings that drive enforcement (highest tier, privacy budget, resource types,
status) live in the `projects` table under the same id.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Connection, func, select, update

from consent import engine
from policies import budget
from service import audit, keyring
from service.db import now_us
from service.errors import InvalidRequest, NotFound
from service.store import repository
from service.store.schema import decisions, projects
from service.store.searchparams import COMPARTMENT
from service.validation import validate

#: Resource types of patient data a project may receive (all of them without a type list).
#: Consents and provenance are about the release itself, never research data.
PATIENT_DATA_TYPES: tuple[str, ...] = tuple(sorted({"Patient", *COMPARTMENT} - {"Consent", "Provenance"}))
#: Resources about no patient that a project receives only when it declares them.
DIRECTORY_TYPES: tuple[str, ...] = ("Location", "Medication", "Organization", "Practitioner", "PractitionerRole")
#: The languages patients read a project's plain-language text in, and what that text says.
LANGUAGES: tuple[str, ...] = ("en", "fr")
PLAIN_KEYS: tuple[str, ...] = ("title", "purpose", "sponsor")
TRANSLATION = "http://hl7.org/fhir/StructureDefinition/translation"


@dataclass(frozen=True)
class ProjectRecord:
    """A project's settings as stored."""

    project_id: str
    name: str
    max_tier: int
    epsilon: float
    delta: float
    types: tuple[str, ...] | None
    organization_id: str | None
    status: str
    #: The project's own de-identification profile as JSON text, or None for the shipped default.
    profile: str | None = None
    epsilon_cap: float = 1.0
    suppression: int = 11
    #: What patients read, per language: {"en": {"title", "purpose", "sponsor"}, "fr": {…}}, or None.
    plain_language: dict[str, dict[str, str]] | None = None
    #: The last day the project runs (ISO date), as patients are told, or None.
    ends: str | None = None

    @property
    def released_types(self) -> tuple[str, ...]:
        """Every type the project receives: its declared types, or all patient data without a list."""
        return self.types or PATIENT_DATA_TYPES

    def view(self) -> engine.Project:
        """What the consent engine needs (a closed project may receive nothing)."""
        tier = engine.NONE if self.status != "active" else self.max_tier
        patient_data = tuple(t for t in self.released_types if t in PATIENT_DATA_TYPES)
        return engine.Project(self.project_id, tier, patient_data, self.organization_id)

    def plain(self, language: str) -> dict[str, str | None]:
        """Title, purpose and sponsor in `language` (one of LANGUAGES) for patients; a project
        created without the text shows its name as the title, and no purpose or sponsor."""
        text = (self.plain_language or {}).get(language, {})
        return {"title": text.get("title") or self.name, "purpose": text.get("purpose"),
                "sponsor": text.get("sponsor")}

    def as_json(self) -> dict[str, Any]:
        return {"project_id": self.project_id, "name": self.name, "tier": engine.TIERS[self.max_tier],
                "epsilon": self.epsilon, "delta": self.delta, "epsilon_cap": self.epsilon_cap,
                "suppression": self.suppression, "types": list(self.types) if self.types else None,
                "organization": self.organization_id, "status": self.status,
                "plain_language": self.plain_language, "ends": self.ends}


def record_of(row: Any) -> ProjectRecord:
    """The record of a row holding the `projects` columns (by name)."""
    return ProjectRecord(row.project_id, row.name, row.max_tier, row.epsilon, row.delta,
                         tuple(json.loads(row.types)) if row.types else None, row.organization_id, row.status,
                         row.profile, row.epsilon_cap, row.suppression,
                         json.loads(row.plain_language) if row.plain_language else None, row.ends)


def parse_types(text: str | None) -> tuple[str, ...] | None:
    """`Observation,Condition` → validated tuple; None or empty means every patient-data type.

    Directory types (Practitioner, Organization, …) are released only to projects that list them.
    """
    if not text:
        return None
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [t for t in names if t not in PATIENT_DATA_TYPES and t not in DIRECTORY_TYPES]
    if unknown:
        raise InvalidRequest(f"not resource types a project can receive: {', '.join(unknown)} "
                             f"(choose from {', '.join(PATIENT_DATA_TYPES + DIRECTORY_TYPES)})")
    return names


def plain_language(texts: dict[str, dict[str, str | None]]) -> dict[str, dict[str, str]] | None:
    """{"en": {"title": …, "purpose": …, "sponsor": …}, "fr": {…}} with empty texts dropped, checked:
    each text given is given in every one of LANGUAGES (patients read either). None when none is given."""
    kept = {lang: {k: v.strip() for k, v in (texts.get(lang) or {}).items() if v and v.strip()} for lang in LANGUAGES}
    for key in PLAIN_KEYS:
        given = [lang for lang in LANGUAGES if key in kept[lang]]
        if given and len(given) < len(LANGUAGES):
            missing = [lang for lang in LANGUAGES if lang not in given]
            raise InvalidRequest(f"the project's {key} is given in {', '.join(given)} but not in {', '.join(missing)}: "
                                 "patients read either language")
    return kept if any(kept.values()) else None


def _translated(translations: dict[str, str]) -> dict[str, Any]:
    """The `_element` of a string with the FHIR translation extension for each other language."""
    return {"extension": [{"url": TRANSLATION, "extension": [{"url": "lang", "valueCode": lang},
                                                              {"url": "content", "valueString": value}]}
                          for lang, value in translations.items()]}


def create(conn: Connection, *, name: str, tier: str, epsilon: float, delta: float = 0.0,
           types: tuple[str, ...] | None = None, description: str | None = None,
           organization_id: str | None = None, profile: str | None = None, epsilon_cap: float = 1.0,
           suppression: int = 11, plain: dict[str, dict[str, str | None]] | None = None,
           ends: str | None = None) -> ProjectRecord:
    """Store the ResearchStudy, the project settings and its privacy budget in the caller's transaction.

    `plain` (checked by `plain_language`) gives the ResearchStudy its English title, description (the
    purpose) and sponsor name, with French translations; `ends` (ISO date, not in the past) is its
    `period.end`.
    """
    if tier not in ("aggregate", "record"):
        raise InvalidRequest("tier must be aggregate or record")
    if not epsilon > 0 or delta < 0 or delta >= 1:
        raise InvalidRequest("epsilon must be > 0 and delta in [0, 1)")
    if not epsilon_cap > 0:
        raise InvalidRequest("the per-query epsilon cap must be > 0")
    if suppression < 0:
        raise InvalidRequest("the suppression threshold cannot be negative")
    texts = plain_language(plain or {})
    today = datetime.now(UTC).date().isoformat()
    if ends is not None:
        try:
            ends = date.fromisoformat(ends).isoformat()
        except ValueError:
            raise InvalidRequest(f"the end date {ends!r} is not a date (YYYY-MM-DD)") from None
        if ends < today:
            raise InvalidRequest(f"the end date {ends} is in the past")
    english = (texts or {}).get("en", {})
    others = {lang: text for lang, text in (texts or {}).items() if lang != "en"}
    if description and english.get("purpose"):
        raise InvalidRequest("the description is the English purpose: give it once (--purpose-en)")
    if organization_id is not None:
        repository.read(conn, "Organization", organization_id)
    study: dict[str, Any] = {
        "resourceType": "ResearchStudy",
        "status": "active",
        "title": english.get("title") or name,
        "category": [{"coding": [{"system": engine.PURPOSE_SYSTEM, "code": "HRESCH",
                                  "display": "health research"}]}],
        "period": {"start": today, **({"end": ends} if ends else {})},
    }
    if english.get("title"):
        study["_title"] = _translated({lang: t["title"] for lang, t in others.items()})
    if description or english.get("purpose"):
        study["description"] = description or english["purpose"]
    if english.get("purpose"):
        study["_description"] = _translated({lang: t["purpose"] for lang, t in others.items()})
    sponsor: dict[str, Any] = {}
    if organization_id:
        sponsor["reference"] = f"Organization/{organization_id}"
    if english.get("sponsor"):
        sponsor["display"] = english["sponsor"]
        sponsor["_display"] = _translated({lang: t["sponsor"] for lang, t in others.items()})
    if sponsor:
        study["sponsor"] = sponsor
    validate(study, "ResearchStudy")
    stored = repository.create(conn, "ResearchStudy", study)
    conn.execute(projects.insert().values(
        project_id=stored.id, name=name, max_tier=engine.TIERS.index(tier), epsilon=epsilon, delta=delta,
        types=json.dumps(list(types)) if types else None, organization_id=organization_id, profile=profile,
        epsilon_cap=min(epsilon_cap, epsilon), suppression=suppression, status="active",
        created=now_us(), plain_language=json.dumps(texts) if texts else None, ends=ends))
    budget.ensure_budget(conn, stored.id, epsilon, delta, actor="project create")
    keyring.start(conn, stored.id)
    return get(conn, stored.id)


def get(conn: Connection, project_id: str) -> ProjectRecord:
    row = conn.execute(select(projects).where(projects.c.project_id == project_id)).first()
    if row is None:
        raise NotFound(f"Project {project_id!r} is not known")
    return record_of(row)


def all_projects(conn: Connection) -> list[ProjectRecord]:
    return [record_of(row) for row in conn.execute(select(projects).order_by(projects.c.created))]


def close(conn: Connection, project_id: str) -> ProjectRecord:
    """Close a project for good: it receives nothing more; its ResearchStudy is marked completed."""
    get(conn, project_id)
    conn.execute(update(projects).where(projects.c.project_id == project_id).values(status="closed"))
    study = repository.read(conn, "ResearchStudy", project_id).resource()
    study["status"] = "completed"
    repository.update(conn, "ResearchStudy", project_id, study)
    return get(conn, project_id)


def tier_counts(conn: Connection, project_id: str) -> dict[str, int]:
    """How many patients each tier currently holds for the project."""
    rows = conn.execute(select(decisions.c.tier, func.count()).where(decisions.c.project_id == project_id)
                        .group_by(decisions.c.tier))
    counts = dict.fromkeys(engine.TIERS, 0)
    counts.update({engine.TIERS[tier]: n for tier, n in rows})
    return counts


def raise_budget(conn: Connection, project_id: str, total: float, actor: str) -> None:
    """Raise the project's total ε (audited); lowering is refused and `spent` is never touched."""
    get(conn, project_id)
    if budget.raise_budget(conn, project_id, total, actor):
        conn.execute(update(projects).where(projects.c.project_id == project_id).values(epsilon=total))
        audit.record(conn, actor=actor, action="budget-raise", project_id=project_id, detail={"total": total})
