"""Attacks on `$train` by a research partner holding a valid token: what they must not learn or reach.

Each test is one attempt, named for the behaviour that defeats it. The rows a training reads are
checked through the gate exactly as `$train` reads them (`tests.test_train.matrix`); refusals and
spending through the real route. Everything runs on SQLite and PostgreSQL.
"""
from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from consent import engine, projects
from consent.materialise import refresh
from policies import learning
from policies.sensitivity import CUSTODIAN_ONLY_LABEL
from service import db
from service.audit import patients_named
from service.config import load_config
from service.release import release_for
from service.store import repository
from service.store.schema import answers, audit
from tests.fhir_helpers import create, observation, patient
from tests.gate_world import consent_to, encounter
from tests.research_world import bearer, token
from tests.test_aggregate import (
    DEPRESSION,
    DIABETES,
    HYPERTENSION,
    LOINC,
    SNOMED,
    _parsed_profile_once_per_worker,  # noqa: F401 (autouse fixture)
    condition,
    consent,
    count,
    new_project,
    param,
    spent,
)
from tests.test_aggregate import post as ask
from tests.test_train import (
    BMI,
    BMI_SEARCH,
    DIABETES_SEARCH,
    bmi,
    document,
    feature,
    matrix,
    people,
    post,
    train,
)

HIV = "86406008"
PHQ9 = "44261-6"
PHQ9_SEARCH = f"Observation?code={LOINC}|{PHQ9}"
DEPRESSION_SEARCH = f"Condition?code={SNOMED}|{DEPRESSION}"


@pytest.fixture
def project(app: Flask) -> str:
    return new_project(app, epsilon=1000.0, cap=100.0, suppression=0)


@pytest.fixture
def research(app: Flask, client: FlaskClient, project: str) -> dict[str, str]:
    return bearer(token(client, app, "research", project))


def someone(app: Flask, *resources: tuple[str, dict[str, Any]], gender: str = "female") -> str:
    """A patient (born 1960) with a BMI of 30 measured in 2019, and `resources` built for them:
    each a (type, resource) whose "PATIENT" subject is replaced by theirs."""
    patient_id = f"a-{uuid.uuid4().hex[:10]}"
    items = [("Patient", {**patient(family="Attack", given="Target", gender=gender, birthDate="1960-01-01"),
                          "id": patient_id}),
             ("Observation", observation(patient_id, code=BMI, value=30.0, unit="kg/m2", when="2019-06-01T10:00:00Z"))]
    for kind, resource in resources:
        items.append((kind, json.loads(json.dumps(resource).replace("PATIENT", patient_id))))
    with app.app_context(), db.write() as conn:
        repository.upsert(conn, items)
    return patient_id


def phq9(score: float, when: str = "2019-03-01T10:00:00Z") -> tuple[str, dict[str, Any]]:
    return "Observation", observation("PATIENT", code=PHQ9, value=score, unit="{score}", when=when)


def depressed(onset: str = "2019-02-01") -> tuple[str, dict[str, Any]]:
    return "Condition", condition("PATIENT", DEPRESSION, onset)


def row_of(app: Flask, project: str, body: dict[str, Any], patient_id: str) -> tuple[list[float], float] | None:
    """The (features, label) row `$train` would train on for one patient, or None if they are not in it."""
    rows = matrix(app, project, body)
    if patient_id not in rows.patients:
        return None
    at = rows.patients.index(patient_id)
    assert rows.labels is not None
    return rows.values[at], rows.labels[at]


def refused(response: Any, app: Flask, project: str, status: int = 400) -> None:
    assert response.status_code == status, response.get_json()
    assert response.get_json()["resourceType"] == "OperationOutcome"
    assert spent(app, project) == 0.0


# -- consent: who and what may be trained on ---------------------------------------------------


def test_patients_who_refused_never_answered_or_withdrew_give_no_row(app: Flask, project: str) -> None:
    consenting, refusing, withdrawn, _silent = (someone(app) for _ in range(4))
    consent(app, consenting, project, "aggregate")
    consent(app, refusing, project, "none")
    consent(app, withdrawn, project, "aggregate")
    consent(app, withdrawn, project, "none")
    assert matrix(app, project, train()).patients == [consenting]


