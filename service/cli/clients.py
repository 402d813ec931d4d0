"""`client create|list|disable`: OAuth2 clients of the custodian and of research projects."""
from __future__ import annotations

from pathlib import Path

import click
from flask.cli import AppGroup
from sqlalchemy import select, update

from service import audit, db
from service.auth import ROLES, auth_method, register_client
from service.cli.output import emit, readable_errors
from service.store.schema import clients


@click.group("client", cls=AppGroup)
def client_group() -> None:
    """OAuth2 clients (custodian systems and research partners)."""


def _read_jwks(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"cannot read the JWKS file {path}: {exc}") from None


@client_group.command("create")
@click.option("--name", required=True)
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--project", "project_id", help="The research project the client acts for (role research).")
@click.option("--jwks", "jwks_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Public keys (JWKS) for private_key_jwt; without it a client secret is issued.")
def create_command(name: str, role: str, project_id: str | None, jwks_path: Path | None) -> None:
    """Register a client; prints one JSON object (the secret is shown this once only)."""
    jwks = _read_jwks(jwks_path) if jwks_path else None
    with readable_errors(), db.write() as conn:
        registered = register_client(conn, name, role, project_id, jwks)
        audit.record(conn, actor=audit.operator(), action="client-create", project_id=project_id,
                     detail={"client_id": registered["client_id"], "role": role,
                             "method": auth_method(jwks is not None)})
    emit(registered)


@client_group.command("list")
def list_command() -> None:
    """Print every client, one JSON object per line (never a secret)."""
    with db.read() as conn:
        for row in conn.execute(select(clients).order_by(clients.c.created)):
            emit({"client_id": row.client_id, "name": row.name, "role": row.role, "project_id": row.project_id,
                  "token_endpoint_auth_method": auth_method(row.jwks is not None), "active": row.active})


@client_group.command("disable")
@click.argument("client_id")
def disable_command(client_id: str) -> None:
    """Disable a client: its tokens stop working at once."""
    with db.write() as conn:
        changed = conn.execute(update(clients).where(clients.c.client_id == client_id).values(active=False))
        if changed.rowcount != 1:
            raise click.ClickException(f"client {client_id} is not known")
        audit.record(conn, actor=audit.operator(), action="client-disable", project_id=None,
                     detail={"client_id": client_id})
    emit({"client_id": client_id, "active": False})
