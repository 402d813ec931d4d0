"""Keys and profiles of research projects, loaded once per process and never logged.

The master key file is read once; a node serves only while its fingerprint is the one
`init-db` recorded in the database (`key_status`, checked by service/health.py). Each
project's pseudonym key is derived from it for the project's current key version
(`project_keys`), which `keys rotate` advances. The current version is read from the database
for every release (with the token, for a search or read: service/auth.py `authenticate`), so a
rotation takes effect on every node at the next request after its commit.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from flask import current_app
from sqlalchemy import Connection, func, insert, select, update

from policies.deid import Profile, load_profile, parse_profile
from policies.keys import MasterKeyError, fingerprint, load_master_key
from policies.pseudonym import PseudonymKey
from service.db import now_us
from service.errors import Forbidden
from service.store.schema import project_keys, settings

if TYPE_CHECKING:
    from consent.projects import ProjectRecord

class KeyMissing(Forbidden):
    """A project has no key version: nothing can be pseudonymised for it."""


DEFAULT_PROFILE = Path(__file__).resolve().parent.parent / "policies" / "profiles" / "default.json"
#: The `settings` row holding the master key's fingerprint (policies.keys.fingerprint).
FINGERPRINT = "master-key-fingerprint"


class KeyMismatch(Exception):
    """The database was initialised with another master key."""


def master() -> bytes:
    """The master key this process uses: the key file as first read successfully (MasterKeyError until then)."""
    cache = current_app.extensions.setdefault("passerelle.keys", {})
    if "master" not in cache:
        cache["master"] = load_master_key(current_app.config["MASTER_KEY_FILE"])
    return cache["master"]


def recorded_fingerprint(conn: Connection) -> str | None:
    """The fingerprint `init-db` recorded (None: the database was never initialised by `init-db`)."""
    return conn.scalar(select(settings.c.value).where(settings.c.name == FINGERPRINT))


def key_status(conn: Connection) -> str:
    """`ok` when this process's master key is the one the database records; otherwise the cause:
    `missing` / `invalid` (the key file), `unregistered` (no fingerprint: run `init-db`), `mismatch`."""
    try:
        key = master()
    except MasterKeyError as exc:
        return exc.reason
    recorded = recorded_fingerprint(conn)
    if recorded is None:
        return "unregistered"
    return "ok" if recorded == fingerprint(key) else "mismatch"


def record_fingerprint(conn: Connection, replace: bool = False) -> bool:
    """Record this process's master key fingerprint when none is; returns True if it wrote one.

    A different recorded fingerprint raises KeyMismatch unless `replace` (a deliberate change of
    master key, see deploy/README.md): it is never overwritten silently."""
    mine = fingerprint(master())
    recorded = recorded_fingerprint(conn)
    if recorded == mine:
        return False
    if recorded is None:
        conn.execute(insert(settings).values(name=FINGERPRINT, value=mine))
    elif replace:
        conn.execute(update(settings).where(settings.c.name == FINGERPRINT).values(value=mine))
    else:
        raise KeyMismatch(f"the master key file {current_app.config['MASTER_KEY_FILE']} is not the key this "
                          "database was initialised with")
    return True


def start(conn: Connection, project_id: str) -> None:
    """Give a new project its first key version (in the transaction that creates the project)."""
    conn.execute(insert(project_keys).values(project_id=project_id, version=1, created=now_us()))


def current_version(conn: Connection, project_id: str) -> int:
    """The project's current key version; a project without one receives nothing (fail closed)."""
    version = conn.execute(select(func.max(project_keys.c.version))
                           .where(project_keys.c.project_id == project_id)).scalar()
    if version is None:
        raise _missing(project_id)
    return version


def current_version_of(project_id: Any) -> Any:
    """`current_version` as a scalar subquery on a statement's project id column (NULL without one)."""
    return (select(func.max(project_keys.c.version)).where(project_keys.c.project_id == project_id)
            .scalar_subquery())


def _missing(project_id: str) -> KeyMissing:
    return KeyMissing(f"Project {project_id} has no pseudonym key; run `flask --app wsgi init-db`")


def rotate(conn: Connection, project_id: str) -> int:
    """Start a new key version: new pseudonyms and date shifts from now on."""
    version = current_version(conn, project_id) + 1
    conn.execute(insert(project_keys).values(project_id=project_id, version=version, created=now_us()))
    return version


def versions(conn: Connection, project_id: str) -> list[int]:
    return list(conn.execute(select(project_keys.c.version).where(project_keys.c.project_id == project_id)
                             .order_by(project_keys.c.version.desc())).scalars())


def project_key(conn: Connection, project_id: str, version: int | None = None) -> PseudonymKey:
    """The project's key at `version`, or at its current version."""
    return key_at(project_id, version or current_version(conn, project_id))


def key_at(project_id: str, version: int | None) -> PseudonymKey:
    """The project's key at `version`; KeyMissing for None (a project without a key version)."""
    if version is None:
        raise _missing(project_id)
    cache = current_app.extensions.setdefault("passerelle.keys", {})
    key = cache.get((project_id, version))
    if key is None:
        key = cache[(project_id, version)] = PseudonymKey(master(), project_id, version)
    return key


def profile_for(project: ProjectRecord) -> Profile:
    """The project's de-identification profile (the shipped default unless it has its own)."""
    cache = current_app.extensions.setdefault("passerelle.profiles", {})
    source = project.profile or ""
    if source not in cache:
        cache[source] = (parse_profile(orjson.loads(source), source=f"project {project.project_id}")
                         if source else load_profile(DEFAULT_PROFILE))
    return cache[source]
