"""policies/learning.py: the model document, prediction, and training whose every released number
is a mechanism's output (recomputed here from the same seeded random state)."""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
from diffprivlib.accountant import BudgetAccountant
from diffprivlib.mechanisms import Geometric, Laplace
from diffprivlib.models import GaussianNB, LinearRegression
from diffprivlib.models.logistic_regression import _logistic_regression_path

from policies import learning

BMI = "Observation?code=http://loinc.org|39156-5"
DIABETES = "Condition?code=http://snomed.info/sct|44054006"
FEATURES = [{"name": "bmi", "expression": BMI, "reduce": "latest", "lower": 15.0, "upper": 50.0},
            {"name": "age", "builtin": "age", "lower": 18.0, "upper": 90.0},
            {"name": "female", "builtin": "gender"}]
MAX_ROWS = 1_000_000
REGRESSION_LABEL = {"expression": "Observation?code=http://loinc.org|4548-4", "reduce": "max", "lower": 4.0,
                    "upper": 14.0}


def spec(model: str = "logistic-regression") -> learning.Spec:
    label = REGRESSION_LABEL if model == "linear-regression" else {"has": DIABETES}
    return learning.spec(model, FEATURES, label, "2020-01-01", "5 a")


def world(n: int = 400, seed: int = 1) -> tuple[list[list[float]], list[float]]:
    """Rows (bmi, age, female) and a label that rises with BMI."""
    rng = np.random.RandomState(seed)
    rows = [[float(rng.uniform(15, 50)), float(rng.uniform(18, 90)), float(rng.randint(2))] for _ in range(n)]
    return rows, [1.0 if row[0] > 32 else 0.0 for row in rows]


def trained(model: str = "logistic-regression", epsilon: float = 2.0, seed: int = 7) -> learning.Trained:
    rows, labels = world()
    if model == "linear-regression":
        labels = [4.0 + row[0] / 5 for row in rows]
    return learning.train(spec(model), rows, labels, epsilon, 0, MAX_ROWS, np.random.RandomState(seed))


def a_document(model: str = "logistic-regression") -> dict[str, Any]:
    result = trained(model)
    assert result.parameters is not None
    return learning.document(spec(model), result.parameters, 2.0, result.size, "project-1", "2026-01-01T00:00:00Z")


# -- the document ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(learning.MODELS))
def test_a_released_document_is_accepted_unchanged(model: str) -> None:
    doc = a_document(model)
    model_read = learning.validate(doc)
    assert model_read.spec == spec(model) and model_read.parameters == doc["parameters"]
    assert learning.document(model_read.spec, model_read.parameters, model_read.epsilon, model_read.training_size,
                             "project-1", "2026-01-01T00:00:00Z") == doc


def _broken(change: Any) -> dict[str, Any]:
    doc = copy.deepcopy(a_document())
    change(doc)
    return doc


