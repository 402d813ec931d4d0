"""`sensitivity refresh`: classify every stored resource again with the current rules."""
from __future__ import annotations

import sys

import click
from flask.cli import AppGroup
from sqlalchemy import func, select

from service import db
from service.cli.output import emit, readable_errors
from service.store import masks
from service.store.schema import history


@click.group("sensitivity", cls=AppGroup)
def sensitivity_group() -> None:
    """Sensitive categories of stored resources."""


@sensitivity_group.command("refresh")
def refresh_command() -> None:
    """Recompute every stored mask with the current classifier; prints a JSON summary."""
    with readable_errors(), db.write() as conn:
        versions = conn.scalar(select(func.count()).select_from(history)) or 0
        with click.progressbar(length=versions, label="Classifying", file=sys.stderr) as bar:
            summary = masks.refresh(conn, bar.update)
    emit(summary)