@pytest.mark.parametrize("position", ["cohort", "expression", "has", "label"])
def test_an_excluded_category_reaches_no_position_of_a_training(app: Flask, project: str, position: str) -> None:
    private = someone(app, depressed(), phq9(25.0))
    open_ = someone(app, depressed(), phq9(25.0))
    consent(app, private, project, "aggregate", exclude=("mental-health",))
    consent(app, open_, project, "aggregate")
    body = {
        "cohort": train(index=None, horizon=None),
        "expression": train(feature("phq9", expression=PHQ9_SEARCH, lower=0.0, upper=27.0, missing=0.0),
                            index=None, horizon=None),
        "has": train(feature("depressed", has=DEPRESSION_SEARCH), index=None, horizon=None),
        "label": train(label=param("label", has=DEPRESSION_SEARCH), index=None, horizon=None),
    }[position]
    if position == "cohort":
        body["parameter"].append(param("cohort", DEPRESSION_SEARCH))
        assert matrix(app, project, body).patients == [open_]
        return
    kept, withheld = row_of(app, project, body, open_), row_of(app, project, body, private)
    assert kept is not None and withheld is not None
    if position == "label":
        assert (kept[1], withheld[1]) == (1.0, 0.0)
    else:
        assert (kept[0][0], withheld[0][0]) == ((25.0, 0.0) if position == "expression" else (1.0, 0.0))


def test_an_observation_made_during_an_hiv_visit_is_withheld_from_a_patient_who_excluded_hiv(
        app: Flask, project: str) -> None:
    def visited() -> str:
        patient_id = someone(app, ("Condition", {**condition("PATIENT", HIV, "2018-01-01"), "id": "PATIENT-hiv"}))
        with app.app_context(), db.write() as conn:
            repository.upsert(conn, [
                ("Encounter", {**encounter(patient_id, "185349003", "2019-05-01T10:00:00Z",
                                           diagnosis=[{"condition": {"reference": f"Condition/{patient_id}-hiv"}}]),
                               "id": f"{patient_id}-visit"}),
                ("Observation", observation(patient_id, code=PHQ9, value=12.0, unit="{score}",
                                            encounter={"reference": f"Encounter/{patient_id}-visit"}))])
        return patient_id
    private, open_ = visited(), visited()
    consent(app, private, project, "aggregate", exclude=("hiv",))
    consent(app, open_, project, "aggregate")
    body = train(feature("measured", has=PHQ9_SEARCH), index=None, horizon=None)
    assert row_of(app, project, body, open_) == ([1.0], 0.0)
    assert row_of(app, project, body, private) == ([0.0], 0.0)


def test_a_consent_data_period_limits_what_every_feature_and_the_label_read(app: Flask, project: str) -> None:
    limited = someone(app, phq9(20.0, "2018-03-01T10:00:00Z"), phq9(5.0, "2021-03-01T10:00:00Z"),
                      ("Condition", condition("PATIENT", DIABETES, "2021-02-01")))
    consent_to(app, limited, project, "aggregate", provision=[{"type": "deny", "dataPeriod": {"end": "2019-12-31"}}])
    body = train(feature("phq9", expression=PHQ9_SEARCH, reduce="max", lower=0.0, upper=27.0, missing=0.0),
                 feature("count", expression=PHQ9_SEARCH, reduce="count", lower=0.0, upper=10.0),
                 index=None, horizon=None)
    assert row_of(app, project, body, limited) == ([5.0, 1.0], 1.0)


def test_an_excluded_resource_class_is_read_by_no_feature_or_label(app: Flask, project: str) -> None:
    no_conditions = someone(app, depressed(), ("Condition", condition("PATIENT", DIABETES, "2021-02-01")))
    consent_to(app, no_conditions, project, "aggregate", provision=[
        {"type": "deny", "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Condition"}]}])
    body = train(bmi(), feature("depressed", has=DEPRESSION_SEARCH), index=None, horizon=None)
    assert row_of(app, project, body, no_conditions) == ([30.0, 0.0], 0.0)


