"""`keys rotate` and `reidentify`: the custodian's key operations, both audited."""
from __future__ import annotations

import click
from flask.cli import AppGroup, with_appcontext
from sqlalchemy import select

from consent import projects
from service import audit, db, keyring
from service.cli.output import emit, readable_errors
from service.store.schema import resources
from service.validation import check_type


@click.group("keys", cls=AppGroup)
def keys_group() -> None:
    """Per-project pseudonymisation keys (derived from the master key)."""


@keys_group.command("rotate")
@click.option("--project", "project_id", required=True)
def rotate_command(project_id: str) -> None:
    """Start a new key version: new pseudonyms and date shifts for the project from now on."""
    with readable_errors(), db.write() as conn:
        projects.get(conn, project_id)
        version = keyring.rotate(conn, project_id)
        audit.record(conn, actor=audit.operator(), action="keys-rotate", project_id=project_id,
                     detail={"key_version": version})
    emit({"project_id": project_id, "key_version": version})


@click.command("reidentify")
@click.option("--project", "project_id", required=True)
@click.option("--pseudonym", required=True, help="Type/pseudonym as a research partner sees it, e.g. Patient/abc…")
@with_appcontext
def reidentify_command(project_id: str, pseudonym: str) -> None:
    """Map a project's pseudonym back to the stored resource (custodian only; audited)."""
    resource_type, _, value = pseudonym.rpartition("/")
    if not resource_type:
        raise click.ClickException("give the pseudonym with its type, e.g. Patient/abc…")
    with readable_errors(), db.write() as conn:
        check_type(resource_type)
        projects.get(conn, project_id)
        for version in keyring.versions(conn, project_id):
            pk = keyring.project_key(conn, project_id, version).resolve(resource_type, value)
            real = conn.execute(select(resources.c.id).where(resources.c.pk == pk, resources.c.type == resource_type)
                                ).scalar() if pk is not None else None
            if real is not None:
                audit.record(conn, actor=audit.operator(), action="reidentify", project_id=project_id,
                             detail={"pseudonym": pseudonym, "key_version": version})
                emit({"type": resource_type, "id": real, "key_version": version})
                return
    raise click.ClickException(f"{pseudonym} is not a pseudonym of project {project_id} under any of its keys")
