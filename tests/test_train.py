"""`$train`: ε accounting, replay, refusals, consent, one row per patient, dates, and what is released.

The world is built to fail: the patients who do not consent carry the opposite signal in
greater number, data dated after the index date (features) and before it (label) carry the
opposite signal too, so a model that saw any of it would learn the wrong sign. The world is built
once per test process and backend, and each test that uses it starts on a copy of it. Everything
runs on the real app and database (SQLite and PostgreSQL).
"""
from __future__ import annotations

import ast
import json
import re
import uuid
from pathlib import Path
from typing import Any, TypedDict

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from consent import engine, projects
from consent.materialise import refresh
from consent.web import disclosures as portal_disclosures
from policies import learning
from service import db, disclosures, synthetic, training
from service.release import release_for
from service.store import features, repository
from service.store.schema import resources
from tests.conftest import Recipe
from tests.fhir_helpers import observation, patient
from tests.research_world import bearer, token
from tests.test_aggregate import (
    DIABETES,
    HYPERTENSION,
    LOINC,
    SNOMED,
    WEIGHT,
    _parsed_profile_once_per_worker,  # noqa: F401 (autouse fixture)
    add_heavy_patient,
    budget_of,
    condition,
    consent,
    new_project,
    param,
    spent,
    top,
)

URL = "/research/fhir/$train"
BMI = "39156-5"
BMI_SEARCH = f"Observation?code={LOINC}|{BMI}"
DIABETES_SEARCH = f"Condition?code={SNOMED}|{DIABETES}"
INDEX = "2020-01-01"


# -- builders ----------------------------------------------------------------------------------


def feature(name: str, **parts: Any) -> dict[str, Any]:
    return {"name": "feature", "part": [param("name", name), *param("feature", **parts)["part"]]}


def bmi(lower: float = 15.0, upper: float = 50.0, **extra: Any) -> dict[str, Any]:
    return feature("bmi", expression=BMI_SEARCH, reduce="latest", lower=lower, upper=upper, **extra)


def train(*items: dict[str, Any], model: str = "logistic-regression", epsilon: float = 1.0,
          label: dict[str, Any] | None = None, index: str | None = INDEX, horizon: str | None = "5 a"
          ) -> dict[str, Any]:
    """A $train request: the features `items` (default: BMI), a diabetes label, the index date."""
    extra = [param("index-date", index)] if index else []
    extra += [param("horizon", horizon)] if horizon else []
    return {"resourceType": "Parameters", "parameter": [
        param("model", model), *(items or (bmi(),)), label or param("label", has=DIABETES_SEARCH),
        *extra, param("epsilon", epsilon)]}


def post(client: FlaskClient, headers: dict[str, str], body: Any, key: str | None = None) -> Any:
    extra = {"Idempotency-Key": key} if key else {}
    return client.post(URL, json=body, headers={**headers, **extra})


def document(body: dict[str, Any]) -> dict[str, Any]:
    return json.loads(top(body, "document"))


def matrix(app: Flask, project: str, body: dict[str, Any]) -> features.Matrix:
    """The rows $train trains on, read through the gate as $train reads them."""
    with app.app_context():
        release = release_for("test", project, engine.AGGREGATE)
        request = training.parse(body, release.project, app.config["MIN_EPSILON"])
        return release.training_rows(request.design(0), request.types)[0]


def people(app: Flask, rows: list[tuple[float, str | None, str]]) -> list[str]:
    """Patients written in one transaction, each (BMI measured before the index date, the onset
    of their diabetes or None, gender); each also has a BMI measured after the index date and a
    diabetes dated before it that say the opposite, which no training with this index date may see."""
    made, items = [], []
    for value, onset, gender in rows:
        patient_id = f"p-{uuid.uuid4().hex[:10]}"
        made.append(patient_id)
        items += [
            ("Patient", {**patient(family="Train", given="Someone", gender=gender, birthDate="1960-01-01"),
                         "id": patient_id}),
            ("Observation", observation(patient_id, code=BMI, value=value, unit="kg/m2", when="2019-06-01T10:00:00Z")),
            ("Observation", observation(patient_id, code=BMI, value=65.0 - value, unit="kg/m2",
                                        when="2021-06-01T10:00:00Z")),
        ]
        if onset is not None:
            items.append(("Condition", condition(patient_id, DIABETES, onset)))
        else:
            items.append(("Condition", condition(patient_id, DIABETES, "2015-01-01")))
    with app.app_context(), db.write() as conn:
        repository.upsert(conn, items)
    return made


