"""Section 8 — model training: DP models trained through `$train` against scikit-learn's, and what training costs.

The question is the documented diabetes signal (`service.synthetic.diabetes.SIGNAL`): adults
(`Patient?birthdate=le2003-01-01`), index date 2021-01-01, horizon 5 years. Features read before
the index date: latest BMI (LOINC 39156-5), latest HbA1c (LOINC 4548-4, missing → 5.4), age at
the index date, hypertension (`has`) and type 2 diabetes already diagnosed (`has`).

* Classification (logistic regression, naive Bayes): label = type 2 diabetes (SNOMED 44054006)
  with onset in [index, index + 5 a). Measured by the AUC.
* Regression (linear regression): label = the latest HbA1c in [index, index + 5 a) (patients
  without one are left out), from the same features minus the HbA1c before the index date: the
  future HbA1c from the other measurements and the diagnosis. The signal makes it learnable: a
  diabetic's HbA1c sits around 7.4 %, the others' rises with BMI and age. Measured by the RMSE
  (HbA1c %).

How it is measured, at each size (`Scale.train_sizes` patients):

* The dataset holds the Patients and only the Observations and Conditions the question reads
  (`Datasets.subset`, loaded with `flask ingest`, cached). A project of tier `aggregate` is
  created, every decision set to aggregate (`settings set consent-default aggregate`), and one
  patient in `HOLDOUT_ONE_IN` (by a hash of their id) records a refusal for the project
  (`consent.writer`): `$train` never sees the held-out patients.
* The DP model: `POST /research/fhir/$train` (in-process test client, real token, real ledger),
  the model document taken from the answer, its predictions computed with
  `policies.learning.predict` on the held-out patients' rows. Each (model, ε) is asked
  `Scale.train_repeats` times, each call with a slightly different ε (ε × (1 − k·10⁻⁶)) so that
  none is answered from the recorded answers; the table gives the median and the range.
* The non-private model: scikit-learn's `LogisticRegression()`, `GaussianNB()`,
  `LinearRegression()` (defaults) fitted on the training patients' rows as `$train` reads them
  (`service.store.features.rows` under the project's aggregate filter), scaled to [0, 1] by the
  declared bounds as `$train` scales them, and evaluated on the same held-out rows. The rows of
  both come from the product's feature code: the held-out rows are read with the custodian's
  unrestricted filter (`search.custodian_view`) — the benchmark's own measuring, not a research path.
* Training time: the `$train` request's wall time (median of every call of that model) beside a
  plain hand-written SQL read of the same rows (cohort, consent join, one statement per feature and
  the label, no ledger, no noise, no training; best of 3) and the product's own row SQL
  (`features.rows`) alone. The plain rows are checked equal to the product's.
* The plot `benchmarks/utility.png`: utility against ε per size, scikit-learn's as dashed lines.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson

from benchmarks.aggregate import hinted, in_period, releases
from benchmarks.harness import ROOT, Instance, fmt, median, progress, table
from benchmarks.research import create_project, patient_ids
from benchmarks.runner import Context

SECTION = "training"
EPSILONS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)
CLASSIFIERS = ("logistic-regression", "naive-bayes")
MODELS = (*CLASSIFIERS, "linear-regression")
HOLDOUT_ONE_IN = 5
PLOT = ROOT / "benchmarks" / "utility.png"

LOINC, SNOMED = "http://loinc.org", "http://snomed.info/sct"
BMI, HBA1C = f"{LOINC}|39156-5", f"{LOINC}|4548-4"
DIABETES, HYPERTENSION = f"{SNOMED}|44054006", f"{SNOMED}|38341003"
ADULTS = "2003-01-01"
COHORT = f"Patient?birthdate=le{ADULTS}"
INDEX_DATE = "2021-01-01"
HORIZON_YEARS = 5
#: The label (an onset after the index date) and a feature (diagnosed before it): the same search,
#: which the index date separates.
DIABETES_SEARCH = f"Condition?code={DIABETES}"
#: What the dataset keeps besides the Patients: what the features and the labels read.
CODES = {"Observation": frozenset({BMI, HBA1C}), "Condition": frozenset({DIABETES, HYPERTENSION})}
HBA1C_BOUNDS = (4.0, 12.0)


# -- the questions -----------------------------------------------------------------------------


def _feature(name: str, **parts: Any) -> dict[str, Any]:
    values = [{"name": "name", "valueString": name}]
    for key, value in parts.items():
        kind = "valueDecimal" if isinstance(value, float) else ("valueCode" if key == "builtin" else "valueString")
        values.append({"name": key, kind: value})
    return {"name": "feature", "part": values}


def question(model: str, epsilon: float) -> dict[str, Any]:
    """The `$train` Parameters for `model` (module docstring)."""
    features = [_feature("bmi", expression=f"Observation?code={BMI}", lower=15.0, upper=50.0, missing=27.0)]
    if model in CLASSIFIERS:
        features.append(_feature("hba1c", expression=f"Observation?code={HBA1C}", lower=HBA1C_BOUNDS[0],
                                 upper=HBA1C_BOUNDS[1], missing=5.4))
        label = [{"name": "has", "valueString": DIABETES_SEARCH}]
    else:
        label = [{"name": "expression", "valueString": f"Observation?code={HBA1C}"},
                 {"name": "reduce", "valueCode": "latest"},
                 {"name": "lower", "valueDecimal": HBA1C_BOUNDS[0]}, {"name": "upper", "valueDecimal": HBA1C_BOUNDS[1]}]
    features += [_feature("age", builtin="age", lower=18.0, upper=90.0),
                 _feature("hypertension", has=f"Condition?code={HYPERTENSION}"),
                 _feature("diabetic", has=DIABETES_SEARCH)]
    return {"resourceType": "Parameters", "parameter": [
        {"name": "model", "valueCode": model}, {"name": "cohort", "valueString": COHORT}, *features,
        {"name": "label", "part": label}, {"name": "index-date", "valueDate": INDEX_DATE},
        {"name": "horizon", "valueString": f"{HORIZON_YEARS} a"}, {"name": "epsilon", "valueDecimal": epsilon}]}


def held_out(patient_id: str) -> bool:
    """The benchmark's holdout: one patient in `HOLDOUT_ONE_IN`, by a hash of their id."""
    return int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "big") % HOLDOUT_ONE_IN == 0


