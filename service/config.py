"""Configuration from `PASSERELLE_*` environment variables.

Every setting has a safe default so that `make run` works on a fresh machine; a
deployment overrides them in the environment (see README, "Configuration").
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: Access tokens never live longer than this (SMART Backend Services caps them at 5 min).
MAX_TOKEN_LIFETIME = 300
CONSENT_DEFAULTS = ("deny", "aggregate", "record")


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def load_config(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Build the Flask config mapping from environment variables."""
    env = dict(os.environ if env is None else env)
    instance = Path(env.get("PASSERELLE_INSTANCE_DIR", str(ROOT / "instance")))
    database_url = env.get("PASSERELLE_DATABASE_URL") or f"sqlite:///{instance / 'passerelle.db'}"
    consent_default = env.get("PASSERELLE_CONSENT_DEFAULT", "deny")
    if consent_default not in CONSENT_DEFAULTS:
        raise ValueError(f"PASSERELLE_CONSENT_DEFAULT must be one of {', '.join(CONSENT_DEFAULTS)}")
    token_lifetime = _int(env, "PASSERELLE_TOKEN_LIFETIME", MAX_TOKEN_LIFETIME)
    if not 1 <= token_lifetime <= MAX_TOKEN_LIFETIME:
        raise ValueError(f"PASSERELLE_TOKEN_LIFETIME must be between 1 and {MAX_TOKEN_LIFETIME} seconds")
    return {
        "INSTANCE_DIR": str(instance),
        "DATABASE_URL": database_url,
        "MASTER_KEY_FILE": env.get("PASSERELLE_MASTER_KEY_FILE", str(instance / "master.key")),
        # Public base URL (scheme://host[:port]) when behind a proxy; otherwise taken from the request.
        "BASE_URL": env.get("PASSERELLE_BASE_URL", "").rstrip("/"),
        "MAX_CONTENT_LENGTH": _int(env, "PASSERELLE_MAX_BODY_BYTES", 64 * 1024 * 1024),
        "TOKEN_LIFETIME": token_lifetime,
        "DEFAULT_PAGE_SIZE": _int(env, "PASSERELLE_PAGE_SIZE", 20),
        "MAX_PAGE_SIZE": _int(env, "PASSERELLE_MAX_PAGE_SIZE", 1000),
        # The regime for patients without a research consent: opt-in (deny) or opt-out.
        "CONSENT_DEFAULT": consent_default,
        "EXPORT_TTL_SECONDS": _int(env, "PASSERELLE_EXPORT_TTL", 24 * 3600),
        "EXPORT_POLL_SECONDS": _int(env, "PASSERELLE_EXPORT_POLL_SECONDS", 2),
        "DB_POOL_SIZE": _int(env, "PASSERELLE_DB_POOL_SIZE", 5),
    }
