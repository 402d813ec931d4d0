"""`init-db`: create or migrate the schema and the master key (idempotent); classify the
stored resources again when the sensitivity classifier changed since they were classified."""
from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext

from consent.materialise import consent_default, refresh
from consent.projects import all_projects
from policies.budget import ensure_budget
from policies.keys import MasterKeyError, ensure_master_key
from policies.sensitivity import VERSION as CLASSIFIER_VERSION
from service import db
from service.store import masks


@click.command("init-db")
@with_appcontext
def init_db_command() -> None:
    """Create or migrate the database schema and create the master key if missing."""
    try:
        created = ensure_master_key(current_app.config["MASTER_KEY_FILE"])
    except MasterKeyError as exc:
        raise click.ClickException(str(exc)) from exc
    version = db.migrate(db.engine())
    with db.write() as conn:
        for project in all_projects(conn):  # projects created before budgets existed get theirs
            ensure_budget(conn, project.project_id, project.epsilon, project.delta, actor="init-db")
        decisions = refresh(conn, consent_default())
        reclassified = masks.refresh(conn) if masks.stored_version(conn) != CLASSIFIER_VERSION else None
    click.echo(f"Database ready (schema version {version}); {decisions} consent decisions materialised.", err=True)
    if reclassified:
        click.echo(f"Sensitivity classifier {CLASSIFIER_VERSION}: {reclassified['resources']} resources classified, "
                   f"{reclassified['changed']} masks changed.", err=True)
    if created:
        click.echo(f"Created master key {current_app.config['MASTER_KEY_FILE']} (mode 0600).", err=True)