# -- the same rows in plain SQL ----------------------------------------------------------------
# What an analyst with database access would write to read the training rows: the adult
# Patients whose decision releases them, then one statement per feature (latest value or
# presence before the index date, age at it) and one for the label, each joined to the
# consent decisions like benchmarks/aggregate.py's plain SQL; values clipped in SQL.

_PATIENTS = f"""
    SELECT p.id, (:index - min(born.low)) / :year AS age
    FROM resources p
    JOIN decisions pd ON pd.patient_id = p.id AND {releases("pd", "p")}
    JOIN idx_date born ON born.resource_pk = p.pk AND born.param || '' = 'birthdate'
    WHERE p.type = 'Patient' AND p.deleted = :f
    GROUP BY p.id HAVING min(born.low) <= :adults"""


def _rows_of(kind: str, window: str, join: str = "") -> str:
    return f"""
      FROM idx_token t
      JOIN resources o ON o.pk = t.resource_pk {join}
      JOIN decisions d ON d.patient_id = o.patient_id AND {releases("d", "o")} AND {in_period("d", "o")}
      WHERE t.param = 'code' AND t.system = :system AND t.code = :code
        AND o.type = '{kind}' AND o.deleted = :f AND {window}"""


def _latest(window: str) -> str:
    return f"""
    SELECT patient_id, CASE WHEN v < :lower THEN :lower WHEN v > :upper THEN :upper ELSE v END FROM (
      SELECT o.patient_id, q.value AS v,
             row_number() OVER (PARTITION BY o.patient_id ORDER BY o.clinical_low DESC, o.pk DESC) AS rn
      {_rows_of("Observation", window, "JOIN idx_quantity q ON q.resource_pk = o.pk "
                                       "AND q.param || '' = 'value-quantity'")}
    ) ranked WHERE rn = 1"""


def _has(window: str) -> str:
    return f"SELECT DISTINCT o.patient_id {_rows_of('Condition', window)}"


BEFORE = "o.clinical_low < :index"
AFTER = "o.clinical_low >= :index AND o.clinical_low < :until"


