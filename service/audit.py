"""The audit trail: append-only and hash-chained, so any rewrite of history is detectable.

Each entry's hash covers its content and the previous entry's hash. Writers lock the
single `audit_head` row, which keeps the chain linear when several nodes append at
once (SQLite's writer lock does the same). Releases are audited in a short write
transaction before the response leaves (an `$aggregate` answer in the one that records
it): if the audit cannot be written, nothing is released.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import orjson
from sqlalchemy import Connection, bindparam, insert, select, text, update

from service.db import now_us
from service.store.schema import audit, audit_head

GENESIS = "0" * 64
# Built once: an entry is written with parameters only, the statements' compiled forms are reused.
_HEAD = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1).with_for_update()
_MOVE_HEAD = update(audit_head).where(audit_head.c.id == 1).values(seq=bindparam("new_seq"),
                                                                    hash=bindparam("new_hash"))
_APPEND = insert(audit)
# The patients an entry names, in one statement whatever their number: their ids travel as
# one parameter (a JSON array on SQLite, an array on PostgreSQL), not as one row each.
_NAME_PATIENTS = {
    "sqlite": text("INSERT INTO audit_patients (seq, patient_id) SELECT :seq, value FROM json_each(:ids)"),
    "postgresql": text("INSERT INTO audit_patients (seq, patient_id) "
                       "SELECT CAST(:seq AS BIGINT), unnest(CAST(:ids AS TEXT[]))"),
}


def _digest(prev_hash: str, entry: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)).hexdigest()


def record(conn: Connection, *, actor: str, action: str, project_id: str | None, detail: dict[str, Any],
           patients: Iterable[str] = ()) -> int:
    """Append one entry in the caller's write transaction; returns its sequence number."""
    head = conn.execute(_HEAD).first()
    if head is None:
        conn.execute(insert(audit_head).values(id=1, seq=0, hash=GENESIS))
        seq, prev = 1, GENESIS
    else:
        seq, prev = head.seq + 1, head.hash
    entry = {"seq": seq, "ts": now_us(), "actor": actor, "action": action, "project_id": project_id,
             "detail": orjson.dumps(detail, option=orjson.OPT_SORT_KEYS).decode()}
    digest = _digest(prev, entry)
    conn.execute(_APPEND, {**entry, "prev_hash": prev, "hash": digest})
    conn.execute(_MOVE_HEAD, {"new_seq": seq, "new_hash": digest})
    named = sorted(set(patients))
    if named:
        ids = orjson.dumps(named).decode() if conn.dialect.name == "sqlite" else named
        conn.execute(_NAME_PATIENTS[conn.dialect.name], {"seq": seq, "ids": ids})
    return seq


def verify(conn: Connection) -> tuple[bool, int, str]:
    """Recompute the chain; returns (intact, entries checked, message)."""
    prev, count = GENESIS, 0
    for row in conn.execute(select(audit).order_by(audit.c.seq)):
        entry = {"seq": row.seq, "ts": row.ts, "actor": row.actor, "action": row.action,
                 "project_id": row.project_id, "detail": row.detail}
        if row.prev_hash != prev or _digest(prev, entry) != row.hash or row.seq != count + 1:
            return False, count, f"audit entry {row.seq} does not match the chain"
        prev, count = row.hash, count + 1
    head = conn.execute(select(audit_head.c.seq, audit_head.c.hash)).first()
    if head is not None and (head.seq != count or head.hash != prev):
        return False, count, "the audit head does not match the last entry (entries were removed)"
    return True, count, f"{count} entries verified"
