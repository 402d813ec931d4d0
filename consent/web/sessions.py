"""Server-side portal sessions, CSRF tokens, and which portal pages need a signed-in patient.

A session is a row of `web_sessions` (shared by every worker and node); the browser holds
only a random id in the cookie `passerelle_session`, of which the row stores the SHA-256.
A session ends after `IDLE_SECONDS` without a request, at sign-out, when every session
of the patient is ended (sign-out everywhere, `patient reset`, a new passphrase), or when
the patient is deleted (`live_patient`).

Every portal view declares its access: `@signed_in` (a valid session, whose patient
`current_patient()` returns) or `@public`; `check_request` refuses a view that declares
neither. Every POST carries a CSRF token (`csrf_field()` in the form): the session's own,
or, before sign-in, the random nonce of the cookie `passerelle_form`.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import current_app, g, redirect, request, url_for
from markupsafe import Markup, escape
from sqlalchemy import ColumnElement, Connection, delete, exists, false, insert, select, update
from werkzeug import Response

from consent.web import i18n
from consent.web.errors import FormExpired, SessionExpired
from service import db
from service.store.schema import resources, web_sessions

COOKIE = "passerelle_session"
#: The pre-session nonce the sign-in and invitation forms' CSRF token is bound to.
FORM_COOKIE = "passerelle_form"
COOKIE_PATH = "/consent"
IDLE_SECONDS = 30 * 60
CSRF_FIELD = "csrf_token"
STATIC_ENDPOINT = "consent_web.static"
_SECOND_US = 1_000_000

View = TypeVar("View", bound=Callable[..., Any])


@dataclass(frozen=True)
class Session:
    id_hash: str
    patient_id: str
    csrf: str
    lang: str | None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# -- the rows ------------------------------------------------------------------------------------


def live_patient(patient_id: Any) -> ColumnElement[bool]:
    """The condition that `patient_id` names a Patient resource not deleted: only such a patient
    has a portal account or session."""
    return exists().where(resources.c.type == "Patient", resources.c.id == patient_id,
                          resources.c.deleted == false())


def start(conn: Connection, patient_id: str, lang: str | None, now_us: int) -> str:
    """Open a session for `patient_id`; returns the secret cookie value (only its hash is stored)."""
    secret = secrets.token_urlsafe(32)
    conn.execute(insert(web_sessions).values(id_hash=_digest(secret), patient_id=patient_id,
                                             csrf=secrets.token_urlsafe(32), lang=lang, created=now_us,
                                             last_seen=now_us))
    return secret


def resume(conn: Connection, secret: str, now_us: int) -> Session | None:
    """The live session of cookie value `secret`, its idle clock restarted; None (and the row
    deleted) when it has been idle longer than `IDLE_SECONDS` or its patient has been deleted."""
    id_hash = _digest(secret)
    row = conn.execute(select(web_sessions, live_patient(web_sessions.c.patient_id).label("live"))
                       .where(web_sessions.c.id_hash == id_hash)).first()
    if row is None:
        return None
    if now_us - row.last_seen > IDLE_SECONDS * _SECOND_US or not row.live:
        conn.execute(delete(web_sessions).where(web_sessions.c.id_hash == id_hash))
        return None
    conn.execute(update(web_sessions).where(web_sessions.c.id_hash == id_hash).values(last_seen=now_us))
    return Session(id_hash, row.patient_id, row.csrf, row.lang)


def end(conn: Connection, id_hash: str) -> None:
    conn.execute(delete(web_sessions).where(web_sessions.c.id_hash == id_hash))


def end_all(conn: Connection, patient_id: str) -> int:
    """End every session of the patient, on every device; returns how many there were."""
    return conn.execute(delete(web_sessions).where(web_sessions.c.patient_id == patient_id)).rowcount


def prune(conn: Connection, now_us: int) -> int:
    """Delete every session idle longer than `IDLE_SECONDS` (abandoned ones included); returns how many."""
    return conn.execute(delete(web_sessions).where(
        web_sessions.c.last_seen < now_us - IDLE_SECONDS * _SECOND_US)).rowcount


def remember_language(conn: Connection, id_hash: str, lang: str) -> None:
    conn.execute(update(web_sessions).where(web_sessions.c.id_hash == id_hash).values(lang=lang))


# -- the request -----------------------------------------------------------------------------------


def current_session() -> Session | None:
    return g.get("portal_session")


def current_patient() -> str:
    """The signed-in patient's id, from the session row (never from the URL or a form)."""
    session = current_session()
    if session is None:
        raise SessionExpired()
    return session.patient_id