def test_only_the_current_version_of_a_live_resource_is_trained_on(app: Flask, client: FlaskClient,
                                                                    custodian_headers: dict[str, str],
                                                                    project: str) -> None:
    target = someone(app)
    consent(app, target, project, "aggregate")
    once = create(client, custodian_headers, condition(target, DIABETES, "2021-02-01"))
    moved = create(client, custodian_headers, observation(target, code=PHQ9, value=20.0, unit="{score}"))
    moved["code"]["coding"][0]["code"] = "8480-6"  # now a blood pressure: its old version was a PHQ-9
    assert client.put(f"/fhir/Observation/{moved['id']}", json=moved, headers=custodian_headers).status_code == 200
    assert client.delete(f"/fhir/Condition/{once['id']}", headers=custodian_headers).status_code in (200, 204)
    body = train(feature("phq9", has=PHQ9_SEARCH), index=None, horizon=None)
    assert row_of(app, project, body, target) == ([0.0], 0.0)


def test_data_of_another_patient_counts_for_that_patient_only(app: Flask, client: FlaskClient,
                                                              custodian_headers: dict[str, str], project: str) -> None:
    """A refusing patient's Condition naming a consenting one (as asserter, here) is the refusing patient's."""
    consenting, refusing = someone(app), someone(app)
    consent(app, consenting, project, "aggregate")
    consent(app, refusing, project, "none")
    create(client, custodian_headers, {**condition(refusing, DIABETES, "2021-02-01"),
                                       "asserter": {"reference": f"Patient/{consenting}"}})
    assert row_of(app, project, train(index=None, horizon=None), consenting) == ([30.0], 0.0)


def test_a_custodian_only_resource_reaches_no_training(app: Flask, project: str) -> None:
    labelled = someone(app, ("Condition", {**condition("PATIENT", DIABETES, "2021-02-01"),
                                           "meta": {"security": [CUSTODIAN_ONLY_LABEL]}}))
    consent(app, labelled, project, "aggregate")
    assert row_of(app, project, train(bmi(), feature("d", has=DIABETES_SEARCH)), labelled) == ([30.0, 0.0], 0.0)
    with_cohort = train(index=None, horizon=None)
    with_cohort["parameter"].append(param("cohort", DIABETES_SEARCH))
    assert matrix(app, project, with_cohort).patients == []


def test_a_resource_containing_an_hiv_result_is_withheld_from_a_patient_who_excluded_hiv(app: Flask,
                                                                                        project: str) -> None:
    hiv_test = {"resourceType": "Observation", "id": "result", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "7917-8"}]}}  # HIV 1 antibody
    private, open_ = (someone(app, ("Condition", {**condition("PATIENT", HYPERTENSION, "2019-01-01"),
                                                  "contained": [hiv_test],
                                                  "evidence": [{"detail": [{"reference": "#result"}]}]}))
                      for _ in range(2))
    consent(app, private, project, "aggregate", exclude=("hiv",))
    consent(app, open_, project, "aggregate")
    body = train(feature("hypertensive", has=f"Condition?code={SNOMED}|{HYPERTENSION}"), index=None, horizon=None)
    assert row_of(app, project, body, open_) == ([1.0], 0.0)
    assert row_of(app, project, body, private) == ([0.0], 0.0)


def test_a_closed_project_trains_nothing_and_spends_nothing(app: Flask, client: FlaskClient,
                                                           research: dict[str, str], project: str) -> None:
    consent(app, someone(app), project, "aggregate")
    result = app.test_cli_runner().invoke(args=["project", "close", project])
    assert result.exit_code == 0, result.output
    assert post(client, research, train()).status_code in (401, 403)
    assert spent(app, project) == 0.0


# -- what a search may name --------------------------------------------------------------------

CHAINS = ["Observation?subject:Patient.gender=female", "Observation?_has:Observation:has-member:status=final",
          "Patient?_has:Condition:subject:code=http://snomed.info/sct|44054006",
          "Condition?subject:Patient.name=Target"]


