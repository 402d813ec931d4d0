"""Shared machinery: scales, output tables, app instances, databases, gunicorn and an HTTP load client.

Nothing here measures anything by itself; the sections (one module each) do, through
the product's real entry points: `service.app.create_app`, the `flask --app wsgi` CLI
and gunicorn with `deploy/gunicorn.conf.py`.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
BIN = Path(sys.executable).parent
PG_ADMIN_URL = os.environ.get("PASSERELLE_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SEED = 0


# -- scales ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """How much data and how many requests each section uses."""

    name: str
    ingest_bundles: int          # resources POSTed as transaction Bundles (section 1)
    ingest_ndjson: int           # resources loaded by the CLI `ingest` (section 1)
    ingest_http: bool            # also POST the Bundles through gunicorn (section 1; a server start)
    search_sizes: tuple[int, int]  # stored resources of the small and the large database (section 2)
    http_requests: int           # requests per throughput run (sections 2 and 4)...
    http_seconds: float          # ...or fewer if this many seconds have passed
    latency_requests: int        # sequential requests per latency run (sections 2 and 4)...
    latency_seconds: float       # ...or fewer if this many seconds have passed
    deid_resources: int          # resources de-identified (section 3)
    research_size: int           # stored resources behind the research comparison (section 4)
    export_size: int             # stored resources of the exported database (section 5)
    agg_patients: int            # patients of the aggregate database (section 6)
    agg_observations: int        # Observations kept per patient there (section 6)
    agg_repeats: int             # timed repetitions of each aggregate (section 6)
    agg_timeout: float           # seconds after which one aggregate statement is interrupted (section 6)
    accuracy_draws: int          # noise draws per epsilon (section 6)
    train_sizes: tuple[int, ...]    # patients of the model-training databases (section 8)
    train_repeats: tuple[int, ...]  # $train calls per model and ε at each of those sizes (section 8)
    cli_repeats: int             # timed starts of each command (section 9)


SCALES = {
    # `make bench-quick`: the guarded ratios only, sized to finish within 90 s on 2 idle cores, datasets
    # built from scratch included.
    # The search databases differ 10× in size, so a search that grows linearly fails the 3× guard.
    # Ingest takes ~70 patient Bundles and as many patients' NDJSON (after the ~720 resources every
    # population shares): with five, a rate measured over 0.15 s swung by a third from run to run.
    "quick": Scale(
        "quick", ingest_bundles=5_000, ingest_ndjson=5_000, ingest_http=False, search_sizes=(2_000, 20_000),
        http_requests=100, http_seconds=2, latency_requests=20, latency_seconds=1,
        deid_resources=2_000, research_size=2_000, export_size=2_000,
        agg_patients=1_000, agg_observations=10, agg_repeats=9, agg_timeout=10, accuracy_draws=200,
        train_sizes=(1_000,), train_repeats=(3,), cli_repeats=3),
    "small": Scale(
        "small", ingest_bundles=10_000, ingest_ndjson=10_000, ingest_http=True, search_sizes=(10_000, 100_000),
        http_requests=1_500, http_seconds=5, latency_requests=150, latency_seconds=3,
        deid_resources=10_000, research_size=10_000, export_size=10_000,
        agg_patients=10_000, agg_observations=10, agg_repeats=5, agg_timeout=60, accuracy_draws=2_000,
        train_sizes=(1_000, 10_000), train_repeats=(5, 5), cli_repeats=5),
    "full": Scale(
        "full", ingest_bundles=20_000, ingest_ndjson=100_000, ingest_http=True, search_sizes=(10_000, 1_000_000),
        http_requests=5_000, http_seconds=30, latency_requests=300, latency_seconds=15,
        deid_resources=100_000, research_size=100_000, export_size=100_000,
        agg_patients=100_000, agg_observations=10, agg_repeats=3, agg_timeout=180, accuracy_draws=10_000,
        train_sizes=(1_000, 10_000, 100_000), train_repeats=(5, 5, 3), cli_repeats=7),
}


@dataclass
class Options:
    scale: Scale
    db: str
    load_procs: int = 2
    rebuild: bool = False
    plans: bool = False
    analyze: bool = False


# -- output ------------------------------------------------------------------------------------


def progress(message: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(f"  · {message}", file=sys.stderr, flush=True)


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "—"
        return f"{value:,.{digits}f}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> None:
    """Print one aligned table: text columns left-aligned, figures right-aligned."""
    cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    TABLES.append(Table(title, list(headers), cells, note))
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(not isinstance(row[i], str) or row[i] in ("—", "") or row[i][:1].isdigit()
                   or row[i][:1] in "-+<>≤≥~" for row in rows) and i > 0 for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    print(f"\n{title}")
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))
    if note:
        for text in note.strip().splitlines():
            print(f"  {text}")
    sys.stdout.flush()


@dataclass(frozen=True)
class Guard:
    """A figure with a numeric target that `--fail-factor` checks: `value` ≤ `target` (or ≥ with `at_least`)."""

    value: float  # infinity (or 0 with `at_least`) when the measured call was interrupted
    target: float
    at_least: bool = False

    def worse(self) -> float:
        """How many times worse than its target the value is (≤ 1 when the target is met)."""
        if self.at_least:
            return self.target / self.value if self.value > 0 else float("inf")
        return self.value / self.target


@dataclass
class Verdict:
    section: str
    metric: str
    measured: str
    target: str
    ok: bool | None
    guard: Guard | None = None
    db: str = ""  # stamped by the runner


VERDICTS: list[Verdict] = []


def verdict(section: str, metric: str, measured: str, target: str, ok: bool | None,
            guard: Guard | None = None) -> None:
    VERDICTS.append(Verdict(section, metric, measured, target, ok, guard))


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str
    db: str = ""  # stamped by the runner


TABLES: list[Table] = []  # every table printed, in order (benchmarks.results writes them to RESULTS.md)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return percentile(values, 0.5)


@contextlib.contextmanager
def timer() -> Iterator[Callable[[], float]]:
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


@dataclass
class Measure:
    """Wall time and CPU time of a block: this process, and its children that ended inside it."""

    wall: float = 0.0
    cpu: float = 0.0
    children: float = 0.0


@contextlib.contextmanager
def measure() -> Iterator[Measure]:
    """Time a block on the wall clock and in CPU seconds (robust to a busy machine)."""
    result = Measure()
    wall, cpu = time.perf_counter(), time.process_time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        yield result
    finally:
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result.wall = time.perf_counter() - wall
        result.cpu = time.process_time() - cpu
        result.children = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) a live process has used so far, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


def child_pids(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found.extend(int(p) for p in (task / "children").read_text().split())
    return sorted(set(found))


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# -- databases ---------------------------------------------------------------------------------


def _pg_url(schema: str) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(PG_ADMIN_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def _pg_admin():
    from sqlalchemy import create_engine

    return create_engine(PG_ADMIN_URL)


@dataclass
class Database:
    """One database: a SQLite file or a private PostgreSQL schema."""

    url: str
    kind: str
    path: Path | None = None
    schema: str | None = None


class Backend:
    """Creates databases of one kind and removes every one it created (PostgreSQL schemas)."""

    def __init__(self, kind: str, workdir: Path):
        self.kind = kind
        self.workdir = workdir
        self.schemas: list[str] = []

    def new(self, label: str) -> Database:
        if self.kind == "sqlite":
            path = self.workdir / f"{label}-{secrets.token_hex(3)}.db"
            return Database(f"sqlite:///{path}", "sqlite", path=path)
        from sqlalchemy import text

        schema = f"bench_{label.replace('-', '_')}_{secrets.token_hex(4)}"
        admin = _pg_admin()
        try:
            with admin.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        finally:
            admin.dispose()
        self.schemas.append(schema)
        return Database(_pg_url(schema), "postgresql", schema=schema)

    def copy(self, source: Database, label: str) -> Database:
        """A private, writable copy of a database (a file copy, or INSERT … SELECT per table)."""
        target = self.new(label)
        if self.kind == "sqlite":
            assert source.path is not None and target.path is not None
            checkpoint(source.path)
            shutil.copyfile(source.path, target.path)
            return target
        from sqlalchemy import text

        from service import db as service_db
        from service.store.schema import metadata

        engine = service_db.make_engine(target.url)
        try:
            service_db.migrate(engine)
            with engine.begin() as conn:
                for table in metadata.sorted_tables:
                    conn.execute(text(f'DELETE FROM "{target.schema}"."{table.name}"'))
                    conn.execute(text(f'INSERT INTO "{target.schema}"."{table.name}" '
                                      f'SELECT * FROM "{source.schema}"."{table.name}"'))
                    for column in table.columns:
                        if column.primary_key and column.autoincrement is True:
                            conn.execute(text(
                                f"SELECT setval(pg_get_serial_sequence('\"{target.schema}\".\"{table.name}\"', "
                                f"'{column.name}'), COALESCE((SELECT max({column.name}) FROM "
                                f'"{target.schema}"."{table.name}"), 0) + 1, false)'))
                # This copy's tables only: a bare ANALYZE would also read every other schema of the database.
                conn.execute(text("ANALYZE " + ", ".join(f'"{target.schema}"."{table.name}"'
                                                         for table in metadata.sorted_tables)))
        finally:
            engine.dispose()
        return target

    def drop_all(self) -> None:
        if not self.schemas:
            return
        from sqlalchemy import text

        admin = _pg_admin()
        try:
            for schema in self.schemas:
                with admin.begin() as conn:
                    conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        finally:
            admin.dispose()
        self.schemas.clear()


def postgresql_answers(seconds: int = 3) -> bool:
    """Whether the PostgreSQL server of `--db postgresql` accepts a connection within `seconds`."""
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": seconds})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


def with_statement_timeout(database: Database, seconds: float) -> Database:
    """The same database, reached through a URL whose PostgreSQL sessions cancel statements after `seconds`."""
    if database.kind != "postgresql":
        return database
    from sqlalchemy.engine import make_url

    options = f"-csearch_path={database.schema} -cstatement_timeout={int(seconds * 1000)}"
    url = make_url(database.url).update_query_dict({"options": options}).render_as_string(hide_password=False)
    return Database(url, database.kind, path=database.path, schema=database.schema)


class Watchdog:
    """Interrupts whatever an engine is running once a time limit passes.

    SQLite: `sqlite3.Connection.interrupt()` on every connection the engine opened;
    PostgreSQL: the session's statement_timeout (see `with_statement_timeout`). Either way
    the statement fails, and `fired` tells a timeout from a real error.
    """

    def __init__(self, engine: Any, seconds: float):
        from sqlalchemy import event

        self.seconds = seconds
        self.fired = False
        self.connections: list[Any] = []
        self.sqlite = engine.dialect.name == "sqlite"
        if self.sqlite:
            event.listen(engine, "connect", lambda dbapi, _record: self.connections.append(dbapi))
            engine.dispose()  # connections opened before now would escape the watchdog

    @contextlib.contextmanager
    def limit(self) -> Iterator[None]:
        self.fired = False
        timer = threading.Timer(self.seconds, self._expire)
        timer.daemon = True
        start = time.perf_counter()
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            if not self.sqlite and time.perf_counter() - start >= self.seconds:
                self.fired = True

    def _expire(self) -> None:
        self.fired = True
        for connection in self.connections:
            with contextlib.suppress(Exception):
                connection.interrupt()


def checkpoint(path: Path) -> None:
    """Fold a SQLite WAL back into the main file, so that the file alone is the database."""
    conn = sqlite3.connect(path, timeout=60)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def sqlite_statistics(path: Path, wanted: bool) -> None:
    """Give a SQLite file planner statistics (ANALYZE), or take them away (queries must not need them)."""
    conn = sqlite3.connect(path, timeout=60)
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'sqlite_stat%'")}
        present = "sqlite_stat1" in tables and conn.execute("SELECT count(*) FROM sqlite_stat1").fetchone()[0] > 0
        if wanted and not present:
            conn.execute("ANALYZE")
        elif not wanted and present:
            for table in sorted(tables):
                conn.execute(f"DELETE FROM {table}")
        conn.commit()
    finally:
        conn.close()


def analyze(database: Database) -> None:
    """Refresh planner statistics after a bulk load (what an operator does after one)."""
    from sqlalchemy import create_engine, text

    if database.kind == "sqlite":
        conn = sqlite3.connect(database.path, timeout=60)
        try:
            conn.execute("ANALYZE")
            conn.commit()
        finally:
            conn.close()
        return
    from service.store.schema import metadata

    engine = create_engine(database.url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:  # this database's schema only, not every schema of the server's database
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(
                "ANALYZE " + ", ".join(f'"{database.schema}"."{table.name}"' for table in metadata.sorted_tables)))
    finally:
        engine.dispose()


# -- the application ---------------------------------------------------------------------------


class Instance:
    """The real app on one database, with its own instance directory and master key."""

    def __init__(self, database: Database, directory: Path, **config: Any):
        from policies.keys import ensure_master_key
        from service import db
        from service.app import create_app
        from service.cli.database import record_settings

        self.database = database
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.master_key_file = self.dir / "master.key"
        ensure_master_key(self.master_key_file)
        # No export worker thread in the measuring process: section 5 runs jobs in a process of its own.
        self.config = {"DATABASE_URL": database.url, "INSTANCE_DIR": str(self.dir),
                       "MASTER_KEY_FILE": str(self.master_key_file), "EXPORT_WORKER": "off", **config}
        self.app = create_app(dict(self.config))
        db.migrate(self.engine)
        with self.app.app_context(), db.write(self.engine) as conn:
            # What `init-db` records; a copied database was recorded with its builder's key.
            record_settings(conn, replace_master_key=True)

    @property
    def engine(self):
        return self.app.extensions["passerelle.engine"]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a `flask --app wsgi` command or gunicorn needs to serve this instance."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PASSERELLE_")}
        env.update({"PASSERELLE_DATABASE_URL": self.database.url,
                    "PASSERELLE_MASTER_KEY_FILE": str(self.master_key_file),
                    "PASSERELLE_INSTANCE_DIR": str(self.dir), "PASSERELLE_LOG_LEVEL": "warning"})
        env.update(extra)
        return env

    def register(self, role: str, project_id: str | None = None) -> tuple[str, str]:
        """A new client of `role`; returns (client_id, secret)."""
        from service import db
        from service.auth import register_client

        with self.app.app_context(), db.write(self.engine) as conn:
            client = register_client(conn, f"benchmark {role} {secrets.token_hex(3)}", role, project_id)
        return client["client_id"], client["client_secret"]

    def token(self, credentials: tuple[str, str]) -> str:
        """A bearer token from the real token endpoint (in-process)."""
        response = self.app.test_client().post("/auth/token", data={"grant_type": "client_credentials"},
                                               auth=credentials)
        if response.status_code != 200:
            raise RuntimeError(f"token endpoint answered {response.status_code}: {response.get_data(as_text=True)}")
        return response.get_json()["access_token"]

    def bearer(self, credentials: tuple[str, str]) -> Callable[[], str]:
        """A function giving an `Authorization` header value, its token renewed before it expires
        (tokens live 5 minutes at most)."""
        token: dict[str, Any] = {"value": "", "at": None}

        def header() -> str:
            if token["at"] is None or time.monotonic() - token["at"] > 200:
                token["value"], token["at"] = self.token(credentials), time.monotonic()
            return f"Bearer {token['value']}"

        return header

    def close(self) -> None:
        self.engine.dispose()


# -- gunicorn ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: The shipped settings (deploy/gunicorn.conf.py), with the app preloaded and warmed up in the master, so
#: that the workers it forks (at start, or to replace a killed one) serve at once: a cold worker's start
#: costs seconds of CPU. A forked worker must not use the master's database connections: it drops them
#: from its pool without closing them.
PRELOADED = """
exec(open("deploy/gunicorn.conf.py").read())
preload_app = True


