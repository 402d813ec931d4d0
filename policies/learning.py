"""Differentially private model training and the model document: pure policy (no HTTP, no SQL).

A model is asked for as a `Spec`: the model kind, up to `MAX_FEATURES` features (a FHIR
search's value reduced per patient, a builtin `age`/`gender`, or `has`: 1 if the patient
has a matching resource), a label (`has` for classification, a reduced value for
regression), and an optional index date and horizon. Every feature and a regression label
declare [lower, upper] bounds and the value `missing` a patient without one gets. The same
parser (`feature`, `label`, `spec`) reads a `$train` question and a model document, so a
released document is accepted unchanged by whoever scores with it.

Privacy accounting of one training at ε (the unit of privacy is the patient; the caller
gives one row per patient, every value already clipped to its bounds):

- patients are split by a keyed hash of their own id (`in_holdout`), so training and
  holdout are disjoint sets of patients and each patient's data touches one part only
  (parallel composition): each part may spend the whole ε;
- training part: `SIZE_SHARE` of ε buys the noisy training-set size (geometric,
  sensitivity 1); when it is below the suppression threshold no model is trained or
  released; the rest trains the model with diffprivlib (`LogisticRegression`,
  `LinearRegression`, `GaussianNB`) on features scaled to [0, 1] by their declared bounds
  (a regression label likewise), so the sensitivities diffprivlib needs (`data_norm` =
  sqrt(number of features), `bounds_X` = `bounds_y` = `bounds` = (0, 1)) come from the
  declared bounds only; two public anchor rows (every feature 0.5, label 0 and 1) are
  added, so both classes are always present and the model's shape never depends on the data;
- holdout part (`evaluate`): classification, a noisy confusion matrix at threshold 0.5
  (a geometric histogram: each patient in one cell); regression, a noisy count (ε/2,
  geometric) and a noisy sum of squared errors each clipped to (upper − lower)² (ε/2,
  Laplace), from which the RMSE is post-processing.

diffprivlib's models are ε-DP for neighbouring data sets of one public size (one row
replaced), while the ledger's neighbours differ by one patient added or removed. The model
is therefore trained on exactly as many rows as the released noisy size `n` (a noisy size
above the row limit refuses the training, `RowLimit`: a function of the noisy size, never
of the exact count): the first `n` patients in the caller's keyed order, or all of them and
neutral rows (every scaled feature 0.5; labels alternately 0 and 1, or 0.5 for regression)
up to `n` (`public_size`). Given `n`, adding a patient either takes a neutral row's place or
displaces the last kept patient, one row replaced: so the model's ε holds for patients added
or removed, and the size's ε is paid once, before it (sequential composition). Every number
of a document's `parameters` and `training_size` is a mechanism's output or computed from
mechanism outputs only (naive Bayes's class counts are diffprivlib's noisy counts of the
rows trained on, which add up to the training size plus the two anchors).

Randomness: diffprivlib's models draw from the `random_state` they are given; without one
from a test, each training gets a fresh `numpy` RandomState seeded from `secrets`, and the
noisy counts draw from diffprivlib's secure default (as `policies/dp.py`). Each model gets
a throwaway `BudgetAccountant`: diffprivlib's process-global one is never touched.
"""
from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from numbers import Real
from typing import TYPE_CHECKING, Any

from policies import dp
from policies.fhirdates import date_range
from service.errors import InvalidRequest

if TYPE_CHECKING:
    import numpy as np

FORMAT = "passerelle-model/1"
#: Each model kind and the label it learns.
MODELS = {"logistic-regression": "classification", "naive-bayes": "classification",
          "linear-regression": "regression"}