@dataclass(frozen=True)
class Bounds:
    lower: float
    upper: float

    def clip(self, value: float) -> float:
        return min(max(value, self.lower), self.upper)


def plain_rows(conn: Any, model: str, project_id: str, index: int, until: int, adults: int
               ) -> tuple[list[str], list[list[float]], list[float]]:
    """The rows of `question(model, …)` as plain SQL reads them: (patients, feature rows, labels)."""
    from service.store.features import YEAR_US

    base = {"project": project_id, "f": False, "now": time.time_ns() // 1000, "index": index, "until": until}

    def run(sql: str, code: str, **extra: Any) -> list[Any]:
        system, value = code.split("|", 1)
        return list(conn.execute(hinted(sql, conn), {**base, "system": system, "code": value, **extra}).all())

    ages = {pid: Bounds(18.0, 90.0).clip(age) for pid, age in conn.execute(
        hinted(_PATIENTS, conn), {**base, "year": YEAR_US, "adults": adults}).all()}
    bmi = dict(run(_latest(BEFORE), BMI, lower=15.0, upper=50.0))
    hypertension = {pid for (pid,) in run(_has(BEFORE), HYPERTENSION)}
    diabetic = {pid for (pid,) in run(_has(BEFORE), DIABETES)}
    patients = sorted(ages)
    if model in CLASSIFIERS:
        a1c = dict(run(_latest(BEFORE), HBA1C, lower=HBA1C_BOUNDS[0], upper=HBA1C_BOUNDS[1]))
        onset = {pid for (pid,) in run(_has(AFTER), DIABETES)}
        labels = [float(pid in onset) for pid in patients]
        rows = [[bmi.get(pid, 27.0), a1c.get(pid, 5.4), ages[pid], float(pid in hypertension),
                 float(pid in diabetic)] for pid in patients]
        return patients, rows, labels
    later = dict(run(_latest(AFTER), HBA1C, lower=HBA1C_BOUNDS[0], upper=HBA1C_BOUNDS[1]))
    patients = [pid for pid in patients if pid in later]
    rows = [[bmi.get(pid, 27.0), ages[pid], float(pid in hypertension), float(pid in diabetic)] for pid in patients]
    return patients, rows, [later[pid] for pid in patients]


def _differences(plain: tuple[list[str], list[list[float]], list[float]], matrix: Any) -> int:
    """Patients whose plain-SQL row (features and label) differs from the product's, or who are in one only."""
    mine = {pid: (row, y) for pid, row, y in zip(*plain, strict=True)}
    theirs = {pid: (row, y) for pid, row, y in zip(matrix.patients, matrix.values, matrix.labels, strict=True)}
    differ = len(set(mine) ^ set(theirs))
    for pid in set(mine) & set(theirs):
        (a, ya), (b, yb) = mine[pid], theirs[pid]
        if abs(ya - yb) > 1e-6 or any(abs(x - z) > 1e-6 for x, z in zip(a, b, strict=True)):
            differ += 1
    return differ


# -- utility -----------------------------------------------------------------------------------


def utility(model: str, truth: list[float], predicted: list[float]) -> float:
    """AUC (classifiers) or RMSE (regression) of `predicted` against `truth`."""
    if model in CLASSIFIERS:
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score([int(t >= 0.5) for t in truth], predicted))
    return math.sqrt(math.fsum((p - t) ** 2 for p, t in zip(predicted, truth, strict=True)) / len(truth))


def non_private(model: str, spec: Any, rows: list[list[float]], labels: list[float],
                held_rows: list[list[float]]) -> list[float]:
    """scikit-learn's model (defaults) fitted on the rows scaled as `$train` scales them; its
    predictions on `held_rows` (probability of label 1, or the value clipped to the label's bounds)."""
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.naive_bayes import GaussianNB

    from policies.learning import scaled_row

    x = [scaled_row(spec, row) for row in rows]
    held = [scaled_row(spec, row) for row in held_rows]
    if model == "linear-regression":
        bounds = Bounds(*HBA1C_BOUNDS)
        return [bounds.clip(float(v)) for v in LinearRegression().fit(x, labels).predict(held)]
    classifier = LogisticRegression() if model == "logistic-regression" else GaussianNB()
    return [float(p) for p in classifier.fit(x, [int(y) for y in labels]).predict_proba(held)[:, 1]]