def on_starting(server):
    warm_up()  # deploy/gunicorn.conf.py's, executed above


def post_fork(server, worker):
    server.app.wsgi().extensions["passerelle.engine"].dispose(close=False)
"""


class Gunicorn:
    """`gunicorn -c deploy/gunicorn.conf.py wsgi:app` (`preload`: those settings, preloaded, see `PRELOADED`)
    serving `env` on a free loopback port, in a process group of its own; `with` starts it, waits until it
    serves and stops it."""

    def __init__(self, env: dict[str, str], log: Path, workers: int = 2, preload: bool = False,
                 port: int | None = None, recycle: bool = True):
        self.env = env
        self.workers = workers
        self.preload = preload
        #: False: workers are never recycled (`--max-requests 0`, over the file's `max_requests`).
        self.recycle = recycle
        self.config = "deploy/gunicorn.conf.py"
        if preload:
            self.config = str(log.with_suffix(".conf.py"))
            Path(self.config).write_text(PRELOADED)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = log
        base = env.get("PASSERELLE_BASE_URL", "")
        #: The Host requests must name: the public one behind a proxy (PASSERELLE_BASE_URL), else loopback.
        self.host = urlsplit(base).netloc if base else f"127.0.0.1:{self.port}"

    @classmethod
    def of(cls, instance: Instance, workers: int = 2, **extra_env: str) -> Gunicorn:
        """A server of a benchmark's instance, its log in the instance's directory, whose workers are
        not recycled: a worker replaced during a measured run would take its CPU time with it (the
        run's server CPU could not be read) and put its successor's warm-up into that run."""
        return cls(instance.env(**extra_env), instance.dir / f"gunicorn-{secrets.token_hex(3)}.log", workers,
                   recycle=False)

    def start(self) -> Gunicorn:
        """Start the server; it serves once `wait_ready` returns."""
        env = {**self.env, "PASSERELLE_BIND": f"127.0.0.1:{self.port}", "PASSERELLE_WORKERS": str(self.workers)}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(BIN / "gunicorn"), "-c", self.config, *(() if self.recycle else ("--max-requests", "0")),
                 "wsgi:app"], cwd=ROOT, env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, seconds: float = 90) -> None:
        """Until `/healthz` answers 200; raises (and stops the server) if it does not within `seconds`."""
        assert self.process is not None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}: {self.tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/healthz", headers={"Host": self.host})
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            except OSError:
                pass
            time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"gunicorn did not become ready: {self.tail()}")

    def __enter__(self) -> Gunicorn:
        self.start().wait_ready()
        return self

    def worker_pids(self) -> list[int]:
        assert self.process is not None
        return child_pids(self.process.pid)

    def cpu_snapshot(self) -> dict[int, float]:
        """CPU seconds used so far by each worker process (the master does no request work)."""
        return {pid: cpu for pid in self.worker_pids() if (cpu := process_cpu(pid)) is not None}

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the master and every worker at once, as a crashed machine would stop them."""
        assert self.process is not None
        # The group was created for this gunicorn (start_new_session): its master and workers only.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def __exit__(self, *_exc: Any) -> None:
        """Stop the server the fast way: the work is over, and the database holds everything that counts.

        A process's own exit (the interpreter's teardown of every loaded model) costs seconds, and gunicorn's
        master waits up to graceful_timeout for a worker stuck in a request: the workers are killed. So is a
        preloaded master, which holds the app too and has no exit hook to run (`PRELOADED` makes no metrics
        directory); any other master is sent SIGQUIT, and removes the metrics directory it made."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        if self.preload:
            self.kill()
            return
        workers = self.worker_pids()
        process.send_signal(signal.SIGQUIT)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.kill()


# -- nginx in front of nodes ---------------------------------------------------------------------

#: The configuration a site deploys; `Nginx` runs it, not a configuration of its own.
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
#: The public name the shipped configuration serves (`server_name`), and the nodes' PASSERELLE_BASE_URL.
PUBLIC_NAME = "fhir.example.org"


def self_signed(directory: Path, name: str = PUBLIC_NAME) -> tuple[Path, Path]:
    """A certificate for `name` signed by its own key, valid for a day; returns (certificate, key) paths."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _upstream_servers(conf: str, ports: Sequence[int]) -> str:
    """The `upstream passerelle` block with one `server` line per node port, each keeping the parameters
    (max_fails, fail_timeout, …) of the shipped first line."""
    block = re.search(r"(upstream\s+passerelle\s*\{)(.*?)(\n\s*\})", conf, re.S)
    if block is None:
        raise RuntimeError(f"{NGINX_CONF} has no `upstream passerelle {{ … }}` block")
    lines = block.group(2).split("\n")
    servers = [i for i, line in enumerate(lines) if re.match(r"\s*server\s+\S+", line)]
    if not servers:
        raise RuntimeError(f"{NGINX_CONF}: `upstream passerelle` names no server")
    template = lines[servers[0]]
    mine = [re.sub(r"(server\s+)\S+?(;|\s)", lambda m, p=port: f"{m.group(1)}127.0.0.1:{p}{m.group(2)}", template,
                   count=1) for port in ports]
    kept = [line for i, line in enumerate(lines) if i not in servers]
    body = "\n".join(kept[:servers[0]] + mine + kept[servers[0]:])
    return conf[:block.start(2)] + body + conf[block.end(2):]


def nginx_conf(conf: str, upstreams: Sequence[int], http_port: int, https_port: int, certificate: Path,
               key: Path, directory: Path, root: bool) -> str:
    """The shipped configuration, changed only where a test machine differs from the site: the upstream
    servers (these loopback ports), the listening addresses (loopback ports, no IPv6), the certificate
    and key paths, the access log (in `directory`, where a test reads which node answered), the error
    log (the file `-g` names for startup messages too) and, unless
    nginx runs as `root`, where it buffers bodies (in `directory` too)."""
    rewritten = _upstream_servers(conf, upstreams)
    rewritten = re.sub(r"listen\s+\[::\]:(80|443)\b[^;]*;", "# (IPv6 listener left out)", rewritten)
    rewrites = [(r"listen\s+80\s*;", f"listen 127.0.0.1:{http_port};"),
                (r"listen\s+443(\s+[^;]*)?;", lambda m: f"listen 127.0.0.1:{https_port}{m.group(1) or ''};"),
                (r"ssl_certificate\s+\S+;", f"ssl_certificate {certificate};"),
                (r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};"),
                (r"access_log\s+/\S+", f"access_log {directory / 'access.log'}"),
                (r"error_log\s+/\S+", f"error_log {directory / 'error.log'}")]
    for pattern, replacement in rewrites:
        rewritten, found = re.subn(pattern, replacement, rewritten)
        if not found:
            raise RuntimeError(f"{NGINX_CONF} has no line matching {pattern!r}")
    if not root:
        paths = "".join(f"    {kind}_temp_path {directory / 'temp' / kind};\n"
                        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        rewritten = re.sub(r"http\s*\{\n", lambda m: m.group(0) + paths, rewritten, count=1)
    return rewritten


class Nginx:
    """nginx running the shipped `deploy/nginx.conf` (see `nginx_conf`) in front of nodes on loopback
    ports, with a self-signed certificate for `PUBLIC_NAME`; `with` starts it and stops it."""

    def __init__(self, directory: Path, upstreams: Sequence[int]):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.certificate, key = self_signed(self.dir)
        self.http_port, self.https_port = free_port(), free_port()
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(nginx_conf(NGINX_CONF.read_text(), upstreams, self.http_port, self.https_port,
                                        self.certificate, key, self.dir, os.geteuid() == 0))
        self.process: subprocess.Popen[bytes] | None = None

    def _command(self, *extra: str) -> list[str]:
        directives = f"pid {self.dir / 'nginx.pid'}; error_log {self.dir / 'error.log'} warn; daemon off;"
        return [shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(self.dir), "-c", str(self.conf),
                "-g", directives, *extra]

    def __enter__(self) -> Nginx:
        checked = subprocess.run(self._command("-t"), capture_output=True, text=True, timeout=30)
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t refused the configuration: {checked.stderr}")
        self.process = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}: {self.errors()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.https_port), timeout=1):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not listen: {self.errors()}")
            time.sleep(0.05)

    def endpoint(self) -> Endpoint:
        """Where clients reach the service: TLS on the proxy's port, verified against the test certificate."""
        context = ssl.create_default_context(cafile=str(self.certificate))
        return Endpoint(self.https_port, PUBLIC_NAME, context)

    def log_size(self) -> int:
        """Where the access log ends now (see `answered_by`)."""
        return (self.dir / "access.log").stat().st_size

    def answered_by(self, since: int, ports: Sequence[int]) -> list[int]:
        """How many of the requests logged after byte `since` of the access log each node port answered (the
        last upstream nginx tried, from the shipped log format's `upstream`)."""
        with (self.dir / "access.log").open("rb") as log:
            log.seek(since)
            last = Counter(orjson.loads(line)["upstream"].split(",")[-1].strip() for line in log.read().splitlines())
        return [last[f"127.0.0.1:{port}"] for port in ports]

    def errors(self) -> str:
        try:
            return "\n".join((self.dir / "error.log").read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return ""

    def __exit__(self, *_exc: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # fast shutdown: the work is over
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


# -- HTTP load ---------------------------------------------------------------------------------


class _TLSConnection(http.client.HTTPConnection):
    """HTTPS to a loopback port, naming `server_name` in SNI and checking the certificate against that name."""

    default_port = 443

    def __init__(self, port: int, server_name: str, context: ssl.SSLContext, timeout: float):
        super().__init__("127.0.0.1", port, timeout=timeout)
        self.server_name, self.tls = server_name, context

    def connect(self) -> None:
        super().connect()
        self.sock = self.tls.wrap_socket(self.sock, server_hostname=self.server_name)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(frozen=True)
class Endpoint:
    """Where requests go: a loopback port, over plain HTTP or TLS (`tls`, the certificate checked against
    `host`); `host`, when given, is the Host every request names."""

    port: int
    host: str | None = None
    tls: ssl.SSLContext | None = None

    def connect(self, timeout: float = 300) -> http.client.HTTPConnection:
        if self.tls is None:
            return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        assert self.host is not None
        return _TLSConnection(self.port, self.host, self.tls, timeout)

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**({"Host": self.host} if self.host else {}), **(extra or {})}

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = 60) -> Reply:
        """One request on a connection of its own."""
        conn = self.connect(timeout)
        try:
            conn.request(method, path, body=body, headers=self.headers(headers))
            response = conn.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            conn.close()