def _everywhere(search: str, position: str) -> dict[str, Any]:
    """A $train request with `search` in one position (it may not carry a quantity: then a count)."""
    if position == "cohort":
        body = train()
        body["parameter"].append(param("cohort", search))
        return body
    if position == "expression":
        return train(feature("x", expression=search, reduce="count", lower=0.0, upper=5.0))
    if position == "has":
        return train(bmi(), feature("x", has=search))
    return train(label=param("label", has=search))


@pytest.mark.parametrize("position", ["cohort", "expression", "has", "label"])
@pytest.mark.parametrize("search", CHAINS)
def test_a_chain_or_has_in_any_search_is_refused_before_anything_is_spent(
        app: Flask, client: FlaskClient, research: dict[str, str], project: str, search: str, position: str) -> None:
    """Computed answers do not follow references: a chain or `_has` is refused, never silently dropped."""
    refused(post(client, research, _everywhere(search, position)), app, project)


def test_aggregate_refuses_the_chains_train_refuses(app: Flask, client: FlaskClient, research: dict[str, str],
                                                     project: str) -> None:
    for search in CHAINS:
        refused(ask(client, research, count(search)), app, project)


@pytest.mark.parametrize("search", [
    "Observation?_text=depression", "Observation?_content=hiv", "Observation?_filter=code eq 1",
    "Observation?_list=x", "Observation?_type=Condition", "Observation?_sort=value-quantity",
    "Observation?_include=Observation:subject", "Observation?_revinclude=Provenance:target",
    "Observation?_count=1", "Observation?_elements=subject", "AuditEvent?agent=x", "Consent?status=active",
    "Provenance?agent=x", "Practitioner?name=x", "Medication?code=x", "Observation?code=http://nowhere|1",
    "Observation?code=x&code=y&code=z&code=a&code=b&code=c&code=d&code=e&code=f&code=g&code=h&code=i&code=j"
    "&code=k&code=l&code=m&code=n&code=o&code=p&code=q&code=r",
])
@pytest.mark.parametrize("position", ["cohort", "has"])
def test_a_search_outside_the_computed_answers_vocabulary_is_refused_before_anything_is_spent(
        app: Flask, client: FlaskClient, research: dict[str, str], project: str, search: str, position: str) -> None:
    response = post(client, research, _everywhere(search, position))
    assert response.status_code in (400, 403), response.get_json()
    assert spent(app, project) == 0.0


IDENTIFYING = ["Patient?identifier=urn:oid:1.2.250.1.213.1.4.8|1610475123456", "Patient?name=Dupont",
               "Patient?family=Dupont", "Patient?telecom=0612345678", "Patient?address-city=Paris",
               "Patient?_id=p-123", "Observation?subject=Patient/p-123", "Observation?patient=p-123",
               "Observation?code:text=depression", "Condition?_security=R"]


@pytest.mark.parametrize("position", ["cohort", "has"])
@pytest.mark.parametrize("search", IDENTIFYING)
def test_a_training_may_not_search_by_an_identifying_value(app: Flask, client: FlaskClient, research: dict[str, str],
                                                           project: str, search: str, position: str) -> None:
    """No statistical use, a way to single a patient out, and the question is kept in the ledger and the audit."""
    refused(post(client, research, _everywhere(search, position)), app, project)


@pytest.mark.parametrize("search", IDENTIFYING)
def test_an_aggregate_may_not_search_by_an_identifying_value(app: Flask, client: FlaskClient,
                                                             research: dict[str, str], project: str,
                                                             search: str) -> None:
    refused(ask(client, research, count(search)), app, project)


@pytest.mark.parametrize("position", ["cohort", "expression", "has", "label"])
def test_a_type_the_project_does_not_receive_is_refused_in_every_position(app: Flask, client: FlaskClient,
                                                                          position: str) -> None:
    with app.app_context(), db.write() as conn:
        narrow = projects.create(conn, name="no conditions", tier="aggregate", epsilon=10.0,
                                 types=("Patient", "Observation", "Encounter")).project_id
        refresh(conn, project_ids=[narrow])
    search = "Condition?code=http://snomed.info/sct|38341003"
    body = _everywhere(search, position)
    if position != "label":
        body = {**body, "parameter": [p for p in body["parameter"] if p["name"] != "label"]
                + [param("label", has=PHQ9_SEARCH)]}
    refused(post(client, bearer(token(client, app, "research", narrow)), body), app, narrow, 403)


