"""`patient invite|reset`: invitations to the consent portal, with an optional printable letter."""
from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import click
import segno
from flask import current_app, render_template
from flask.cli import AppGroup
from flask_babel import force_locale, format_date
from markupsafe import Markup
from sqlalchemy import Connection

from consent.patients import resolve
from consent.web import accounts, i18n
from service import audit, db
from service.cli.output import emit, readable_errors


@click.group("patient", cls=AppGroup)
def patient_group() -> None:
    """Patients' access to the consent portal."""


_PATIENT = click.option("--patient", "patient", required=True, help="The patient's id or medical record number.")
_LANG = click.option("--lang", type=click.Choice(i18n.LANGUAGES), default=i18n.DEFAULT, show_default=True,
                     help="The language of the portal's pages and of the letter.")
_LETTER = click.option("--letter", type=click.Path(dir_okay=False, writable=True, path_type=Path),
                       help="Also write a printable letter (HTML) with the link and a QR code to this file.")
_BASE = click.option("--base-url", help="The portal's public base URL (default: PASSERELLE_BASE_URL).")


@patient_group.command("invite")
@_PATIENT
@_LANG
@_LETTER
@_BASE
def invite_command(patient: str, lang: str, letter: Path | None, base_url: str | None) -> None:
    """Print a one-time link (valid 7 days) with which the patient chooses a passphrase."""
    _issue(accounts.invite, "account-invite", patient, lang, letter, base_url)


@patient_group.command("reset")
@_PATIENT
@_LANG
@_LETTER
@_BASE
def reset_command(patient: str, lang: str, letter: Path | None, base_url: str | None) -> None:
    """End every portal session of the patient, void their passphrase and unused invitations, and
    print a new one-time link."""
    _issue(accounts.reset, "account-reset", patient, lang, letter, base_url)


def _issue(make: Callable[[Connection, str, str, int], tuple[str, accounts.Invitation]], action: str,
           patient: str, lang: str, letter: Path | None, base_url: str | None) -> None:
    """Issue an invitation with `make` (audited as `action`) for the patient named, and report it."""
    with readable_errors():
        base = _base(base_url)
        with db.write() as conn:
            patient_id = resolve(conn, patient)
            token, invitation = make(conn, patient_id, lang, db.now_us())
            audit.record(conn, actor=audit.operator(), action=action, project_id=None, detail={},
                         patients=[patient_id])
        _report(base, token, invitation, letter)


def _base(option: str | None) -> str:
    base = (option or current_app.config["BASE_URL"]).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise click.ClickException("The link needs the portal's public address: set PASSERELLE_BASE_URL or pass "
                                   "--base-url (e.g. http://127.0.0.1:8000)")
    return base


def invitation_link(base: str, token: str, lang: str) -> str:
    """The link a patient opens: the invitation page, in the invitation's language."""
    return f"{base}/consent/invite/{token}?lang={lang}"


def _report(base: str, token: str, invitation: accounts.Invitation, letter: Path | None) -> None:
    link = invitation_link(base, token, invitation.lang)
    expires = datetime.fromtimestamp(invitation.expires_us / 1_000_000, UTC)
    if letter is not None:
        letter.write_text(render_letter(link, invitation, expires), encoding="utf-8")
    emit({"patient": invitation.patient_id, "link": link, "expires": expires.isoformat(timespec="seconds"),
          **({"letter": str(letter)} if letter is not None else {})})


def render_letter(link: str, invitation: accounts.Invitation, expires: datetime) -> str:
    """The printable invitation letter, in the invitation's language, with the link as a QR code (inline SVG)."""
    qr = Markup(segno.make(link, error="m").svg_inline(scale=4, title=link))
    with force_locale(invitation.lang):
        return render_template("letter.html", lang=invitation.lang, link=link, qr=qr, number=invitation.number,
                               expires=format_date(expires, format="long"))
