"""`$aggregate`: bounded sensitivity, consent, budget, validation, output shape, suppression.

The sensitivity tests are the heart of it: for two databases that differ by one
patient who has 1,000 Observations (and several Conditions), the exact pre-noise
aggregate of every measure moves by at most the sensitivity its mechanism is given.
Everything runs on the real app and database (SQLite and PostgreSQL).
"""
from __future__ import annotations

import functools
import json
import uuid
from collections import Counter
from itertools import pairwise
from typing import Any

import numpy as np
import pytest
from fhir.resources.R4B.parameters import Parameters
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from consent import engine, projects, writer
from consent.materialise import refresh
from policies import budget, dp
from policies.deid import load_profile
from service import aggregate, db, synthetic
from service.app import create_app
from service.auth import register_client
from service.keyring import DEFAULT_PROFILE
from service.release import release_for
from service.store import cohort, repository
from service.store.schema import audit, resources
from tests.fhir_helpers import create, issue, observation, patient
from tests.research_world import bearer, token

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
HYPERTENSION = "38341003"
DIABETES = "44054006"
ASTHMA = "195967001"
DEPRESSION = "370143000"  # mental health
WEIGHT = "29463-7"
CODES = (HYPERTENSION, DIABETES, ASTHMA)
URL = "/research/fhir/$aggregate"


# -- builders --------------------------------------------------------------------------------


def param(name: str, value: Any = None, **parts: Any) -> dict[str, Any]:
    """One Parameters.parameter: a value (typed by Python type) or parts (kwargs, `_` for `-`)."""
    if parts:
        return {"name": name, "part": [param(k.replace("_", "-"), v) for k, v in parts.items()]}
    if isinstance(value, bool):
        return {"name": name, "valueBoolean": value}
    if isinstance(value, int):
        return {"name": name, "valueInteger": value}
    if isinstance(value, float):
        return {"name": name, "valueDecimal": value}
    return {"name": name, "valueString": value}


def ask(*items: dict[str, Any], epsilon: float = 0.5) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [*items, param("epsilon", epsilon)]}


def count(*cohorts: str, epsilon: float = 0.5) -> dict[str, Any]:
    return ask(param("measure", "count"), *(param("cohort", c) for c in cohorts), epsilon=epsilon)


def weights(measure: str, reduce: str, lower: float, upper: float, *extra: dict[str, Any],
            epsilon: float = 0.5) -> dict[str, Any]:
    return ask(param("measure", measure),
               param("value", expression=f"Observation?code={LOINC}|{WEIGHT}", reduce=reduce,
                     lower=float(lower), upper=float(upper)), *extra, epsilon=epsilon)


def histogram(*group: dict[str, Any], epsilon: float = 0.5) -> dict[str, Any]:
    return ask(param("measure", "histogram"), {"name": "groupBy", "part": list(group)}, epsilon=epsilon)


def new_project(app: Flask, tier: str = "aggregate", epsilon: float = 10.0, cap: float = 1.0,
                suppression: int = 11) -> str:
    with app.app_context(), db.write() as conn:
        project_id = projects.create(conn, name=f"P-{uuid.uuid4().hex[:6]}", tier=tier, epsilon=epsilon,
                                     epsilon_cap=cap, suppression=suppression).project_id
        refresh(conn, project_ids=[project_id])
    return project_id


def consent(app: Flask, patient_id: str, project_id: str | None, tier: str = "aggregate",
            exclude: tuple[str, ...] = ()) -> None:
    with app.app_context(), db.write() as conn:
        writer.record(conn, writer.build(patient_id, project_id, tier, list(exclude), source="test"))


def condition(patient_id: str, code: str, onset: str = "2021-01-01") -> dict[str, Any]:
    return {"resourceType": "Condition", "subject": {"reference": f"Patient/{patient_id}"},
            "code": {"coding": [{"system": SNOMED, "code": code}]}, "onsetDateTime": onset}


def person(client: FlaskClient, headers: dict[str, str], gender: str, born: str,
           weights_kg: tuple[float, ...] = (), codes: tuple[str, ...] = ()) -> str:
    made = create(client, headers, patient(family="Test", given="Someone", gender=gender, birthDate=born))["id"]
    for i, value in enumerate(weights_kg):
        create(client, headers, observation(made, code=WEIGHT, value=value, unit="kg",
                                            when=f"{2018 + i}-06-01T10:00:00Z"))
    for code in codes:
        create(client, headers, condition(made, code))
    return made


def add_heavy_patient(app: Flask) -> str:
    """One patient with 1,000 weight Observations (values far outside any bound, both ways,
    spread over ten years) and several Conditions of every histogram code, in one write."""
    patient_id = f"heavy-{uuid.uuid4().hex[:8]}"
    items: list[tuple[str, dict[str, Any]]] = [
        ("Patient", {**patient(family="Heavy", given="User", gender="female", birthDate="1980-07-07"),
                     "id": patient_id})]
    for i in range(1000):
        items.append(("Observation", observation(patient_id, code=WEIGHT, value=float(-500 + 2 * i), unit="kg",
                                                 when=f"{2015 + i % 10}-{1 + i % 12:02d}-{1 + i % 28:02d}T08:00:00Z")))
    items += [("Condition", condition(patient_id, code)) for code in (*CODES, *CODES, DEPRESSION)]
    with app.app_context(), db.write() as conn:
        repository.upsert(conn, items)
    return patient_id


def parse(app: Flask, project_id: str, body: dict[str, Any]) -> aggregate.Query:
    with app.app_context(), db.read() as conn:
        return aggregate.parse(body, projects.get(conn, project_id), app.config["MIN_EPSILON"])


