"""The audit trail: append-only and hash-chained, so any rewrite of history is detectable.

Each entry's hash covers its content and the previous entry's hash. Writers lock the
single `audit_head` row, which keeps the chain linear when several nodes append at
once (SQLite's writer lock does the same). Every access is audited: a read or release in a
short write transaction before the response leaves (an `$aggregate` answer in the one that
records it), so that if the audit cannot be written nothing is released; a write (a Bundle, a
consent, an administrative command, a sign-in) in the transaction that makes it; an API request
that fails, with the status it got. What an entry's `detail` holds is described above `ACTIONS`.

The chain is sealed: every `SEAL_EVERY`-th entry, in the transaction that writes it, and the
head on demand (`seal`, `flask audit seal`), by an HMAC over (seq, hash) under a key derived
from the master key. Whoever can write the database but does not hold the key can rewrite the
chain consistently, but cannot seal it again: `verify` detects that too.
"""
from __future__ import annotations

import getpass
import hashlib
import hmac
import logging
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from flask import Flask, Response, current_app, g, has_request_context, request
from sqlalchemy import ColumnElement, Connection, Select, bindparam, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from policies.keys import derive_key
from service import db, keyring
from service.db import now_us
from service.store.schema import audit, audit_head, audit_seals, patient_sets
from service.validation import model_for

GENESIS = "0" * 64
#: Fixed, not configurable: `verify` requires a seal at every multiple of it.
SEAL_EVERY = 64
# Built once: an entry is written with parameters only, the statements' compiled forms are reused.
_HEAD = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1).with_for_update()
_MOVE_HEAD = update(audit_head).where(audit_head.c.id == 1).values(seq=bindparam("new_seq"),
                                                                    hash=bindparam("new_hash"))
_APPEND = insert(audit)
_READ_HEAD = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)
_CREATE_HEAD = {module.dialect.name: module.insert(audit_head).values(id=1, seq=0, hash=GENESIS)
                .on_conflict_do_nothing() for module in (postgresql, sqlite)}
# The patients an entry names, as a set stored once (schema.py `patient_sets`): whether it is
# stored, by the set id's index; if not, its rows in one statement whatever their number, the
# ids travelling as one parameter (a JSON array on SQLite, an array on PostgreSQL).
_SET_STORED = select(patient_sets.c.set_id).where(patient_sets.c.set_id == bindparam("set_id")).limit(1)
_STORE_SET = {
    "sqlite": text("INSERT INTO patient_sets (set_id, patient_id) SELECT :set_id, value FROM json_each(:ids)"),
    "postgresql": text("INSERT INTO patient_sets (set_id, patient_id) "
                       "SELECT CAST(:set_id AS VARCHAR), unnest(CAST(:ids AS TEXT[]))"),
}


def _digest(prev_hash: str, entry: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)).hexdigest()


def set_id(patients: Iterable[str]) -> str:
    """The id of a set of patients: the first 32 hex digits of the SHA-256 of its distinct ids,
    sorted, as a JSON array (the same for the same set, however listed)."""
    return hashlib.sha256(orjson.dumps(sorted(set(patients)))).hexdigest()[:32]


def record(conn: Connection, *, actor: str, action: str, project_id: str | None, detail: dict[str, Any],
           patients: Iterable[str] = ()) -> int:
    """Append one entry in the caller's write transaction; returns its sequence number. The entry
    names `patients` by their set (stored once, the first time an entry names it), outside the
    entry's digest."""
    head = conn.execute(_HEAD).first()
    if head is None:
        # The first writers may race to create the head: one row results, and each then locks it.
        conn.execute(_CREATE_HEAD[conn.dialect.name])
        head = conn.execute(_HEAD).one()
    seq, prev = head.seq + 1, head.hash
    entry = {"seq": seq, "ts": now_us(), "actor": actor, "action": action, "project_id": project_id,
             "detail": orjson.dumps(_in_context(detail), option=orjson.OPT_SORT_KEYS).decode()}
    digest = _digest(prev, entry)
    named = sorted(set(patients))
    group = set_id(named) if named else None
    conn.execute(_APPEND, {**entry, "prev_hash": prev, "hash": digest, "patients": group})
    conn.execute(_MOVE_HEAD, {"new_seq": seq, "new_hash": digest})
    # Writers hold the head's lock: no other can store the same set between the check and the insert.
    if group is not None and conn.execute(_SET_STORED, {"set_id": group}).first() is None:
        ids = orjson.dumps(named).decode() if conn.dialect.name == "sqlite" else named
        conn.execute(_STORE_SET[conn.dialect.name], {"set_id": group, "ids": ids})
    if seq % SEAL_EVERY == 0:
        _seal(conn, seq, digest)
    return seq


