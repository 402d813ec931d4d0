"""`init-db`: create or migrate the schema (service/store/migrations) and the master key (idempotent),
safe to run from several nodes at once and while others serve; record the master
key's fingerprint and, in a new database, the consent default regime; classify the stored
resources again when the sensitivity classifier changed since they were classified, and index
them again when the search index changed since they were indexed (`service/store/reindex.py`).

`init-db` never overwrites a recorded fingerprint: on a database initialised with another
master key it refuses, unless `--replace-master-key` says the change is deliberate
(deploy/README.md, "Master key").
"""
from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy import Connection

from consent.materialise import consent_default, refresh, seed_consent_default
from consent.projects import all_projects
from policies.budget import ensure_budget
from policies.keys import MasterKeyError, ensure_master_key
from policies.sensitivity import VERSION as CLASSIFIER_VERSION
from service import db, keyring
from service.health import consent_default_drift
from service.store import masks, migrations, reindex
from service.store.indexer import VERSION as INDEX_VERSION


def record_settings(conn: Connection, *, replace_master_key: bool = False) -> tuple[bool, bool]:
    """Record what every node must agree on, in the caller's transaction: this node's master key
    fingerprint (keyring.record_fingerprint: KeyMismatch unless `replace_master_key`) and, in a
    database without one, the consent default regime (PASSERELLE_CONSENT_DEFAULT, else deny).
    Returns (fingerprint written, regime written)."""
    return (keyring.record_fingerprint(conn, replace=replace_master_key),
            seed_consent_default(conn, current_app.config["CONSENT_DEFAULT"] or "deny"))


@click.command("init-db")
@click.option("--replace-master-key", is_flag=True,
              help="Record this node's master key although the database was initialised with another one "
                   "(every pseudonym, date shift and sealed audit key changes).")
@with_appcontext
def init_db_command(replace_master_key: bool) -> None:
    """Create or migrate the database schema and create the master key if missing."""
    try:
        created = ensure_master_key(current_app.config["MASTER_KEY_FILE"])
    except MasterKeyError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        revision = db.migrate(db.engine())
        with db.migration_lock() as conn:  # nodes running init-db at once record the settings one after the other
            try:
                recorded, seeded = record_settings(conn, replace_master_key=replace_master_key)
            except keyring.KeyMismatch as exc:
                raise click.ClickException(f"{exc}; nothing was changed. Install that key, or pass "
                                           "--replace-master-key to adopt this one (deploy/README.md, "
                                           "\"Master key\")") from None
            default = consent_default(conn)
            for project in all_projects(conn):  # projects created before budgets existed get theirs
                ensure_budget(conn, project.project_id, project.epsilon, project.delta, actor="init-db")
            decisions = refresh(conn)
            reclassified = masks.refresh(conn) if masks.stored_version(conn) != CLASSIFIER_VERSION else None
            outdated_index = reindex.stored_version(conn) != INDEX_VERSION
    except migrations.MigrationRefused as exc:
        raise click.ClickException(f"{exc}; nothing was changed.") from None
    except migrations.MigrationBusy as exc:
        raise click.ClickException(f"{exc}.") from None
    indexed = reindex.reindex(db.engine()) if outdated_index else None
    click.echo(f"Database ready (schema revision {revision}); consent default {default!r}"
               f"{' (recorded now)' if seeded else ''}; {decisions} consent decisions materialised.", err=True)
    if warning := consent_default_drift(default):
        click.echo(warning, err=True)
    if reclassified:
        click.echo(f"Sensitivity classifier {CLASSIFIER_VERSION}: {reclassified['resources']} resources classified, "
                   f"{reclassified['changed']} masks changed.", err=True)
    if indexed:
        click.echo(f"Search index {INDEX_VERSION}: {indexed} resources indexed again.", err=True)
    if created:
        click.echo(f"Created master key {current_app.config['MASTER_KEY_FILE']} (mode 0600).", err=True)
    if recorded:
        click.echo(f"Recorded the fingerprint of master key {current_app.config['MASTER_KEY_FILE']}.", err=True)
