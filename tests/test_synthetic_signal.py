"""The synthetic data's type 2 diabetes signal (`service/synthetic/diabetes.py`): learnable, in the right direction,
with measurements that precede the onset.

The question is the one the model is built for: adults alive and free of diabetes at the index date D, features
measured before D (latest BMI, latest HbA1c, age at D, hypertension), label "type 2 diabetes with onset in
[D, D + horizon)". Features and label are computed here in plain Python from the generator's NDJSON resources.
"""
from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from service import synthetic
from service.synthetic.diabetes import SIGNAL

PATIENTS = 2000
SEED = 0
BMI, HBA1C = "39156-5", "4548-4"
DIABETES, HYPERTENSION = "44054006", "38341003"
INDEX = datetime.combine(SIGNAL.index_date, datetime.min.time(), UTC)
HORIZON_END = INDEX.replace(year=INDEX.year + SIGNAL.horizon_years)
FEATURES = ("age", "bmi", "hba1c", "hypertension")


@dataclass
class Chart:
    birth: date
    death: datetime | None
    #: (when, value), in no particular order.
    bmi: list[tuple[datetime, float]] = field(default_factory=list)
    hba1c: list[tuple[datetime, float]] = field(default_factory=list)
    diabetes: datetime | None = None
    hypertension: datetime | None = None

    def age(self, when: date) -> float:
        return (when - self.birth).days / 365.2425

    def latest_before(self, name: str, when: datetime) -> float | None:
        earlier = [reading for reading in getattr(self, name) if reading[0] < when]
        return max(earlier)[1] if earlier else None


def charts(patients: int, seed: int) -> Iterator[Chart]:
    """Each patient's dated BMI and HbA1c readings and diabetes and hypertension onsets."""
    by_id: dict[str, Chart] = {}
    for resource in synthetic.ndjson_resources(patients, seed):
        kind = resource["resourceType"]
        if kind == "Patient":
            death = resource.get("deceasedDateTime")
            by_id[resource["id"]] = Chart(date.fromisoformat(resource["birthDate"]),
                                          datetime.fromisoformat(death) if death else None)
        elif kind in ("Observation", "Condition"):
            chart = by_id[resource["subject"]["reference"].removeprefix("Patient/")]
            code = resource["code"]["coding"][0]["code"]
            if kind == "Observation" and code in (BMI, HBA1C):
                reading = (datetime.fromisoformat(resource["effectiveDateTime"]), resource["valueQuantity"]["value"])
                (chart.bmi if code == BMI else chart.hba1c).append(reading)
            elif kind == "Condition" and code == DIABETES:
                chart.diabetes = datetime.fromisoformat(resource["onsetDateTime"])
            elif kind == "Condition" and code == HYPERTENSION:
                chart.hypertension = datetime.fromisoformat(resource["onsetDateTime"])
    yield from by_id.values()


def at_risk(chart: Chart) -> bool:
    """An adult alive and free of diabetes at the index date."""
    return (chart.age(INDEX.date()) >= 18 and (chart.death is None or chart.death >= INDEX)
            and (chart.diabetes is None or chart.diabetes >= INDEX))


@dataclass(frozen=True)
class Cohort:
    charts: list[Chart]
    #: One row per chart, columns as FEATURES; a missing reading is the model's reference value.
    x: np.ndarray
    y: np.ndarray


@pytest.fixture(scope="module")
def everyone() -> list[Chart]:
    return list(charts(PATIENTS, SEED))


@pytest.fixture(scope="module")
def cohort(everyone) -> Cohort:
    members = [chart for chart in everyone if at_risk(chart)]
    rows = []
    for chart in members:
        bmi = chart.latest_before("bmi", INDEX)
        hba1c = chart.latest_before("hba1c", INDEX)
        rows.append((chart.age(INDEX.date()), SIGNAL.reference_bmi if bmi is None else bmi,
                     SIGNAL.reference_a1c if hba1c is None else hba1c,
                     float(chart.hypertension is not None and chart.hypertension < INDEX)))
    label = [chart.diabetes is not None and INDEX <= chart.diabetes < HORIZON_END for chart in members]
    return Cohort(members, np.array(rows), np.array(label, dtype=int))


@pytest.fixture(scope="module")
def split(cohort):
    return train_test_split(cohort.x, cohort.y, test_size=0.5, random_state=0, stratify=cohort.y)


@pytest.fixture(scope="module")
def model(split) -> LogisticRegression:
    x_train, _, y_train, _ = split
    return LogisticRegression(max_iter=1000).fit(x_train, y_train)


def test_a_logistic_regression_on_features_before_the_index_date_predicts_onsets_in_the_horizon(model, split):
    _, x_test, _, y_test = split
    assert y_test.sum() >= 15  # enough onsets for the AUC to mean something
    assert roc_auc_score(y_test, model.predict_proba(x_test)[:, 1]) >= 0.75


def test_a_higher_hba1c_means_a_higher_fitted_risk(model):
    assert model.coef_[0][FEATURES.index("hba1c")] > 1.0  # log-odds per HbA1c point, other features held


@pytest.mark.parametrize("feature", ["hba1c", "bmi", "age"])
def test_people_with_an_onset_in_the_horizon_had_a_higher_value_at_the_index_date(cohort, feature):
    column = cohort.x[:, FEATURES.index(feature)]
    assert column[cohort.y == 1].mean() > column[cohort.y == 0].mean()


def test_hba1c_alone_ranks_future_onsets_above_the_others(cohort):
    assert roc_auc_score(cohort.y, cohort.x[:, FEATURES.index("hba1c")]) >= 0.7


def test_most_adults_at_risk_have_a_bmi_and_an_hba1c_measured_before_the_index_date(cohort):
    members = cohort.charts
    assert sum(chart.latest_before("bmi", INDEX) is not None for chart in members) >= 0.75 * len(members)
    assert sum(chart.latest_before("hba1c", INDEX) is not None for chart in members) >= 0.5 * len(members)


def test_hba1c_and_bmi_rise_in_the_years_before_a_diabetes_onset(everyone):
    rises: dict[str, list[float]] = {"bmi": [], "hba1c": []}
    for chart in everyone:
        if chart.diabetes is None:
            continue
        for name, rise in rises.items():
            before = sorted(reading for reading in getattr(chart, name) if reading[0] < chart.diabetes)
            if len(before) >= 2:
                rise.append(before[-1][1] - before[0][1])
    assert len(rises["hba1c"]) >= 20 and len(rises["bmi"]) >= 20
    assert statistics.mean(rises["hba1c"]) > 0.3
    assert statistics.mean(rises["bmi"]) > 0.2


def test_a_diabetes_diagnosis_comes_with_a_diagnostic_hba1c(everyone):
    at_diagnosis = [value for chart in everyone if chart.diabetes is not None
                    for when, value in chart.hba1c if when.date() == chart.diabetes.date()]
    assert len(at_diagnosis) >= 20
    assert statistics.median(at_diagnosis) >= 6.5 and min(at_diagnosis) >= 6.0


def test_diabetes_prevalence_rises_with_age_within_plausible_bounds(everyone):
    end = date(2026, 1, 1)
    living = [chart for chart in everyone if chart.death is None]

    def prevalence(low: float, high: float) -> float:
        band = [chart for chart in living if low <= chart.age(end) < high]
        return sum(chart.diabetes is not None for chart in band) / len(band)

    young, middle, old = prevalence(18, 45), prevalence(45, 65), prevalence(65, 120)
    assert young < middle < old
    assert 0.005 < young < 0.06 and 0.06 < middle < 0.2 and 0.15 < old < 0.4
