"""Security headers on every response; a surface that sets its own (the consent portal's strict
CSP, consent/web) keeps them."""
from __future__ import annotations

from flask import Flask, Response, current_app, request

#: For HTML that sets no policy of its own: nothing loads, nothing frames it.
DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
#: One year, the usual HSTS preload minimum.
HSTS = "max-age=31536000; includeSubDomains"


def secure(response: Response) -> Response:
    """`nosniff` always; HSTS when the request came over HTTPS (directly, or through a trusted proxy
    that says so) or the public base URL is https; a restrictive CSP on HTML without one."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if request.is_secure or current_app.config["BASE_URL"].startswith("https://"):
        response.headers.setdefault("Strict-Transport-Security", HSTS)
    if response.mimetype == "text/html":
        response.headers.setdefault("Content-Security-Policy", DEFAULT_CSP)
    return response


def init_app(app: Flask) -> None:
    app.after_request(secure)