def entries_naming(patients: Iterable[str]) -> ColumnElement[bool]:
    """The condition on `audit` of the entries that name any of these patients."""
    return audit.c.patients.in_(select(patient_sets.c.set_id).where(patient_sets.c.patient_id.in_(list(patients))))


def patients_named_by(*conditions: Any) -> Select[tuple[str]]:
    """The patients named by the entries of `audit` matching `conditions`, one row per set naming them."""
    return select(patient_sets.c.patient_id).where(patient_sets.c.set_id.in_(
        select(audit.c.patients).where(*conditions)))


def patients_named(conn: Connection, seqs: Sequence[int]) -> dict[int, tuple[str, ...]]:
    """The patients each of these entries names, sorted (none for an entry naming none or unknown);
    each distinct set read once."""
    found: dict[int, tuple[str, ...]] = {seq: () for seq in seqs}
    if not seqs:
        return found
    groups = {row.seq: row.patients for row in conn.execute(select(audit.c.seq, audit.c.patients)
                                                             .where(audit.c.seq.in_(seqs)))}
    members: dict[str, list[str]] = {}
    wanted = sorted({group for group in groups.values() if group is not None})
    if wanted:
        for group, patient in conn.execute(select(patient_sets.c.set_id, patient_sets.c.patient_id)
                                           .where(patient_sets.c.set_id.in_(wanted))
                                           .order_by(patient_sets.c.set_id, patient_sets.c.patient_id)):
            members.setdefault(group, []).append(patient)
    for seq, group in groups.items():
        if group is not None:
            found[seq] = tuple(members.get(group, ()))
    return found


class ChainBroken(Exception):
    """`seal` refused: the entries since the last valid seal do not match the chain."""


def seal(conn: Connection) -> int | None:
    """Seal the chain's head in the caller's write transaction (locking it, as writers do), and
    any periodic seal missing below it (a chain written before seals existed); returns the
    sealed sequence number, None for an empty chain. The entries since the last valid seal are
    checked first: a chain that does not match raises `ChainBroken` and nothing is sealed.
    Sealing a sealed head changes nothing."""
    head = conn.execute(_HEAD).first()
    if head is None or head.seq == 0:
        return None
    sealed = {row.seq: row for row in conn.execute(select(audit_seals).where(audit_seals.c.seq <= head.seq))}
    start, prev = 0, GENESIS
    for seq in sorted(sealed, reverse=True):
        stored = conn.scalar(select(audit.c.hash).where(audit.c.seq == seq))
        if stored is not None and _seal_matches(sealed[seq], stored):
            start, prev = seq, stored
            break
    for row in conn.execute(select(audit).where(audit.c.seq > start, audit.c.seq <= head.seq).order_by(audit.c.seq)):
        entry = {"seq": row.seq, "ts": row.ts, "actor": row.actor, "action": row.action,
                 "project_id": row.project_id, "detail": row.detail}
        if row.prev_hash != prev or _digest(prev, entry) != row.hash or row.seq != start + 1:
            raise ChainBroken(f"audit entry {row.seq} does not match the chain: run `audit verify`")
        if row.seq not in sealed and (row.seq % SEAL_EVERY == 0 or row.seq == head.seq):
            _seal(conn, row.seq, row.hash)
        prev, start = row.hash, row.seq
    if start != head.seq or prev != head.hash:
        raise ChainBroken("the audit head does not match the last entry: run `audit verify`")
    return head.seq


def _seal(conn: Connection, seq: int, digest: str) -> None:
    conn.execute(insert(audit_seals).values(seq=seq, ts=now_us(), hash=digest, mac=_mac(seq, digest)))


def _seal_matches(sealed: Any, digest: str) -> bool:
    return sealed.hash == digest and hmac.compare_digest(sealed.mac, _mac(sealed.seq, digest))


