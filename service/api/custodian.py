"""The custodian FHIR API at `/fhir`: full CRUD, history, search and Bundles, identified.

Views are thin: parse the request, call the store inside one transaction, render.
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl

from flask import Blueprint, Response, current_app, request
from sqlalchemy import Connection

from consent.materialise import overruled_warnings
from service import audit, auditevent, bundles, db, everything, history, patch, references
from service.api import capability, scopes
from service.api.fhirjson import base_url, check_format, fhir_response, parse_body
from service.api.searchset import Render, render_stored, run_search
from service.bundles import parse_if_match
from service.errors import InvalidRequest, MethodNotAllowed, NotFound, operation_outcome
from service.limits import check_bundle_entries, check_depth
from service.store import repository
from service.store.repository import Stored
from service.store.search import custodian_view
from service.validation import check_type, model_for, validate, version_number

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


def _about(stored: Stored) -> dict[str, Any]:
    """What an audit entry says of one resource version."""
    return {"type": stored.type, "id": stored.id, "version": stored.version}


def _patients(stored: Iterable[Stored]) -> set[str]:
    return {s.patient_id for s in stored if s.patient_id}


def _noting(render: Render, patients: set[str]) -> Render:
    """`render`, also noting the patients of the rows it renders (whom the audit entry names)."""
    def noted(rows: list[Any], mode: str) -> list[dict[str, Any]]:
        patients.update(row.patient_id for row in rows if row.patient_id)
        return render(rows, mode)
    return noted


def _bundle_entry(body: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The audit detail of a processed Bundle: its type, the types of its entries (those it wrote or
    read, found by the response's locations, and those its request URLs name) and their number."""
    types: set[str] = set()
    for item in result["entry"]:
        location = (item.get("response") or {}).get("location", "")
        resource = item.get("resource")
        if location.count("/") >= 1:
            types.add(location.partition("/")[0])
        elif isinstance(resource, dict) and resource.get("resourceType") not in (None, "Bundle"):
            types.add(resource["resourceType"])
    for entry in body.get("entry") or []:
        url = ((entry.get("request") or {}).get("url") if isinstance(entry, dict) else None) or ""
        name = url.partition("?")[0].strip("/").partition("/")[0]
        if model_for(name) is not None:
            types.add(name)
    return {"bundle": body.get("type"), "types": sorted(types), "entries": len(result["entry"])}


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
    return fhir_response(auditevent.advertise(capability.statement(_base())))


@bp.get("/AuditEvent")
@bp.post("/AuditEvent/_search")
def audit_event_search() -> Response:
    """The audit trail as AuditEvents, newest first (service/auditevent.py)."""
    query = auditevent.parse(_search_args(), current_app.config["DEFAULT_PAGE_SIZE"],
                             current_app.config["MAX_PAGE_SIZE"])
    with db.read() as conn:
        found = auditevent.search(conn, query, _base())
    # Reading the trail is an access too (the entries read are not named: they are about the trail).
    audit.disclosed({"type": "AuditEvent", "query": audit.conceal(_search_args(), audit.query_key()),
                     "resources": len(found.get("entry", ()))})
    return fhir_response(found)


@bp.get("/AuditEvent/<event_id>")
def audit_event_read(event_id: str) -> Response:
    with db.read() as conn:
        event = auditevent.read(conn, event_id)
    audit.disclosed({"type": "AuditEvent", "id": event_id, "resources": 1})
    return fhir_response(event)


@bp.route("/AuditEvent", methods=["POST", "PUT", "DELETE", "PATCH"])
@bp.route("/AuditEvent/<path:_rest>", methods=["POST", "PUT", "DELETE", "PATCH"])
def audit_event_write(_rest: str = "") -> Response:
    raise MethodNotAllowed("AuditEvent is read-only: only the server writes the audit trail",
                           headers={"Allow": "GET"})


