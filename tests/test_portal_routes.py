"""The choice pages over HTTP (consent/web/views_consent.py): every route signed out, signed in as
the owner and as another patient; tampered forms; a change the research API sees at once.

Real app, real database (SQLite and PostgreSQL), sessions opened the way sign-in opens them
(tests/portal_world.py `sign_in`), research clients with real tokens.
"""
from __future__ import annotations

import html
import re

import pytest
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from consent.web import sessions
from service import db
from service.store.schema import web_sessions
from tests.portal_world import Portal, build_portal, consent_count, sign_in, tier
from tests.research_world import bearer, token

PAGES = ["/consent/", "/consent/projects/{heart}", "/consent/research", "/consent/sensitive", "/consent/history",
         "/consent/received", "/consent/download", "/consent/receipt?saved=0"]
POSTS = ["/consent/confirm", "/consent/save"]


@pytest.fixture
def world_recipe():
    return build_portal


@pytest.fixture
def portal(world: Portal) -> Portal:
    return world


def page(portal: Portal, path: str) -> str:
    return path.format(heart=portal.heart, sleep=portal.sleep, closed=portal.closed)


def text(response) -> str:
    """The page's visible text, tags removed, spaces collapsed."""
    return text_of(response.get_data(as_text=True))


def text_of(body: str) -> str:
    inline = re.sub(r"</?(strong|span|a)\b[^>]*>", "", body)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", inline)))


def observations(client: FlaskClient, headers: dict[str, str]) -> list[float]:
    body = client.get("/research/fhir/Observation", headers=headers).get_json()
    return sorted(e["resource"]["valueQuantity"]["value"] for e in body.get("entry", []))


def confirm(client: FlaskClient, confirmation: TestResponse) -> TestResponse:
    """Press the confirmation page's save button: post its form as the page sends it."""
    hidden = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">',
                        confirmation.get_data(as_text=True).split('action="/consent/save"', 1)[-1])
    data: dict[str, list[str]] = {}
    for name, value in hidden:
        data.setdefault(name, []).append(value)
    return client.post("/consent/save", data=data)


def change(client: FlaskClient, csrf: str, **fields: str) -> tuple[TestResponse, TestResponse]:
    """Submit a change form, then its confirmation."""
    confirmation = client.post("/consent/confirm", data={"csrf_token": csrf, **fields})
    return confirmation, confirm(client, confirmation)


# -- signed out ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_a_signed_out_visitor_is_sent_to_sign_in(client, portal, path):
    response = client.get(page(portal, path))
    assert response.status_code == 302 and response.headers["Location"].endswith("/consent/signin")


@pytest.mark.parametrize("path", POSTS)
def test_a_signed_out_post_changes_nothing(app, client, portal, path):
    before = consent_count(app)
    response = client.post(path, data={"kind": "withdraw"})
    assert response.status_code == 401 and "session has ended" in text(response)
    assert consent_count(app) == before


# -- signed in -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_every_page_answers_the_owner_with_the_portal_headers_and_no_inline_style_or_script(app, client, portal,
                                                                                          path):
    sign_in(app, client, portal.bob)
    response = client.get(page(portal, path))
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    body = response.get_data(as_text=True)
    assert "style=" not in body and "<script" not in body


@pytest.mark.parametrize("path", PAGES)
def test_no_page_shows_another_patient_anything(app, client, portal, path):
    heart = bearer(token(client, app, "research", portal.heart))
    assert observations(client, heart) == [portal.marker["bob"]]  # bob's records were released to heart
    sign_in(app, client, portal.alice)
    body = client.get(page(portal, path)).get_data(as_text=True)
    for bobs in (portal.bob, "MRN-502", "Nurse Martin", "Pseudonymised records about you were sent"):
        assert bobs not in body


def test_the_home_page_shows_each_active_project_in_plain_words_with_the_patients_choice(app, client, portal):
    sign_in(app, client, portal.bob)
    shown = text(client.get("/consent/"))
    assert "Heart failure after 60" in shown and "University Hospital of Lyon" in shown
    assert "sleep" in shown and "closed" not in shown
    assert "test results and measurements" in shown
    assert "Your choice now Pseudonymised records" in shown  # heart, from the paper form
    assert "Your choice now Statistics only (your choice for other and future projects)" in shown  # sleep
    assert "Your choice now: Statistics only" in shown  # other and future projects


def test_the_home_page_names_the_sensitive_information_no_project_receives(app, client, portal):
    csrf = sign_in(app, client, portal.bob)
    change(client, csrf, kind="sensitive", exclude=["mental-health", "genetics"])
    shown = text(client.get("/consent/"))
    assert "Never sent to any project: Mental health Genetics" in shown


def test_the_project_page_offers_only_the_projects_tiers_as_a_fieldset(app, client, portal):
    sign_in(app, client, portal.alice)
    body = client.get(f"/consent/projects/{portal.sleep}").get_data(as_text=True)
    assert re.findall(r'name="tier" value="(\w+)"', body) == ["none", "aggregate"]
    assert "<legend" in body and 'for="exclude-mental-health"' in body
    assert "Your choice now No (the hospital's rule while you have not chosen)" in text_of(body)
    assert client.get(f"/consent/projects/{portal.closed}").status_code == 404
    assert client.get("/consent/projects/no-such-project").status_code == 404


def test_pages_speak_french_when_asked(app, client, portal):
    sign_in(app, client, portal.bob)
    shown = text(client.get("/consent/?lang=fr"))
    assert "L'insuffisance cardiaque après 60 ans" in shown
    assert "Vos choix pour la recherche" in shown and "Your research choices" not in shown