REDUCERS = ("latest", "mean", "max", "min", "count")
BUILTINS = ("age", "gender")
MAX_FEATURES = 20
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
#: Share of the training part's ε spent on the noisy training-set size.
SIZE_SHARE = 0.1
#: One patient in HOLDOUT_ONE_IN is held out for evaluation.
HOLDOUT_ONE_IN = 5
#: Iterations of the logistic regression's optimiser: its work is bounded whatever the data.
MAX_ITER = 1000
#: A horizon's units (UCUM) in days, and the longest horizon.
HORIZON_DAYS = {"a": 365.25, "mo": 30.4375, "wk": 7.0, "d": 1.0}
MAX_HORIZON_DAYS = 200 * 365.25
FIRST_YEAR, LAST_YEAR = 1800, 9999
_HORIZON = re.compile(r"(\d{1,6}(?:\.\d{1,6})?) (a|mo|wk|d)")
_SEARCH = re.compile(r"[A-Z][A-Za-z]*(\?.*)?")
_CONFUSION = ("true-positive", "false-positive", "true-negative", "false-negative")
_DOCUMENT_KEYS = ("format", "model", "features", "label", "index-date", "horizon", "scaling", "parameters",
                  "epsilon", "training_size", "trained")


class ModelError(InvalidRequest):
    """A model question or document that is not valid; the message names the offending element."""


class RowLimit(InvalidRequest):
    """A training refused because its noisy training-set size is above the row limit. Judged on
    the noisy size (a mechanism's output), never the exact one, so the refusal is DP too."""


# -- the design: features, label, index date -----------------------------------------------------


@dataclass(frozen=True)
class Feature:
    """One column: `kind` is `expression` (`source` a FHIR search, reduced by `reduce`),
    `builtin` (`source` `age` or `gender`) or `has` (`source` a FHIR search); its value is
    clipped to [lower, upper], and `missing` when the patient has none."""

    name: str
    kind: str
    source: str
    reduce: str | None
    lower: float
    upper: float
    missing: float

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, self.kind: self.source}
        if self.reduce is not None:
            out["reduce"] = self.reduce
        return {**out, "lower": self.lower, "upper": self.upper, "missing": self.missing}


@dataclass(frozen=True)
class Label:
    """What is learned: `has` (1 if the patient has a `source` resource, else 0) or
    `expression` (`source` reduced by `reduce`, clipped to [lower, upper])."""

    kind: str
    source: str
    reduce: str | None = None
    lower: float | None = None
    upper: float | None = None

    def as_json(self) -> dict[str, Any]:
        if self.kind == "has":
            return {"has": self.source}
        return {"expression": self.source, "reduce": self.reduce, "lower": self.lower, "upper": self.upper}


@dataclass(frozen=True)
class Spec:
    """A model's design: kind, features, label, and the optional index date and horizon."""

    model: str
    features: tuple[Feature, ...]
    label: Label
    index_date: str | None = None
    horizon: str | None = None

    @property
    def classification(self) -> bool:
        return MODELS[self.model] == "classification"


@dataclass(frozen=True)
class Model:
    """A valid model document: its design, parameters (scaled space) and provenance."""

    spec: Spec
    parameters: dict[str, Any]
    epsilon: float
    training_size: int
    trained: dict[str, str]


def _fail(message: str, where: str) -> ModelError:
    return ModelError(f"{where}: {message}", expression=where)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not abs(value) <= dp.MAX_BOUND:
        raise _fail(f"must be a finite number of magnitude at most {dp.MAX_BOUND:g}", where)
    return float(value)


