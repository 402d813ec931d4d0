"""`model import|list`: the predictive models `POST /fhir/$score` applies (service/scoring.py)."""
from __future__ import annotations

from pathlib import Path

import click
import orjson
from flask.cli import AppGroup

from policies.fhirdates import instant
from service import audit, db, scoring
from service.cli.output import emit, readable_errors
from service.errors import Conflict, InvalidRequest
from service.store import models


@click.group("model", cls=AppGroup)
def model_group() -> None:
    """Predictive models released by $train, imported for $score."""


@model_group.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="The name $score is asked for it by.")
@click.option("--replace", is_flag=True, help="Replace the model imported under this name.")
def import_command(file: Path, name: str, replace: bool) -> None:
    """Import FILE, a model document (the `document` of a $train answer, JSON), unchanged; prints a
    JSON summary. An invalid document, or a name in use without --replace, changes nothing."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{file}: cannot be read as UTF-8 text: {exc}") from None
    with readable_errors():
        try:
            with db.write() as conn:
                stored = scoring.import_model(conn, name, text, audit.operator(), replace=replace)
        except InvalidRequest as exc:
            raise click.ClickException(f"{file}: {exc.message}; nothing was imported") from None
        except Conflict as exc:
            raise click.ClickException(f"{exc.message}: pass --replace to replace it") from None
    emit(_summary(stored))


@model_group.command("list")
def list_command() -> None:
    """List the imported models; prints one JSON object."""
    with readable_errors(), db.read() as conn:
        emit({"models": [_summary(stored) for stored in models.listed(conn)]})


def _summary(stored: models.Stored) -> dict[str, str]:
    return {"name": stored.name, "model": orjson.loads(stored.document)["model"], "digest": stored.digest,
            "imported_at": instant(stored.imported_at), "imported_by": stored.imported_by}
