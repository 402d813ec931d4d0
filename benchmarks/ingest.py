"""Section 1 — ingest: transaction Bundles through the API and NDJSON through the CLI.

Target ≥ 1,500 resources/s (anchors: Aidbox 2,678/s and HAPI 2,214/s on 8 vCPU). The
orjson parse rate of the same NDJSON is printed beside the CLI rate as its floor, and a
per-resource breakdown (parse, R4B validation, index extraction, the rest) shows
where the time goes.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import orjson

from benchmarks.datasets import patients_for
from benchmarks.harness import (
    SEED,
    Guard,
    Gunicorn,
    Instance,
    Request,
    fmt,
    http_load,
    http_token,
    measure,
    progress,
    table,
    verdict,
)
from benchmarks.runner import Context
from service import validation

TARGET = 1_500
SECTION = "ingest"


def _bundles(patients: int) -> tuple[list[bytes], list[bytes], int]:
    from service import synthetic

    organisations = [orjson.dumps(b) for b in synthetic.organisation_bundles(SEED)]
    bundles, entries = [], 0
    for bundle in synthetic.patient_bundles(patients, SEED):
        entries += len(bundle["entry"])
        bundles.append(orjson.dumps(bundle))
    return organisations, bundles, entries


def _created(body: bytes) -> int:
    return sum(1 for e in orjson.loads(body).get("entry", ()) if e["response"]["status"].startswith("201"))


def _api_in_process(ctx: Context, organisations: list[bytes], bundles: list[bytes]
                    ) -> tuple[int, float, float, float]:
    """(resources created, wall and CPU seconds for the patient bundles, seconds for the organisation bundles)."""
    instance = Instance(ctx.backend.new("ingest-api"), ctx.workdir / "ingest-api")
    try:
        credentials = instance.register("custodian")
        client = instance.app.test_client()
        token, issued = instance.token(credentials), time.monotonic()

        def post(body: bytes) -> bytes:
            response = client.post("/fhir", data=body, headers={"Authorization": f"Bearer {token}",
                                                                 "Content-Type": "application/fhir+json"})
            if response.status_code != 200:
                raise RuntimeError(f"transaction answered {response.status_code}: {response.get_data()[:300]!r}")
            return response.get_data()

        # What validation reads loaded first, as each gunicorn worker does when it starts (post_worker_init
        # in deploy/gunicorn.conf.py): a server's steady state, not the first import of each type's model.
        validation.load()
        start = time.perf_counter()
        for body in organisations:
            post(body)
        organisation_seconds = time.perf_counter() - start
        created = 0
        with measure() as used:
            for body in bundles:
                if time.monotonic() - issued > 200:  # tokens live 5 minutes at most
                    token, issued = instance.token(credentials), time.monotonic()
                created += _created(post(body))
        return created, used.wall, used.cpu, organisation_seconds
    finally:
        instance.close()


def _api_http(ctx: Context, organisations: list[bytes], bundles: list[bytes], clients: int
              ) -> tuple[int, float, float | None, str]:
    instance = Instance(ctx.backend.new("ingest-http"), ctx.workdir / "ingest-http")
    try:
        credentials = instance.register("custodian")
        with Gunicorn.of(instance) as server:
            headers = {"Authorization": f"Bearer {http_token(server.port, credentials)}",
                       "Content-Type": "application/fhir+json"}
            first = http_load(server.port, [Request("POST", "/fhir", body) for body in organisations], 1, headers)
            if first.errors:
                raise RuntimeError(first.sample_error)
            result = http_load(server.port, [Request("POST", "/fhir", body) for body in bundles], clients, headers,
                               keep_bodies=len(bundles), server=server)
        created = sum(_created(b) for b in result.bodies if b.startswith(b"{"))
        problem = f"{result.errors} failed requests, e.g. {result.sample_error}" if result.errors else ""
        return created, result.seconds, result.server_cpu, problem
    finally:
        instance.close()


def _cli(ctx: Context, directory: Path) -> tuple[int, float, float]:
    instance = Instance(ctx.backend.new("ingest-cli"), ctx.workdir / "ingest-cli")
    try:
        runner = instance.app.test_cli_runner()
        with measure() as used:
            result = runner.invoke(args=["ingest", str(directory)])
        if result.exit_code != 0:
            raise RuntimeError(f"`ingest` exited {result.exit_code}: {result.output[-500:]}")
        stored = re.search(r"Stored (\d+) resources", result.output)
        return int(stored.group(1)) if stored else 0, used.wall, used.cpu
    finally:
        instance.close()


def _lines(directory: Path) -> list[bytes]:
    lines: list[bytes] = []
    for path in sorted(directory.glob("*.ndjson")):
        lines.extend(line for line in path.read_bytes().splitlines() if line.strip())
    return lines


def _breakdown(lines: list[bytes], limit: int = 5_000) -> dict[str, float]:
    """µs per resource for each CPU step the loader does before writing, on an even sample."""
    from policies.sensitivity import mask_of
    from service.store import indexer
    from service.validation import validate

    sample = lines[:: max(1, len(lines) // limit)][:limit]
    clock = time.process_time
    start = clock()
    parsed = [orjson.loads(line) for line in sample]
    parse = clock() - start
    for resource in parsed[:200]:  # import the models once, outside the timing
        validate(resource)
    start = clock()
    for resource in parsed:
        validate(resource)
    validation = clock() - start
    start = clock()
    for resource in parsed:
        indexer.extract(resource["resourceType"], resource)
        mask_of(resource)
    extraction = clock() - start
    n = len(sample) or 1
    return {"parse": parse / n * 1e6, "validate": validation / n * 1e6, "index": extraction / n * 1e6, "n": n}


def run(ctx: Context) -> None:
    scale = ctx.options.scale
    from service import synthetic

    progress(f"generating transaction Bundles for ~{scale.ingest_bundles:,} resources")
    organisations, bundles, entries = _bundles(patients_for(scale.ingest_bundles))
    rows = []
    progress(f"POSTing {len(bundles):,} patient Bundles ({entries:,} resources) through the test client")
    created, seconds, cpu, org_seconds = _api_in_process(ctx, organisations, bundles)
    api_rate = created / seconds
    rows.append(["transaction Bundles, POST /fhir, in-process test client, 1 client", created, seconds, api_rate,
                 created / cpu])
    http_rate = None
    try:
        if scale.ingest_http:
            progress("POSTing the same Bundles to gunicorn (2 workers) from 2 concurrent clients")
            http_created, http_seconds, server_cpu, problem = _api_http(ctx, organisations, bundles, clients=2)
            http_rate = http_created / http_seconds
            rows.append(["transaction Bundles, POST /fhir, gunicorn 2 workers, 2 clients", http_created,
                         http_seconds, http_rate, http_created / server_cpu if server_cpu else None])
            if problem:
                rows.append([f"  ! {problem[:150]}", "", "", "", ""])
    except Exception as exc:  # the in-process figure stands on its own
        rows.append([f"transaction Bundles over HTTP: failed ({exc})"[:160], "", "", "", ""])

    directory = ctx.workdir / "ingest-ndjson"
    progress(f"writing NDJSON for ~{scale.ingest_ndjson:,} resources (write_ndjson)")
    counts = synthetic.write_ndjson(directory, patients_for(scale.ingest_ndjson), SEED)
    total = sum(counts.values())
    progress(f"loading {total:,} resources with the CLI `ingest` command")
    stored, cli_seconds, cli_cpu = _cli(ctx, directory)
    cli_rate = stored / cli_seconds
    rows.append(["NDJSON, CLI `ingest` (test_cli_runner), 1 process", stored, cli_seconds, cli_rate,
                 stored / cli_cpu])
    lines = _lines(directory)
    with measure() as parsing:
        for line in lines:
            orjson.loads(line)
    floor = len(lines) / parsing.wall
    rows.append(["NDJSON, orjson.loads only (floor)", len(lines), parsing.wall, floor, len(lines) / parsing.cpu])
    cpu_note = ("resources per CPU-second counts this process only (SQLite runs inside it); the database server's "
                "CPU is not included" if ctx.options.db == "postgresql" else
                "resources per CPU-second counts the CPU of the process doing the work (SQLite runs inside it)")
    table(f"1. Ingest — resources/s ({ctx.options.db}; organisation Bundles took {org_seconds:.2f} s, not counted)",
          ["path", "resources", "seconds", "resources/s", "per CPU-s", "target"],
          [[r[0], r[1], fmt(r[2], 2) if isinstance(r[2], float) else r[2],
            fmt(r[3]) if isinstance(r[3], float) else r[3], fmt(r[4]) if isinstance(r[4], float) else r[4] or "",
            f"≥ {TARGET:,}" if isinstance(r[3], float) and r[0].startswith(("transaction", "NDJSON, CLI")) else ""]
           for r in rows],
          note=f"CLI ingest runs at {cli_rate / floor:.1%} of the orjson parse floor ({floor / cli_rate:,.0f}× "
               f"slower).\n{cpu_note}; on an idle machine wall ≈ CPU for one process.")

    progress("timing the loader's CPU steps on a sample")
    costs = _breakdown(lines)
    per_resource = 1e6 / (stored / cli_cpu)
    rest = per_resource - costs["parse"] - costs["validate"] - costs["index"]
    table(f"1b. Where a CLI-ingested resource's CPU time goes (µs per resource, sample of {costs['n']:,})",
          ["step", "µs/resource", "share", "ceiling if only this step (resources/s)"],
          [["orjson.loads", fmt(costs["parse"], 1), f"{costs['parse'] / per_resource:.0%}",
            fmt(1e6 / costs["parse"])],
           ["R4B validation (fhir.resources)", fmt(costs["validate"], 1), f"{costs['validate'] / per_resource:.0%}",
            fmt(1e6 / costs["validate"])],
           ["index rows + sensitivity mask", fmt(costs["index"], 1), f"{costs['index'] / per_resource:.0%}",
            fmt(1e6 / costs["index"])],
           ["the rest: SQL inserts, history, hooks, commit", fmt(rest, 1), f"{rest / per_resource:.0%}",
            fmt(1e6 / rest) if rest > 0 else "—"],
           ["total (CLI ingest, CPU time)", fmt(per_resource, 1), "100%", fmt(stored / cli_cpu)]],
          note="Steps are timed on the CPU clock (time.process_time), so other load on the machine does not skew them.")
    # The guarded figures are per CPU-second: other load on the machine does not lower them.
    verdict(SECTION, "transaction Bundles via API (1 client)", f"{api_rate:,.0f}/s ({created / cpu:,.0f}/CPU-s)",
            f"≥ {TARGET:,}/s", api_rate >= TARGET, Guard(created / cpu, TARGET, at_least=True))
    if http_rate is not None:
        verdict(SECTION, "transaction Bundles via gunicorn (2 clients)", f"{http_rate:,.0f}/s", f"≥ {TARGET:,}/s",
                http_rate >= TARGET)
    verdict(SECTION, "NDJSON via CLI ingest", f"{cli_rate:,.0f}/s ({stored / cli_cpu:,.0f}/CPU-s)",
            f"≥ {TARGET:,}/s", cli_rate >= TARGET, Guard(stored / cli_cpu, TARGET, at_least=True))
