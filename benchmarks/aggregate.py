"""Section 6 — `$aggregate`: latency beside plain SQL, budget reservations, DP accuracy.

* Latency of count, histogram (10 age bands) and mean through
  `POST /research/fhir/$aggregate` (in-process test client) over Patients with their
  Observations (small: 10k patients × 10; full: 100k × 10), beside the same aggregate
  written by hand in plain SQL (consent join included, no noise, no ledger, no audit) and
  beside the product's own pre-noise SQL (`service.aggregate.exact`). Target ≤ 1.3× plain
  SQL. Each timed request uses a slightly different ε, so none is answered from the
  recorded answers (that path is timed separately).
* `policies.budget.reserve` latency with 10 and 10,000 prior spends (target flat, < 2 ms).
* Relative error of a noisy count of 1,000 patients at ε = 0.1, 1, 10 (`policies.dp.Count`).
"""
from __future__ import annotations

import time
from datetime import date
from itertools import pairwise
from typing import Any

from sqlalchemy import text

from benchmarks.harness import Instance, fmt, median, percentile, progress, table, verdict
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
        "mean (latest value per patient)": {"resourceType": "Parameters", "parameter": [
            {"name": "measure", "valueCode": "mean"}, _p("epsilon", epsilon),
            _p("value", [_p("expression", f"Observation?code={mean_code}"), {"name": "reduce", "valueCode": "latest"},
                         _p("lower", MEAN_BOUNDS[0]), _p("upper", MEAN_BOUNDS[1])])]},
    }


# -- the same aggregates in plain SQL ----------------------------------------------------------

_CONSENTED_PATIENTS = """
    FROM resources p
    JOIN decisions d ON d.patient_id = p.id AND d.project_id = :project AND d.tier >= 1
    WHERE p.type = 'Patient' AND p.deleted = :f
      AND EXISTS (SELECT 1 FROM resources o JOIN idx_token t ON t.resource_pk = o.pk
                  WHERE o.patient_id = p.id AND o.type = 'Observation' AND o.deleted = :f
                    AND (o.sensitive_mask & d.excluded_mask) = 0
                    AND t.param = 'code' AND t.system = :system AND t.code = :code)"""

COUNT_SQL = f"SELECT count(*) {_CONSENTED_PATIENTS}"


def _histogram_sql() -> tuple[str, dict[str, Any]]:
    from service.store.fhirdates import date_range

    at = date.fromisoformat(AT)
    bounds = [date_range(at.replace(year=at.year - edge).isoformat())[1] for edge in EDGES]
    whens = ["WHEN b > :b0 THEN NULL"] + [f"WHEN b > :b{i + 1} THEN '{EDGES[i]}-{EDGES[i + 1] - 1}'"
                                          for i in range(len(EDGES) - 1)]
    sql = f"""
        SELECT bin, count(*) FROM (
          SELECT CASE {' '.join(whens)} ELSE NULL END AS bin FROM (
            SELECT (SELECT min(dt.low) FROM idx_date dt WHERE dt.resource_pk = p.pk AND dt.param = 'birthdate') AS b
            {_CONSENTED_PATIENTS}) born) banded
        WHERE bin IS NOT NULL GROUP BY bin"""
    return sql, {f"b{i}": bound for i, bound in enumerate(bounds)}


MEAN_SQL = """
    SELECT count(*), sum(CASE WHEN v < :lower THEN :lower WHEN v > :upper THEN :upper ELSE v END) FROM (
      SELECT q.value AS v, row_number() OVER (PARTITION BY o.patient_id
                                              ORDER BY o.clinical_low DESC, o.pk DESC) AS rn
      FROM resources o
      JOIN idx_quantity q ON q.resource_pk = o.pk AND q.param = 'value-quantity'
      JOIN decisions d ON d.patient_id = o.patient_id AND d.project_id = :project AND d.tier >= 1
                      AND (o.sensitive_mask & d.excluded_mask) = 0
      WHERE o.type = 'Observation' AND o.deleted = :f
        AND EXISTS (SELECT 1 FROM idx_token t WHERE t.resource_pk = o.pk AND t.param = 'code'
                    AND t.system = :msystem AND t.code = :mcode)) ranked
    WHERE rn = 1"""


def plain_sql(conn: Any, measure: str, project_id: str, count_code: str, mean_code: str) -> Any:
    system, code = count_code.split("|", 1)
    msystem, mcode = mean_code.split("|", 1)
    params = {"project": project_id, "f": False, "system": system, "code": code}
    if measure.startswith("count"):
        return conn.execute(text(COUNT_SQL), params).scalar_one()
    if measure.startswith("histogram"):
        sql, bounds = _histogram_sql()
        return dict(conn.execute(text(sql), {**params, **bounds}).all())
    count, total = conn.execute(text(MEAN_SQL), {"project": project_id, "f": False, "msystem": msystem,
                                                 "mcode": mcode, "lower": MEAN_BOUNDS[0],
                                                 "upper": MEAN_BOUNDS[1]}).one()
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


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(str(value.get(f"{a}-{b - 1}", 0)) for a, b in pairwise(EDGES))
    if isinstance(value, tuple):
        return f"n={value[0]:,}, mean={value[1]}"
    return f"{value:,}" if isinstance(value, int) else str(value)


# -- parts of the section ----------------------------------------------------------------------


