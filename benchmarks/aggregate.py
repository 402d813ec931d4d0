"""Section 6 — `$aggregate`: latency beside plain SQL, budget reservations, DP accuracy.

* Latency of count, histograms (10 age bands; gender) and mean through
  `POST /research/fhir/$aggregate` (in-process test client) over Patients with their
  Observations (small: 10k patients × 10; full: 100k × 10), beside the same aggregate
  written by hand in plain SQL (consent join included, no noise, no ledger, no audit) and
  beside the product's own pre-noise SQL (`service.store.cohort.exact`). Target ≤ 1.3× plain
  SQL. Each timed request uses a slightly different ε, so none is answered from the
  recorded answers (that path is timed separately).
* `policies.budget.reserve` latency with 10 and 10,000 prior spends (target flat, < 2 ms).
* Relative error of a noisy count of 1,000 patients at ε = 0.1, 1, 10 (`policies.dp.Count`).
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from itertools import pairwise
from typing import Any

from sqlalchemy import text

from benchmarks.harness import (
    Guard,
    Instance,
    Watchdog,
    fmt,
    median,
    percentile,
    progress,
    table,
    verdict,
    with_statement_timeout,
)
from benchmarks.research import create_project
from benchmarks.runner import Context

SECTION = "aggregate"
RATIO_TARGET = 1.3
RESERVE_TARGET_MS = 2.0
EDGES = tuple(range(0, 101, 10))
AT = "2026-01-01"
MEAN_BOUNDS = (0.0, 300.0)


# -- the questions -----------------------------------------------------------------------------


def _p(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, list):
        return {"name": name, "part": value}
    if isinstance(value, float):
        return {"name": name, "valueDecimal": value}
    return {"name": name, "valueString": value}


def questions(count_code: str, mean_code: str, epsilon: float) -> dict[str, dict[str, Any]]:
    cohort = f"Observation?code={count_code}"
    return {
        "count": {"resourceType": "Parameters", "parameter": [
            {"name": "measure", "valueCode": "count"}, _p("epsilon", epsilon), _p("cohort", cohort)]},
        "histogram (10 age bands)": {"resourceType": "Parameters", "parameter": [
            {"name": "measure", "valueCode": "histogram"}, _p("epsilon", epsilon), _p("cohort", cohort),
            _p("groupBy", [{"name": "by", "valueCode": "age-band"},
                           _p("edges", ",".join(str(e) for e in EDGES)), {"name": "at", "valueDate": AT}])]},
        "histogram (gender)": {"resourceType": "Parameters", "parameter": [
            {"name": "measure", "valueCode": "histogram"}, _p("epsilon", epsilon), _p("cohort", cohort),
            _p("groupBy", [{"name": "by", "valueCode": "gender"}])]},
        "mean (latest value per patient)": {"resourceType": "Parameters", "parameter": [
            {"name": "measure", "valueCode": "mean"}, _p("epsilon", epsilon),
            _p("value", [_p("expression", f"Observation?code={mean_code}"), {"name": "reduce", "valueCode": "latest"},
                         _p("lower", MEAN_BOUNDS[0]), _p("upper", MEAN_BOUNDS[1])])]},
    }


# -- the same aggregates in plain SQL ----------------------------------------------------------
# What an analyst with direct database access would write: driven from the code index,
# joined to the consent decisions, no noise, no ledger. The decision must release both the
# Observation and the patient's own Patient row, as the product's does: tier, validity at
# the instant asked, sensitive categories, excluded resource classes, and (for the
# Observation) the data period; so both compute the same exact answer under the same rules.
# `param || ''` keeps SQLite, which has no statistics unless ANALYZEd, from looking rows up
# by resource through the (param, value, …) index: the baseline is a good query, not a naive one.
# PostgreSQL plans from its statistics, which know nothing of such an expression: `hinted`
# leaves the hint out there, as the product's own SQL does (service/store/hints.py).


def hinted(sql: str, conn: Any) -> Any:
    """`sql` as text for `conn`'s database: with its `|| ''` hints on SQLite, without them elsewhere."""
    return text(sql if conn.dialect.name == "sqlite" else sql.replace(" || ''", ""))


