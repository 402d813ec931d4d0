"""Schema migrations (service/store/migrations): the revisions build exactly the live table
definitions, `init-db` follows them once however many nodes run it at once, and refuses a
database it must not migrate. (A populated database of the previous release: see
tests/test_upgrade_previous_release.py.)"""
from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from flask import Flask
from sqlalchemy import inspect, select, text

from consent import projects
from policies.keys import ensure_master_key, fingerprint, load_master_key
from service import db, keyring
from service.app import create_app
from service.store import migrations
from service.store.schema import metadata, project_keys

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database no release has touched: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("pg_unmigrated_schema")


def differences(engine) -> list:
    """What alembic's autogenerate would change to make the database equal the live table definitions."""
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def test_the_revisions_build_exactly_the_live_table_definitions(database_url: str):
    """Fails when a table definition changes without a revision: run `python -m service.store.migrations`."""
    engine = db.make_engine(database_url)
    assert differences(engine) == []
    engine.dispose()


def test_the_revisions_give_each_column_the_collation_of_its_definition(database_url: str):
    """Byte-wise ("C") collations, which alembic's comparison does not look at, are part of the schema too."""
    engine = db.make_engine(database_url)
    with engine.connect() as conn:
        reflected = {(table, column["name"]): getattr(column["type"], "collation", None)
                     for table in inspect(conn).get_table_names() for column in inspect(conn).get_columns(table)}
    engine.dispose()
    defined = {(table.name, column.name): getattr(column.type.dialect_impl(engine.dialect), "collation", None)
               for table in metadata.sorted_tables for column in table.columns}
    assert {key: reflected.get(key) for key in defined} == defined


def test_no_revision_imports_the_live_table_definitions():
    """A revision is frozen: built from the code of the day, a later change of the definitions would rewrite it."""
    ours = ("service", "consent", "policies")
    imported = {}
    for path in sorted((Path(migrations.__file__).parent / "versions").glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = ({alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
                   | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)})
        imported[path.name] = sorted(module for module in modules if module.split(".")[0] in ours)
    assert imported and all(not modules for modules in imported.values()), imported


def test_migrating_an_up_to_date_database_records_the_newest_revision_once(app: Flask):
    engine = app.extensions["passerelle.engine"]
    assert db.migrate(engine) == migrations.head()
    with db.read(engine) as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [migrations.head()]
        assert migrations.status(conn) == "ok"


def test_a_new_database_records_legacy_version_5_for_nodes_of_the_previous_release(empty_database_url: str):
    """Release 7be16ab reads `schema_migrations`: on a database this release made it finds its own schema."""
    engine = db.make_engine(empty_database_url)
    db.migrate(engine)
    with db.read(engine) as conn:
        versions = conn.execute(text("SELECT version FROM schema_migrations ORDER BY version")).scalars().all()
    engine.dispose()
    assert versions == [1, 2, 3, 4, 5]


#: A node's `init-db`, started when the test says "go" (after every node has loaded the app), so they overlap.
_NODE = """
import sys
from service.app import create_app
app = create_app()
print("ready", flush=True)
sys.stdin.readline()
result = app.test_cli_runner().invoke(args=["init-db"])
print(result.output, result.exception or "", file=sys.stderr)
sys.exit(result.exit_code)
"""


def _init_db_processes(url: str, tmp_path: Path, count: int) -> list[subprocess.CompletedProcess]:
    """`init-db` from `count` processes at the same moment, as nodes of one deployment."""
    key_file = tmp_path / "master.key"
    ensure_master_key(key_file)  # every node has the deployment's key installed
    env = {**os.environ, "PASSERELLE_DATABASE_URL": url, "PASSERELLE_MASTER_KEY_FILE": str(key_file),
           "PASSERELLE_INSTANCE_DIR": str(tmp_path / "instance")}
    started = [subprocess.Popen([sys.executable, "-c", _NODE], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)]
    for process in started:
        assert process.stdout.readline().strip() == "ready", process.communicate()[1]
    finished = []
    for process in started:
        process.stdin.write("go\n")
        process.stdin.flush()
    for process in started:
        stdout, stderr = process.communicate(timeout=120)
        finished.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return finished