def signed_in(view: View) -> View:
    """Declare a portal view for signed-in patients only: without a live session, a GET is sent
    to the sign-in page and a POST gets the "session expired" page (see `check_request`)."""
    view.portal_access = "signed in"  # type: ignore[attr-defined]
    return view


def public(view: View) -> View:
    """Declare a portal view open without a session (sign-in, invitations, signed-out page)."""
    view.portal_access = "public"  # type: ignore[attr-defined]
    return view


def sign_in_as(conn: Connection, patient_id: str, lang: str | None, now_us: int) -> None:
    """Replace the request's session (if any) by a new one for `patient_id`, under a new id; the
    sessions every patient abandoned (idle too long) are deleted on the way."""
    previous = current_session()
    if previous is not None:
        end(conn, previous.id_hash)
    prune(conn, now_us)
    g.portal_cookie = start(conn, patient_id, lang, now_us)
    g.portal_session = None


def sign_out(conn: Connection, *, everywhere: bool = False) -> None:
    """End the request's session (or, `everywhere`, every session of its patient) and drop the cookie."""
    session = current_session()
    if session is not None:
        if everywhere:
            end_all(conn, session.patient_id)
        else:
            end(conn, session.id_hash)
    g.portal_cookie = ""
    g.portal_session = None


def _form_nonce() -> str:
    """The pre-session nonce of this browser, created (and set as a cookie) when it has none."""
    nonce = g.get("portal_form_nonce") or request.cookies.get(FORM_COOKIE)
    if not nonce:
        nonce = secrets.token_urlsafe(32)
    g.portal_form_nonce = nonce
    return nonce


def csrf_token() -> str:
    """The token a form of this page must send back: the session's, or the pre-session nonce."""
    session = current_session()
    return session.csrf if session is not None else _form_nonce()


def csrf_field() -> Markup:
    """The hidden input carrying the CSRF token; put `{{ csrf_field() }}` in every form."""
    return Markup('<input type="hidden" name="%s" value="%s">') % (CSRF_FIELD, escape(csrf_token()))


def _expected_csrf() -> str | None:
    session = current_session()
    return session.csrf if session is not None else request.cookies.get(FORM_COOKIE)


def check_request() -> Response | None:
    """The blueprint's before_request: resume the session, apply a language switch, refuse a view
    that declares no access, enforce `@signed_in`, and check the CSRF token of every POST.
    Static files are served without looking at the session."""
    if request.endpoint == STATIC_ENDPOINT:
        return None
    secret = request.cookies.get(COOKIE)
    chosen = i18n.chosen_language()
    session = None
    if secret or chosen:
        with db.write() as conn:
            session = resume(conn, secret, db.now_us()) if secret else None
            if session is not None and chosen and chosen != session.lang:
                remember_language(conn, session.id_hash, chosen)
    if secret and session is None:
        g.portal_cookie = ""  # a dead session: drop the cookie
    g.portal_session = session
    access = _declared_access()
    if access == "signed in" and session is None:
        if request.method in ("GET", "HEAD"):
            return redirect(url_for("consent_web.signin"))
        raise SessionExpired()
    if request.method == "POST":
        expected, sent = _expected_csrf(), request.form.get(CSRF_FIELD, "")
        if not expected or not hmac.compare_digest(expected.encode(), sent.encode()):
            raise FormExpired()
    return None


class UndeclaredPortalView(LookupError):
    """A portal view without `@signed_in` or `@public`: a programming error, answered 500."""


def _declared_access() -> str:
    view = current_app.view_functions.get(request.endpoint or "")
    access = getattr(view, "portal_access", None)
    if access is None:
        raise UndeclaredPortalView(f"portal view {request.endpoint!r} is neither @signed_in nor @public")
    return access


def _secure() -> bool:
    return request.is_secure or current_app.config["BASE_URL"].startswith("https://")


def write_cookies(response: Response) -> Response:
    """The blueprint's after_request: set or drop the session cookie, the form nonce, the language."""
    secure = _secure()
    flags: dict[str, Any] = {"path": COOKIE_PATH, "httponly": True, "samesite": "Lax", "secure": secure}
    cookie = g.get("portal_cookie")
    if cookie:
        response.set_cookie(COOKIE, cookie, **flags)
    elif cookie == "":
        response.delete_cookie(COOKIE, **flags)
    nonce = g.get("portal_form_nonce")
    if nonce and nonce != request.cookies.get(FORM_COOKIE):
        response.set_cookie(FORM_COOKIE, nonce, **flags)
    chosen = i18n.chosen_language()
    if chosen and chosen != request.cookies.get(i18n.COOKIE):
        response.set_cookie(i18n.COOKIE, chosen, max_age=i18n.COOKIE_SECONDS, **flags)
    return response