class World(TypedDict):
    project: str
    consenting: list[str]
    refusing: list[str]


def build_world(app: Flask, client: FlaskClient, custodian_headers: dict[str, str]) -> World:
    """A project; 30 consenting patients whose diabetes follows a high BMI (onset within five years of the
    index date); 60 who do not consent, for whom it is the other way round."""
    project = new_project(app, epsilon=1000.0, cap=100.0, suppression=0)
    consenting = people(app, [(18.0 + i, "2022-03-01" if i >= 15 else None, "female" if i % 2 else "male")
                              for i in range(30)])
    refusing = people(app, [(18.0 + i % 30, "2022-03-01" if i % 30 < 15 else None, "female") for i in range(60)])
    for patient_id in consenting:
        consent(app, patient_id, project, "aggregate")
    return {"project": project, "consenting": consenting, "refusing": refusing}


@pytest.fixture
def world_recipe() -> Recipe:
    return build_world


@pytest.fixture
def project(request: pytest.FixtureRequest, app: Flask) -> str:
    """The project the test trains in: the world's when the test uses `world`, else a new one without patients."""
    if "world" in request.fixturenames:
        return request.getfixturevalue("world")["project"]
    return new_project(app, epsilon=1000.0, cap=100.0, suppression=0)


@pytest.fixture
def research(app: Flask, client: FlaskClient, project: str) -> dict[str, str]:
    return bearer(token(client, app, "research", project))


# -- what is trained on ------------------------------------------------------------------------


def test_the_rows_are_the_consenting_patients_one_each(app: Flask, project: str, world: World) -> None:
    rows = matrix(app, project, train())
    assert rows.patients == sorted(world["consenting"])


def test_features_use_only_data_before_the_index_date_and_the_label_only_data_after_it(
        app: Flask, project: str, world: World) -> None:
    rows = matrix(app, project, train())
    assert sorted(v for (v,) in rows.values) == [18.0 + i for i in range(30)]
    assert rows.labels == [1.0 if v >= 33.0 else 0.0 for (v,) in rows.values]


def test_data_dated_on_the_index_date_is_the_labels_not_the_features(app: Flask, project: str) -> None:
    [someone] = people(app, [(20.0, None, "female")])
    with app.app_context(), db.write() as conn:
        repository.upsert(conn, [
            ("Observation", observation(someone, code=BMI, value=45.0, unit="kg/m2", when=f"{INDEX}T00:00:00Z")),
            ("Condition", condition(someone, DIABETES, INDEX))])
    consent(app, someone, project, "aggregate")
    rows = matrix(app, project, train())
    assert (rows.values, rows.labels) == ([[20.0]], [1.0])


def test_with_an_index_date_a_feature_may_read_the_labels_search_before_it(app: Flask, project: str,
                                                                          world: World) -> None:
    """"Diagnosed before the index date" and "diagnosed within the horizon" are two variables."""
    rows = matrix(app, project, train(bmi(), feature("diabetic", has=DIABETES_SEARCH)))
    assert rows.labels is not None and len(rows.labels) == 30
    assert [diabetic for _, diabetic in rows.values] == [1.0 - y for y in rows.labels]


def test_the_label_ignores_data_after_the_horizon(app: Flask, project: str, world: World) -> None:
    rows = matrix(app, project, train(horizon="2 a"))  # the onsets are in 2022-03, past 2022-01-01
    assert rows.labels == [0.0] * 30


def test_without_an_index_date_features_and_label_read_all_data(app: Flask, project: str,
                                                                world: World) -> None:
    rows = matrix(app, project, train(index=None, horizon=None))
    assert sorted(v for (v,) in rows.values) == sorted(min(65.0 - 18.0 - i, 50.0) for i in range(30))  # the latest
    assert rows.labels == [1.0] * 30  # a diabetes at any date


def test_a_patient_with_1000_observations_gives_one_clipped_row(app: Flask, project: str,
                                                                world: World) -> None:
    heavy = add_heavy_patient(app)
    consent(app, heavy, project, "aggregate")
    weight = feature("weight", expression=f"Observation?code={LOINC}|{WEIGHT}", reduce="mean", lower=40.0,
                     upper=150.0)
    rows = matrix(app, project, train(weight, index=None, horizon=None))
    assert rows.patients.count(heavy) == 1 and len(rows.patients) == 31
    assert rows.values[rows.patients.index(heavy)] == [150.0]
    assert all(row == [95.0] for patient_id, row in zip(rows.patients, rows.values, strict=True)
               if patient_id != heavy)  # no weight: the declared missing value, the midpoint