@bp.post("")
@bp.post("/")
def bundle() -> Response:
    body = parse_body()
    check_bundle_entries(body)
    scopes.require_bundle_entries(body)
    base = _base()

    searched: set[str] = set()

    def read_search(resource_type: str, args: list[tuple[str, str]]) -> dict[str, Any]:
        with db.read() as conn:
            return run_search(conn, resource_type, args, base=base, view=ROLE, strict=True,
                              render=_noting(render_stored(base), searched), restrict=custodian_view)

    patients: set[str] = set()  # of the resources the Bundle wrote or read
    with db.write() as conn:
        result = bundles.process(conn, body, read_search, base, patients)
        audit.in_request(conn, _bundle_entry(body, result), patients | searched)
    return fhir_response(result)


@bp.get("/<resource_type>")
@bp.post("/<resource_type>/_search")
def search_type(resource_type: str) -> Response:
    check_type(resource_type)
    args = _search_args()
    patients: set[str] = set()
    with db.read() as conn:
        result = run_search(conn, resource_type, args, base=_base(), view=ROLE, strict=_strict(),
                            render=_noting(render_stored(_base()), patients), restrict=custodian_view)
    query = audit.conceal([(name, value) for name, value in args if name != "_cursor"], audit.query_key())
    audit.disclosed({"type": resource_type, "query": query, "resources": len(result.get("entry", ()))}, patients)
    return fhir_response(result)


def _condition() -> list[tuple[str, str]]:
    """The search of a conditional interaction on the type URL (`PUT /fhir/Patient?identifier=…`)."""
    return [(name, value) for name, value in request.args.items(multi=True) if name != "_format"]


@bp.post("/<resource_type>")
def create(resource_type: str) -> Response:
    """Create; conditional (never a duplicate) with `If-None-Exist`, or with the search on the URL
    itself as fhirpy's `get_or_create` sends it (`POST /fhir/Patient?identifier=…`)."""
    check_type(resource_type)
    resource = parse_body()
    validate(resource, resource_type)
    header, on_url = request.headers.get("If-None-Exist"), _condition()
    if header and on_url:
        raise InvalidRequest("A conditional create takes its search in If-None-Exist or on the URL, not both")
    condition = parse_qsl(header.lstrip("?"), keep_blank_values=True) if header else on_url
    with db.write() as conn:
        if condition:
            found = bundles.single_match(conn, resource_type, condition,
                                         "If-None-Exist" if header else "Conditional create", writing=True)
            if found:
                stored = repository.read(conn, resource_type, found)
                audit.in_request(conn, {**_about(stored), "existing": True}, _patients([stored]))
                return _written(stored, 200)
        references.settle(conn, [("", resource)], base=_base())
        stored = repository.create(conn, resource_type, resource)
        warning = _warning(conn, stored)
        audit.in_request(conn, _about(stored), _patients([stored]))
    return _written(stored, 201, warning)


def _not_modified(stored: Stored) -> bool:
    """Whether the read's `If-None-Match` or `If-Modified-Since` says the client has this version."""
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None:
        return stored.etag in {tag.strip() for tag in if_none_match.split(",")} or if_none_match.strip() == "*"
    since = request.headers.get("If-Modified-Since")
    if since:
        try:
            moment = parsedate_to_datetime(since)
        except (TypeError, ValueError, IndexError):
            return False  # an unparseable date is ignored, as HTTP says
        if moment.tzinfo is None:
            return False
        try:
            return stored.last_updated // 1_000_000 <= int(moment.timestamp())
        except (OverflowError, ValueError, OSError):
            return False
    return False


@bp.get("/<resource_type>/<resource_id>")
def read(resource_type: str, resource_id: str) -> Response:
    """Read; 304 when `If-None-Match` names the current version or it is no later than `If-Modified-Since`."""
    check_type(resource_type)
    with db.write() as conn:  # a point read: audited in the same short transaction
        stored = repository.read(conn, resource_type, resource_id)
        audit.in_request(conn, {**_about(stored), "version": None}, _patients([stored]))
    if _not_modified(stored):
        return fhir_response(b"", 304, headers=_version_headers(stored))
    return fhir_response(stored.json, headers=_version_headers(stored))


