"""The research FHIR API at `/research/fhir`: read-only, consented, de-identified.

Views only translate HTTP to `service/release.py`, the one gate every research
output passes through; they never query the store themselves.
"""
from __future__ import annotations

import orjson
from flask import Blueprint, Response, current_app, g, request, stream_with_context

from consent import engine
from service import aggregate, export, training
from service.api import capability
from service.api.fhirjson import base_url, check_format, fhir_response, parse_body
from service.api.operations import budget_parameters
from service.errors import InvalidRequest, MethodNotAllowed
from service.release import (
    RESEARCH_RESULT_PARAMS,
    Release,
    caller_release,
    record_release,
    research_capability_types,
    research_param_allowed,
)
from service.validation import check_type, version_number

bp = Blueprint("research", __name__)


# Tokens and scopes are checked for every route by service/api/scopes.py.
bp.before_request(check_format)


def _base() -> str:
    return f"{base_url()}/research/fhir"


def _records() -> Release:
    """The caller's record-level release (refused for aggregate-only or closed projects)."""
    return caller_release(g.principal, engine.RECORD)


@bp.get("/metadata")
def metadata() -> Response:
    return fhir_response(capability.statement(_base(), types=research_capability_types(),
                                              description="Passerelle research view: consented, de-identified",
                                              accepts=research_param_allowed,
                                              result_params=RESEARCH_RESULT_PARAMS, api="research"))


@bp.route("", methods=["POST", "PUT", "DELETE", "PATCH"])
@bp.route("/<path:_rest>", methods=["POST", "PUT", "DELETE", "PATCH"])
def read_only(_rest: str = "") -> Response:
    raise MethodNotAllowed("The research API is read-only", headers={"Allow": "GET"})


def _search_args() -> list[tuple[str, str]]:
    args = list(request.args.items(multi=True))
    if request.method == "POST":
        args += list(request.form.items(multi=True))
    return [(k, v) for k, v in args if k != "_format"]


@bp.get("/<resource_type>")
@bp.post("/<resource_type>/_search")
def search_type(resource_type: str) -> Response:
    check_type(resource_type)
    with record_release(g.principal) as release:
        return fhir_response(release.search(resource_type, _search_args(), _base()))


@bp.get("/<resource_type>/<pseudonym>")
def read(resource_type: str, pseudonym: str) -> Response:
    check_type(resource_type)
    with record_release(g.principal) as release:
        return fhir_response(release.read(resource_type, pseudonym))


@bp.get("/<resource_type>/<pseudonym>/_history/<version>")
def vread(resource_type: str, pseudonym: str, version: str) -> Response:
    check_type(resource_type)
    number = version_number(version, f"{resource_type}/{pseudonym}")
    with record_release(g.principal) as release:
        return fhir_response(release.read(resource_type, pseudonym, number))


@bp.post("/$aggregate")
def aggregate_operation() -> Response:
    """A differentially private answer (README, "$aggregate"); ε is reserved before it is computed."""
    body = parse_body()
    release = caller_release(g.principal, engine.AGGREGATE)
    return fhir_response(aggregate.answer(release, body, request.headers.get("Idempotency-Key")))


@bp.post("/$train")
def train_operation() -> Response:
    """A differentially private model (README, "$train"); ε is reserved before it is trained."""
    body = parse_body()
    release = caller_release(g.principal, engine.AGGREGATE)
    return fhir_response(training.answer(release, body, request.headers.get("Idempotency-Key")))


@bp.get("/$budget")
def budget_operation() -> Response:
    """The caller's own project's privacy budget and its history with the questions asked; spends nothing."""
    release = caller_release(g.principal, engine.AGGREGATE)
    return fhir_response(budget_parameters(release.budget()))


# -- Bulk Data $export ---------------------------------------------------------------------


def _kick_off(kind: str, group_id: str | None = None) -> Response:
    """A GET kick-off takes its parameters from the query; a POST one from a Parameters body (the
    manifest's `request` is then the URL without them, as the Bulk Data IG says)."""
    if "respond-async" not in request.headers.get("Prefer", ""):
        raise InvalidRequest("$export runs asynchronously: send the header Prefer: respond-async")
    params = [(k, v) for k, v in request.args.items(multi=True) if k != "_format"]
    if request.method == "POST":
        params += export.parameters(parse_body())
    job_id = export.kick_off(_records(), kind=kind, group_id=group_id, params=params, request_url=request.url,
                             lenient="handling=lenient" in request.headers.get("Prefer", ""))
    return fhir_response(b"", 202, headers={"Content-Location": f"{_base()}/_export/{job_id}"})


@bp.route("/$export", methods=["GET", "POST"])
def export_system() -> Response:
    return _kick_off("system")


@bp.route("/Patient/$export", methods=["GET", "POST"])
def export_patients() -> Response:
    return _kick_off("patient")


@bp.route("/Group/<group_id>/$export", methods=["GET", "POST"])
def export_group(group_id: str) -> Response:
    return _kick_off("group", group_id)


@bp.get("/_export/<job_id>")
def export_status(job_id: str) -> Response:
    status = export.status(_records(), job_id, current_app.config["EXPORT_POLL_SECONDS"],
                           f"{_base()}/_export/{job_id}/file/{{}}")
    if status.manifest is not None:
        return Response(orjson.dumps(status.manifest), 200, mimetype="application/json")
    return fhir_response(b"", 202, headers=status.headers)


@bp.delete("/_export/<job_id>")
def export_cancel(job_id: str) -> Response:
    export.cancel(_records(), job_id)
    return fhir_response(b"", 202)


@bp.get("/_export/<job_id>/file/<int(max=2147483647):file_no>")  # file_no is an INTEGER column: no larger one exists
def export_file(job_id: str, file_no: int) -> Response:
    lines = _records().export_file(job_id, file_no)
    return Response(stream_with_context(lines), 200, mimetype="application/fhir+ndjson")