def test_builtin_age_and_gender_and_has_features(app: Flask, project: str, world: World) -> None:
    rows = matrix(app, project, train(
        feature("age", builtin="age", lower=0.0, upper=100.0), feature("female", builtin="gender"),
        feature("hypertension", has=f"Condition?code={SNOMED}|{HYPERTENSION}")))
    ages = {round(age, 2) for age, _, _ in rows.values}
    assert ages == {60.0}  # born 1960-01-01, at the index date 2020-01-01
    assert sorted(female for _, female, _ in rows.values) == [0.0] * 15 + [1.0] * 15
    assert {has for _, _, has in rows.values} == {0.0}


# -- what is released --------------------------------------------------------------------------


def test_a_model_trained_on_real_signal_has_a_coefficient_of_the_right_sign(
        client: FlaskClient, research: dict[str, str], world: World) -> None:
    response = post(client, research, train(epsilon=100.0))
    assert response.status_code == 200, response.get_json()
    coefficients = document(response.get_json())["parameters"]["coefficients"]
    assert coefficients[0] > 0


def test_the_answer_carries_exactly_the_documents_numbers(client: FlaskClient, research: dict[str, str],
                                                          world: World) -> None:
    body = post(client, research, train(bmi(), feature("female", builtin="gender"), epsilon=5.0)).get_json()
    doc = document(body)
    coefficient = {p["part"][0]["valueString"]: p["part"][1]["valueDecimal"] for p in body["parameter"]
                   if p["name"] == "coefficient"}
    assert coefficient == {"bmi": doc["parameters"]["coefficients"][0],
                           "female": doc["parameters"]["coefficients"][1]}
    assert top(body, "intercept") == doc["parameters"]["intercept"]
    size = next(p["part"] for p in body["parameter"] if p["name"] == "training-size")
    assert size == [{"name": "suppressed", "valueBoolean": False}, {"name": "value", "valueInteger":
                                                                     doc["training_size"]}]
    assert top(body, "epsilon") == doc["epsilon"] == 5.0
    assert learning.validate(doc).spec.features[0].name == "bmi"


def test_naive_bayes_releases_per_class_means_and_variances(client: FlaskClient, research: dict[str, str],
                                                            world: World) -> None:
    body = post(client, research, train(model="naive-bayes", epsilon=5.0)).get_json()
    doc = document(body)
    classes = [p["part"] for p in body["parameter"] if p["name"] == "class"]
    assert [c[0]["valueInteger"] for c in classes] == [0, 1]
    assert [c[2]["part"][1]["valueDecimal"] for c in classes] == [row[0] for row in doc["parameters"]["theta"]]
    assert [c[3]["part"][1]["valueDecimal"] for c in classes] == [row[0] for row in doc["parameters"]["var"]]


def test_linear_regression_learns_a_bounded_value(client: FlaskClient, research: dict[str, str],
                                                  world: World) -> None:
    label = param("label", expression=BMI_SEARCH, reduce="max", lower=15.0, upper=50.0)
    response = post(client, research, train(feature("female", builtin="gender"), model="linear-regression",
                                            label=label, index=None, horizon=None, epsilon=10.0))
    assert response.status_code == 200, response.get_json()
    assert len(document(response.get_json())["parameters"]["coefficients"]) == 1


def test_evaluation_is_a_noisy_confusion_matrix_paid_by_the_same_epsilon(
        app: Flask, client: FlaskClient, research: dict[str, str], project: str,
        world: World) -> None:
    body = train(epsilon=10.0)
    body["parameter"].append(param("evaluate", True))
    response = post(client, research, body)
    assert response.status_code == 200, response.get_json()
    evaluation = {p["name"]: p for p in next(p["part"] for p in response.get_json()["parameter"]
                                             if p["name"] == "evaluation")}
    assert set(evaluation) == {"true-positive", "false-positive", "true-negative", "false-negative", "epsilon"}
    assert spent(app, project) == 10.0


