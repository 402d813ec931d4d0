"""Which databases the suite runs on: SQLite always, PostgreSQL when a server answers.

PASSERELLE_TEST_DATABASE_URL names the server; unset, the local one at `DEFAULT_POSTGRES_URL`
is used when it answers; set to the empty string, PostgreSQL is off. Under CI (any true value
of `CI`) the PostgreSQL variants must run, so a server that does not answer fails them.
"""
from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
_TRUE = frozenset({"1", "yes", "true", "on"})


def in_ci(env: Mapping[str, str]) -> bool:
    """True when `CI` holds a true value (`1`, `yes`, `true`, `on`; any case, surrounding spaces ignored)."""
    return env.get("CI", "").strip().lower() in _TRUE


def postgres_url(env: Mapping[str, str]) -> str:
    """The server the PostgreSQL variants use; "" when they are switched off."""
    return env.get("PASSERELLE_TEST_DATABASE_URL", DEFAULT_POSTGRES_URL).strip()


def admin_url(url: str) -> str:
    """`url` with the psycopg (3) driver SQLAlchemy needs."""
    return make_url(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def postgres_problem(url: str) -> str | None:
    """None when PostgreSQL at `url` answers, else one line saying why it cannot be used."""
    if not url:
        return "PASSERELLE_TEST_DATABASE_URL is empty"
    try:
        engine = create_engine(admin_url(url), connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # any failure means "not reachable"
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return f"PostgreSQL at {url} does not answer ({reason[0] if reason else type(exc).__name__})"
    return None
