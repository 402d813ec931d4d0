"""The CapabilityStatements, generated from the route table, the search-parameter table and the
operation table.

The interactions of each API are read from the app's route table (`answering`): an interaction
is listed for a type when a request for it reaches a route of that shape that does not only
refuse (its OpenAPI row answers nothing, `ok="none"`); conditional create and read follow the
headers that route's OpenAPI row takes (`If-None-Exist`, `If-None-Match`, `If-Modified-Since`).
The search parameters come from `searchparams`, the same table the query builder uses,
filtered by what the API accepts; the result parameters from the parser's own list. Every
operation of `OPERATIONS` is listed, with the canonical URL of its OperationDefinition, by the
CapabilityStatement of the API that answers it; that API serves the definition (no token
needed) at `<base>/OperationDefinition/<id>`. tests/test_capability.py asks the server for
every interaction of FHIR R4's code lists and checks that exactly the declared ones are answered.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app
from werkzeug.exceptions import HTTPException

from service import patch
from service.api.fhirjson import base_url, fhir_response
from service.store import search
from service.store.searchparams import SearchParam, params_for
from service.validation import model_for

if TYPE_CHECKING:
    from service.api.openapi import Op

SOFTWARE_VERSION = "0.1.0"
FHIR_VERSION = "4.0.1"  # R4: what is stored validates against R4 (and the R4B models); see service/validation
#: How each FHIR R4 interaction is asked for: the method and the route's shape below the API's
#: base, `{}` standing for a path variable (the first one, for a resource type). The codes are
#: those of R4's TypeRestfulInteraction and SystemRestfulInteraction value sets.
TYPE_INTERACTIONS = {
    "read": ("GET", "/{}/{}"),
    "vread": ("GET", "/{}/{}/_history/{}"),
    "update": ("PUT", "/{}/{}"),
    "patch": ("PATCH", "/{}/{}"),
    "delete": ("DELETE", "/{}/{}"),
    "history-instance": ("GET", "/{}/{}/_history"),
    "history-type": ("GET", "/{}/_history"),
    "create": ("POST", "/{}"),
    "search-type": ("GET", "/{}"),
}
SYSTEM_INTERACTIONS = {
    "transaction": ("POST", ""),
    "batch": ("POST", ""),
    "search-system": ("GET", ""),
    "history-system": ("GET", "/_history"),
}
#: Conditional update and delete: the search on the type's URL (`PUT /fhir/Patient?identifier=…`).
#: A conditional delete matching several resources is refused (412): "single".
_CONDITIONAL_UPDATE, _CONDITIONAL_DELETE = ("PUT", "/{}"), ("DELETE", "/{}")
#: `conditionalRead` by the conditional headers the read route takes (its OpenAPI row).
_CONDITIONAL_HEADERS = frozenset({"If-None-Match", "If-Modified-Since"})
_CONDITIONAL_READ = {frozenset(): "not-supported", frozenset({"If-Modified-Since"}): "modified-since",
                     frozenset({"If-None-Match"}): "not-match",
                     frozenset({"If-None-Match", "If-Modified-Since"}): "full-support"}
#: The FHIR search-parameter type of each result parameter the parser takes, and of `_has`
#: (FHIR R4 §3.1.1.5); one missing here is listed as `special`.
RESULT_PARAM_TYPES = {"_count": "number", "_sort": "string", "_total": "token", "_summary": "token",
                      "_include": "special", "_revinclude": "special", "_elements": "string",
                      "_has": "special"}
#: Parameters the parser takes that are not part of the FHIR contract: paging and formatting
#: (`_cursor` is only ever read from a `next` link), and fhirpy's alias of `_total`.
_UNLISTED = frozenset({"_cursor", "_format", "_pretty", "_totalMethod"})
#: The custodian API's result parameters: those the search parser takes.
RESULT_PARAMS = tuple(sorted(search.RESULT_PARAMS - _UNLISTED))
#: The patch documents a PATCH takes (service/patch.py): JSON Patch, FHIRPath Patch, JSON Merge Patch.
PATCH_FORMATS = (patch.JSON_PATCH, "application/fhir+json", patch.MERGE_PATCH)
_VARIABLE = re.compile(r"<[^>]+>")
_SMART_OAUTH = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


@cache
def resource_types() -> tuple[str, ...]:
    """Every resource type of both FHIR R4 and R4B: all of them can be stored, read and searched."""
    from fhir.resources.R4B import fhirtypes  # slow to import: only when the list is first needed

    names = (name[:-4] for name in dir(fhirtypes) if name.endswith("Type") and name[:1].isupper())
    return tuple(sorted(n for n in names if model_for(n) is not None))


def _shape(rule: str, base: str, resource_type: str) -> str:
    """A route below `base` as a shape: variables as `{}`, and so a literal type segment."""
    shape = _VARIABLE.sub("{}", rule.removeprefix(base))
    return re.sub(rf"^/{resource_type}(?=/|$)", "/{}", shape) if resource_type else shape


def answering(app: Flask, api: str, method: str, shape: str, resource_type: str = "") -> Op | None:
    """The OpenAPI row of the route that answers `method` on `shape` (for `resource_type`) in
    `api`: None unless the route the request reaches has that shape and does not only refuse."""
    from service.api import openapi  # it imports this module

    base = API_PATHS[api]
    path = base + shape.replace("{}", resource_type, 1).replace("{}", "1")
    try:
        rule, _ = app.url_map.bind("localhost").match(path, method, return_rule=True)
    except HTTPException:  # no route, another method only, or a redirect
        return None
    op = openapi.OPERATIONS.get((method, openapi.openapi_path(rule)))
    return op if _shape(rule.rule, base, resource_type) == shape and op is not None and op.ok != "none" else None


def answers(app: Flask, api: str, method: str, shape: str, resource_type: str = "") -> bool:
    """Whether `api` answers `method` on `shape` (for `resource_type`)."""
    return answering(app, api, method, shape, resource_type) is not None


#: `_interactions` as read, by route table (`_routes`) then (api, type).
_INTERACTIONS: dict[tuple[tuple[str, tuple[str, ...], str], ...], dict[tuple[str, str], dict[str, Any]]] = {}


def _interactions(app: Flask, api: str, resource_type: str) -> dict[str, Any]:
    """The interactions and conditional flags of one type, as the route table shows them: read
    once per route table and process (an app's routes do not change once it serves, and the apps
    a process builds have the same ones)."""
    known = _INTERACTIONS.setdefault(_routes(app), {})
    if (api, resource_type) not in known:
        known[api, resource_type] = _read_interactions(app, api, resource_type)
    return known[api, resource_type]


def _routes(app: Flask) -> tuple[tuple[str, tuple[str, ...], str], ...]:
    """The app's route table: each rule's text, methods and endpoint (computed once per app)."""
    if "passerelle.routes" not in app.extensions:
        app.extensions["passerelle.routes"] = tuple(sorted(
            (rule.rule, tuple(sorted(rule.methods or ())), rule.endpoint) for rule in app.url_map.iter_rules()))
    return app.extensions["passerelle.routes"]


def _read_interactions(app: Flask, api: str, resource_type: str) -> dict[str, Any]:
    routes = {code: answering(app, api, method, shape, resource_type)
              for code, (method, shape) in TYPE_INTERACTIONS.items()}
    codes = [code for code, op in routes.items() if op is not None]
    read, create = routes["read"], routes["create"]
    return {
        "interaction": [{"code": code} for code in codes],
        "versioning": "versioned",
        "readHistory": "vread" in codes,
        "updateCreate": "update" in codes,  # PUT to an id that does not exist creates it
        "conditionalCreate": create is not None and "If-None-Exist" in create.headers,
        "conditionalRead": _CONDITIONAL_READ[frozenset(read.headers if read else ()) & _CONDITIONAL_HEADERS],
        "conditionalUpdate": answers(app, api, *_CONDITIONAL_UPDATE, resource_type),
        "conditionalDelete": "single" if answers(app, api, *_CONDITIONAL_DELETE, resource_type) else "not-supported",
    }


def _reverse_includes(types: Iterable[str], accepts: Callable[[SearchParam], bool]) -> dict[str, list[str]]:
    """For each type, the `Source:param` a `_revinclude` may name: the reference parameters of the
    listed types that can point to it (an untyped one to any type)."""
    chosen = tuple(types)
    found: dict[str, list[str]] = {t: [] for t in chosen}
    for source in chosen:
        for param in params_for(source).values():
            if param.kind == "reference" and accepts(param):
                for target in ([param.target] if param.target in found else [] if param.target else chosen):
                    found[target].append(f"{source}:{param.name}")
    return found


def _resource(app: Flask, api: str, resource_type: str, accepts: Callable[[SearchParam], bool],
              reverse: list[str], operations: list[dict[str, Any]]) -> dict[str, Any]:
    params = {name: p for name, p in params_for(resource_type).items() if accepts(p)}
    entry: dict[str, Any] = {
        "type": resource_type,
        **_interactions(app, api, resource_type),
        "searchParam": [{"name": p.name, "type": p.kind, **({"documentation": p.documentation}
                                                               if p.documentation else {})}
                        for p in params.values()],
    }
    includes = [f"{resource_type}:{p.name}" for p in params.values() if p.kind == "reference"]
    if includes:
        entry["searchInclude"] = includes
    if reverse:
        entry["searchRevInclude"] = reverse
    if operations:
        entry["operation"] = operations
    return entry


def statement(base: str, *, types: tuple[str, ...] | None = None,
              description: str = "Passerelle custodian FHIR API",
              accepts: Callable[[SearchParam], bool] = lambda _: True,
              result_params: Iterable[str] = RESULT_PARAMS, api: str = "custodian") -> dict[str, Any]:
    """A CapabilityStatement for the FHIR base URL `base` of `api` ("custodian" or "research").

    The interactions are those the route table routes to `api`'s views (`answers`); `accepts`
    chooses the search parameters advertised, `result_params` the result parameters, and the
    operations are those `OPERATIONS` gives to `api`, so each API lists exactly what it answers.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    chosen = types if types is not None else resource_types()
    system_operations, type_operations = _operations(base, api)
    reverse = _reverse_includes(chosen, accepts)
    server_base = base.rsplit("/fhir", 1)[0].rsplit("/research", 1)[0]
    system = [code for code, (method, shape) in SYSTEM_INTERACTIONS.items() if answers(app, api, method, shape)]
    entries = [_resource(app, api, t, accepts, reverse[t], type_operations.get(t, [])) for t in chosen]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-30",
        "publisher": "Passerelle",
        "kind": "instance",
        "software": {"name": "Passerelle", "version": SOFTWARE_VERSION},
        "implementation": {"description": description, "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        **({"patchFormat": list(PATCH_FORMATS)} if any({"code": "patch"} in r["interaction"] for r in entries)
           else {}),
        "rest": [{
            "mode": "server",
            "documentation": "Search parameters are listed per type; unknown parameters are refused "
                             "unless the request says Prefer: handling=lenient. Chained parameters "
                             "(one level, `subject:Patient.name=…`) and `_has` (one level) work on the "
                             "reference parameters listed; `_include:iterate` and `_revinclude:iterate` "
                             "follow a bounded number of rounds.",
            "security": {
                "cors": False,
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                         "code": "SMART-on-FHIR"}]}],
                "description": "OAuth2 client_credentials (SMART Backend Services private_key_jwt, or "
                               "client_secret_basic); bearer tokens live at most 300 seconds.",
                "extension": [{"url": _SMART_OAUTH, "extension": [
                    {"url": "token", "valueUri": f"{server_base}/auth/token"}]}],
            },
            "resource": entries,
            **({"interaction": [{"code": code} for code in system]} if system else {}),
            "searchParam": [{"name": name, "type": RESULT_PARAM_TYPES.get(name, "special")}
                            for name in (*result_params, "_has")],
            **({"operation": system_operations} if system_operations else {}),
        }],
    }


