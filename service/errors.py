"""Typed domain errors and the one handler that turns each into an OperationOutcome.

Domain code raises; views never build error responses by hand. No stack trace or
internal identifier ever reaches a client.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, current_app
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class FhirError(Exception):
    """An error with an HTTP status and an OperationOutcome issue code."""

    status = 400
    code = "invalid"

    def __init__(self, message: str, *, expression: str | None = None, headers: dict[str, str] | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message = message
        self.expression = expression
        self.headers = headers or {}
        if code is not None:  # a more precise issue code than the class's (e.g. `code-invalid`)
            self.code = code

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.message, code=self.code, expression=self.expression)


class InvalidRequest(FhirError):
    """Malformed JSON, a resource that fails the R4B model, a bad search parameter."""


class NotSupported(FhirError):
    code = "not-supported"


class Unauthorized(FhirError):
    status = 401
    code = "login"

    def __init__(self, message: str, **kwargs: Any):
        kwargs.setdefault("headers", {"WWW-Authenticate": 'Bearer realm="passerelle"'})
        super().__init__(message, **kwargs)


class Forbidden(FhirError):
    status = 403
    code = "forbidden"


class NotFound(FhirError):
    status = 404
    code = "not-found"


class MethodNotAllowed(FhirError):
    status = 405
    code = "not-supported"


class NotAcceptable(FhirError):
    """The client accepts no representation this server writes (FHIR JSON of R4)."""

    status = 406
    code = "not-supported"


class Gone(FhirError):
    status = 410
    code = "deleted"


class Conflict(FhirError):
    status = 409
    code = "conflict"


class PreconditionFailed(FhirError):
    status = 412
    code = "conflict"


class PayloadTooLarge(FhirError):
    status = 413
    code = "too-costly"


class TooCostly(FhirError):
    """A statistical answer whose computation ran past its time bound (`db.statistics_read`):
    the question as asked will not be answered, so retrying it unchanged does not help."""

    status = 422
    code = "too-costly"


class UnsupportedMediaType(FhirError):
    status = 415
    code = "not-supported"


class Unprocessable(FhirError):
    status = 422
    code = "processing"


class UnresolvedReference(FhirError):
    """A literal reference to a resource this server does not hold, or holds deleted (service/references.py)."""

    status = 422
    code = "not-found"


class TooManyRequests(FhirError):
    status = 429
    code = "throttled"


class ServiceUnavailable(FhirError):
    """A transient condition (a busy database, no running worker): the client may retry later."""

    status = 503
    code = "transient"


class ExportFailed(FhirError):
    """A Bulk Data job ended in failure (reported on its status URL)."""

    status = 500
    code = "exception"


def operation_outcome(message: str, *, code: str = "invalid", severity: str = "error",
                      expression: str | None = None) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": message}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


_HTTP_CODES = {401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
               406: "not-supported", 409: "conflict", 410: "deleted", 412: "conflict",
               413: "too-costly", 415: "not-supported", 429: "throttled"}


def http_error_response(exc: HTTPException) -> Response:
    """An HTTP error of the routing layer (404, 405, 413…) as an OperationOutcome."""
    from service.api.fhirjson import fhir_response

    status = exc.code or 500
    message = exc.description or exc.name
    if status == 413:
        message = f"Request body exceeds the limit of {current_app.config['MAX_CONTENT_LENGTH']} bytes"
    outcome = operation_outcome(message, code=_HTTP_CODES.get(status, "invalid" if status < 500 else "exception"))
    response = fhir_response(outcome, status)
    allowed = getattr(exc, "valid_methods", None)
    if status == 405 and allowed:
        response.headers["Allow"] = ", ".join(allowed)
    return response


def register(app: Flask) -> None:
    """Install the handlers that render every error as an OperationOutcome."""
    from service import db
    from service.api.fhirjson import fhir_response

    @app.errorhandler(FhirError)
    def _fhir_error(exc: FhirError) -> Response:
        return fhir_response(exc.outcome(), exc.status, headers=exc.headers)

    app.register_error_handler(HTTPException, http_error_response)

    @app.errorhandler(OperationalError)
    def _database_error(exc: OperationalError) -> Response:
        if not db.is_contention(exc):
            return _unexpected(exc)
        log.warning("database contention: %s", exc.orig)
        busy = ServiceUnavailable("The database is busy; retry in a moment", headers={"Retry-After": "1"})
        return fhir_response(busy.outcome(), busy.status, headers=busy.headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return fhir_response(operation_outcome("Internal server error", code="exception"), 500)