INVALID = {
    "an unknown format": (lambda d: d.update(format="other/1"), "format"),
    "an unknown model": (lambda d: d.update(model="random-forest"), "model"),
    "a coefficient too few": (lambda d: d["parameters"]["coefficients"].pop(), "parameters.coefficients"),
    "an infinite coefficient": (lambda d: d["parameters"]["coefficients"].__setitem__(0, math.inf),
                                "parameters.coefficients[0]"),
    "an unknown element": (lambda d: d.update(extra=1), "document"),
    "no training size": (lambda d: d.update(training_size=None), "training_size"),
    "a label equal to a feature": (lambda d: d.update({"label": {"has": BMI}, "index-date": None, "horizon": None}),
                                   "label"),
    "a feature without bounds": (lambda d: d["features"][0].pop("lower"), "features[0].lower"),
    "a has feature with a missing value": (lambda d: d["features"].append(
        {"name": "diabetic", "has": DIABETES, "missing": 0.5}), "features[3].missing"),
    "a duplicate feature name": (lambda d: d["features"][1].update(name="bmi"), "features[1].name"),
    "a regression label for a classifier": (lambda d: d.update(label=REGRESSION_LABEL), "label"),
    "a horizon without index date": (lambda d: d.update({"index-date": None}), "horizon"),
    "an unknown scaling": (lambda d: d.update(scaling="z-score"), "scaling"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_validate_refuses_an_invalid_document_naming_what_is_wrong(case: str) -> None:
    change, where = INVALID[case]
    with pytest.raises(learning.ModelError) as refused:
        learning.validate(_broken(change))
    assert refused.value.expression == where and refused.value.message.startswith(where)


def test_a_naive_bayes_document_needs_positive_variances() -> None:
    doc = a_document("naive-bayes")
    doc["parameters"]["var"][0][0] = 0.0
    with pytest.raises(learning.ModelError, match="variances must be positive"):
        learning.validate(doc)


# -- prediction --------------------------------------------------------------------------------


def test_logistic_prediction_is_the_sigmoid_of_the_scaled_row() -> None:
    doc = a_document()
    doc["parameters"] = {"coefficients": [2.0, -1.0, 0.5], "intercept": -0.25}
    model = learning.validate(doc)
    # bmi 50 → 1, age 200 clipped to 90 → 1, female 0 → 0
    assert learning.predict(model, [[50.0, 200.0, 0.0]]) == [1 / (1 + math.exp(-(2.0 - 1.0 - 0.25)))]


def test_linear_prediction_is_in_label_units_within_its_bounds() -> None:
    doc = a_document("linear-regression")
    doc["parameters"] = {"coefficients": [1.0, 0.0, 0.0], "intercept": 0.0}
    model = learning.validate(doc)
    assert learning.predict(model, [[32.5, 50.0, 1.0], [80.0, 50.0, 1.0]]) == [9.0, 14.0]


# -- training: every number released is a mechanism output ---------------------------------------


def _scaled_with_anchors(design: learning.Spec, rows: list[list[float]], labels: list[float], size: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The rows a training of noisy size `size` fits: the first `size` scaled rows, or all and
    neutral rows (0.5, labels 0, 1, 0, …; 0.5 for regression), then the two anchors."""
    scaled = [learning.scaled_row(design, row) for row in rows][:size]
    kept = list(labels[:size])
    for i in range(size - len(scaled)):
        scaled.append([0.5] * 3)
        kept.append(float(i % 2) if design.classification else 0.5)
    return np.array([*scaled, [0.5] * 3, [0.5] * 3]), np.array([*kept, 0.0, 1.0])


def test_a_logistic_model_is_the_objective_perturbation_output_and_the_size_a_geometric_draw() -> None:
    rows, labels = world()
    result = trained("logistic-regression", epsilon=2.0, seed=7)
    rs = np.random.RandomState(7)
    size = Geometric(epsilon=0.2, sensitivity=1, random_state=rs).randomise(len(rows))
    x, y = _scaled_with_anchors(spec(), rows, labels, size)
    coefs, _, _ = _logistic_regression_path(x, y, epsilon=1.8, data_norm=math.sqrt(3), pos_class=1.0, Cs=[1.0],
                                            fit_intercept=True, max_iter=learning.MAX_ITER, tol=1e-4, coef=None,
                                            random_state=rs, check_input=False)
    assert result.size == size and not result.suppressed
    assert result.parameters == {"coefficients": [float(c) for c in coefs[0][:-1]], "intercept": float(coefs[0][-1])}


def test_a_linear_model_is_diffprivlibs_output_on_bounds_zero_to_one() -> None:
    rows, _ = world()
    labels = [4.0 + row[0] / 5 for row in rows]
    result = trained("linear-regression", epsilon=2.0, seed=7)
    rs = np.random.RandomState(7)
    size = Geometric(epsilon=0.2, sensitivity=1, random_state=rs).randomise(len(rows))
    x, y = _scaled_with_anchors(spec("linear-regression"), rows, [(v - 4.0) / 10.0 for v in labels], size)
    fitted = LinearRegression(epsilon=1.8, bounds_X=(0.0, 1.0), bounds_y=(0.0, 1.0), random_state=rs,
                              accountant=BudgetAccountant()).fit(x, y)
    assert result.size == size
    assert result.parameters == {"coefficients": [float(c) for c in fitted.coef_],
                                 "intercept": float(fitted.intercept_)}


def test_naive_bayes_releases_its_noisy_class_counts_means_and_variances() -> None:
    rows, labels = world()
    result = trained("naive-bayes", epsilon=2.0, seed=7)
    rs = np.random.RandomState(7)
    size = Geometric(epsilon=0.2, sensitivity=1, random_state=rs).randomise(len(rows))
    x, y = _scaled_with_anchors(spec("naive-bayes"), rows, labels, size)
    fitted = GaussianNB(epsilon=1.8, bounds=(0.0, 1.0), random_state=rs, accountant=BudgetAccountant()
                        ).fit(x, y.astype(int))
    assert result.parameters == {"classes": [0, 1], "class_count": [float(c) for c in fitted.class_count_],
                                 "theta": fitted.theta_.tolist(), "var": fitted.var_.tolist()}


def test_the_row_limit_refuses_a_training_by_its_noisy_size() -> None:
    rows, labels = world()
    noisy = int(Geometric(epsilon=0.2, sensitivity=1, random_state=np.random.RandomState(7)).randomise(len(rows)))
    with pytest.raises(learning.RowLimit):
        learning.train(spec(), rows, labels, 2.0, 0, noisy - 1, np.random.RandomState(7))
    assert learning.train(spec(), rows, labels, 2.0, 0, noisy, np.random.RandomState(7)).size == noisy


def _rows_as_set(x: np.ndarray, y: np.ndarray) -> list[tuple[float, ...]]:
    return sorted((*row, label) for row, label in zip(x.tolist(), y.tolist(), strict=True))


@pytest.mark.parametrize("size", [150, 400, 401, 900])
@pytest.mark.parametrize("position", [0, 123, 400])
def test_a_patient_added_changes_one_row_of_a_training_of_the_same_public_size(size: int, position: int) -> None:
    """The neighbours the ledger counts (one patient more) are, given the noisy size, neighbours
    diffprivlib's guarantee covers (the same number of rows, one of them replaced)."""
    rows, labels = world()
    design = spec()
    x = np.array([learning.scaled_row(design, row) for row in rows])
    y = np.array(labels)
    added_x = np.insert(x, position, [0.9, 0.1, 1.0], axis=0)
    added_y = np.insert(y, position, 1.0)
    before = _rows_as_set(*learning.public_size(design, x, y, size))
    after = _rows_as_set(*learning.public_size(design, added_x, added_y, size))
    assert len(before) == len(after) == size
    assert sum(1 for row in after if row not in before or after.count(row) > before.count(row)) <= 1


def test_a_training_size_below_the_threshold_trains_and_releases_nothing() -> None:
    rows, labels = world(n=20)
    result = learning.train(spec(), rows, labels, 1.0, 1000, MAX_ROWS, np.random.RandomState(3))
    assert result.suppressed and result.parameters is None


def test_diffprivlibs_global_accountant_is_never_charged() -> None:
    before = list(BudgetAccountant.load_default(None).spent_budget)
    trained("logistic-regression")
    trained("naive-bayes")
    assert list(BudgetAccountant.load_default(None).spent_budget) == before


def test_the_evaluation_is_a_geometric_histogram_of_the_confusion_matrix() -> None:
    model = learning.validate(a_document())
    rows, labels = world(n=100, seed=5)
    evaluation = learning.evaluate(model, rows, labels, 1.0, 0, np.random.RandomState(11))
    predicted = [p >= 0.5 for p in learning.predict(model, rows)]
    truth = [y == 1.0 for y in labels]
    cells = {"true-positive": sum(p and t for p, t in zip(predicted, truth, strict=True)),
             "false-positive": sum(p and not t for p, t in zip(predicted, truth, strict=True)),
             "true-negative": sum(not p and not t for p, t in zip(predicted, truth, strict=True)),
             "false-negative": sum(not p and t for p, t in zip(predicted, truth, strict=True))}
    mechanism = Geometric(epsilon=1.0, sensitivity=1, random_state=np.random.RandomState(11))
    assert evaluation == {**{name: mechanism.randomise(count) for name, count in cells.items()}, "epsilon": 1.0}


@pytest.mark.parametrize("model", ["logistic-regression", "linear-regression"])
def test_an_evaluation_count_below_the_suppression_threshold_is_withheld(model: str) -> None:
    rows, labels = world(n=30, seed=5)
    if model == "linear-regression":
        labels = [4.0 + row[0] / 5 for row in rows]
    evaluation = learning.evaluate(learning.validate(a_document(model)), rows, labels, 1.0, 1000,
                                   np.random.RandomState(11))
    assert {value for name, value in evaluation.items() if name != "epsilon"} == {None}


def test_the_regression_evaluation_is_a_noisy_rmse_from_a_count_and_a_clipped_sum() -> None:
    model = learning.validate(a_document("linear-regression"))
    rows, _ = world(n=100, seed=5)
    labels = [4.0 + row[0] / 5 for row in rows]
    evaluation = learning.evaluate(model, rows, labels, 1.0, 0, np.random.RandomState(11))
    squared = math.fsum(min((p - t) ** 2, 100.0) for p, t in zip(learning.predict(model, rows), labels, strict=True))
    rs = np.random.RandomState(11)
    count = Geometric(epsilon=0.5, sensitivity=1, random_state=rs).randomise(100)
    total = Laplace(epsilon=0.5, delta=0.0, sensitivity=100.0, random_state=rs).randomise(squared)
    assert evaluation == {"rmse": math.sqrt(max(total, 0.0) / max(count, 1)), "count": count, "epsilon": 1.0}


def test_a_patients_side_of_the_split_depends_on_their_digest_alone() -> None:
    sides = [learning.in_holdout(f"digest-{i}") for i in range(5000)]
    assert sides == [learning.in_holdout(f"digest-{i}") for i in range(5000)]
    assert 0.17 < sum(sides) / len(sides) < 0.23


def test_fresh_random_states_differ() -> None:
    assert learning.fresh_random_state().randint(2**31) != learning.fresh_random_state().randint(2**31)