def _store(conn: Connection, resource_type: str, resource_id: str, resource: dict[str, Any],
           if_match: int | None, method: str = "PUT") -> tuple[Stored, bool]:
    """Check the references of an update (or update-as-create) and store it; returns (stored, created)."""
    references.settle(conn, [("", resource)], known={(resource_type, resource_id)}, base=_base())
    return repository.update(conn, resource_type, resource_id, resource, if_match, method)


def _updated(conn: Connection, stored: Stored, created: bool) -> Response:
    warning = _warning(conn, stored)
    audit.in_request(conn, _about(stored), _patients([stored]))
    return _written(stored, 201 if created else 200, warning)


@bp.put("/<resource_type>/<resource_id>")
def update(resource_type: str, resource_id: str) -> Response:
    check_type(resource_type)
    resource = parse_body()
    validate(resource, resource_type)
    if_match = parse_if_match(request.headers.get("If-Match"))
    with db.write() as conn:
        return _updated(conn, *_store(conn, resource_type, resource_id, resource, if_match))


@bp.put("/<resource_type>")
def conditional_update(resource_type: str) -> Response:
    """`PUT Type?search`: no match creates (under the body's id if it has one), one match is updated
    (the body's id, if any, must be that one's), several are 412."""
    check_type(resource_type)
    condition = _condition()
    if not condition:
        raise InvalidRequest(f"PUT /{resource_type} needs an id (PUT /{resource_type}/id) or a search "
                             f"(PUT /{resource_type}?identifier=…)")
    resource = parse_body()
    validate(resource, resource_type)
    if_match = parse_if_match(request.headers.get("If-Match"))
    with db.write() as conn:
        resource_id = bundles.conditional_update_id(conn, resource_type, condition, resource, "Conditional update")
        return _updated(conn, *_store(conn, resource_type, resource_id, resource, if_match))


@bp.delete("/<resource_type>/<resource_id>")
def delete(resource_type: str, resource_id: str) -> Response:
    check_type(resource_type)
    if_match = parse_if_match(request.headers.get("If-Match"))
    with db.write() as conn:
        stored = repository.remove(conn, resource_type, resource_id, if_match)
        audit.in_request(conn, {"type": resource_type, "id": resource_id,
                                "version": stored.version if stored else None})
    headers = {"ETag": stored.etag} if stored else {}
    return fhir_response(b"", 204, headers=headers)


@bp.delete("/<resource_type>")
def conditional_delete(resource_type: str) -> Response:
    """`DELETE Type?search`: deletes the one match (204 when nothing matches); several matches are
    412 (deleting several at once is not supported)."""
    check_type(resource_type)
    condition = _condition()
    if not condition:
        raise InvalidRequest(f"DELETE /{resource_type} needs a search (DELETE /{resource_type}?identifier=…)")
    if_match = parse_if_match(request.headers.get("If-Match"))
    with db.write() as conn:
        found = bundles.single_match(conn, resource_type, condition, "Conditional delete")
        stored = repository.remove(conn, resource_type, found, if_match) if found else None
        audit.in_request(conn, {"type": resource_type, "id": found,
                                "version": stored.version if stored else None})
    return fhir_response(b"", 204, headers={"ETag": stored.etag} if stored else {})


def _patch_body() -> tuple[Any, str]:
    """The PATCH document and its media type (service/patch.py says which it takes)."""
    body = parse_body(patch.MEDIA_TYPES, f"{patch.JSON_PATCH}, {patch.MERGE_PATCH} or a FHIRPath Patch "
                                         "(Parameters) as application/fhir+json")
    return body, request.mimetype


def _patched(conn: Connection, resource_type: str, resource_id: str, body: Any, mimetype: str) -> Response:
    current = repository.read(conn, resource_type, resource_id)
    if_match = parse_if_match(request.headers.get("If-Match"))
    resource = patch.apply(current.resource(), body, mimetype, max_bytes=current_app.config["MAX_CONTENT_LENGTH"])
    check_depth(resource)  # as an update's body is checked (service/limits.py)
    validate(resource, resource_type)
    # Without If-Match the version patched is the one read: a concurrent write in between is a 412.
    expected = current.version if if_match is None else if_match
    return _updated(conn, *_store(conn, resource_type, resource_id, resource, expected, "PATCH"))


