"""The consent decision engine: (Consent resources, project, default) → decision. Pure.

It never reads the database, the clock or the request; `consent/materialise.py`
stores its decisions so research queries can filter in SQL.

Semantics (README, "Consent"):
- Only `active` Consents with scope `research` count. Among those that apply to the
  project (bound to it by the ResearchStudyContext extension, or research-wide), the
  most recent (`dateTime`, then `meta.lastUpdated`) governs. With none, the default
  regime applies (`deny`, or `aggregate`/`record` without sensitive categories).
- A provision's level for a piece of data is computed from the root down: a permit
  raises the level inherited from its parent to what its actions grant (`use` →
  aggregate, `disclose` or no action → record); a deny lowers it (`disclose` → at most
  aggregate, `use` or no action → none). A nested provision that matches overrides its
  parent; among matching siblings deny overrides permit. Data no provision matches is
  not released. Hence adding a deny provision can never widen a decision.
- The decision is the highest level that some non-sensitive data reaches, capped by the
  project's tier, with a set of classes × sensitive categories × one data period on
  which that level holds everywhere, chosen greedily among the maximal periods (most
  classes, then longest, then most recent). What cannot be expressed that way is
  withheld (noted in `basis`): the decision is never wider than the consent.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from policies.fhirdates import MAX_US, MIN_US, DateFormatError, date_range
from policies.sensitivity import ACT_CODE, CATEGORIES, CATEGORY_SYSTEM, LABELS

NONE, AGGREGATE, RECORD = 0, 1, 2
TIERS = ("none", "aggregate", "record")
DEFAULTS = ("deny", "aggregate", "record")

SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
ACTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentaction"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
STUDY_CONTEXT = "http://hl7.org/fhir/StructureDefinition/consent-ResearchStudyContext"
#: v3 PurposeOfUse codes that cover research uses.
RESEARCH_PURPOSES = frozenset({"HRESCH", "CLINTRCH", "CLINTRCHNPC", "CLINTRCHPC", "PRECLINTRCH", "BIORCH"})
_PROVISION_KEYS = frozenset({"id", "type", "period", "actor", "action", "securityLabel", "purpose", "class",
                             "code", "dataPeriod", "provision", "extension"})


class UnsupportedConsent(ValueError):
    """A research Consent uses something Passerelle cannot enforce; `problems` says what."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Project:
    """What the engine needs to know about a research project."""

    id: str
    max_tier: int
    classes: tuple[str, ...]
    organization: str | None = None


@dataclass(frozen=True)
class Decision:
    """What one patient's data may be used for by one project."""

    tier: int
    excluded_classes: tuple[str, ...] = ()
    excluded_categories: tuple[str, ...] = ()
    period: tuple[int | None, int | None] = (None, None)
    valid: tuple[int | None, int | None] = (None, None)
    basis: tuple[str, ...] = field(default=(), compare=False)
    consent: str | None = field(default=None, compare=False)

    @property
    def tier_name(self) -> str:
        return TIERS[self.tier]


# -- reading a Consent -----------------------------------------------------------------------


def _codings(value: Any) -> list[dict[str, Any]]:
    """Codings of a Coding, a CodeableConcept, or a list of either."""
    items = value if isinstance(value, list) else [value] if value else []
    out: list[dict[str, Any]] = []
    for item in items:
        out.extend(item.get("coding") or () if "coding" in item else (item,))
    return out


def is_research(consent: dict[str, Any]) -> bool:
    return any(c.get("system") == SCOPE_SYSTEM and c.get("code") == "research"
               for c in _codings(consent.get("scope")))


def _study_of(node: dict[str, Any]) -> str | None:
    for ext in node.get("extension") or ():
        if ext.get("url") == STUDY_CONTEXT:
            reference = (ext.get("valueReference") or {}).get("reference", "")
            return reference.split("/", 1)[1] if reference.startswith("ResearchStudy/") else reference
    return None


