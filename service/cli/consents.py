"""`consent set|explain|refresh`: consents collected on paper, and decisions explained."""
from __future__ import annotations

import click
from flask.cli import AppGroup

from consent import projects, writer
from consent.materialise import consent_default, explain, refresh
from service import db
from service.cli.output import csv_list, emit, readable_errors
from service.store import repository


@click.group("consent", cls=AppGroup)
def consent_group() -> None:
    """Research consents and the decisions they produce."""


@consent_group.command("set")
@click.option("--patient", "patient_id", required=True)
@click.option("--project", "project_id", required=True)
@click.option("--tier", type=click.Choice(["none", "aggregate", "record"]), required=True)
@click.option("--exclude", callback=csv_list(), help="Sensitive categories to withhold, e.g. mental-health,hiv.")
def set_command(patient_id: str, project_id: str, tier: str, exclude: list[str]) -> None:
    """Record a patient's choice for a project as a FHIR Consent; prints the resulting decision."""
    with readable_errors(), db.write() as conn:
        projects.get(conn, project_id)
        repository.read(conn, "Patient", patient_id)
        stored = writer.record(conn, writer.build(patient_id, project_id, tier, exclude, source="paper form"))
        decision = explain(conn, patient_id, project_id)
    emit({"consent": f"Consent/{stored.id}/_history/{stored.version}", **decision})


@consent_group.command("explain")
@click.option("--patient", "patient_id", required=True)
@click.option("--project", "project_id", required=True)
def explain_command(patient_id: str, project_id: str) -> None:
    """Print the decision for one patient and project, and why."""
    with readable_errors(), db.read() as conn:
        emit(explain(conn, patient_id, project_id))


@consent_group.command("refresh")
def refresh_command() -> None:
    """Re-materialise every decision (after changing PASSERELLE_CONSENT_DEFAULT)."""
    with db.write() as conn:
        count = refresh(conn, consent_default())
    click.echo(f"{count} decisions materialised (default regime {consent_default()!r}).", err=True)
