"""FHIR JSON on the wire: content negotiation, body parsing, responses, and the public base
URL that absolute links and token audiences are built on.

Only FHIR R4 JSON is spoken: an `Accept` header or `_format` that admits no JSON type (XML,
Turtle, HTML…) or only another FHIR version (`fhirVersion=4.3`) is answered 406, a body whose
`Content-Type` is not JSON or names another version 415. `fhirVersion` is `4.0` (as the
specification writes it) or `4.0.1`.

The base is `PASSERELLE_BASE_URL` whatever a request's `Host` says. Without it, only
loopback hosts are served and the base is the request's own, so a forged `Host` can
never choose a link target or a token audience (`check_host`).
"""
from __future__ import annotations

import ipaddress
from collections.abc import Collection
from typing import Any
from urllib.parse import urlsplit

import orjson
from flask import Response, current_app, request

from service.config import host_name
from service.errors import InvalidRequest, NotAcceptable, UnsupportedMediaType
from service.limits import check_depth

FHIR_JSON = "application/fhir+json"
_ACCEPTED_BODY_TYPES = {FHIR_JSON, "application/json", "application/json+fhir"}
_FORMAT_ALIASES = {"json", FHIR_JSON, "application/json", "application/json+fhir"}
#: What the APIs write: FHIR JSON, plain JSON (the Bulk Data manifest) and NDJSON (export files).
_SERVED = frozenset({*_ACCEPTED_BODY_TYPES, "application/fhir+ndjson", "application/ndjson"})
#: The FHIR versions this server speaks, as a `fhirVersion` media-type parameter names them.
FHIR_VERSIONS = frozenset({"4.0", "4.0.1"})


def _media_range(text: str) -> tuple[str, dict[str, str]]:
    """`application/fhir+json; fhirVersion=4.0` → ("application/fhir+json", {"fhirversion": "4.0"})."""
    kind, *params = text.split(";")
    parsed = {}
    for param in params:
        name, _, value = param.partition("=")
        parsed[name.strip().lower()] = value.strip().strip('"')
    return kind.strip().lower(), parsed


def _version_ok(params: dict[str, str]) -> bool:
    return params.get("fhirversion", "4.0") in FHIR_VERSIONS


def _acceptable(kind: str, params: dict[str, str]) -> bool:
    try:
        if float(params.get("q", "1")) <= 0:
            return False
    except ValueError:
        return False
    if not _version_ok(params):
        return False
    if kind in ("*/*", "application/*"):
        return True
    return kind in _SERVED


def fhir_response(body: Any, status: int = 200, *, headers: dict[str, str] | None = None) -> Response:
    """Serialise a FHIR resource (a dict) as `application/fhir+json`."""
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    response = Response(payload, status=status, mimetype=FHIR_JSON)
    response.headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def check_format() -> None:
    """Refuse (406) a `_format` or an `Accept` header that admits no FHIR R4 JSON."""
    fmt = request.args.get("_format")
    if fmt is not None:
        kind, params = _media_range(fmt.replace(" ", "+"))  # an unencoded `+` arrives as a space
        if kind not in _FORMAT_ALIASES or not _version_ok(params):
            raise NotAcceptable(f"_format {fmt[:100]!r} is not served; only FHIR R4 JSON is (_format=json)")
    accept = request.headers.get("Accept", "").strip()
    if accept and not any(_acceptable(*_media_range(item)) for item in accept.split(",") if item.strip()):
        raise NotAcceptable(f"Accept {accept[:200]!r} admits nothing this server writes: only FHIR R4 JSON "
                            "(application/fhir+json, fhirVersion 4.0) is served")


def parse_body(accepted: Collection[str] = _ACCEPTED_BODY_TYPES,
               expected: str = "application/fhir+json or application/json") -> Any:
    """Parse a JSON request body, refusing media types other than `accepted` (naming the `expected`
    ones) and malformed JSON."""
    mimetype = request.mimetype
    if mimetype not in accepted:
        shown = mimetype or "none"
        raise UnsupportedMediaType(f"Content-Type {shown!r} is not supported; send {expected}")
    version = _media_range(request.content_type or "")[1].get("fhirversion")
    if version is not None and version not in FHIR_VERSIONS:
        raise UnsupportedMediaType(f"Content-Type names fhirVersion {version[:20]!r}; this server speaks FHIR R4 "
                                   "(fhirVersion=4.0)")
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
