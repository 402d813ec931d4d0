"""A model trained at one synthetic hospital scores the patients of another.

Hospital A (the `app` fixture) and hospital B (a second app on a database of its own, same
backend) each load the synthetic corpus, with different seeds. A research project at A, whose
patients all consent, trains through `/research/fhir/$train`; B imports the released `document`
with `flask --app wsgi model import` and scores every patient with `POST /fhir/$score`.

The model has one feature, the latest HbA1c, and learns "an HbA1c of 6.5 % or more within five
years of the index date": a strong signal (HbA1c persists), so at ε = 20 the learned coefficient
is positive whatever the noise draws (its sign was positive in every one of 1,500 trainings on
such a corpus), and B's patients with a higher HbA1c get a higher risk.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from consent import projects
from service import db
from service.auth import register_client
from service.scoring import assessment_id
from tests.conftest import initialised_app
from tests.fhir_helpers import write_corpus
from tests.gate_world import consent_to
from tests.research_world import bearer, token

#: Hospital A's population: the one whose training the docstring's 1,500 runs vouch for.
PATIENTS = 100
#: Hospital B's: scoring is deterministic, and its seed gives 24 patients with an HbA1c, 15 distinct values.
SCORED_PATIENTS = 30
HBA1C = "Observation?code=http://loinc.org|4548-4"
LOWER, UPPER = 4.0, 10.0


@pytest.fixture
def other_hospital(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> Iterator[Flask]:
    """Hospital B: the real application on a second database of the same backend as `app`'s."""
    directory = tmp_path / "hospital-b"
    directory.mkdir()
    if database_url.startswith("sqlite"):
        shutil.copyfile(request.getfixturevalue("sqlite_template"), directory / "passerelle.db")
        url = f"sqlite:///{directory / 'passerelle.db'}"
    else:
        url = request.getfixturevalue("pg_unmigrated_schema")
    application = initialised_app(url, directory)
    yield application
    application.extensions["passerelle.engine"].dispose()


def custodian(app: Flask, client: FlaskClient) -> dict[str, str]:
    with app.app_context(), db.write() as conn:
        registered = register_client(conn, "hospital custodian", "custodian")
    response = client.post("/auth/token", data={"grant_type": "client_credentials"},
                           auth=(registered["client_id"], registered["client_secret"]))
    return {**bearer(response.get_json()["access_token"]), "Content-Type": "application/fhir+json"}


def train_request() -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [
        {"name": "model", "valueCode": "logistic-regression"},
        {"name": "feature", "part": [{"name": "name", "valueString": "hba1c"},
                                     {"name": "expression", "valueString": HBA1C},
                                     {"name": "reduce", "valueCode": "latest"},
                                     {"name": "lower", "valueDecimal": LOWER},
                                     {"name": "upper", "valueDecimal": UPPER}]},
        {"name": "label", "part": [{"name": "has", "valueString": f"{HBA1C}&value-quantity=ge6.5"}]},
        {"name": "cohort", "valueString": HBA1C},
        {"name": "index-date", "valueDate": "2021-01-01"},
        {"name": "horizon", "valueString": "5 a"},
        {"name": "epsilon", "valueDecimal": 20.0},
    ]}


def trained_document(app: Flask, client: FlaskClient) -> str:
    """Hospital A: the corpus, a project every patient consents to, and the released model document."""
    headers = custodian(app, client)
    people, _ = write_corpus(client, headers, PATIENTS, seed=1)
    with app.app_context(), db.write() as conn:
        project = projects.create(conn, name="diabetes risk", tier="aggregate", epsilon=25.0, epsilon_cap=20.0,
                                  suppression=0).project_id
    for person in people:
        consent_to(app, person["id"], project, "aggregate")
    response = client.post("/research/fhir/$train", json=train_request(),
                           headers=bearer(token(client, app, "research", project)))
    assert response.status_code == 200, response.get_json()
    return next(p["valueString"] for p in response.get_json()["parameter"] if p["name"] == "document")


def latest_hba1c(client: FlaskClient, headers: dict[str, str], risk: dict[str, Any]) -> float | None:
    """The HbA1c the model read for this RiskAssessment's patient: the first Observation of its basis."""
    first = next((b["reference"] for b in risk["basis"] if b["reference"].startswith("Observation/")), None)
    if first is None:
        return None
    found = client.get(f"/fhir/{first}", headers=headers).get_json()
    return min(max(found["valueQuantity"]["value"], LOWER), UPPER)


def test_a_model_trained_at_one_hospital_scores_the_patients_of_another(app, client, other_hospital, tmp_path):
    document = trained_document(app, client)
    path = tmp_path / "diabetes.json"
    path.write_text(document)
    imported = other_hospital.test_cli_runner().invoke(args=["model", "import", str(path), "--name", "diabetes"])
    assert imported.exit_code == 0, imported.output

    b_client = other_hospital.test_client()
    headers = custodian(other_hospital, b_client)
    people, _ = write_corpus(b_client, headers, SCORED_PATIENTS, seed=2)
    response = b_client.post("/fhir/$score", headers=headers, json={"resourceType": "Parameters", "parameter": [
        {"name": "model", "valueString": "diabetes"}]})
    assert response.status_code == 200, response.get_json()
    assert {"name": "written", "valueInteger": len(people)} in response.get_json()["parameter"]

    scored = []
    for person in people:
        risk = b_client.get(f"/fhir/RiskAssessment/{assessment_id('diabetes', person['id'])}", headers=headers)
        assert risk.status_code == 200, person["id"]
        value = latest_hba1c(b_client, headers, risk.get_json())
        if value is not None:
            scored.append((value, risk.get_json()["prediction"][0]["probabilityDecimal"]))
    assert len({value for value, _ in scored}) > 5  # enough distinct HbA1c values to compare
    assert json.loads(document)["parameters"]["coefficients"][0] > 0
    for value, probability in scored:
        for other, other_probability in scored:
            if value < other:
                assert probability < other_probability, (value, probability, other, other_probability)
