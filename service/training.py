"""`$train`: a differentially private model trained on consenting patients, released as a document.

Order of work for one request, as for `$aggregate` (service/aggregate.py):

1. parse and check everything that depends only on the request and the project (the
   design through `policies.learning.spec`, each FHIR search compiled, the types the
   project receives, ε against the project's cap): a 400 or 403 here is free;
2. in a short write transaction (`Release.reserve`), the answer already recorded for the
   same request on the same data, or ε reserved for computing it (403 `too-costly`);
3. in a read transaction (`Release.training_rows`), one row per consented cohort patient
   with every value clipped in SQL (`service/store/features.py`), each statement bounded in
   time (`PASSERELLE_STATISTICS_TIMEOUT_SECONDS`; past it 422 `too-costly`); then the training and, if
   asked, the evaluation (`policies/learning.py`, whose docstring gives the privacy
   accounting). A cohort whose noisy size is above `PASSERELLE_TRAIN_MAX_ROWS` patients is
   refused there (400, `learning.RowLimit`): this limit alone depends on the data, so its
   refusal comes after ε is spent, is judged on the noisy size, never the exact count, and
   is audited naming the patients read;
4. in another short write transaction (`Release.record`), the answer recorded with its
   audit entry (action `train`) naming the patients it was computed on. A recorded answer
   given again is audited as a replay (nothing spent).

Once ε is reserved it stays spent, whatever fails after.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from flask import current_app

from consent.projects import ProjectRecord
from policies import budget, learning
from service.errors import InvalidRequest
from service.parameters import (
    cohort_of,
    epsilon_of,
    expression,
    named,
    only,
    parameters,
    parts_of,
    value_of,
    valued_expression,
)
from service.release import Release
from service.store.cohort import Expression
from service.store.features import Column, Design, Matrix

_PARAMETERS = ("model", "cohort", "feature", "label", "index-date", "horizon", "epsilon", "evaluate")
_FEATURE_PARTS = ("name", "expression", "reduce", "builtin", "has", "lower", "upper", "missing")
_LABEL_PARTS = ("has", "expression", "reduce", "lower", "upper")
_UCUM = "http://unitsofmeasure.org"


@dataclass(frozen=True)
class Training:
    """One parsed, checked $train request: the design, its cohort, ε and whether to evaluate."""

    spec: learning.Spec
    cohort: tuple[Expression, ...]
    epsilon: float
    evaluate: bool

    @property
    def searches(self) -> tuple[Expression, ...]:
        """Every FHIR search of the request: the cohort's, the features', the label's."""
        design = self.design(0)
        return (*design.cohort, *(c.expression for c in (*design.features, design.label) if c and c.expression))

    @property
    def named_types(self) -> tuple[str, ...]:
        """The types the request names: each search's, and Patient when a feature is a builtin."""
        builtin = {"Patient"} if any(f.kind == "builtin" for f in self.spec.features) else set()
        return tuple(sorted(builtin | {e.resource_type for e in self.searches}))

    @property
    def types(self) -> tuple[str, ...]:
        """Every resource type the rows are read from: the named types and Patient (the unit)."""
        return tuple(sorted({"Patient", *self.named_types}))

    def design(self, at: int) -> Design:
        return design(self.spec, self.cohort, at, learning.index_us(self.spec), label=True)

    def canonical(self) -> dict[str, Any]:
        """What identifies the request (hashed to recognise a repeated one)."""
        spec = self.spec
        return {"operation": "train", "model": spec.model, "epsilon": repr(float(self.epsilon)),
                "cohort": sorted(e.text for e in self.cohort), "features": [f.as_json() for f in spec.features],
                "label": spec.label.as_json(), "index-date": spec.index_date, "horizon": spec.horizon,
                "evaluate": self.evaluate}


def design(spec: learning.Spec, cohort: tuple[Expression, ...], at: int, index: int | None, *, label: bool
           ) -> Design:
    """The rows `spec` reads, each FHIR search compiled (errors name the feature): over the
    patients matching every `cohort` search, features before `index` (µs; None: all data), ages
    at `index` or else at `at`, and, with `label`, the label after `index` within the horizon."""
    columns = tuple(_column(f.kind, f.source, f.reduce, f.lower, f.upper, f.missing, f"feature[{i}]")
                    for i, f in enumerate(spec.features))
    learned = None
    if label:
        lab = spec.label
        learned = (_column("has", lab.source, None, 0.0, 1.0, 0.0, "label") if lab.kind == "has" else
                   _column("expression", lab.source, lab.reduce, lab.lower, lab.upper, None, "label"))  # type: ignore[arg-type]
    horizon = learning.horizon_us(spec.horizon) if spec.horizon is not None and index is not None else None
    return Design(columns, at, cohort, learned, index, horizon)