def bound_project(consent: dict[str, Any]) -> str | None:
    """The project a Consent is bound to: by the ResearchStudyContext extension, or by naming
    exactly one ResearchStudy as the root provision's actor."""
    root = consent.get("provision") or {}
    studies = {ref.split("/", 1)[1] for actor in root.get("actor") or ()
               if (ref := (actor.get("reference") or {}).get("reference", "")).startswith("ResearchStudy/")}
    return _study_of(consent) or _study_of(root) or (studies.pop() if len(studies) == 1 else None)


def _period(value: dict[str, Any] | None) -> tuple[int, int]:
    value = value or {}
    low = date_range(value["start"])[0] if value.get("start") else MIN_US
    high = date_range(value["end"])[1] if value.get("end") else MAX_US
    return low, high


# -- checking what can be enforced -----------------------------------------------------------


def check(consent: dict[str, Any]) -> None:
    """Refuse a research Consent whose provisions Passerelle could not enforce exactly."""
    if not is_research(consent):
        return
    problems: list[str] = []
    if consent.get("modifierExtension"):
        problems.append("Consent.modifierExtension is not supported")
    if not (consent.get("patient") or {}).get("reference", "").startswith("Patient/"):
        problems.append("a research Consent must name its patient as Consent.patient (Patient/id)")
    provision = consent.get("provision")
    if not provision:
        problems.append("a research Consent needs a provision (Passerelle does not interpret policyRule alone)")
    else:
        _check_provision(provision, "Consent.provision", problems, root=True)
    if problems:
        raise UnsupportedConsent(problems)


def _check_provision(p: dict[str, Any], path: str, problems: list[str], *, root: bool) -> None:
    for key in sorted(set(p) - _PROVISION_KEYS):
        problems.append(f"{path}.{key} is not supported")
    if p.get("type") not in ("permit", "deny"):
        problems.append(f"{path}.type must be permit or deny")
    if "period" in p and not root:
        problems.append(f"{path}.period is only supported on the root provision (use dataPeriod for data dates)")
    for ext in p.get("extension") or ():
        if ext.get("url") != STUDY_CONTEXT or not root:
            problems.append(f"{path}.extension {ext.get('url')!r} is not supported here")
    for i, actor in enumerate(p.get("actor") or ()):
        reference = (actor.get("reference") or {}).get("reference", "")
        if not reference.startswith(("ResearchStudy/", "Organization/")):
            problems.append(f"{path}.actor[{i}].reference must be a ResearchStudy or Organization reference")
    for coding in _codings(p.get("action")):
        if coding.get("system") != ACTION_SYSTEM or coding.get("code") not in ("use", "disclose"):
            problems.append(f"{path}.action {coding.get('system')}|{coding.get('code')} is not supported "
                            "(consentaction use or disclose)")
    for coding in p.get("class") or ():
        if coding.get("system") != RESOURCE_TYPES:
            problems.append(f"{path}.class must use {RESOURCE_TYPES}")
    for coding in p.get("securityLabel") or ():
        if coding.get("system") != ACT_CODE or coding.get("code") not in LABELS:
            problems.append(f"{path}.securityLabel {coding.get('system')}|{coding.get('code')} is not a "
                            f"supported sensitivity label ({', '.join(sorted(LABELS))})")
    for coding in _codings(p.get("code")):
        if coding.get("system") != CATEGORY_SYSTEM or coding.get("code") not in CATEGORIES:
            problems.append(f"{path}.code {coding.get('system')}|{coding.get('code')} is not supported "
                            f"(use {CATEGORY_SYSTEM} with {', '.join(CATEGORIES)})")
    for coding in p.get("purpose") or ():
        if coding.get("system") != PURPOSE_SYSTEM:
            problems.append(f"{path}.purpose must use {PURPOSE_SYSTEM}")
    for key in ("period", "dataPeriod"):
        try:
            _period(p.get(key))
        except DateFormatError as exc:
            problems.append(f"{path}.{key}: {exc}")
    for i, child in enumerate(p.get("provision") or ()):
        _check_provision(child, f"{path}.provision[{i}]", problems, root=False)


# -- evaluation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cell:
    resource_class: str
    category: str  # "" for data in no sensitive category
    segment: tuple[int, int]


