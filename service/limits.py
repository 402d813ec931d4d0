"""Request limits: each one decided here, configured by a `PASSERELLE_*` variable (service/config.py)
and refused with an OperationOutcome before the request does any work.

| limit | config key | refusal |
| --- | --- | --- |
| body size | `MAX_CONTENT_LENGTH` | 413 by Content-Length, or once read past it if none (`LimitedRequest`) |
| JSON nesting depth | `MAX_JSON_DEPTH` | 400, before any validation (`check_depth`, from `parse_body`) |
| query and form parameters | `MAX_SEARCH_PARAMS` | 400 (`check_parameters`, every request) |
| Bundle entries | `MAX_BUNDLE_ENTRIES` | 413 (`check_bundle_entries`, transaction and batch) |
| `_count` | `MAX_PAGE_SIZE` | clamped, not refused (service/store/search.py): FHIR lets a server return fewer |
| requests per client | `TOKEN_RATE_LIMIT`, `RESEARCH_RATE_LIMIT` | 429 + `Retry-After` (`throttle_token`, below) |

Rate limits count in the database (service/ratelimit.py), so they hold across workers and nodes;
each window lasts `RATE_WINDOW_SECONDS`. A research request is counted (`count_research`) in the
transaction that checks its token (service/auth.py `authenticate`).
On PostgreSQL a hit commits without waiting for the disk
(`synchronous_commit = off`: seen by every node at once, forgotten only by a database crash).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any
from urllib.parse import parse_qsl

from flask import Request, current_app, request
from sqlalchemy import Connection, select
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream

from service import db, proxy, ratelimit
from service.errors import InvalidRequest, PayloadTooLarge, TooManyRequests
from service.store.schema import clients

RATE_WINDOW_SECONDS = 60
TOKEN_BUCKET = "token:"
RESEARCH_BUCKET = "research:"


class _BodyWithoutLength(LimitedStream):
    """A request body without Content-Length, read up to `limit` bytes: a read past the limit,
    or reading it all when more than `limit` bytes were sent, raises RequestEntityTooLarge."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        super().__init__(stream, limit, is_max=True)
        self._body = stream

    def readall(self) -> bytes:
        # Werkzeug's readall stops at the limit and returns what it read, as if it were the whole body.
        data = super().readall()
        if self.is_exhausted and self._body.read(1):
            raise RequestEntityTooLarge()
        return data


class LimitedRequest(Request):
    """The app's request class: its body, however a view or a form parser reads it, is refused
    (413) past `max_content_length` (`MAX_CONTENT_LENGTH`, or the lower limit a blueprint sets
    before reading it), with or without a Content-Length."""

    @cached_property
    def stream(self) -> IO[bytes]:
        limit = self.max_content_length
        if (self.shallow or limit is None or self.content_length is not None
                or "wsgi.input_terminated" not in self.environ):
            return super().stream  # Werkzeug checks Content-Length against the limit, or reads no body
        return _BodyWithoutLength(self.environ["wsgi.input"], limit)


def depth(value: Any) -> int:
    """How deeply objects and arrays nest in a parsed JSON value (a scalar: 0); level by level, so any
    depth is measured without recursion."""
    deepest, level = 0, [value]
    while containers := [node for node in level if isinstance(node, (dict, list))]:
        deepest += 1
        level = [child for node in containers for child in (node.values() if isinstance(node, dict) else node)]
    return deepest


def check_depth(value: Any) -> None:
    """Refuse a parsed body nested deeper than `MAX_JSON_DEPTH` (validators recurse: an unbounded
    depth would exhaust the stack)."""
    limit = current_app.config["MAX_JSON_DEPTH"]
    if depth(value) > limit:
        raise InvalidRequest(f"The request body nests objects and arrays deeper than {limit} levels")


_FORM = "application/x-www-form-urlencoded"
_MULTIPART = "multipart/form-data"


