"""`export-worker`: a process that runs Bulk Data export jobs."""
from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext

from service import export
from service.cli.output import emit


@click.command("export-worker")
@click.option("--once", is_flag=True, help="Run the jobs queued now, print how many ran, and exit.")
@with_appcontext
def export_worker_command(once: bool) -> None:
    """Run Bulk Data export jobs as they arrive, until stopped.

    For deployments that serve the app with PASSERELLE_EXPORT_WORKER=off and run
    workers as processes of their own; any number may run, on any node.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    worker = export.Worker(app)
    if once:
        emit({"jobs": worker.work()})
        return
    click.echo(f"Export worker {worker.worker_id} is running; stop it with Ctrl-C or SIGTERM.", err=True)
    worker.serve()
