"""The application factory: one blueprint per surface, one error handler for all."""
from __future__ import annotations

from typing import Any

from flask import Flask
from sqlalchemy import Engine

from service import db, errors, urlrules
from service.config import load_config


def create_app(config: dict[str, Any] | None = None, *, engine: Engine | None = None) -> Flask:
    """Build a Passerelle app; `config` overrides values read from the environment.

    The app makes its database engine from the config, unless given `engine` (on its `DATABASE_URL`):
    a process that builds many apps on one database (the tests) then shares one pool and one cache of
    compiled statements among them."""
    app = Flask(__name__, instance_relative_config=False, static_folder=None)
    app.url_rule_class = urlrules.Rule  # URL builders generated once per process
    app.config.update(load_config())
    app.config.update(config or {})
    app.json.sort_keys = False
    db.init_app(app, engine)
    errors.register(app)

    import consent.materialise  # noqa: F401 - registers decision materialisation on every write
    from consent import web as portal
    from service import audit, auth, cli, export, headers, health, limits, logs, metrics, proxy
    from service.api import capability, custodian, openapi, operations, research, scopes
    from service.api.fhirjson import check_host

    app.request_class = limits.LimitedRequest  # every body within its limit, however it is sent and read
    audit.init_app(app)  # before all: every request, even one refused below, has its X-Request-ID
    # A node whose database, master key or schema is wrong answers 503 to everything (and starts
    # no export worker); checked until it passes once, so an app can be built before `init-db`
    # (tests, the CLI). Serving refuses earlier still, at load (wsgi.py).
    app.before_request(health.refuse_until_ready)
    export.init_app(app)  # then: any request, even one refused below, starts this process's export worker
    logs.init_app(app)  # before the other hooks: its line is written last, with the final response
    metrics.init_app(app)  # next: counted with the final status too
    headers.init_app(app)
    # In this order, before any blueprint's own checks: the Host, then the token and its scopes.
    app.before_request(check_host)
    app.before_request(scopes.enforce)
    app.before_request(limits.check_parameters)
    app.register_blueprint(health.bp)
    app.register_blueprint(auth.bp)
    app.register_blueprint(custodian.bp, url_prefix="/fhir")
    app.register_blueprint(operations.bp, url_prefix="/fhir")
    app.register_blueprint(research.bp, url_prefix="/research/fhir")
    app.register_blueprint(capability.bp)  # the operations' OperationDefinitions
    app.register_blueprint(openapi.bp)
    app.register_blueprint(metrics.bp)
    portal.init_app(app)
    cli.register(app)
    proxy.init_app(app)  # outermost: every hook and view sees the client the trusted proxy names
    return app