def request_params() -> list[tuple[str, str]]:
    """The query string and, for a form POST (`…/_search`), the form body in either encoding a view
    may read it in (urlencoded or multipart): whatever a view may search with."""
    params = list(request.args.items(multi=True))
    if request.method == "POST" and request.mimetype == _FORM:
        # get_data caches the body, so the view can still read it (as data or as request.form).
        params += parse_qsl(request.get_data(as_text=True), keep_blank_values=True)
    elif request.method == "POST" and request.mimetype == _MULTIPART:
        params += request.form.items(multi=True)
    return params


def check_parameters() -> None:
    """The app's before_request: refuse a request with more than `MAX_SEARCH_PARAMS` query
    parameters, counting those of a `POST …/_search` form body too (no other body is read here:
    the consent portal caps its bodies first)."""
    limit = current_app.config["MAX_SEARCH_PARAMS"]
    rule = request.url_rule
    if rule is not None and rule.rule.endswith("/_search"):
        count = len(request_params())  # in whichever encoding the search view may read them
    else:
        count = sum(len(values) for values in request.args.listvalues())
    if count > limit:
        raise InvalidRequest(f"A request may carry at most {limit} parameters; this one has {count}")


def check_bundle_entries(bundle: Any) -> None:
    """Refuse a Bundle with more than `MAX_BUNDLE_ENTRIES` entries."""
    limit = current_app.config["MAX_BUNDLE_ENTRIES"]
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    if isinstance(entries, list) and len(entries) > limit:
        raise PayloadTooLarge(f"A Bundle may hold at most {limit} entries; this one has {len(entries)}",
                              expression="Bundle.entry")


def _throttle(who: Callable[[Connection, int], str], limit: int) -> None:
    """Count one hit on the bucket `who(conn, now)` names, in its own transaction (so that a
    refusal is counted too)."""
    with db.write() as conn:
        now = _counting(conn)
        verdict = ratelimit.hit(conn, who(conn, now), limit, RATE_WINDOW_SECONDS, now)
    refuse_past(verdict, limit)


def _counting(conn: Connection) -> int:
    """Prepare `conn`'s write transaction to count a hit; returns the instant it counts at."""
    if conn.dialect.name == "postgresql":
        # Every node sees the count as soon as it commits; only the wait for the disk is skipped
        # (several milliseconds a request): a database crash may forget the last moment's hits.
        conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
    return db.now_us()


def refuse_past(verdict: ratelimit.Verdict, limit: int) -> None:
    """429 for a hit past the limit (raise it once the hit is committed, so that it counts)."""
    if not verdict.allowed:
        raise TooManyRequests(f"Too many requests: at most {limit} every {RATE_WINDOW_SECONDS} s; "
                              f"retry in {verdict.retry_after} s", headers={"Retry-After": str(verdict.retry_after)})


def throttle_token(claimed: str | None) -> None:
    """Count one token request: of the client it names (`claimed`) when that client is registered,
    else of the requesting address (so unknown ids cannot open fresh buckets); 429 past
    `TOKEN_RATE_LIMIT` a window."""
    def who(conn: Connection, now: int) -> str:
        if claimed and conn.scalar(select(clients.c.client_id).where(clients.c.client_id == claimed)):
            return f"{TOKEN_BUCKET}client:{claimed}"
        # Addresses are unbounded (clients' buckets are not): closed ones are dropped on the way.
        ratelimit.prune(conn, f"{TOKEN_BUCKET}address:", RATE_WINDOW_SECONDS, now)
        return f"{TOKEN_BUCKET}address:{proxy.client_address()}"

    _throttle(who, current_app.config["TOKEN_RATE_LIMIT"])


def count_research(conn: Connection, client_id: str) -> ratelimit.Verdict:
    """Count one request of a research client, in the write transaction that checked its token
    (`auth.authenticate`); refuse it with `refuse_past` past `RESEARCH_RATE_LIMIT` a window,
    once that transaction has committed."""
    return ratelimit.hit(conn, RESEARCH_BUCKET + client_id, current_app.config["RESEARCH_RATE_LIMIT"],
                         RATE_WINDOW_SECONDS, _counting(conn))
