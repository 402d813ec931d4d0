"""Request limits: each one decided here, configured by a `PASSERELLE_*` variable (service/config.py)
and refused with an OperationOutcome before the request does any work.

| limit | config key | refusal |
| --- | --- | --- |
| body size | `MAX_CONTENT_LENGTH` | 413 by Content-Length, or once read past it if none (`LimitedRequest`) |
| JSON nesting depth | `MAX_JSON_DEPTH` | 400, before any validation (`check_depth`, from `parse_body`) |
| query and form parameters | `MAX_SEARCH_PARAMS` | 400 (`check_parameters`, every request) |
| Bundle entries | `MAX_BUNDLE_ENTRIES` | 413 (`check_bundle_entries`, transaction and batch) |
| `_count` | `MAX_PAGE_SIZE` | clamped, not refused (service/store/search.py): FHIR lets a server return fewer |
| requests per client | `TOKEN_RATE_LIMIT`, `RESEARCH_RATE_LIMIT` | 429 + `Retry-After` (`throttle_*`) |

Rate limits count in the database (service/ratelimit.py), so they hold across workers and nodes;
each window lasts `RATE_WINDOW_SECONDS`. On PostgreSQL a hit commits without waiting for the disk
(`synchronous_commit = off`: seen by every node at once, forgotten only by a database crash).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any
from urllib.parse import parse_qsl

from flask import Request, current_app, g, request
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
    """How deeply objects and arrays nest in a parsed JSON value (a scalar: 0); iterative, so any
    depth is measured without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
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
        if conn.dialect.name == "postgresql":
            # Every node sees the count as soon as it commits; only the wait for the disk is skipped
            # (several milliseconds a request): a database crash may forget the last moment's hits.
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
        now = db.now_us()
        verdict = ratelimit.hit(conn, who(conn, now), limit, RATE_WINDOW_SECONDS, now)
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


def throttle_research() -> None:
    """The app's before_request, after authentication: count one request of the research client;
    429 past `RESEARCH_RATE_LIMIT` a window. Other requests are not counted."""
    principal = g.get("principal")
    if request.blueprint == "research" and principal is not None:
        _throttle(lambda _conn, _now: RESEARCH_BUCKET + principal.client_id, current_app.config["RESEARCH_RATE_LIMIT"])