def test_a_builtin_is_refused_to_a_project_that_does_not_receive_patients(app: Flask, client: FlaskClient) -> None:
    with app.app_context(), db.write() as conn:
        narrow = projects.create(conn, name="observations", tier="aggregate", epsilon=10.0,
                                 types=("Observation",)).project_id
        refresh(conn, project_ids=[narrow])
    body = train(feature("age", builtin="age", lower=0.0, upper=100.0), label=param("label", has=PHQ9_SEARCH))
    refused(post(client, bearer(token(client, app, "research", narrow)), body), app, narrow, 403)


# -- the request itself ------------------------------------------------------------------------

JUNK = [float("nan"), float("inf"), -float("inf"), "1.0", True, 10 ** 400, 1e300, -1e10, [], {}]


def _with_number(position: str, value: Any) -> dict[str, Any]:
    if position == "epsilon":
        body = train()
        next(p for p in body["parameter"] if p["name"] == "epsilon")["valueDecimal"] = value
        return body
    if position == "horizon":
        body = train(horizon=None)
        body["parameter"].append({"name": "horizon", "valueQuantity": {"value": value, "unit": "a",
                                                                       "system": "http://unitsofmeasure.org"}})
        return body
    if position.startswith("label."):
        label = param("label", expression=BMI_SEARCH, lower=15.0, upper=50.0)
        next(p for p in label["part"] if p["name"] == position[6:])["valueDecimal"] = value
        return train(feature("female", builtin="gender"), model="linear-regression", label=label)
    made = bmi(missing=20.0)
    next(p for p in made["part"] if p["name"] == position)["valueDecimal"] = value
    return train(made)


@pytest.mark.parametrize("value", JUNK, ids=repr)
@pytest.mark.parametrize("position", ["lower", "upper", "missing", "epsilon", "horizon", "label.lower",
                                      "label.upper"])
def test_junk_in_any_numeric_position_is_400_and_spends_nothing(app: Flask, client: FlaskClient,
                                                                 research: dict[str, str], project: str,
                                                                 position: str, value: Any) -> None:
    body = orjson.dumps(_with_number(position, "__VALUE__")).replace(
        b'"__VALUE__"', json.dumps(value, allow_nan=True).encode())
    response = client.post("/research/fhir/$train", data=body,
                           headers={**research, "Content-Type": "application/fhir+json"})
    refused(response, app, project)


@pytest.mark.parametrize("name", ["model", "label", "epsilon", "index-date", "horizon", "evaluate"])
def test_a_parameter_given_twice_is_400_and_spends_nothing(app: Flask, client: FlaskClient, research: dict[str, str],
                                                           project: str, name: str) -> None:
    body = train()
    body["parameter"].append(param("evaluate", False))
    body["parameter"].append(next(p for p in body["parameter"] if p["name"] == name))
    refused(post(client, research, body), app, project)


def test_a_deeply_nested_body_is_400_and_spends_nothing(app: Flask, client: FlaskClient, research: dict[str, str],
                                                        project: str) -> None:
    nested = '{"name": "feature", "part": [' * 5000 + "]}" * 5000
    body = json.dumps(train()).replace('"parameter": [', '"parameter": [' + nested + ",", 1)
    response = client.post("/research/fhir/$train", data=body,
                           headers={**research, "Content-Type": "application/fhir+json"})
    assert response.status_code in (400, 413), response.get_data()[:200]
    assert spent(app, project) == 0.0


#: Twenty searches of twenty parameters each, as features and as the cohort: the largest question
#: whose statements the database must still plan and run in bounded time.
TWENTY = BMI_SEARCH + "".join(f"&value-quantity=ge{i}" for i in range(19))