def test_a_training_set_below_the_suppression_threshold_withholds_the_model(
        app: Flask, client: FlaskClient, world: World) -> None:
    small = new_project(app, epsilon=10.0, cap=1.0, suppression=1000)
    for patient_id in world["consenting"]:
        consent(app, patient_id, small, "aggregate")
    response = post(client, bearer(token(client, app, "research", small)), train())
    assert response.status_code == 200, response.get_json()
    names = [p["name"] for p in response.get_json()["parameter"]]
    assert "document" not in names and "coefficient" not in names and "withheld" in names
    assert next(p["part"] for p in response.get_json()["parameter"] if p["name"] == "training-size") == [
        {"name": "suppressed", "valueBoolean": True}]
    assert spent(app, small) == 1.0


def readme_example() -> dict[str, Any]:
    """The `$train` request of the README's diabetes-risk example, as written there."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = re.search(r'\$train", headers=.*?, json=(\{.*?\})\)\.json\(\)', readme, re.S)
    assert body is not None
    return ast.literal_eval(body[1])


def test_the_readme_example_trains_a_diabetes_model_on_synthetic_patients(app: Flask, client: FlaskClient) -> None:
    # 240 patients: a training set of ~135 (120 gave ~65, and its noisy size at the README's ε fell below the
    # suppression threshold in about one training in forty, withholding the model).
    with app.app_context(), db.write() as conn:
        repository.upsert(conn, [(r["resourceType"], r) for r in synthetic.ndjson_resources(240, seed=16)
                                 if r["resourceType"] in ("Patient", "Condition", "Observation")])
    synthetic_project = new_project(app, epsilon=10.0, cap=1.0, suppression=11)
    assert matrix(app, synthetic_project, readme_example()).patients == []  # nobody consents yet
    with app.app_context(), db.read() as conn:
        ids = conn.execute(select(resources.c.id).where(resources.c.type == "Patient")).scalars().all()
    for patient_id in ids:
        consent(app, patient_id, synthetic_project, "aggregate")
    response = post(client, bearer(token(client, app, "research", synthetic_project)), readme_example())
    assert response.status_code == 200, response.get_json()
    model = learning.validate(document(response.get_json()))
    assert [f.name for f in model.spec.features] == ["bmi", "hba1c", "age", "hypertension", "diabetic"]
    assert model.spec.index_date == "2021-01-01" and model.spec.horizon == "5 a"


def test_a_training_is_disclosed_to_its_patients_as_a_statistical_answer_not_records(
        app: Flask, client: FlaskClient, research: dict[str, str], project: str, world: World) -> None:
    assert post(client, research, train(epsilon=0.5)).status_code == 200
    with app.app_context(), db.read() as conn:
        [told] = portal_disclosures.received(conn, world["consenting"][0])
        [release] = disclosures.disclosures(conn, world["consenting"][0])["releases"]
        report = disclosures.project_report(conn, project)
        assert portal_disclosures.received(conn, world["refusing"][0]) == []
    assert (told.answers, told.epsilon, told.record_days) == (1, 0.5, ())
    assert (release["kind"], release["action"], release["resources"]) == ("aggregate", "train", 0)
    assert (report["patients"], report["patients_in_aggregates"], report["releases"]) == (0, 30, {"train": 1})


# -- ε accounting --------------------------------------------------------------------------------


def test_a_training_spends_its_epsilon_and_a_replay_spends_nothing(
        app: Flask, client: FlaskClient, research: dict[str, str], project: str,
        world: World) -> None:
    first = post(client, research, train(epsilon=0.5))
    again = post(client, research, train(epsilon=0.5))
    assert first.status_code == again.status_code == 200
    assert first.get_json() == again.get_json()
    assert spent(app, project) == 0.5
    assert top(again.get_json(), "remaining") == 999.5


def test_an_idempotency_key_gives_the_recorded_answer(app: Flask, client: FlaskClient, research: dict[str, str],
                                                      project: str, world: World) -> None:
    first = post(client, research, train(epsilon=0.5), key="k-1")
    consent(app, world["consenting"][0], project, "none")  # new data: only the key can recall the answer
    again = post(client, research, train(epsilon=0.5), key="k-1")
    assert first.status_code == again.status_code == 200
    assert first.get_json() == again.get_json()
    assert spent(app, project) == 0.5


def test_a_withdrawn_patient_is_not_in_the_next_training(app: Flask, client: FlaskClient, research: dict[str, str],
                                                         custodian_headers: dict[str, str], project: str,
                                                         world: World) -> None:
    post(client, research, train(epsilon=0.5))
    withdrawn = world["consenting"][0]
    consent(app, withdrawn, project, "none")
    assert withdrawn not in matrix(app, project, train()).patients
    post(client, research, train(epsilon=0.5))
    assert spent(app, project) == 1.0  # the data changed: computed again, not replayed
    history = budget_of(client, custodian_headers, project)["history"]
    assert [entry["kind"] for entry in history].count("query") == 2


def test_an_exhausted_budget_is_refused_403_too_costly(app: Flask, client: FlaskClient,
                                                       world: World) -> None:
    poor = new_project(app, epsilon=1.0, cap=1.0, suppression=0)
    for patient_id in world["consenting"]:
        consent(app, patient_id, poor, "aggregate")
    headers = bearer(token(client, app, "research", poor))
    assert post(client, headers, train(epsilon=0.75)).status_code == 200
    refused = post(client, headers, train(bmi(upper=60.0), epsilon=0.75))
    assert refused.status_code == 403 and refused.get_json()["issue"][0]["code"] == "too-costly"
    assert spent(app, poor) == 0.75


def test_a_record_tier_project_may_train_too(app: Flask, client: FlaskClient, world: World) -> None:
    records = new_project(app, tier="record", epsilon=10.0, cap=1.0, suppression=0)
    for patient_id in world["consenting"]:
        consent(app, patient_id, records, "aggregate")
    assert post(client, bearer(token(client, app, "research", records)), train()).status_code == 200


def test_a_cohort_whose_noisy_size_is_above_the_row_limit_is_refused_and_its_epsilon_stays_spent(
        app: Flask, client: FlaskClient, research: dict[str, str], project: str, world: World) -> None:
    app.config["TRAIN_MAX_ROWS"] = 20  # 30 patients, whose size ε (10) buys noise of a patient or less
    response = post(client, research, train(epsilon=100.0))
    assert response.status_code == 400 and "PASSERELLE_TRAIN_MAX_ROWS" in response.get_json()["issue"][0]["diagnostics"]
    assert spent(app, project) == 100.0


# -- refusals before anything is spent -----------------------------------------------------------

TOO_MANY = [feature(f"f{i}", builtin="age", lower=0.0, upper=100.0) for i in range(21)]
BAD = {
    "unknown model": (train(model="random-forest"), "model"),
    "no bounds": (train(feature("bmi", expression=BMI_SEARCH)), "feature[0].lower"),
    "too many features": (train(*TOO_MANY), "feature"),
    "label equal to a feature": (train(feature("d", has=DIABETES_SEARCH), index=None, horizon=None), "label"),
    "model and label mismatch": (train(model="linear-regression"), "label"),
    "horizon without index date": (train(index=None), "horizon"),
    "duplicate feature names": (train(bmi(), bmi()), "feature[1].name"),
    "missing outside the bounds": (train(bmi(missing=60.0)), "feature[0].missing"),
    "bounds on a 0/1 feature": (train(feature("f", builtin="gender", lower=0.0, upper=2.0)), "feature[0].lower"),
    "an unknown feature part": (train(feature("f", builtin="age", lower=0.0, upper=1.0, colour="red")),
                                "feature.colour"),
    "a search that does not parse": (train(feature("f", has="Condition?nonsense=1")), "feature[0].has"),
    "a feature without a quantity": (train(feature("f", expression=f"Condition?code={SNOMED}|{HYPERTENSION}",
                                                   lower=0.0, upper=1.0)),
                                     "feature[0].expression"),
    "a bad horizon": (train(horizon="5 parsecs"), "horizon"),
    "a bad index date": (train(index="2020-13-01"), "index-date"),
    "epsilon above the cap": (train(epsilon=1000.0), "epsilon"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_400_before_anything_is_spent(app: Flask, client: FlaskClient, research: dict[str, str],
                                                           project: str, case: str) -> None:
    body, where = BAD[case]
    response = post(client, research, body)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["issue"][0]["expression"] == [where]
    assert spent(app, project) == 0.0


def test_a_type_the_project_does_not_receive_is_refused_before_anything_is_spent(
        app: Flask, client: FlaskClient) -> None:
    with app.app_context(), db.write() as conn:
        narrow = projects.create(conn, name="observations only", tier="aggregate", epsilon=10.0,
                                 types=("Patient", "Observation")).project_id
        refresh(conn, project_ids=[narrow])
    response = post(client, bearer(token(client, app, "research", narrow)), train())  # the label is a Condition
    assert response.status_code == 403, response.get_json()
    assert spent(app, narrow) == 0.0