def releases(d: str, row: str) -> str:
    """Decision `d` releases `row` (a Patient row, or one with `in_period`)."""
    return f"""{d}.project_id = :project AND {d}.tier >= 1
      AND ({d}.valid_from IS NULL OR {d}.valid_from <= :now) AND ({d}.valid_until IS NULL OR {d}.valid_until >= :now)
      AND ({row}.sensitive_mask & {d}.excluded_mask) = 0
      AND NOT EXISTS (SELECT 1 FROM decision_classes c WHERE c.patient_id = {d}.patient_id
                      AND c.project_id = :project AND c.resource_type = {row}.type)"""


def in_period(d: str, row: str) -> str:
    return f"""(({d}.period_start IS NULL AND {d}.period_end IS NULL)
           OR ({row}.clinical_low IS NOT NULL AND ({d}.period_start IS NULL OR {row}.clinical_low >= {d}.period_start)
               AND ({d}.period_end IS NULL OR {row}.clinical_high <= {d}.period_end)))"""


_COHORT = f"""
    SELECT DISTINCT o.patient_id AS pid
    FROM idx_token t
    JOIN resources o ON o.pk = t.resource_pk
    JOIN decisions d ON d.patient_id = o.patient_id AND {releases("d", "o")} AND {in_period("d", "o")}
    WHERE t.param = 'code' AND t.system = :system AND t.code = :code
      AND o.type = 'Observation' AND o.deleted = :f"""
_MEMBERS = f"""
    FROM ({_COHORT}) cohort
    JOIN resources p ON p.type = 'Patient' AND p.id = cohort.pid AND p.deleted = :f
    JOIN decisions pd ON pd.patient_id = p.id AND {releases("pd", "p")}"""

COUNT_SQL = f"SELECT count(*) {_MEMBERS}"


def _histogram_sql() -> tuple[str, dict[str, Any]]:
    from policies.fhirdates import date_range

    at = date.fromisoformat(AT)
    bounds = [date_range(at.replace(year=at.year - edge).isoformat())[1] for edge in EDGES]
    whens = ["WHEN born.low > :b0 THEN NULL"] + [
        f"WHEN born.low > :b{i + 1} THEN '{low}-{high - 1}'" for i, (low, high) in enumerate(pairwise(EDGES))]
    sql = f"""
        SELECT bin, count(*) FROM (
          SELECT CASE {' '.join(whens)} ELSE NULL END AS bin {_MEMBERS}
          JOIN idx_date born ON born.resource_pk = p.pk AND born.param || '' = 'birthdate') banded
        WHERE bin IS NOT NULL GROUP BY bin"""
    return sql, {f"b{i}": bound for i, bound in enumerate(bounds)}


# A patient's gender is the least of their gender codes; a code outside the first three (or none) is 'unknown'.
GENDER_SQL = f"""
    SELECT CASE WHEN gender IN ('male', 'female', 'other') THEN gender ELSE 'unknown' END AS bin, count(*) FROM (
      SELECT min(g.code) AS gender {_MEMBERS}
      LEFT JOIN idx_token g ON g.resource_pk = p.pk AND g.param || '' = 'gender'
      GROUP BY p.id) gendered
    GROUP BY bin"""

MEAN_SQL = f"""
    SELECT count(*), sum(v) FROM (
      SELECT CASE WHEN q.value < :lower THEN :lower WHEN q.value > :upper THEN :upper ELSE q.value END AS v,
             row_number() OVER (PARTITION BY o.patient_id ORDER BY o.clinical_low DESC, o.pk DESC) AS rn
      FROM idx_token t
      JOIN resources o ON o.pk = t.resource_pk
      JOIN idx_quantity q ON q.resource_pk = o.pk AND q.param || '' = 'value-quantity'
      JOIN decisions d ON d.patient_id = o.patient_id AND {releases("d", "o")} AND {in_period("d", "o")}
      JOIN resources p ON p.type = 'Patient' AND p.id = o.patient_id AND p.deleted = :f
        AND (p.sensitive_mask & d.excluded_mask) = 0
        AND NOT EXISTS (SELECT 1 FROM decision_classes pc WHERE pc.patient_id = d.patient_id
                        AND pc.project_id = :project AND pc.resource_type = 'Patient')
      WHERE t.param = 'code' AND t.system = :system AND t.code = :code
        AND o.type = 'Observation' AND o.deleted = :f) ranked
    WHERE rn = 1"""


