"""The API contract: `/openapi.json` (OpenAPI 3.1) generated from the app's route table, and `/docs`.

`document` walks `app.url_map`: every route and method must have a row in `OPERATIONS`
(its summary, query parameters, headers and body), or it raises `Undescribed`, so a new
route without a description fails tests/test_openapi.py. Path parameters come from the
route itself; the responses from the surface the route belongs to (FHIR errors are
OperationOutcomes, the patient portal answers HTML, `/auth/token` OAuth JSON).

`/docs` renders the document with Swagger UI, whose static files come from the `swagger-ui-py`
package and are served from here: nothing is loaded from elsewhere, and the page runs no
inline script (its Content-Security-Policy allows only this server's scripts, `DOCS_CSP`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import swagger_ui
from flask import Blueprint, Flask, Response, current_app, jsonify, send_from_directory
from werkzeug.routing import Rule

from service.api import capability, scopes
from service.api.capability import SOFTWARE_VERSION
from service.release import research_capability_types

bp = Blueprint("openapi", __name__)

#: The directory of Swagger UI's static files, inside the installed package.
SWAGGER_UI = Path(swagger_ui.__file__).parent / "static"
#: Scripts only from here, none inline; Swagger UI 5 sets inline styles on the elements it renders,
#: so styles may be inline (the page shows no user input).
DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


class Undescribed(LookupError):
    """A route and method of the app with no row in `OPERATIONS`."""


@dataclass(frozen=True)
class Op:
    """What the route table cannot say about one route and method."""

    summary: str
    query: tuple[str, ...] = ()  # names in QUERY
    headers: tuple[str, ...] = ()  # names in HEADERS
    body: str | None = None  # a name in BODIES
    ok: str = "resource"  # a name in SUCCESS


_SEARCH = ("_count", "_sort", "_total", "_summary", "_include", "_revinclude", "_elements", "_format")
_EXPORT = ("_outputFormat", "_since", "_type", "_typeFilter", "patient")
_HISTORY = ("_count", "_since", "_at", "_lastUpdated")
_AUDIT = ("date", "agent", "patient", "entity-type", "subtype", "outcome", "_count")

OPERATIONS: dict[tuple[str, str], Op] = {
    # Discovery, health and this contract.
    ("GET", "/healthz"): Op("Health: the database answers, the master key is the one it was initialised with, and "
                            "its schema is this code's or a newer release's this code still serves "
                            "(ahead-compatible)", ok="health"),
    ("GET", "/metrics"): Op("Prometheus metrics of this node: to a direct connection from its host, or with the "
                            "metrics token", ok="metrics"),
    ("GET", "/openapi.json"): Op("This OpenAPI document", ok="json"),
    ("GET", "/docs"): Op("The OpenAPI document rendered with Swagger UI", ok="html"),
    ("GET", "/docs/swagger-initializer.js"): Op("The script that starts Swagger UI on /docs", ok="file"),
    ("GET", "/docs/static/{filename}"): Op("Swagger UI's static files", ok="file"),
    ("GET", "/.well-known/smart-configuration"): Op("SMART discovery", ok="json"),
    ("GET", "/fhir/.well-known/smart-configuration"): Op("SMART discovery (custodian base)", ok="json"),
    ("GET", "/research/fhir/.well-known/smart-configuration"): Op("SMART discovery (research base)", ok="json"),
    ("POST", "/auth/token"): Op("OAuth2 client_credentials: a bearer token", body="token", ok="token"),
    # The custodian API.
    ("GET", "/fhir/metadata"): Op("The custodian CapabilityStatement"),
    ("POST", "/fhir"): Op("A transaction or batch Bundle", body="bundle"),
    ("POST", "/fhir/"): Op("A transaction or batch Bundle", body="bundle"),
    ("GET", "/fhir/{resource_type}"): Op("Search a type", query=_SEARCH),
    ("POST", "/fhir/{resource_type}/_search"): Op("Search a type (parameters in a form body)", body="search"),
    ("POST", "/fhir/{resource_type}"): Op("Create a resource; conditional with If-None-Exist or a search on the URL",
                                          headers=("If-None-Exist",), body="resource", ok="created"),
    ("GET", "/fhir/{resource_type}/{resource_id}"): Op("Read a resource (304 when not modified)", query=("_format",),
                                                       headers=("If-None-Match", "If-Modified-Since")),
    ("PUT", "/fhir/{resource_type}/{resource_id}"): Op("Update (or create) a resource", headers=("If-Match",),
                                                       body="resource", ok="created"),
    ("DELETE", "/fhir/{resource_type}/{resource_id}"): Op("Delete a resource", headers=("If-Match",), ok="empty"),
    ("PUT", "/fhir/{resource_type}"): Op("Conditional update: the search on the URL matches none (create), one "
                                         "(update) or several (412)", headers=("If-Match",), body="resource",
                                         ok="created"),
    ("DELETE", "/fhir/{resource_type}"): Op("Conditional delete: the one resource the search on the URL matches "
                                            "(several: 412)", headers=("If-Match",), ok="empty"),
    ("PATCH", "/fhir/{resource_type}/{resource_id}"): Op("Patch a resource: JSON Patch, FHIRPath Patch or JSON "
                                                         "Merge Patch", headers=("If-Match",), body="patch"),
    ("PATCH", "/fhir/{resource_type}"): Op("Conditional patch: the one resource the search on the URL matches",
                                           headers=("If-Match",), body="patch"),
    ("GET", "/fhir/{resource_type}/_history"): Op("The history of a type", query=_HISTORY),
    ("GET", "/fhir/_history"): Op("The history of every type", query=_HISTORY),
    ("GET", "/fhir/Patient/{patient_id}/$everything"): Op("$everything: the patient's compartment, paged",
                                                          query=("_since", "_type", "start", "end", "_count")),
    ("GET", "/fhir/AuditEvent"): Op("Search the audit log as AuditEvents", query=_AUDIT),
    ("POST", "/fhir/AuditEvent/_search"): Op("Search the audit log (form body)", body="search"),
    ("GET", "/fhir/AuditEvent/{event_id}"): Op("Read one audit entry as an AuditEvent"),
    **{(method, path): Op("Refused: the audit log is read-only (405)", body="resource", ok="none")
       for path in ("/fhir/AuditEvent", "/fhir/AuditEvent/{_rest}") for method in ("POST", "PUT", "DELETE", "PATCH")},
    ("GET", "/fhir/{resource_type}/{resource_id}/_history"): Op("A resource's history", query=_HISTORY),
    ("GET", "/fhir/{resource_type}/{resource_id}/_history/{version}"): Op("Read one version of a resource"),
    ("GET", "/fhir/Consent/$explain"): Op("$explain: why a patient's data is (or is not) released to a project",
                                          query=("patient", "project")),
    ("GET", "/fhir/ResearchStudy/{project_id}/$budget"): Op("$budget: a project's privacy budget and history"),
    ("POST", "/fhir/ResearchStudy/{project_id}/$budget"): Op("$budget: raise a project's total ε",
                                                             body="parameters"),
    ("POST", "/fhir/$score"): Op("$score: apply an imported model to the custodian's patients, writing one "
                                 "RiskAssessment each (never released to research)", body="parameters"),
    ("GET", "/fhir/OperationDefinition/{operation_id}"): Op("The definition of a custodian operation"),
    # The research API.
    ("GET", "/research/fhir/metadata"): Op("The research CapabilityStatement"),
    ("GET", "/research/fhir/{resource_type}"): Op("Search the project's de-identified data", query=_SEARCH),
    ("POST", "/research/fhir/{resource_type}/_search"): Op("Search the project's data (form body)", body="search"),
    ("GET", "/research/fhir/{resource_type}/{pseudonym}"): Op("Read a de-identified resource"),
    ("GET", "/research/fhir/{resource_type}/{pseudonym}/_history/{version}"): Op("Read one version"),
    ("GET", "/research/fhir/OperationDefinition/{operation_id}"): Op("The definition of a research operation"),
    ("POST", "/research/fhir/$aggregate"): Op("$aggregate: a differentially private answer; spends ε",
                                              headers=("Idempotency-Key",), body="parameters"),
    ("POST", "/research/fhir/$train"): Op("$train: a differentially private model, released as a document; "
                                          "spends ε", headers=("Idempotency-Key",), body="parameters"),
    ("GET", "/research/fhir/$export"): Op("$export of the project's data", query=_EXPORT,
                                          headers=("Prefer",), ok="accepted"),
    ("GET", "/research/fhir/Patient/$export"): Op("$export of the project's patients", query=_EXPORT,
                                                  headers=("Prefer",), ok="accepted"),
    ("GET", "/research/fhir/Group/{group_id}/$export"): Op("$export of a group", query=_EXPORT,
                                                          headers=("Prefer",), ok="accepted"),
    **{("POST", path): Op(f"{summary} (parameters in a Parameters body)", headers=("Prefer",), body="parameters",
                          ok="accepted")
       for path, summary in (("/research/fhir/$export", "$export of the project's data"),
                             ("/research/fhir/Patient/$export", "$export of the project's patients"),
                             ("/research/fhir/Group/{group_id}/$export", "$export of a group"))},
    ("GET", "/research/fhir/$budget"): Op("$budget: the caller's project budget and history (spends nothing)"),
    ("GET", "/research/fhir/_export/{job_id}"): Op("An export job's status, or its manifest", ok="manifest"),
    ("DELETE", "/research/fhir/_export/{job_id}"): Op("Cancel an export job", ok="accepted"),
    ("GET", "/research/fhir/_export/{job_id}/file/{file_no}"): Op("One exported NDJSON file", ok="ndjson"),
    **{(method, rule): Op("Refused: the research API is read-only (405)", body="resource", ok="none")
       for rule in ("/research/fhir", "/research/fhir/{_rest}") for method in ("POST", "PUT", "DELETE", "PATCH")},
    # The patient portal (HTML forms).
    ("GET", "/consent/"): Op("Portal home: the patient's choices", ok="html"),
    ("GET", "/consent/signin"): Op("The sign-in form", ok="html"),
    ("POST", "/consent/signin"): Op("Sign in with the patient number and passphrase", body="signin", ok="form"),
    ("GET", "/consent/invite/{token}"): Op("An invitation: the form that sets a passphrase", ok="html"),
    ("POST", "/consent/invite/{token}"): Op("Accept an invitation and set a passphrase", body="invite", ok="form"),
    ("POST", "/consent/signout"): Op("Sign out", body="csrf", ok="form"),
    ("POST", "/consent/signout-everywhere"): Op("Sign out of every session", body="csrf", ok="form"),
    ("GET", "/consent/signed-out"): Op("The signed-out page", ok="html"),
    ("GET", "/consent/research"): Op("The research-wide choice", ok="html"),
    ("GET", "/consent/sensitive"): Op("The choices for sensitive categories", ok="html"),
    ("GET", "/consent/projects/{project_id}"): Op("One project and the choice for it", ok="html"),
    ("POST", "/consent/save"): Op("Save a confirmed change (a new Consent version)", body="choices", ok="form"),
    ("POST", "/consent/confirm"): Op("Review a change in plain words (writes nothing)", body="choices", ok="form"),
    ("GET", "/consent/receipt"): Op("The receipt of the last change", ok="html"),
    ("GET", "/consent/history"): Op("The history of the patient's choices", ok="html"),
    ("GET", "/consent/received"): Op("Which projects received the patient's data", ok="html"),
    ("GET", "/consent/download"): Op("The patient's research Consents as a FHIR Bundle (JSON attachment)", ok="file"),
    ("GET", "/consent/static/{filename}"): Op("The portal's static files", ok="file"),
}

_STRING = {"type": "string"}
QUERY: dict[str, dict[str, Any]] = {
    "_count": {"type": "integer", "minimum": 0},
    "_sort": _STRING,
    "_total": {"enum": ["none", "estimate", "accurate"]},
    "_summary": {"enum": ["true", "false", "count", "text", "data"]},
    "_include": _STRING,
    "_revinclude": _STRING,
    "_elements": _STRING,
    "_format": {"enum": ["json", "application/json", "application/fhir+json"]},
    "_outputFormat": {"enum": ["application/fhir+ndjson", "application/ndjson", "ndjson"]},
    "_since": {"type": "string", "format": "date-time"},
    "_type": _STRING,
    "_typeFilter": _STRING,
    "_at": _STRING,
    "start": _STRING,
    "end": _STRING,
    "_lastUpdated": _STRING,
    "patient": _STRING,
    "project": _STRING,
    "date": _STRING,
    "agent": _STRING,
    "entity-type": _STRING,
    "subtype": _STRING,
    "outcome": _STRING,
}
#: Query parameters an operation cannot do without (`$explain`'s).
REQUIRED_QUERY = {("/fhir/Consent/$explain", "patient"), ("/fhir/Consent/$explain", "project")}
HEADERS: dict[str, tuple[dict[str, Any], bool]] = {  # name: (schema, required)
    "If-Match": ({"type": "string", "pattern": '^W/"[0-9]+"$'}, False),
    "Idempotency-Key": (_STRING, False),
    "If-None-Exist": (_STRING, False),
    "If-None-Match": (_STRING, False),
    "If-Modified-Since": (_STRING, False),
    "Prefer": ({"const": "respond-async"}, True),
}

_FHIR_JSON, _FORM, _HTML = "application/fhir+json", "application/x-www-form-urlencoded", "text/html"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _form(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {_FORM: {"schema": {"type": "object", "properties": properties, "required": list(required)}}}


_CSRF = {"csrf_token": _STRING}
BODIES: dict[str, dict[str, Any]] = {
    "resource": {_FHIR_JSON: {"schema": _ref("Resource")}},
    "bundle": {_FHIR_JSON: {"schema": _ref("Bundle")}},
    "parameters": {_FHIR_JSON: {"schema": _ref("Parameters")}},
    "patch": {"application/json-patch+json": {"schema": {"type": "array", "items": {"type": "object"}}},
              _FHIR_JSON: {"schema": _ref("Parameters")}},
    "search": {_FORM: {"schema": {"type": "object", "additionalProperties": _STRING}}},
    "token": _form({"grant_type": {"const": "client_credentials"}, "scope": _STRING,
                    "client_assertion_type": _STRING, "client_assertion": _STRING,
                    "client_id": _STRING, "client_secret": _STRING}, ("grant_type",)),
    "signin": _form({**_CSRF, "number": _STRING, "passphrase": _STRING}, ("csrf_token", "number", "passphrase")),
    "invite": _form({**_CSRF, "passphrase": _STRING, "confirm": _STRING}, ("csrf_token", "passphrase", "confirm")),
    "csrf": _form(_CSRF, ("csrf_token",)),
    "choices": {_FORM: {"schema": {"type": "object", "properties": _CSRF, "required": ["csrf_token"],
                                   "additionalProperties": _STRING}}},
}


def _content(media: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {media: {"schema": schema}}}


_OUTCOME = {"description": "An OperationOutcome saying what was wrong",
            **_content(_FHIR_JSON, _ref("OperationOutcome"))}
_HTML_PAGE = _content(_HTML, _STRING)
_REDIRECT = {"description": "Done: on to the next page", "headers": {"Location": {"schema": _STRING}}}
SUCCESS: dict[str, dict[str, Any]] = {
    "resource": {"200": {"description": "The resource", **_content(_FHIR_JSON, _ref("Resource"))}},
    "created": {"200": {"description": "Updated", **_content(_FHIR_JSON, _ref("Resource"))},
                "201": {"description": "Created", **_content(_FHIR_JSON, _ref("Resource"))}},
    "empty": {"204": {"description": "Deleted (or already absent)"},
              "200": {"description": "Deleted", **_content(_FHIR_JSON, _ref("OperationOutcome"))}},
    "accepted": {"202": {"description": "Accepted: poll the Content-Location",
                         "headers": {"Content-Location": {"schema": _STRING}}}},
    "manifest": {"200": {"description": "The export manifest", **_content("application/json", {"type": "object"})},
                 "202": {"description": "Still running", "headers": {"X-Progress": {"schema": _STRING}}}},
    "ndjson": {"200": {"description": "One resource per line", **_content("application/fhir+ndjson", _STRING)}},
    "none": {},
    "health": {"200": {"description": "Healthy", **_content("application/json", {"type": "object"})},
               "503": {"description": "Not healthy: the body names the cause",
                       **_content("application/json", {"type": "object"})}},
    "json": {"200": {"description": "A JSON document", **_content("application/json", {"type": "object"})}},
    "metrics": {"200": {"description": "Metrics in Prometheus' text format", **_content("text/plain", _STRING)},
                "401": {"description": "Neither a direct connection from the node's host nor the metrics token",
                        **_content(_FHIR_JSON, _ref("OperationOutcome"))}},
    "token": {"200": {"description": "A bearer token", **_content("application/json", _ref("Token"))},
              "4XX": {"description": "An OAuth2 error (RFC 6749 §5.2)",
                      **_content("application/json", _ref("OAuthError"))}},
    "html": {"200": {"description": "The page", **_HTML_PAGE},
             "303": {"description": "Sign in first", "headers": {"Location": {"schema": _STRING}}}},
    "form": {"200": {"description": "The form again, with what to correct", **_HTML_PAGE}, "303": _REDIRECT},
    "file": {"200": {"description": "The file"}},
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "Resource": {"type": "object", "required": ["resourceType"],
                 "properties": {"resourceType": _STRING, "id": _STRING, "meta": {"type": "object"}},
                 "additionalProperties": True},
    "Bundle": {"type": "object", "required": ["resourceType", "type"],
               "properties": {"resourceType": {"const": "Bundle"}, "type": {"enum": ["transaction", "batch"]},
                              "entry": {"type": "array", "items": {"type": "object", "properties": {
                                  "fullUrl": _STRING, "resource": _ref("Resource"),
                                  "request": {"type": "object", "required": ["method", "url"], "properties": {
                                      "method": {"enum": ["GET", "POST", "PUT", "DELETE"]}, "url": _STRING}}}}}}},
    "Parameters": {"type": "object", "required": ["resourceType"],
                   "properties": {"resourceType": {"const": "Parameters"}, "parameter": {"type": "array", "items": {
                       "type": "object", "required": ["name"], "properties": {"name": _STRING},
                       "additionalProperties": True}}}},
    "OperationOutcome": {"type": "object", "required": ["resourceType", "issue"],
                         "properties": {"resourceType": {"const": "OperationOutcome"}, "issue": {
                             "type": "array", "minItems": 1, "items": {
                                 "type": "object", "required": ["severity", "code"],
                                 "properties": {"severity": {"enum": ["fatal", "error", "warning", "information"]},
                                                "code": _STRING, "diagnostics": _STRING,
                                                "expression": {"type": "array", "items": _STRING}}}}}},
    "Token": {"type": "object", "required": ["access_token", "token_type", "expires_in", "scope"],
              "properties": {"access_token": _STRING, "token_type": {"const": "bearer"},
                             "expires_in": {"type": "integer"}, "scope": _STRING}},
    "OAuthError": {"type": "object", "required": ["error"],
                   "properties": {"error": _STRING, "error_description": _STRING}},
}

_CONVERTER = re.compile(r"<(?:(?P<converter>[a-z]+)(?:\([^)]*\))?:)?(?P<name>[A-Za-z_]+)>")
FHIR_PREFIXES = ("/fhir", "/research/fhir")


def is_fhir(rule: str) -> bool:
    """Whether a route belongs to a FHIR API (its errors are OperationOutcomes)."""
    return any(rule == prefix or rule.startswith(prefix + "/") for prefix in FHIR_PREFIXES) \
        and "/.well-known/" not in rule


def _path_schema(rule: Rule, name: str, converter: str | None) -> dict[str, Any]:
    if converter == "int":
        largest = rule._converters[name].max  # werkzeug keeps converters only there
        return {"type": "integer", "minimum": 0, **({"maximum": largest} if largest is not None else {})}
    if converter == "any":
        return {"enum": sorted(rule._converters[name].items)}
    if name == "resource_type":
        research = rule.rule.startswith("/research/")
        return {"enum": list(research_capability_types() if research else capability.resource_types())}
    return {"type": "string", "pattern": "^[A-Za-z0-9\\-.]{1,64}$"} if converter != "path" else _STRING


def _security(endpoint: str, rule: str) -> list[dict[str, list[str]]]:
    if rule.startswith("/consent/"):
        return [{"portalSession": []}]
    if endpoint == "metrics.scrape":
        return [{}, {"metricsToken": []}]
    access = scopes.ROUTES.get(endpoint)
    return [{"bearer": []}] if access is not None and access.role is not None else []


def _operation(rule: Rule, path: str, method: str, op: Op) -> dict[str, Any]:
    parameters = [{"name": m["name"], "in": "path", "required": True,
                   "schema": _path_schema(rule, m["name"], m["converter"])}
                  for m in _CONVERTER.finditer(rule.rule)]
    parameters += [{"name": name, "in": "query", "required": (path, name) in REQUIRED_QUERY, "schema": QUERY[name]}
                   for name in op.query]
    parameters += [{"name": name, "in": "header", "required": HEADERS[name][1], "schema": HEADERS[name][0]}
                   for name in op.headers]
    responses = dict(SUCCESS[op.ok])
    if is_fhir(rule.rule):
        responses.update({"4XX": _OUTCOME, "503": {**_OUTCOME, "description": "Busy: try again (Retry-After)"}})
    elif rule.rule.startswith("/consent/"):
        responses["4XX"] = {"description": "An error page", **_HTML_PAGE}
    words = re.sub(r"[^A-Za-z0-9]+", "_", path)
    operation: dict[str, Any] = {
        "operationId": f"{method.lower()}{words}",
        "summary": op.summary,
        "tags": [_tag(rule.rule)],
        "parameters": parameters,
        "responses": responses or {"405": _OUTCOME},
        "security": _security(rule.endpoint, rule.rule),
    }
    if op.body:
        operation["requestBody"] = {"required": True, "content": BODIES[op.body]}
    return operation


def _tag(rule: str) -> str:
    for prefix, tag in (("/research/fhir", "research"), ("/fhir", "custodian"), ("/consent", "patient portal"),
                        ("/auth", "auth")):
        if rule.startswith(prefix):
            return tag
    return "service"


def openapi_path(rule: Rule) -> str:
    """The route as an OpenAPI path: `<int:file_no>` becomes `{file_no}`."""
    return _CONVERTER.sub(r"{\g<name>}", rule.rule)


def routes(app: Flask) -> list[tuple[str, Rule]]:
    """Every (method, route) the app answers, HEAD and OPTIONS left out (Werkzeug answers them)."""
    return sorted(((method, rule) for rule in app.url_map.iter_rules()
                   for method in rule.methods or () if method not in ("HEAD", "OPTIONS")),
                  key=lambda item: (item[1].rule, item[0]))


def document(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`; `Undescribed` for a route with no row in `OPERATIONS`."""
    paths: dict[str, dict[str, Any]] = {}
    for method, rule in routes(app):
        path = openapi_path(rule)
        op = OPERATIONS.get((method, path))
        if op is None:
            raise Undescribed(f"{method} {path} has no description in service/api/openapi.py OPERATIONS")
        paths.setdefault(path, {})[method.lower()] = _operation(rule, path, method, op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Passerelle", "version": SOFTWARE_VERSION,
                 "description": "FHIR R4B custodian API (/fhir), consented and de-identified research API "
                                "(/research/fhir), OAuth2 token endpoint and the patient consent portal."},
        "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "A token from POST /auth/token"},
            "metricsToken": {"type": "http", "scheme": "bearer", "description": "The metrics token (`flask --app "
                             "wsgi metrics token`); a direct connection from the node's own host needs none"},
            "portalSession": {"type": "apiKey", "in": "cookie", "name": "passerelle_session",
                              "description": "The patient's session after signing in"}}},
    }


@bp.get("/openapi.json")
def spec() -> Response:
    return jsonify(document(current_app))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Passerelle API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/swagger-initializer.js"></script></body></html>
"""
_INITIALIZER = 'window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});\n'


def _docs_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = DOCS_CSP
    return response


@bp.get("/docs")
def docs() -> Response:
    return _docs_headers(Response(_PAGE, mimetype="text/html"))


@bp.get("/docs/swagger-initializer.js")
def docs_initializer() -> Response:
    return _docs_headers(Response(_INITIALIZER, mimetype="text/javascript"))


@bp.get("/docs/static/<path:filename>")
def docs_static(filename: str) -> Response:
    return _docs_headers(send_from_directory(SWAGGER_UI, filename))
