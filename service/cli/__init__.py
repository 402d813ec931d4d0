"""`flask --app wsgi …` commands, one module per domain."""
from __future__ import annotations

from flask import Flask


def register(app: Flask) -> None:
    from service.cli import clients, consents, data, database, exports, keys, patients, projects, sensitivity

    app.cli.add_command(database.init_db_command)
    app.cli.add_command(clients.client_group)
    app.cli.add_command(data.demo_data_command)
    app.cli.add_command(data.ingest_command)
    app.cli.add_command(projects.project_group)
    app.cli.add_command(consents.consent_group)
    app.cli.add_command(patients.patient_group)
    app.cli.add_command(keys.keys_group)
    app.cli.add_command(keys.reidentify_command)
    app.cli.add_command(keys.audit_group)
    app.cli.add_command(exports.export_worker_command)
    app.cli.add_command(sensitivity.sensitivity_group)
