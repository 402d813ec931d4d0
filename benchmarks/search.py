"""Section 2 — read and search through gunicorn (2 workers) at two database sizes.

Requests/s for `GET /fhir/Patient/{id}` and three 20-entry searches, on a small and a
large database (small scale: 10k and 100k stored resources; full: 10k and 1M), and the
search latency ratio large/small (target ≤ 1.5: indexes, not scans).

Throughput runs use 8 concurrent keep-alive clients (2 workers × 4 threads); latency is
the median of sequential requests, which the client's own load does not distort. The
server CPU per request (from /proc, gunicorn workers only) is the capacity figure that
other load on the machine does not skew.
"""
from __future__ import annotations

from random import Random
from typing import Any

from sqlalchemy import event, false, func, select

from benchmarks.datasets import sample_rows
from benchmarks.harness import (
    Database,
    Guard,
    Gunicorn,
    Instance,
    LoadResult,
    Request,
    Scale,
    entries_of,
    fmt,
    http_load,
    http_token,
    path_with,
    progress,
    table,
    verdict,
)
from benchmarks.runner import Context

SECTION = "search"
RATIO_TARGET = 1.5
CONCURRENCY = 8
KINDS = ("read Patient/{id}", "Observation?code=…&_count=20", "Observation?patient=…&_count=20",
         "Patient?family=…&_count=20")


def samples(database: Database, seed: int = 0, n: int = 200) -> dict[str, list[str]]:
    """Values that exist in this database: patient ids, family names and the commonest Observation codes."""
    from service.store.schema import idx_string, idx_token, resources

    rng = Random(seed)
    patients = [r.id for r in sample_rows(database, select(resources.c.id).where(
        resources.c.type == "Patient", resources.c.deleted == false()).order_by(resources.c.pk), 100_000)]
    families = sorted({r.exact for r in sample_rows(database, select(idx_string.c.exact).where(
        idx_string.c.param == "family").order_by(idx_string.c.resource_pk), 20_000)})
    observation_pks = select(resources.c.pk).where(resources.c.type == "Observation").order_by(resources.c.pk)
    codes = sample_rows(database, select(idx_token.c.system, idx_token.c.code, func.count().label("n")).where(
        idx_token.c.param == "code", idx_token.c.resource_pk.in_(observation_pks.limit(20_000).scalar_subquery()))
        .group_by(idx_token.c.system, idx_token.c.code).order_by(func.count().desc()), 5)
    return {"patients": rng.sample(patients, min(n, len(patients))),
            "families": rng.sample(families, min(n, len(families))),
            "codes": [f"{c.system}|{c.code}" for c in codes]}


def paths(kind: str, values: dict[str, list[str]], count: int, prefix: str = "/fhir",
          patient_ref: dict[str, str] | None = None) -> list[str]:
    """`count` request paths of one kind, cycling through the sampled values."""
    out = []
    for i in range(count):
        patient = values["patients"][i % len(values["patients"])]
        if kind.startswith("read"):
            out.append(f"{prefix}/Patient/{(patient_ref or {}).get(patient, patient)}")
        elif "code=" in kind:
            out.append(path_with(f"{prefix}/Observation", [("code", values["codes"][i % len(values["codes"])]),
                                                           ("_count", "20")]))
        elif "patient=" in kind:
            ref = (patient_ref or {}).get(patient, patient)
            out.append(path_with(f"{prefix}/Observation", [("patient", f"Patient/{ref}"), ("_count", "20")]))
        else:
            family = values["families"][i % len(values["families"])]
            out.append(path_with(f"{prefix}/Patient", [("family", family), ("_count", "20")]))
    return out


