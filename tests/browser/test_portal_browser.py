"""The consent portal in a real browser: headless chromium over HTTP, the real app on SQLite and
PostgreSQL, the custodian's real `patient invite` command, and the research API right after.

- An invited patient chooses a passphrase, signs in, changes what a project receives and
  confirms; the research API's very next answer follows the new choice.
- The same, with the keyboard only: Tab to move, Enter and Space to act, and the arrow keys
  inside a group of radio buttons (the only way a browser lets a keyboard pick one). Every
  stop of Tab shows a visible focus ring.
- Every page, in English and in French, has no serious or critical axe-core violation of WCAG
  2.1 A/AA and breaks no rule of the pages' Content-Security-Policy; the full axe results and
  full-page screenshots at 360 and 1280 px are kept under `test-artifacts/<database>/`. What axe and
  the browser judge is the markup, the same on either database: this tour (18 s) runs on SQLite
  only. Each page is rendered on both databases by tests/test_portal_*.py, and the two tests above
  drive the portal in the browser on both.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from axe_playwright_python.sync_playwright import Axe
from flask import Flask
from flask.testing import FlaskClient
from flask_babel import LazyString, force_locale, gettext
from playwright.sync_api import BrowserContext, Locator, LocatorAssertions, Page, expect
from sqlalchemy.engine import make_url

from consent.web import sessions
from consent.web.errors import FormExpired, InvitationInvalid, SessionExpired
from tests.portal_world import HEART_TEXT, Portal, build_portal
from tests.research_world import bearer, token

pytestmark = pytest.mark.browser

PASSPHRASE = "violet kettle harbour 42"
#: The rules axe-core checks: WCAG 2.0 and 2.1, levels A and AA.
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
BLOCKING_IMPACTS = ("serious", "critical")
SCREEN_WIDTHS = (360, 1280)
ALICE_NUMBER = "MRN-501"  # tests/portal_world.py: alice has no consent, so the default (deny) governs
HEART_EN = HEART_TEXT["en"]["title"]
#: The language switch names each language in itself.
LANGUAGE_NAMES = {"en": "English", "fr": "Français"}


@pytest.fixture
def portal(app: Flask, client: FlaskClient, custodian_headers: dict[str, str]) -> Portal:
    return build_portal(app, client, custodian_headers)


@pytest.fixture
def research_heart(app: Flask, client: FlaskClient, portal: Portal) -> dict[str, str]:
    """Headers of a research client of the record-tier project `heart`."""
    return bearer(token(client, app, "research", portal.heart))


def invitation_link(app: Flask, base_url: str, number: str, lang: str = "en") -> str:
    """The link the custodian's `patient invite` prints for the patient."""
    result = app.test_cli_runner().invoke(args=["patient", "invite", "--patient", number, "--lang", lang,
                                                "--base-url", base_url])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["link"]


def released_markers(client: FlaskClient, headers: dict[str, str]) -> set[float]:
    """The Observation values a research client receives now (each patient's value is unique)."""
    response = client.get("/research/fhir/Observation?_count=100", headers=headers)
    assert response.status_code == 200, response.get_json()
    return {entry["resource"]["valueQuantity"]["value"] for entry in response.get_json().get("entry", [])}


def heading(page: Page) -> LocatorAssertions:
    """What to expect of the page's main heading."""
    return expect(page.get_by_role("heading", level=1))


# -- with the mouse ------------------------------------------------------------------------------------