def test_another_patients_choices_history_and_disclosures_are_never_shown(app, client, portal):
    heart = bearer(token(client, app, "research", portal.heart))
    assert observations(client, heart) == [portal.marker["bob"]]  # bob's records left for heart
    sign_in(app, client, portal.alice)
    assert "Nurse Martin" not in text(client.get("/consent/history"))
    assert "No research project has received any data about you." in text(client.get("/consent/received"))
    downloaded = client.get("/consent/download").get_json()
    assert downloaded["entry"] == []
    sign_in(app, client, portal.bob)
    assert "Nurse Martin" in text(client.get("/consent/history"))
    assert "sent to this project on these days" in text(client.get("/consent/received"))
    downloaded = client.get("/consent/download")
    assert downloaded.headers["Content-Disposition"].startswith("attachment;")
    assert {e["resource"]["patient"]["reference"] for e in downloaded.get_json()["entry"]} == {
        f"Patient/{portal.bob}"}


# -- a change ------------------------------------------------------------------------------------


def test_a_confirmed_change_is_seen_by_the_very_next_research_request(app, client, portal):
    heart = bearer(token(client, app, "research", portal.heart))
    assert observations(client, heart) == [portal.marker["bob"]]
    csrf = sign_in(app, client, portal.alice)
    before = consent_count(app)
    confirmation = client.post("/consent/confirm", data={"csrf_token": csrf, "kind": "project",
                                                         "project": portal.heart, "tier": "record"})
    assert confirmation.status_code == 200
    assert "Heart failure after 60: “No” becomes “Pseudonymised records”" in text(confirmation)
    assert consent_count(app) == before  # the confirmation page writes nothing
    saved = confirm(client, confirmation)
    assert saved.status_code == 303
    receipt = client.get(saved.headers["Location"])
    assert "Your choices are saved" in text(receipt) and "Heart failure after 60: Pseudonymised records" in text(
        receipt)
    assert observations(client, heart) == [portal.marker["alice"], portal.marker["bob"]]
    assert tier(app, portal.bob, portal.heart) == (2, 0)  # bob's choice is untouched
    assert "on this website" in text(client.get("/consent/history"))


def test_withdrawing_from_all_research_takes_one_confirmed_step(app, client, portal):
    heart = bearer(token(client, app, "research", portal.heart))
    csrf = sign_in(app, client, portal.bob)
    confirmation, saved = change(client, csrf, kind="withdraw")
    assert "Withdraw from all research?" in text(confirmation)
    assert saved.status_code == 303
    assert observations(client, heart) == []
    assert tier(app, portal.bob, portal.sleep) == (0, 0)


def test_the_confirmation_carries_the_change_but_not_the_patient(app, client, portal):
    csrf = sign_in(app, client, portal.alice)
    body = client.post("/consent/confirm", data={"csrf_token": csrf, "kind": "research", "tier": "aggregate",
                                                 "exclude": ["hiv", "genetics"]}).get_data(as_text=True)
    assert portal.alice not in body
    assert "Other and future projects: “No” becomes “Statistics only, without: HIV, Genetics”" in text_of(body)


@pytest.mark.parametrize("path", POSTS)
@pytest.mark.parametrize("fields", [
    {"kind": "project", "project": "no-such-project", "tier": "record"},
    {"kind": "project", "project": "{closed}", "tier": "record"},
    {"kind": "project", "project": "{sleep}", "tier": "record"},
    {"kind": "project", "project": "{heart}", "tier": "record", "exclude": "astrology"},
    {"kind": "project", "project": "{heart}", "tier": "record", "patient": "{bob}"},
    {"kind": "withdraw", "patient": "{bob}"},
])
def test_a_tampered_form_gets_a_clear_page_and_changes_nothing(app, client, portal, path, fields):
    csrf = sign_in(app, client, portal.alice)
    names = {"closed": portal.closed, "sleep": portal.sleep, "heart": portal.heart, "bob": portal.bob}
    sent = {k: v.format(**names) for k, v in fields.items()}
    before = consent_count(app)
    response = client.post(path, data={"csrf_token": csrf, **sent})
    assert response.status_code == 400
    assert "nothing was changed" in text(response)
    assert consent_count(app) == before
    assert tier(app, portal.bob, portal.heart) == (2, 0) and tier(app, portal.alice, portal.heart) == (0, 0)


def test_a_save_without_the_sessions_csrf_token_changes_nothing(app, client, portal):
    sign_in(app, client, portal.bob)
    before = consent_count(app)
    other = sign_in(app, app.test_client(), portal.alice)  # a valid token, but of another session
    for data in ({"kind": "withdraw"}, {"kind": "withdraw", "csrf_token": other}):
        assert client.post("/consent/save", data=data).status_code == 400
    assert consent_count(app) == before


def test_a_session_ended_elsewhere_cannot_save(app, client, portal):
    csrf = sign_in(app, client, portal.bob)
    with app.app_context(), db.write() as conn:
        conn.execute(web_sessions.delete())
    before = consent_count(app)
    assert client.post("/consent/save", data={"csrf_token": csrf, "kind": "withdraw"}).status_code == 401
    assert consent_count(app) == before
    assert client.get("/consent/").headers["Location"].endswith("/consent/signin")
    assert client.get_cookie(sessions.COOKIE, path=sessions.COOKIE_PATH) is None
