"""The account pages: accept an invitation (choose a passphrase), sign in, sign out (everywhere).

A page's language is switched with `?lang=` on any page (consent/web/i18n.py).
"""
from __future__ import annotations

from flask import redirect, render_template, request, url_for
from flask_babel import gettext as _
from sqlalchemy import Connection
from werkzeug import Response

from consent.web import accounts, bp, i18n, sessions
from consent.web.errors import TooManyAttempts
from service import audit, db, proxy, ratelimit

#: Sign-in attempts one address may make per window, whatever the numbers tried.
SIGN_IN_LIMIT = 20
SIGN_IN_WINDOW_SECONDS = 15 * 60
SIGN_IN_BUCKET = "portal-sign-in:"


def _audit_sign_in(conn: Connection, patient_id: str | None, number: str, failure: str | None = None,
                   **detail: str) -> None:
    """Record a sign-in (never its passphrase): the patient's, or, for a number of no account, a keyed
    hash of the number; a refusal with its reason."""
    if failure:
        detail.update(outcome="failure", reason=failure)
    if patient_id is None:
        detail["number"] = audit.conceal([("identifier", number)], audit.query_key())[0][1]
    audit.record(conn, actor=f"patient:{patient_id or 'unknown'}", action="sign-in", project_id=None, detail=detail,
                 patients=[patient_id] if patient_id else [])


def _passphrase_errors(passphrase: str, confirm: str) -> dict[str, str]:
    problem = accounts.passphrase_problem(passphrase)
    if problem == "too-short":
        return {"passphrase": _("Your passphrase must have at least %(count)s characters.",
                                count=accounts.MIN_LENGTH)}
    if problem == "common":
        return {"passphrase": _("This passphrase is too common and easy to guess. Please choose another one.")}
    if accounts.normalised(passphrase) != accounts.normalised(confirm):
        return {"confirm": _("The two passphrases are not the same. Please type it again.")}
    return {}


@bp.route("/invite/<token>", methods=["GET", "POST"])
@sessions.public
def invite(token: str) -> Response | str | tuple[str, int]:
    """Choose a passphrase with a one-time invitation link; on success the patient is signed in."""
    with db.read() as conn:
        invitation = accounts.pending_invitation(conn, token, db.now_us())
    errors: dict[str, str] = {}
    if request.method == "POST":
        passphrase, confirm = request.form.get("passphrase", ""), request.form.get("confirm", "")
        errors = _passphrase_errors(passphrase, confirm)
        if not errors:
            hashed = accounts.hash_passphrase(passphrase)  # slow on purpose: outside the transaction
            with db.write() as conn:
                now = db.now_us()
                patient_id = accounts.accept(conn, token, hashed, now)
                sessions.sign_in_as(conn, patient_id, i18n.page_language(), now)
                _audit_sign_in(conn, patient_id, invitation.number, via="invitation")
            return redirect(url_for("consent_web.home"), 303)
    page = render_template("invite.html", token=token, number=invitation.number, errors=errors,
                           min_length=accounts.MIN_LENGTH)
    return (page, 400) if errors else page


@bp.route("/signin", methods=["GET", "POST"])
@sessions.public
def signin() -> Response | str | tuple[str, int]:
    """Sign in with patient number and passphrase; every refusal says the same thing."""
    if request.method != "POST":  # GET and HEAD: a HEAD with a form body must not sign in past the CSRF check
        if sessions.current_session() is not None:
            return redirect(url_for("consent_web.home"))
        return render_template("signin.html", number="", errors={})
    number, passphrase = request.form.get("number", "").strip(), request.form.get("passphrase", "")
    bucket = SIGN_IN_BUCKET + proxy.client_address()
    with db.write() as conn:
        now = db.now_us()
        ratelimit.prune(conn, SIGN_IN_BUCKET, SIGN_IN_WINDOW_SECONDS, now)
        verdict = ratelimit.hit(conn, bucket, SIGN_IN_LIMIT, SIGN_IN_WINDOW_SECONDS, now)
    if not verdict.allowed:
        raise TooManyAttempts(verdict.retry_after)
    with db.read() as conn:
        account = accounts.find(conn, number)
    now = db.now_us()
    accepted = accounts.passphrase_accepted(account, passphrase, now)  # slow on purpose: outside transactions
    with db.write() as conn:
        if account is None:
            _audit_sign_in(conn, None, number, "unknown-number")
        elif accepted:
            accepted = accounts.record_success(conn, account, now)
            if accepted:
                sessions.sign_in_as(conn, account.patient_id, i18n.page_language(), now)
            _audit_sign_in(conn, account.patient_id, number, None if accepted else "locked")
        else:
            _audit_sign_in(conn, account.patient_id, number,
                           "locked" if accounts.is_locked(account, now) else "wrong-passphrase")
            accounts.record_failure(conn, account, now)
    if accepted:
        return redirect(url_for("consent_web.home"), 303)
    message = _("Patient number or passphrase not recognised, or the account is locked for a while. "
                "Please check them and try again in a few minutes.")
    return render_template("signin.html", number=number, errors={"number": message}), 400


@bp.route("/signout", methods=["POST"])
@sessions.signed_in
def signout() -> Response:
    with db.write() as conn:
        audit.record(conn, actor=f"patient:{sessions.current_patient()}", action="sign-out", project_id=None,
                     detail={}, patients=[sessions.current_patient()])
        sessions.sign_out(conn)
    return redirect(url_for("consent_web.signed_out"), 303)


@bp.route("/signout-everywhere", methods=["POST"])
@sessions.signed_in
def signout_everywhere() -> Response:
    with db.write() as conn:
        audit.record(conn, actor=f"patient:{sessions.current_patient()}", action="sign-out", project_id=None,
                     detail={"everywhere": True}, patients=[sessions.current_patient()])
        sessions.sign_out(conn, everywhere=True)
    return redirect(url_for("consent_web.signed_out", everywhere=1), 303)


@bp.route("/signed-out")
@sessions.public
def signed_out() -> str:
    return render_template("signed_out.html", everywhere=request.args.get("everywhere") == "1")
