"""FHIR JSON on the wire: content negotiation, body parsing and responses."""
from __future__ import annotations

from typing import Any

import orjson
from flask import Response, current_app, request

from service.errors import InvalidRequest, UnsupportedMediaType

FHIR_JSON = "application/fhir+json"
_ACCEPTED_BODY_TYPES = {FHIR_JSON, "application/json", "application/json+fhir"}
_FORMAT_ALIASES = {"json", FHIR_JSON, "application/json", "application/json+fhir"}


def fhir_response(body: Any, status: int = 200, *, headers: dict[str, str] | None = None) -> Response:
    """Serialise a FHIR resource (a dict) as `application/fhir+json`."""
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    response = Response(payload, status=status, mimetype=FHIR_JSON)
    response.headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def check_format() -> None:
    """Refuse `_format` values and Accept headers that ask for something other than JSON."""
    fmt = request.args.get("_format")
    if fmt is not None and fmt not in _FORMAT_ALIASES:
        raise UnsupportedMediaType(f"_format {fmt!r} is not supported; only FHIR JSON is served")


def parse_body() -> Any:
    """Parse a JSON request body, refusing other media types and malformed JSON."""
    mimetype = request.mimetype
    if mimetype not in _ACCEPTED_BODY_TYPES:
        shown = mimetype or "none"
        raise UnsupportedMediaType(
            f"Content-Type {shown!r} is not supported; send application/fhir+json or application/json")
    data = request.get_data(cache=False)
    if not data:
        raise InvalidRequest("The request body is empty")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from exc


def base_url() -> str:
    """The public base of this server (scheme://host[:port]), for absolute links."""
    return current_app.config["BASE_URL"] or request.host_url.rstrip("/")
