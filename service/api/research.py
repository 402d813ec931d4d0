"""The research FHIR API at `/research/fhir`: read-only, consented, de-identified.

Views only translate HTTP to `service/release.py`, the one gate every research
output passes through; they never query the store themselves.
"""
from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint, Response, current_app, g, request, stream_with_context

from consent import engine
from service import aggregate, auth, db, export
from service.api import capability
from service.api.fhirjson import base_url, check_format, fhir_response, parse_body
from service.api.searchset import run_search
from service.errors import ExportFailed, Forbidden, Gone, InvalidRequest, MethodNotAllowed, NotFound, TooManyRequests
from service.release import Release, open_release, patients_of, research_capability_types, research_param_allowed
from service.store.search import RESULT_PARAMS
from service.validation import check_type

bp = Blueprint("research", __name__)
ROLE = "research"


@bp.before_request
def _authenticate() -> None:
    check_format()
    if request.endpoint != "research.metadata":
        auth.require(ROLE)
        resource_type = (request.view_args or {}).get("resource_type")
        if resource_type:
            auth.require_scope(resource_type, "s" if request.endpoint == "research.search_type" else "r")
        elif request.method == "GET" or request.endpoint == "research.aggregate_operation":
            auth.require_scope("*", "s")  # exports and aggregates reach every type


def _base() -> str:
    return f"{base_url()}/research/fhir"


def _release(conn: Any) -> Release:
    principal = g.principal
    return open_release(conn, principal.client_id, principal.project_id, engine.RECORD)


@bp.get("/metadata")
def metadata() -> Response:
    return fhir_response(capability.statement(_base(), writable=False, types=research_capability_types(),
                                              description="Passerelle research view: consented, de-identified",
                                              accepts=research_param_allowed))


@bp.route("", methods=["POST", "PUT", "DELETE", "PATCH"])
@bp.route("/<path:_rest>", methods=["POST", "PUT", "DELETE", "PATCH"])
def read_only(_rest: str = "") -> Response:
    if request.method == "POST" and _rest.endswith("/_search"):
        return search_type(_rest[: -len("/_search")])
    raise MethodNotAllowed("The research API is read-only", headers={"Allow": "GET"})


def _search_args() -> list[tuple[str, str]]:
    args = list(request.args.items(multi=True))
    if request.method == "POST":
        args += list(request.form.items(multi=True))
    return [(k, v) for k, v in args if k != "_format"]


@bp.get("/<resource_type>")
def search_type(resource_type: str) -> Response:
    check_type(resource_type)
    args = _search_args()
    echo = [(k, v) for k, v in args if k.partition(":")[0] not in ("_cursor", "_pretty") and
            (k.partition(":")[0] not in RESULT_PARAMS or k in ("_count", "_total", "_summary", "_include"))]
    released: list[Any] = []
    with db.read() as conn:
        release = _release(conn)
        release.require_type(resource_type)
        real = release.translate(conn, resource_type, args)
        body = run_search(conn, resource_type, real, base=_base(), view=f"project:{release.project.project_id}",
                          strict=True, render=release.render(conn, _base(), released),
                          restrict=release.records_filter(), echo=echo)
    release.audit("search", {"type": resource_type, "query": echo}, patients_of(released), len(released))
    return fhir_response(body)


def _visible(resource_type: str, pseudonym: str, version: int | None = None) -> Response:
    with db.read() as conn:
        release = _release(conn)
        release.require_type(resource_type)
        row = release.visible_row(conn, resource_type, pseudonym, version)
        if row is None:
            raise NotFound(f"{resource_type}/{pseudonym} is not known")
        resource = release.deidentify(conn, [row])[0]
    release.audit("read", {"type": resource_type, "id": pseudonym, "version": version}, patients_of([row]), 1)
    return fhir_response(resource)


@bp.get("/<resource_type>/<pseudonym>")
def read(resource_type: str, pseudonym: str) -> Response:
    check_type(resource_type)
    return _visible(resource_type, pseudonym)


@bp.get("/<resource_type>/<pseudonym>/_history/<version>")
def vread(resource_type: str, pseudonym: str, version: str) -> Response:
    check_type(resource_type)
    if not version.isdigit():
        raise NotFound(f"{resource_type}/{pseudonym} is not known")
    return _visible(resource_type, pseudonym, int(version))


@bp.post("/$aggregate")
def aggregate_operation() -> Response:
    """A differentially private answer (README, "$aggregate"); ε is spent before it is computed."""
    body = parse_body()
    principal = g.principal
    if principal.project_id is None:
        raise Forbidden("This client is not bound to a research project")
    key = request.headers.get("Idempotency-Key")
    return fhir_response(aggregate.answer(principal.project_id, principal.client_id, body, key))


# -- Bulk Data $export ---------------------------------------------------------------------


def _kick_off(kind: str, group_id: str | None = None) -> Response:
    if "respond-async" not in request.headers.get("Prefer", ""):
        raise InvalidRequest("$export runs asynchronously: send the header Prefer: respond-async")
    params = [(k, v) for k, v in request.args.items(multi=True) if k != "_format"]
    with db.write() as conn:
        job_id = export.kick_off(conn, _release(conn), kind=kind, group_id=group_id, params=params,
                                 request_url=request.url)
    return fhir_response(b"", 202, headers={"Content-Location": f"{_base()}/_export/{job_id}"})


@bp.get("/$export")
def export_system() -> Response:
    return _kick_off("system")


@bp.get("/Patient/$export")
def export_patients() -> Response:
    return _kick_off("patient")


@bp.get("/Group/<group_id>/$export")
def export_group(group_id: str) -> Response:
    return _kick_off("group", group_id)


def _job(job_id: str) -> export.Job:
    with db.read() as conn:
        return export.get(conn, job_id, g.principal.project_id or "")


@bp.get("/_export/<job_id>")
def export_status(job_id: str) -> Response:
    job = _job(job_id)
    interval = current_app.config["EXPORT_POLL_SECONDS"]
    wait = {"Retry-After": str(max(1, int(interval)))}
    if job.last_poll is not None and db.now_us() - job.last_poll < interval * 1_000_000:
        raise TooManyRequests(f"Poll at most every {interval} seconds", headers=wait)
    with db.write() as conn:
        export.note_poll(conn, job_id)
        if job.state == "completed":
            body = export.manifest(conn, job, f"{_base()}/_export/{job_id}/file/{{}}")
            return Response(orjson.dumps(body), 200, mimetype="application/json")
    if job.state == "failed":
        raise ExportFailed(job.error or "The export failed")
    if job.state == "expired":
        raise Gone(f"The files of export job {job_id} have expired; start a new export")
    return fhir_response(b"", 202, headers={**wait, "X-Progress": job.progress or job.state})


@bp.delete("/_export/<job_id>")
def export_cancel(job_id: str) -> Response:
    job = _job(job_id)
    with db.write() as conn:
        export.cancel(conn, job)
    return fhir_response(b"", 202)


@bp.get("/_export/<job_id>/file/<int:file_no>")
def export_file(job_id: str, file_no: int) -> Response:
    parts = export.file_parts(db.engine(), _job(job_id), file_no)
    return Response(stream_with_context(parts), 200, mimetype="application/fhir+ndjson")