def _actions(p: dict[str, Any]) -> set[str]:
    return {c.get("code", "") for c in _codings(p.get("action"))}


def _categories(p: dict[str, Any]) -> set[str]:
    found = {LABELS[c["code"]] for c in p.get("securityLabel") or ()}
    found |= {c["code"] for c in _codings(p.get("code"))}
    return found


def _matches(p: dict[str, Any], cell: _Cell, project: Project) -> bool:
    classes = {c.get("code") for c in p.get("class") or ()}
    if classes and cell.resource_class not in classes:
        return False
    categories = _categories(p)
    if categories and cell.category not in categories:
        return False
    if p.get("dataPeriod"):
        low, high = _period(p["dataPeriod"])
        if not (low <= cell.segment[0] and cell.segment[1] <= high):
            return False
    purposes = {c.get("code") for c in p.get("purpose") or ()}
    if purposes and not purposes & RESEARCH_PURPOSES:
        return False
    actors = {(a.get("reference") or {}).get("reference") for a in p.get("actor") or ()}
    if actors:
        own = {f"ResearchStudy/{project.id}"} | ({f"Organization/{project.organization}"}
                                                   if project.organization else set())
        if not actors & own:
            return False
    return True


def _level(p: dict[str, Any], cell: _Cell, project: Project, inherited: int) -> int | None:
    if not _matches(p, cell, project):
        return None
    actions = _actions(p)
    if p["type"] == "permit":
        own = max(inherited, AGGREGATE if actions == {"use"} else RECORD)
    else:
        own = min(inherited, AGGREGATE if actions == {"disclose"} else NONE)
    permits, denies = [], []
    for child in p.get("provision") or ():
        result = _level(child, cell, project, own)
        if result is not None:
            (permits if child["type"] == "permit" else denies).append(result)
    level = max(permits) if permits else own
    return min(level, *denies) if denies else level


def _walk(p: dict[str, Any]) -> Iterable[dict[str, Any]]:
    yield p
    for child in p.get("provision") or ():
        yield from _walk(child)


def _segments(p: dict[str, Any]) -> list[tuple[int, int]]:
    """Cut the time line at every dataPeriod boundary so each piece is wholly in or out."""
    cuts = {MIN_US, MAX_US + 1}
    for node in _walk(p):
        if node.get("dataPeriod"):
            low, high = _period(node["dataPeriod"])
            cuts.update((low, high + 1))
    return [(a, b - 1) for a, b in pairwise(sorted(cuts))]


def _runs(flags: Sequence[bool]) -> Iterable[range]:
    start = None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            yield range(start, i)
            start = None


def _best_run(levels: dict[tuple[str, str, tuple[int, int]], int], segments: list[tuple[int, int]],
              classes: tuple[str, ...], tier: int) -> tuple[range, list[str]] | None:
    """The contiguous data period (and its classes) where non-sensitive data reaches `tier`.

    Preferred: the most classes, then the longest span of time, then the most recent.
    """
    best: tuple[tuple[int, int, int], range, list[str]] | None = None
    usable = [any(levels[(c, "", s)] >= tier for c in classes) for s in segments]
    for run in _runs(usable):
        allowed = [c for c in classes if all(levels[(c, "", segments[i])] >= tier for i in run)]
        span = segments[run.stop - 1][1] - segments[run.start][0]
        score = (len(allowed), span, run.stop)
        if allowed and (best is None or score > best[0]):
            best = (score, run, allowed)
    return None if best is None else (best[1], best[2])


def _describe(p: dict[str, Any], path: str) -> Iterable[str]:
    parts = [p.get("type", "?")]
    for label, values in (("actions", sorted(_actions(p))), ("classes", sorted(c.get("code") for c in p.get("class")
                          or ())), ("categories", sorted(_categories(p)))):
        if values:
            parts.append(f"{label} {','.join(values)}")
    for key in ("dataPeriod", "period"):
        if p.get(key):
            parts.append(f"{key} {p[key].get('start', '…')}..{p[key].get('end', '…')}")
    yield f"{path}: {' '.join(parts)}"
    for i, child in enumerate(p.get("provision") or ()):
        yield from _describe(child, f"{path}.provision[{i}]")