def plain_sql(conn: Any, measure: str, project_id: str, count_code: str, mean_code: str) -> Any:
    system, code = (mean_code if measure.startswith("mean") else count_code).split("|", 1)
    params = {"project": project_id, "f": False, "system": system, "code": code, "now": time.time_ns() // 1000}
    if measure.startswith("count"):
        return conn.execute(hinted(COUNT_SQL, conn), params).scalar_one()
    if measure == "histogram (gender)":
        return dict(conn.execute(hinted(GENDER_SQL, conn), params).all())
    if measure.startswith("histogram"):
        sql, bounds = _histogram_sql()
        return dict(conn.execute(hinted(sql, conn), {**params, **bounds}).all())
    bounds = {"lower": MEAN_BOUNDS[0], "upper": MEAN_BOUNDS[1]}
    count, total = conn.execute(hinted(MEAN_SQL, conn), {**params, **bounds}).one()
    return (count, round(float(total or 0) / count, 2) if count else None)


def _exact_value(found: Any, measure: str) -> Any:
    if measure.startswith("count"):
        return found.count
    if measure.startswith("histogram"):
        return dict(found.bins)
    return (found.count, round(found.total / found.count, 2) if found.count else None)


def _released(body: dict[str, Any]) -> str:
    values = []
    for item in body.get("parameter", ()):
        if item.get("name") != "result":
            continue
        parts = {p["name"]: p for p in item["part"]}
        value = parts.get("value", {})
        shown = value.get("valueInteger", value.get("valueDecimal"))
        values.append("suppressed" if parts["suppressed"]["valueBoolean"] else
                      (f"{shown:.2f}" if isinstance(shown, float) else str(shown)))
    return ", ".join(values[:10])


AGE_BINS = tuple(f"{a}-{b - 1}" for a, b in pairwise(EDGES))


def _short(value: Any) -> str:
    if isinstance(value, dict) and set(value) <= set(AGE_BINS):
        return ", ".join(str(value.get(label, 0)) for label in AGE_BINS)
    if isinstance(value, dict):  # other bins (gender): each named
        return ", ".join(f"{label} {count:,}" for label, count in sorted(value.items()))
    if isinstance(value, tuple):
        return f"n={value[0]:,}, mean={value[1]}"
    return f"{value:,}" if isinstance(value, int) else str(value)


# -- parts of the section ----------------------------------------------------------------------


@dataclass
class Timing:
    """Milliseconds of each timed call; `timed_out` if a call hit the watchdog."""

    ms: list[float] = field(default_factory=list)
    value: Any = None
    timed_out: bool = False

    def shown(self, limit: float) -> str:
        if self.timed_out and not self.ms:
            return f"> {limit * 1000:,.0f}"
        return fmt(median(self.ms), 1) if self.ms else "—"


def sample(call: Callable[[], Any], repeats: int, watchdog: Watchdog, slow: float = 2.0) -> Timing:
    """A warm-up call (never timed: it pays the app's first-request costs), then `repeats` timed
    ones; a timed call slower than `slow` s ends the series."""
    result = Timing()
    for attempt in range(repeats + 1):
        start = time.perf_counter()
        try:
            with watchdog.limit():
                value = call()
        except Exception:
            if watchdog.fired:
                result.timed_out = True
                return result
            raise
        if watchdog.fired:  # PostgreSQL: the statement was cancelled and the call reported it
            result.timed_out = True
            return result
        elapsed = time.perf_counter() - start
        result.value = value
        if attempt:
            result.ms.append(elapsed * 1000)
            if elapsed > slow:
                break
    return result


def latency(ctx: Context) -> None:
    from consent import engine, projects
    from service import aggregate as product
    from service import db
    from service.release import release_for
    from service.store import cohort

    scale = ctx.options.scale
    source, meta = ctx.datasets.observations(scale.agg_patients, scale.agg_observations)
    codes = meta["codes"]
    count_code = max(codes, key=lambda c: codes[c]["patients"])
    mean_code = max(codes, key=lambda c: (codes[c]["quantities"], codes[c]["patients"]))
    database = with_statement_timeout(ctx.datasets.checkout(source, "aggregate"), scale.agg_timeout)
    instance = Instance(database, ctx.workdir / "aggregate")
    rows = []
    try:
        project_id = create_project(instance, "aggregate", "benchmark aggregate project", epsilon=1e6,
                                    epsilon_cap=10.0)
        start = time.perf_counter()
        refreshed = instance.app.test_cli_runner().invoke(args=["settings", "set", "consent-default", "aggregate"])
        if refreshed.exit_code != 0:
            raise RuntimeError(f"settings set consent-default failed: {refreshed.output[-300:]}")
        refresh_seconds = time.perf_counter() - start
        progress(f"`settings set consent-default aggregate` (refreshes every decision): {refresh_seconds:.1f} s")
        watchdog = Watchdog(instance.engine, scale.agg_timeout)
        client = instance.app.test_client()
        credentials = instance.register("research", project_id)
        with instance.app.app_context(), db.read(instance.engine) as conn:
            project = projects.get(conn, project_id)
        asked = [0]
        bearer = instance.bearer(credentials)

        def ask(measure: str, epsilon: float | None = None) -> str:
            if epsilon is None:  # a new ε each time: never answered from the recorded answers
                asked[0] += 1
                epsilon = round(0.5 + asked[0] * 0.001, 6)
            response = client.post("/research/fhir/$aggregate", json=questions(count_code, mean_code, epsilon)[measure],
                                   headers={"Authorization": bearer(),
                                            "Content-Type": "application/fhir+json"})
            if response.status_code != 200:
                raise RuntimeError(f"$aggregate answered {response.status_code}: {response.get_data()[:300]!r}")
            return _released(response.get_json())

        def plain(measure: str) -> Any:
            with instance.engine.connect() as conn:
                return plain_sql(conn, measure, project_id, count_code, mean_code)

        def exact(measure: str) -> Any:
            query = product.parse(questions(count_code, mean_code, 1.0)[measure], project,
                                  instance.app.config["MIN_EPSILON"])
            with instance.app.app_context():
                consented = release_for("benchmark", project_id, engine.AGGREGATE).aggregate_filter(
                    db.now_us(), query.question.types)
                with db.read(instance.engine) as conn:
                    return _exact_value(cohort.exact(conn, query.question, consented), measure)

        for measure in questions(count_code, mean_code, 1.0):
            progress(f"{measure}: plain SQL, $aggregate, exact() (≤ {scale.agg_repeats} timed calls each, "
                     f"interrupted after {scale.agg_timeout:.0f} s)")
            baseline = sample(lambda m=measure: plain(m), scale.agg_repeats, watchdog)
            endpoint = sample(lambda m=measure: ask(m), scale.agg_repeats, watchdog)
            inner = sample(lambda m=measure: exact(m), scale.agg_repeats, watchdog)
            if None not in (baseline.value, inner.value) and baseline.value != inner.value:
                raise RuntimeError(f"{measure}: the plain SQL ({_short(baseline.value)}) and the product's exact "
                                   f"answer ({_short(inner.value)}) differ, so their times cannot be compared")
            ratio = (median(endpoint.ms) / median(baseline.ms)) if endpoint.ms and baseline.ms else None
            rows.append([measure, baseline.shown(scale.agg_timeout), inner.shown(scale.agg_timeout),
                         endpoint.shown(scale.agg_timeout), fmt(ratio, 2), f"≤ {RATIO_TARGET}",
                         _short(baseline.value), _short(inner.value), endpoint.value or "—"])
            shown = (f"{ratio:.2f}× ({median(endpoint.ms):,.0f} vs {median(baseline.ms):,.0f} ms)" if ratio else
                     f"$aggregate {endpoint.shown(scale.agg_timeout)} ms, plain {baseline.shown(scale.agg_timeout)} ms")
            verdict(SECTION, f"$aggregate {measure} / plain SQL", shown, f"≤ {RATIO_TARGET}×",
                    ratio is not None and ratio <= RATIO_TARGET,
                    Guard(float("inf") if ratio is None else ratio, RATIO_TARGET))
        last = list(questions(count_code, mean_code, 1.0))[-1]
        ask(last, 7.0)
        again = sample(lambda: ask(last, 7.0), 5, watchdog)
        rows.append(["(the same question again: recorded answer)", "", "", again.shown(scale.agg_timeout), "", "",
                     "", "", again.value or "—"])
    finally:
        instance.close()
        if rows:
            obs = meta["counts"].get("Observation", 0)
            table(f"6. $aggregate latency (median, ms) — {meta['patients']:,} patients, {obs:,} Observations "
                  f"({ctx.options.db})",
                  ["question", "plain SQL", "exact()", "$aggregate", "ratio", "target", "plain SQL value",
                   "exact() value", "released (noisy)"], rows,
                  note=f"cohort: patients with an Observation {count_code}; mean: latest {mean_code} per patient, "
                       f"clipped to {MEAN_BOUNDS}.\nratio = $aggregate / plain SQL; exact() is the product's pre-noise "
                       "SQL alone; $aggregate is the whole request (token check, parse, ledger, SQL, noise, answer "
                       f"record, audit).\nA call slower than 2 s is timed once; '> N' = interrupted after "
                       f"{scale.agg_timeout:.0f} s. Decisions for the project were materialised in "
                       f"{refresh_seconds:.1f} s (`settings set consent-default aggregate`).")


def reservations(ctx: Context) -> None:
    from policies import budget
    from service import db

    instance = Instance(ctx.backend.new("budget"), ctx.workdir / "budget")
    project_id = "bench-budget"
    rows = []
    try:
        engine = instance.engine
        with instance.app.app_context(), db.write(engine) as conn:
            budget.ensure_budget(conn, project_id, 1e6)
        spends = 0

        def add(n: int) -> None:
            nonlocal spends
            while n > 0:
                batch = min(n, 1000)
                with instance.app.app_context(), db.write(engine) as conn:
                    for i in range(batch):
                        budget.reserve(conn, project_id, 0.001, query_hash=_hash(f"fill {spends + i}"),
                                       actor="benchmark")
                spends += batch
                n -= batch

        for prior in (10, 10_000):
            add(prior - spends)
            reserve_ms, transaction_ms = [], []
            for i in range(200):
                start = time.perf_counter()
                with instance.app.app_context(), db.write(engine) as conn:
                    inner = time.perf_counter()
                    budget.reserve(conn, project_id, 0.001, query_hash=_hash(f"timed {prior} {i}"),
                                   actor="benchmark")
                    reserve_ms.append((time.perf_counter() - inner) * 1000)
                transaction_ms.append((time.perf_counter() - start) * 1000)
            spends += 200
            rows.append([f"{prior:,}", fmt(median(reserve_ms), 3), fmt(percentile(reserve_ms, 0.95), 3),
                         fmt(median(transaction_ms), 3), fmt(percentile(transaction_ms, 0.95), 3),
                         f"< {RESERVE_TARGET_MS} ms"])
    finally:
        instance.close()
    table(f"6b. policies.budget.reserve latency, 200 reservations each ({ctx.options.db})",
          ["prior spends", "reserve p50 ms", "reserve p95 ms", "transaction p50 ms", "transaction p95 ms", "target"],
          rows, note="transaction = BEGIN (IMMEDIATE on SQLite) + reserve + COMMIT, as $aggregate runs it.")
    first, last = float(rows[0][3].replace(",", "")), float(rows[1][3].replace(",", ""))
    verdict(SECTION, "budget reserve (transaction p50) at 10 → 10,000 spends", f"{first:.2f} → {last:.2f} ms",
            f"flat, < {RESERVE_TARGET_MS} ms",
            max(first, last) < RESERVE_TARGET_MS and last <= max(first * 1.5, first + 0.2))


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def accuracy(ctx: Context) -> None:
    from policies import dp

    draws = ctx.options.scale.accuracy_draws
    true_count = 1_000
    rows = []
    for epsilon in (0.1, 1.0, 10.0):
        errors, covered, half = [], 0, 0.0
        for _ in range(draws):
            released = dp.Count(epsilon).release(true_count)
            errors.append(abs(released.value - true_count) / true_count)
            low, high = released.interval
            covered += low <= true_count <= high
            half = (high - low) / 2
        rows.append([f"{epsilon:g}", f"{sum(errors) / len(errors):.3%}", f"{percentile(errors, 0.95):.3%}",
                     f"{max(errors):.3%}", f"±{half:,.0f}", f"{covered / draws:.1%}"])
    table(f"6c. Accuracy of a noisy count of {true_count:,} patients (policies.dp.Count, {draws:,} draws each)",
          ["epsilon", "mean |relative error|", "p95", "max", "95% interval", "interval coverage"], rows)


def run(ctx: Context) -> None:
    failures = []
    for part in (latency, reservations, accuracy):
        try:
            part(ctx)
        except Exception as exc:  # one part failing leaves the others standing
            print(f"\n!! {part.__name__} failed: {type(exc).__name__}: {exc}")
            failures.append(part.__name__)
    if failures:
        raise RuntimeError(f"failed parts: {', '.join(failures)}")