@dataclass
class Result:
    """One size's measurements."""

    patients: int
    held: dict[str, int] = field(default_factory=dict)         # model → held-out patients evaluated on
    trained: dict[str, int] = field(default_factory=dict)      # model → patients `$train` trained on
    positives: dict[str, float] = field(default_factory=dict)  # classifier → share of label 1 (training rows)
    baseline: dict[str, float] = field(default_factory=dict)   # model → scikit-learn's utility
    dp: dict[tuple[str, float], list[float]] = field(default_factory=dict)
    withheld: dict[tuple[str, float], int] = field(default_factory=dict)
    train_ms: dict[str, list[float]] = field(default_factory=dict)
    rows_ms: dict[str, float] = field(default_factory=dict)
    plain_ms: dict[str, float] = field(default_factory=dict)
    plain_differ: dict[str, int] = field(default_factory=dict)


def _best_of(call: Any, times: int = 3) -> tuple[float, Any]:
    best, value = math.inf, None
    for _ in range(times):
        start = time.perf_counter()
        value = call()
        best = min(best, (time.perf_counter() - start) * 1000)
    return best, value


def _refuse(instance: Instance, project_id: str, ids: list[str]) -> float:
    """Each of `ids` records a refusal (tier none) for the project (`consent.writer`); seconds."""
    from benchmarks.datasets import chunks
    from consent import writer
    from service import db

    start = time.perf_counter()
    for done, chunk in enumerate(chunks(ids, 200)):
        with instance.app.app_context(), db.write(instance.engine) as conn:
            for patient_id in chunk:
                writer.record(conn, writer.build(patient_id, project_id, "none", [], source="benchmark"))
        if done % 25 == 24:
            progress(f"refusals recorded: {(done + 1) * 200:,} of {len(ids):,}")
    return time.perf_counter() - start


