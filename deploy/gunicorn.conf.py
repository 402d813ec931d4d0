"""Gunicorn settings for Passerelle: `gunicorn -c deploy/gunicorn.conf.py wsgi:app`.

Every value can be overridden from the environment, so one file serves a laptop
(`make run`) and every node of a deployment (see deploy/README.md):

    PASSERELLE_BIND        host:port to listen on           (default 127.0.0.1:8000)
    PASSERELLE_WORKERS     worker processes                 (default 2)
    PASSERELLE_THREADS     threads per worker               (default 4)
    PASSERELLE_TIMEOUT     seconds before a silent worker is restarted (default 120)
    PASSERELLE_CONTROL_SOCKET       path of gunicorn's control socket for `gunicornc`
                                    (default: none, the socket is disabled)

Workers are independent processes: the application is not preloaded, so each worker
opens its own database pool after the fork (a pool must never cross a fork). Keep
PASSERELLE_THREADS at or below PASSERELLE_DB_POOL_SIZE (default 5).
"""
from __future__ import annotations

import os
from typing import Any


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


bind = [address.strip() for address in os.environ.get("PASSERELLE_BIND", "127.0.0.1:8000").split(",")]
workers = _int("PASSERELLE_WORKERS", 2)
threads = _int("PASSERELLE_THREADS", 4)  # > 1 selects the gthread worker
worker_class = "gthread" if threads > 1 else "sync"
preload_app = False

# Bulk transaction Bundles and $export pages can take a while; a stuck worker still gets recycled.
timeout = _int("PASSERELLE_TIMEOUT", 120)
graceful_timeout = 30
keepalive = 5
# Recycle workers now and then so that a slow leak can never take a node down.
max_requests = 10_000
max_requests_jitter = 1_000

# X-Forwarded-For/-Proto/-Host are applied by the app, from PASSERELLE_FORWARDED_ALLOW_IPS only
# (service/proxy.py): gunicorn trusts no peer with them, so no header is read by two rules.
forwarded_allow_ips = ""
secure_scheme_headers: dict[str, str] = {}
forwarder_headers = ""
limit_request_line = 8190  # long FHIR search URLs

# Logs go to stdout/stderr for the supervisor (systemd journal, container runtime).
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("PASSERELLE_LOG_LEVEL", "info")
# Neither the path nor the query string is logged: search parameters can carry names,
# identifiers and birth dates, and paths carry resource ids. The app's JSON request log
# (service/logs.py) names the route template; the request id joins the two.
access_log_format = '%(h)s %(t)s "%(m)s" %(s)s %(b)s %(L)ss request_id=%({x-request-id}o)s'

proc_name = "passerelle"
# gunicorn's runtime control socket (`gunicornc`) defaults to one path per user, which
# several nodes or checkouts on one host would share; off unless a path is given.
if os.environ.get("PASSERELLE_CONTROL_SOCKET"):
    control_socket = os.environ["PASSERELLE_CONTROL_SOCKET"]
else:
    control_socket_disable = True
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"  # worker heartbeats off the (possibly slow) disk


def warm_up() -> None:
    """Load what requests would otherwise load on first use: what validation reads (every R4B model,
    data types included, and the R4 schema's validator), the capability statement's type list and
    diffprivlib (which the CLI never loads)."""
    import diffprivlib  # noqa: F401 - policies.dp imports it lazily; load it now, not on the first $aggregate

    from service import validation
    from service.api.capability import resource_types

    validation.load()  # not on the first requests that validate
    resource_types()  # not on the first /metadata request


def post_worker_init(worker: Any) -> None:
    """Warm each worker process up (`warm_up`) and start its export worker thread now.

    The app would start that thread on its first request anyway (so `gunicorn wsgi:app`
    without this file runs exports too); starting it here runs queued jobs before any
    request arrives. With PASSERELLE_EXPORT_WORKER=off no thread starts: run
    `flask --app wsgi export-worker` processes instead. Jobs, leases and heartbeats live
    in the database, so any worker of any node may take a job; a worker that dies
    mid-job loses its lease and another one starts it again.
    """
    from service.export import start_worker

    warm_up()
    start_worker(worker.wsgi)


# Metrics (service/metrics.py, `GET /metrics`): each worker counts in files of one directory per
# gunicorn instance, which a scrape sums over the workers. PROMETHEUS_MULTIPROC_DIR names it (emptied
# at start: the counts restart with the instance), else a new one is made and removed at exit. A
# worker reads it when it imports the app: with preload_app, set it in the environment instead.
_made_metrics_dirs: list[str] = []


def on_starting(server: Any) -> None:
    """Give this instance's workers their metrics directory (see above)."""
    import glob
    import tempfile

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        os.makedirs(directory, exist_ok=True)
        for stale in glob.glob(os.path.join(directory, "*.db")):
            os.remove(stale)
    else:
        directory = tempfile.mkdtemp(prefix="passerelle-metrics-",
                                     dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        _made_metrics_dirs.append(directory)


def child_exit(server: Any, worker: Any) -> None:
    """A worker that exits stops counting in the live gauges (its pool's connections); its counts stay."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    import shutil

    for directory in _made_metrics_dirs:
        shutil.rmtree(directory, ignore_errors=True)
