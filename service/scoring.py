"""Scoring at the hospital: models released by `$train` imported, and applied by `$score`.

`import_model` accepts a model document exactly as `$train` released it: it is checked by
`policies.learning.validate` (the parser `$train` itself uses) and stored unchanged under a
name (service/store/models.py), audited in the same transaction.

`POST /fhir/$score` (`parse`, then `score`) applies an imported model to the custodian's own
patients: every Patient, or those a `patients` search matches (a search over another type
matches the patients who have a matching resource). Features are computed by
service/store/features.py over every stored row (`search.custodian_view`: no consent applies
on the custodian's side) with the document's bounds and `missing` values: with a `date`,
from data dated before it (undated data left out) and ages at it; without one, as of now —
from data dated before now when the model was trained with an index date, from all data
otherwise. `policies.learning.predict` gives each patient's probability (classification) or
predicted value (regression).

Each patient gets one RiskAssessment whose id is derived from the model's name and the
patient's id, so scoring again writes its next version: status final, the subject, the
occurrence (the date, or now), the method (the model's name in `MODEL_SYSTEM`), one
prediction, and as basis the Patient and, per feature, the patient's `BASIS_PER_FEATURE`
latest resources the feature reads. Every one carries the custodian-only security label
(policies/sensitivity.py `CUSTODIAN_ONLY_LABEL`), so no research path ever releases it
(service/release.py). They are validated as any stored resource and written through
`repository.upsert` (indexed, versioned, classified), in transactions of `BATCH`, each
audited with the patients it wrote for.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson
from sqlalchemy import Connection, false, func, select

from policies import learning
from policies.fhirdates import date_range, instant
from policies.sensitivity import CUSTODIAN_ONLY_LABEL, MODEL_SYSTEM
from service import audit, db
from service.errors import InvalidRequest
from service.parameters import expression, parameters, string, value_of
from service.store import features, models, repository, search
from service.store.cohort import Expression
from service.store.schema import resources
from service.training import design
from service.validation import validate

#: RiskAssessments written per transaction.
BATCH = 500
#: Per feature, how many of the patient's latest resources it reads `basis` names.
BASIS_PER_FEATURE = 5
#: What a model may be named: a FHIR code without spaces, at most 64 characters.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PARAMETERS = ("model", "patients", "date")


# -- importing -----------------------------------------------------------------------------------


def import_model(conn: Connection, name: str, text: str, actor: str, *, replace: bool) -> models.Stored:
    """Check a model document (the `document` a `$train` answer carries, as JSON text) and store it
    unchanged under `name`, audited, in the caller's transaction. `InvalidRequest` for a bad name
    or document (the message names what is wrong), `Conflict` for a name in use without `replace`."""
    if not NAME.fullmatch(name):
        raise InvalidRequest(f"model name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, "
                             "starting with a letter or digit)")
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"not JSON: {exc}") from None
    if isinstance(raw, dict) and raw.get("resourceType") == "Parameters":
        raise InvalidRequest("this is a whole $train answer: import the text of its 'document' parameter")
    learning.validate(raw)
    replaced = models.get(conn, name) is not None
    stored = models.put(conn, name, text, actor, replace=replace)
    audit.record(conn, actor=actor, action="model-import", project_id=None,
                 detail={"model": name, "digest": stored.digest, "replaced": replaced})
    return stored


# -- scoring -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scoring:
    """A checked `$score` request: the model, who is scored, and the date features are computed before."""

    name: str
    digest: str
    model: learning.Model
    cohort: tuple[Expression, ...]
    date: str | None


def parse(conn: Connection, body: Any) -> Scoring:
    """The `$score` Parameters checked (`InvalidRequest` naming the parameter): `model` (valueString,
    an imported model's name), optional `patients` (valueString, a FHIR search) and `date` (valueDate)."""
    items = parameters(body, "$score", _PARAMETERS)
    name = string(value_of(items, "model", required=True), "model")
    stored = models.get(conn, name)
    if stored is None:
        raise InvalidRequest(f"no model named {name!r} is imported (flask --app wsgi model list)", expression="model")
    patients = value_of(items, "patients")
    cohort = () if patients is None else (expression(string(patients, "patients"), "patients"),)
    date = value_of(items, "date")
    return Scoring(name, stored.digest, learning.validate(orjson.loads(stored.document)), cohort,
                   None if date is None else learning.index_date(date, "date"))


def score(scoring: Scoring) -> dict[str, Any]:
    """Score every patient of the request and write their RiskAssessments (module docstring);
    the answer is a Parameters resource saying how many were written and how to find them."""
    now = db.now_us()
    spec = scoring.model.spec
    index = (date_range(scoring.date)[0] if scoring.date is not None
             else now if spec.index_date is not None else None)
    planned = design(spec, scoring.cohort, now, index, label=False)
    with db.read() as conn:
        matrix = features.rows(conn, planned, search.custodian_view)
    predictions = learning.predict(scoring.model, matrix.values)
    occurrence = scoring.date or instant(now)
    written = 0
    for start in range(0, len(matrix.patients), BATCH):
        patients = matrix.patients[start:start + BATCH]
        with db.read() as conn:
            basis = _basis(conn, planned, patients)
        items = [("RiskAssessment", _assessment(scoring, patient, prediction, occurrence, index or now, basis))
                 for patient, prediction in zip(patients, predictions[start:start + BATCH], strict=True)]
        for _, resource in items:
            validate(resource, "RiskAssessment")
        with db.write() as conn:
            stored = repository.upsert(conn, items)
            audit.in_request(conn, {"type": "RiskAssessment", "model": scoring.name, "digest": scoring.digest,
                                    "resources": len(stored)}, patients)
        written += len(stored)
    return {"resourceType": "Parameters", "parameter": [
        {"name": "model", "valueString": scoring.name},
        {"name": "written", "valueInteger": written},
        {"name": "occurrence", "valueDateTime": occurrence},
        {"name": "search", "valueString": f"RiskAssessment?method={MODEL_SYSTEM}|{scoring.name}"},
    ]}


def assessment_id(name: str, patient_id: str) -> str:
    """The id of the RiskAssessment model `name` writes for a patient: the same at every scoring."""
    return "score-" + hashlib.sha256(f"{name}\n{patient_id}".encode()).hexdigest()[:48]


def _assessment(scoring: Scoring, patient_id: str, prediction: float, occurrence: str, start: int,
                basis: dict[str, list[str]]) -> dict[str, Any]:
    spec = scoring.model.spec
    return {
        "resourceType": "RiskAssessment",
        "id": assessment_id(scoring.name, patient_id),
        "meta": {"security": [CUSTODIAN_ONLY_LABEL]},
        "status": "final",
        "subject": {"reference": f"Patient/{patient_id}"},
        "occurrenceDateTime": occurrence,
        "method": {"coding": [{"system": MODEL_SYSTEM, "code": scoring.name}],
                   "text": f"{spec.model} model {scoring.name} (document sha256 {scoring.digest[:16]}, trained by "
                           f"project {scoring.model.trained['project']} at {scoring.model.trained['at']})"},
        "basis": [{"reference": reference} for reference in [f"Patient/{patient_id}", *basis.get(patient_id, ())]],
        "prediction": [_prediction(spec, prediction, occurrence, start)],
    }


#: The last instant a FHIR dateTime can name: a horizon reaching past it ends there.
_LAST_INSTANT = date_range("9999")[1]


def _prediction(spec: learning.Spec, value: float, occurrence: str, start: int) -> dict[str, Any]:
    """Classification: the probability of the label's outcome; regression: the predicted value, named
    in the outcome's text. With a horizon, the period the prediction is about."""
    label = spec.label
    if spec.classification:
        prediction: dict[str, Any] = {"outcome": _outcome(label.source), "probabilityDecimal": round(value, 6)}
    else:
        prediction = {"outcome": {"text": f"{label.reduce} of {label.source}: {value:.6g}"}}
    if spec.horizon is not None:
        end = instant(min(start + learning.horizon_us(spec.horizon), _LAST_INSTANT))
        prediction["whenPeriod"] = {"start": occurrence, "end": end}
    return prediction


def _outcome(source: str) -> dict[str, Any]:
    """The label as a CodeableConcept: its coding when it is one `code=system|code` search, else its text."""
    args = parse_qsl(source.partition("?")[2])
    if len(args) == 1 and args[0][0] == "code" and "," not in args[0][1] and "|" in args[0][1]:
        system, _, code = args[0][1].partition("|")
        if system and code:
            return {"coding": [{"system": system, "code": code}]}
    return {"text": source}


def _basis(conn: Connection, planned: features.Design, patients: Sequence[str]) -> dict[str, list[str]]:
    """Patient id → `Type/id` of the resources the features read (per feature, the patient's
    `BASIS_PER_FEATURE` latest by clinical date), each once, in feature order."""
    found: dict[str, list[str]] = {}
    for column in planned.features:
        if column.expression is None:
            continue  # age and gender come from the Patient, named first
        expr = column.expression
        rank = func.row_number().over(partition_by=resources.c.patient_id,
                                      order_by=(resources.c.clinical_low.desc().nulls_last(), resources.c.pk.desc()))
        ranked = (select(resources.c.patient_id, resources.c.type, resources.c.id, rank.label("rank"))
                  .where(resources.c.type == expr.resource_type, resources.c.deleted == false(),
                         resources.c.patient_id.in_(list(patients)), *expr.where,
                         *features.before_index(planned)).subquery())
        for patient_id, kind, resource_id in conn.execute(
                select(ranked.c.patient_id, ranked.c.type, ranked.c.id).where(ranked.c.rank <= BASIS_PER_FEATURE)
                .order_by(ranked.c.patient_id, ranked.c.rank)):
            reference = f"{kind}/{resource_id}"
            if reference not in found.setdefault(patient_id, []):
                found[patient_id].append(reference)
    return found