def test_an_invited_patient_signs_in_changes_a_choice_and_research_follows_at_once(
        app, client, portal, research_heart, page, base_url):
    assert portal.marker["alice"] not in released_markers(client, research_heart)

    page.goto(invitation_link(app, base_url, ALICE_NUMBER))
    heading(page).to_have_text("Choose your passphrase")
    page.get_by_label("Passphrase", exact=True).fill(PASSPHRASE)
    page.get_by_label("Type the passphrase again").fill(PASSPHRASE)
    page.get_by_role("button", name="Save my passphrase").click()
    heading(page).to_have_text("Your research choices")

    page.get_by_role("button", name="Sign out", exact=True).click()
    heading(page).to_have_text("You are signed out")
    page.get_by_role("link", name="Sign in again").click()
    page.get_by_label("Patient number").fill(ALICE_NUMBER)
    page.get_by_label("Passphrase").fill(PASSPHRASE)
    page.get_by_role("button", name="Sign in").click()
    heading(page).to_have_text("Your research choices")

    page.get_by_role("link", name=f"Change your choice for this project: {HEART_EN}").click()
    heading(page).to_have_text(HEART_EN)
    page.get_by_label("Pseudonymised records").check()
    page.get_by_role("button", name="Continue").click()
    heading(page).to_have_text("Check your changes")
    expect(page.get_by_role("main")).to_contain_text(f"{HEART_EN}: “No” becomes “Pseudonymised records")
    page.get_by_role("button", name="Save my choices").click()
    heading(page).to_have_text("Your choices are saved")
    expect(page.get_by_role("main")).to_contain_text(f"{HEART_EN}: Pseudonymised records")

    assert portal.marker["alice"] in released_markers(client, research_heart)

    page.get_by_role("button", name="Sign out", exact=True).click()
    heading(page).to_have_text("You are signed out")
    page.goto("/consent/")
    heading(page).to_have_text("Sign in")


# -- with the keyboard only ----------------------------------------------------------------------------


def focused_is(target: Locator) -> bool:
    return target.evaluate("element => element === document.activeElement")


