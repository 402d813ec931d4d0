"""`consent set|explain|refresh`: consents collected on paper, and decisions explained."""
from __future__ import annotations

import getpass
from pathlib import Path

import click
from flask.cli import AppGroup

from consent import projects, writer
from consent.materialise import consent_default, explain, overruled_warnings, refresh
from consent.patients import resolve
from service import audit, db
from service.cli.output import csv_list, emit, readable_errors


@click.group("consent", cls=AppGroup)
def consent_group() -> None:
    """Research consents and the decisions they produce."""


def _period(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[str | None, str | None] | None:
    if value is None:
        return None
    start, separator, end = value.partition("..")
    if not separator or not (start or end):
        raise click.BadParameter("give START..END (either side may be left empty), e.g. 2026-01-01..2027-12-31")
    return start or None, end or None


@consent_group.command("set")
@click.option("--patient", "patient", required=True, help="The patient's id or medical record number.")
@click.option("--project", "project_id", required=True)
@click.option("--tier", type=click.Choice(["none", "aggregate", "record"]), required=True)
@click.option("--exclude", callback=csv_list(), help="Sensitive categories to withhold, e.g. mental-health,hiv.")
@click.option("--signed", help="When the patient signed the form (YYYY-MM-DD or a date and time; default now).")
@click.option("--recorded-by", help="Who records the form (default: the operating-system user).")
@click.option("--attachment", "attachment_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The scanned form (PDF, PNG, JPEG or TIFF), kept in the Consent and never released.")
@click.option("--period", callback=_period, help="When the consent is in force: START..END, either side optional.")
def set_command(patient: str, project_id: str, tier: str, exclude: list[str], signed: str | None,
                recorded_by: str | None, attachment_path: Path | None,
                period: tuple[str | None, str | None] | None) -> None:
    """Record a patient's paper form for a project as a FHIR Consent; prints the resulting decision.

    A warning goes to stderr when a more recent Consent governs, so this one changes nothing yet.
    """
    with readable_errors():
        scan = None
        if attachment_path is not None:
            try:
                data = attachment_path.read_bytes()
            except OSError as exc:
                raise click.ClickException(f"cannot read the scanned form {attachment_path}: {exc.strerror}") from None
            scan = writer.scanned_form(data, attachment_path.name)
        with db.write() as conn:
            projects.get(conn, project_id)
            patient_id = resolve(conn, patient)
            consent = writer.build(patient_id, project_id, tier, exclude, source="paper form", when=signed,
                                   method="paper", recorded_by=recorded_by or getpass.getuser(),
                                   attachment=scan, period=period)
            stored = writer.record(conn, consent)
            audit.record(conn, actor=audit.operator(), action="consent-change", project_id=project_id,
                         detail={"type": "Consent", "id": stored.id, "version": stored.version, "method": "paper"},
                         patients=[patient_id])
            (warning,) = overruled_warnings(conn, [stored.resource()])
            decision = explain(conn, patient_id, project_id)
    if warning:
        click.echo(f"warning: {warning}", err=True)
    emit({"consent": f"Consent/{stored.id}/_history/{stored.version}", **decision})


@consent_group.command("explain")
@click.option("--patient", "patient", required=True, help="The patient's id or medical record number.")
@click.option("--project", "project_id", required=True)
def explain_command(patient: str, project_id: str) -> None:
    """Print the decision for one patient and project, and why."""
    with readable_errors(), db.read() as conn:
        emit(explain(conn, resolve(conn, patient), project_id))


@consent_group.command("refresh")
def refresh_command() -> None:
    """Re-materialise every decision under the database's default regime (`settings show`)."""
    with db.write() as conn:
        count = refresh(conn)
        default = consent_default(conn)
    click.echo(f"{count} decisions materialised (default regime {default!r}).", err=True)
