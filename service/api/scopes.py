"""Which token each route takes and which SMART scope it needs: one table, one check.

Every endpoint of the app is declared in `ROUTES`: public (no token), or the role whose
bearer token it takes, the SMART v2 permission letters it needs (c r u d s) and the
resource type it touches — a fixed type, `*` for every type, or the type named in the
URL. The blueprints of `OWN_ACCESS_BLUEPRINTS` take no token and declare each view's
access themselves (the patient portal: consent/web/sessions.py). `enforce` runs before
every request (service/app.py) and refuses an endpoint the table does not declare;
tests/test_scopes.py fails for one too.

A request needs `r` on every type its `_include` or `_revinclude` parameters can bring
in, and `s` on every type its `_has` parameters and chains (`subject:Patient.gender`) search
(the custodian's and the research API's searches alike, `POST …/_search` and the searches of
conditional interactions, `If-None-Exist` included).
The entries of a custodian Bundle are checked one by one, as their own interactions
(`require_bundle_entries`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from flask import g, request

from service import auth, limits
from service.errors import Forbidden
from service.store.searchparams import params_for

EVERY_TYPE = "*"
#: As `Access.on`: the type named by the URL's `<resource_type>`.
URL_TYPE = "<resource_type>"


@dataclass(frozen=True)
class Access:
    """What one endpoint needs: no token (`role` None), any token of `role` (`permission` empty),
    or a token of `role` whose scopes grant each letter of `permission` on the type `on`."""

    role: str | None
    permission: str = ""
    on: str = URL_TYPE

    def resource_type(self, view_args: Mapping[str, Any]) -> str:
        return view_args["resource_type"] if self.on == URL_TYPE else self.on


PUBLIC = Access(None)


def _custodian(permission: str, on: str = URL_TYPE) -> Access:
    return Access("custodian", permission, on)


def _research(permission: str, on: str = URL_TYPE) -> Access:
    return Access("research", permission, on)


#: Blueprints that take no bearer token because their views declare their access themselves: the
#: patient portal signs patients in with a passphrase and a session cookie (consent/web/sessions.py).
OWN_ACCESS_BLUEPRINTS = frozenset({"consent_web"})

ROUTES: dict[str, Access] = {
    # No token: liveness, discovery, and the token endpoint (it authenticates the client itself).
    "health.healthz": PUBLIC,
    "metrics.scrape": PUBLIC,  # no API token: the view admits loopback or the metrics token (service/metrics.py)
    "auth.token": PUBLIC,
    "auth.smart_configuration": PUBLIC,
    "custodian.metadata": PUBLIC,
    "research.metadata": PUBLIC,
    "operation_definitions.operation_definition_view": PUBLIC,
    "openapi.spec": PUBLIC,
    "openapi.docs": PUBLIC,
    "openapi.docs_initializer": PUBLIC,
    "openapi.docs_static": PUBLIC,
    # The custodian API, /fhir.
    "custodian.search_type": _custodian("s"),  # GET and POST …/_search alike
    "custodian.read": _custodian("r"),
    "custodian.vread": _custodian("r"),
    "custodian.history": _custodian("r"),
    "custodian.create": _custodian("c"),
    "custodian.update": _custodian("u"),  # update-as-create included
    "custodian.delete": _custodian("d"),
    "custodian.conditional_update": _custodian("u"),  # update-as-create included, as PUT Type/id
    "custodian.conditional_delete": _custodian("d"),
    "custodian.patch_instance": _custodian("u"),
    "custodian.conditional_patch": _custodian("u"),
    "custodian.history_type": _custodian("rs"),
    "custodian.history_system": _custodian("rs", EVERY_TYPE),
    "custodian.patient_everything": _custodian("rs", EVERY_TYPE),
    "custodian.bundle": _custodian(""),  # each entry as its own interaction: require_bundle_entries
    "custodian.audit_event_search": _custodian("s", "AuditEvent"),
    "custodian.audit_event_read": _custodian("r", "AuditEvent"),
    "custodian.audit_event_write": _custodian(""),  # 405, reaching nothing
    "custodian_operations.budget_status": _custodian("r", "ResearchStudy"),
    "custodian_operations.budget_raise": _custodian("u", "ResearchStudy"),
    "custodian_operations.consent_explain": _custodian("r", "Consent"),
    "custodian_operations.score": _custodian("rs", EVERY_TYPE),  # and "cu" on RiskAssessment, which it writes
    # The research API, /research/fhir.
    "research.search_type": _research("s"),  # GET and POST …/_search alike
    "research.read": _research("r"),
    "research.vread": _research("r"),
    "research.read_only": _research(""),  # every write: 405, reaching nothing
    "research.aggregate_operation": _research("s", EVERY_TYPE),
    "research.train_operation": _research("s", EVERY_TYPE),
    "research.budget_operation": _research(""),  # the caller's own project only, spends nothing
    "research.export_system": _research("rs", EVERY_TYPE),
    "research.export_patients": _research("rs", EVERY_TYPE),
    "research.export_group": _research("rs", EVERY_TYPE),
    "research.export_status": _research("rs", EVERY_TYPE),
    "research.export_cancel": _research("rs", EVERY_TYPE),
    "research.export_file": _research("rs", EVERY_TYPE),
}


class UndeclaredRoute(LookupError):
    """An endpoint missing from `ROUTES`: a programming error, answered 500 and logged."""


def enforce() -> None:
    """For the app's before_request: authenticate and check scopes as `ROUTES` declares.

    A request no route matched passes untouched: the 404/405 it gets reaches nothing.
    The caller is kept on `g.principal`.
    """
    if request.endpoint is None or request.blueprint in OWN_ACCESS_BLUEPRINTS:
        return
    access = ROUTES.get(request.endpoint)
    if access is None:
        raise UndeclaredRoute(f"endpoint {request.endpoint!r} has no access declaration in service/api/scopes.py")
    if access.role is None:
        return
    g.principal = auth.authenticate(access.role)
    if access.permission:
        require(access.resource_type(request.view_args or {}), access.permission)
    resource_type = (request.view_args or {}).get("resource_type")
    _require_included(limits.request_params(), resource_type)
    if_none_exist = request.headers.get("If-None-Exist")
    if if_none_exist:
        _require_included(parse_qsl(if_none_exist.lstrip("?"), keep_blank_values=True), resource_type)


def require(resource_type: str, permission: str) -> None:
    """Refuse (403) unless the caller's scopes grant every letter of `permission` on `resource_type`."""
    principal: auth.Principal = g.principal
    for letter in permission:
        if not principal.permits(resource_type, letter):
            what = "every resource type" if resource_type == EVERY_TYPE else resource_type
            raise Forbidden(f"The token's scope ({' '.join(principal.scopes)}) does not allow "
                            f"'{letter}' on {what}")