@bp.patch("/<resource_type>/<resource_id>")
def patch_instance(resource_type: str, resource_id: str) -> Response:
    """PATCH with JSON Patch, FHIRPath Patch or JSON Merge Patch (service/patch.py); `If-Match`
    honoured; the result is validated and stored like any update."""
    check_type(resource_type)
    body, mimetype = _patch_body()
    with db.write() as conn:
        return _patched(conn, resource_type, resource_id, body, mimetype)


@bp.patch("/<resource_type>")
def conditional_patch(resource_type: str) -> Response:
    """`PATCH Type?search`: patches the one match; none is 404, several 412."""
    check_type(resource_type)
    condition = _condition()
    if not condition:
        raise InvalidRequest(f"PATCH /{resource_type} needs a search (PATCH /{resource_type}?identifier=…)")
    body, mimetype = _patch_body()
    with db.write() as conn:
        found = bundles.single_match(conn, resource_type, condition, "Conditional patch")
        if not found:
            raise NotFound(f"Conditional patch: no {resource_type} matches the search")
        return _patched(conn, resource_type, found, body, mimetype)


def _history(path: str, resource_type: str | None = None, resource_id: str | None = None) -> Response:
    """A page of history (service/history.py), audited with the patients it shows."""
    query = history.parse(_search_args(), default_count=current_app.config["DEFAULT_PAGE_SIZE"],
                          max_count=current_app.config["MAX_PAGE_SIZE"])
    with db.write() as conn:
        if resource_id is not None:
            assert resource_type is not None
            if not repository.current(conn, [(resource_type, resource_id)]):
                raise NotFound(f"{resource_type}/{resource_id} is not known")
        found, more = history.read(conn, query, resource_type, resource_id)
        audit.in_request(conn, {"type": resource_type, "id": resource_id, "resources": len(found)},
                         history.patients(found))
    return fhir_response(history.bundle(_base(), path, query, found, more))


@bp.get("/<resource_type>/<resource_id>/_history", endpoint="history")
def history_instance(resource_type: str, resource_id: str) -> Response:
    check_type(resource_type)
    return _history(f"/{resource_type}/{resource_id}/_history", resource_type, resource_id)


@bp.get("/<resource_type>/_history")
def history_type(resource_type: str) -> Response:
    check_type(resource_type)
    return _history(f"/{resource_type}/_history", resource_type)


@bp.get("/_history")
def history_system() -> Response:
    return _history("/_history")


@bp.get("/Patient/<patient_id>/$everything")
def patient_everything(patient_id: str) -> Response:
    """The patient's compartment (service/everything.py), paged, audited with the patient."""
    query = everything.parse(_search_args(), default_count=current_app.config["DEFAULT_PAGE_SIZE"],
                             max_count=current_app.config["MAX_PAGE_SIZE"])
    with db.write() as conn:
        repository.read(conn, "Patient", patient_id)  # 404 or 410 for a patient not (or no longer) here
        rows, included, more = everything.page(conn, patient_id, query)
        audit.in_request(conn, {"type": "Patient", "id": patient_id, "resources": len(rows) + len(included)},
                         {patient_id})
    return fhir_response(everything.bundle(_base(), f"/Patient/{patient_id}/$everything", query, rows, included,
                                           more))


@bp.get("/<resource_type>/<resource_id>/_history/<version>")
def vread(resource_type: str, resource_id: str, version: str) -> Response:
    check_type(resource_type)
    number = version_number(version, f"{resource_type}/{resource_id}")
    with db.write() as conn:
        stored = repository.vread(conn, resource_type, resource_id, number)
        audit.in_request(conn, _about(stored), _patients([stored]))
    return fhir_response(stored.json, headers=_version_headers(stored))
