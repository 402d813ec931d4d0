"""`GET /metrics` in Prometheus' text format: what an operator watches, and nothing about a patient.

Events are counted by each process: requests answered by route template, method and status, and
their durations; resource versions written and Consent versions written, by path (`api`: while
serving an HTTP request, the portal's included; `cli`: a command), counted when their transaction
commits (a rolled-back write, or a batch entry whose savepoint is rolled back, counts nothing); the
database pool's connections in use and its size. Under gunicorn every worker counts in files of
PROMETHEUS_MULTIPROC_DIR (set by deploy/gunicorn.conf.py before the workers start) and a scrape
sums the workers' files; without it a scrape serves the scraping process's own counts.
What the database holds is read at each scrape, with one query each, so that every node reports
the same: export jobs by state, ε allotted and spent per project, the audit chain's length.

No label holds a value a request carries: a route is its template (`/fhir/<resource_type>/<resource_id>`)
or `UNMATCHED`, a method outside `METHODS` is `other`; a project is the server-assigned id of its
ResearchStudy (consent/projects.py), never a patient's.

Access (`refuse_unless_allowed`): a direct connection from loopback (`direct_from_loopback`: no proxy
relayed it, as service/proxy.py `relayed` says), or
the metrics bearer token (`flask --app wsgi metrics token`), whose keyed hash the `settings` table
holds, so that every node sharing the database accepts the same token. Anything else: 401. Scrapes
are not audited: they read no patient's data, and an entry every few seconds per node would
lengthen the chain and contend for its head with every audited request.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import weakref
from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from typing import Any

from flask import Blueprint, Flask, Response, current_app, has_request_context, request
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine, delete, event, func, insert, select
from sqlalchemy.pool import QueuePool

from policies.budget import MICRO
from policies.keys import derive_key
from service import db, keyring, logs, proxy
from service.errors import Unauthorized
from service.store import jobs, repository
from service.store.schema import audit_head, budgets, export_jobs, settings

bp = Blueprint("metrics", __name__)

#: Read when this module is imported, as prometheus-client reads it when it is (both are imported together).
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ
#: The route label of a request no route matched (a 404 or 405 of the routing layer).
UNMATCHED = "unmatched"
#: Methods labelled as they are; any other a client invents is `other`.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The `settings` row holding the metrics token's keyed hash.
TOKEN_SETTING = "metrics-token-hash"

disable_created_metrics()  # no `_created` series: a scrape under gunicorn has none either
_EVENTS = CollectorRegistry()
_REQUESTS = Counter("passerelle_http_requests", "HTTP requests answered, by route template, method and status",
                    ["route", "method", "status"], registry=_EVENTS)
_DURATION = Histogram("passerelle_http_request_duration_seconds",
                      "Time to answer an HTTP request (to its last hook, a streamed body excluded), by route template "
                      "and method", ["route", "method"], registry=_EVENTS,
                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
_WRITTEN = Counter("passerelle_resources_written", "Resource versions written (created, updated or deleted) and "
                   "committed, by path: api (HTTP requests) or cli (commands)", ["path"], registry=_EVENTS)
_CONSENTS = Counter("passerelle_consent_changes", "Consent versions written and committed (the portal, paper "
                    "forms, the API, Bundles), by path: api or cli", ["path"], registry=_EVENTS)
_POOL_IN_USE = Gauge("passerelle_db_pool_connections_in_use", "Database connections checked out of the pool (the "
                     "live processes of the node, summed)", registry=_EVENTS, multiprocess_mode="livesum")
_POOL_SIZE = Gauge("passerelle_db_pool_size", "Connections the database pool keeps open, overflow excluded (the "
                   "live processes of the node, summed)", registry=_EVENTS, multiprocess_mode="livesum")
_PATHS = ("api", "cli")
for _path in _PATHS:  # every series exists from the start, at zero
    _WRITTEN.labels(_path)
    _CONSENTS.labels(_path)
_PENDING = "passerelle.metrics.pending"


# -- access ------------------------------------------------------------------------------------


def direct_from_loopback(environ: Mapping[str, Any]) -> bool:
    """Pure: whether the request of WSGI `environ` came straight from this host: no proxy relayed
    it (a request nginx relays from anywhere has a loopback peer too), whether or not that proxy is
    trusted, and its peer is a loopback address."""
    if proxy.relayed(environ):
        return False
    try:
        return ipaddress.ip_address(environ.get("REMOTE_ADDR") or "").is_loopback
    except ValueError:
        return False


def _token_hash(token: str) -> str:
    """HMAC-SHA256 of the token under a key derived from the master key (one per process), which
    every node of the database holds."""
    cache = current_app.extensions.setdefault("passerelle.keys", {})
    if "metrics-token" not in cache:
        cache["metrics-token"] = derive_key(keyring.master(), "metrics-token")
    return hmac.new(cache["metrics-token"], token.encode(), hashlib.sha256).hexdigest()


def new_token(conn: Connection) -> str:
    """Make a new metrics token, store its keyed hash (the previous token stops working) and return it:
    the only time it is seen."""
    token = secrets.token_urlsafe(32)
    revoke_token(conn)
    conn.execute(insert(settings).values(name=TOKEN_SETTING, value=_token_hash(token)))
    return token


def revoke_token(conn: Connection) -> bool:
    """Forget the metrics token (then only loopback may scrape); whether there was one."""
    return conn.execute(delete(settings).where(settings.c.name == TOKEN_SETTING)).rowcount > 0


def _token_accepted(conn: Connection, authorization: str) -> bool:
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return False
    stored = conn.scalar(select(settings.c.value).where(settings.c.name == TOKEN_SETTING))
    return stored is not None and hmac.compare_digest(stored, _token_hash(presented.strip()))


def refuse_unless_allowed(conn: Connection) -> None:
    """401 unless the request came straight from loopback or carries the metrics token."""
    if direct_from_loopback(request.environ):
        return
    if not _token_accepted(conn, request.headers.get("Authorization", "")):
        raise Unauthorized("/metrics answers a direct connection from this host, or the metrics token as a bearer "
                           "token (`flask --app wsgi metrics token` makes one); this request has neither")


# -- what the database holds, read at each scrape ------------------------------------------------


def _database_families(conn: Connection) -> list[Metric]:
    states = GaugeMetricFamily("passerelle_export_jobs", "Bulk export jobs, by state", labels=["state"])
    counted = dict.fromkeys(jobs.STATES, 0)
    counted.update(conn.execute(select(export_jobs.c.state, func.count()).group_by(export_jobs.c.state)).all())
    for state, count in counted.items():
        states.add_metric([state], count)
    spent = GaugeMetricFamily("passerelle_budget_epsilon_spent", "Privacy budget (ε) spent, by project",
                              labels=["project"])
    total = GaugeMetricFamily("passerelle_budget_epsilon_total", "Privacy budget (ε) allotted, by project",
                              labels=["project"])
    for row in conn.execute(select(budgets.c.project_id, budgets.c.spent_micro, budgets.c.total_micro)):
        spent.add_metric([row.project_id], row.spent_micro / MICRO)
        total.add_metric([row.project_id], row.total_micro / MICRO)
    length = conn.scalar(select(audit_head.c.seq).where(audit_head.c.id == 1)) or 0
    chain = GaugeMetricFamily("passerelle_audit_entries", "Entries of the audit chain", value=length)
    return [states, spent, total, chain]


class _Families(Collector):
    """A collector of metric families read beforehand."""

    def __init__(self, families: Iterable[Metric]):
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


@bp.get("/metrics")
def scrape() -> Response:
    with db.read() as conn:
        refuse_unless_allowed(conn)
        families = _database_families(conn)
    registry = CollectorRegistry()
    registry.register(MultiProcessCollector(None) if MULTIPROCESS else _EVENTS)
    registry.register(_Families(families))
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_PLAIN_0_0_4,
                    headers={"Cache-Control": "no-store"})


# -- counting ----------------------------------------------------------------------------------


def _observe(response: Response) -> Response:
    rule = request.url_rule
    route = rule.rule if rule is not None else UNMATCHED
    method = request.method if request.method in METHODS else "other"
    _REQUESTS.labels(route, method, str(response.status_code)).inc()
    _DURATION.labels(route, method).observe(logs.elapsed())
    return response


def _written(conn: Connection, stored: list[repository.Stored], _changes: Any) -> None:
    """repository.AFTER_WRITE: note the versions written, counted if their transaction commits."""
    pending = conn.info.setdefault(_PENDING, [Tally()])[-1]
    path = "api" if has_request_context() else "cli"
    pending[(_WRITTEN, path)] += len(stored)
    pending[(_CONSENTS, path)] += sum(1 for version in stored if version.type == "Consent")


#: The engines `_watch` counts on: an engine shared by several apps (create_app's `engine`) is counted once.
_WATCHED: weakref.WeakSet[Engine] = weakref.WeakSet()


def _watch(engine: Engine) -> None:
    """Count on `engine`'s commits what its transactions noted, and its pool's checkouts (once per engine)."""
    if engine in _WATCHED:
        return
    _WATCHED.add(engine)

    def committed(conn: Connection) -> None:
        totals: Tally[tuple[Counter, str]] = Tally()
        for level in conn.info.pop(_PENDING, ()):
            totals.update(level)
        for (counter, path), amount in totals.items():
            if amount:
                counter.labels(path).inc(amount)

    def rolled_back(conn: Connection) -> None:
        conn.info.pop(_PENDING, None)

    def savepoint(conn: Connection, _name: str) -> None:
        conn.info.setdefault(_PENDING, [Tally()]).append(Tally())

    def savepoint_released(conn: Connection, _name: str, _context: Any) -> None:
        levels = conn.info.get(_PENDING)
        if levels and len(levels) > 1:
            levels[-2].update(levels.pop())

    def savepoint_rolled_back(conn: Connection, _name: str, _context: Any) -> None:
        levels = conn.info.get(_PENDING)
        if levels and len(levels) > 1:
            levels.pop()

    def checkout(*_args: Any) -> None:
        _POOL_IN_USE.inc()
        _POOL_SIZE.set(engine.pool.size() if isinstance(engine.pool, QueuePool) else 0)

    def checkin(*_args: Any) -> None:
        _POOL_IN_USE.dec()

    for name, listener in (("commit", committed), ("rollback", rolled_back), ("savepoint", savepoint),
                           ("release_savepoint", savepoint_released),
                           ("rollback_savepoint", savepoint_rolled_back), ("checkout", checkout),
                           ("checkin", checkin)):
        event.listen(engine, name, listener)


def init_app(app: Flask) -> None:
    """Count `app`'s requests (register right after service/logs.py: the last hook but the log line's,
    so the final status is counted) and its database's writes and connections."""
    app.after_request(_observe)
    _watch(app.extensions["passerelle.engine"])
    if _written not in repository.AFTER_WRITE:
        repository.AFTER_WRITE.append(_written)