@dataclass
class Request:
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies_ms: list[float]
    statuses: Counter
    bytes: int
    concurrency: int
    sample_error: str = ""
    bodies: list[bytes] = field(default_factory=list)
    server_cpu: float | None = None  # CPU seconds the gunicorn workers spent (None if a worker was replaced)

    @property
    def server_ms(self) -> float | None:
        """Server CPU milliseconds per request: the capacity figure a busy machine does not distort."""
        return None if self.server_cpu is None else self.server_cpu / self.requests * 1000

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else float("nan")

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)


def path_with(path: str, params: Sequence[tuple[str, str]]) -> str:
    return f"{path}?{urlencode(params)}" if params else path


def http_load(target: int | Endpoint, requests: Sequence[Request], concurrency: int, headers: dict[str, str],
              keep_bodies: int = 0, server: Gunicorn | None = None, max_seconds: float | None = None
              ) -> LoadResult:
    """Send every request once over keep-alive connections from `concurrency` threads; time the whole run.

    With `max_seconds`, no request starts after that time (the result counts those done).
    With `server`, the CPU its workers spent during the run is measured too (from /proc).
    `target`: a loopback port (plain HTTP) or an `Endpoint`.
    """
    endpoint = target if isinstance(target, Endpoint) else Endpoint(target)
    lock = threading.Lock()
    position = iter(range(len(requests)))
    latencies: list[float] = []
    statuses: Counter = Counter()
    received = [0]
    errors: list[str] = []
    bodies: list[bytes] = []
    deadline = [float("inf")]

    def worker() -> None:
        conn = endpoint.connect()
        local: list[float] = []
        local_status: Counter = Counter()
        size = 0
        while True:
            with lock:
                index = next(position, None) if time.perf_counter() < deadline[0] else None
            if index is None:
                break
            item = requests[index]
            merged = endpoint.headers({**headers, **item.headers})
            for attempt in range(3):
                start = time.perf_counter()
                try:
                    conn.request(item.method, item.path, body=item.body, headers=merged)
                    response = conn.getresponse()
                    data = response.read()
                    break
                except (http.client.HTTPException, OSError):
                    # A worker recycled (max_requests) or a keep-alive connection timed out: reconnect.
                    conn.close()
                    conn = endpoint.connect()
                    if attempt == 2:
                        raise
            local.append((time.perf_counter() - start) * 1000)
            local_status[response.status] += 1
            size += len(data)
            if not 200 <= response.status < 300 and not errors:
                errors.append(f"{item.method} {item.path[:120]} → {response.status}: {data[:300]!r}")
            if keep_bodies and len(bodies) < keep_bodies:
                with lock:
                    bodies.append(data)
        conn.close()
        with lock:
            latencies.extend(local)
            statuses.update(local_status)
            received[0] += size

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    before = server.cpu_snapshot() if server else {}
    start = time.perf_counter()
    if max_seconds is not None:
        deadline[0] = start + max_seconds
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    server_cpu = None
    if server:
        after = server.cpu_snapshot()
        if before and set(after) == set(before):
            server_cpu = sum(after[pid] - before[pid] for pid in after)
    return LoadResult(len(latencies), seconds, latencies, statuses, received[0], concurrency,
                      errors[0] if errors else "", bodies, server_cpu)


