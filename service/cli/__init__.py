"""`flask --app wsgi …` commands, one module per domain.

Every command but `init-db` refuses, with one line and exit status 1, to run on a node
that may not serve (service/health.py: database, master key, schema): `init-db` is
what makes a node ready.
"""
from __future__ import annotations

from typing import Any

import click
from flask import Flask
from flask.cli import with_appcontext

#: Commands that run whatever state the node is in.
UNCHECKED = frozenset({"init-db"})


def register(app: Flask) -> None:
    from service.cli import audit, clients, consents, data, database, exports, keys, patients, projects, sensitivity
    from service.cli.metrics import metrics_group
    from service.cli.models import model_group
    from service.cli.settings import settings_group

    app.cli.add_command(database.init_db_command)
    app.cli.add_command(clients.client_group)
    app.cli.add_command(data.demo_data_command)
    app.cli.add_command(data.ingest_command)
    app.cli.add_command(projects.project_group)
    app.cli.add_command(consents.consent_group)
    app.cli.add_command(patients.patient_group)
    app.cli.add_command(keys.keys_group)
    app.cli.add_command(keys.reidentify_command)
    app.cli.add_command(audit.audit_group)
    app.cli.add_command(exports.export_worker_command)
    app.cli.add_command(sensitivity.sensitivity_group)
    app.cli.add_command(model_group)
    app.cli.add_command(settings_group)
    app.cli.add_command(metrics_group)
    for name, command in app.cli.commands.items():
        if name not in UNCHECKED:
            _refuse_when_not_ready(command)


def _refuse_when_not_ready(command: click.Command) -> None:
    """Run the node check before `command` (before any subcommand of a group). Idempotent: the
    command objects are shared by every app of the process."""
    if getattr(command, "passerelle_checked", False):
        return
    callback = command.callback

    @with_appcontext
    def checked(*args: Any, **kwargs: Any) -> Any:
        from service import health

        line = health.refusal(health.state())
        if line is not None:
            raise click.ClickException(line)
        return click.get_current_context().invoke(callback, *args, **kwargs) if callback else None

    command.callback = checked
    command.passerelle_checked = True  # type: ignore[attr-defined]
