"""The patient consent portal: a blueprint of HTML pages under `/consent/`, in French and English.

Patients sign in with their own passphrase and a session cookie (consent/web/sessions.py), never
a bearer token: service/api/scopes.py leaves this blueprint's access to it. Every response under
`/consent/` carries the security headers of `SECURITY_HEADERS`, and every error there, whatever
raised it (a domain error, a refused Host, an unknown page), is an HTML page in the patient's
language with the error's status, never the API's JSON OperationOutcome.
"""
from __future__ import annotations

import logging
from urllib.parse import urlencode

from flask import Blueprint, Flask, render_template, request, url_for
from flask_babel import LazyString, lazy_gettext
from sqlalchemy.exc import OperationalError
from werkzeug import Response
from werkzeug.exceptions import HTTPException

from consent.web import i18n, sessions
from consent.web.errors import PageError
from service import db, errors

log = logging.getLogger(__name__)

PREFIX = "/consent"
bp = Blueprint("consent_web", __name__, url_prefix=PREFIX, template_folder="templates", static_folder="static")

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}

#: The largest body a portal request may send: its forms carry a few short fields.
MAX_BODY_BYTES = 16 * 1024

#: What the error page says for an error that carries no message for the patient, by status.
_GENERIC: dict[int, LazyString] = {
    400: lazy_gettext("Something in what was sent was not right, so nothing was changed."),
    403: lazy_gettext("You cannot use this page."),
    404: lazy_gettext("This page does not exist. Check the address, or go back to the start."),
    405: lazy_gettext("This page cannot be used that way."),
    413: lazy_gettext("What was sent is too large."),
    503: lazy_gettext("The service is busy. Please try again in a moment."),
}
_UNEXPECTED = lazy_gettext("Something went wrong on our side and nothing was changed. Please try again later.")


def in_portal(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def secure_headers(response: Response) -> Response:
    """The app's after_request: the security headers on every response under `/consent/`."""
    if in_portal(request.path):
        response.headers.update(SECURITY_HEADERS)
    return response


def error_page(status: int, message: LazyString | str, headers: dict[str, str] | None = None) -> Response:
    """The HTML page of a refusal, in the patient's language."""
    body = render_template("error.html", status=status, message=message)
    return Response(body, status=status, headers=headers, mimetype="text/html")


@bp.errorhandler(PageError)
def _page_error(exc: PageError) -> Response:
    return error_page(exc.status, exc.page_message, exc.headers)


@bp.errorhandler(errors.FhirError)
def _domain_error(exc: errors.FhirError) -> Response:
    # A domain error's own text is English and may name internal ids: the page says it in general words.
    return error_page(exc.status, _GENERIC.get(exc.status, _GENERIC[400] if exc.status < 500 else _UNEXPECTED),
                      exc.headers)


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    response = error_page(status, _GENERIC.get(status, _GENERIC[400] if status < 500 else _UNEXPECTED))
    allowed = getattr(exc, "valid_methods", None)
    if status == 405 and allowed:
        response.headers["Allow"] = ", ".join(allowed)
    return response


@bp.errorhandler(OperationalError)
def _database_error(exc: OperationalError) -> Response:
    if db.is_contention(exc):
        log.warning("database contention: %s", exc.orig)
        return error_page(503, _GENERIC[503], {"Retry-After": "1"})
    return _unexpected(exc)


@bp.errorhandler(Exception)
def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error in the consent portal")
    return error_page(500, _UNEXPECTED)


def _unrouted(exc: HTTPException) -> Response:
    """A 404 or 405 no route matched (so no blueprint handler applies): a page under `/consent/`,
    the API's OperationOutcome everywhere else."""
    return _http_error(exc) if in_portal(request.path) else errors.http_error_response(exc)


def language_url(lang: str) -> str:
    """This page in language `lang` (the switch link of every page): the same address with `?lang=`,
    or the start page when this page cannot be fetched again (a form's answer, an unknown page)."""
    if request.endpoint and request.method in ("GET", "HEAD") and request.url_rule is not None:
        # The query is carried as data, never as url_for's options (`_external`, `_scheme`, `_anchor`…).
        query = [(name, value) for name, value in request.args.items(multi=True) if name != "lang"]
        return f"{url_for(request.endpoint, **(request.view_args or {}))}?{urlencode([*query, ('lang', lang)])}"
    return url_for("consent_web.home" if sessions.current_session() else "consent_web.signin", lang=lang)


def init_app(app: Flask) -> None:
    """Register the portal on `app`: languages, the blueprint, headers and error pages."""
    i18n.init_app(app)
    app.register_blueprint(bp)
    app.after_request(secure_headers)
    app.register_error_handler(404, _unrouted)
    app.register_error_handler(405, _unrouted)
    app.jinja_env.globals.update(csrf_field=sessions.csrf_field, language_url=language_url,
                                 current_session=sessions.current_session, languages=i18n.LANGUAGES,
                                 page_language=i18n.page_language)


def limit_body() -> None:
    """The blueprint's first before_request: a body larger than `MAX_BODY_BYTES` is refused (413)
    before it is read."""
    request.max_content_length = MAX_BODY_BYTES


bp.before_request(limit_body)
bp.before_request(sessions.check_request)
bp.after_request(sessions.write_cookies)


from consent.web import views_account, views_consent  # noqa: E402,F401 - registers the pages
