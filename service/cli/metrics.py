"""`metrics token|revoke`: the bearer token Prometheus scrapes `/metrics` with (service/metrics.py)."""
from __future__ import annotations

import click
from flask.cli import AppGroup

from service import audit, db, metrics


@click.group("metrics", cls=AppGroup)
def metrics_group() -> None:
    """The metrics token, shared by every node of the database."""


@metrics_group.command("token")
def token_command() -> None:
    """Make a new metrics token and print it (this once only); the previous one stops working on every node."""
    with db.write() as conn:
        token = metrics.new_token(conn)
        audit.record(conn, actor=audit.operator(), action="metrics-token", project_id=None, detail={})
    click.echo(token)
    click.echo("Give it to Prometheus as its bearer token for /metrics (deploy/README.md, \"Metrics\"); only its "
               "keyed hash is stored.", err=True)


@metrics_group.command("revoke")
def revoke_command() -> None:
    """Forget the metrics token: then only a direct connection from a node's own host may read /metrics."""
    with db.write() as conn:
        if not metrics.revoke_token(conn):
            raise click.ClickException("there is no metrics token to revoke")
        audit.record(conn, actor=audit.operator(), action="metrics-token-revoke", project_id=None, detail={})
    click.echo("The metrics token is revoked.", err=True)