def measure_size(ctx: Context, patients: int, repeats: int) -> Result:
    from consent import engine, projects
    from policies import learning
    from policies.fhirdates import date_range
    from service import db
    from service import training as product
    from service.release import release_for
    from service.store import features, search

    source, _meta = ctx.datasets.subset("training", patients, CODES)
    database = ctx.datasets.checkout(source, f"training-{patients}")
    instance = Instance(database, ctx.workdir / f"training-{patients}")
    result = Result(patients)
    try:
        project_id = create_project(instance, "aggregate", f"benchmark training {patients}", epsilon=1e6,
                                    epsilon_cap=10.0)
        refreshed = instance.app.test_cli_runner().invoke(args=["settings", "set", "consent-default", "aggregate"])
        if refreshed.exit_code != 0:
            raise RuntimeError(f"settings set consent-default failed: {refreshed.output[-300:]}")
        held = {pid for pid in patient_ids(instance.database) if held_out(pid)}
        seconds = _refuse(instance, project_id, sorted(held))
        progress(f"{patients:,} patients: {len(held):,} held out (refusals recorded in {seconds:.1f} s)")
        client = instance.app.test_client()
        bearer = instance.bearer(instance.register("research", project_id))
        with instance.app.app_context(), db.read(instance.engine) as conn:
            project = projects.get(conn, project_id)
        index = date_range(INDEX_DATE)[0]
        adults = date_range(ADULTS)[1]
        until = index + learning.horizon_us(f"{HORIZON_YEARS} a")
        calls = [0]

        def train(model: str, epsilon: float) -> tuple[float, dict[str, Any]]:
            calls[0] += 1
            asked = round(epsilon * (1 - calls[0] * 1e-6), 9)  # a new ε: never a recorded answer
            start = time.perf_counter()
            response = client.post("/research/fhir/$train", json=question(model, asked),
                                   headers={"Authorization": bearer(), "Content-Type": "application/fhir+json"})
            elapsed = (time.perf_counter() - start) * 1000
            if response.status_code != 200:
                raise RuntimeError(f"$train answered {response.status_code}: {response.get_data()[:400]!r}")
            return elapsed, {p["name"]: p for p in response.get_json()["parameter"]}

        for model in MODELS:
            parsed = product.parse(question(model, 1.0), project, instance.app.config["MIN_EPSILON"])
            design = parsed.design(time.time_ns() // 1000)
            with instance.app.app_context():
                consented = release_for("benchmark", project_id, engine.AGGREGATE).aggregate_filter(
                    db.now_us(), parsed.types)
                with db.read(instance.engine) as conn:
                    result.rows_ms[model], trained = _best_of(partial(features.rows, conn, design, consented))
                    everyone = features.rows(conn, design, search.custodian_view)
                    result.plain_ms[model], plain = _best_of(
                        partial(plain_rows, conn, model, project_id, index, until, adults))
            result.plain_differ[model] = _differences(plain, trained)
            if held & set(trained.patients):
                raise RuntimeError("$train's rows include held-out patients: the refusals were not applied")
            held_rows = [(row, y) for pid, row, y in zip(everyone.patients, everyone.values, everyone.labels,
                                                         strict=True) if pid in held]
            rows, truth = [r for r, _ in held_rows], [y for _, y in held_rows]
            result.trained[model], result.held[model] = len(trained.patients), len(rows)
            if model in CLASSIFIERS:
                result.positives[model] = sum(trained.labels) / max(1, len(trained.labels))
            result.baseline[model] = utility(model, truth, non_private(model, parsed.spec, trained.values,
                                                                       trained.labels, rows))
            progress(f"{patients:,} patients, {model}: {len(trained.patients):,} training rows, {len(rows):,} "
                     f"held out; scikit-learn {result.baseline[model]:.3f}; {repeats} $train calls per ε")
            result.train_ms[model] = []
            for epsilon in EPSILONS:
                scores, withheld = [], 0
                for _ in range(repeats):
                    elapsed, answer = train(model, epsilon)
                    result.train_ms[model].append(elapsed)
                    if "document" not in answer:
                        withheld += 1
                        continue
                    released = learning.validate(orjson.loads(answer["document"]["valueString"]))
                    scores.append(utility(model, truth, learning.predict(released, rows)))
                result.dp[model, epsilon], result.withheld[model, epsilon] = scores, withheld
    finally:
        instance.close()
    return result


# -- output ------------------------------------------------------------------------------------


def _spread(values: list[float], digits: int) -> str:
    if not values:
        return "—"
    return f"{median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def report(results: list[Result], db_name: str) -> None:
    sizes = ", ".join(f"{r.patients:,}" for r in results)
    rows = []
    for r in results:
        for model in MODELS:
            cells = []
            for epsilon in EPSILONS:
                cell = _spread(r.dp[model, epsilon], 3)
                if r.withheld[model, epsilon]:
                    cell += f" [{r.withheld[model, epsilon]} withheld]"
                cells.append(cell)
            metric = "AUC" if model in CLASSIFIERS else "RMSE (HbA1c %)"
            rows.append([f"{r.patients:,}", model, metric, f"{r.trained[model]:,} / {r.held[model]:,}",
                         fmt(r.baseline[model], 3), *cells])
    repeats = ", ".join(f"{r.patients:,}: {len(r.dp[MODELS[0], EPSILONS[0]]) + r.withheld[MODELS[0], EPSILONS[0]]}"
                        for r in results)
    positives = "; ".join(f"{r.patients:,}: {r.positives['logistic-regression']:.1%}" for r in results)
    table(f"8. Model utility: DP model through $train vs scikit-learn, by ε — {sizes} patients ({db_name})",
          ["patients", "model", "measure", "train / held-out rows", "scikit-learn", *(f"ε={e:g}" for e in EPSILONS)],
          rows,
          note=f"Label: type 2 diabetes with onset in [{INDEX_DATE}, +{HORIZON_YEARS} a) (AUC, higher is better; "
               f"share with an onset among training rows: {positives}), or the latest HbA1c in that window "
               "(RMSE in HbA1c %, lower is better).\nFeatures before the index date: latest BMI, latest HbA1c "
               "(classifiers only), age, hypertension, diabetes already diagnosed; cohort: adults "
               f"({COHORT}).\nDP cells: median (min–max) over the $train calls (per size: {repeats}), each "
               "evaluated with policies.learning.predict on the held-out patients (1 in "
               f"{HOLDOUT_ONE_IN}, refused consent, so $train never saw them); scikit-learn: default "
               "model, same training rows scaled the same way, same held-out rows. Plot: benchmarks/utility.png.")
    time_rows = []
    for r in results:
        for model in MODELS:
            train = median(r.train_ms[model])
            time_rows.append([f"{r.patients:,}", model, f"{r.trained[model]:,}", fmt(r.plain_ms[model], 1),
                              fmt(r.rows_ms[model], 1), fmt(train, 1), fmt(train / r.plain_ms[model], 2),
                              "yes" if not r.plain_differ[model] else f"NO ({r.plain_differ[model]:,} differ)"])
    table(f"8b. Training time: $train beside a plain SQL read of the same rows (ms) ({db_name})",
          ["patients", "model", "training rows", "plain SQL (best of 3)", "features.rows (best of 3)",
           "$train (median)", "$train / plain SQL", "plain rows = product rows"], time_rows,
          note="$train: the whole request (token, parse, ledger reservation, the rows, noisy size, training, "
               "answer record, audit), median of every call of that model. Plain SQL: the same rows written by "
               "hand (cohort, consent join, one statement per feature and the label, clipped), no ledger, no "
               "training. features.rows: the product's own row SQL alone.")


def plot(results: list[Result], db_name: str) -> None:
    """`PLOT`: utility against ε per size (median, range as error bars), scikit-learn's as dashed lines
    of the same colour; and the training time beside plain SQL per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, grid = plt.subplots(2, 2, figsize=(12, 8), dpi=100)
    axes = list(grid.flat)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, model in zip(axes, MODELS, strict=False):
        for colour, r in zip(colours, results, strict=False):
            found = [r.dp[model, e] for e in EPSILONS]
            medians = [median(v) if v else math.nan for v in found]
            low = [m - min(v) if v else 0.0 for m, v in zip(medians, found, strict=True)]
            high = [max(v) - m if v else 0.0 for m, v in zip(medians, found, strict=True)]
            ax.errorbar(EPSILONS, medians, yerr=[low, high], marker="o", capsize=3, color=colour,
                        label=f"DP ($train), {r.patients:,} patients")
            ax.axhline(r.baseline[model], linestyle="--", color=colour, alpha=0.8,
                       label=f"scikit-learn, {r.patients:,} patients")
        ax.set_xscale("log")
        ax.set_xticks(EPSILONS, [f"{e:g}" for e in EPSILONS])
        ax.set_xlabel("ε of one $train call (log scale)")
        if model in CLASSIFIERS:
            ax.set_ylabel("AUC on held-out patients (higher is better)")
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
            ax.set_title(f"{model}: type 2 diabetes within {HORIZON_YEARS} years")
        else:
            ax.set_ylabel("RMSE of HbA1c in % (lower is better)")
            ax.set_title(f"{model}: latest HbA1c within {HORIZON_YEARS} years")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[3]
    sizes = [r.patients for r in results]
    for colour, model in zip(colours, MODELS, strict=False):
        ax.plot(sizes, [median(r.train_ms[model]) for r in results], marker="o", color=colour,
                label=f"$train {model} (median)")
    ax.plot(sizes, [min(r.plain_ms.values()) for r in results], marker="s", color="black", linestyle="--",
            label="plain SQL read of the same rows")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
    ax.set_xlabel("patients in the database")
    ax.set_ylabel("wall time per request, ms (log scale)")
    ax.set_title("training time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    figure.suptitle(f"Passerelle $train: differentially private models vs scikit-learn (index date {INDEX_DATE}, "
                    f"held-out patients, {db_name})")
    figure.tight_layout()
    figure.savefig(PLOT)
    plt.close(figure)
    progress(f"wrote {PLOT.relative_to(ROOT)}")


def run(ctx: Context) -> None:
    scale = ctx.options.scale
    results = []
    for patients, repeats in zip(scale.train_sizes, scale.train_repeats, strict=True):
        progress(f"model training on {patients:,} patients ({repeats} calls per model and ε)")
        results.append(measure_size(ctx, patients, repeats))
    report(results, ctx.options.db)
    plot(results, ctx.options.db)