def exact(app: Flask, project_id: str, body: dict[str, Any]) -> cohort.Exact:
    """The pre-noise aggregate, computed the way $aggregate computes it (through the gate)."""
    question = parse(app, project_id, body).question
    with app.app_context():
        return release_for("test", project_id, engine.AGGREGATE).aggregate_rows(question)[0]


def budget_of(client: FlaskClient, headers: dict[str, str], project_id: str) -> dict[str, Any]:
    response = client.get(f"/fhir/ResearchStudy/{project_id}/$budget", headers=headers)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    out: dict[str, Any] = {"history": []}
    for p in body["parameter"]:
        if p["name"] == "spend":
            out["history"].append({part["name"]: next(v for k, v in part.items() if k.startswith("value"))
                                   for part in p["part"]})
        elif "valueDecimal" in p:
            out[p["name"]] = p["valueDecimal"]
    return out


def results(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Each `result` as {part name: value or parts}."""
    cells = []
    for p in body["parameter"]:
        if p["name"] == "result":
            cell: dict[str, Any] = {}
            for part in p["part"]:
                cell[part["name"]] = part["part"] if "part" in part else next(
                    v for k, v in part.items() if k.startswith("value"))
            cells.append(cell)
    return cells


def top(body: dict[str, Any], name: str) -> Any:
    return next(next(v for k, v in p.items() if k.startswith("value")) for p in body["parameter"]
                if p["name"] == name)


def cli(app: Flask, *args: str) -> Any:
    result = app.test_cli_runner().invoke(args=list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def spent(app: Flask, project_id: str) -> float:
    with app.app_context(), db.read() as conn:
        return budget.status(conn, project_id, history_limit=0)["spent"]


def post(client: FlaskClient, headers: dict[str, str], body: Any, key: str | None = None) -> Any:
    extra = {"Idempotency-Key": key} if key else {}
    return client.post(URL, json=body, headers={**headers, **extra})


# -- fixtures ----------------------------------------------------------------------------------


@functools.cache
def _default_profile() -> Any:
    return load_profile(DEFAULT_PROFILE)


@pytest.fixture(autouse=True)
def _parsed_profile_once_per_worker(app: Flask) -> None:
    """Speed only: `$aggregate` opens a Release, which parses the shipped de-identification
    profile once per app (~0.5 s); every test here builds a fresh app, so parse it once per
    worker and hand the same real Profile to each app's cache."""
    app.extensions.setdefault("passerelle.profiles", {})[""] = _default_profile()


@pytest.fixture
def project(app: Flask) -> str:
    return new_project(app)


@pytest.fixture
def research(app: Flask, client: FlaskClient, project: str) -> dict[str, str]:
    return bearer(token(client, app, "research", project))


@pytest.fixture
def small_world(app: Flask, client: FlaskClient, custodian_headers: dict[str, str], project: str
                ) -> dict[str, str]:
    """Four consenting patients (aggregate tier) with weights and Conditions."""
    people = {
        "ann": person(client, custodian_headers, "female", "1950-02-03", (70.0, 72.0), (HYPERTENSION,)),
        "bob": person(client, custodian_headers, "male", "1990-05-05", (85.0,), (DIABETES, HYPERTENSION)),
        "cat": person(client, custodian_headers, "female", "2010-01-01", (30.0, 31.0, 33.0), ()),
        "dan": person(client, custodian_headers, "male", "1970-09-09", (), (ASTHMA,)),
    }
    for patient_id in people.values():
        consent(app, patient_id, project, "aggregate")
    return people


# -- sensitivity: one patient with 1,000 Observations ----------------------------------------------

AT = "2025-01-01"
SENSITIVITY_QUERIES: dict[str, dict[str, Any]] = {
    "count-all": count(),
    "count-cohort-observation": count(f"Observation?code={LOINC}|{WEIGHT}"),
    "count-cohort-condition": count(f"Condition?code={SNOMED}|{HYPERTENSION}"),
    "histogram-gender": histogram(param("by", "gender")),
    "histogram-age-band": histogram(param("by", "age-band"), param("edges", "0,18,40,65,90"), param("at", AT)),
    "histogram-code": histogram(param("by", "code"), param("codes", ",".join(f"{SNOMED}|{c}" for c in CODES)),
                                param("expression", "Condition")),
    "histogram-year": histogram(param("by", "year"), param("from", 2014), param("to", 2025),
                                param("expression", f"Observation?code={LOINC}|{WEIGHT}")),
}
for _reduce, (_lo, _hi) in {"latest": (-100, 150), "mean": (20, 200), "max": (0, 120), "min": (-300, 100),
                            "count": (0, 5)}.items():
    for _measure in ("sum", "mean", "quantile"):
        _extra = (param("q", 0.5),) if _measure == "quantile" else ()
        SENSITIVITY_QUERIES[f"{_measure}-{_reduce}"] = weights(_measure, _reduce, _lo, _hi, *_extra)


Neighbours = dict[str, tuple[cohort.Exact, cohort.Exact, cohort.Question]]


def neighbours(app: Flask, project: str, prefix: str) -> Neighbours:
    """The exact answers to the queries named `prefix…` without, then with, the heavy patient."""
    chosen = {name: body for name, body in SENSITIVITY_QUERIES.items() if name.startswith(prefix)}
    before = {name: exact(app, project, body) for name, body in chosen.items()}
    heavy = add_heavy_patient(app)
    consent(app, heavy, project, "aggregate")
    after = {name: exact(app, project, body) for name, body in chosen.items()}
    return {name: (before[name], after[name], parse(app, project, body).question) for name, body in chosen.items()}


def test_one_patient_moves_every_count_by_at_most_one(app, project, small_world):
    for name, (before, after, _) in neighbours(app, project, "count").items():
        assert after.count - before.count == 1 == dp.Count(0.5).per_patient, name


def test_one_patient_moves_every_histogram_by_at_most_one_per_bin_and_k_in_l1(app, project, small_world):
    for name, (before, after, question) in neighbours(app, project, "histogram").items():
        assert question.group is not None
        # The k the mechanism is given (aggregate.noisy): one bin per patient, or one per declared code.
        mechanism = dp.Histogram(0.5, question.group.bins, question.group.bins_per_patient)
        diffs = [after.bins.get(b, 0) - before.bins.get(b, 0) for b in question.group.bins]
        assert set(after.bins) <= set(question.group.bins), name
        assert all(0 <= d <= 1 for d in diffs), (name, diffs)
        assert 1 <= sum(diffs) <= mechanism.max_bins_per_patient, (name, diffs)
        if question.group.by == "code":
            assert diffs == [1, 1, 1], name  # two Conditions of each code still count once per bin


def test_one_patient_moves_every_bounded_sum_by_at_most_max_abs_bound(app, project, small_world):
    for name, (before, after, question) in neighbours(app, project, "sum").items():
        assert question.value is not None
        lower, upper = question.value.lower, question.value.upper
        sensitivity = dp.BoundedSum(0.5, lower, upper).sensitivity
        assert abs(after.total - before.total) <= sensitivity + 1e-9, name
        assert lower - 1e-9 <= after.total - before.total <= upper + 1e-9, name  # one clipped value
        assert after.count - before.count == 1, name  # the count that gates suppression


def test_one_patient_moves_every_mean_sum_and_count_within_their_sensitivities(app, project, small_world):
    for name, (before, after, question) in neighbours(app, project, "mean").items():
        assert question.value is not None
        lower, upper = question.value.lower, question.value.upper
        mechanism = dp.BoundedMean(0.5, lower, upper)
        assert abs(after.total - before.total) <= mechanism.sensitivity + 1e-9, name
        assert after.count - before.count == 1, name
        for found in (before, after):  # the mechanism refuses sums of unclipped values
            mechanism.release(found.total, found.count, random_state=np.random.RandomState(0))


def test_one_patient_adds_exactly_one_bounded_value_to_every_quantile(app, project, small_world):
    for name, (before, after, question) in neighbours(app, project, "quantile").items():
        assert question.value is not None
        assert not Counter(before.values) - Counter(after.values), name
        assert sum((Counter(after.values) - Counter(before.values)).values()) == 1, name
        assert all(question.value.lower <= v <= question.value.upper for v in after.values), name
        if name == "quantile-count":  # the heavy patient's 1,000 Observations become one value, clipped to 5
            assert Counter(after.values) - Counter(before.values) == Counter({5.0: 1})


# -- exactness: the SQL against plain Python over the same small world ----------------------------

#: name: (gender, birth date, weights in kg dated 2018, 2019, …, Condition codes, consents?)
PLAIN_WORLD: dict[str, tuple[str, str, tuple[float, ...], tuple[str, ...], bool]] = {
    "ann": ("female", "1950-02-03", (70.0, 72.0), (HYPERTENSION,), True),
    "bob": ("male", "1990-05-05", (85.0,), (DIABETES, HYPERTENSION), True),
    "cat": ("female", "2010-01-01", (30.0, 31.0, 33.0), (), True),
    "dan": ("other", "1970-09-09", (), (ASTHMA,), True),
    "eve": ("female", "2025-06-01", (120.0, 4.0), (HYPERTENSION, ASTHMA), True),  # born after `at`: no age band
    "fay": ("male", "1960-01-01", (99.0,), (DIABETES,), False),  # refused: in no answer
}
PLAIN_EDGES = (0, 18, 40, 65, 90)


def plain_answers(bins: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """Every answer of `test_exact_answers_equal_plain_python_over_the_consented_patients`,
    computed in Python from PLAIN_WORLD (`bins`: the declared bins of each histogram)."""
    people = {name: row for name, row in PLAIN_WORLD.items() if row[4]}

    def age(born: str) -> int:
        year, month, day = map(int, born.split("-"))
        return 2025 - year - ((month, day) > (1, 1))

    def band(born: str) -> str | None:
        years = age(born)
        return next((bins["age"][i] for i, (low, high) in enumerate(pairwise(PLAIN_EDGES)) if low <= years < high),
                    None)

    def clipped(values: list[float], lower: float, upper: float) -> list[float]:
        return sorted(min(max(v, lower), upper) for v in values)

    weighed = [row[2] for row in people.values() if row[2]]
    return {
        "count": len(people),
        "count-hypertension": sum(HYPERTENSION in row[3] for row in people.values()),
        "count-weighed-and-asthma": sum(bool(row[2]) and ASTHMA in row[3] for row in people.values()),
        "gender": dict(Counter(row[0] for row in people.values())),
        "age-band": dict(Counter(b for b in (band(row[1]) for row in people.values()) if b)),
        "code": {label: sum(code in row[3] for row in people.values())
                 for label, code in zip(bins["code"], CODES, strict=True)},
        "year": {bins["year"][0]: len(weighed)},
        "latest": clipped([w[-1] for w in weighed], 10, 100),
        "mean": clipped([sum(w) / len(w) for w in weighed], 10, 100),
        "max": clipped([max(w) for w in weighed], 10, 100),
        "min": clipped([min(w) for w in weighed], 10, 100),
        "count-values": clipped([len(w) for w in weighed], 0, 2),
    }


def test_exact_answers_equal_plain_python_over_the_consented_patients(app, client, custodian_headers, project):
    for gender, born, kilograms, codes, consents in PLAIN_WORLD.values():
        made = person(client, custodian_headers, gender, born, kilograms, codes)
        consent(app, made, project, "aggregate" if consents else "none")
    questions = {
        "count": count(),
        "count-hypertension": count(f"Condition?code={SNOMED}|{HYPERTENSION}"),
        "count-weighed-and-asthma": count(f"Observation?code={LOINC}|{WEIGHT}", f"Condition?code={SNOMED}|{ASTHMA}"),
        "gender": histogram(param("by", "gender")),
        "age-band": histogram(param("by", "age-band"), param("edges", ",".join(map(str, PLAIN_EDGES))),
                              param("at", "2025-01-01")),
        "code": histogram(param("by", "code"), param("codes", ",".join(f"{SNOMED}|{c}" for c in CODES)),
                          param("expression", "Condition")),
        "year": histogram(param("by", "year"), param("from", 2018), param("to", 2020),
                          param("expression", f"Observation?code={LOINC}|{WEIGHT}")),
        **{name: weights("quantile", reduce, *bounds, param("q", 0.5))
           for name, reduce, bounds in (("latest", "latest", (10, 100)), ("mean", "mean", (10, 100)),
                                        ("max", "max", (10, 100)), ("min", "min", (10, 100)),
                                        ("count-values", "count", (0, 2)))},
    }
    answers = {name: exact(app, project, body) for name, body in questions.items()}
    declared = {name: parse(app, project, questions[key]).question.group.bins
                for name, key in (("age", "age-band"), ("code", "code"), ("year", "year"))}
    expected = plain_answers(declared)
    for name, found in answers.items():
        got = (found.count if name.startswith("count") and name != "count-values" else
               found.bins if name in ("gender", "age-band", "code", "year") else sorted(found.values))
        assert got == expected[name], name
    sums = {name: exact(app, project, weights("sum", name, 10, 100)).total for name in ("latest", "mean", "max")}
    assert sums == pytest.approx({name: sum(expected[name]) for name in sums})


# -- consent ------------------------------------------------------------------------------------


def test_a_withdrawal_drops_the_next_exact_count_by_one_and_the_answer_is_recomputed(
        app, client, project, research, small_world):
    body = count(f"Observation?code={LOINC}|{WEIGHT}")
    assert exact(app, project, body).count == 3
    assert post(client, research, body).status_code == 200
    assert spent(app, project) == 0.5
    assert post(client, research, body).status_code == 200
    assert spent(app, project) == 0.5  # same data version: the recorded answer, no spend
    cli(app, "consent", "set", "--patient", small_world["ann"], "--project", project, "--tier", "none")
    assert exact(app, project, body).count == 2
    assert post(client, research, body).status_code == 200
    assert spent(app, project) == 1.0  # the data version changed: a new release, a new spend


def test_a_patient_who_excluded_mental_health_is_not_counted_in_a_mental_health_cohort(
        app, client, custodian_headers, project):
    private = person(client, custodian_headers, "female", "1960-01-01", (), (DEPRESSION, HYPERTENSION))
    open_ = person(client, custodian_headers, "male", "1961-01-01", (), (DEPRESSION, HYPERTENSION))
    consent(app, private, project, "aggregate", exclude=("mental-health",))
    consent(app, open_, project, "aggregate")
    assert exact(app, project, count(f"Condition?code={SNOMED}|{DEPRESSION}")).count == 1
    assert exact(app, project, count(f"Condition?code={SNOMED}|{HYPERTENSION}")).count == 2
    assert exact(app, project, count()).count == 2
    bins = exact(app, project, histogram(param("by", "code"), param("codes", f"{SNOMED}|{DEPRESSION},"
                                                                              f"{SNOMED}|{HYPERTENSION}"),
                                         param("expression", "Condition"))).bins
    assert bins == {f"{SNOMED}|{DEPRESSION}": 1, f"{SNOMED}|{HYPERTENSION}": 2}


def test_patients_who_refused_or_never_answered_are_not_counted(app, client, custodian_headers, project):
    consenting = person(client, custodian_headers, "female", "1960-01-01", (80.0,), (HYPERTENSION,))
    refused = person(client, custodian_headers, "female", "1960-01-01", (81.0,), (HYPERTENSION,))
    person(client, custodian_headers, "female", "1960-01-01", (82.0,), (HYPERTENSION,))  # silent: default deny
    consent(app, consenting, project, "aggregate")
    consent(app, refused, project, "none")
    assert exact(app, project, count()).count == 1
    assert exact(app, project, count(f"Condition?code={SNOMED}|{HYPERTENSION}")).count == 1
    assert exact(app, project, weights("quantile", "latest", 0, 200, param("q", 0.5))).values == [80.0]


def test_a_consent_data_period_limits_which_observations_a_patient_contributes(app, client, custodian_headers,
                                                                              project):
    made = person(client, custodian_headers, "female", "1960-01-01", (60.0, 61.0, 62.0, 63.0))  # 2018…2021
    recent = writer.build(made, project, "aggregate", [], source="test")
    recent["provision"]["provision"] = [{"type": "deny", "dataPeriod": {"end": "2019-12-31"}}]
    with app.app_context(), db.write() as conn:
        writer.record(conn, recent)
    assert exact(app, project, weights("quantile", "count", 0, 10, param("q", 0.5))).values == [2.0]
    assert exact(app, project, weights("quantile", "min", 0, 100, param("q", 0.5))).values == [62.0]


def test_a_record_tier_project_can_ask_aggregates_of_record_and_aggregate_consents(app, client, custodian_headers):
    project_id = new_project(app, tier="record")
    full = person(client, custodian_headers, "female", "1960-01-01")
    partial = person(client, custodian_headers, "male", "1960-01-01")
    consent(app, full, project_id, "record")
    consent(app, partial, project_id, "aggregate")
    assert exact(app, project_id, count()).count == 2
    response = post(client, bearer(token(client, app, "research", project_id)), count())
    assert response.status_code == 200, response.get_json()
    assert top(response.get_json(), "measure") == "count"


def test_research_wide_consents_count_for_every_project(app, client, custodian_headers, project):
    made = person(client, custodian_headers, "female", "1960-01-01")
    consent(app, made, None, "aggregate")
    other = new_project(app)
    assert exact(app, project, count()).count == 1
    assert exact(app, other, count()).count == 1


def test_a_value_aggregate_covers_only_its_cohort(app, project, small_world):
    hypertensive = weights("quantile", "latest", 0, 200, param("q", 0.5),
                           param("cohort", f"Condition?code={SNOMED}|{HYPERTENSION}"))
    assert sorted(exact(app, project, hypertensive).values) == [72.0, 85.0]  # ann's latest, bob's
    women = weights("sum", "count", 0, 5, param("cohort", "Patient?gender=female"))
    assert (exact(app, project, women).count, exact(app, project, women).total) == (2, 5.0)


def test_a_patient_who_excluded_mental_health_contributes_no_mental_health_observation(
        app, client, custodian_headers, project):
    phq9 = "44261-6"
    scores = {}
    for exclude, score in (((), 20.0), (("mental-health",), 10.0)):
        made = person(client, custodian_headers, "female", "1960-01-01")
        create(client, custodian_headers, observation(made, code=phq9, value=score, unit="{score}"))
        create(client, custodian_headers, observation(made, code=WEIGHT, value=score + 50, unit="kg"))
        consent(app, made, project, "aggregate", exclude=exclude)
        scores[score] = made
    body = ask(param("measure", "quantile"), param("value", expression=f"Observation?code={LOINC}|{phq9}",
                                                   lower=0.0, upper=27.0), param("q", 0.5))
    assert exact(app, project, body).values == [20.0]
    assert exact(app, project, count(f"Observation?code={LOINC}|{phq9}")).count == 1
    assert sorted(exact(app, project, weights("quantile", "latest", 0, 200, param("q", 0.5))).values) == [60.0,
                                                                                                         70.0]


def test_a_deleted_observation_no_longer_contributes(app, client, custodian_headers, project):
    made = person(client, custodian_headers, "female", "1960-01-01", (60.0,))
    consent(app, made, project, "aggregate")
    latest = create(client, custodian_headers, observation(made, code=WEIGHT, value=65.0, unit="kg",
                                                           when="2024-01-01T00:00:00Z"))
    body = weights("quantile", "latest", 0, 200, param("q", 0.5))
    assert exact(app, project, body).values == [65.0]
    assert client.delete(f"/fhir/Observation/{latest['id']}", headers=custodian_headers).status_code in (200, 204)
    assert exact(app, project, body).values == [60.0]


def test_latest_is_the_most_recent_dated_observation_on_every_backend(app, client, custodian_headers, project):
    made = person(client, custodian_headers, "female", "1960-01-01", (60.0, 61.0))  # 2018, 2019
    undated = observation(made, code=WEIGHT, value=99.0, unit="kg")
    del undated["effectiveDateTime"]
    create(client, custodian_headers, undated)
    consent(app, made, project, "aggregate")
    assert exact(app, project, weights("quantile", "latest", 0, 200, param("q", 0.5))).values == [61.0]


def test_age_bands_put_a_birthday_on_the_reference_date_in_the_older_band(app, client, custodian_headers,
                                                                          project):
    for born in ("2007-01-01", "2007-01-02", "1985-01-01", "1985-01-02", "2025-01-02", "1925-01-01"):
        consent(app, person(client, custodian_headers, "female", born), project, "aggregate")
    body = histogram(param("by", "age-band"), param("edges", "0,18,40,100"), param("at", AT))
    # 18 on the day → 18-39; 40 on the day → 40-99; born after `at` or aged 100 → no bin.
    assert exact(app, project, body).bins == {"0-17": 1, "18-39": 2, "40-99": 1}


def test_a_project_limited_to_some_types_cannot_aggregate_over_other_types(app, client, small_world):
    with app.app_context(), db.write() as conn:
        limited = projects.create(conn, name="weights only", tier="aggregate", epsilon=10.0,
                                  types=("Patient", "Observation")).project_id
        refresh(conn, project_ids=[limited])
    for patient_id in small_world.values():
        consent(app, patient_id, limited, "aggregate")
    research = bearer(token(client, app, "research", limited))
    assert post(client, research, count(f"Observation?code={LOINC}|{WEIGHT}")).status_code == 200
    response = post(client, research, count(f"Condition?code={SNOMED}|{HYPERTENSION}"))
    assert response.status_code in (400, 403), response.get_json()
    assert spent(app, limited) == 0.5


def test_consent_records_are_not_research_data_for_an_aggregate_cohort(app, client, project, research,
                                                                       small_world):
    response = post(client, research, count("Consent?status=active"))
    assert response.status_code in (400, 403), response.get_json()
    assert spent(app, project) == 0.0


def test_a_closed_project_gets_no_aggregate_and_spends_nothing(app, project, research, client, small_world):
    cli(app, "project", "close", project)
    response = post(client, research, count())
    assert response.status_code in (401, 403)  # its tokens stop at once, or the project is refused
    assert spent(app, project) == 0.0


@pytest.fixture
def open_project(app: Flask, small_world: dict[str, str]) -> str:
    """No suppression and a high per-query cap: answers are (nearly) exact and always released."""
    project_id = new_project(app, epsilon=1000.0, cap=30.0, suppression=0)
    for patient_id in small_world.values():
        consent(app, patient_id, project_id, "aggregate")
    return project_id


# -- budget ---------------------------------------------------------------------------------------


def test_a_query_that_does_not_fit_gets_403_too_costly_saying_what_is_left_and_spends_nothing(
        app, client, custodian_headers, small_world):
    project_id = new_project(app, epsilon=1.0, cap=1.0)
    research = bearer(token(client, app, "research", project_id))
    assert post(client, research, count(epsilon=0.7)).status_code == 200
    response = post(client, research, count(f"Condition?code={SNOMED}|{DIABETES}", epsilon=0.5))
    assert response.status_code == 403  # not 429: no retry will ever fit until the budget is raised
    assert "Retry-After" not in response.headers
    outcome = issue(response)
    assert outcome["code"] == "too-costly"
    assert "0.3" in outcome["diagnostics"] and "remaining" in outcome["diagnostics"]
    status = budget_of(client, custodian_headers, project_id)
    assert (status["spent"], status["remaining"]) == (0.7, 0.3)
    assert [h["kind"] for h in status["history"]] == ["query", "raise"]


def test_an_identical_query_twice_gets_the_same_answer_and_spends_once(app, client, project, research,
                                                                      small_world):
    first = post(client, research, weights("mean", "latest", 0, 200))
    second = post(client, research, weights("mean", "latest", 0, 200))
    assert first.status_code == second.status_code == 200
    assert results(first.get_json()) == results(second.get_json())
    assert spent(app, project) == 0.5


def test_the_same_question_spelled_in_another_order_is_the_same_question(app, client, project, research,
                                                                        small_world):
    a, b = f"Condition?code={SNOMED}|{HYPERTENSION}", f"Observation?code={LOINC}|{WEIGHT}"
    first = post(client, research, count(a, b))
    reordered = count(b, a)
    reordered["parameter"].reverse()
    second = post(client, research, reordered)
    assert results(first.get_json()) == results(second.get_json())
    assert spent(app, project) == 0.5


def test_the_same_idempotency_key_gets_the_same_answer_even_after_the_data_changed(
        app, client, custodian_headers, project, research, small_world):
    body = weights("sum", "latest", 0, 200)
    first = post(client, research, body, key="retry-1")
    person(client, custodian_headers, "male", "1980-01-01", (90.0,))  # a new data version
    again = post(client, research, body, key="retry-1")
    assert again.status_code == 200
    assert results(again.get_json()) == results(first.get_json())
    assert spent(app, project) == 0.5


def test_an_idempotency_key_reused_for_another_query_is_refused_and_spends_nothing(
        app, client, project, research, small_world):
    assert post(client, research, count(), key="k").status_code == 200
    response = post(client, research, count(f"Condition?code={SNOMED}|{ASTHMA}"), key="k")
    assert response.status_code == 422
    assert issue(response)["severity"] == "error"
    assert spent(app, project) == 0.5


def test_a_key_first_used_on_a_recorded_answer_still_replays_that_answer_after_the_data_changed(
        app, client, custodian_headers, open_project):
    """DESIGN: 'a retried request with the same idempotency key never draws fresh noise'."""
    research = bearer(token(client, app, "research", open_project))
    body = weights("sum", "latest", 0, 200, epsilon=1.0)
    post(client, research, body, key="first")
    served = post(client, research, body, key="second")  # answered from the recorded answer
    person(client, custodian_headers, "male", "1980-01-01", (90.0,))  # a new data version
    retried = post(client, research, body, key="second")  # the client retries its request
    assert spent(app, open_project) == 1.0
    assert results(retried.get_json()) == results(served.get_json())


def test_budget_shows_total_spent_remaining_and_history(app, client, custodian_headers, project, research,
                                                        small_world):
    post(client, research, count(epsilon=0.25))
    post(client, research, histogram(param("by", "gender"), epsilon=0.5))
    response = client.get(f"/fhir/ResearchStudy/{project}/$budget", headers=custodian_headers)
    assert response.status_code == 200
    Parameters.model_validate(response.get_json())
    status = budget_of(client, custodian_headers, project)
    assert (status["total"], status["spent"], status["remaining"]) == (10.0, 0.75, 9.25)
    assert [(h["kind"], h["epsilon"]) for h in status["history"]] == [("query", 0.5), ("query", 0.25),
                                                                       ("raise", 10.0)]
    assert all("actor" in h for h in status["history"][:2])
    assert all(len(h["query"]) == 64 for h in status["history"][:2])


def test_the_research_partner_cannot_read_the_budget_operation(client, research, project):
    assert client.get(f"/fhir/ResearchStudy/{project}/$budget", headers=research).status_code in (401, 403)


def raise_to(client: FlaskClient, headers: dict[str, str], project_id: str, total: float) -> Any:
    return client.post(f"/fhir/ResearchStudy/{project_id}/$budget", headers=headers,
                       json={"resourceType": "Parameters", "parameter": [{"name": "total", "valueDecimal": total}]})


def test_raising_the_budget_over_fhir_works_and_is_audited(app, client, custodian_headers, project):
    response = raise_to(client, custodian_headers, project, 15.0)
    assert response.status_code == 200, response.get_json()
    assert top(response.get_json(), "total") == 15.0
    assert budget_of(client, custodian_headers, project)["remaining"] == 15.0
    with app.app_context(), db.read() as conn:
        rows = conn.execute(select(audit.c.action, audit.c.project_id, audit.c.detail)
                            .where(audit.c.action == "budget-raise")).all()
    assert [(r.action, r.project_id) for r in rows] == [("budget-raise", project)]
    assert json.loads(rows[0].detail)["total"] == 15.0


def test_lowering_the_budget_is_refused_with_409_and_changes_nothing(app, client, custodian_headers, project):
    before = budget_of(client, custodian_headers, project)
    response = raise_to(client, custodian_headers, project, 5.0)
    assert response.status_code == 409
    assert issue(response)["code"] == "conflict"
    assert budget_of(client, custodian_headers, project) == before
    with app.app_context(), db.read() as conn:
        entries = [json.loads(detail) for detail in conn.execute(
            select(audit.c.detail).where(audit.c.action == "budget-raise")).scalars()]
    # The refused attempt is accountable too, but as a failure: no raise is recorded as done.
    assert [entry["outcome"] for entry in entries] == [409]


def test_the_cli_shows_and_raises_a_budget(app, client, custodian_headers, project, research, small_world):
    post(client, research, count())
    shown = cli(app, "project", "show", project)
    assert (shown["budget"]["total"], shown["budget"]["spent"], shown["budget"]["remaining"]) == (10.0, 0.5, 9.5)
    assert shown["patients_by_tier"]["aggregate"] == 4
    raised = cli(app, "project", "raise-budget", project, "--epsilon", "12")
    assert (raised["total"], raised["spent"], raised["remaining"]) == (12.0, 0.5, 11.5)
    refused = app.test_cli_runner().invoke(args=["project", "raise-budget", project, "--epsilon", "3"])
    assert refused.exit_code != 0
    assert budget_of(client, custodian_headers, project)["total"] == 12.0


def test_a_restart_keeps_the_spend_and_the_recorded_answers(app, client, project, research, small_world,
                                                            tmp_path):
    first = post(client, research, count()).get_json()
    restarted = create_app({"TESTING": True, "DATABASE_URL": app.config["DATABASE_URL"],
                            "INSTANCE_DIR": str(tmp_path), "MASTER_KEY_FILE": app.config["MASTER_KEY_FILE"]})
    try:
        with restarted.app_context(), db.write() as conn:
            assert budget.status(conn, project)["spent"] == 0.5
            made = register_client(conn, "research again", "research", project)
        fresh = restarted.test_client()
        granted = fresh.post("/auth/token", data={"grant_type": "client_credentials"},
                             auth=(made["client_id"], made["client_secret"]))
        again = post(fresh, bearer(granted.get_json()["access_token"]), count())
        assert results(again.get_json()) == results(first)
        assert top(again.get_json(), "remaining") == 9.5
    finally:
        restarted.extensions["passerelle.engine"].dispose()
    assert spent(app, project) == 0.5


# -- bad input: 400 naming the parameter, nothing spent ----------------------------------------------

BAD: dict[str, tuple[Any, str | None]] = {
    "unknown measure": (ask(param("measure", "median")), "measure"),
    "missing bounds": (ask(param("measure", "sum"), param("value", expression="Observation", upper=10.0)),
                       "value.lower"),
    "inverted bounds": (weights("sum", "latest", 200, 0), "value.lower"),
    "unknown reducer": (ask(param("measure", "sum"), param("value", expression="Observation", reduce="median",
                                                           lower=0.0, upper=1.0)), "value.reduce"),
    "histogram without groupBy": (ask(param("measure", "histogram")), "groupBy"),
    "unknown groupBy": (histogram(param("by", "postcode")), "groupBy.by"),
    "zero epsilon": (count(epsilon=0.0), "epsilon"),
    "negative epsilon": (count(epsilon=-1.0), "epsilon"),
    "epsilon above the cap": (count(epsilon=1.5), "epsilon"),
    "unknown code system": (count("Condition?code=http://snomed.example.org/sct|38341003"), "cohort"),
    "unknown resource type": (count("Ailment?code=http://snomed.info/sct|38341003"), "cohort"),
    "unknown search parameter": (count("Condition?colour=blue"), "cohort"),
    "bad date": (count("Condition?onset-date=2021-13-45"), "cohort"),
    "q of zero": (weights("quantile", "latest", 0, 200, param("q", 0.0)), "q"),
    "q above one": (weights("quantile", "latest", 0, 200, param("q", 1.5)), "q"),
    "value of a type without quantities": (ask(param("measure", "sum"), param("value", expression="Condition",
                                                                              lower=0.0, upper=1.0)),
                                           "value.expression"),
    "not a Parameters resource": ({"resourceType": "Patient", "gender": "male"}, None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_400_naming_the_parameter_and_spends_nothing(app, client, project, research, case):
    body, expression = BAD[case]
    response = post(client, research, body)
    assert response.status_code == 400, response.get_json()
    outcome = issue(response)
    assert outcome["code"] == "invalid"
    if expression is not None:
        assert outcome["expression"] == [expression], outcome
    assert spent(app, project) == 0.0


# -- output shape ----------------------------------------------------------------------------------


def released(client: FlaskClient, app: Flask, project_id: str, body: dict[str, Any]) -> dict[str, Any]:
    response = post(client, bearer(token(client, app, "research", project_id)), body)
    assert response.status_code == 200, response.get_json()
    answer = response.get_json()
    Parameters.model_validate(answer)
    return answer


def test_a_count_answer_is_a_valid_parameters_with_value_interval_and_mechanism(app, client, open_project):
    answer = released(client, app, open_project, count(epsilon=30.0))
    assert [p["name"] for p in answer["parameter"]] == ["measure", "epsilon", "remaining", "result"]
    assert (top(answer, "measure"), top(answer, "epsilon"), top(answer, "remaining")) == ("count", 30.0, 970.0)
    cell = answer["parameter"][3]["part"]
    by_name = {p["name"]: p for p in cell}
    assert by_name["value"] == {"name": "value", "valueInteger": 4}
    assert by_name["suppressed"]["valueBoolean"] is False
    assert by_name["mechanism"]["valueString"] == "geometric"
    interval = {p["name"]: p["valueDecimal"] for p in by_name["interval"]["part"]}
    assert interval["low"] <= 4 <= interval["high"]


def test_a_histogram_answers_every_declared_bin_including_empty_ones(app, client, open_project):
    answer = released(client, app, open_project, histogram(param("by", "age-band"),
                                                           param("edges", "0,18,40,65,90,120"),
                                                           param("at", AT), epsilon=30.0))
    cells = results(answer)
    assert [c["bin"] for c in cells] == ["0-17", "18-39", "40-64", "65-89", "90-119"]
    assert [c.get("value") for c in cells] == [1, 1, 1, 1, 0]
    assert all("interval" in c and c["mechanism"] == "geometric" for c in cells)


def test_mean_and_sum_answers_carry_a_decimal_value_and_an_interval(app, client, open_project):
    for measure in ("mean", "sum"):
        answer = released(client, app, open_project, weights(measure, "latest", 0, 200, epsilon=30.0))
        (cell,) = results(answer)
        exact_value = {"mean": (72 + 85 + 33) / 3, "sum": 72.0 + 85 + 33}[measure]
        assert isinstance(cell["value"], float)
        assert cell["value"] == pytest.approx(exact_value, abs=120 if measure == "sum" else 60)
        low, high = (p["valueDecimal"] for p in cell["interval"])
        assert low <= cell["value"] <= high
        assert cell["suppressed"] is False


def test_a_quantile_answer_has_a_value_within_bounds_and_no_interval(app, client, open_project):
    answer = released(client, app, open_project, weights("quantile", "latest", 0, 200, param("q", 0.5),
                                                        epsilon=30.0))
    (cell,) = results(answer)
    assert 0 <= cell["value"] <= 200
    assert "interval" not in cell
    assert cell["mechanism"] == "exponential-quantile"


# -- suppression: decided on noisy values only -----------------------------------------------------


def test_suppression_is_decided_on_the_noisy_count_not_the_true_one(app, project):
    query = parse(app, project, count())
    outcomes = {True: [], False: []}
    for seed in range(60):
        for true_count in (10, 12):
            (cell,) = aggregate.noisy(query, cohort.Exact(count=true_count), 11, np.random.RandomState(seed))
            parts = {p["name"]: p for p in cell["part"]}
            outcomes[parts["suppressed"]["valueBoolean"]].append(true_count)
            if not parts["suppressed"]["valueBoolean"]:
                assert parts["value"]["valueInteger"] >= 11  # what is released is the noisy count decided on
    # A true 10 is sometimes released and a true 12 sometimes withheld: the noise decides.
    assert 10 in outcomes[False] and 12 in outcomes[True]


def test_with_suppression_zero_small_counts_are_released(app, client, custodian_headers):
    made = cli(app, "project", "create", "--name", "small cells", "--tier", "aggregate", "--epsilon", "100",
               "--epsilon-cap", "30", "--suppression", "0")
    assert made["suppression"] == 0
    patient_id = person(client, custodian_headers, "female", "1960-01-01")
    cli(app, "consent", "set", "--patient", patient_id, "--project", made["project_id"], "--tier", "aggregate")
    (cell,) = results(released(client, app, made["project_id"], count(epsilon=30.0)))
    assert (cell["suppressed"], cell["value"]) == (False, 1)


def test_with_the_default_threshold_a_tiny_cohort_is_suppressed(app, client, custodian_headers):
    made = cli(app, "project", "create", "--name", "default cells", "--tier", "aggregate", "--epsilon", "100",
               "--epsilon-cap", "30")
    assert made["suppression"] == 11
    patient_id = person(client, custodian_headers, "female", "1960-01-01")
    cli(app, "consent", "set", "--patient", patient_id, "--project", made["project_id"], "--tier", "aggregate")
    for body in (count(epsilon=30.0), weights("sum", "count", 0, 1, epsilon=30.0),
                 weights("quantile", "count", 0, 1, param("q", 0.5), epsilon=30.0)):
        (cell,) = results(released(client, app, made["project_id"], body))
        assert cell["suppressed"] is True
        assert "value" not in cell and "interval" not in cell  # a suppressed cell has no value


# -- an epidemiological scenario on synthetic patients -----------------------------------------------------


def test_hypertension_prevalence_and_mean_weight_on_60_synthetic_patients(app, client):
    wanted = ("Patient", "Condition", "Observation")  # what the questions use: fewer rows to load
    with app.app_context(), db.write() as conn:  # the plain-resource shape, stored in one write
        repository.upsert(conn, [(r["resourceType"], r) for r in synthetic.ndjson_resources(60, seed=11)
                                 if r["resourceType"] in wanted])
    project_id = new_project(app, epsilon=200.0, cap=20.0, suppression=0)
    with app.app_context(), db.write() as conn:
        ids = conn.execute(select(resources.c.id).where(resources.c.type == "Patient")).scalars().all()
        for patient_id in ids:
            writer.record(conn, writer.build(patient_id, None, "aggregate", [], source="test"))
    assert len(ids) == 60
    research = bearer(token(client, app, "research", project_id))
    hypertension = f"Condition?code={SNOMED}|{HYPERTENSION}"
    bands = (param("by", "age-band"), param("edges", "0,18,40,65,120"), param("at", "2026-01-01"))
    questions = {
        "population by age": histogram(*bands, epsilon=20.0),
        "hypertension by age": ask(param("measure", "histogram"), param("cohort", hypertension),
                                   {"name": "groupBy", "part": list(bands)}, epsilon=20.0),
        "hypertension by gender": ask(param("measure", "histogram"), param("cohort", hypertension),
                                      {"name": "groupBy", "part": [param("by", "gender")]}, epsilon=20.0),
    }
    for name, body in questions.items():
        truth = exact(app, project_id, body).bins
        response = post(client, research, body)
        assert response.status_code == 200, response.get_json()
        for cell in results(response.get_json()):
            assert cell.get("value", 0) == pytest.approx(truth.get(cell["bin"], 0), abs=2), (name, cell)
    assert sum(exact(app, project_id, questions["population by age"]).bins.values()) == 60
    assert sum(exact(app, project_id, questions["hypertension by age"]).bins.values()) > 0
    mean_weight = weights("mean", "latest", 0, 250, epsilon=20.0)
    truth = exact(app, project_id, mean_weight)
    assert truth.count > 30
    (cell,) = results(post(client, research, mean_weight).get_json())
    assert cell["value"] == pytest.approx(truth.total / truth.count, abs=5)
    assert spent(app, project_id) == 80.0