def _column(kind: str, source: str, reduce: str | None, lower: float, upper: float, missing: float | None,
            where: str) -> Column:
    if kind == "builtin":
        return Column(kind, source, lower, upper, missing)
    compiled = (valued_expression(source, reduce, f"{where}.expression") if kind == "expression" and reduce
                else expression(source, f"{where}.{kind}"))
    return Column(kind, source, lower, upper, missing, reduce, compiled)


# -- parsing the Parameters resource -------------------------------------------------------------


def _parts(item: dict[str, Any], name: str, known: tuple[str, ...]) -> dict[str, Any]:
    """One parameter's parts as {part name: value}, each part once and known."""
    if any(key.startswith("value") for key in item):
        raise InvalidRequest(f"parameter {name!r} takes parts, not a value", expression=name)
    parts = named(item.get("part"), name)
    only(parts, known, f"{name}.")
    return {part["name"]: value_of(parts, part["name"], f"{name}.") for part in parts}


def _horizon(value: Any) -> Any:
    """A horizon sent as a Quantity (UCUM) in the text form `learning.horizon` reads."""
    if not isinstance(value, dict):
        return value
    unit = value.get("code") or value.get("unit")
    if value.get("system", _UCUM) != _UCUM or not isinstance(value.get("value"), (int, float)) or \
            isinstance(value.get("value"), bool) or not isinstance(unit, str):
        raise InvalidRequest("horizon must be a UCUM Quantity (a, mo, wk or d) or a string like '5 a'",
                             expression="horizon")
    return f"{value['value']} {unit}"


def parse(body: Any, project: ProjectRecord, min_epsilon: float) -> Training:
    """Check every parameter against the request alone and the project's ε cap; errors name the parameter."""
    items = parameters(body, "$train", _PARAMETERS)
    model = value_of(items, "model", required=True)
    epsilon = epsilon_of(items, project, min_epsilon)
    cohort = cohort_of(items)
    features = [_parts(item, "feature", _FEATURE_PARTS) for item in items if item["name"] == "feature"]
    label = parts_of(items, "label")
    if label is None:
        raise InvalidRequest("parameter 'label' is required", expression="label")
    only(label, _LABEL_PARTS, "label.")
    spec = learning.spec(model, features, {p["name"]: value_of(label, p["name"], "label.") for p in label},
                         value_of(items, "index-date"), _horizon(value_of(items, "horizon")),
                         where={"feature": "feature"})
    evaluate = value_of(items, "evaluate")
    if evaluate is not None and not isinstance(evaluate, bool):
        raise InvalidRequest("evaluate must be a boolean", expression="evaluate")
    training = Training(spec, cohort, epsilon, bool(evaluate))
    training.design(0)  # every FHIR search compiles, before anything is spent
    return training


def _check_types(release: Release, training: Training) -> None:
    """Only over data the project receives (each search's type, and Patient for ages and genders),
    searched by no identifying value."""
    for resource_type in training.named_types:
        release.require_type(resource_type)
    release.require_statistical(training.searches)


# -- training, the answer ------------------------------------------------------------------------


def compute(release: Release, training: Training, matrix: Matrix, max_rows: int, random_state: Any = None
            ) -> dict[str, Any]:
    """The answer to record: the noisy training size and, unless suppressed, the model document
    and the evaluation if asked. Each patient is in the training or the holdout part by a keyed
    hash of their id alone (`learning.in_holdout`), and the training part is in the order of
    another keyed hash (which patients a training of fewer rows keeps, `learning.public_size`)."""
    assert matrix.labels is not None
    key, patients, labels = release.key.pseudonymise_value, matrix.patients, matrix.labels
    order = sorted(range(len(patients)), key=lambda i: key(f"train-order:{patients[i]}"))
    held = [training.evaluate and learning.in_holdout(key(f"train-holdout:{patient}")) for patient in patients]
    part = {side: ([matrix.values[i] for i in order if held[i] == side], [labels[i] for i in order if held[i] == side])
            for side in (False, True)}
    spec, epsilon = training.spec, training.epsilon
    trained = learning.train(spec, *part[False], epsilon, release.project.suppression, max_rows, random_state)
    response: dict[str, Any] = {"model": spec.model, "epsilon": epsilon, "training_size": trained.size,
                                "suppressed": trained.suppressed}
    if trained.parameters is not None:
        at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        document = learning.document(spec, trained.parameters, epsilon, trained.size, release.project.project_id, at)
        # Kept as the text released, so that a replay gives it byte for byte.
        response["document"] = orjson.dumps(document).decode()
        if training.evaluate:
            model = learning.Model(spec, trained.parameters, epsilon, trained.size, document["trained"])
            response["evaluation"] = learning.evaluate(model, *part[True], epsilon, release.project.suppression,
                                                       random_state)
    return response