def tab_to(page: Page, target: Locator, limit: int = 40) -> None:
    """Press Tab until `target` has the focus; every element of the page Tab stops at must show
    where it is (past the last one, the focus leaves the page: `body` is active)."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        ring = page.evaluate("""() => {
            const active = document.activeElement, style = getComputedStyle(active);
            return {element: active.outerHTML.slice(0, 120), page: active !== document.body,
                    visible: style.outlineStyle !== 'none' || style.boxShadow !== 'none'};
        }""")
        assert ring["visible"] or not ring["page"], f"no visible focus on {ring['element']}"
        if focused_is(target):
            return
    raise AssertionError(f"{limit} presses of Tab never reached {target}")


def test_the_whole_change_can_be_made_with_the_keyboard_only(app, client, portal, research_heart, page, base_url):
    page.goto(invitation_link(app, base_url, ALICE_NUMBER))
    tab_to(page, page.get_by_label("Passphrase", exact=True))
    page.keyboard.type(PASSPHRASE)
    tab_to(page, page.get_by_label("Type the passphrase again"))
    page.keyboard.type(PASSPHRASE)
    page.keyboard.press("Enter")
    heading(page).to_have_text("Your research choices")

    tab_to(page, page.get_by_role("button", name="Sign out", exact=True))
    page.keyboard.press("Space")
    heading(page).to_have_text("You are signed out")
    tab_to(page, page.get_by_role("link", name="Sign in again"))
    page.keyboard.press("Enter")
    heading(page).to_have_text("Sign in")
    tab_to(page, page.get_by_label("Patient number"))
    page.keyboard.type(ALICE_NUMBER)
    tab_to(page, page.get_by_label("Passphrase"))
    page.keyboard.type(PASSPHRASE)
    page.keyboard.press("Enter")
    heading(page).to_have_text("Your research choices")

    page.keyboard.press("Tab")  # the first stop of every page skips the header
    expect(page.get_by_role("link", name="Skip to main content")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_role("main")).to_be_focused()
    tab_to(page, page.get_by_role("link", name=f"Change your choice for this project: {HEART_EN}"))
    page.keyboard.press("Enter")
    heading(page).to_have_text(HEART_EN)
    tab_to(page, page.get_by_label("No", exact=True))  # Tab enters the group on its checked button
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    expect(page.get_by_label("Pseudonymised records")).to_be_checked()
    expect(page.get_by_label("Pseudonymised records")).to_be_focused()
    tab_to(page, page.get_by_label("Mental health"))
    page.keyboard.press("Space")  # share mental health after all: untick it
    expect(page.get_by_label("Mental health")).not_to_be_checked()
    tab_to(page, page.get_by_role("button", name="Continue"))
    page.keyboard.press("Enter")
    heading(page).to_have_text("Check your changes")
    tab_to(page, page.get_by_role("button", name="Save my choices"))
    page.keyboard.press("Space")
    heading(page).to_have_text("Your choices are saved")

    assert portal.marker["alice"] in released_markers(client, research_heart)

    tab_to(page, page.get_by_role("button", name="Sign out", exact=True))
    page.keyboard.press("Enter")
    heading(page).to_have_text("You are signed out")


# -- every page, both languages: axe-core, the CSP, screenshots ------------------------------------------


class Tour:
    """A patient's walk through every page in one language. Each page is checked on arrival: its
    language and main heading, axe-core's WCAG 2.0/2.1 A and AA rules (the full results kept as
    JSON), and that it fits a phone's width."""

    def __init__(self, app: Flask, page: Page, folder: Path):
        self.app, self.page, self.folder, self.axe = app, page, folder, Axe()
        self.lang = "en"
        self.problems: list[str] = []

    def t(self, message: str | LazyString, **values: str) -> str:
        """`message` as the pages say it in the tour's language (the app's own catalogue)."""
        with self.app.test_request_context(), force_locale(self.lang):
            return gettext(message, **values) if isinstance(message, str) else str(message)

    def arrive(self, name: str, title: str, message: str | LazyString | None = None) -> None:
        """Check the page now shown, called `name` in the artefacts: heading `title` (and `message`)."""
        expect(self.page.locator("html")).to_have_attribute("lang", self.lang)
        heading(self.page).to_have_text(title)
        if message is not None:
            expect(self.page.get_by_role("main")).to_contain_text(self.t(message))
        results = self.axe.run(self.page, options={"runOnly": {"type": "tag", "values": WCAG_TAGS}})
        (self.folder / f"axe-{name}-{self.lang}.json").write_text(json.dumps(results.response, indent=1))
        for rule in results.response["violations"]:
            if rule["impact"] in BLOCKING_IMPACTS:
                targets = "; ".join(" ".join(map(str, node["target"])) for node in rule["nodes"])
                self.problems.append(f"{name} ({self.lang}, {self.page.url}): {rule['id']} [{rule['impact']}] "
                                     f"{rule['help']} — {targets}")
        screen, phone = self.page.viewport_size, SCREEN_WIDTHS[0]
        self.page.set_viewport_size({"width": phone, "height": 800})
        wide = self.page.evaluate("() => document.documentElement.scrollWidth")
        if wide > phone:  # a phone would have to scroll sideways (WCAG 1.4.10, reflow)
            self.problems.append(f"{name} ({self.lang}, {self.page.url}): {wide} px wide on a {phone}-px screen")
        self.page.set_viewport_size(screen)

    def screenshots(self, name: str) -> None:
        """Full-page screenshots of the page now shown, on a phone and on a desktop screen."""
        screen = self.page.viewport_size
        for width in SCREEN_WIDTHS:
            self.page.set_viewport_size({"width": width, "height": 800})
            self.page.screenshot(path=self.folder / f"{name}-{self.lang}-{width}.png", full_page=True)
        self.page.set_viewport_size(screen)

    def button(self, label: str) -> Locator:
        return self.page.get_by_role("button", name=self.t(label), exact=True)

    def field(self, label: str) -> Locator:
        return self.page.get_by_label(self.t(label), exact=True)


def csp_refusals(page: Page) -> list[str]:
    """Every Content-Security-Policy refusal the browser reports on `page` from now on."""
    seen: list[str] = []
    page.on("console", lambda message: seen.append(message.text) if "Content Security Policy" in message.text
            else None)
    return seen


