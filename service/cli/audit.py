"""`audit verify|seal|disclosures|report`: the audit trail checked, sealed and read back."""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

import click
from flask.cli import AppGroup

from policies.fhirdates import DateFormatError, date_range
from service import audit, db, disclosures
from service.cli.output import emit, readable_errors


@click.group("audit", cls=AppGroup)
def audit_group() -> None:
    """The append-only, hash-chained and sealed audit trail."""


@audit_group.command("verify")
def verify_command() -> None:
    """Recompute the hash chain and check its seals; exit 1 if any entry was altered, removed,
    inserted or reordered, or the tail was cut."""
    with db.read() as conn:
        intact, count, message = audit.verify(conn)
    emit({"intact": intact, "entries": count, "message": message})
    if not intact:
        raise SystemExit(1)


@audit_group.command("seal")
def seal_command() -> None:
    """Seal the chain's head now (an HMAC under a key derived from the master key), and any
    periodic seal missing below it; refused if the entries since the last seal do not match."""
    try:
        with db.write() as conn:
            sealed = audit.seal(conn)
    except audit.ChainBroken as exc:
        raise click.ClickException(str(exc)) from None
    emit({"sealed": sealed})


def _table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


_RELEASE_COLUMNS = ("at", "project", "project_name", "kind", "action", "resource_type", "resources", "epsilon",
                    "client", "request_id", "seq")
_RECIPIENT_COLUMNS = ("project", "project_name", "kind", "releases", "resources", "epsilon", "first", "last")


@audit_group.command("disclosures")
@click.option("--patient", required=True, help="The patient's id or medical record number.")
@click.option("--since", help="Only releases from this date (YYYY, YYYY-MM-DD or a dateTime) on.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def disclosures_command(patient: str, since: str | None, fmt: str) -> None:
    """Every release of a patient's data, per project and kind (records, aggregate answers with
    their ε): the answer to a GDPR Art. 15 access request."""
    try:
        start = date_range(since)[0] if since else None
    except DateFormatError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    with readable_errors(), db.read() as conn:
        found = disclosures.disclosures(conn, disclosures.patient_of(conn, patient), start)
    if fmt == "json":
        emit(found)
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=_RELEASE_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(found["releases"])
        click.echo(out.getvalue(), nl=False)
    else:
        click.echo(f"Patient {found['patient']}: {len(found['releases'])} releases to "
                   f"{len({r['project'] for r in found['recipients']})} projects"
                   + (f" since {found['since']}" if found["since"] else ""))
        if found["recipients"]:
            click.echo("\n" + _table(_RECIPIENT_COLUMNS, found["recipients"]))
            click.echo("\n" + _table(_RELEASE_COLUMNS, found["releases"]))


@audit_group.command("report")
@click.option("--project", "project_id", required=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def report_command(project_id: str, fmt: str) -> None:
    """What a project received: resources by type, distinct patients, ε spent over time."""
    with readable_errors(), db.read() as conn:
        report = disclosures.project_report(conn, project_id)
    if fmt == "json":
        emit(report)
        return
    click.echo(f"Project {report['project']} ({report['name']}): {report['resources']} resources of "
               f"{report['patients']} patients; {report['patients_in_aggregates']} patients counted in "
               f"{report['releases'].get('aggregate', 0)} aggregate answers and "
               f"{report['releases'].get('train', 0)} trained models")
    types = [{"type": t, "resources": n} for t, n in report["resources_by_type"].items()]
    if types:
        click.echo("\n" + _table(("type", "resources"), types))
    spent = report["budget"]
    if spent is not None:
        click.echo(f"\nε total {spent['total']}, spent {spent['spent']}, remaining {spent['remaining']}")
        if spent["spent_per_day"]:
            click.echo(_table(("day", "epsilon", "cumulative"), spent["spent_per_day"]))
        if spent["questions"]:
            click.echo("\n" + _table(("at", "epsilon", "client", "question"), spent["questions"]))
