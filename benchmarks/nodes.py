"""Section 7 — throughput through nginx with one node, then two, on one PostgreSQL database.

The deployment of `deploy/`: nginx running the shipped `deploy/nginx.conf` (TLS with a
self-signed certificate, rewritten only for loopback ports, `harness.nginx_conf`) in front of
one, then two gunicorn nodes (`deploy/gunicorn.conf.py`, 2 workers × 4 threads each) that
share the database and the master key, as `PASSERELLE_BASE_URL=https://fhir.example.org`.
Two request mixes, each the same requests in the same order for both shapes:

* research, read-heavy — `/research/fhir` Patient reads and Observation searches by code and
  by patient (pseudonyms), each one audited (a write);
* custodian search — `/fhir` Observation by code and by patient, Patient by family.

Every node here runs on the same cores as nginx, PostgreSQL and the load client, so the
second node adds processes, not CPU: the figure shows what the proxy and a second node cost
or gain on one machine, not how a deployment on separate machines scales. PostgreSQL only
(several nodes cannot share SQLite).
"""
from __future__ import annotations

from itertools import chain
from typing import Any

from benchmarks.harness import (
    PUBLIC_NAME,
    Gunicorn,
    Instance,
    LoadResult,
    Nginx,
    Request,
    fmt,
    http_load,
    progress,
)
from benchmarks.harness import table as print_table
from benchmarks.research import consent_everyone, create_project, pseudonyms
from benchmarks.runner import Context
from benchmarks.search import paths, samples

#: 2 nodes × 2 workers × 4 threads: enough clients to keep both nodes busy.
CONCURRENCY = 16
MIXES = {
    "research, read-heavy": ("/research/fhir", ("read Patient/{id}", "Observation?code=…&_count=20",
                                                "Observation?patient=…&_count=20")),
    "custodian search": ("/fhir", ("Observation?code=…&_count=20", "Observation?patient=…&_count=20",
                                   "Patient?family=…&_count=20")),
}


def _mix(kinds: tuple[str, ...], values: dict[str, list[str]], count: int, prefix: str,
         refs: dict[str, str] | None) -> list[Request]:
    """`count` requests, the kinds interleaved."""
    each = [paths(kind, values, -(-count // len(kinds)), prefix, refs) for kind in kinds]
    return [Request("GET", path) for path in chain.from_iterable(zip(*each, strict=True))][:count]


def _cpu(nodes: list[Gunicorn]) -> dict[int, float]:
    return {pid: cpu for node in nodes for pid, cpu in node.cpu_snapshot().items()}


def run(ctx: Context) -> None:
    if ctx.options.db != "postgresql":
        progress("nodes: PostgreSQL only (several nodes share one database); skipped on SQLite")
        return
    scale = ctx.options.scale
    source, meta = ctx.datasets.population(scale.research_size)
    database = ctx.datasets.checkout(source, "nodes")
    instance = Instance(database, ctx.workdir / "nodes")
    rows: list[list[Any]] = []
    try:
        project_id = create_project(instance, "record", "benchmark nodes project")
        progress("recording a record-level Consent for every patient")
        consent_everyone(instance, project_id, "record")
        values = samples(database)
        mapped = pseudonyms(instance, project_id, values["patients"])
        tokens = {"/fhir": instance.token(instance.register("custodian")),
                  "/research/fhir": instance.token(instance.register("research", project_id))}
        env = instance.env(PASSERELLE_BASE_URL=f"https://{PUBLIC_NAME}", PASSERELLE_FORWARDED_ALLOW_IPS="127.0.0.1",
                           PASSERELLE_RESEARCH_RATE_LIMIT="100000000", PASSERELLE_EXPORT_WORKER="off")
        for count in (1, 2):
            nodes = [Gunicorn(env, instance.dir / f"node-{count}-{n}.log") for n in range(count)]
            try:
                for node in nodes:
                    node.start()
                for node in nodes:
                    node.wait_ready()
                with Nginx(instance.dir / f"nginx-{count}", [node.port for node in nodes]) as nginx:
                    for mix, (prefix, kinds) in MIXES.items():
                        progress(f"{count} node(s): {mix}")
                        rows.append([mix, count, *_measure(nginx, nodes, tokens[prefix],
                                                           _mix(kinds, values, scale.http_requests, prefix,
                                                                mapped if prefix == "/research/fhir" else None),
                                                           scale.http_seconds)])
            finally:
                for node in nodes:
                    node.__exit__(None, None, None)
    finally:
        instance.close()
    rows.sort(key=lambda row: (list(MIXES).index(row[0]), row[1]))
    for mix in MIXES:
        one, two = (row for row in rows if row[0] == mix)
        two.append(fmt(float(two[2].replace(",", "")) / float(one[2].replace(",", "")), 2) + "×")
        one.append("")
    print_table(f"7. Throughput through nginx (TLS), one node vs two, {meta['resources']:,} resources "
                f"({ctx.options.db})",
                ["mix", "nodes", "req/s", "p50 ms", "p95 ms", "server CPU ms/req", "requests by node", "errors",
                 "2 ÷ 1"], rows,
                note=f"{CONCURRENCY} concurrent keep-alive TLS clients through deploy/nginx.conf; each node 2 gunicorn "
                     "workers × 4 threads; server CPU = the nodes' workers (not nginx, not PostgreSQL). Nodes, "
                     "nginx, PostgreSQL and the load client share this machine's cores: a second node adds "
                     "processes, not CPU.")


def _measure(nginx: Nginx, nodes: list[Gunicorn], token: str, requests: list[Request], seconds: float
             ) -> list[Any]:
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    endpoint = nginx.endpoint()
    http_load(endpoint, requests[:40], 4, headers, max_seconds=2)  # warm up every worker and connection
    logged = nginx.log_size()
    before = _cpu(nodes)
    result: LoadResult = http_load(endpoint, requests, CONCURRENCY, headers, max_seconds=seconds)
    after = _cpu(nodes)
    server_ms = (sum(after[pid] - before[pid] for pid in after) / result.requests * 1000
                 if result.requests and set(after) == set(before) else None)
    by_node = nginx.answered_by(logged, [node.port for node in nodes])
    errors = f"{result.errors}: {result.sample_error[:60]}" if result.errors else "0"
    return [fmt(result.rps, 0), fmt(result.p(0.5), 1), fmt(result.p(0.95), 1), fmt(server_ms, 2),
            " / ".join(fmt(n) for n in by_node), errors]