def require_bundle_entries(body: Any) -> None:
    """Every entry of a Bundle needs the scope its own interaction would need."""
    entries = body.get("entry") if isinstance(body, dict) else None
    for entry in entries if isinstance(entries, list) else ():
        req = entry.get("request") if isinstance(entry, dict) else None
        if not isinstance(req, dict) or not isinstance(req.get("url"), str):
            continue  # the Bundle parser reports malformed entries
        path, _, query = req["url"].partition("?")
        parts = path.strip("/").split("/")
        if parts[0]:
            require(parts[0], _entry_letter(str(req.get("method")), len(parts) > 1))
        _require_included(parse_qsl(query, keep_blank_values=True), parts[0] or None)
        if isinstance(req.get("ifNoneExist"), str):
            _require_included(parse_qsl(req["ifNoneExist"].lstrip("?"), keep_blank_values=True), parts[0] or None)


_LETTER_OF_METHOD = {"GET": "r", "HEAD": "r", "POST": "c", "PUT": "u", "DELETE": "d"}


def _entry_letter(method: str, has_id: bool) -> str:
    """The SMART permission a Bundle entry's interaction needs: search is `s`, read `r`, and so on."""
    if method in ("GET", "HEAD") and not has_id:
        return "s"
    return _LETTER_OF_METHOD.get(method, "u")


def _require_included(params: Iterable[tuple[str, str]], resource_type: str | None) -> None:
    """`r` on what includes bring in; `s` on what `_has` and chains search (of a search on `resource_type`)."""
    for name, value in params:
        kind = name.partition(":")[0]
        if kind in ("_include", "_revinclude"):
            require(_included_type(kind, value), "r")
        elif kind == "_has":
            require(_has_type(name), "s")
        elif "." in name:
            require(_chained_type(resource_type, name), "s")


def _has_type(name: str) -> str:
    """The type `_has:Observation:subject:code` searches (Observation); `*` when unclear."""
    parts = name.split(":")
    return parts[1] if len(parts) > 2 and parts[1] else EVERY_TYPE


def _chained_type(resource_type: str | None, name: str) -> str:
    """The type a chain searches: its type modifier's (`subject:Patient.gender`), else the declared
    target of its parameter (`patient.gender`: Patient); `*` when it can be several or is unclear."""
    param_name, _, type_name = name.partition(".")[0].partition(":")
    if type_name:
        return type_name
    param = params_for(resource_type).get(param_name) if resource_type else None
    return param.target if param is not None and param.kind == "reference" and param.target else EVERY_TYPE


def _included_type(kind: str, value: str) -> str:
    """The type an `_include`/`_revinclude` value can bring in; `*` when it can be several or is unclear.

    `_include=Observation:subject:Patient` brings Patients; `Observation:patient` the declared target
    of `patient` (Patient); `Observation:subject` whatever a subject may be (`*`).
    `_revinclude=Observation:subject` brings Observations.
    """
    parts = value.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        return EVERY_TYPE
    if kind == "_revinclude":
        return parts[0]
    if len(parts) == 3:
        return parts[2]
    param = params_for(parts[0]).get(parts[1])
    return param.target if param is not None and param.kind == "reference" and param.target else EVERY_TYPE