def twenty_by_twenty(app: Flask, project: str) -> dict[str, Any]:
    """A `$train` of twenty TWENTY features over a cohort of twenty TWENTY searches, on twenty
    consented patients, with the planner's statistics gathered as in production (init-db, ingest)."""
    for patient_id in people(app, [(20.0 + i, "2022-03-01" if i % 2 else None, "female") for i in range(20)]):
        consent(app, patient_id, project, "aggregate")
    with app.app_context(), db.write() as conn:
        for table in ("resources", "idx_quantity", "idx_token", "idx_date", "decisions", "decision_classes"):
            conn.exec_driver_sql(f"ANALYZE {table}")
    body = train(*(feature(f"f{i}", expression=TWENTY, reduce="mean", lower=0.0, upper=100.0) for i in range(20)))
    body["parameter"] += [param("cohort", TWENTY) for _ in range(20)]
    return body


def test_twenty_features_and_cohorts_of_twenty_parameters_each_are_answered_in_bounded_time(
        app: Flask, client: FlaskClient, research: dict[str, str], project: str) -> None:
    import time

    body = twenty_by_twenty(app, project)
    started = time.monotonic()
    response = post(client, research, body)
    assert response.status_code == 200, response.get_json()
    assert time.monotonic() - started < 60


def recorded_answers(app: Flask) -> int:
    with app.app_context(), db.read() as conn:
        return conn.scalar(select(func.count()).select_from(answers))


@pytest.mark.parametrize("operation", ["$train", "$aggregate"])
def test_a_statistic_that_takes_longer_than_its_bound_is_too_costly_and_records_nothing(
        app: Flask, client: FlaskClient, research: dict[str, str], project: str, operation: str) -> None:
    """No refunds (a failed computation keeps its reservation), no answer, and the question
    itself is not spoiled: under the default bound it is answered."""
    body = twenty_by_twenty(app, project)
    if operation == "$aggregate":
        body = count(*(TWENTY for _ in range(20)), epsilon=1.0)
    send = post if operation == "$train" else ask
    app.config["STATISTICS_TIMEOUT_SECONDS"] = 1e-6
    response = send(client, research, body)
    assert response.status_code == 422, response.get_json()
    assert [issue["code"] for issue in response.get_json()["issue"]] == ["too-costly"]
    assert spent(app, project) == 1.0
    assert recorded_answers(app) == 0
    app.config["STATISTICS_TIMEOUT_SECONDS"] = 30.0
    assert send(client, research, body).status_code == 200
    assert spent(app, project) == 2.0
    assert recorded_answers(app) == 1


@pytest.mark.parametrize("bounds", [(-1e9, 1e9), (0.0, 1e-9), (1e9 - 1, 1e9)])
@pytest.mark.parametrize("model", ["logistic-regression", "naive-bayes", "linear-regression"])
def test_extreme_but_valid_bounds_are_trained_and_evaluated_without_a_server_error(
        app: Flask, client: FlaskClient, research: dict[str, str], project: str, bounds: tuple[float, float],
        model: str) -> None:
    for patient_id in people(app, [(20.0 + i, "2022-03-01" if i % 2 else None, "female") for i in range(10)]):
        consent(app, patient_id, project, "aggregate")
    lower, upper = bounds
    label = (param("label", expression=f"{BMI_SEARCH}&value-quantity=ge0", lower=lower, upper=upper)
             if model == "linear-regression" else None)
    body = train(bmi(lower=lower, upper=upper), model=model, label=label, index=None, horizon=None, epsilon=50.0)
    body["parameter"].append(param("evaluate", True))
    response = post(client, research, body)
    assert response.status_code == 200, response.get_json()
    learning.validate(document(response.get_json()))


@pytest.mark.parametrize(("index", "horizon"), [("1800-01-01", "200 a"), ("9999-12-31", "200 a"),
                                                ("2020-01-01", "0.000001 d")])
