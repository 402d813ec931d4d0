"""`settings show|set`: the settings every node must agree on, held in the database.

Today one: `consent-default`, the regime for patients without a research consent
(deny: opt-in; aggregate or record: opt-out). `PASSERELLE_CONSENT_DEFAULT` only seeds it
when `init-db` creates a database; a node whose environment says otherwise is warned.
"""
from __future__ import annotations

import getpass

import click
from flask.cli import AppGroup

from consent.materialise import consent_default, set_consent_default
from service import audit, db
from service.cli.output import emit, readable_errors
from service.config import CONSENT_DEFAULTS
from service.health import consent_default_drift


@click.group("settings", cls=AppGroup)
def settings_group() -> None:
    """Settings shared by every node, held in the database."""


@settings_group.command("show")
def show_command() -> None:
    """Print the shared settings as one JSON object."""
    with db.read() as conn:
        stored = consent_default(conn)
    emit({"consent-default": stored})
    if warning := consent_default_drift(stored):
        click.echo(warning, err=True)


@settings_group.command("set")
@click.argument("name", type=click.Choice(["consent-default"]))
@click.argument("value", type=click.Choice(CONSENT_DEFAULTS))
def set_command(name: str, value: str) -> None:
    """Change a shared setting (audited); `consent-default` re-materialises every decision in the same
    transaction."""
    with readable_errors(), db.write() as conn:
        count = set_consent_default(conn, value)
        audit.record(conn, actor=f"cli:{getpass.getuser()}", action="settings-set", project_id=None,
                     detail={"name": name, "value": value})
    click.echo(f"Consent default is now {value!r}; {count} decisions materialised.", err=True)
    emit({name: value})
