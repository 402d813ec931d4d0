"""Custodian FHIR operations under `/fhir` (`$explain`, …): same auth and errors as CRUD."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from consent.materialise import explain
from service import auth, db
from service.api.fhirjson import check_format, fhir_response
from service.errors import InvalidRequest

bp = Blueprint("custodian_operations", __name__)


@bp.before_request
def _authenticate() -> None:
    check_format()
    auth.require("custodian")


def _required(name: str) -> str:
    value = request.args.get(name, "").strip()
    if not value:
        raise InvalidRequest(f"The parameter {name!r} is required", expression=name)
    return value.split("/")[-1]


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


@bp.get("/Consent/$explain")
def consent_explain() -> Response:
    """Why a patient's data is (or is not) released to a project."""
    patient_id, project_id = _required("patient"), _required("project")
    with db.read() as conn:
        return fhir_response(_parameters(explain(conn, patient_id, project_id)))
