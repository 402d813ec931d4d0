"""The consent decision engine, pure: Consent resources + project + default regime → Decision.

No app, no database. A decision matrix (one named test per behaviour), the refusals of
`check()`, and property tests over random provision trees: adding a deny never widens
any cell, a decision never releases a cell whose level is below its tier, and the
decision does not depend on copies or on the order consents are listed in.
"""
from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consent import engine
from consent.engine import AGGREGATE, NONE, RECORD, Decision, Project
from policies.fhirdates import date_range
from policies.sensitivity import ACT_CODE, CATEGORIES, CATEGORY_SYSTEM

CLASSES = ("Patient", "Observation", "Condition", "MedicationRequest")
PROJECT = Project("study-a", RECORD, CLASSES, organization="org-1")
OTHER = Project("study-b", RECORD, CLASSES, organization="org-2")
AGGREGATE_PROJECT = Project("study-a", AGGREGATE, CLASSES)
ALL = CATEGORIES


# --- builders --------------------------------------------------------------------------------

def start(value: str) -> int:
    return date_range(value)[0]


def end(value: str) -> int:
    return date_range(value)[1]


def others(*kept: str) -> tuple[str, ...]:
    """The project classes other than `kept` (what a decision on `kept` excludes)."""
    return tuple(c for c in CLASSES if c not in kept)


def provision(kind: str, *children: dict[str, Any], actions: tuple[str, ...] = (), classes: tuple[str, ...] = (),
              labels: tuple[str, ...] = (), codes: tuple[str, ...] = (), data: tuple[str | None, str | None] | None
              = None, purposes: tuple[str, ...] = (), actors: tuple[str, ...] = (),
              period: tuple[str | None, str | None] | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {"type": kind}
    if actions:
        p["action"] = [{"coding": [{"system": engine.ACTION_SYSTEM, "code": a}]} for a in actions]
    if classes:
        p["class"] = [{"system": engine.RESOURCE_TYPES, "code": c} for c in classes]
    if labels:
        p["securityLabel"] = [{"system": ACT_CODE, "code": label} for label in labels]
    if codes:
        p["code"] = [{"coding": [{"system": CATEGORY_SYSTEM, "code": code}]} for code in codes]
    if data is not None:
        p["dataPeriod"] = {k: v for k, v in zip(("start", "end"), data, strict=True) if v}
    if period is not None:
        p["period"] = {k: v for k, v in zip(("start", "end"), period, strict=True) if v}
    if purposes:
        p["purpose"] = [{"system": engine.PURPOSE_SYSTEM, "code": code} for code in purposes]
    if actors:
        p["actor"] = [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                            "code": "IRCP"}]},
                       "reference": {"reference": ref}} for ref in actors]
    if children:
        p["provision"] = list(children)
    return p


def permit(*children: dict[str, Any], **attrs: Any) -> dict[str, Any]:
    return provision("permit", *children, **attrs)


def deny(*children: dict[str, Any], **attrs: Any) -> dict[str, Any]:
    return provision("deny", *children, **attrs)


