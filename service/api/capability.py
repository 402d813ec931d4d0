"""The CapabilityStatement, generated from the search-parameter table.

Deriving it from `searchparams` means what the server advertises is exactly what the
query builder accepts.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import cache
from typing import Any

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
              reads: tuple[str, ...]) -> dict[str, Any]:
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
    return entry


def statement(base: str, *, writable: bool = True, types: tuple[str, ...] | None = None,
              description: str = "Passerelle custodian FHIR API",
              accepts: Callable[[SearchParam], bool] = lambda _: True,
              reads: tuple[str, ...] = _READ, result_params: Iterable[str] = tuple(RESULT_PARAMS)) -> dict[str, Any]:
    """A CapabilityStatement for a FHIR base URL (`writable` False for the read-only research view).

    `accepts` chooses the search parameters advertised, `result_params` the result
    parameters and `reads` the read interactions, so each API lists exactly what it answers.
    """
    chosen = types if types is not None else resource_types()
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
            "resource": [_resource(t, writable, accepts, reads) for t in chosen],
            **({"interaction": [{"code": "transaction"}, {"code": "batch"}]} if writable else {}),
            "searchParam": [{"name": name, "type": RESULT_PARAMS[name]} for name in result_params],
        }],
    }