def test_init_db_run_by_three_nodes_at_once_leaves_one_correct_schema(empty_database_url: str, tmp_path: Path):
    finished = _init_db_processes(empty_database_url, tmp_path, 3)
    assert [run.returncode for run in finished] == [0, 0, 0], [run.stderr for run in finished]
    engine = db.make_engine(empty_database_url)
    assert differences(engine) == []
    with db.read(engine) as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [migrations.head()]
        assert conn.execute(text("SELECT COUNT(*) FROM schema_migrations")).scalar() == 5
        recorded = keyring.recorded_fingerprint(conn)
    engine.dispose()
    assert recorded == fingerprint(load_master_key(tmp_path / "master.key"))


@pytest.mark.parametrize("floor", ["this code's head", "from_a_newer_release"])
def test_init_db_refuses_a_database_a_newer_release_migrated_and_changes_nothing(app: Flask, floor: str):
    """Whether or not this code may still serve it (its serving floor), it must not migrate it."""
    floor = migrations.head() if floor == "this code's head" else floor
    with app.app_context(), db.write() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'from_a_newer_release'"))
        conn.execute(text("UPDATE settings SET value = :floor WHERE name = :name"),
                     {"floor": floor, "name": migrations.FLOOR_SETTING})
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 1
    assert "newer release" in result.output and "nothing was changed" in result.output
    assert "Traceback" not in result.output
    with app.app_context(), db.read() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "from_a_newer_release"
        assert migrations.recorded_floor(conn) == floor


def test_init_db_run_while_another_node_holds_the_migration_lock_gives_up_in_one_line_changing_nothing(
        empty_database_url: str, tmp_path: Path):
    ensure_master_key(tmp_path / "master.key")
    node = create_app({"TESTING": True, "DATABASE_URL": empty_database_url, "INSTANCE_DIR": str(tmp_path),
                       "MASTER_KEY_FILE": str(tmp_path / "master.key"), "DB_BUSY_SECONDS": 1})
    other = db.make_engine(empty_database_url)
    with db.migration_lock(other):  # another node's init-db, migrating
        result = node.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert "another node is migrating this database" in line and "again when it has finished" in line
    with db.read(other) as conn:
        assert inspect(conn).get_table_names() == []
    other.dispose()
    node.extensions["passerelle.engine"].dispose()


def test_a_new_project_has_its_key_before_any_research_request(app: Flask):
    with app.app_context(), db.write() as conn:
        project_id = projects.create(conn, name="new", tier="record", epsilon=1.0).project_id
    with app.app_context(), db.read() as conn:
        versions = list(conn.execute(select(project_keys.c.version)
                                     .where(project_keys.c.project_id == project_id)).scalars())
    assert versions == [1]


def test_a_new_database_is_behind_until_migrated_then_healthy(empty_database_url: str, tmp_path: Path):
    node = create_app({"TESTING": True, "DATABASE_URL": empty_database_url, "INSTANCE_DIR": str(tmp_path),
                       "MASTER_KEY_FILE": str(tmp_path / "master.key")})
    assert node.test_client().get("/healthz").get_json()["schema"] == "behind"
    db.migrate(node.extensions["passerelle.engine"])
    assert node.test_client().get("/healthz").get_json()["schema"] == "ok"
    node.extensions["passerelle.engine"].dispose()


# --- rolling upgrades: a newer release's revisions and this release's nodes ------------------------------------

#: A revision of a newer release, after this code's head.
_NEWER_REVISION = '''"""A newer release's revision."""
import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{down_revision}"
branch_labels = None
depends_on = None
{declaration}

def upgrade() -> None:
    {upgrade}
'''
#: What each kind of newer revision declares and does: an additive one adds a table; a breaking one renames a table
#: the code before it uses; a contract one drops a table only code older than its previous revision uses.
_CHANGES = {"additive": ("", 'op.create_table("newer_release_notes", sa.Column("id", sa.Integer, primary_key=True))'),
            "breaking": ("breaks_older_code = True", 'op.rename_table("rate_limits", "newer_release_rate_limits")'),
            "contract": ('breaks_older_code = "{down_revision}"', 'op.drop_table("schema_migrations")')}


