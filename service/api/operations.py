"""Custodian FHIR operations under `/fhir` (`$explain`, …): same auth and errors as CRUD."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g, request

from consent import projects
from consent.materialise import explain
from policies import budget
from policies.fhirdates import instant
from service import audit, db, scoring
from service.api.fhirjson import check_format, fhir_response, parse_body
from service.api.scopes import require
from service.errors import InvalidRequest
from service.store import repository

bp = Blueprint("custodian_operations", __name__)


# Tokens and scopes are checked for every route by service/api/scopes.py.
bp.before_request(check_format)


def _required(name: str) -> str:
    """The id a required parameter names (`123` or `Patient/123`); refused unless it is a FHIR id."""
    value = request.args.get(name, "").strip()
    if not value:
        raise InvalidRequest(f"The parameter {name!r} is required", expression=name)
    return repository.check_id(value.split("/")[-1])


def _parameters(explanation: dict[str, Any]) -> dict[str, Any]:
    """The explanation as a FHIR Parameters resource (same content as `consent explain`)."""
    params: list[dict[str, Any]] = [
        {"name": "patient", "valueReference": {"reference": f"Patient/{explanation['patient']}"}},
        {"name": "project", "valueReference": {"reference": f"ResearchStudy/{explanation['project']}"}},
        {"name": "tier", "valueCode": explanation["tier"]},
    ]
    params += [{"name": "excluded", "valueCode": item} for item in explanation["excluded"]]
    for name in ("period", "valid"):
        if explanation[name]:
            period = {k: v for k, v in explanation[name].items() if v is not None}
            params.append({"name": name, "valuePeriod": period})
    params += [{"name": "basis", "valueString": line} for line in explanation["basis"]]
    return {"resourceType": "Parameters", "parameter": params}


def _budget(project_id: str) -> dict[str, Any]:
    with db.read() as conn:
        projects.get(conn, project_id)
        return budget_parameters(budget.status(conn, project_id))


def budget_parameters(status: dict[str, Any]) -> dict[str, Any]:
    """A project's budget (`budget.status`) as the Parameters of `$budget`, for the custodian's
    `ResearchStudy/<id>/$budget` and the research client's own `/research/fhir/$budget` alike."""
    project_id = status["project_id"]
    params: list[dict[str, Any]] = [
        {"name": "project", "valueReference": {"reference": f"ResearchStudy/{project_id}"}},
        *({"name": name, "valueDecimal": status[name]} for name in ("total", "spent", "remaining", "delta_total",
                                                                     "delta_spent", "delta_remaining")),
    ]
    for item in status["history"]:
        parts = [{"name": "kind", "valueCode": item["kind"]}, {"name": "epsilon", "valueDecimal": item["epsilon"]},
                 {"name": "at", "valueInstant": instant(item["ts"])}]
        if item["actor"]:
            parts.append({"name": "actor", "valueString": item["actor"]})
        if item["query_hash"]:
            parts.append({"name": "query", "valueString": item["query_hash"]})
        if item["question"]:
            parts.append({"name": "question", "valueString": item["question"]})
        params.append({"name": "spend", "part": parts})
    return {"resourceType": "Parameters", "parameter": params}


@bp.get("/ResearchStudy/<project_id>/$budget")
def budget_status(project_id: str) -> Response:
    """A project's privacy budget: total, spent, remaining and the history of spends."""
    answer = _budget(project_id)
    audit.disclosed({"type": "ResearchStudy", "id": project_id})
    return fhir_response(answer)


@bp.post("/ResearchStudy/<project_id>/$budget")
def budget_raise(project_id: str) -> Response:
    """Raise a project's total ε (never lower it); audited."""
    body = parse_body()
    values = {p.get("name"): p.get("valueDecimal") for p in (body.get("parameter") or [])
              if isinstance(p, dict)} if isinstance(body, dict) else {}
    total = values.get("total")
    if isinstance(total, bool) or not isinstance(total, (int, float)):
        raise InvalidRequest("send a Parameters resource with a decimal parameter 'total'", expression="total")
    with db.write() as conn:
        projects.raise_budget(conn, project_id, float(total), actor=g.principal.client_id)
    return fhir_response(_budget(project_id))


@bp.get("/Consent/$explain")
def consent_explain() -> Response:
    """Why a patient's data is (or is not) released to a project."""
    patient_id, project_id = _required("patient"), _required("project")
    with db.read() as conn:
        explanation = explain(conn, patient_id, project_id)
    audit.disclosed({"type": "Consent", "project": project_id}, [patient_id])
    return fhir_response(_parameters(explanation))


@bp.post("/$score")
def score() -> Response:
    """Apply an imported model to the custodian's patients: one RiskAssessment each (service/scoring.py)."""
    require("RiskAssessment", "cu")  # it writes them; the route's scope (scopes.py) covers what it reads
    body = parse_body()
    with db.read() as conn:
        scoring_request = scoring.parse(conn, body)
    return fhir_response(scoring.score(scoring_request))
