"""Section 4 — the research API against the custodian API, same searches, same run.

A record-tier project is created (`consent.projects.create`) and every patient records a
record-level Consent for it (`consent.writer.build` + `writer.record`, the paper-form
path), so the research view sees the same rows as the custodian. Then, through gunicorn
(2 workers), each request kind runs on `/fhir` and on `/research/fhir` (with the
project's pseudonyms). Target: research ≥ 0.7× the custodian's requests/s.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import false, select

from benchmarks.datasets import chunks, sample_rows
from benchmarks.harness import (
    Database,
    Guard,
    Gunicorn,
    Instance,
    LoadResult,
    entries_of,
    fmt,
    http_token,
    measure,
    progress,
    verdict,
)
from benchmarks.harness import table as print_table
from benchmarks.runner import Context
from benchmarks.search import CONCURRENCY, paths, run_kind, samples

SECTION = "research"
TARGET = 0.7
KINDS = ("read Patient/{id}", "Observation?code=…&_count=20", "Observation?patient=…&_count=20")


def patient_ids(database: Database) -> list[str]:
    from service.store.schema import resources

    return [r.id for r in sample_rows(database, select(resources.c.id).where(
        resources.c.type == "Patient", resources.c.deleted == false()).order_by(resources.c.pk), 10_000_000)]


def create_project(instance: Instance, tier: str, name: str, epsilon: float = 10.0, epsilon_cap: float = 1.0) -> str:
    from consent import projects
    from service import db

    with instance.app.app_context(), db.write(instance.engine) as conn:
        return projects.create(conn, name=name, tier=tier, epsilon=epsilon, epsilon_cap=epsilon_cap).project_id


def consent_everyone(instance: Instance, project_id: str, tier: str) -> tuple[int, float]:
    """Every patient records a Consent at `tier` for the project; (consents, seconds)."""
    from consent import writer
    from service import db

    ids = patient_ids(instance.database)
    with measure() as used:
        for chunk in chunks(ids, 200):
            with instance.app.app_context(), db.write(instance.engine) as conn:
                for patient_id in chunk:
                    writer.record(conn, writer.build(patient_id, project_id, tier, [], source="benchmark"))
    return len(ids), used.wall


def pseudonyms(instance: Instance, project_id: str, ids: list[str]) -> dict[str, str]:
    """The project's pseudonym of each patient id (as the research API shows it)."""
    from policies.keys import load_master_key
    from policies.pseudonym import PseudonymKey
    from service.store.schema import resources

    key = PseudonymKey(load_master_key(instance.master_key_file), project_id, 1)
    rows = sample_rows(instance.database, select(resources.c.pk, resources.c.id).where(
        resources.c.type == "Patient", resources.c.id.in_(ids)), len(ids))
    return {row.id: key.pseudonym("Patient", row.pk) for row in rows}


def run(ctx: Context) -> None:
    scale = ctx.options.scale
    source, meta = ctx.datasets.population(scale.research_size)
    database = ctx.datasets.checkout(source, "research")
    instance = Instance(database, ctx.workdir / "research")
    measured: dict[str, dict[str, tuple[LoadResult, LoadResult]]] = {"custodian": {}, "research": {}}
    try:
        project_id = create_project(instance, "record", "benchmark research project")
        progress("recording a record-level Consent for every patient")
        consents, seconds = consent_everyone(instance, project_id, "record")
        progress(f"{consents:,} consents in {seconds:.1f} s ({consents / seconds:,.0f}/s)")
        values = samples(database)
        mapped = pseudonyms(instance, project_id, values["patients"])
        custodian = instance.register("custodian")
        partner = instance.register("research", project_id)
        # One client at full speed: the per-client research rate limit (service/limits.py) must not be what is measured.
        with Gunicorn.of(instance, PASSERELLE_RESEARCH_RATE_LIMIT="100000000") as server:
            for kind in KINDS:
                for surface, credentials, prefix, refs in (("custodian", custodian, "/fhir", None),
                                                           ("research", partner, "/research/fhir", mapped)):
                    progress(f"{surface}: {kind}")
                    token = http_token(server.port, credentials)
                    measured[surface][kind] = run_kind(
                        server, token, lambda n, k=kind, p=prefix, r=refs: paths(k, values, n, p, r), scale)
    finally:
        instance.close()
    rows: list[list[Any]] = []
    for kind in KINDS:
        (c_load, c_lat), (r_load, r_lat) = measured["custodian"][kind], measured["research"][kind]
        ratio = r_load.rps / c_load.rps
        errors = c_load.errors + c_lat.errors + r_load.errors + r_lat.errors
        rows.append([kind, fmt(c_load.rps, 0), fmt(r_load.rps, 0), fmt(ratio, 2), fmt(c_load.server_ms, 2),
                     fmt(r_load.server_ms, 2), fmt(c_lat.p(0.5), 1), fmt(r_lat.p(0.5), 1),
                     f"{entries_of(c_lat.bodies):.1f} / {entries_of(r_lat.bodies):.1f}",
                     f"{errors}: {(r_load.sample_error or r_lat.sample_error or c_load.sample_error)[:70]}"
                     if errors else "0", f"≥ {TARGET}"])
        # Capacity (server CPU per request) is the guarded figure: unlike req/s, the load client sharing
        # the cores does not skew it. req/s is guarded only when the CPU could not be read.
        capacity = c_load.server_ms / r_load.server_ms if c_load.server_ms and r_load.server_ms else None
        verdict(SECTION, f"research/custodian req/s: {kind}", f"{ratio:.2f}× ({r_load.rps:,.0f} vs "
                f"{c_load.rps:,.0f}/s)", f"≥ {TARGET}×", ratio >= TARGET,
                None if capacity else Guard(ratio, TARGET, at_least=True))
        if capacity:
            verdict(SECTION, f"research/custodian capacity (server CPU/req): {kind}", f"{capacity:.2f}× "
                    f"({r_load.server_ms:.2f} vs {c_load.server_ms:.2f} ms)", f"≥ {TARGET}×", capacity >= TARGET,
                    Guard(capacity, TARGET, at_least=True))
    print_table(f"4. Research vs custodian through gunicorn (2 workers), {meta['resources']:,} resources, "
                f"{consents:,} consented patients ({ctx.options.db})",
                ["request", "/fhir req/s", "/research req/s", "ratio", "/fhir CPU ms/req", "/research CPU ms/req",
                 "/fhir seq p50 ms", "/research seq p50 ms", "entries f/r", "errors", "target"], rows,
                note=f"{CONCURRENCY} concurrent clients; CPU ms/req = gunicorn workers' CPU per request. Every "
                     "research request also writes its audit entry (one write transaction).")
