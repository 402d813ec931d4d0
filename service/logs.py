"""Structured request logs: one JSON line per request on the `passerelle.requests` logger.

A line holds the request id, the method, the route template (`/fhir/<resource_type>/<id>`,
never the concrete path or its query string), the status, the duration and the authenticated
client's id: nothing a request carries about a patient (no path values, no parameters, no body).
"""
from __future__ import annotations

import json
import logging
import sys
import time

from flask import Flask, Response, g, request

from service import audit

log = logging.getLogger("passerelle.requests")


def fields(response: Response, seconds: float) -> dict[str, object]:
    """What the line of a request says about it (see the module docstring)."""
    principal = g.get("principal")
    rule = request.url_rule
    return {
        "request_id": audit.request_id(),
        "method": request.method,
        "route": rule.rule if rule is not None else None,
        "status": response.status_code,
        "duration_ms": round(seconds * 1000, 3),
        "client_id": principal.client_id if principal is not None else None,
    }


def _start() -> None:
    g.log_started = time.perf_counter()


def elapsed() -> float:
    """Seconds since this request's hooks began (0 when a hook registered before them refused it):
    the duration its log line and its metrics (service/metrics.py) give."""
    started = g.get("log_started")
    return 0.0 if started is None else time.perf_counter() - started


def _finish(response: Response) -> Response:
    if log.isEnabledFor(logging.INFO):
        log.info(json.dumps(fields(response, elapsed()), separators=(",", ":")))
    return response


def init_app(app: Flask) -> None:
    """Log every request of `app`; register first, so that the line is written after every other
    after_request hook (Flask runs them in reverse) and sees the final status and headers."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(app.config["LOG_LEVEL"].upper())
    app.before_request(_start)
    app.after_request(_finish)