def latency(ctx: Context) -> None:
    from consent import projects
    from service import aggregate as product
    from service import db

    scale = ctx.options.scale
    source, meta = ctx.datasets.observations(scale.agg_patients, scale.agg_observations)
    codes = meta["codes"]
    count_code = max(codes, key=lambda c: codes[c]["patients"])
    mean_code = max(codes, key=lambda c: (codes[c]["quantities"], codes[c]["patients"]))
    database = ctx.datasets.checkout(source, "aggregate")
    instance = Instance(database, ctx.workdir / "aggregate", CONSENT_DEFAULT="aggregate")
    try:
        project_id = create_project(instance, "aggregate", "benchmark aggregate project", epsilon=1e6,
                                    epsilon_cap=10.0)
        start = time.perf_counter()
        refreshed = instance.app.test_cli_runner().invoke(args=["consent", "refresh"])
        if refreshed.exit_code != 0:
            raise RuntimeError(f"consent refresh failed: {refreshed.output[-300:]}")
        progress(f"`consent refresh` (default regime aggregate): {time.perf_counter() - start:.1f} s")
        client = instance.app.test_client()
        credentials = instance.register("research", project_id)
        with instance.app.app_context(), db.read(instance.engine) as conn:
            project = projects.get(conn, project_id)
        rows = []
        tried = 0
        for measure in questions(count_code, mean_code, 1.0):
            progress(f"{measure}: {scale.agg_repeats} × plain SQL, exact() and $aggregate")
            plain_ms, exact_ms, api_ms = [], [], []
            truth = found = released = None
            for repeat in range(scale.agg_repeats + 1):  # the first round warms the caches, untimed
                with instance.engine.connect() as conn:
                    start = time.perf_counter()
                    truth = plain_sql(conn, measure, project_id, count_code, mean_code)
                    elapsed = time.perf_counter() - start
                if repeat:
                    plain_ms.append(elapsed * 1000)
                query = product.parse(questions(count_code, mean_code, 1.0)[measure], project)
                with instance.app.app_context(), db.read(instance.engine) as conn:
                    start = time.perf_counter()
                    found = product.exact(conn, query, project_id)
                    elapsed = time.perf_counter() - start
                if repeat:
                    exact_ms.append(elapsed * 1000)
                tried += 1
                body = questions(count_code, mean_code, round(0.5 + tried * 0.001, 6))[measure]
                token = instance.token(credentials)
                start = time.perf_counter()
                response = client.post("/research/fhir/$aggregate", json=body,
                                       headers={"Authorization": f"Bearer {token}",
                                                "Content-Type": "application/fhir+json"})
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    raise RuntimeError(f"$aggregate answered {response.status_code}: {response.get_data()[:300]!r}")
                released = _released(response.get_json())
                if repeat:
                    api_ms.append(elapsed * 1000)
            ratio = median(api_ms) / median(plain_ms)
            rows.append([measure, fmt(median(plain_ms), 1), fmt(median(exact_ms), 1), fmt(median(api_ms), 1),
                         fmt(ratio, 2), f"≤ {RATIO_TARGET}", _short(truth), _short(_exact_value(found, measure)),
                         released])
            verdict(SECTION, f"$aggregate {measure} / plain SQL", f"{ratio:.2f}× ({median(api_ms):,.0f} vs "
                    f"{median(plain_ms):,.0f} ms)", f"≤ {RATIO_TARGET}×", ratio <= RATIO_TARGET)
        token = instance.token(credentials)
        again = []
        for _ in range(5):
            start = time.perf_counter()
            response = client.post("/research/fhir/$aggregate", json=body, headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"})
            again.append((time.perf_counter() - start) * 1000)
        rows.append(["(the last question again: recorded answer)", "", "", fmt(median(again), 1), "", "", "", "",
                     _released(response.get_json()) if response.status_code == 200 else str(response.status_code)])
    finally:
        instance.close()
    obs = meta["counts"].get("Observation", 0)
    table(f"6. $aggregate latency (median of {scale.agg_repeats}, ms) — {meta['patients']:,} patients, {obs:,} "
          f"Observations ({ctx.options.db})",
          ["question", "plain SQL", "exact()", "$aggregate", "ratio", "target", "plain SQL value", "exact() value",
           "released (noisy)"], rows,
          note=f"cohort: patients with an Observation {count_code}; mean: latest {mean_code} per patient clipped to "
               f"{MEAN_BOUNDS}.\nratio = $aggregate / plain SQL. exact() is the product's pre-noise SQL alone. "
               "$aggregate is the whole request: token check, parse, ledger, SQL, noise, answer record, audit.")


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
                        budget.reserve(conn, project_id, 0.001, query_hash=f"{spends + i:064x}", actor="benchmark")
                spends += batch
                n -= batch

        for prior in (10, 10_000):
            add(prior - spends)
            reserve_ms, transaction_ms = [], []
            for i in range(200):
                start = time.perf_counter()
                with instance.app.app_context(), db.write(engine) as conn:
                    inner = time.perf_counter()
                    budget.reserve(conn, project_id, 0.001, query_hash=f"timed{prior}{i:059x}", actor="benchmark")
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
            f"flat, < {RESERVE_TARGET_MS} ms", last < RESERVE_TARGET_MS and last <= max(first * 1.5, first + 0.2))


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
