"""The patient's choices (consent/web/choices.py): what they see, what they may choose, and saving.

Real app, real database (SQLite and PostgreSQL). The world (tests/portal_world.py) has a
record-tier project, an aggregate-tier project, a closed one, a patient without any consent
and one with a research-wide choice and a newer paper form for one project.
"""
from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from flask import Flask

from consent import writer
from consent.materialise import set_consent_default
from consent.projects import DIRECTORY_TYPES, PATIENT_DATA_TYPES
from consent.web import choices
from consent.web.choices import Choice, ChoiceRefused
from policies.sensitivity import BIT, CATEGORIES
from service import db
from tests.portal_world import Portal, build_portal, consent_count, tier


@pytest.fixture
def world_recipe():
    return build_portal


@pytest.fixture
def portal(world: Portal) -> Portal:
    return world


@pytest.fixture
def context(app: Flask) -> Iterator[None]:
    """A request context: refusals carry the patient's message, which needs a language."""
    with app.test_request_context("/consent/"):
        yield


def overview(patient_id: str) -> choices.Overview:
    with db.read() as conn:
        return choices.overview(conn, patient_id)


def form(kind: str, **fields: str | list[str]) -> dict[str, list[str]]:
    return {"kind": [kind], **{k: v if isinstance(v, list) else [v] for k, v in fields.items()}}


def prepare(patient_id: str, fields: dict[str, list[str]], when: datetime | None = None) -> choices.Plan:
    with db.read() as conn:
        return choices.prepare(conn, patient_id, fields, when)


def save(patient_id: str, fields: dict[str, list[str]]) -> choices.Plan:
    with db.write() as conn:
        return choices.save(conn, patient_id, fields)[0]


# -- what the patient sees ---------------------------------------------------------------------------


def test_a_patient_without_consent_sees_every_active_project_with_the_default_choice(app, portal, context):
    seen = overview(portal.alice)
    assert [o.project_id for o in seen.projects] == [portal.heart, portal.sleep]  # not the closed one
    heart, sleep = seen.projects
    assert heart.offered == ("none", "aggregate", "record")
    assert sleep.offered == ("none", "aggregate")
    assert heart.current == sleep.current == seen.research_wide == Choice("none")  # the default regime: deny
    assert not heart.holds_own and not sleep.holds_own
    assert heart.project.plain("fr")["title"] == "L'insuffisance cardiaque après 60 ans"
    assert heart.project.ends == "2099-12-31"
    assert sleep.project.plain("fr")["title"] == "sleep"
    assert sleep.kinds == ["about-you", "conditions", "results"]


def test_the_current_choice_is_the_materialised_decision_whatever_set_it(app, portal, context):
    seen = overview(portal.bob)
    heart, sleep = seen.projects
    assert heart.current == Choice("record") and heart.holds_own  # the paper form governs heart
    assert sleep.current == Choice("aggregate") and not sleep.holds_own  # the research-wide choice governs sleep
    assert seen.research_wide == Choice("aggregate")
    assert tier(app, portal.bob, portal.heart) == (2, 0)


def test_every_kind_of_data_a_project_can_receive_has_words():
    assert choices.kinds_of(PATIENT_DATA_TYPES + DIRECTORY_TYPES) == list(choices.DATA_KINDS)


def test_the_default_regime_shows_sensitive_categories_as_left_out(portal, app, context):
    with db.write() as conn:
        set_consent_default(conn, "aggregate")
    assert overview(portal.alice).research_wide == Choice("aggregate", CATEGORIES)


# -- a change ----------------------------------------------------------------------------------------


