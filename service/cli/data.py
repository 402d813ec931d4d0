"""`ingest` and `demo-data`: load FHIR files, or the seeded synthetic population."""
from __future__ import annotations

import sys
from pathlib import Path
from random import Random

import click
from flask.cli import with_appcontext
from sqlalchemy import Connection, false, select

from consent import writer
from service import db, ingest
from service.bundles import process
from service.store import repository
from service.store.schema import resources


def _has_patients() -> bool:
    with db.read() as conn:
        return conn.execute(select(resources.c.pk).where(resources.c.type == "Patient").limit(1)).first() is not None


@click.command("ingest")
@with_appcontext
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def ingest_command(paths: tuple[Path, ...]) -> None:
    """Load Bundles (.json) and NDJSON (.ndjson) files or directories of them."""
    files = ingest.expand(paths)
    total = sum(p.stat().st_size for p in files)
    with click.progressbar(length=total, label="Ingesting", file=sys.stderr) as bar:
        report = ingest.ingest(db.engine(), files, bar.update)
    for problem in report.rejected:
        click.echo(f"rejected: {problem}", err=True)
    click.echo(f"Stored {report.stored} resources from {report.files} files; {len(report.rejected)} rejected.",
               err=True)
    if report.rejected:
        raise SystemExit(1)


@click.command("demo-data")
@with_appcontext
@click.option("--patients", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ndjson", "ndjson_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write NDJSON files here instead of loading (benchmark scale, no API).")
@click.option("--if-empty", is_flag=True, help="Load only if the database holds no Patient yet.")
def demo_data_command(patients: int, seed: int, ndjson_dir: Path | None, if_empty: bool) -> None:
    """Generate seeded synthetic patients and load them through the transaction path, then refresh
    the planner's statistics."""
    from service import synthetic  # the generator's tables are loaded only by the command that uses them

    if if_empty and ndjson_dir is None and _has_patients():
        click.echo("The database already holds patients; demo data not loaded.", err=True)
        return
    if ndjson_dir is not None:
        counts = synthetic.write_ndjson(ndjson_dir, patients, seed)
        click.echo(f"Wrote {sum(counts.values())} resources to {ndjson_dir}.", err=True)
        return
    engine = db.engine()
    stored = 0
    for bundle in synthetic.organisation_bundles(seed):
        with db.write(engine) as conn:
            stored += len(process(conn, bundle)["entry"])
    with click.progressbar(synthetic.patient_bundles(patients, seed), length=patients, label="Loading patients",
                           file=sys.stderr) as bar:
        for bundle in bar:
            with db.write(engine) as conn:
                stored += len(process(conn, bundle)["entry"])
    with db.write(engine) as conn:
        consents = _demo_consents(conn, seed)
        repository.refresh_statistics(conn)
    click.echo(f"Loaded {patients} synthetic patients ({stored} resources, seed {seed}) and {consents} "
               "research consents.", err=True)


def _demo_consents(conn: Connection, seed: int) -> int:
    """Research-wide consents for most demo patients, varied as real choices are; the rest have none."""
    rng = Random(seed)
    written = 0
    ids = conn.execute(select(resources.c.id).where(resources.c.type == "Patient", resources.c.deleted == false())
                       .order_by(resources.c.pk)).scalars().all()
    for patient_id in ids:
        roll = rng.random()
        if roll < 0.55:
            tier, exclude = "record", []
        elif roll < 0.70:
            tier, exclude = "record", ["mental-health", "hiv", "sexual-health", "substance-use"]
        elif roll < 0.85:
            tier, exclude = "aggregate", []
        else:
            continue  # no consent: the deployment default applies
        writer.record(conn, writer.build(patient_id, None, tier, exclude, source="demo data"))
        written += 1
    return written