# -- operations --------------------------------------------------------------------------------


def _param(name: str, use: str, type_: str | None, documentation: str, *, min_: int = 0, max_: str = "1",
           parts: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    param: dict[str, Any] = {"name": name, "use": use, "min": min_, "max": max_, "documentation": documentation}
    if type_:
        param["type"] = type_
    if parts:
        param["part"] = list(parts)
    return param


_BUDGET_OUT = (
    _param("project", "out", "Reference", "The project (ResearchStudy) the budget belongs to.", min_=1),
    *(_param(name, "out", "decimal", f"ε {what}.", min_=1) for name, what in (
        ("total", "granted to the project"), ("spent", "spent so far"), ("remaining", "left to spend"))),
    *(_param(name, "out", "decimal", f"δ {what}.", min_=1) for name, what in (
        ("delta_total", "granted"), ("delta_spent", "spent"), ("delta_remaining", "left"))),
    _param("spend", "out", None, "One entry of the budget history, oldest first.", max_="*", parts=(
        _param("kind", "out", "code", "What changed the budget (a spend, a refund, a raise).", min_=1),
        _param("epsilon", "out", "decimal", "The ε of this entry.", min_=1),
        _param("at", "out", "instant", "When.", min_=1),
        _param("actor", "out", "string", "The client that raised the budget."),
        _param("query", "out", "string", "The hash of the canonical question answered."),
        _param("question", "out", "string", "The canonical question answered (JSON), when recorded."),
    )),
)


@dataclass(frozen=True)
class Operation:
    """One FHIR operation Passerelle answers: the API that answers it and its OperationDefinition."""

    id: str
    api: str  # "custodian" (/fhir) or "research" (/research/fhir)
    code: str
    title: str
    description: str
    system: bool = False
    types: tuple[str, ...] = ()  # answered at the type level
    instances: tuple[str, ...] = ()  # answered at the instance level
    affects_state: bool = False
    parameters: tuple[dict[str, Any], ...] = ()


#: Every operation, in the order the CapabilityStatements list them.
OPERATIONS: tuple[Operation, ...] = (
    Operation("passerelle-explain", "custodian", "explain", "Explain a consent decision",
              "Why a patient's data is (or is not) released to a project: the tier, the exclusions, "
              "the periods and the basis of the decision.", types=("Consent",), parameters=(
                  _param("patient", "in", "string", "The patient (id or Patient/id).", min_=1),
                  _param("project", "in", "string", "The project (id or ResearchStudy/id).", min_=1),
                  _param("tier", "out", "code", "The release tier decided.", min_=1),
                  _param("excluded", "out", "code", "A category excluded from the release.", max_="*"),
                  _param("period", "out", "Period", "The period of data the consent covers."),
                  _param("valid", "out", "Period", "When the decision is valid."),
                  _param("basis", "out", "string", "One line of the decision's basis.", max_="*"))),
    Operation("passerelle-everything", "custodian", "everything", "Everything about a patient",
              "The patient and every current resource of their compartment, paged (FHIR Patient-everything; "
              "resources outside the compartment that these refer to are not added).", instances=("Patient",),
              parameters=(
                  _param("_since", "in", "instant", "Only resources updated at or after this instant."),
                  _param("_type", "in", "string", "Comma-separated resource types to return.", max_="*"),
                  _param("_count", "in", "integer", "The page size."),
                  _param("return", "out", "Bundle", "The searchset Bundle of the page.", min_=1))),
    Operation("passerelle-budget", "custodian", "budget", "A project's privacy budget",
              "GET reads a project's privacy budget and its history; POST raises its total ε (never "
              "lowers it), audited.", instances=("ResearchStudy",), affects_state=True, parameters=(
                  _param("total", "in", "decimal", "POST only: the new total ε (not lower than the current)."),
                  *_BUDGET_OUT)),
    Operation("passerelle-score", "custodian", "score", "Score patients with an imported model",
              "Apply a model imported with `flask --app wsgi model import` (a $train document) to the "
              "custodian's patients and write one RiskAssessment per patient (a new version when scored "
              "again), labelled custodian-only: never released to research.", system=True, affects_state=True,
              parameters=(
                  _param("model", "in", "string", "The imported model's name.", min_=1),
                  _param("patients", "in", "string", "A search restricting who is scored (default: every patient)."),
                  _param("date", "in", "date", "Features are computed from data dated before this day "
                                               "(default: now)."),
                  _param("model", "out", "string", "The model applied.", min_=1),
                  _param("written", "out", "integer", "How many RiskAssessments were written.", min_=1),
                  _param("occurrence", "out", "dateTime", "Their occurrence.", min_=1),
                  _param("search", "out", "string", "The search that finds them.", min_=1))),
    Operation("passerelle-export", "research", "export", "Bulk Data export",
              "FHIR Bulk Data $export of the caller's project (system, Patient or Group level), "
              "asynchronous: send Prefer: respond-async and poll the Content-Location.", system=True,
              types=("Patient",), instances=("Group",), parameters=(
                  _param("_outputFormat", "in", "string", "application/fhir+ndjson (the only format)."),
                  _param("_since", "in", "instant", "Only resources changed after this instant."),
                  _param("_type", "in", "string", "Comma-separated resource types to export.", max_="*"),
                  _param("_typeFilter", "in", "string", "A search query restricting one type.", max_="*"))),
    Operation("passerelle-aggregate", "research", "aggregate", "Differentially private aggregate",
              "A count, histogram, sum, mean or quantile over the project's consented cohort, answered "
              "with differential privacy; spends ε from the project's budget.", system=True, parameters=(
                  _param("measure", "in", "code", "count | histogram | sum | mean | quantile.", min_=1),
                  _param("cohort", "in", "string", "A search restricting the cohort.", max_="*"),
                  _param("value", "in", None, "What is summed, averaged or ranked.", parts=(
                      _param("expression", "in", "string", "The value's expression.", min_=1),
                      _param("reduce", "in", "code", "How several values of one patient reduce."),
                      _param("lower", "in", "decimal", "The clamping range's lower bound."),
                      _param("upper", "in", "decimal", "The clamping range's upper bound."))),
                  _param("groupBy", "in", None, "Histogram bins (gender, age-band, year or code).", parts=(
                      _param("by", "in", "code", "gender | age-band | year | code.", min_=1),)),
                  _param("epsilon", "in", "decimal", "The ε to spend on this answer.", min_=1),
                  _param("q", "in", "decimal", "The quantile asked for (quantile only)."),
                  _param("result", "out", None, "One released value (per bin for a histogram).", max_="*"),
                  _param("measure", "out", "code", "The measure answered.", min_=1),
                  _param("epsilon", "out", "decimal", "The ε spent.", min_=1),
                  _param("remaining", "out", "decimal", "The ε left in the project's budget.", min_=1))),
    Operation("passerelle-train", "research", "train", "Differentially private model training",
              "A logistic regression, linear regression or naive Bayes model trained with differential "
              "privacy on the project's consented cohort, one row per patient; only the model is released, "
              "as parameters and as a document `model import` accepts; spends ε from the project's budget.",
              system=True, parameters=(
                  _param("model", "in", "code", "logistic-regression | linear-regression | naive-bayes.", min_=1),
                  _param("cohort", "in", "string", "A search restricting the cohort.", max_="*"),
                  _param("feature", "in", None, "One feature (1 to 20).", min_=1, max_="*", parts=(
                      _param("name", "in", "string", "The feature's name.", min_=1),
                      _param("expression", "in", "string", "A search whose quantity value is reduced."),
                      _param("reduce", "in", "code", "latest | mean | max | min | count."),
                      _param("builtin", "in", "code", "age | gender."),
                      _param("has", "in", "string", "A search: 1 if the patient has a match, else 0."),
                      _param("lower", "in", "decimal", "The clamping range's lower bound."),
                      _param("upper", "in", "decimal", "The clamping range's upper bound."),
                      _param("missing", "in", "decimal", "The value of a patient without one."))),
                  _param("label", "in", None, "What is learned: has, or expression with bounds.", min_=1, parts=(
                      _param("has", "in", "string", "A search (classification)."),
                      _param("expression", "in", "string", "A search whose quantity value is learned."),
                      _param("reduce", "in", "code", "latest | mean | max | min | count."),
                      _param("lower", "in", "decimal", "The label's lower bound."),
                      _param("upper", "in", "decimal", "The label's upper bound."))),
                  _param("index-date", "in", "date", "Features before it, the label from it on."),
                  _param("horizon", "in", "Quantity", "How long after the index date the label looks."),
                  _param("epsilon", "in", "decimal", "The ε to spend on this training.", min_=1),
                  _param("evaluate", "in", "boolean", "Hold out a fifth of the cohort for a noisy evaluation."),
                  _param("model", "out", "code", "The model trained.", min_=1),
                  _param("epsilon", "out", "decimal", "The ε spent.", min_=1),
                  _param("remaining", "out", "decimal", "The ε left in the project's budget.", min_=1),
                  _param("training-size", "out", None, "The noisy training-set size, or suppressed.", min_=1),
                  _param("coefficient", "out", None, "Per feature (regressions).", max_="*"),
                  _param("intercept", "out", "decimal", "The intercept (regressions)."),
                  _param("class", "out", None, "Per class (naive Bayes).", max_="*"),
                  _param("evaluation", "out", None, "The holdout's noisy evaluation."),
                  _param("withheld", "out", "string", "Why no model is released."),
                  _param("document", "out", "string", "The model document (JSON)."))),
    Operation("passerelle-research-budget", "research", "budget", "The caller's project budget",
              "The caller's own project's privacy budget and history; spends nothing.", system=True,
              parameters=_BUDGET_OUT),
)


def definition_url(base: str, operation: Operation) -> str:
    """The canonical URL of an operation's definition: where the API that answers it serves it."""
    return f"{base}/OperationDefinition/{operation.id}"


def operation_definition(base: str, operation: Operation) -> dict[str, Any]:
    """The OperationDefinition of `operation`, for the FHIR base `base` of the API that answers it."""
    definition: dict[str, Any] = {
        "resourceType": "OperationDefinition",
        "id": operation.id,
        "url": definition_url(base, operation),
        "version": SOFTWARE_VERSION,
        "name": "".join(word.capitalize() for word in operation.id.split("-")),
        "title": operation.title,
        "status": "active",
        "kind": "operation",
        "publisher": "Passerelle",
        "description": operation.description,
        "affectsState": operation.affects_state,
        "code": operation.code,
        "system": operation.system,
        "type": bool(operation.types),
        "instance": bool(operation.instances),
        "parameter": list(operation.parameters),
    }
    if operation.types or operation.instances:
        definition["resource"] = sorted({*operation.types, *operation.instances})
    return definition


def _operations(base: str, api: str) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """The system-level operations of `api` and, per resource type, its type and instance operations."""
    system: list[dict[str, Any]] = []
    per_type: dict[str, list[dict[str, Any]]] = {}
    for op in OPERATIONS:
        if op.api != api:
            continue
        entry = {"name": op.code, "definition": definition_url(base, op)}
        if op.system:
            system.append(entry)
        for resource_type in sorted({*op.types, *op.instances}):
            per_type.setdefault(resource_type, []).append(entry)
    return system, per_type


#: The FHIR base of each API, below the server's base URL.
API_PATHS = {"custodian": "/fhir", "research": "/research/fhir"}

bp = Blueprint("operation_definitions", __name__)


def _definition_route(api: str) -> str:
    ids = ", ".join(repr(op.id) for op in OPERATIONS if op.api == api)
    return f"{API_PATHS[api]}/OperationDefinition/<any({ids}):operation_id>"


@bp.get(_definition_route("custodian"), defaults={"api": "custodian"})
@bp.get(_definition_route("research"), defaults={"api": "research"})
def operation_definition_view(api: str, operation_id: str) -> Response:
    """The OperationDefinition of one of the API's operations (the route matches only their ids:
    any other OperationDefinition id reaches the API's own read)."""
    operation = next(op for op in OPERATIONS if op.api == api and op.id == operation_id)
    return fhir_response(operation_definition(f"{base_url()}{API_PATHS[api]}", operation))
