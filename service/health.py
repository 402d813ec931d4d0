"""Whether this node may serve: its database answers, its master key is the one the database
was initialised with, and the schema is at this code's newest migration, or at a newer release's
that keeps this code working (service/store/migrations: `schema: ahead-compatible`).

`GET /healthz` answers 200 only then, else 503 naming each cause (`key: mismatch`); the
same check refuses requests (`refuse_until_ready`), `flask` commands other than `init-db`
(service/cli) and gunicorn's loading of the app (`refuse_to_serve`) on a misconfigured node.
"""
from __future__ import annotations

import logging

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from sqlalchemy.exc import SQLAlchemyError

from consent.materialise import consent_default
from policies.keys import MasterKeyError
from service import db, keyring
from service.errors import ServiceUnavailable
from service.store import migrations

bp = Blueprint("health", __name__)
log = logging.getLogger("passerelle")

#: What each cause means and what to do, for the one line a refusing node prints.
ADVICE = {
    ("database", "unreachable"): "the database does not answer (PASSERELLE_DATABASE_URL)",
    ("key", "missing"): "the master key file (PASSERELLE_MASTER_KEY_FILE) does not exist: install this "
                        "deployment's key (deploy/README.md, \"Master key\")",
    ("key", "invalid"): "the master key file cannot be used (unreadable, not 32 bytes, or readable by group or "
                        "others)",
    ("key", "mismatch"): "the master key file is not the key this database was initialised with: install the "
                         "deployment's key (deploy/README.md, \"Master key\")",
    ("key", "unregistered"): "the database records no master key fingerprint: run `flask --app wsgi init-db`",
    ("schema", "behind"): "the database schema is older than this code: run `flask --app wsgi init-db`",
    ("schema", "ahead"): "the database schema is newer than this code and no longer works with it: deploy the "
                         "newer release",
}


def _key_file() -> str:
    """The key file's own state, when the database cannot say whether it is the right key."""
    try:
        keyring.master()
    except MasterKeyError as exc:
        return exc.reason
    return "unverified"


def state() -> dict[str, str]:
    """{"database", "key", "schema"} → "ok" (for the schema, any migrations.SERVING answer) or the cause;
    read now (never cached)."""
    try:
        with db.read() as conn:
            schema = migrations.status(conn)
            key = keyring.key_status(conn) if schema in migrations.SERVING else _key_file()
    except SQLAlchemyError:
        return {"database": "unreachable", "key": _key_file(), "schema": "unknown"}
    return {"database": "ok", "key": key, "schema": schema}


def problems(found: dict[str, str]) -> list[str]:
    """Pure: the causes in `found` that stop a node, as `part: cause` ("unverified"/"unknown" follow another)."""
    return [f"{part}: {cause}" for part, cause in found.items()
            if cause not in (*migrations.SERVING, "unverified", "unknown")]


def refusal(found: dict[str, str]) -> str | None:
    """Pure: one readable line saying why a node with this `state` must not run, or None when it may."""
    causes = problems(found)
    if not causes:
        return None
    advice = "; ".join(ADVICE[(part, cause)] for part, cause in found.items() if (part, cause) in ADVICE)
    return f"Passerelle refuses to run on this node ({', '.join(causes)}): {advice}."


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    found = state()
    if problems(found):
        return jsonify(status="unavailable", **found), 503
    return jsonify(status="ok", **found), 200


def refuse_until_ready() -> None:
    """before_request: answer 503 naming the cause until this app has once found its node ready
    (then never checked again: /healthz keeps checking for load balancers)."""
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    if app.extensions.get("passerelle.ready") or request.blueprint == bp.name:
        return
    found = state()
    line = refusal(found)
    if line is not None:
        raise ServiceUnavailable(line)
    app.extensions["passerelle.ready"] = True


def refuse_to_serve(app: Flask) -> None:
    """At load (wsgi.py): raise gunicorn's AppImportError, which it prints as one line before stopping
    (exit status 4), when the key file is missing or unusable, or when the database answers and says the
    key or the schema is not this node's. A database that does not answer yet (it may start after the
    node) does not stop it: requests answer 503 until the check passes (`refuse_until_ready`). Logs a
    warning when PASSERELLE_CONSENT_DEFAULT differs from the database's regime."""
    with app.app_context():
        found = state()
        line = refusal({part: cause for part, cause in found.items() if part != "database"})
        if line is not None:
            from gunicorn.errors import AppImportError

            raise AppImportError(line)
        if found["database"] == "ok":
            with db.read() as conn:
                warning = consent_default_drift(consent_default(conn))
            if warning:
                log.warning(warning)


def consent_default_drift(stored: str) -> str | None:
    """A warning when this node's PASSERELLE_CONSENT_DEFAULT differs from the database's regime `stored`."""
    configured = current_app.config.get("CONSENT_DEFAULT")
    if configured is None or configured == stored:
        return None
    return (f"Warning: PASSERELLE_CONSENT_DEFAULT={configured} is ignored: the database's consent default is "
            f"{stored!r} (change it for every node with `flask --app wsgi settings set consent-default "
            f"{configured}`).")
