"""The custodian FHIR API at `/fhir`: full CRUD, history, search and Bundles, identified.

Views are thin: parse the request, call the store inside one transaction, render.
"""
from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl

from flask import Blueprint, Response, request
from sqlalchemy import Connection

from consent.materialise import overruled_warnings
from service import bundles, db
from service.api import capability, scopes
from service.api.fhirjson import base_url, check_format, fhir_response, parse_body
from service.api.searchset import render_stored, run_search
from service.bundles import parse_if_match
from service.errors import InvalidRequest, PreconditionFailed, operation_outcome
from service.store import repository
from service.store.repository import Stored
from service.store.search import custodian_view, matching_ids
from service.validation import check_type, validate, version_number

bp = Blueprint("custodian", __name__)

ROLE = "custodian"


# Tokens and scopes are checked for every route by service/api/scopes.py.
bp.before_request(check_format)


def _base() -> str:
    return f"{base_url()}/fhir"


def _http_date(us: int) -> str:
    return format_datetime(datetime.fromtimestamp(us / 1e6, tz=UTC), usegmt=True)


def _version_headers(stored: Stored) -> dict[str, str]:
    return {"ETag": stored.etag, "Last-Modified": _http_date(stored.last_updated)}


def _warning(conn: Connection, stored: Stored) -> str | None:
    """A written Consent's warning when a more recent Consent governs instead (README, "Consent")."""
    return overruled_warnings(conn, [stored.resource()])[0] if stored.type == "Consent" else None


def _written(stored: Stored, status: int, warning: str | None = None) -> Response:
    """Answer a create/update as the client's `Prefer: return=` asks (representation by default);
    a `warning` is an issue of the OperationOutcome that `return=OperationOutcome` asks for."""
    headers = _version_headers(stored)
    headers["Location"] = f"{_base()}/{stored.type}/{stored.id}/_history/{stored.version}"
    prefer = request.headers.get("Prefer", "")
    if "return=minimal" in prefer:
        return fhir_response(b"", status, headers=headers)
    if "return=OperationOutcome" in prefer:
        outcome = operation_outcome(f"{stored.type}/{stored.id} stored as version {stored.version}",
                                    code="informational", severity="information")
        if warning:
            outcome["issue"].append(operation_outcome(warning, code="business-rule", severity="warning")["issue"][0])
        return fhir_response(outcome, status, headers=headers)
    return fhir_response(stored.json, status, headers=headers)


def _strict() -> bool:
    return "handling=lenient" not in request.headers.get("Prefer", "")


def _search_args() -> list[tuple[str, str]]:
    args = list(request.args.items(multi=True))
    if request.method == "POST":
        if request.mimetype != "application/x-www-form-urlencoded":
            raise InvalidRequest("POST _search takes an application/x-www-form-urlencoded body")
        args += parse_qsl(request.get_data(as_text=True), keep_blank_values=True)
    return [(k, v) for k, v in args if k != "_format"]


@bp.get("/metadata")
def metadata() -> Response:
    return fhir_response(capability.statement(_base()))


@bp.post("")
@bp.post("/")
def bundle() -> Response:
    body = parse_body()
    scopes.require_bundle_entries(body)
    base = _base()

    def read_search(resource_type: str, args: list[tuple[str, str]]) -> dict[str, Any]:
        with db.read() as conn:
            return run_search(conn, resource_type, args, base=base, view=ROLE, strict=True,
                              render=render_stored(base), restrict=custodian_view)

    with db.write() as conn:
        result = bundles.process(conn, body, read_search)
    return fhir_response(result)


@bp.get("/<resource_type>")
@bp.post("/<resource_type>/_search")
def search_type(resource_type: str) -> Response:
    check_type(resource_type)
    args = _search_args()
    with db.read() as conn:
        return fhir_response(run_search(conn, resource_type, args, base=_base(), view=ROLE, strict=_strict(),
                                        render=render_stored(_base()), restrict=custodian_view))


@bp.post("/<resource_type>")
def create(resource_type: str) -> Response:
    check_type(resource_type)
    resource = parse_body()
    validate(resource, resource_type)
    condition = request.headers.get("If-None-Exist")
    with db.write() as conn:
        if condition:
            found = matching_ids(conn, resource_type, parse_qsl(condition.lstrip("?"), keep_blank_values=True))
            if len(found) > 1:
                raise PreconditionFailed(f"If-None-Exist: more than one {resource_type} matches")
            if found:
                return _written(repository.read(conn, resource_type, found[0]), 200)
        stored = repository.create(conn, resource_type, resource)
        warning = _warning(conn, stored)
    return _written(stored, 201, warning)


@bp.get("/<resource_type>/<resource_id>")
def read(resource_type: str, resource_id: str) -> Response:
    check_type(resource_type)
    with db.read() as conn:
        stored = repository.read(conn, resource_type, resource_id)
    if request.headers.get("If-None-Match") == stored.etag:
        return fhir_response(b"", 304, headers=_version_headers(stored))
    return fhir_response(stored.json, headers=_version_headers(stored))


@bp.put("/<resource_type>/<resource_id>")
def update(resource_type: str, resource_id: str) -> Response:
    check_type(resource_type)
    resource = parse_body()
    validate(resource, resource_type)
    if_match = parse_if_match(request.headers.get("If-Match"))
    with db.write() as conn:
        stored, created = repository.update(conn, resource_type, resource_id, resource, if_match)
        warning = _warning(conn, stored)
    return _written(stored, 201 if created else 200, warning)


@bp.delete("/<resource_type>/<resource_id>")
def delete(resource_type: str, resource_id: str) -> Response:
    check_type(resource_type)
    if_match = parse_if_match(request.headers.get("If-Match"))
    with db.write() as conn:
        stored = repository.remove(conn, resource_type, resource_id, if_match)
    headers = {"ETag": stored.etag} if stored else {}
    return fhir_response(b"", 204, headers=headers)


@bp.get("/<resource_type>/<resource_id>/_history")
def history(resource_type: str, resource_id: str) -> Response:
    check_type(resource_type)
    with db.read() as conn:
        versions = repository.instance_history(conn, resource_type, resource_id)
    base = _base()
    entries = []
    for stored in versions:
        url = f"{resource_type}/{resource_id}"
        entry: dict[str, Any] = {"fullUrl": f"{base}/{url}"}
        if not stored.deleted:
            entry["resource"] = stored.resource()
        entry["request"] = {"method": stored.method, "url": url if stored.method != "POST" else resource_type}
        entry["response"] = {"status": "200 OK" if not stored.deleted else "204 No Content",
                             "etag": stored.etag, "lastModified": stored.last_modified}
        entries.append(entry)
    return fhir_response({"resourceType": "Bundle", "type": "history", "total": len(entries),
                          "link": [{"relation": "self", "url": f"{base}/{resource_type}/{resource_id}/_history"}],
                          "entry": entries})


@bp.get("/<resource_type>/<resource_id>/_history/<version>")
def vread(resource_type: str, resource_id: str, version: str) -> Response:
    check_type(resource_type)
    number = version_number(version, f"{resource_type}/{resource_id}")
    with db.read() as conn:
        stored = repository.vread(conn, resource_type, resource_id, number)
    return fhir_response(stored.json, headers=_version_headers(stored))