def newer_release(tmp_path: Path, *kinds: str) -> ModuleType:
    """The migrations package of a release newer than this code: a copy of this one, plus a revision of each
    kind in `kinds` (of _CHANGES), in that order."""
    folder = tmp_path / "newer_release_migrations"
    shutil.copytree(Path(migrations.__file__).parent, folder, ignore=shutil.ignore_patterns("__pycache__"))
    down_revision = migrations.head()
    for kind in kinds:
        revision = f"{int(down_revision) + 1:04d}"
        declaration, change = _CHANGES[kind]
        (folder / "versions" / f"{revision}_{kind}.py").write_text(_NEWER_REVISION.format(
            revision=revision, down_revision=down_revision, upgrade=change,
            declaration=declaration.format(down_revision=down_revision)))
        down_revision = revision
    spec = importlib.util.spec_from_file_location(folder.name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("kinds", "floor"), [
    ((), "this code's floor"), (("additive",), "this code's floor"), (("additive", "additive"), "this code's floor"),
    (("breaking",), "+1"), (("breaking", "additive"), "+1"), (("additive", "breaking"), "+2"),
    (("contract",), "this code's head"), (("additive", "contract"), "+1"), (("breaking", "contract"), "+1"),
    (("additive", "breaking", "contract"), "+2")])
def test_the_serving_floor_is_the_newest_revision_the_code_before_which_a_revision_breaks(
        tmp_path: Path, kinds: tuple[str, ...], floor: str):
    newer = newer_release(tmp_path, *kinds)
    expected = {"this code's floor": migrations.serving_floor(migrations.script()),
                "this code's head": migrations.head(),
                "+1": f"{int(migrations.head()) + 1:04d}", "+2": f"{int(migrations.head()) + 2:04d}"}[floor]
    assert newer.serving_floor(newer.script()) == expected


def test_every_revision_declares_additive_breaking_or_an_earlier_revision_it_breaks_the_code_before():
    """`breaks_older_code` is False, True or the id of an earlier revision (README.md, "Rolling upgrades")."""
    order = [revision.revision for revision in migrations.script().walk_revisions()][::-1]
    declared = {revision.revision: getattr(revision.module, "breaks_older_code", False)
                for revision in migrations.script().walk_revisions()}
    assert {revision: value for revision, value in declared.items()
            if not (isinstance(value, bool) or value in order[:order.index(revision)])} == {}


def test_init_db_records_this_codes_serving_floor(app: Flask):
    assert app.test_cli_runner().invoke(args=["init-db"]).exit_code == 0
    with app.app_context(), db.read() as conn:
        assert migrations.recorded_floor(conn) == migrations.serving_floor(migrations.script())


@pytest.fixture
def node_of_this_release(empty_database_url: str, tmp_path: Path) -> Iterator[Flask]:
    """A node of this release on a database its `init-db` made."""
    node = create_app({"TESTING": True, "DATABASE_URL": empty_database_url, "INSTANCE_DIR": str(tmp_path),
                       "MASTER_KEY_FILE": str(tmp_path / "master.key")})
    result = node.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    yield node
    node.extensions["passerelle.engine"].dispose()


def migrate_with(newer: ModuleType, node: Flask) -> None:
    """What the newer release's `init-db` does to the database the node serves."""
    with db.migration_lock(node.extensions["passerelle.engine"]) as conn:
        newer.upgrade(conn)


def test_a_node_keeps_serving_a_database_a_newer_release_migrated_additively(node_of_this_release: Flask,
                                                                             tmp_path: Path):
    migrate_with(newer_release(tmp_path, "additive"), node_of_this_release)
    client = node_of_this_release.test_client()
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "database": "ok", "key": "ok", "schema": "ahead-compatible"}
    assert client.get("/fhir/metadata").status_code == 200


def test_a_node_keeps_serving_a_database_a_newer_release_removed_what_only_older_code_used(
        node_of_this_release: Flask, tmp_path: Path):
    migrate_with(newer_release(tmp_path, "contract"), node_of_this_release)
    response = node_of_this_release.test_client().get("/healthz")
    assert response.status_code == 200 and response.get_json()["schema"] == "ahead-compatible"


def test_a_node_stops_serving_a_database_a_newer_release_migrated_breaking_older_code(node_of_this_release: Flask,
                                                                                      tmp_path: Path):
    migrate_with(newer_release(tmp_path, "breaking", "additive"), node_of_this_release)
    client = node_of_this_release.test_client()
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["schema"] == "ahead"
    assert client.get("/fhir/metadata").status_code == 503
    result = node_of_this_release.test_cli_runner().invoke(args=["settings", "show"])
    assert result.exit_code == 1 and "schema: ahead" in result.output