def test_a_project_choice_is_saved_as_a_web_consent_and_materialised_in_the_same_transaction(app, portal, context):
    before = consent_count(app)
    planned = prepare(portal.alice, form("project", project=portal.heart, tier="record", exclude="genetics"))
    assert [(e.project_id, e.before, e.after) for e in planned.effects] == [
        (portal.heart, Choice("none"), Choice("record", ("genetics",)))]
    assert consent_count(app) == before  # planning writes nothing
    with db.write() as conn:
        saved, stored = choices.save(conn, portal.alice, form("project", project=portal.heart, tier="record",
                                                                    exclude="genetics"))
        assert choices.overview(conn, portal.alice).projects[0].current == Choice("record", ("genetics",))
    assert len(stored) == 1 and saved.effects == planned.effects
    consent = stored[0].resource()
    assert writer.how(consent) == {"method": "web", "recorded_by": None}
    assert tier(app, portal.alice, portal.heart) == (2, BIT["genetics"])
    assert tier(app, portal.alice, portal.sleep) == (0, 0)


@pytest.mark.parametrize(("fields", "reason"), [
    ({"project": "no-such-project", "tier": "record"}, "project"),
    ({"project": "CLOSED", "tier": "record"}, "project"),
    ({"project": "SLEEP", "tier": "record"}, "tier"),
    ({"project": "HEART", "tier": "everything"}, "tier"),
    ({"project": "HEART", "tier": "record", "exclude": ["genetics", "astrology"]}, "category"),
    ({"project": "HEART", "tier": "record", "patient": "BOB"}, "form"),
    ({"project": "HEART", "tier": ["record", "none"]}, "form"),
    ({"project": "HEART"}, "form"),
])
def test_a_tampered_form_is_refused_and_nothing_is_written(app, portal, context, fields, reason):
    names = {"CLOSED": portal.closed, "SLEEP": portal.sleep, "HEART": portal.heart, "BOB": portal.bob}
    sent = {k: [names.get(v, v) for v in (vs if isinstance(vs, list) else [vs])] for k, vs in fields.items()}
    before = consent_count(app)
    with pytest.raises(ChoiceRefused) as refused:
        save(portal.alice, form("project", **sent))
    assert refused.value.reason == reason
    assert consent_count(app) == before
    assert tier(app, portal.alice, portal.heart) == (0, 0)


def test_an_unknown_kind_of_form_is_refused(app, portal, context):
    with pytest.raises(ChoiceRefused) as refused:
        prepare(portal.alice, {"kind": ["everything"]})
    assert refused.value.reason == "form"


def test_choosing_what_is_already_held_plans_nothing(app, portal, context):
    planned = prepare(portal.bob, form("project", project=portal.heart, tier="record"))
    assert planned.empty and not planned.effects


def test_changing_the_research_wide_choice_keeps_the_project_choices_governing(app, portal, context):
    planned = save(portal.bob, form("research", tier="none"))
    assert planned.kept == (portal.heart,)
    assert {e.project_id: (e.before.tier, e.after.tier) for e in planned.effects} == {
        portal.sleep: ("aggregate", "none"), None: ("aggregate", "none")}
    assert tier(app, portal.bob, portal.heart) == (2, 0)  # the paper choice still governs heart
    assert tier(app, portal.bob, portal.sleep) == (0, 0)
    with db.read() as conn:
        wide = writer.current_for(conn, portal.bob, None)
        heart = writer.current_for(conn, portal.bob, portal.heart)
    assert wide is not None and heart is not None
    assert datetime.fromisoformat(wide["dateTime"]) < datetime.fromisoformat(heart["dateTime"])
    assert heart["meta"]["versionId"] == "2" and writer.how(heart)["method"] == "paper"  # same content, re-dated


def test_excluding_a_category_everywhere_reaches_every_project_and_future_ones(app, portal, context):
    planned = save(portal.bob, form("sensitive", exclude="mental-health"))
    assert {e.project_id for e in planned.effects} == {portal.heart, portal.sleep, None}
    assert tier(app, portal.bob, portal.heart) == (2, BIT["mental-health"])
    assert tier(app, portal.bob, portal.sleep) == (1, BIT["mental-health"])
    seen = overview(portal.bob)
    assert seen.excluded_everywhere() == ("mental-health",)
    with db.read() as conn:
        heart = writer.current_for(conn, portal.bob, portal.heart)
    assert heart is not None and writer.how(heart) == {"method": "web", "recorded_by": None}
    save(portal.bob, form("sensitive"))  # ticked off again: included everywhere again
    assert tier(app, portal.bob, portal.heart) == (2, 0)
    assert tier(app, portal.bob, portal.sleep) == (1, 0)


