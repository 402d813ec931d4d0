"""Section 5 — Bulk Data `$export`: resources/s and the worker's peak memory at two sizes.

A record-tier project whose patients all consented kicks off `GET /research/fhir/$export`
(`Prefer: respond-async`); the job then runs in a separate process
(`benchmarks.export_worker`: `service.export.Worker(app).work()`), whose peak RSS is read with
getrusage. Two exports of different volume from the same database — a few resource
types, then every type — show whether memory stays flat as the output grows (rows
stream in keyset batches). The files are then downloaded through the API and counted.
"""
from __future__ import annotations

import json
import subprocess
import time
from typing import Any
from urllib.parse import urlsplit

from benchmarks.harness import BIN, ROOT, Instance, fmt, progress, table, verdict
from benchmarks.research import consent_everyone, create_project
from benchmarks.runner import Context
from service import export

SECTION = "export"
FLAT = 1.25
SMALL_TYPES = "Patient,Condition,Encounter"


def export_once(instance: Instance, token: str, types: str | None) -> dict[str, Any]:
    client = instance.app.test_client()
    headers = {"Authorization": f"Bearer {token}", "Prefer": "respond-async", "Accept": "application/fhir+json"}
    url = "/research/fhir/$export" + (f"?_type={types}" if types else "")
    # A kick-off is refused while no worker is alive: this process's Worker records the heartbeat,
    # and the worker process started below runs the job.
    export.Worker(instance.app).beat()
    kick = client.get(url, headers=headers)
    if kick.status_code != 202:
        raise RuntimeError(f"$export kick-off answered {kick.status_code}: {kick.get_data()[:300]!r}")
    status_path = urlsplit(kick.headers["Content-Location"]).path
    worker = subprocess.run([str(BIN / "python"), "-m", "benchmarks.export_worker"], cwd=ROOT, env=instance.env(),
                            capture_output=True, text=True, check=False)
    if worker.returncode != 0:
        raise RuntimeError(f"export worker failed: {worker.stderr[-800:]}")
    report = json.loads(worker.stdout.strip().splitlines()[-1])
    status = client.get(status_path, headers=headers)
    if status.status_code != 200:
        raise RuntimeError(f"export status answered {status.status_code}: {status.get_data()[:300]!r}")
    manifest = status.get_json()
    total = sum(item["count"] for item in manifest["output"])
    start = time.perf_counter()
    lines = size = 0
    for item in manifest["output"]:
        body = client.get(urlsplit(item["url"]).path, headers={"Authorization": f"Bearer {token}"}).get_data()
        lines += body.count(b"\n")
        size += len(body)
    download = time.perf_counter() - start
    if lines != total:
        raise RuntimeError(f"the manifest counts {total} resources but the files hold {lines} lines")
    return {**report, "resources": total, "files": len(manifest["output"]), "bytes": size, "download": download}


def run(ctx: Context) -> None:
    scale = ctx.options.scale
    source, meta = ctx.datasets.population(scale.export_size)
    database = ctx.datasets.checkout(source, "export")
    instance = Instance(database, ctx.workdir / "export", EXPORT_POLL_SECONDS=0)
    results = []
    try:
        project_id = create_project(instance, "record", "benchmark export project")
        progress("recording a record-level Consent for every patient")
        consent_everyone(instance, project_id, "record")
        credentials = instance.register("research", project_id)
        for label, types in (("few types", SMALL_TYPES), ("every type", None)):
            progress(f"$export of {label} ({types or 'all'})")
            results.append((label, types, export_once(instance, instance.token(credentials), types)))
    finally:
        instance.close()
    rows = []
    for label, types, r in results:
        rows.append([f"{label}: {types or 'all'}", r["resources"], r["files"], fmt(r["seconds"], 2),
                     fmt(r["resources"] / r["seconds"]), fmt(r["resources"] / r["cpu"]) if r["cpu"] else "—",
                     fmt(r["start_kb"] / 1024, 0), fmt(r["peak_kb"] / 1024, 0),
                     fmt((r["peak_kb"] - r["start_kb"]) / 1024, 1), fmt(r["maxrss_kb"] / 1024, 0),
                     fmt(r["bytes"] / 1e6 / r["download"], 0) if r["download"] else "—"])
    table(f"5. $export through export.Worker.work in a separate process ({meta['resources']:,} stored resources, "
          f"{ctx.options.db})",
          ["export", "resources", "files", "seconds", "resources/s", "per CPU-s", "RSS at start MB",
           "peak RSS MB", "growth MB", "max RSS MB", "download MB/s"], rows,
          note="RSS at start = the worker after create_app; peak = RSS sampled every 20 ms during the work; growth = "
               "peak − start;\nmax RSS = getrusage(RUSAGE_SELF).ru_maxrss (imports included). Downloads go through "
               "GET /research/fhir/_export/<job>/file/<n> (test client) and are counted line by line.")
    (_, _, small), (_, _, large) = results
    ratio = large["peak_kb"] / small["peak_kb"]
    growth = (large["peak_kb"] - large["start_kb"]) / 1024, (small["peak_kb"] - small["start_kb"]) / 1024
    volume = large["resources"] / max(1, small["resources"])
    verdict(SECTION, f"$export rate ({large['resources']:,} resources)", f"{large['resources'] / large['seconds']:,.0f}"
            f"/s", "(reported)", None)
    verdict(SECTION, f"peak RSS, {volume:.1f}× more resources", f"{ratio:.2f}× ({small['peak_kb'] / 1024:,.0f} → "
            f"{large['peak_kb'] / 1024:,.0f} MB; growth {growth[1]:.0f} → {growth[0]:.0f} MB)", f"flat (≤ {FLAT}×)",
            ratio <= FLAT)
