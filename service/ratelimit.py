"""Fixed-window rate limits on the `rate_limits` table, shared by every worker and node.

A bucket names what is counted (e.g. `portal-sign-in:<address>`); its window opens at its
first hit and lasts `window_seconds`; the hit that opens a new window counts as its first.
A client's address is the one the trusted reverse proxy names (`service.proxy.client_address`;
an IPv6 client's /64), so that behind a proxy each client is counted apart, and a client cannot
choose its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, case, delete
from sqlalchemy.dialects import postgresql, sqlite

from service.store.schema import rate_limits

_SECOND_US = 1_000_000


def _hit_statement(module: Any) -> Any:
    """The upsert `hit` runs, with its values as parameters (built once per dialect, so its
    compiled form is reused)."""
    now, expired = bindparam("now_us"), rate_limits.c.window_start <= bindparam("opened_before")
    return module.insert(rate_limits).values(
        bucket=bindparam("bucket"), window_start=now, count=1).on_conflict_do_update(
        index_elements=[rate_limits.c.bucket],
        set_={"count": case((expired, 1), else_=rate_limits.c.count + 1),
              "window_start": case((expired, now), else_=rate_limits.c.window_start)},
    ).returning(rate_limits.c.count, rate_limits.c.window_start)


_HIT = {module.dialect.name: _hit_statement(module) for module in (postgresql, sqlite)}


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    count: int
    #: Seconds until the bucket's window closes (at least 1).
    retry_after: int


def hit(conn: Connection, bucket: str, limit: int, window_seconds: int, now_us: int) -> Verdict:
    """Count one hit on `bucket`; allowed while the window holds at most `limit` hits.

    One atomic upsert, so concurrent hits (any worker, any node) are each counted once.
    """
    window_us = window_seconds * _SECOND_US
    count, window_start = conn.execute(_HIT[conn.dialect.name], {
        "bucket": bucket, "now_us": now_us, "opened_before": now_us - window_us}).one()
    retry_after = max(1, -(-(window_start + window_us - now_us) // _SECOND_US))
    return Verdict(count <= limit, count, retry_after)


def prune(conn: Connection, prefix: str, window_seconds: int, now_us: int) -> int:
    """Delete the buckets named `prefix…` whose window (of `window_seconds`) has closed; returns how many."""
    return conn.execute(delete(rate_limits).where(
        rate_limits.c.bucket.startswith(prefix, autoescape=True),
        rate_limits.c.window_start <= now_us - window_seconds * _SECOND_US)).rowcount