def walk(tour: Tour, context: BrowserContext, lang: str, invite: Callable[[str], str],
         release: Callable[[], object]) -> None:
    """Every page of the portal as alice sees them in `lang`: `invite(lang)` is a new invitation link
    for her, `release()` sends her records to a research project."""
    page, t = tour.page, tour.t
    page.goto("/consent/signin")
    tour.lang = lang
    if page.locator("html").get_attribute("lang") != lang:
        page.get_by_role("link", name=LANGUAGE_NAMES[lang]).click()  # the language switch of every page
    tour.arrive("signin", t("Sign in"))
    tour.field("Patient number").fill(ALICE_NUMBER)
    tour.field("Passphrase").fill("not the passphrase")
    tour.button("Sign in").click()
    tour.arrive("signin-refused", t("Sign in"))

    link = invite(lang)
    page.goto(link)
    tour.arrive("invitation", t("Choose your passphrase"))
    tour.field("Passphrase").fill("short")
    tour.button("Save my passphrase").click()
    tour.arrive("invitation-refused", t("Choose your passphrase"))
    tour.field("Passphrase").fill(PASSPHRASE)
    tour.field("Type the passphrase again").fill(PASSPHRASE)
    tour.button("Save my passphrase").click()
    tour.arrive("home", t("Your research choices"))
    tour.screenshots("home")

    heart = HEART_TEXT[lang]["title"]
    page.get_by_role("link", name=t("Change your choice") + " " + t("for this project: %(title)s", title=heart)).click()
    tour.arrive("project", heart)
    tour.screenshots("project")
    tour.field("Pseudonymised records").check()
    tour.button("Continue").click()
    tour.arrive("confirmation", t("Check your changes"))
    tour.button("Save my choices").click()
    tour.arrive("receipt", t("Your choices are saved"))
    release()
    page.goto("/consent/received")
    tour.arrive("who-received", t("Who received your data"),
                "Pseudonymised records about you were sent to this project on these days:")
    page.goto("/consent/history")
    tour.arrive("history", t("History of your choices"))
    page.goto("/consent/research")
    tour.arrive("research-wide", t("Your choice for other and future projects"))
    page.goto("/consent/sensitive")
    tour.arrive("sensitive", t("Sensitive information"))
    page.goto("/consent/")
    tour.button("Withdraw from all research").click()
    tour.arrive("withdraw-confirmation", t("Withdraw from all research?"))
    tour.button("Yes, withdraw from all research").click()
    tour.arrive("withdraw-receipt", t("Your choices are saved"))

    sorry = t("Sorry, that did not work")
    page.goto("/consent/no-such-page")
    tour.arrive("error-not-found", sorry)
    page.goto(link)
    tour.arrive("error-invitation-used", sorry, InvitationInvalid().page_message)
    page.goto("/consent/sensitive")
    context.clear_cookies(name=sessions.COOKIE)  # the session ends while the form is open
    tour.button("Continue").click()
    tour.arrive("error-session-ended", sorry, SessionExpired().page_message)
    page.goto("/consent/signin")
    context.clear_cookies(name=sessions.FORM_COOKIE)  # the form's token no longer matches anything
    tour.button("Sign in").click()
    tour.arrive("error-form-expired", sorry, FormExpired().page_message)

    page.get_by_role("link", name=t("Go to the sign-in page")).click()
    tour.field("Patient number").fill(ALICE_NUMBER)
    tour.field("Passphrase").fill(PASSPHRASE)
    tour.button("Sign in").click()
    tour.button("Sign out").click()
    tour.arrive("signed-out", t("You are signed out"))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_every_page_in_both_languages_passes_axe_and_the_csp(app, client, portal, research_heart, context, page,
                                                              base_url, database_url, artifacts):
    folder = artifacts / make_url(database_url).get_backend_name()
    shutil.rmtree(folder, ignore_errors=True)  # only this run's pages: none left from an earlier one
    folder.mkdir()
    tour = Tour(app, page, folder)
    refused = csp_refusals(page)
    for lang in ("en", "fr"):
        walk(tour, context, lang, lambda lang: invitation_link(app, base_url, ALICE_NUMBER, lang),
             lambda: released_markers(client, research_heart))
    assert not tour.problems, "accessibility problems:\n" + "\n".join(tour.problems)
    assert not refused, refused