def _decimal(name: str, value: float) -> dict[str, Any]:
    return {"name": name, "valueDecimal": value}


def _per_feature(name: str, spec: learning.Spec, values: list[float]) -> list[dict[str, Any]]:
    return [{"name": name, "part": [{"name": "feature", "valueString": f.name}, _decimal("value", v)]}
            for f, v in zip(spec.features, values, strict=True)]


def _parameters_of(spec: learning.Spec, parameters: dict[str, Any]) -> list[dict[str, Any]]:
    if spec.model == "naive-bayes":
        return [{"name": "class", "part": [{"name": "label", "valueInteger": k},
                                           _decimal("count", parameters["class_count"][k]),
                                           *_per_feature("mean", spec, parameters["theta"][k]),
                                           *_per_feature("variance", spec, parameters["var"][k])]}
                for k in parameters["classes"]]
    return [*_per_feature("coefficient", spec, parameters["coefficients"]),
            _decimal("intercept", parameters["intercept"])]


def _evaluation(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's parts; a suppressed value is named by a `suppressed` part instead."""
    parts = [{"name": "suppressed", "valueString": name} if value is None else
             {"name": name, "valueInteger": value} if isinstance(value, int) else _decimal(name, value)
             for name, value in evaluation.items()]
    return {"name": "evaluation", "part": parts}


def render(response: dict[str, Any], remaining: float) -> dict[str, Any]:
    """The Parameters resource of a recorded answer."""
    size = [{"name": "suppressed", "valueBoolean": response["suppressed"]}]
    if not response["suppressed"]:
        size.append({"name": "value", "valueInteger": response["training_size"]})
    out = [{"name": "model", "valueCode": response["model"]}, _decimal("epsilon", response["epsilon"]),
           _decimal("remaining", remaining), {"name": "training-size", "part": size}]
    document = response.get("document")
    if document is None:
        out.append({"name": "withheld", "valueString": "the noisy training-set size is below this project's "
                                                       "suppression threshold: no model is released"})
    else:
        model = learning.validate(orjson.loads(document))
        out += _parameters_of(model.spec, model.parameters)
        if "evaluation" in response:
            out.append(_evaluation(response["evaluation"]))
        out.append({"name": "document", "valueString": document})
    return {"resourceType": "Parameters", "parameter": out}


def answer(release: Release, body: Any, idempotency_key: str | None, random_state: Any = None) -> dict[str, Any]:
    """Answer one $train request: the recorded answer, or one computed after ε is reserved."""
    training = parse(body, release.project, current_app.config["MIN_EPSILON"])
    _check_types(release, training)
    canonical = training.canonical()
    question = budget.canonical_text(canonical)
    query_hash = budget.text_hash(question)
    claim = release.reserve(training.types, question, training.epsilon, idempotency_key)
    response = claim.answer
    if response is None:
        matrix, version = release.training_rows(training.design(time.time_ns() // 1000), training.types)
        detail = {"query": canonical, "query_hash": query_hash, "epsilon": training.epsilon}
        try:
            computed = compute(release, training, matrix, current_app.config["TRAIN_MAX_ROWS"], random_state)
        except learning.RowLimit as refusal:
            # The refusal tells the caller something of these patients (paid for): it is audited as a release.
            release.audit("train", {**detail, "outcome": refusal.status}, matrix.patients, 0)
            raise
        response = release.record("train", query_hash, version, computed, idempotency_key, detail, matrix.patients)
    else:
        release.audit("train", {"query": canonical, "query_hash": query_hash, "epsilon": 0.0, "replayed": True},
                      (), 0)
    return render(response, claim.remaining)