def _mac(seq: int, digest: str) -> str:
    key = derive_key(keyring.master(), "audit-seal")
    return hmac.new(key, f"{seq}:{digest}".encode(), hashlib.sha256).hexdigest()


def verify(conn: Connection) -> tuple[bool, int, str]:
    """Recompute the chain up to its head and check its seals; returns (intact, entries checked, message).

    Detects an entry edited, deleted, inserted or moved, a head that does not match the last
    entry, a tail removed back past a seal, a missing or forged seal, and a chain rewritten
    consistently by someone without the key. Entries appended while it runs are not checked.
    """
    # The head first: every entry up to it, and its seal, committed before it moved there, so
    # they are all read below whatever commits meanwhile (READ COMMITTED included).
    head = conn.execute(_READ_HEAD).first()
    top = head.seq if head is not None else 0
    seals = {row.seq: row for row in conn.execute(select(audit_seals))}
    prev, count = GENESIS, 0
    for row in conn.execute(select(audit).where(audit.c.seq <= top).order_by(audit.c.seq)):
        entry = {"seq": row.seq, "ts": row.ts, "actor": row.actor, "action": row.action,
                 "project_id": row.project_id, "detail": row.detail}
        if row.prev_hash != prev or _digest(prev, entry) != row.hash or row.seq != count + 1:
            return False, count, f"audit entry {row.seq} does not match the chain"
        sealed = seals.get(row.seq)
        if sealed is None and row.seq % SEAL_EVERY == 0:
            return False, count, f"audit entry {row.seq} lacks its seal"
        if sealed is not None and not _seal_matches(sealed, row.hash):
            return False, count, f"the seal of audit entry {row.seq} does not match (rewritten chain or other key)"
        prev, count = row.hash, count + 1
    if head is None and conn.scalar(select(audit.c.seq).limit(1)) is not None \
            and conn.execute(_READ_HEAD).first() is None:
        return False, 0, "the audit head is missing"
    if head is not None and (head.seq != count or head.hash != prev):
        return False, count, "the audit head does not match the last entry (entries were removed)"
    # A seal past the head was written since it was read, with its entry: that entry must be there.
    for later in sorted(seq for seq in seals if seq > count):
        stored = conn.scalar(select(audit.c.hash).where(audit.c.seq == later))
        if stored is None or not _seal_matches(seals[later], stored):
            return False, count, f"sealed audit entry {later} is missing (the tail was removed)"
    sealed_up_to = max((seq for seq in seals if seq <= count), default=0)
    return True, count, f"{count} entries verified, sealed up to {sealed_up_to}"


# -- who asked, in which request, with what outcome (the writing side of issue 13) ----------------
#
# Every entry's `detail` (hashed with the entry) carries, besides what the action did:
#   request_id  the HTTP request's id (`X-Request-ID`), on entries written while serving one;
#   outcome     "success", or for a failed API request the HTTP status answered (an int), or for
#               another failure (a refused sign-in) "failure" with a `reason`;
#   type / id / version, types, query, resources, epsilon  as the action has them, the search
#               parameters in `query` with identifying values concealed (`conceal`).
# Actors: an OAuth client id, `cli:<operating-system user>`, `patient:<patient id>` (the portal).

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
#: A request id a client sends is kept if it looks like one; any other is replaced by a new one.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
#: Search parameters whose values identify a person (a name, an identifier, a contact, an address,
#: a birth date, free text): an entry records a keyed hash of each value, never the value itself.
IDENTIFYING_PARAMS = frozenset({"identifier", "name", "family", "given", "phonetic", "telecom", "phone", "email",
                                "address", "birthdate", "_content", "_text", "_filter"})
