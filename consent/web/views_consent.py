"""The signed-in patient's pages: their choices, a change (form → confirmation → receipt), the
history of what they said, a download of their Consents, who received their data, and
withdrawal from all research.

Every page reads and writes only the patient of the session (`current_patient()`); a project id
in the address or a form names a project, which is checked (consent/web/choices.py), never a
patient. A change is shown on a confirmation page before anything is written; the save
re-checks the same fields against the database in the transaction that writes them.
"""
from __future__ import annotations

from datetime import UTC, date, datetime

import orjson
from flask import Response, abort, redirect, render_template, request, url_for
from flask_babel import format_date, format_datetime, format_decimal, lazy_gettext
from flask_babel import gettext as _

from consent import projects
from consent.web import bp, choices, disclosures, i18n, sessions
from consent.web.sessions import current_patient, signed_in
from service import audit, db

TIER_LABELS = {"none": lazy_gettext("No"), "aggregate": lazy_gettext("Statistics only"),
               "record": lazy_gettext("Pseudonymised records")}
TIER_HINTS = {
    "none": lazy_gettext("Researchers receive nothing about you."),
    "aggregate": lazy_gettext("Your data may be counted in anonymous statistics. No researcher sees your records."),
    "record": lazy_gettext("Researchers may receive your records without your name, address or identifiers."),
}
CATEGORY_LABELS = {
    "mental-health": lazy_gettext("Mental health"),
    "hiv": lazy_gettext("HIV"),
    "sexual-health": lazy_gettext("Sexual and reproductive health"),
    "substance-use": lazy_gettext("Substance use"),
    "genetics": lazy_gettext("Genetics"),
}
CATEGORY_HINTS = {
    "mental-health": lazy_gettext("Diagnoses, treatments and notes about your mental health, such as depression "
                                  "or anxiety."),
    "hiv": lazy_gettext("Tests, diagnoses and treatments related to HIV."),
    "sexual-health": lazy_gettext("Contraception, pregnancy, abortion and sexually transmitted infections."),
    "substance-use": lazy_gettext("Use of, and treatment for, alcohol, tobacco or drugs."),
    "genetics": lazy_gettext("The results of genetic tests and what they say about your genes."),
}
KIND_LABELS = {
    "about-you": lazy_gettext("basic facts about you (such as your year of birth and sex), never your name or "
                              "address"),
    "conditions": lazy_gettext("diagnoses, allergies and health problems"),
    "results": lazy_gettext("test results and measurements"),
    "medicines": lazy_gettext("medicines and vaccinations"),
    "care": lazy_gettext("visits, procedures and care plans"),
    "documents": lazy_gettext("letters, reports and questionnaires"),
    "billing": lazy_gettext("insurance and billing"),
    "providers": lazy_gettext("the care teams and places that looked after you"),
}
METHOD_LABELS = {"web": lazy_gettext("on this website"),
                 "paper": lazy_gettext("on a paper form"),
                 None: lazy_gettext("by the hospital's systems")}
_SECOND_US = 1_000_000


def _fields() -> dict[str, list[str]]:
    """The submitted form, without its CSRF token (checked before the view runs)."""
    return {name: request.form.getlist(name) for name in request.form if name != sessions.CSRF_FIELD}


def _moment(us: int) -> str:
    return format_datetime(datetime.fromtimestamp(us / _SECOND_US, UTC))


def _signed(value: str | None) -> str:
    """A Consent's dateTime in words: a date, or a date and time."""
    if not value:
        return ""
    if len(value) <= 10:
        parts = [int(p) for p in value.split("-")]
        return format_date(date(*parts, *[1] * (3 - len(parts))))
    return format_datetime(datetime.fromisoformat(value.replace("Z", "+00:00")))


def describe(choice: choices.Choice) -> str:
    """A choice in words: the tier, the sensitive categories left out, whether more limits apply."""
    words = str(TIER_LABELS[choice.tier])
    if choice.excluded:
        words = _("%(choice)s, without: %(categories)s", choice=words,
                  categories=", ".join(str(CATEGORY_LABELS[c]) for c in choice.excluded))
    if choice.limited:
        words = _("%(choice)s (with further limits on dates or kinds of data)", choice=words)
    return words