def consent(root: dict[str, Any] | None, *, cid: str = "c1", status: str = "active",
            when: str | None = "2024-01-01T00:00:00Z", project: str | None = None, scope: str = "research",
            updated: str | None = None, version: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {
        "resourceType": "Consent",
        "id": cid,
        "status": status,
        "scope": {"coding": [{"system": engine.SCOPE_SYSTEM, "code": scope}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": "Patient/p1"},
        "policyRule": {"text": "test"},
    }
    if root is not None:
        c["provision"] = root
    if when:
        c["dateTime"] = when
    if project:
        c["extension"] = [{"url": engine.STUDY_CONTEXT, "valueReference": {"reference": f"ResearchStudy/{project}"}}]
    meta = {k: v for k, v in (("versionId", version), ("lastUpdated", updated)) if v}
    if meta:
        c["meta"] = meta
    return c


def decide(*consents: dict[str, Any], project: Project = PROJECT, default: str = "deny") -> Decision:
    return engine.decide(list(consents), project, default)


def problems_of(c: dict[str, Any]) -> list[str]:
    with pytest.raises(engine.UnsupportedConsent) as raised:
        engine.check(c)
    return raised.value.problems


# --- default regimes ---------------------------------------------------------------------------

def test_no_consent_under_deny_default_releases_nothing():
    assert decide() == Decision(NONE)


def test_no_consent_under_aggregate_default_releases_aggregates_without_sensitive_categories():
    assert decide(default="aggregate") == Decision(AGGREGATE, excluded_categories=ALL)


def test_no_consent_under_record_default_releases_records_without_sensitive_categories():
    assert decide(default="record") == Decision(RECORD, excluded_categories=ALL)


def test_record_default_is_capped_by_an_aggregate_project():
    assert decide(project=AGGREGATE_PROJECT, default="record") == Decision(AGGREGATE, excluded_categories=ALL)


def test_a_project_that_may_receive_nothing_gets_nothing_under_record_default():
    closed = Project("study-a", NONE, CLASSES)
    assert decide(project=closed, default="record") == Decision(NONE)


def test_an_unknown_default_regime_is_refused():
    with pytest.raises(ValueError, match="consent default"):
        decide(default="opt-out")


def test_the_default_decision_explains_itself_in_basis():
    assert any("default" in line for line in decide(default="record").basis)


# --- the root provision ------------------------------------------------------------------------

def test_root_permit_without_action_releases_records_including_sensitive_categories():
    assert decide(consent(permit())) == Decision(RECORD)


def test_root_permit_use_releases_aggregates_only():
    assert decide(consent(permit(actions=("use",)))) == Decision(AGGREGATE)


def test_root_permit_disclose_releases_records():
    assert decide(consent(permit(actions=("disclose",)))) == Decision(RECORD)


def test_root_permit_use_and_disclose_releases_records():
    assert decide(consent(permit(actions=("use", "disclose")))) == Decision(RECORD)


def test_root_deny_releases_nothing_even_under_record_default():
    assert decide(consent(deny()), default="record") == Decision(NONE)


def test_root_deny_disclose_releases_nothing_since_nothing_was_permitted_above_it():
    assert decide(consent(deny(actions=("disclose",))), default="record") == Decision(NONE)


def test_explicit_permit_under_aggregate_default_releases_sensitive_categories():
    assert decide(consent(permit()), default="aggregate").excluded_categories == ()


def test_decision_names_the_governing_consent_version():
    decision = decide(consent(permit(), cid="abc", version="3"))
    assert decision.consent == "Consent/abc/_history/3"
    assert decision.basis[0].startswith("Consent/abc/_history/3 governs")


# --- nested provisions, depth 2 ----------------------------------------------------------------

def test_nested_deny_security_label_excludes_that_category():
    decision = decide(consent(permit(deny(labels=("PSY",)))))
    assert decision == Decision(RECORD, excluded_categories=("mental-health",))


def test_nested_deny_passerelle_category_code_excludes_that_category():
    decision = decide(consent(permit(deny(codes=("hiv",)))))
    assert decision == Decision(RECORD, excluded_categories=("hiv",))


@pytest.mark.parametrize("label", [pytest.param("SUD", id="label-SUD-is-substance-use"),
                                   pytest.param("ETH", id="label-ETH-is-substance-use")])
def test_substance_use_labels_exclude_substance_use(label):
    assert decide(consent(permit(deny(labels=(label,))))).excluded_categories == ("substance-use",)


def test_nested_deny_with_several_labels_excludes_each_category():
    decision = decide(consent(permit(deny(labels=("SEX", "GDIS")))))
    assert decision == Decision(RECORD, excluded_categories=("sexual-health", "genetics"))


def test_nested_deny_disclose_under_record_permit_leaves_aggregates():
    assert decide(consent(permit(deny(actions=("disclose",))))) == Decision(AGGREGATE)


def test_nested_deny_use_on_a_class_excludes_that_class():
    decision = decide(consent(permit(deny(actions=("use",), classes=("Observation",)))))
    assert decision == Decision(RECORD, excluded_classes=("Observation",))


def test_nested_deny_without_action_on_a_class_excludes_that_class():
    decision = decide(consent(permit(deny(classes=("Condition",)))))
    assert decision == Decision(RECORD, excluded_classes=("Condition",))


def test_nested_permit_of_one_class_under_root_deny_releases_only_that_class():
    decision = decide(consent(deny(permit(classes=("Observation",)))))
    assert decision == Decision(RECORD, excluded_classes=others("Observation"))


def test_nested_permit_use_under_root_deny_releases_aggregates():
    assert decide(consent(deny(permit(actions=("use",))))) == Decision(AGGREGATE)


def test_nested_permit_use_cannot_lower_a_record_permit():
    assert decide(consent(permit(permit(actions=("use",))))) == Decision(RECORD)


def test_nested_provision_that_matches_nothing_leaves_the_parent_level():
    decision = decide(consent(permit(deny(classes=("Encounter",)))))
    assert decision == Decision(RECORD)


def test_among_matching_siblings_deny_overrides_permit():
    root = deny(permit(classes=("Observation", "Condition")), deny(classes=("Observation",)))
    decision = decide(consent(root))
    assert decision == Decision(RECORD, excluded_classes=others("Condition"))


def test_sibling_deny_overrides_a_sibling_permit_listed_after_it():
    root = permit(deny(labels=("HIV",)), permit(labels=("HIV",)))
    assert decide(consent(root)).excluded_categories == ("hiv",)


def test_nested_deny_on_a_data_period_narrows_the_release_period():
    decision = decide(consent(permit(deny(data=(None, "2019-12-31")))))
    assert decision == Decision(RECORD, period=(start("2020-01-01"), None))


# --- nested provisions, depth 3 ----------------------------------------------------------------

def test_depth_three_deny_narrows_the_period_of_a_class_permitted_under_a_root_deny():
    root = deny(permit(deny(data=(None, "2019-12-31")), classes=("Observation",)))
    decision = decide(consent(root))
    assert decision == Decision(RECORD, excluded_classes=others("Observation"), period=(start("2020-01-01"), None))


def test_depth_three_permit_restores_a_category_its_parent_denied():
    root = permit(deny(permit(labels=("PSY",)), labels=("PSY", "HIV")))
    assert decide(consent(root)) == Decision(RECORD, excluded_categories=("hiv",))


def test_depth_three_permit_use_under_a_deny_gives_that_data_aggregates_only():
    root = permit(deny(permit(actions=("use",))), classes=("Observation",))
    # Observation: permit → record, then deny → none, then permit use → aggregate.
    assert decide(consent(root)) == Decision(AGGREGATE, excluded_classes=others("Observation"))


# --- classes and categories at the root ----------------------------------------------------------

def test_root_permit_on_some_classes_excludes_the_other_project_classes():
    decision = decide(consent(permit(classes=("Observation", "Condition"))))
    assert decision == Decision(RECORD, excluded_classes=others("Observation", "Condition"))


def test_root_permit_on_a_class_the_project_does_not_receive_releases_nothing():
    assert decide(consent(permit(classes=("Encounter",)))) == Decision(NONE)


def test_root_permit_on_a_sensitive_category_alone_releases_nothing():
    # A decision always includes non-sensitive data; a permit for HIV data only cannot be expressed.
    assert decide(consent(permit(labels=("HIV",)))).tier == NONE


def test_aggregates_everywhere_with_records_for_one_category_still_releases_aggregates():
    # Data at the highest level (record, mental health only) cannot be expressed as a decision;
    # the next level, aggregate, holds for everything and must not be withheld.
    root = permit(permit(labels=("PSY",)), actions=("use",))
    assert decide(consent(root)) == Decision(AGGREGATE)


# --- data periods ------------------------------------------------------------------------------

def test_root_data_period_bounds_the_release_period():
    decision = decide(consent(permit(data=("2020-01-01", "2020-12-31"))))
    assert decision == Decision(RECORD, period=(start("2020-01-01"), end("2020-12-31")))


def test_data_period_without_end_is_open_ended():
    assert decide(consent(permit(data=("2020-01-01", None)))).period == (start("2020-01-01"), None)


def test_data_period_without_start_is_open_at_the_start():
    assert decide(consent(permit(data=(None, "2015-06-30")))).period == (None, end("2015-06-30"))


def test_data_period_includes_the_whole_of_its_last_day():
    period = decide(consent(permit(data=("2020-01-01", "2020-06-30")))).period
    assert period[1] == start("2020-07-01") - 1


def test_a_deny_in_the_middle_of_time_keeps_one_period_and_says_data_is_withheld():
    decision = decide(consent(permit(deny(data=("2018-01-01", "2019-12-31")))))
    assert decision.tier == RECORD
    assert decision.period in ((None, start("2018-01-01") - 1), (start("2020-01-01"), None))
    assert any("withheld" in line for line in decision.basis)


def test_a_provision_that_changes_no_level_does_not_change_the_decision():
    # The permit on 2000–2001 only repeats what the root already permits: every cell keeps its level.
    plain = permit(deny(data=("2018-01-01", "2019-12-31")))
    redundant = permit(deny(data=("2018-01-01", "2019-12-31")), permit(data=("2000-01-01", "2001-12-31")))
    assert decide(consent(redundant)) == decide(consent(plain))


# --- status and scope -----------------------------------------------------------------------------

@pytest.mark.parametrize("status", [
    pytest.param("draft", id="draft-consent-does-not-count"),
    pytest.param("proposed", id="proposed-consent-does-not-count"),
    pytest.param("inactive", id="inactive-consent-does-not-count"),
    pytest.param("rejected", id="rejected-consent-does-not-count"),
    pytest.param("entered-in-error", id="entered-in-error-consent-does-not-count"),
])
def test_only_active_consents_count(status):
    assert decide(consent(permit(), status=status), default="aggregate") == Decision(AGGREGATE,
                                                                                     excluded_categories=ALL)


def test_a_non_research_consent_does_not_count():
    assert decide(consent(deny(), scope="patient-privacy"), default="record") == Decision(
        RECORD, excluded_categories=ALL)


# --- superseded versions ---------------------------------------------------------------------------

def test_newer_deny_supersedes_an_older_permit():
    old = consent(permit(), cid="old", when="2023-01-01T00:00:00Z")
    new = consent(deny(), cid="new", when="2024-01-01T00:00:00Z")
    assert decide(old, new) == Decision(NONE)


def test_newer_permit_supersedes_an_older_deny():
    old = consent(deny(), cid="old", when="2023-01-01T00:00:00Z")
    new = consent(permit(), cid="new", when="2024-01-01T00:00:00Z")
    assert decide(new, old) == Decision(RECORD)


def test_recency_follows_dateTime_not_list_order():
    old = consent(permit(), cid="old", when="2023-01-01T00:00:00Z")
    new = consent(permit(actions=("use",)), cid="new", when="2024-01-01T00:00:00Z")
    assert decide(old, new) == decide(new, old) == Decision(AGGREGATE)


def test_dateTime_offsets_are_compared_in_utc():
    # 01:00+02:00 is 23:00Z the day before, i.e. earlier than 23:30Z.
    earlier = consent(permit(), cid="earlier", when="2024-01-01T01:00:00+02:00")
    later = consent(deny(), cid="later", when="2023-12-31T23:30:00Z")
    assert decide(later, earlier) == Decision(NONE)


def test_equal_dateTime_falls_back_to_lastUpdated():
    first = consent(deny(), cid="a", updated="2024-01-02T00:00:00Z")
    second = consent(permit(), cid="b", updated="2024-01-03T00:00:00Z")
    assert decide(second, first) == Decision(RECORD)


def test_an_inactive_newer_consent_leaves_the_older_active_one_governing():
    old = consent(permit(actions=("use",)), cid="old", when="2023-01-01T00:00:00Z")
    new = consent(deny(), cid="new", when="2024-01-01T00:00:00Z", status="inactive")
    assert decide(old, new) == Decision(AGGREGATE)


def test_equal_recency_is_decided_independently_of_list_order():
    # Two consents written in one transaction can share dateTime and lastUpdated; the stored
    # order is arbitrary, so the tie must be broken by something in the consents themselves.
    a = consent(permit(), cid="a", updated="2024-01-02T00:00:00Z")
    b = consent(deny(), cid="b", updated="2024-01-02T00:00:00Z")
    assert decide(a, b) == decide(b, a)


# --- per-project and research-wide -----------------------------------------------------------------

def test_a_consent_bound_to_the_project_applies_to_it():
    assert decide(consent(permit(), project="study-a")) == Decision(RECORD)


def test_a_consent_bound_to_another_project_does_not_apply():
    assert decide(consent(permit(), project="study-b"), default="aggregate") == Decision(
        AGGREGATE, excluded_categories=ALL)


def test_binding_by_an_extension_on_the_root_provision_counts():
    root = permit()
    root["extension"] = [{"url": engine.STUDY_CONTEXT, "valueReference": {"reference": "ResearchStudy/study-b"}}]
    assert decide(consent(root), default="aggregate") == Decision(AGGREGATE, excluded_categories=ALL)
    assert decide(consent(root), project=OTHER) == Decision(RECORD)


def test_a_research_wide_consent_applies_to_every_project():
    c = consent(permit(actions=("use",)))
    assert decide(c) == decide(c, project=OTHER) == Decision(AGGREGATE)


def test_a_newer_research_wide_consent_supersedes_an_older_project_consent():
    bound = consent(permit(), cid="bound", project="study-a", when="2023-01-01T00:00:00Z")
    wide = consent(deny(), cid="wide", when="2024-01-01T00:00:00Z")
    assert decide(bound, wide) == Decision(NONE)


def test_a_newer_project_consent_governs_only_its_project():
    wide = consent(permit(actions=("use",)), cid="wide", when="2023-01-01T00:00:00Z")
    bound = consent(permit(), cid="bound", project="study-a", when="2024-01-01T00:00:00Z")
    assert decide(wide, bound) == Decision(RECORD)
    assert decide(wide, bound, project=OTHER) == Decision(AGGREGATE)


def test_an_actor_naming_the_project_study_matches():
    assert decide(consent(permit(actors=("ResearchStudy/study-a",)))) == Decision(RECORD)


def test_an_actor_naming_another_study_releases_nothing_to_this_project():
    assert decide(consent(permit(actors=("ResearchStudy/study-b",)))) == Decision(NONE)


def test_an_actor_naming_the_project_organization_matches():
    assert decide(consent(permit(actors=("Organization/org-1",)))) == Decision(RECORD)
    assert decide(consent(permit(actors=("Organization/org-1",))), project=OTHER) == Decision(NONE)


def test_a_nested_deny_for_another_study_does_not_restrict_this_project():
    root = permit(deny(actors=("ResearchStudy/study-b",)))
    assert decide(consent(root)) == Decision(RECORD)
    assert decide(consent(root), project=OTHER) == Decision(NONE)


# --- the project tier cap ----------------------------------------------------------------------------

def test_an_aggregate_project_caps_a_record_consent():
    assert decide(consent(permit()), project=AGGREGATE_PROJECT) == Decision(AGGREGATE)


def test_an_aggregate_project_keeps_the_consent_exclusions():
    decision = decide(consent(permit(deny(labels=("PSY",)))), project=AGGREGATE_PROJECT)
    assert decision == Decision(AGGREGATE, excluded_categories=("mental-health",))


def test_the_cap_keeps_data_the_consent_releases_only_as_aggregates():
    # Observation record, the rest aggregate: capped at aggregate, every class qualifies.
    root = permit(permit(classes=("Observation",)), actions=("use",))
    assert decide(consent(root), project=AGGREGATE_PROJECT) == Decision(AGGREGATE)


# --- purpose -------------------------------------------------------------------------------------------

def test_a_research_purpose_matches():
    assert decide(consent(permit(purposes=("HRESCH",)))) == Decision(RECORD)


def test_a_non_research_purpose_does_not_match():
    assert decide(consent(permit(purposes=("TREAT",)))) == Decision(NONE)


def test_a_nested_deny_for_treatment_does_not_restrict_research():
    assert decide(consent(permit(deny(purposes=("TREAT",))))) == Decision(RECORD)


# --- validity (root provision.period) -----------------------------------------------------------------

def test_the_root_period_becomes_the_decision_validity():
    decision = decide(consent(permit(period=("2024-01-01", "2026-12-31"))))
    assert decision == Decision(RECORD, valid=(start("2024-01-01"), end("2026-12-31")))


def test_a_root_period_without_start_is_valid_from_the_open_past():
    # Open ends are None in a Decision (as for `period`), never the internal sentinels.
    assert decide(consent(permit(period=(None, "2026-12-31")))).valid == (None, end("2026-12-31"))


def test_a_root_period_without_end_is_valid_until_further_notice():
    assert decide(consent(permit(period=("2024-01-01", None)))).valid == (start("2024-01-01"), None)


def test_a_deny_consent_keeps_its_validity():
    assert decide(consent(deny(period=("2024-01-01", "2026-12-31")))).valid == (
        start("2024-01-01"), end("2026-12-31"))


# --- check(): what Passerelle refuses to enforce ----------------------------------------------------

def test_check_accepts_a_supported_consent():
    root = permit(deny(permit(actions=("use",), purposes=("HRESCH",)), labels=("PSY",), codes=("hiv",),
                       data=("2020", None), actors=("ResearchStudy/x", "Organization/y")),
                  classes=("Observation",), period=("2024-01-01", None))
    engine.check(consent(root, project="x"))


def test_check_refuses_provision_data():
    root = permit()
    root["data"] = [{"meaning": "instance", "reference": {"reference": "Observation/1"}}]
    assert problems_of(consent(root)) == ["Consent.provision.data is not supported"]


def test_check_refuses_a_period_on_a_nested_provision():
    problems = problems_of(consent(permit(deny(period=("2020", "2021")))))
    assert problems == ["Consent.provision.provision[0].period is only supported on the root provision "
                        "(use dataPeriod for data dates)"]


def test_check_refuses_an_unknown_action_code():
    (problem,) = problems_of(consent(permit(actions=("access",))))
    assert "Consent.provision.action" in problem and "access" in problem


def test_check_refuses_an_action_from_another_system():
    root = permit()
    root["action"] = [{"coding": [{"system": "http://example.org/actions", "code": "use"}]}]
    (problem,) = problems_of(consent(root))
    assert "http://example.org/actions|use" in problem


def test_check_refuses_a_class_from_another_system():
    root = deny(permit(classes=("Observation",)))
    root["provision"][0]["class"][0]["system"] = "http://example.org/types"
    assert problems_of(consent(root)) == [f"Consent.provision.provision[0].class must use {engine.RESOURCE_TYPES}"]


def test_check_refuses_an_unknown_security_label():
    (problem,) = problems_of(consent(permit(deny(labels=("TABOO",)))))
    assert problem.startswith("Consent.provision.provision[0].securityLabel") and "TABOO" in problem


def test_check_refuses_a_security_label_from_another_system():
    root = permit(deny(labels=("PSY",)))
    root["provision"][0]["securityLabel"][0]["system"] = "http://example.org/labels"
    assert len(problems_of(consent(root))) == 1


def test_check_refuses_an_unknown_category_code():
    (problem,) = problems_of(consent(permit(deny(codes=("oncology",)))))
    assert "Consent.provision.provision[0].code" in problem and "oncology" in problem


def test_check_refuses_a_provision_without_type():
    root = permit(deny(labels=("PSY",)))
    del root["provision"][0]["type"]
    assert problems_of(consent(root)) == ["Consent.provision.provision[0].type must be permit or deny"]


def test_check_refuses_an_actor_that_is_a_practitioner():
    (problem,) = problems_of(consent(permit(actors=("Practitioner/dr-who",))))
    assert problem == "Consent.provision.actor[0].reference must be a ResearchStudy or Organization reference"


def test_check_refuses_a_modifier_extension():
    c = consent(permit())
    c["modifierExtension"] = [{"url": "http://example.org/unless", "valueBoolean": True}]
    assert problems_of(c) == ["Consent.modifierExtension is not supported"]


def test_check_refuses_a_purpose_from_another_system():
    root = permit()
    root["purpose"] = [{"system": "http://example.org/purposes", "code": "HRESCH"}]
    assert problems_of(consent(root)) == [f"Consent.provision.purpose must use {engine.PURPOSE_SYSTEM}"]


def test_check_refuses_a_data_period_that_is_not_a_date():
    (problem,) = problems_of(consent(permit(data=("last year", None))))
    assert problem.startswith("Consent.provision.dataPeriod")


def test_check_refuses_a_study_extension_on_a_nested_provision():
    child = deny()
    child["extension"] = [{"url": engine.STUDY_CONTEXT, "valueReference": {"reference": "ResearchStudy/x"}}]
    (problem,) = problems_of(consent(permit(child)))
    assert problem.startswith("Consent.provision.provision[0].extension")


def test_check_refuses_a_research_consent_without_provision():
    (problem,) = problems_of(consent(None))
    assert "needs a provision" in problem


def test_check_refuses_a_research_consent_without_a_patient_reference():
    c = consent(permit())
    c["patient"] = {"reference": "Group/g1"}
    (problem,) = problems_of(c)
    assert "Consent.patient" in problem


def test_check_reports_every_problem_at_once():
    root = permit(deny(period=("2020", None), actors=("Practitioner/p",)), actions=("access",))
    root["data"] = []
    assert len(problems_of(consent(root))) == 4


def test_check_does_not_look_at_non_research_consents():
    root = permit(deny(period=("2020", None), actors=("Practitioner/p",)), actions=("access",))
    engine.check(consent(root, scope="patient-privacy"))


def test_unsupported_consent_message_joins_the_problems():
    c = consent(permit(actors=("Practitioner/p",)))
    c["modifierExtension"] = [{"url": "http://example.org/x", "valueBoolean": True}]
    with pytest.raises(engine.UnsupportedConsent, match="modifierExtension is not supported; "):
        engine.check(c)


# --- properties over random provision trees ----------------------------------------------------------

YEARS = ("2010-01-01", "2015-06-30", "2018-01-01", "2020-12-31", "2023-03-15")
LABEL_CHOICES = ("PSY", "HIV", "SEX", "SUD", "ETH", "GDIS")


@st.composite
def data_periods(draw: st.DrawFn) -> tuple[str | None, str | None] | None:
    if not draw(st.booleans()):
        return None
    low, high = draw(st.sampled_from((None, *YEARS))), draw(st.sampled_from((None, *YEARS)))
    if low is not None and high is not None and low > high:
        low, high = high, low
    return low, high


@st.composite
def nodes(draw: st.DrawFn, depth: int, kind: str | None = None) -> dict[str, Any]:
    children = draw(st.lists(nodes(depth - 1), max_size=3)) if depth > 1 else []
    return provision(
        kind or draw(st.sampled_from(("permit", "deny"))),
        *children,
        actions=tuple(draw(st.lists(st.sampled_from(("use", "disclose")), max_size=2, unique=True))),
        classes=tuple(draw(st.lists(st.sampled_from((*CLASSES[1:], "Encounter")), max_size=2, unique=True))),
        labels=tuple(draw(st.lists(st.sampled_from(LABEL_CHOICES), max_size=1))),
        codes=tuple(draw(st.lists(st.sampled_from(CATEGORIES), max_size=1))),
        data=draw(data_periods()),
    )


trees = st.integers(min_value=1, max_value=3).flatmap(lambda depth: nodes(depth))
projects = st.sampled_from((PROJECT, AGGREGATE_PROJECT, Project("study-a", RECORD, CLASSES[:2])))
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _paths(p: dict[str, Any], path: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    return [path, *(q for i, child in enumerate(p.get("provision") or ()) for q in _paths(child, (*path, i)))]


def _at(root: dict[str, Any], path: tuple[int, ...]) -> dict[str, Any]:
    for i in path:
        root = root["provision"][i]
    return root


def _cell_levels(root: dict[str, Any], project: Project, segments: list[tuple[int, int]]) -> dict[Any, int]:
    return {(c, g, s): engine._level(root, engine._Cell(c, g, s), project, NONE) or NONE
            for c in (*project.classes, "*") for g in ("", *CATEGORIES) for s in segments}


def _refinement(*roots: dict[str, Any]) -> list[tuple[int, int]]:
    """Segments fine enough for every tree: each is wholly in or out of every dataPeriod."""
    combined = {"type": "permit", "provision": list(roots)}
    return engine._segments(combined)


@PROPERTY_SETTINGS
@given(root=trees, added=st.integers(min_value=1, max_value=3).flatmap(lambda d: nodes(d, "deny")),
       where=st.integers(min_value=0), project=projects)
def test_property_adding_a_deny_anywhere_never_widens_the_decision(root, added, where, project):
    paths = _paths(root)
    widened = copy.deepcopy(root)
    target = _at(widened, paths[where % len(paths)])
    target.setdefault("provision", []).append(added)
    before, after = decide(consent(root), project=project), decide(consent(widened), project=project)
    assert after.tier <= before.tier
    segments = _refinement(root, widened)
    old, new = _cell_levels(root, project, segments), _cell_levels(widened, project, segments)
    assert all(new[cell] <= old[cell] for cell in old)


@PROPERTY_SETTINGS
@given(root=trees, project=projects)
def test_property_a_decision_never_releases_a_cell_below_its_tier(root, project):
    decision = decide(consent(root), project=project)
    assert decision.tier <= project.max_tier
    if decision.tier == NONE:
        return
    low = decision.period[0] if decision.period[0] is not None else engine.MIN_US
    high = decision.period[1] if decision.period[1] is not None else engine.MAX_US
    segments = [s for s in engine._segments(root) if low <= s[0] and s[1] <= high]
    assert segments, "a released period covers at least one segment"
    levels = _cell_levels(root, project, segments)
    released = [(c, g, s) for c in project.classes if c not in decision.excluded_classes
                for g in ("", *CATEGORIES) if g not in decision.excluded_categories for s in segments]
    assert released
    assert all(levels[cell] >= decision.tier for cell in released)


@PROPERTY_SETTINGS
@given(root=trees, project=projects)
def test_property_the_tier_is_the_highest_level_non_sensitive_data_reaches(root, project):
    # A decision always covers non-sensitive data of its classes, so the best expressible tier is
    # the highest level any class reaches on non-sensitive data in some period (capped).
    segments = engine._segments(root)
    levels = _cell_levels(root, project, segments)
    reachable = max(levels[(c, "", s)] for c in project.classes for s in segments)
    assert decide(consent(root), project=project).tier == min(reachable, project.max_tier)


def _full(decision: Decision) -> tuple[Any, ...]:
    return (decision, decision.basis, decision.consent)


@PROPERTY_SETTINGS
@given(roots=st.lists(trees, min_size=1, max_size=4), statuses=st.lists(st.sampled_from(("active", "inactive")),
       min_size=4, max_size=4), bound=st.lists(st.sampled_from((None, "study-a", "study-b")), min_size=4,
       max_size=4), seed=st.integers(), project=projects)
def test_property_the_decision_is_deterministic_and_independent_of_order_and_copies(roots, statuses, bound, seed,
                                                                                    project):
    consents = [consent(root, cid=f"c{i}", when=f"202{i}-01-01T00:00:00Z", status=statuses[i], project=bound[i])
                for i, root in enumerate(roots)]
    first = decide(*consents, project=project)
    assert _full(decide(*consents, project=project)) == _full(first)
    assert _full(decide(*copy.deepcopy(consents), project=project)) == _full(first)
    shuffled = consents[:]
    random.Random(seed).shuffle(shuffled)
    assert _full(decide(*shuffled, project=project)) == _full(first)


@PROPERTY_SETTINGS
@given(root=trees)
def test_property_the_decision_does_not_modify_the_consent(root):
    c = consent(root)
    snapshot = copy.deepcopy(c)
    decide(c)
    assert c == snapshot