def test_index_dates_and_horizons_at_the_extremes_are_answered(app: Flask, client: FlaskClient,
                                                               research: dict[str, str], project: str, index: str,
                                                               horizon: str) -> None:
    consent(app, someone(app), project, "aggregate")
    response = post(client, research, train(index=index, horizon=horizon, epsilon=50.0))
    assert response.status_code == 200, response.get_json()
    assert learning.validate(document(response.get_json())).spec.horizon == horizon


# -- replay, idempotency, budget -----------------------------------------------------------------


@pytest.fixture
def crowd(app: Flask, project: str) -> list[str]:
    made = people(app, [(18.0 + i, "2022-03-01" if i >= 10 else None, "female") for i in range(20)])
    for patient_id in made:
        consent(app, patient_id, project, "aggregate")
    return made


def test_an_idempotency_key_reused_with_another_request_is_refused_and_spends_nothing(
        app: Flask, client: FlaskClient, research: dict[str, str], project: str, crowd: list[str]) -> None:
    first = post(client, research, train(epsilon=0.5), key="same-key")
    assert first.status_code == 200
    again = post(client, research, train(bmi(upper=60.0), epsilon=0.5), key="same-key")
    assert again.status_code in (409, 422), again.get_json()
    assert spent(app, project) == 0.5


def test_an_idempotency_key_of_an_aggregate_cannot_recall_or_start_a_training(
        app: Flask, client: FlaskClient, research: dict[str, str], project: str, crowd: list[str]) -> None:
    assert ask(client, research, count(), key="shared-key").status_code == 200
    again = post(client, research, train(epsilon=0.5), key="shared-key")
    assert again.status_code in (409, 422), again.get_json()
    assert spent(app, project) == 0.5


@pytest.mark.parametrize("epsilon", [0.0, 1e-12, 0.0009, -0.5])
def test_an_epsilon_below_the_floor_is_refused_and_spends_nothing(app: Flask, client: FlaskClient,
                                                                  research: dict[str, str], project: str,
                                                                  epsilon: float) -> None:
    refused(post(client, research, train(epsilon=epsilon)), app, project)


def test_the_same_request_respelled_is_replayed_not_answered_with_fresh_noise(
        app: Flask, client: FlaskClient, research: dict[str, str], project: str, crowd: list[str]) -> None:
    first = train(bmi(lower=15.0, upper=50.0), epsilon=0.5)
    first["parameter"] += [param("cohort", BMI_SEARCH), param("cohort", "Patient?gender=female")]
    respelled = json.loads(json.dumps(first).replace("15.0", "15").replace("50.0", "50"))
    respelled["parameter"] = list(reversed(respelled["parameter"]))
    respelled["parameter"] = [p for p in respelled["parameter"] if p["name"] != "cohort"] + [
        param("cohort", "Patient?gender=female"), param("cohort", BMI_SEARCH)]
    answers = [post(client, research, body).get_json() for body in (first, respelled)]
    assert answers[0] == answers[1]
    assert spent(app, project) == 0.5


def test_concurrent_trainings_never_overdraw_the_budget(app: Flask, client: FlaskClient) -> None:
    poor = new_project(app, epsilon=1.0, cap=1.0, suppression=0)
    for patient_id in people(app, [(18.0 + i, None, "female") for i in range(10)]):
        consent(app, patient_id, poor, "aggregate")
    headers = bearer(token(client, app, "research", poor))
    statuses: list[int] = []

    def one(i: int) -> None:
        with app.test_client() as own:
            statuses.append(post(own, headers, train(bmi(upper=50.0 + i), epsilon=0.4)).status_code)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200, 200, 403, 403, 403, 403]
    assert spent(app, poor) == pytest.approx(0.8)


# -- singling out --------------------------------------------------------------------------------


def test_a_cohort_of_one_is_withheld_below_the_suppression_threshold(app: Flask, client: FlaskClient) -> None:
    guarded = new_project(app, epsilon=1000.0, cap=100.0, suppression=11)
    target = someone(app, ("Condition", condition("PATIENT", DIABETES, "2021-02-01")))
    consent(app, target, guarded, "aggregate")
    response = post(client, bearer(token(client, app, "research", guarded)), train(epsilon=100.0))
    assert response.status_code == 200, response.get_json()
    names = [p["name"] for p in response.get_json()["parameter"]]
    assert "document" not in names and "coefficient" not in names and "class" not in names
    assert next(p["part"] for p in response.get_json()["parameter"] if p["name"] == "training-size") == [
        {"name": "suppressed", "valueBoolean": True}]


