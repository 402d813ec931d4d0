"""Configuration from `PASSERELLE_*` environment variables.

Every setting has a safe default so that `make run` works on a fresh machine; a
deployment overrides them in the environment (see README, "Configuration").
"""
from __future__ import annotations

import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from service.proxy import parse_proxies

ROOT = Path(__file__).resolve().parent.parent

#: Access tokens never live longer than this (SMART Backend Services caps them at 5 min).
MAX_TOKEN_LIFETIME = 300
CONSENT_DEFAULTS = ("deny", "aggregate", "record")
_DNS_NAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*", re.IGNORECASE)


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _positive(env: dict[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def _seconds(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def host_name(value: str) -> str | None:
    """A host as requests name it (`Example.org`, `127.0.0.1`, `[::1]`), lowercased and unbracketed;
    None unless it is a DNS name or an IP address."""
    name = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        return ipaddress.ip_address(name).compressed
    except ValueError:
        return name.lower() if not value.startswith("[") and _DNS_NAME.fullmatch(name) else None


def _base_url(env: dict[str, str]) -> str:
    raw = env.get("PASSERELLE_BASE_URL", "").strip()
    if not raw:
        return ""
    try:
        parts = urlsplit(raw)
        valid = (parts.scheme in ("http", "https") and host_name(parts.hostname or "") is not None
                 and parts.username is None and parts.path in ("", "/") and not any(c in raw for c in "?#")
                 and parts.port != 0)  # .port raises ValueError when out of range
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"PASSERELLE_BASE_URL must be scheme://host[:port] (http or https, nothing after the "
                         f"port), got {raw!r}")
    return raw.rstrip("/")


def _trusted_hosts(env: dict[str, str], base_url: str) -> tuple[str, ...]:
    raw = env.get("PASSERELLE_TRUSTED_HOSTS", "")
    listed = [item.strip() for item in raw.split(",") if item.strip()]
    if listed and not base_url:
        raise ValueError("PASSERELLE_TRUSTED_HOSTS needs PASSERELLE_BASE_URL: set the public base URL that "
                         "links and token audiences use")
    names = []
    for item in listed:
        name = host_name(item)
        if name is None:
            raise ValueError(f"PASSERELLE_TRUSTED_HOSTS lists host names separated by commas (no scheme or port), "
                             f"got {item!r}")
        names.append(name)
    return tuple(names)


def _master_key_file(env: dict[str, str], instance: Path) -> str:
    """PASSERELLE_MASTER_KEY_FILE; else `master.key` among the credentials systemd passes the service
    (`LoadCredential=master.key:…` sets CREDENTIALS_DIRECTORY); else the instance directory's."""
    if env.get("PASSERELLE_MASTER_KEY_FILE"):
        return env["PASSERELLE_MASTER_KEY_FILE"]
    if env.get("CREDENTIALS_DIRECTORY"):
        return str(Path(env["CREDENTIALS_DIRECTORY"]) / "master.key")
    return str(instance / "master.key")


def load_config(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Build the Flask config mapping from environment variables."""
    env = dict(os.environ if env is None else env)
    instance = Path(env.get("PASSERELLE_INSTANCE_DIR", str(ROOT / "instance")))
    database_url = env.get("PASSERELLE_DATABASE_URL") or f"sqlite:///{instance / 'passerelle.db'}"
    consent_default = env.get("PASSERELLE_CONSENT_DEFAULT") or None
    if consent_default is not None and consent_default not in CONSENT_DEFAULTS:
        raise ValueError(f"PASSERELLE_CONSENT_DEFAULT must be one of {', '.join(CONSENT_DEFAULTS)}")
    token_lifetime = _int(env, "PASSERELLE_TOKEN_LIFETIME", MAX_TOKEN_LIFETIME)
    if not 1 <= token_lifetime <= MAX_TOKEN_LIFETIME:
        raise ValueError(f"PASSERELLE_TOKEN_LIFETIME must be between 1 and {MAX_TOKEN_LIFETIME} seconds")
    base_url = _base_url(env)
    export_worker = env.get("PASSERELLE_EXPORT_WORKER", "thread")
    if export_worker not in ("thread", "off"):
        raise ValueError(f"PASSERELLE_EXPORT_WORKER must be thread or off, got {export_worker!r}")
    return {
        "INSTANCE_DIR": str(instance),
        "DATABASE_URL": database_url,
        "MASTER_KEY_FILE": _master_key_file(env, instance),
        # Public base URL (scheme://host[:port]) of every link and token audience; without it, the
        # (loopback) request's own (service/api/fhirjson.py).
        "BASE_URL": base_url,
        # Further host names requests may use besides BASE_URL's (not Flask's TRUSTED_HOSTS: see fhirjson).
        "EXTRA_HOSTS": _trusted_hosts(env, base_url),
        # The reverse proxies (networks) whose X-Forwarded-For/-Proto/-Host the app applies (service/proxy.py).
        "FORWARDED_ALLOW_IPS": parse_proxies(env.get("PASSERELLE_FORWARDED_ALLOW_IPS", "127.0.0.1,::1")),
        "MAX_CONTENT_LENGTH": _int(env, "PASSERELLE_MAX_BODY_BYTES", 64 * 1024 * 1024),
        "TOKEN_LIFETIME": token_lifetime,
        "DEFAULT_PAGE_SIZE": _int(env, "PASSERELLE_PAGE_SIZE", 20),
        "MAX_PAGE_SIZE": _int(env, "PASSERELLE_MAX_PAGE_SIZE", 1000),
        # Request limits and rate limits (service/limits.py decides each; README, "Configuration").
        "MAX_JSON_DEPTH": _positive(env, "PASSERELLE_MAX_JSON_DEPTH", 64),
        "MAX_SEARCH_PARAMS": _positive(env, "PASSERELLE_MAX_SEARCH_PARAMS", 100),
        "MAX_BUNDLE_ENTRIES": _positive(env, "PASSERELLE_MAX_BUNDLE_ENTRIES", 10_000),
        "TOKEN_RATE_LIMIT": _positive(env, "PASSERELLE_TOKEN_RATE_LIMIT", 60),
        "RESEARCH_RATE_LIMIT": _positive(env, "PASSERELLE_RESEARCH_RATE_LIMIT", 6000),
        # The level of the JSON request log (service/logs.py); gunicorn's own logs use it too.
        "LOG_LEVEL": env.get("PASSERELLE_LOG_LEVEL") or "info",
        # The regime for patients without a research consent (opt-in: deny, or opt-out) that `init-db`
        # records in a new database (None: deny); nodes then follow the database's (`settings set`).
        "CONSENT_DEFAULT": consent_default,
        "EXPORT_TTL_SECONDS": _int(env, "PASSERELLE_EXPORT_TTL", 24 * 3600),
        "EXPORT_POLL_SECONDS": _int(env, "PASSERELLE_EXPORT_POLL_SECONDS", 2),
        "EXPORT_HEARTBEAT_SECONDS": _seconds(env, "PASSERELLE_EXPORT_HEARTBEAT_SECONDS", 5.0),
        # Export jobs run in a worker thread of each serving process (thread), or only in
        # dedicated `flask --app wsgi export-worker` processes (off).
        "EXPORT_WORKER": export_worker,
        "DB_POOL_SIZE": _int(env, "PASSERELLE_DB_POOL_SIZE", 5),
        # The smallest ε one $aggregate may spend: a tinier one buys only noise (and unbounded intervals).
        "MIN_EPSILON": float(env.get("PASSERELLE_MIN_EPSILON") or 0.001),
        # The most patients one $train trains on: a larger cohort is refused (400) once counted.
        "TRAIN_MAX_ROWS": _positive(env, "PASSERELLE_TRAIN_MAX_ROWS", 1_000_000),
        # How long one statement computing an $aggregate or $train answer may run before the
        # request answers 422 too-costly (service/db.py `statistics_read`).
        "STATISTICS_TIMEOUT_SECONDS": _seconds(env, "PASSERELLE_STATISTICS_TIMEOUT_SECONDS", 30.0),
        # How long a statement waits for a database lock before the request answers 503.
        "DB_BUSY_SECONDS": _int(env, "PASSERELLE_DB_BUSY_SECONDS", 30),
    }