def run_kind(server: Gunicorn, token: str, urls_for: Any, scale: Scale) -> tuple[LoadResult, LoadResult]:
    """Warm up, then a concurrent throughput run and a sequential latency run (each bounded in time too)."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    http_load(server.port, [Request("GET", p) for p in urls_for(40)], 4, headers, max_seconds=2)
    throughput = http_load(server.port, [Request("GET", p) for p in urls_for(scale.http_requests)], CONCURRENCY,
                           headers, server=server, max_seconds=scale.http_seconds)
    latency = http_load(server.port, [Request("GET", p) for p in urls_for(scale.latency_requests)], 1, headers,
                        keep_bodies=30, server=server, max_seconds=scale.latency_seconds)
    return throughput, latency


def plan(instance: Instance, path: str, token: str) -> list[str]:
    """The query plan of the statement a request runs (captured from the engine, then EXPLAINed)."""
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        captured.append((statement, parameters))

    engine = instance.engine
    event.listen(engine, "before_cursor_execute", capture)
    try:
        instance.app.test_client().get(path, headers={"Authorization": f"Bearer {token}"})
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    searches = [c for c in captured if "resources" in c[0].split(" FROM ", 1)[-1] and "LIMIT" in c[0].upper()]
    if not searches:
        return ["(no search statement captured)"]
    statement, parameters = searches[-1]
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        cursor = raw.cursor()
        if engine.dialect.name == "sqlite":
            cursor.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
            return [f"{'  ' * 0}{row[3]}" for row in cursor.fetchall()]
        cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {statement}", parameters)
        return [row[0] for row in cursor.fetchall()]


def measure_database(ctx: Context, database: Database, label: str) -> dict[str, tuple[LoadResult, LoadResult]]:
    scale = ctx.options.scale
    progress(f"{label}: sampling ids, family names and codes")
    values = samples(database)
    instance = Instance(database, ctx.workdir / f"search-{label}")
    results: dict[str, tuple[LoadResult, LoadResult]] = {}
    try:
        credentials = instance.register("custodian")
        if ctx.options.plans:
            token = instance.token(credentials)
            for kind in KINDS[1:]:
                lines = plan(instance, paths(kind, values, 1)[0], token)
                print(f"\n  plan on the {label} database, {kind}:")
                for line in lines:
                    print(f"    {line}")
        with Gunicorn.of(instance) as server:
            for kind in KINDS:
                progress(f"{label}: {kind}: up to {scale.http_requests:,} requests or {scale.http_seconds:.0f} s "
                         f"from {CONCURRENCY} clients, then up to {scale.latency_requests} sequential")
                token = http_token(server.port, credentials)
                results[kind] = run_kind(server, token, lambda n, k=kind: paths(k, values, n), scale)
    finally:
        instance.close()
    return results


def result_rows(results: dict[str, tuple[LoadResult, LoadResult]]) -> list[list[Any]]:
    rows = []
    for kind, (throughput, latency) in results.items():
        errors = throughput.errors + latency.errors
        rows.append([kind, fmt(throughput.rps, 0), fmt(throughput.p(0.5), 1), fmt(throughput.p(0.95), 1),
                     fmt(throughput.server_ms, 2), fmt(latency.p(0.5), 1), fmt(entries_of(latency.bodies), 1),
                     f"{errors} e.g. {(throughput.sample_error or latency.sample_error)[:80]}" if errors else "0"])
    return rows


HEADERS = ["request", "req/s", "p50 ms", "p95 ms", "server CPU ms/req", "sequential p50 ms", "entries", "errors"]


def dataset_row(label: str, meta: dict[str, Any]) -> list[Any]:
    cpu = f", {meta['ingest_cpu_rate']:,.0f} per CPU-s" if meta.get("ingest_cpu_rate") else ""
    built = (f"built now: {meta['ingest_rate']:,.0f} resources/s{cpu} ({meta['procs']} `flask ingest` processes, "
             f"{meta['ingest_seconds']:.0f} s; generation {meta['generate_seconds']:.0f} s)" if meta.get("fresh") else
             f"cached (built {meta['built']} at {meta['ingest_rate']:,.0f}/s{cpu} with {meta['procs']} processes)")
    return [label, meta["resources"], meta["patients"], built]


def run(ctx: Context) -> None:
    scale = ctx.options.scale
    measured: dict[str, dict[str, tuple[LoadResult, LoadResult]]] = {}
    metas = {}
    for label, size in zip(("small", "large"), scale.search_sizes, strict=True):
        database, meta = ctx.datasets.population(size)
        metas[label] = meta
        measured[label] = measure_database(ctx, database, label)
        table(f"2. Read/search through gunicorn (2 workers × 4 threads), {label} database: {meta['resources']:,} "
              f"resources ({ctx.options.db})", HEADERS, result_rows(measured[label]),
              note=f"req/s and p50/p95 from {CONCURRENCY} concurrent clients (up to {scale.http_requests:,} "
                   f"requests or {scale.http_seconds:.0f} s per row); sequential p50 from up to "
                   f"{scale.latency_requests} one-at-a-time requests ({scale.latency_seconds:.0f} s).")
    table("2a. Datasets (generated with write_ndjson, loaded with `flask --app wsgi ingest`)",
          ["database", "resources", "patients", "load"],
          [dataset_row(label, metas[label]) for label in ("small", "large")])
    rows = []
    small_n, large_n = metas["small"]["resources"], metas["large"]["resources"]
    for kind in KINDS:
        small, large = measured["small"][kind], measured["large"][kind]
        ratio = large[1].p(0.5) / small[1].p(0.5)
        cpu_ratio = (large[0].server_ms / small[0].server_ms) if large[0].server_ms and small[0].server_ms else None
        rows.append([kind, fmt(small[1].p(0.5), 2), fmt(large[1].p(0.5), 2), fmt(ratio, 2),
                     fmt(cpu_ratio, 2), fmt(small[0].rps, 0), fmt(large[0].rps, 0), f"≤ {RATIO_TARGET}"])
        if "?" in kind:
            # The server CPU ratio is the guarded figure: other load on the machine, which can differ between
            # the two databases' runs, does not skew it. The latency ratio is guarded only without it.
            verdict(SECTION, f"latency ratio {large_n:,}/{small_n:,}: {kind}", f"{ratio:.2f}×", f"≤ {RATIO_TARGET}×",
                    ratio <= RATIO_TARGET, None if cpu_ratio else Guard(ratio, RATIO_TARGET))
            if cpu_ratio:
                verdict(SECTION, f"server CPU ratio {large_n:,}/{small_n:,}: {kind}", f"{cpu_ratio:.2f}×",
                        f"≤ {RATIO_TARGET}×", cpu_ratio <= RATIO_TARGET, Guard(cpu_ratio, RATIO_TARGET))
    table(f"2b. Latency ratio, large ({large_n:,}) / small ({small_n:,})",
          ["request", "small p50 ms", "large p50 ms", "ratio", "server CPU ratio", "small req/s", "large req/s",
           "target"], rows, note="ratio = sequential median latency large/small; server CPU ratio = CPU ms per "
                                 "request large/small (throughput runs).")
    for kind in KINDS:
        verdict(SECTION, f"req/s at {large_n:,}: {kind}", f"{measured['large'][kind][0].rps:,.0f}/s", "(reported)",
                None)