def _evaluate(consent: dict[str, Any], project: Project, reference: str) -> Decision:
    root = consent["provision"]
    segments = _segments(root)
    # Classes no provision names all behave alike: evaluate one stand-in ("*") for them.
    named = {c.get("code") for node in _walk(root) for c in node.get("class") or ()}
    computed = {
        (c, g, s): _level(root, _Cell(c, g, s), project, NONE) or NONE
        for c in {*(named & set(project.classes)), "*"} for g in ("", *CATEGORIES) for s in segments
    }
    levels = {(c, g, s): computed[(c if c in named else "*", g, s)]
              for c in project.classes for g in ("", *CATEGORIES) for s in segments}
    basis = [f"{reference} governs (the most recent active research consent for this project)",
             *_describe(root, "provision")]
    low, high = _period(root.get("period"))
    valid = (None if low <= MIN_US else low, None if high >= MAX_US else high)
    top = min(max(levels.values(), default=NONE), project.max_tier)
    tier, best = top, None
    # The highest tier that some non-sensitive data reaches on one period; lower if none does.
    while tier > NONE:
        best = _best_run(levels, segments, project.classes, tier)
        if best is not None:
            break
        tier -= 1
    if best is None:
        return Decision(NONE, valid=valid, basis=tuple(basis), consent=reference)
    if tier < top:
        basis.append(f"{TIERS[top]} applies only to sensitive data, so the decision is {TIERS[tier]}")
    run, classes = best
    allowed_categories = [g for g in CATEGORIES
                          if all(levels[(c, g, segments[i])] >= tier for c in classes for i in run)]
    allowed = {(c, g, segments[i]) for c in classes for g in ("", *allowed_categories) for i in run}
    if any(level >= tier and cell not in allowed for cell, level in levels.items()):
        basis.append("some permitted data is withheld: a decision is one set of classes × categories × period")
    start, end = segments[run.start][0], segments[run.stop - 1][1]
    return Decision(
        tier=tier,
        excluded_classes=tuple(c for c in project.classes if c not in classes),
        excluded_categories=tuple(g for g in CATEGORIES if g not in allowed_categories),
        period=(None if start <= MIN_US else start, None if end >= MAX_US else end),
        valid=valid,
        basis=tuple(basis),
        consent=reference,
    )


def _recency(consent: dict[str, Any]) -> tuple[int, str, str]:
    when = consent.get("dateTime")
    try:
        moment = date_range(when)[0] if when else MIN_US
    except DateFormatError:
        moment = MIN_US
    # The id breaks exact ties, so the outcome never depends on the order consents were read in.
    return moment, (consent.get("meta") or {}).get("lastUpdated", ""), str(consent.get("id", ""))


def governing(consents: Iterable[dict[str, Any]], project_id: str) -> dict[str, Any] | None:
    """The most recent active research Consent that applies to the project, if any."""
    candidates = [c for c in consents
                  if c.get("status") == "active" and is_research(c) and bound_project(c) in (None, project_id)]
    return max(candidates, key=_recency, default=None)


def default_decision(default: str, project: Project) -> Decision:
    """The deployment's regime for patients without a research consent."""
    if default not in DEFAULTS:
        raise ValueError(f"consent default must be one of {', '.join(DEFAULTS)}, not {default!r}")
    tier = min(DEFAULTS.index(default), project.max_tier)
    basis = f"no active research consent applies; deployment default {default!r}"
    if tier == NONE:
        return Decision(NONE, basis=(basis,))
    return Decision(tier, excluded_categories=CATEGORIES,
                    basis=(basis, "sensitive categories are only released with an explicit consent"))


def decide(consents: Iterable[dict[str, Any]], project: Project, default: str) -> Decision:
    """The decision for one patient and one project."""
    consent = governing(consents, project.id)
    if consent is None:
        return default_decision(default, project)
    meta = consent.get("meta") or {}
    reference = f"Consent/{consent.get('id')}" + (f"/_history/{meta['versionId']}" if meta.get("versionId") else "")
    return _evaluate(consent, project, reference)
