"""The application factory: one blueprint per surface, one error handler for all."""
from __future__ import annotations

from typing import Any

from flask import Flask

from service import db, errors
from service.config import load_config


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build a Passerelle app; `config` overrides values read from the environment."""
    app = Flask(__name__, instance_relative_config=False, static_folder=None)
    app.config.update(load_config())
    app.config.update(config or {})
    app.json.sort_keys = False
    db.init_app(app)
    errors.register(app)

    import consent.materialise  # noqa: F401 - registers decision materialisation on every write
    from consent import web as portal
    from service import auth, cli, export, health
    from service.api import custodian, operations, research, scopes
    from service.api.fhirjson import check_host

    export.init_app(app)  # first: any request, even one refused below, starts this process's export worker
    # In this order, before any blueprint's own checks: the Host, then the token and its scopes.
    app.before_request(check_host)
    app.before_request(scopes.enforce)
    app.register_blueprint(health.bp)
    app.register_blueprint(auth.bp)
    app.register_blueprint(custodian.bp, url_prefix="/fhir")
    app.register_blueprint(operations.bp, url_prefix="/fhir")
    app.register_blueprint(research.bp, url_prefix="/research/fhir")
    portal.init_app(app)
    cli.register(app)
    return app
