"""Scoring at the hospital: `model import|list` and `POST /fhir/$score`.

A model document is imported unchanged or refused whole; `$score` writes one valid, labelled
RiskAssessment per patient whose prediction is `policies.learning.predict` on features computed
by hand here, and refuses bad input before writing anything.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from consent import projects
from policies import learning
from policies.fhirdates import date_range
from policies.sensitivity import CUSTODIAN_ONLY_LABEL, MODEL_SYSTEM
from service import db
from service.audit import patients_named
from service.scoring import assessment_id
from service.store.schema import audit, models
from tests.fhir_helpers import create, observation, patient
from tests.gate_world import consent_to
from tests.research_world import bearer, token

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
HBA1C = "4548-4"
HYPERTENSION = "38341003"
DIABETES = "44054006"
DATE = "2024-01-01"
YEAR_US = 365.25 * 86_400 * 1_000_000

FEATURES = [
    {"name": "hba1c", "expression": f"Observation?code={LOINC}|{HBA1C}", "reduce": "latest", "lower": 4.0,
     "upper": 14.0, "missing": 5.5},
    {"name": "age", "builtin": "age", "lower": 18.0, "upper": 90.0, "missing": 54.0},
    {"name": "female", "builtin": "gender", "lower": 0.0, "upper": 1.0, "missing": 0.5},
    {"name": "hypertension", "has": f"Condition?code={SNOMED}|{HYPERTENSION}", "lower": 0.0, "upper": 1.0,
     "missing": 0.0},
]


def document(model: str = "logistic-regression", **changes: Any) -> dict[str, Any]:
    """A model document as `$train` releases one (numbers made up, shapes exact)."""
    label: dict[str, Any] = {"has": f"Condition?code={SNOMED}|{DIABETES}"}
    parameters: dict[str, Any] = {"coefficients": [3.0, 1.5, -0.25, 0.75], "intercept": -2.5}
    if model == "linear-regression":
        label = {"expression": f"Observation?code={LOINC}|39156-5", "reduce": "latest", "lower": 15.0,
                 "upper": 50.0}
        parameters = {"coefficients": [0.5, 0.25, 0.0, 0.1], "intercept": 0.1}
    design = learning.spec(model, FEATURES, label, "2019-01-01", "5 a")
    return {**learning.document(design, parameters, 1.0, 1234, "project-x", "2025-06-01T00:00:00Z"), **changes}


def text_of(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1)


def cli(app: Flask, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=list(args))


def import_model(app: Flask, tmp_path: Path, doc: dict[str, Any] | str, name: str = "diabetes", *extra: str) -> Any:
    path = tmp_path / f"{name}.json"
    path.write_text(doc if isinstance(doc, str) else text_of(doc))
    return cli(app, "model", "import", str(path), "--name", name, *extra)


def listed(app: Flask) -> list[dict[str, Any]]:
    result = cli(app, "model", "list")
    assert result.exit_code == 0, result.output
    return orjson.loads(result.output)["models"]


def score(client: FlaskClient, headers: dict[str, str], *parameters: dict[str, Any]) -> Any:
    return client.post("/fhir/$score", json={"resourceType": "Parameters", "parameter": list(parameters)},
                       headers=headers)


def named(name: str, **value: Any) -> dict[str, Any]:
    return {"name": name, **value}


def person(client: FlaskClient, headers: dict[str, str], gender: str, born: str, hba1c: tuple[tuple[str, float], ...],
           hypertensive: bool) -> str:
    made = create(client, headers, patient(gender=gender, birthDate=born))["id"]
    for when, value in hba1c:
        create(client, headers, observation(made, code=HBA1C, value=value, unit="%", when=when))
    if hypertensive:
        create(client, headers, {"resourceType": "Condition", "subject": {"reference": f"Patient/{made}"},
                                 "code": {"coding": [{"system": SNOMED, "code": HYPERTENSION}]},
                                 "onsetDateTime": "2015-03-01"})
    return made


def risk(client: FlaskClient, headers: dict[str, str], patient_id: str, name: str = "diabetes") -> dict[str, Any]:
    response = client.get(f"/fhir/RiskAssessment/{assessment_id(name, patient_id)}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def age_on(born: str, day: str) -> float:
    return (date_range(day)[0] - date_range(born)[0]) / YEAR_US


def stored_risks(client: FlaskClient, headers: dict[str, str]) -> int:
    response = client.get("/fhir/RiskAssessment?_total=accurate&_count=0", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["total"]


# -- model import ------------------------------------------------------------------------------


def test_a_released_document_is_imported_unchanged(app, tmp_path):
    text = text_of(document())
    result = import_model(app, tmp_path, text)
    assert result.exit_code == 0, result.output
    with app.app_context(), db.read() as conn:
        row = conn.execute(select(models.c.document, models.c.digest).where(models.c.name == "diabetes")).one()
    assert row.document == text
    assert row.digest == hashlib.sha256(text.encode()).hexdigest()
    assert [(m["name"], m["model"], m["digest"]) for m in listed(app)] == [
        ("diabetes", "logistic-regression", row.digest)]


INVALID = {
    "not JSON": ("{", "not JSON"),
    "a whole $train answer": (text_of({"resourceType": "Parameters", "parameter": []}), "'document' parameter"),
    "another format": (text_of(document(format="passerelle-model/0")), "format"),
    "bounds the wrong way round": (text_of({**document(), "features": [
        {**FEATURES[0], "lower": 14.0, "upper": 4.0}, *FEATURES[1:]]}), "features[0]"),
    "a coefficient missing": (text_of(document(parameters={"coefficients": [1.0, 2.0, 3.0], "intercept": 0.0})),
                              "parameters.coefficients"),
    "a coefficient given as text": (
        text_of(document(parameters={"coefficients": [3.0, "1.5", -0.25, 0.75], "intercept": -2.5})),
        "parameters.coefficients[1]"),
    "an infinite coefficient": (text_of(document()).replace('"intercept": -2.5', '"intercept": 1e400'),
                                "not JSON"),
    "an unknown model": (text_of({**document(), "model": "random-forest"}), "model"),
    "no provenance": (text_of({k: v for k, v in document().items() if k != "trained"}), "trained"),
}


@pytest.mark.parametrize("case", INVALID)
def test_an_invalid_document_is_refused_in_one_readable_line_and_nothing_is_stored(app, tmp_path, case):
    text, named_element = INVALID[case]
    result = import_model(app, tmp_path, text)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and named_element in lines[0], result.output
    assert listed(app) == []


def test_a_name_in_use_is_refused_without_replace_and_replaced_with_it(app, tmp_path):
    assert import_model(app, tmp_path, document()).exit_code == 0
    first = listed(app)
    newer = document(epsilon=2.0)
    refused = import_model(app, tmp_path, newer)
    assert refused.exit_code == 1 and "--replace" in refused.output
    assert listed(app) == first
    assert import_model(app, tmp_path, newer, "diabetes", "--replace").exit_code == 0
    assert listed(app)[0]["digest"] == hashlib.sha256(text_of(newer).encode()).hexdigest()


def test_a_name_that_is_no_code_is_refused(app, tmp_path):
    result = import_model(app, tmp_path, document(), "diabetes risk")
    assert result.exit_code == 1 and "model name" in result.output
    assert listed(app) == []


def test_an_import_is_audited_with_the_models_digest(app, tmp_path):
    assert import_model(app, tmp_path, document()).exit_code == 0
    with app.app_context(), db.read() as conn:
        detail = conn.execute(select(audit.c.detail).where(audit.c.action == "model-import")).scalar_one()
    assert orjson.loads(detail)["digest"] == listed(app)[0]["digest"]


# -- $score ------------------------------------------------------------------------------------


@pytest.fixture
def hospital(app, client, custodian_headers, tmp_path) -> dict[str, Any]:
    """Three patients with HbA1c before and after DATE, and the model imported as `diabetes`."""
    people = {
        "high": ("female", "1950-05-05", (("2023-06-01T08:00:00Z", 9.5), ("2024-06-01T08:00:00Z", 4.2)), True),
        "low": ("male", "1990-01-20", (("2022-02-01T08:00:00Z", 5.1),), False),
        "unmeasured": ("other", "1970-07-07", (), False),
    }
    ids = {role: person(client, custodian_headers, *facts) for role, facts in people.items()}
    assert import_model(app, tmp_path, document()).exit_code == 0
    return {"ids": ids, "people": people}


def test_score_writes_the_probability_learning_predicts_on_the_features_as_of_the_date(
        client, custodian_headers, hospital):
    response = score(client, custodian_headers, named("model", valueString="diabetes"),
                     named("date", valueDate=DATE))
    assert response.status_code == 200, response.get_json()
    assert {"name": "written", "valueInteger": 3} in response.get_json()["parameter"]
    model = learning.validate(document())
    hand = {  # hba1c before DATE (clipped), age at DATE, female, hypertension
        "high": [9.5, age_on("1950-05-05", DATE), 1.0, 1.0],
        "low": [5.1, age_on("1990-01-20", DATE), 0.0, 0.0],
        "unmeasured": [5.5, age_on("1970-07-07", DATE), 0.5, 0.0],
    }
    for role, row in hand.items():
        found = risk(client, custodian_headers, hospital["ids"][role])
        assert found["prediction"][0]["probabilityDecimal"] == pytest.approx(learning.predict(model, [row])[0],
                                                                             abs=1e-6)


def test_a_risk_assessment_names_its_patient_model_date_inputs_and_label(client, custodian_headers, hospital):
    assert score(client, custodian_headers, named("model", valueString="diabetes"),
                 named("date", valueDate=DATE)).status_code == 200
    high = hospital["ids"]["high"]
    found = risk(client, custodian_headers, high)
    assert found["status"] == "final"
    assert found["subject"] == {"reference": f"Patient/{high}"}
    assert found["occurrenceDateTime"] == DATE
    assert found["method"]["coding"] == [{"system": MODEL_SYSTEM, "code": "diabetes"}]
    assert found["meta"]["security"] == [CUSTODIAN_ONLY_LABEL]
    assert found["prediction"][0]["outcome"] == {"coding": [{"system": SNOMED, "code": DIABETES}]}
    assert found["prediction"][0]["whenPeriod"]["start"] == DATE
    basis = [b["reference"] for b in found["basis"]]
    before = client.get(f"/fhir/Observation?subject=Patient/{high}&date=lt{DATE}",
                        headers=custodian_headers).get_json()["entry"]
    conditions = client.get(f"/fhir/Condition?subject=Patient/{high}", headers=custodian_headers).get_json()["entry"]
    assert basis == [f"Patient/{high}", f"Observation/{before[0]['resource']['id']}",
                     f"Condition/{conditions[0]['resource']['id']}"]


def test_scoring_again_writes_the_next_version_of_each_risk_assessment(client, custodian_headers, hospital):
    for _ in range(2):
        assert score(client, custodian_headers, named("model", valueString="diabetes")).status_code == 200
    assert risk(client, custodian_headers, hospital["ids"]["low"])["meta"]["versionId"] == "2"
    assert stored_risks(client, custodian_headers) == 3


def test_patients_restricts_who_is_scored(client, custodian_headers, hospital):
    response = score(client, custodian_headers, named("model", valueString="diabetes"),
                     named("patients", valueString=f"Condition?code={SNOMED}|{HYPERTENSION}"))
    assert {"name": "written", "valueInteger": 1} in response.get_json()["parameter"]
    assert risk(client, custodian_headers, hospital["ids"]["high"])["subject"]["reference"].endswith(
        hospital["ids"]["high"])
    assert stored_risks(client, custodian_headers) == 1


def test_a_regression_model_names_the_predicted_value_in_the_outcome(app, client, custodian_headers, hospital,
                                                                     tmp_path):
    assert import_model(app, tmp_path, document("linear-regression"), "bmi").exit_code == 0
    assert score(client, custodian_headers, named("model", valueString="bmi"),
                 named("date", valueDate=DATE)).status_code == 200
    row = [5.1, age_on("1990-01-20", DATE), 0.0, 0.0]
    predicted = learning.predict(learning.validate(document("linear-regression")), [row])[0]
    prediction = risk(client, custodian_headers, hospital["ids"]["low"], "bmi")["prediction"][0]
    assert "probabilityDecimal" not in prediction
    assert prediction["outcome"]["text"] == f"latest of Observation?code={LOINC}|39156-5: {predicted:.6g}"


def test_score_is_audited_with_the_scored_patients(app, client, custodian_headers, hospital):
    assert score(client, custodian_headers, named("model", valueString="diabetes")).status_code == 200
    with app.app_context(), db.read() as conn:
        seq = conn.execute(select(audit.c.seq).where(audit.c.action == "score")).scalar_one()
        named_patients = set(patients_named(conn, [seq])[seq])
    assert named_patients == set(hospital["ids"].values())


BAD = {
    "no model": ((), "model"),
    "an unknown model": ((named("model", valueString="nope"),), "model"),
    "a model given as a number": ((named("model", valueInteger=3),), "model"),
    "a bad search": ((named("model", valueString="diabetes"), named("patients", valueString="Ailment?x=1")),
                     "patients"),
    "an unknown search parameter": ((named("model", valueString="diabetes"),
                                     named("patients", valueString="Condition?colour=blue")), "patients"),
    "a bad date": ((named("model", valueString="diabetes"), named("date", valueDate="2024-13-45")), "date"),
    "an unknown parameter": ((named("model", valueString="diabetes"), named("epsilon", valueDecimal=1.0)),
                             "epsilon"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_with_400_naming_the_parameter_and_writes_nothing(client, custodian_headers,
                                                                               hospital, case):
    parameters, name = BAD[case]
    response = score(client, custodian_headers, *parameters)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["issue"][0]["expression"] == [name]
    assert stored_risks(client, custodian_headers) == 0


def test_a_token_that_may_not_write_risk_assessments_cannot_score(app, client, hospital):
    from service.auth import register_client

    with app.app_context(), db.write() as conn:
        registered = register_client(conn, "reader", "custodian")
    granted = client.post("/auth/token", data={"grant_type": "client_credentials", "scope": "system/*.rs"},
                          auth=(registered["client_id"], registered["client_secret"])).get_json()
    response = score(client, bearer(granted["access_token"]), named("model", valueString="diabetes"))
    assert response.status_code == 403


def test_research_never_receives_a_scored_risk_assessment(app, client, custodian_headers, hospital):
    with app.app_context(), db.write() as conn:
        project = projects.create(conn, name="curious", tier="record", epsilon=5.0).project_id
    for patient_id in hospital["ids"].values():
        consent_to(app, patient_id, project, "record")
    assert score(client, custodian_headers, named("model", valueString="diabetes")).status_code == 200
    research = bearer(token(client, app, "research", project))
    body = client.get("/research/fhir/RiskAssessment", headers=research).get_json()
    assert body.get("entry", []) == []
    assert len(client.get("/research/fhir/Patient", headers=research).get_json()["entry"]) == 3