_PARAM_PARTS = re.compile(r"[.:]")
#: The actions of differentially private answers (`$aggregate`, `$train`): their entries name the
#: patients an answer was computed over, whose records did not leave.
STATISTICAL = frozenset({"aggregate", "train"})
#: The action each API endpoint is audited under: its success where the work is done, its failure here.
ACTIONS = {
    "custodian.search_type": "search", "custodian.read": "read", "custodian.vread": "read",
    "custodian.history": "history", "custodian.create": "create", "custodian.update": "update",
    "custodian.delete": "delete", "custodian.bundle": "bundle",
    "custodian.conditional_update": "update", "custodian.conditional_delete": "delete",
    "custodian.patch_instance": "patch", "custodian.conditional_patch": "patch",
    "custodian.history_type": "history", "custodian.history_system": "history",
    "custodian.patient_everything": "everything-operation",
    "custodian_operations.budget_status": "budget-read", "custodian_operations.budget_raise": "budget-raise",
    "custodian_operations.consent_explain": "consent-explain", "custodian_operations.score": "score",
    "custodian.audit_event_search": "audit-search", "custodian.audit_event_read": "audit-read",
    "research.search_type": "search", "research.read": "read", "research.vread": "read",
    "research.aggregate_operation": "aggregate", "research.train_operation": "train",
    "research.export_system": "export",
    "research.export_patients": "export", "research.export_group": "export",
    "research.export_status": "export-status", "research.export_cancel": "export-cancel",
    "research.export_file": "export-download",
}


def operator() -> str:
    """The actor of a command-line operation: the operating-system user who ran it."""
    return f"cli:{getpass.getuser()}"


def request_id() -> str | None:
    """The id of the HTTP request being served (None outside one)."""
    return g.get("request_id") if has_request_context() else None


def _in_context(detail: dict[str, Any]) -> dict[str, Any]:
    """`detail` with the request's id and, unless it says otherwise, a successful outcome."""
    found = request_id()
    return {"outcome": "success", **detail, **({"request_id": found} if found else {})}


def is_identifying(name: str) -> bool:
    """Whether a search parameter (with any modifier or chain) takes a value that identifies a person."""
    return any(part in IDENTIFYING_PARAMS or part.startswith("address-") for part in _PARAM_PARTS.split(name))


def conceal(params: Iterable[tuple[str, str]], key: bytes) -> list[list[str]]:
    """Search parameters as an entry records them: each identifying value replaced by its keyed hash
    (HMAC-SHA256 under `key`, the same for the same value), every other value as sent."""
    return [[name, "hmac:" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]
             if is_identifying(name) else value] for name, value in params]


def query_key() -> bytes:
    """The key `conceal` hashes with, derived from the master key (one per process)."""
    cache = current_app.extensions.setdefault("passerelle.keys", {})
    if "audit-query" not in cache:
        cache["audit-query"] = derive_key(keyring.master(), "audit-query")
    return cache["audit-query"]


def in_request(conn: Connection, detail: dict[str, Any], patients: Iterable[str] = ()) -> int:
    """Record the API request being served, as its endpoint's action by its caller, in the caller's
    write transaction (a write is audited in the transaction that makes it)."""
    principal = g.principal
    return record(conn, actor=principal.client_id, action=ACTIONS[request.endpoint],
                  project_id=principal.project_id, detail=detail, patients=patients)


def disclosed(detail: dict[str, Any], patients: Iterable[str] = ()) -> None:
    """Record what a read is about to answer, in its own short write transaction, before the response
    leaves: if the entry cannot be written, the error propagates and nothing is answered."""
    with db.write() as conn:
        in_request(conn, detail, patients)


def _accept_request_id() -> None:
    sent = request.headers.get(REQUEST_ID_HEADER, "")
    g.request_id = sent if _SANE_REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex


def _finish(response: Response) -> Response:
    """Echo the request id; record an authenticated API request that failed (what it did not do)."""
    found = request_id()
    if found:
        response.headers[REQUEST_ID_HEADER] = found
    principal = g.get("principal")
    if response.status_code >= 400 and principal is not None and request.endpoint in ACTIONS:
        detail: dict[str, Any] = {"outcome": response.status_code}
        resource_type = (request.view_args or {}).get("resource_type")
        if resource_type and model_for(resource_type) is not None:  # never a URL's arbitrary text
            detail["type"] = resource_type
        try:
            with db.write() as conn:
                in_request(conn, detail)
        except SQLAlchemyError:
            log.exception("a failed request could not be audited")
    return response


def init_app(app: Flask) -> None:
    """Give every request an id (the client's `X-Request-ID` if sane, else a new one), echoed in the
    response; audit failed API requests. Register before any hook that may refuse a request."""
    app.before_request(_accept_request_id)
    app.after_request(_finish)
