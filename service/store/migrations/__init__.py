"""The schema's history as Alembic revisions (`versions/`), and the one way a database follows it.

A new database gets every revision from the baseline (the schema of release 7be16ab, legacy
schema version 5) on; a database that release made (its `schema_migrations` table records
versions 1 to 5) is adopted: stamped at the baseline, its rows untouched. An older database
is refused (`LegacySchemaTooOld`: that release's `init-db` brings it to version 5 first), as is
one a newer release migrated (`SchemaAhead`). The `alembic_version` table is the record;
`schema_migrations` stays frozen at 5 for nodes of that release, which read it (README.md here).

Rolling upgrades: each upgrade records the serving floor (`serving_floor`, in the `settings` row
FLOOR_SETTING), the oldest revision whose code may serve the schema; code that does not know the
database's revision still serves it while that floor is a revision it knows (`status`:
"ahead-compatible").

The caller owns the transaction: `upgrade` runs every pending revision in it, so on
PostgreSQL (transactional DDL) a failing revision leaves the schema as it was.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from sqlalchemy import Connection, inspect, text

#: The revision that creates the schema of release 7be16ab (legacy `schema_migrations` version 5).
BASELINE = "0001"
#: The last `schema_migrations` version, the one the baseline is equal to.
LEGACY_VERSION = 5
#: The release whose `init-db` brings any older database to LEGACY_VERSION.
LEGACY_RELEASE = "7be16ab"
#: The first key of PostgreSQL's two-key advisory lock that serialises migrations of one schema.
_LOCK_NAMESPACE = 0x50617373  # "Pass"
#: The `settings` row holding the serving floor, a revision id. A contract with the code of every later
#: release, which reads it when a newer release migrated the database: the row's name, its value (a
#: revision id) and the table's `name` and `value` columns never change.
FLOOR_SETTING = "schema-serving-floor"
#: The `status` answers on which this code may serve.
SERVING = ("ok", "ahead-compatible")


class MigrationRefused(Exception):
    """A database this code must not migrate; the message says what to do."""


class SchemaAhead(MigrationRefused):
    """A database a newer release migrated: this code does not know its revision."""

    def __init__(self, revisions: tuple[str, ...]) -> None:
        super().__init__(f"this database's schema is at revision {', '.join(revisions)}, which this release does "
                         "not know (a newer release migrated it): deploy that release")


class MigrationBusy(Exception):
    """Another node held the migration lock for longer than the busy timeout; nothing was changed."""

    def __init__(self) -> None:
        super().__init__("another node is migrating this database (it has held the migration lock for longer than "
                         "PASSERELLE_DB_BUSY_SECONDS): run `flask --app wsgi init-db` again when it has finished")


class LegacySchemaTooOld(MigrationRefused):
    """A database of a release older than the baseline: its own release must migrate it first."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"this database's schema is at legacy version {version}, older than version {LEGACY_VERSION} "
            f"this release can adopt: run `flask --app wsgi init-db` with release {LEGACY_RELEASE} first, "
            "then with this release (deploy/README.md, \"Upgrades\")")
        self.version = version


def config() -> Config:
    """Alembic's configuration for this folder, with no alembic.ini."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    return cfg


@cache
def script() -> ScriptDirectory:
    """The revisions, read once per process."""
    return ScriptDirectory.from_config(config())


@cache
def head() -> str:
    """The newest revision this code knows (the history is linear: one head)."""
    (only,) = script().get_heads()
    return only


@cache
def known() -> frozenset[str]:
    """The ids of every revision this code has (its head and those before it)."""
    return frozenset(revision.revision for revision in script().walk_revisions())


def breaks_code_before(revision: Script) -> str | None:
    """The revision whose code is the oldest that still works once `revision` ran, as `revision`
    declares it: `breaks_older_code = True` (it drops, renames or changes the meaning of something the
    code before it uses) names `revision` itself; `breaks_older_code = "<earlier revision>"` (it
    removes what the code since that revision no longer uses) names that one. None when it declares
    nothing, or False: additive, all older code keeps working."""
    declared = getattr(revision.module, "breaks_older_code", False)
    return revision.revision if declared is True else declared or None


def serving_floor(scripts: ScriptDirectory) -> str:
    """The oldest revision whose code may serve a database at the head of `scripts`: the newest of
    those the revisions' `breaks_code_before` name, else the baseline."""
    order = [revision.revision for revision in scripts.walk_revisions()][::-1]  # oldest first
    named = [point for revision in scripts.walk_revisions() if (point := breaks_code_before(revision))]
    return max(named, key=order.index, default=BASELINE)


def current(conn: Connection) -> tuple[str, ...]:
    """The revisions the database records (empty before the first upgrade or adoption)."""
    return MigrationContext.configure(conn).get_current_heads()


def recorded_floor(conn: Connection) -> str | None:
    """The serving floor the database records (None before the first upgrade of this release or later)."""
    return conn.scalar(text("SELECT value FROM settings WHERE name = :name"), {"name": FLOOR_SETTING})


def up_to_date(conn: Connection) -> bool:
    """Whether the database records this code's head and this code's serving floor."""
    return current(conn) == (head(),) and recorded_floor(conn) == serving_floor(script())


def status(conn: Connection) -> str:
    """"ok" at this code's head; "behind" at older revisions, or none (never migrated). At a
    revision this code does not know (a newer release migrated it): "ahead-compatible" when the
    serving floor the database records is a revision this code knows, so every revision after this
    code's head keeps it working; else "ahead". This code serves on the SERVING answers."""
    revisions = current(conn)
    if revisions == (head(),):
        return "ok"
    if known().issuperset(revisions):
        return "behind"
    return "ahead-compatible" if recorded_floor(conn) in known() else "ahead"


def lock(conn: Connection) -> None:
    """Make every other migration of this database wait until the caller's transaction ends.

    PostgreSQL: a transaction-scoped advisory lock keyed by the schema. SQLite: the caller's
    write transaction (BEGIN IMMEDIATE) already excludes every other writer."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:namespace, hashtext(current_schema()))"),
                     {"namespace": _LOCK_NAMESPACE})


def upgrade(conn: Connection) -> None:
    """Bring the database to `head()` in the caller's transaction, adopting a legacy one first, and
    record its serving floor (`serving_floor`) in the same transaction.

    The caller holds `lock(conn)`. Raises LegacySchemaTooOld for a database older than the baseline,
    SchemaAhead for one newer than this code."""
    if not current(conn) and inspect(conn).has_table("schema_migrations"):
        _adopt(conn)
    if not known().issuperset(current(conn)):
        raise SchemaAhead(current(conn))
    cfg = config()
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")
    conn.execute(text("DELETE FROM settings WHERE name = :name"), {"name": FLOOR_SETTING})
    conn.execute(text("INSERT INTO settings (name, value) VALUES (:name, :value)"),
                 {"name": FLOOR_SETTING, "value": serving_floor(script())})


def _adopt(conn: Connection) -> None:
    """Stamp a database of release LEGACY_RELEASE at the baseline without touching its rows."""
    version = conn.scalar(text("SELECT MAX(version) FROM schema_migrations")) or 0
    if version < LEGACY_VERSION:
        raise LegacySchemaTooOld(version)
    MigrationContext.configure(conn).stamp(script(), BASELINE)
