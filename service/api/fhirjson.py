"""FHIR JSON on the wire: content negotiation, body parsing, responses, and the public base
URL that absolute links and token audiences are built on.

The base is `PASSERELLE_BASE_URL` whatever a request's `Host` says. Without it, only
loopback hosts are served and the base is the request's own, so a forged `Host` can
never choose a link target or a token audience (`check_host`).
"""
from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

import orjson
from flask import Response, current_app, request

from service.config import host_name
from service.errors import InvalidRequest, UnsupportedMediaType
from service.limits import check_depth

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
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from exc
    check_depth(body)
    return body


def base_url() -> str:
    """The public base of this server (scheme://host[:port]), for absolute links."""
    return current_app.config["BASE_URL"] or request.host_url.rstrip("/")


def _is_loopback(name: str) -> bool:
    try:
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _name(host: str) -> str | None:
    """`Example.org:8443` → `example.org`, `[::1]:80` → `::1`; None when there is no host."""
    return host_name(urlsplit(f"//{host}").hostname or "")


def check_host() -> None:
    """Refuse (400) a request whose `Host` is neither the base URL's host nor a trusted host
    (PASSERELLE_TRUSTED_HOSTS), or, without a base URL, not a loopback host. Any port."""
    # werkzeug leaves a malformed Host empty; the refusal shows what was sent.
    name, shown = _name(request.host), request.headers.get("Host", "")
    base = current_app.config["BASE_URL"]
    if not base:
        if name is None or not _is_loopback(name):
            raise InvalidRequest(f"Host {shown!r} is refused: without PASSERELLE_BASE_URL only loopback hosts "
                                 "(localhost, 127.0.0.1, [::1]) are served; set PASSERELLE_BASE_URL to this "
                                 "server's public URL")
    elif name is None or name not in (_name(urlsplit(base).netloc), *current_app.config["EXTRA_HOSTS"]):
        raise InvalidRequest(f"Host {shown!r} is refused: this server answers as {base} (PASSERELLE_BASE_URL); "
                             "add the host name to PASSERELLE_TRUSTED_HOSTS to accept it")