def _search(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _SEARCH.fullmatch(value):
        raise _fail("must be a FHIR search like Observation?code=http://loinc.org|4548-4", where)
    return value


def _reducer(value: Any, where: str) -> str:
    if value is None:
        return "latest"
    if value not in REDUCERS:
        raise _fail(f"must be one of {', '.join(REDUCERS)}", where)
    return str(value)


def _keys(raw: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _fail("must be an object", where)
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise _fail(f"unknown element {unknown[0]!r} (expected {', '.join(allowed)})", where)
    return raw


def _bounds(raw: dict[str, Any], where: str, fixed: bool) -> tuple[float, float]:
    """Declared bounds: required, lower < upper; exactly [0, 1] for a 0/1 feature (`fixed`)."""
    if fixed:
        lower, upper = raw.get("lower", 0.0), raw.get("upper", 1.0)
        if isinstance(lower, bool) or isinstance(upper, bool) or (lower, upper) != (0, 1):
            raise _fail("a 0/1 feature has the fixed bounds lower 0 and upper 1", f"{where}.lower")
        return 0.0, 1.0
    for name in ("lower", "upper"):
        if raw.get(name) is None:
            raise _fail("is required: bounds are declared, never taken from the data", f"{where}.{name}")
    lower, upper = _number(raw["lower"], f"{where}.lower"), _number(raw["upper"], f"{where}.upper")
    if not lower < upper:
        raise _fail("must be below upper", f"{where}.lower")
    return lower, upper


def feature(raw: Any, where: str) -> Feature:
    """One feature from its JSON form (`Feature.as_json`; `reduce` defaults to latest and
    `missing` to the midpoint of the bounds, except for `has`, which is never missing (0 without a
    match); a 0/1 feature may omit its bounds)."""
    raw = _keys(raw, ("name", "expression", "reduce", "builtin", "has", "lower", "upper", "missing"), where)
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise _fail("name must be a letter then up to 63 letters, digits, '_' or '-'", f"{where}.name")
    kinds = [kind for kind in ("expression", "builtin", "has") if kind in raw]
    if len(kinds) != 1:
        raise _fail("takes exactly one of expression, builtin, has", where)
    kind = kinds[0]
    if "reduce" in raw and kind != "expression":
        raise _fail("reduce goes with expression only", f"{where}.reduce")
    if kind == "builtin":
        source = raw["builtin"]
        if source not in BUILTINS:
            raise _fail(f"must be one of {', '.join(BUILTINS)}", f"{where}.builtin")
    else:
        source = _search(raw[kind], f"{where}.{kind}")
    reduce = _reducer(raw.get("reduce"), f"{where}.reduce") if kind == "expression" else None
    lower, upper = _bounds(raw, where, fixed=kind == "has" or source == "gender")
    if kind == "has":
        # Never missing: a patient without a match has 0.
        if raw.get("missing") not in (None, 0):
            raise _fail("a has feature is 0 for a patient without a match: its missing, if given, is 0",
                        f"{where}.missing")
        return Feature(name, kind, str(source), reduce, lower, upper, 0.0)
    missing = (lower + upper) / 2 if raw.get("missing") is None else _number(raw["missing"], f"{where}.missing")
    if not lower <= missing <= upper:
        raise _fail("must be within [lower, upper]", f"{where}.missing")
    return Feature(name, kind, str(source), reduce, lower, upper, missing)


def label(raw: Any, model: str, where: str) -> Label:
    """The label from its JSON form (`Label.as_json`), which must suit `model`: `has` for
    classification, `expression` with bounds for regression."""
    raw = _keys(raw, ("has", "expression", "reduce", "lower", "upper"), where)
    if "has" in raw:
        if set(raw) != {"has"}:
            raise _fail("has takes no reduce or bounds", where)
        found = Label("has", _search(raw["has"], f"{where}.has"))
    elif "expression" in raw:
        lower, upper = _bounds(raw, where, fixed=False)
        found = Label("expression", _search(raw["expression"], f"{where}.expression"),
                      _reducer(raw.get("reduce"), f"{where}.reduce"), lower, upper)
    else:
        raise _fail("takes has (classification) or expression (regression)", where)
    wanted = "has" if MODELS[model] == "classification" else "expression"
    if found.kind != wanted:
        raise _fail(f"{model} is {MODELS[model]}: its label takes {wanted}", where)
    return found


def index_date(value: Any, where: str) -> str:
    """A date YYYY-MM-DD."""
    try:
        parsed = date.fromisoformat(value) if isinstance(value, str) and len(value) == 10 else None
    except ValueError:
        parsed = None
    if parsed is None or not FIRST_YEAR <= parsed.year <= LAST_YEAR:
        raise _fail(f"must be a date (YYYY-MM-DD) from {FIRST_YEAR} to {LAST_YEAR}", where)
    return parsed.isoformat()


def horizon(value: Any, where: str) -> str:
    """A duration like `5 a` (UCUM a, mo, wk or d), positive and at most 200 years; canonical form."""
    match = _HORIZON.fullmatch(value) if isinstance(value, str) else None
    if match is None or not 0 < float(match[1]) * HORIZON_DAYS[match[2]] <= MAX_HORIZON_DAYS:
        raise _fail("must be a positive duration of at most 200 years like '5 a' (units a, mo, wk, d)", where)
    # Fixed-point, never an exponent, so that the canonical form reads back as itself.
    return f"{float(match[1]):.6f}".rstrip("0").rstrip(".") + f" {match[2]}"


def horizon_us(text: str) -> int:
    """A canonical horizon (`horizon`) in microseconds."""
    number, unit = text.split(" ")
    return round(float(number) * HORIZON_DAYS[unit] * 86_400 * 1_000_000)


def index_us(design: Spec) -> int | None:
    """The design's index date as the first microsecond of that day (UTC), or None."""
    return None if design.index_date is None else date_range(design.index_date)[0]


def spec(model: Any, features: Sequence[Any], label_raw: Any, index: Any = None, horizon_raw: Any = None,
         where: dict[str, str] | None = None) -> Spec:
    """A whole design, checked: model known, 1 to `MAX_FEATURES` features with distinct names,
    a label that suits the model and, without an index date, is not a feature, a horizon only
    with an index date.
    `where` renames the elements in messages (`model`, `feature`, `label`, `index-date`, `horizon`)."""
    names = {"model": "model", "feature": "features", "label": "label", "index-date": "index-date",
             "horizon": "horizon", **(where or {})}
    if model not in MODELS:
        raise _fail(f"must be one of {', '.join(MODELS)}", names["model"])
    if not 1 <= len(features) <= MAX_FEATURES:
        raise _fail(f"a model has 1 to {MAX_FEATURES} features, not {len(features)}", names["feature"])
    parsed = tuple(feature(raw, f"{names['feature']}[{i}]") for i, raw in enumerate(features))
    seen: set[str] = set()
    for i, each in enumerate(parsed):
        if each.name in seen:
            raise _fail(f"the name {each.name!r} is used twice", f"{names['feature']}[{i}].name")
        seen.add(each.name)
    learned = label(label_raw, str(model), names["label"])
    index_text = None if index is None else index_date(index, names["index-date"])
    # With an index date a feature reads the data before it and the label the data after it,
    # so the same search is two variables (e.g. "diagnosed before" and "diagnosed within 5 years").
    if index_text is None and any(each.kind != "builtin" and each.source == learned.source for each in parsed):
        raise _fail("the label may not be one of the features (unless an index-date separates them)",
                    names["label"])
    horizon_text = None if horizon_raw is None else horizon(horizon_raw, names["horizon"])
    if horizon_text is not None and index_text is None:
        raise _fail("a horizon needs an index-date", names["horizon"])
    return Spec(str(model), parsed, learned, index_text, horizon_text)


# -- the model document --------------------------------------------------------------------------


def document(design: Spec, parameters: dict[str, Any], epsilon: float, training_size: int, project: str,
             at: str) -> dict[str, Any]:
    """The released model as JSON (format `FORMAT`); `validate` accepts it unchanged."""
    return {"format": FORMAT, "model": design.model, "features": [f.as_json() for f in design.features],
            "label": design.label.as_json(), "index-date": design.index_date, "horizon": design.horizon,
            "scaling": "min-max", "parameters": parameters, "epsilon": epsilon, "training_size": training_size,
            "trained": {"project": project, "at": at}}


def _finite_list(value: Any, length: int, where: str) -> list[float]:
    if not isinstance(value, list) or len(value) != length:
        raise _fail(f"must be a list of {length} numbers", where)
    return [_finite(item, f"{where}[{i}]") for i, item in enumerate(value)]


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise _fail("must be a finite number", where)
    return float(value)


def _parameters(raw: Any, model: str, width: int) -> dict[str, Any]:
    if model == "naive-bayes":
        raw = _keys(raw, ("classes", "class_count", "theta", "var"), "parameters")
        if raw.get("classes") != [0, 1]:
            raise _fail("must be [0, 1]", "parameters.classes")
        rows = {name: raw.get(name) for name in ("theta", "var")}
        for name, value in rows.items():
            if not isinstance(value, list) or len(value) != 2:
                raise _fail(f"must be two lists of {width} numbers", f"parameters.{name}")
        parsed = {"classes": [0, 1], "class_count": _finite_list(raw.get("class_count"), 2, "parameters.class_count"),
                  **{name: [_finite_list(row, width, f"parameters.{name}[{i}]") for i, row in enumerate(value)]
                     for name, value in rows.items()}}
        if any(v <= 0 for row in parsed["var"] for v in row):
            raise _fail("variances must be positive", "parameters.var")
        if any(c < 0 for c in parsed["class_count"]):
            raise _fail("class counts may not be negative", "parameters.class_count")
        return parsed
    raw = _keys(raw, ("coefficients", "intercept"), "parameters")
    return {"coefficients": _finite_list(raw.get("coefficients"), width, "parameters.coefficients"),
            "intercept": _finite(raw.get("intercept"), "parameters.intercept")}


def validate(doc: Any) -> Model:
    """A model document (`document`) checked whole: format, known model, features and label
    re-parsed as `$train` parses them, parameters of the model's shape (finite numbers, one per
    feature), ε, the noisy training size and provenance. `ModelError` names what is wrong."""
    raw = _keys(doc, _DOCUMENT_KEYS, "document")
    missing = [key for key in _DOCUMENT_KEYS if key not in raw]
    if missing:
        raise _fail(f"{missing[0]} is required", "document")
    if raw["format"] != FORMAT:
        raise _fail(f"must be {FORMAT!r}", "format")
    if not isinstance(raw["features"], list):
        raise _fail("must be a list", "features")
    design = spec(raw["model"], raw["features"], raw["label"], raw["index-date"], raw["horizon"])
    if raw["scaling"] != "min-max":
        raise _fail("must be 'min-max'", "scaling")
    parameters = _parameters(raw["parameters"], design.model, len(design.features))
    epsilon = _finite(raw["epsilon"], "epsilon")
    if not epsilon > 0:
        raise _fail("must be positive", "epsilon")
    size = raw["training_size"]
    if isinstance(size, bool) or not isinstance(size, int):
        raise _fail("must be a whole number (a withheld model has no document)", "training_size")
    trained = _keys(raw["trained"], ("project", "at"), "trained")
    if not all(isinstance(trained.get(key), str) for key in ("project", "at")):
        raise _fail("names the project (string) and the instant (string)", "trained")
    return Model(design, parameters, epsilon, size, {"project": trained["project"], "at": trained["at"]})


# -- scaling and prediction ----------------------------------------------------------------------


def _scaled(value: float, lower: float, upper: float) -> float:
    return (min(max(value, lower), upper) - lower) / (upper - lower)


def scaled_row(design: Spec, row: Sequence[float]) -> list[float]:
    """A row of feature values (one per feature, in order) clipped and scaled to [0, 1] by the declared bounds."""
    return [_scaled(value, f.lower, f.upper) for value, f in zip(row, design.features, strict=True)]


def predict(model: Model, rows: Sequence[Sequence[float]]) -> list[float]:
    """For each row of feature values (in the model's feature order, unscaled): the probability
    of label 1 (classification) or the predicted label value, clipped to its bounds (regression)."""
    return [_predict_one(model, scaled_row(model.spec, row)) for row in rows]


def _predict_one(model: Model, x: list[float]) -> float:
    p = model.parameters
    if model.spec.model == "naive-bayes":
        total = sum(p["class_count"])
        scores = []
        for k in range(2):
            prior = p["class_count"][k] / total if total > 0 else 0.5
            score = math.log(prior) if prior > 0 else -math.inf
            for value, mean, var in zip(x, p["theta"][k], p["var"][k], strict=True):
                score -= 0.5 * math.log(2 * math.pi * var) + (value - mean) ** 2 / (2 * var)
            scores.append(score)
        if scores[1] == -math.inf:
            return 0.0
        return 1.0 / (1.0 + math.exp(min(scores[0] - scores[1], 700.0)))
    linear = p["intercept"] + math.fsum(c * v for c, v in zip(p["coefficients"], x, strict=True))
    if model.spec.model == "logistic-regression":
        return 1.0 / (1.0 + math.exp(min(-linear, 700.0)))
    lab = model.spec.label
    assert lab.lower is not None and lab.upper is not None
    return lab.lower + min(max(linear, 0.0), 1.0) * (lab.upper - lab.lower)


# -- training ------------------------------------------------------------------------------------


def in_holdout(keyed_digest: str) -> bool:
    """Whether a patient is held out, from a keyed digest of their id alone (one in `HOLDOUT_ONE_IN`)."""
    return int.from_bytes(hashlib.sha256(keyed_digest.encode()).digest()[:8], "big") % HOLDOUT_ONE_IN == 0


def fresh_random_state() -> np.random.RandomState:
    """A RandomState seeded from `secrets` (128 bits), for one training."""
    import numpy as np

    return np.random.RandomState(np.random.MT19937(np.random.SeedSequence(secrets.randbits(128))))


@dataclass(frozen=True)
class Trained:
    """The training part's release: the noisy size, and the parameters unless it is suppressed."""

    size: int
    suppressed: bool
    parameters: dict[str, Any] | None


def train(design: Spec, rows: Sequence[Sequence[float]], labels: Sequence[float], epsilon: float, threshold: int,
          max_rows: int, random_state: np.random.RandomState | None = None) -> Trained:
    """Train on one row per patient (feature values and label, clipped to their bounds), the
    rows in the caller's keyed order: `SIZE_SHARE` of `epsilon` for the noisy size, the rest
    for the model, fitted on `public_size` rows of that size (module docstring). A noisy size
    above `max_rows` raises `RowLimit`. With `random_state` (tests) every draw comes from it,
    the size's first."""
    size = dp.Count(epsilon * SIZE_SHARE).release(len(rows), random_state=random_state)
    if size.value > max_rows:
        raise RowLimit(f"cohort: its noisy size is above the {max_rows} patients one training reads "
                       "(PASSERELLE_TRAIN_MAX_ROWS); the epsilon reserved stays spent", expression="cohort")
    if dp.suppress(size, threshold):
        return Trained(int(size.value), True, None)
    import numpy as np

    x = np.array([scaled_row(design, row) for row in rows], dtype=float).reshape(len(rows), len(design.features))
    y = np.array(labels, dtype=float) if design.classification else np.array(
        [_scaled(v, design.label.lower, design.label.upper) for v in labels], dtype=float)  # type: ignore[arg-type]
    x, y = public_size(design, x, y, max(int(size.value), 0))
    anchors = np.full((2, x.shape[1]), 0.5)
    x, y = np.vstack([x, anchors]), np.concatenate([y, [0.0, 1.0]])
    fitted = _fit(design, x, y, epsilon * (1 - SIZE_SHARE),
                  random_state if random_state is not None else fresh_random_state())
    if design.model == "naive-bayes":
        parameters = {"classes": [0, 1], "class_count": [float(c) for c in fitted.class_count_],
                      "theta": fitted.theta_.tolist(), "var": fitted.var_.tolist()}
    else:
        parameters = {"coefficients": [float(c) for c in np.ravel(fitted.coef_)],
                      "intercept": float(np.ravel(fitted.intercept_)[0])}
    return Trained(int(size.value), False, parameters)


def public_size(design: Spec, x: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Exactly `size` scaled rows and labels: the first `size`, or all and neutral rows after
    them (every feature 0.5; labels alternately 0 and 1 for classification, 0.5 for regression)."""
    import numpy as np

    if len(x) >= size:
        return x[:size], y[:size]
    extra = size - len(x)
    neutral = np.arange(extra) % 2 if design.classification else np.full(extra, 0.5)
    return np.vstack([x, np.full((extra, x.shape[1]), 0.5)]), np.concatenate([y, neutral.astype(float)])


def _fit(design: Spec, x: np.ndarray, y: np.ndarray, epsilon: float, random_state: np.random.RandomState) -> Any:
    """diffprivlib's model for `design`, fitted on scaled rows, with a throwaway accountant."""
    import warnings

    from diffprivlib.accountant import BudgetAccountant
    from diffprivlib.models import GaussianNB, LinearRegression, LogisticRegression
    from sklearn.exceptions import ConvergenceWarning

    accountant = BudgetAccountant()
    if design.model == "logistic-regression":
        model: Any = _logistic_regression(LogisticRegression, epsilon, math.sqrt(x.shape[1]), random_state,
                                          accountant)
    elif design.model == "linear-regression":
        model = LinearRegression(epsilon=epsilon, bounds_X=(0.0, 1.0), bounds_y=(0.0, 1.0),
                                 random_state=random_state, accountant=accountant)
    else:
        model = GaussianNB(epsilon=epsilon, bounds=(0.0, 1.0), random_state=random_state, accountant=accountant)
    with warnings.catch_warnings():
        # An optimiser stopped at MAX_ITER still yields a released (noisy) model.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y.astype(int) if design.classification else y)


def _logistic_regression(base: type, epsilon: float, data_norm: float, random_state: np.random.RandomState,
                         accountant: Any) -> Any:
    """diffprivlib's LogisticRegression (objective perturbation), its `fit` unchanged. Its
    `__init__` passes scikit-learn the `multi_class` argument scikit-learn 1.8 no longer takes,
    so it is initialised here without it: for a binary label one-vs-rest is the only model."""
    from sklearn.linear_model import LogisticRegression as Plain

    class Binary(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            Plain.__init__(self, solver="lbfgs", max_iter=MAX_ITER, random_state=random_state)
            self.epsilon, self.data_norm, self.classes_, self.accountant = epsilon, data_norm, None, accountant

    return Binary()


def evaluate(model: Model, rows: Sequence[Sequence[float]], labels: Sequence[float], epsilon: float, threshold: int,
             random_state: np.random.RandomState | None = None) -> dict[str, Any]:
    """The holdout's noisy evaluation of `model` at `epsilon` (module docstring): the four
    confusion cells at threshold 0.5, or the RMSE with the noisy count it divides by. A noisy
    count below the project's suppression `threshold` is None (a cell; for a regression, the
    count and the RMSE)."""
    predicted = predict(model, rows)
    if model.spec.classification:
        cells = dict.fromkeys(_CONFUSION, 0)
        for p, truth in zip(predicted, labels, strict=True):
            cells[("true-" if (p >= 0.5) == (truth >= 0.5) else "false-") + ("positive" if p >= 0.5 else "negative")
                  ] += 1
        noisy = dp.Histogram(epsilon, _CONFUSION).release(cells, random_state=random_state)
        return {**{name: None if dp.suppress(noisy.bins[name], threshold) else int(noisy.bins[name].value)
                   for name in _CONFUSION}, "epsilon": epsilon}
    lab = model.spec.label
    assert lab.lower is not None and lab.upper is not None
    widest = (lab.upper - lab.lower) ** 2
    squared = math.fsum(min((p - min(max(t, lab.lower), lab.upper)) ** 2, widest)
                        for p, t in zip(predicted, labels, strict=True))
    count = dp.Count(epsilon / 2).release(len(rows), random_state=random_state)
    total = dp.BoundedSum(epsilon / 2, 0.0, widest).release(squared, random_state=random_state)
    if dp.suppress(count, threshold):
        return {"rmse": None, "count": None, "epsilon": epsilon}
    return {"rmse": math.sqrt(max(total.value, 0.0) / max(count.value, 1)), "count": int(count.value),
            "epsilon": epsilon}