def http_token(port: int, credentials: tuple[str, str]) -> str:
    """A bearer token from the server's token endpoint (HTTP Basic)."""
    import base64

    basic = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/auth/token", body="grant_type=client_credentials",
                     headers={"Authorization": f"Basic {basic}",
                              "Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"token endpoint answered {response.status}: {data[:300]!r}")
    return orjson.loads(data)["access_token"]


def entries_of(bodies: Sequence[bytes]) -> float:
    """Mean number of entries in searchset Bundles (1 for a plain resource): proves searches match."""
    counts = []
    for body in bodies:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            continue
        counts.append(len(parsed.get("entry", ())) if parsed.get("resourceType") == "Bundle" else 1)
    return sum(counts) / len(counts) if counts else float("nan")


# -- workspace -------------------------------------------------------------------------------


def fingerprint() -> str:
    """Changes when anything that shapes a stored dataset changes (schema, indexer, generator)."""
    digest = hashlib.sha256()
    files = [ROOT / "service/store/schema.py", ROOT / "service/store/indexer.py",
             ROOT / "service/store/searchparams.py", ROOT / "service/store/repository.py",
             ROOT / "policies/sensitivity.py", ROOT / "service/db.py",
             *sorted((ROOT / "service/synthetic").glob("*.py"))]
    for path in files:
        with contextlib.suppress(OSError):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:10]


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="passerelle-bench-"))
