"""The CapabilityStatements, generated from the search-parameter table and the operation table.

Deriving them from `searchparams` means what the server advertises is exactly what the
query builder accepts. Every operation of `OPERATIONS` is listed, with the canonical URL of
its OperationDefinition, by the CapabilityStatement of the API that answers it; that API
serves the definition (no token needed) at `<base>/OperationDefinition/<id>`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

from flask import Blueprint, Response

from service.api.fhirjson import base_url, fhir_response
from service.store.searchparams import SearchParam, params_for
from service.validation import model_for

SOFTWARE_VERSION = "0.1.0"
FHIR_VERSION = "4.3.0"  # R4B: the models every resource is validated against
_WRITE = ("create", "update", "delete")
_READ = ("read", "vread", "history-instance", "search-type")
#: What the research view answers: no history (it would list versions a project may not see).
RESEARCH_READ = ("read", "vread", "search-type")
#: Parameters that shape results, with their search-parameter types.
RESULT_PARAMS = {"_count": "number", "_sort": "string", "_total": "token", "_summary": "token",
                 "_include": "special"}
_SMART_OAUTH = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


@cache
def resource_types() -> tuple[str, ...]:
    """Every FHIR R4B resource type: all of them can be stored, read and searched."""
    from fhir.resources.R4B import fhirtypes  # slow to import: only when the list is first needed

    names = (name[:-4] for name in dir(fhirtypes) if name.endswith("Type") and name[:1].isupper())
    return tuple(sorted(n for n in names if model_for(n) is not None))


def _resource(resource_type: str, writable: bool, accepts: Callable[[SearchParam], bool],
              reads: tuple[str, ...], operations: list[dict[str, Any]]) -> dict[str, Any]:
    params = {name: p for name, p in params_for(resource_type).items() if accepts(p)}
    interactions = reads + (_WRITE if writable else ())
    entry: dict[str, Any] = {
        "type": resource_type,
        "interaction": [{"code": code} for code in interactions],
        "versioning": "versioned",
        "readHistory": "vread" in reads,
        "updateCreate": writable,
        "conditionalCreate": writable,
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
        "searchParam": [{"name": p.name, "type": p.kind, **({"documentation": p.documentation}
                                                               if p.documentation else {})}
                        for p in params.values()],
    }
    includes = [f"{resource_type}:{p.name}" for p in params.values() if p.kind == "reference"]
    if includes:
        entry["searchInclude"] = includes
    if operations:
        entry["operation"] = operations
    return entry


def statement(base: str, *, writable: bool = True, types: tuple[str, ...] | None = None,
              description: str = "Passerelle custodian FHIR API",
              accepts: Callable[[SearchParam], bool] = lambda _: True,
              reads: tuple[str, ...] = _READ, result_params: Iterable[str] = tuple(RESULT_PARAMS),
              api: str = "custodian") -> dict[str, Any]:
    """A CapabilityStatement for a FHIR base URL (`writable` False for the read-only research view).

    `accepts` chooses the search parameters advertised, `result_params` the result
    parameters, `reads` the read interactions and `api` the operations (those `OPERATIONS`
    gives to that API), so each API lists exactly what it answers.
    """
    chosen = types if types is not None else resource_types()
    system_operations, type_operations = _operations(base, api)
    server_base = base.rsplit("/fhir", 1)[0].rsplit("/research", 1)[0]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-29",
        "publisher": "Passerelle",
        "kind": "instance",
        "software": {"name": "Passerelle", "version": SOFTWARE_VERSION},
        "implementation": {"description": description, "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "Search parameters are listed per type; unknown parameters are refused "
                             "unless the request says Prefer: handling=lenient.",
            "security": {
                "cors": False,
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                         "code": "SMART-on-FHIR"}]}],
                "description": "OAuth2 client_credentials (SMART Backend Services private_key_jwt, or "
                               "client_secret_basic); bearer tokens live at most 300 seconds.",
                "extension": [{"url": _SMART_OAUTH, "extension": [
                    {"url": "token", "valueUri": f"{server_base}/auth/token"}]}],
            },
            "resource": [_resource(t, writable, accepts, reads, type_operations.get(t, [])) for t in chosen],
            **({"interaction": [{"code": "transaction"}, {"code": "batch"}]} if writable else {}),
            "searchParam": [{"name": name, "type": RESULT_PARAMS[name]} for name in result_params],
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
    Operation("passerelle-budget", "custodian", "budget", "A project's privacy budget",
              "GET reads a project's privacy budget and its history; POST raises its total ε (never "
              "lowers it), audited.", instances=("ResearchStudy",), affects_state=True, parameters=(
                  _param("total", "in", "decimal", "POST only: the new total ε (not lower than the current)."),
                  *_BUDGET_OUT)),
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