def test_a_per_project_exclusion_is_not_undone_by_the_everywhere_form(app, portal, context):
    save(portal.bob, form("project", project=portal.heart, tier="record", exclude="hiv"))
    save(portal.bob, form("sensitive", exclude="genetics"))
    assert tier(app, portal.bob, portal.heart) == (2, BIT["hiv"] | BIT["genetics"])
    assert tier(app, portal.bob, portal.sleep) == (1, BIT["genetics"])


def test_adding_an_exclusion_keeps_everything_else_a_held_consent_says():
    held = writer.build("p1", "proj", "record", ["hiv"], source="test", method="paper")
    held["provision"]["provision"].append({"type": "deny", "dataPeriod": {"end": "2019-12-31"}})
    changed = choices.with_exclusions(held, {"genetics"}, set())
    assert {"type": "deny", "dataPeriod": {"end": "2019-12-31"}} in changed["provision"]["provision"]
    assert choices.expressed(changed).excluded == ("hiv", "genetics")
    assert choices.expressed(changed).limited  # the data period still applies
    removed = choices.with_exclusions(changed, set(), {"hiv", "genetics"})
    assert removed["provision"]["provision"] == [{"type": "deny", "dataPeriod": {"end": "2019-12-31"}}]
    refused = writer.build("p1", "proj", "none", [], source="test", method="paper")
    assert choices.with_exclusions(refused, {"hiv"}, set())["provision"] == {"type": "deny"}


def test_withdrawing_from_all_research_refuses_every_project_and_future_ones(app, portal, context):
    planned = save(portal.bob, form("withdraw"))
    assert {e.project_id: e.after for e in planned.effects} == {
        portal.heart: Choice("none"), portal.sleep: Choice("none"), None: Choice("none")}
    assert tier(app, portal.bob, portal.heart) == (0, 0) and tier(app, portal.bob, portal.sleep) == (0, 0)
    with db.read() as conn:
        assert all(writer.current_for(conn, portal.bob, p)["provision"] == {"type": "deny"}
                   for p in (None, portal.heart, portal.sleep))
    assert prepare(portal.bob, form("withdraw")).empty  # withdrawing again changes nothing


def test_a_choice_a_more_recent_consent_overrules_is_flagged_before_saving(app, portal, context):
    later = datetime.now(UTC) + timedelta(days=365)
    with db.write() as conn:
        writer.record(conn, writer.build(portal.alice, None, "none", [], source="test", when=later))
    planned = prepare(portal.alice, form("project", project=portal.heart, tier="record"))
    assert planned.overruled == (portal.heart,) and not planned.effects


def test_the_history_lists_every_version_with_how_it_was_made(app, portal, context):
    save(portal.bob, form("project", project=portal.heart, tier="aggregate"))
    with db.read() as conn:
        found = choices.versions(conn, portal.bob)
        assert choices.versions(conn, portal.alice) == []
    assert [(v.project_id, v.version, v.choice, v.method, v.recorded_by) for v in found] == [
        (portal.heart, 2, Choice("aggregate"), "web", None),
        (portal.heart, 1, Choice("record"), "paper", "Nurse Martin"),
        (None, 1, Choice("aggregate"), "paper", None),
    ]


def test_the_download_holds_the_patients_own_consents_only(app, portal, context):
    save(portal.alice, form("research", tier="aggregate"))
    with db.read() as conn:
        mine = choices.bundle(conn, portal.alice)
    assert mine["resourceType"] == "Bundle" and mine["type"] == "collection"
    assert [e["resource"]["patient"]["reference"] for e in mine["entry"]] == [f"Patient/{portal.alice}"]