def tier_options(offered: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """The radio buttons of a choice: (value, label, hint) per tier offered."""
    return [(t, str(TIER_LABELS[t]), str(TIER_HINTS[t])) for t in offered]


def category_options() -> list[tuple[str, str, str]]:
    """The check boxes of the sensitive categories: (value, label, one-sentence explanation)."""
    return [(c, str(CATEGORY_LABELS[c]), str(CATEGORY_HINTS[c])) for c in choices.CATEGORIES]


@bp.context_processor
def _words() -> dict[str, object]:
    return {"category_labels": CATEGORY_LABELS, "kind_labels": KIND_LABELS, "method_labels": METHOD_LABELS,
            "describe": describe, "tier_options": tier_options, "category_options": category_options,
            "format_date": format_date, "format_decimal": format_decimal, "moment": _moment, "signed": _signed}


def _overview() -> choices.Overview:
    with db.read() as conn:
        return choices.overview(conn, current_patient())


@bp.route("/")
@signed_in
def home() -> str:
    """Every active project with the patient's current choice, and their research-wide choice."""
    seen = _overview()
    return render_template("home.html", overview=seen, lang=i18n.page_language(), wide_held=None in seen.held,
                           everywhere=seen.excluded_everywhere())


@bp.route("/projects/<project_id>")
@signed_in
def project(project_id: str) -> str:
    """One project in plain language, with the form to change what it receives."""
    seen = _overview()
    offer = next((o for o in seen.projects if o.project_id == project_id), None)
    if offer is None:
        abort(404)  # unknown or closed: no such page
    return render_template("project.html", offer=offer, text=offer.project.plain(i18n.page_language()),
                           checked=_checked(offer.current), wide_held=None in seen.held)


@bp.route("/research")
@signed_in
def research_wide() -> str:
    """The form for the research-wide choice: every project without a choice of its own, future ones too."""
    seen = _overview()
    return render_template("research.html", current=seen.research_wide, checked=_checked(seen.research_wide),
                           offered=choices.TIERS)


@bp.route("/sensitive")
@signed_in
def sensitive() -> str:
    """The form that leaves sensitive categories out everywhere (or no longer)."""
    return render_template("sensitive.html", everywhere=_overview().excluded_everywhere())


def _checked(current: choices.Choice) -> tuple[str, ...]:
    """The categories ticked on a form: those left out now; all of them when nothing is shared yet."""
    return choices.CATEGORIES if current.tier == "none" else current.excluded


def _titles(lang: str) -> dict[str | None, str]:
    """Every project's title in `lang`, by id (None: the research-wide choice)."""
    with db.read() as conn:
        titles: dict[str | None, str] = {p.project_id: p.plain(lang)["title"] or p.name
                                         for p in projects.all_projects(conn)}
    titles[None] = _("Other and future projects")
    return titles


@bp.route("/confirm", methods=["POST"])
@signed_in
def confirm() -> str:
    """What a submitted change would do, in words, with the button that saves it. Nothing is written."""
    with db.read() as conn:
        plan = choices.prepare(conn, current_patient(), _fields())
    return render_template("confirm.html", plan=plan, withdrawing=plan.request.kind == "withdraw",
                           titles=_titles(i18n.page_language()))


@bp.route("/save", methods=["POST"])
@signed_in
def save() -> Response:
    """Re-check the confirmed change and store it in one transaction; then the receipt."""
    started = db.now_us()
    patient_id = current_patient()
    with db.write() as conn:
        _, written = choices.save(conn, patient_id, _fields())
        audit.record(conn, actor=f"patient:{patient_id}", action="consent-change", project_id=None,
                     detail={"type": "Consent", "method": "web",
                             "consents": [f"Consent/{s.id}/_history/{s.version}" for s in written]},
                     patients=[patient_id])
    return redirect(url_for("consent_web.receipt", saved=started), 303)


@bp.route("/receipt")
@signed_in
def receipt() -> str:
    """The versions of the patient's choices saved since `saved` (the moment the save began)."""
    saved = request.args.get("saved", type=int)
    with db.read() as conn:
        written = (choices.versions(conn, current_patient(), since=saved)
                   if saved is not None and 0 <= saved < 2 ** 63 else [])  # a moment a BIGINT column holds
    return render_template("receipt.html", versions=written, titles=_titles(i18n.page_language()))


@bp.route("/history")
@signed_in
def history() -> str:
    """Every version of the patient's research Consents, newest first, with when and how."""
    with db.read() as conn:
        found = choices.versions(conn, current_patient())
    return render_template("history.html", versions=found, titles=_titles(i18n.page_language()))


@bp.route("/download")
@signed_in
def download() -> Response:
    """The patient's Consents as a FHIR Bundle (collection), as a file to keep."""
    with db.read() as conn:
        bundle = choices.bundle(conn, current_patient())
    return Response(orjson.dumps(bundle, option=orjson.OPT_INDENT_2), mimetype="application/fhir+json",
                    headers={"Content-Disposition": 'attachment; filename="my-research-consents.json"'})


@bp.route("/received")
@signed_in
def received() -> str:
    """Who received the patient's data: per project, record releases by day and statistical answers."""
    with db.read() as conn:
        found = disclosures.received(conn, current_patient())
    return render_template("received.html", received=found, lang=i18n.page_language())