def test_the_row_limit_is_judged_on_the_noisy_size_not_the_exact_one(app: Flask, client: FlaskClient,
                                                                     research: dict[str, str], project: str,
                                                                     crowd: list[str]) -> None:
    """Refusing exactly when the cohort holds more than the limit would release one bit of the
    exact count, outside any mechanism: with a noisy size of wide noise the refusal must vary."""
    app.config["TRAIN_MAX_ROWS"] = len(crowd) - 1
    statuses = {post(client, research, train(epsilon=0.01 + i / 1000)).status_code for i in range(16)}
    assert statuses == {200, 400}


# -- what is recorded ----------------------------------------------------------------------------


def test_a_training_is_audited_with_its_patients_and_a_replay_without_any(app: Flask, client: FlaskClient,
                                                                          research: dict[str, str], project: str,
                                                                          crowd: list[str]) -> None:
    assert post(client, research, train(epsilon=0.5)).status_code == 200
    assert post(client, research, train(epsilon=0.5)).status_code == 200
    with app.app_context(), db.read() as conn:
        entries = conn.execute(select(audit.c.seq, audit.c.detail).where(
            audit.c.action == "train", audit.c.project_id == project).order_by(audit.c.seq)).all()
        patients = patients_named(conn, [seq for seq, _ in entries])
        named = [set(patients[seq]) for seq, _ in entries]
    assert named == [set(crowd), set()]
    assert [json.loads(detail).get("replayed", False) for _, detail in entries] == [False, True]


def test_a_training_refused_by_the_row_limit_is_audited_with_the_patients_it_read(
        app: Flask, client: FlaskClient, research: dict[str, str], project: str, crowd: list[str]) -> None:
    """The refusal is a release too (one noisy bit about the cohort, paid for): its patients are told."""
    app.config["TRAIN_MAX_ROWS"] = 5
    assert post(client, research, train(epsilon=100.0)).status_code == 400
    with app.app_context(), db.read() as conn:
        entries = conn.execute(select(audit.c.seq).where(audit.c.action == "train",
                                                         audit.c.project_id == project)).scalars().all()
        named = {patient for patients in patients_named(conn, entries).values() for patient in patients}
    assert named == set(crowd)


def test_the_holdout_split_is_keyed_per_project(app: Flask, project: str) -> None:
    other = new_project(app)
    with app.app_context():
        keys = [release_for("test", p, engine.AGGREGATE).key.pseudonymise_value for p in (project, other)]
    ids = [f"p-{i}" for i in range(200)]
    sides = [[learning.in_holdout(key(f"train-holdout:{i}")) for i in ids] for key in keys]
    assert sides[0] != sides[1]
    assert 20 < sum(sides[0]) < 80


def test_the_released_document_holds_no_patient_identifier(app: Flask, client: FlaskClient,
                                                           research: dict[str, str], crowd: list[str]) -> None:
    body = train(epsilon=5.0)
    body["parameter"].append(param("evaluate", True))
    text = json.dumps(post(client, research, body).get_json())
    assert not any(patient_id in text for patient_id in crowd)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_a_statistics_time_bound_that_is_not_a_positive_number_of_seconds_is_refused_in_one_line(value: str) -> None:
    with pytest.raises(ValueError, match="PASSERELLE_STATISTICS_TIMEOUT_SECONDS must be a positive number of seconds"):
        load_config({"PASSERELLE_STATISTICS_TIMEOUT_SECONDS": value})


def test_the_statistics_time_bound_is_read_in_seconds_with_a_default() -> None:
    assert load_config({"PASSERELLE_STATISTICS_TIMEOUT_SECONDS": "2.5"})["STATISTICS_TIMEOUT_SECONDS"] == 2.5
    assert load_config({})["STATISTICS_TIMEOUT_SECONDS"] == 30.0
