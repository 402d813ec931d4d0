"""The privacy-budget ledger: the database is the only truth (SQLite and PostgreSQL).

Every function takes the caller's SQLAlchemy `Connection`; the caller owns the
transaction (`service.db.write(engine)`, which on SQLite is `BEGIN IMMEDIATE`). An
`$aggregate` request runs in three steps, so that no write transaction is open while
it computes:

    claimed = claim(conn, project, query_hash, data_version, epsilon, idempotency_key=..., actor=...)
    # commit: claimed.answer is the recorded answer (nothing spent), or None and ε is reserved
    ... bounded SQL aggregate in a read transaction, policies.dp noise, suppression ...
    answer = record_answer(conn, project, query_hash, data_version, response, idempotency_key)
    # commit, then release `answer`

Guarantees:
- No overspend, under any concurrency: `reserve` is one conditional UPDATE
  (`spent + ε <= total`); its row lock (PostgreSQL) or the database write lock
  (SQLite) serialises reservations, and a refused one changes nothing.
- Amounts are integers: ε in micro-units (1e-6), δ in pico-units (1e-12). A spend is
  rounded up (ceil) and a total down (floor), from the shortest decimal form of the float
  (so 0.07 is 70 000 µε, not 70 001), so rounding can only make the ledger stricter.
- No refunds: nothing ever lowers `spent`, nor a `total` (only `raise_budget` changes it,
  upwards, audited). A reservation committed by `claim` stays spent whatever happens to
  the computation it paid for.
- One answer per question: a (project, query, data version) and an idempotency key are
  each answered one way only. Two identical questions computed at the same time both pay;
  the one recorded second gets the first one's answer.
- Fail closed: nothing here catches a database error; it propagates and the caller's
  transaction rolls back.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from numbers import Real
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from service.db import now_us
from service.errors import Conflict, Forbidden, InvalidRequest, Unprocessable
from service.store.schema import answer_keys, answers, budget_questions, budget_spends, budgets

MICRO = 10**6   # ε units per 1.0
PICO = 10**12   # δ units per 1.0

# The statements of a claim and of a recorded answer, built once: a request only binds its
# values, and the compiled forms are reused.
_SPEND_E, _SPEND_D = bindparam("spend_epsilon"), bindparam("spend_delta")
_SPEND = (update(budgets)
          .where(budgets.c.project_id == bindparam("project"),
                 budgets.c.spent_micro + _SPEND_E <= budgets.c.total_micro,
                 budgets.c.delta_spent_pico + _SPEND_D <= budgets.c.delta_total_pico)
          .values(spent_micro=budgets.c.spent_micro + _SPEND_E, delta_spent_pico=budgets.c.delta_spent_pico + _SPEND_D,
                  updated=bindparam("at")))
_BUDGET_ROW = select(budgets).where(budgets.c.project_id == bindparam("project"))
# FOR UPDATE on PostgreSQL; SQLAlchemy omits it on SQLite, where BEGIN IMMEDIATE already holds
# the database's write lock.
_LOCKED_BUDGET_ROW = _BUDGET_ROW.with_for_update()
_REMAINING = select(budgets.c.total_micro - budgets.c.spent_micro).where(budgets.c.project_id == bindparam("project"))
_KEYED_ANSWER = select(answer_keys.c.query_hash, answer_keys.c.response).where(
    answer_keys.c.project_id == bindparam("project"), answer_keys.c.idempotency_key == bindparam("key"))
_RECORDED_ANSWER = select(answers.c.response).where(
    answers.c.project_id == bindparam("project"), answers.c.query_hash == bindparam("query_hash"),
    answers.c.data_version == bindparam("data_version"))
_QUESTION = {module.dialect.name: module.insert(budget_questions).on_conflict_do_nothing()
             for module in (postgresql, sqlite)}


class BudgetExhausted(Forbidden):
    """The reservation would exceed the project's total; `remaining_*` say what is left.

    403 `too-costly`, not a rate limit: asking again changes nothing until the custodian
    raises the budget.
    """

    code = "too-costly"

    def __init__(self, remaining_epsilon: float, remaining_delta: float):
        super().__init__(f"Privacy budget exhausted: remaining epsilon {remaining_epsilon:.6f}, "
                         f"remaining delta {remaining_delta:.12g}; only the data custodian can raise it")
        self.remaining_epsilon = remaining_epsilon
        self.remaining_delta = remaining_delta


class BudgetMissing(Forbidden):
    """The project has no budget row: it may release no aggregate (fail closed)."""


class BudgetLoweringRefused(Conflict):
    """A budget total can only be raised; lowering it would silently rewrite history."""


class IdempotencyConflict(Unprocessable):
    """An idempotency key reused for a different query."""


# --- amounts ---------------------------------------------------------------------------------

def _units(value: Any, scale: int, rounding: str, name: str, *, upper: float | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise InvalidRequest(f"{name} must be a finite number ≥ 0, got {value!r}")
    if upper is not None and value > upper:
        raise InvalidRequest(f"{name} must be ≤ {upper}, got {value!r}")
    # repr() is the shortest decimal that round-trips, so 0.07 stays 0.07 instead of 0.0700000000000000067.
    return int((Decimal(repr(float(value))) * scale).to_integral_value(rounding=rounding))


def epsilon_micro(epsilon: float, *, spend: bool = True) -> int:
    """ε in micro-units: a spend rounds up, a total rounds down."""
    return _units(epsilon, MICRO, ROUND_CEILING if spend else ROUND_FLOOR, "epsilon")


def delta_pico(delta: float, *, spend: bool = True) -> int:
    """δ in pico-units: a spend rounds up, a total rounds down."""
    return _units(delta, PICO, ROUND_CEILING if spend else ROUND_FLOOR, "delta", upper=1.0)


def canonical_text(params: dict[str, Any]) -> str:
    """The query's canonical JSON (sorted keys, no whitespace, no NaN): what `canonical_hash`
    hashes and what the budget history shows as the question asked."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_hash(params: dict[str, Any]) -> str:
    """SHA-256 of the query's canonical JSON (`canonical_text`).

    Normalise values before hashing (e.g. `1` vs `1.0`, list order where order does not
    matter): two spellings of one query that hash differently are two queries, and each
    would draw fresh noise.
    """
    return text_hash(canonical_text(params))


def text_hash(text: str) -> str:
    """SHA-256 of a canonical text: `canonical_hash` of the parameters it was made from."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- budgets ---------------------------------------------------------------------------------

def ensure_budget(conn: Connection, project_id: str, total_epsilon: float, total_delta: float = 0.0,
                  actor: str = "system") -> bool:
    """Create the project's budget if it has none (audited as a 'raise' from 0). Returns True if created.

    An existing budget is left as it is: changing a total goes through `raise_budget`.
    """
    total = epsilon_micro(total_epsilon, spend=False)
    delta_total = delta_pico(total_delta, spend=False)
    if total <= 0:
        raise InvalidRequest("a budget's total epsilon must be at least 1e-6")
    now = now_us()
    # ON CONFLICT DO NOTHING: two concurrent creators both succeed and exactly one row (and
    # one history entry) results, on PostgreSQL as on SQLite.
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    created = conn.execute(dialect_insert(budgets).values(
        project_id=project_id, total_micro=total, spent_micro=0, delta_total_pico=delta_total,
        delta_spent_pico=0, updated=now).on_conflict_do_nothing(index_elements=["project_id"])
        # RETURNING, not rowcount: psycopg reports -1 for an INSERT … ON CONFLICT.
        .returning(budgets.c.project_id)).first()
    if created is None:
        return False
    _history(conn, project_id, "raise", total, delta_total, actor=actor, ts=now)
    return True


def raise_budget(conn: Connection, project_id: str, new_total: float, actor: str,
                 new_delta_total: float | None = None) -> bool:
    """Raise the total ε (and optionally δ); the increase is audited as a 'raise'.

    Lowering either total raises `BudgetLoweringRefused`; the same totals again change
    nothing and return False (so a re-run command is harmless).
    """
    row = _locked_row(conn, project_id)
    if row is None:
        raise BudgetMissing(f"Project {project_id!r} has no privacy budget")
    total = epsilon_micro(new_total, spend=False)
    delta_total = row.delta_total_pico if new_delta_total is None else delta_pico(new_delta_total, spend=False)
    if total < row.total_micro or delta_total < row.delta_total_pico:
        raise BudgetLoweringRefused(
            f"A privacy budget can only be raised: current total epsilon {row.total_micro / MICRO:.6f}, "
            f"delta {row.delta_total_pico / PICO:.12g}")
    if total == row.total_micro and delta_total == row.delta_total_pico:
        return False
    now = now_us()
    conn.execute(update(budgets).where(budgets.c.project_id == project_id)
                 .values(total_micro=total, delta_total_pico=delta_total, updated=now))
    _history(conn, project_id, "raise", total - row.total_micro, delta_total - row.delta_total_pico,
             actor=actor, ts=now)
    return True


def reserve(conn: Connection, project_id: str, epsilon: float, delta: float = 0.0, *,
            query_hash: str | None = None, idempotency_key: str | None = None, actor: str | None = None,
            question: str | None = None) -> None:
    """Spend ε (and δ) before any noise is drawn, or raise `BudgetExhausted` and spend nothing.

    `question`, the canonical text `query_hash` hashes (`canonical_text`), is kept beside the
    hash so the history shows what was asked.

    One conditional UPDATE decides: on PostgreSQL a concurrent reservation waits for this
    row's lock and re-checks the condition on the committed row; on SQLite the write
    transaction holds the database lock. Once committed, never refunded.
    """
    _check_key(idempotency_key)
    e = epsilon_micro(epsilon)
    d = delta_pico(delta)
    if e <= 0:
        raise InvalidRequest("epsilon must be > 0")
    result = conn.execute(_SPEND, {"project": project_id, "spend_epsilon": e, "spend_delta": d, "at": now_us()})
    if result.rowcount != 1:
        row = conn.execute(_BUDGET_ROW, {"project": project_id}).first()
        if row is None:
            raise BudgetMissing(f"Project {project_id!r} has no privacy budget")
        raise BudgetExhausted((row.total_micro - row.spent_micro) / MICRO,
                              (row.delta_total_pico - row.delta_spent_pico) / PICO)
    _history(conn, project_id, "query", e, d, query_hash=query_hash, idempotency_key=idempotency_key, actor=actor)
    if question is not None and query_hash is not None:
        _remember_question(conn, project_id, query_hash, question)


def _remember_question(conn: Connection, project_id: str, query_hash: str, question: str) -> None:
    if text_hash(question) != query_hash:
        raise ValueError("the question is not the canonical text of the query hash")
    conn.execute(_QUESTION[conn.dialect.name], {"project_id": project_id, "query_hash": query_hash,
                                                "question": question})


def status(conn: Connection, project_id: str, history_limit: int | None = 100) -> dict[str, Any]:
    """Totals, spent and remaining (ε and δ) and the most recent history entries, newest first,
    each query with the canonical question asked (`question`, None if not recorded)."""
    row = conn.execute(_BUDGET_ROW, {"project": project_id}).first()
    if row is None:
        raise BudgetMissing(f"Project {project_id!r} has no privacy budget")
    asked = budget_questions.c
    query = (select(budget_spends, asked.question)
             .outerjoin(budget_questions, (asked.project_id == budget_spends.c.project_id)
                        & (asked.query_hash == budget_spends.c.query_hash))
             .where(budget_spends.c.project_id == project_id)
             .order_by(budget_spends.c.seq.desc()))
    if history_limit is not None:
        query = query.limit(history_limit)
    history = [{"seq": h.seq, "ts": h.ts, "kind": h.kind, "epsilon": h.epsilon_micro / MICRO,
                "delta": h.delta_pico / PICO, "query_hash": h.query_hash, "question": h.question,
                "idempotency_key": h.idempotency_key, "actor": h.actor} for h in conn.execute(query)]
    return {
        "project_id": project_id,
        "total": row.total_micro / MICRO,
        "spent": row.spent_micro / MICRO,
        "remaining": (row.total_micro - row.spent_micro) / MICRO,
        "delta_total": row.delta_total_pico / PICO,
        "delta_spent": row.delta_spent_pico / PICO,
        "delta_remaining": (row.delta_total_pico - row.delta_spent_pico) / PICO,
        "history": history,
    }


# --- recorded answers --------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """What `claim` decided: `answer`, already released for this request (nothing spent), or
    None once ε is reserved for computing it; `remaining` ε after that."""

    answer: Any | None
    remaining: float


def claim(conn: Connection, project_id: str, query_hash: str, data_version: str, epsilon: float,
          delta: float = 0.0, *, idempotency_key: str | None = None, actor: str | None = None,
          question: str | None = None) -> Claim:
    """The first step of a request: its recorded answer, or ε (and δ) reserved to compute it.

    Raises `BudgetExhausted` (nothing spent) when the reservation does not fit, and
    `IdempotencyConflict` (nothing spent) for a key already used for another query.
    """
    recorded = recorded_answer(conn, project_id, query_hash, data_version, idempotency_key)
    if recorded is None:
        reserve(conn, project_id, epsilon, delta, query_hash=query_hash, idempotency_key=idempotency_key,
                actor=actor, question=question)
    remaining = conn.scalar(_REMAINING, {"project": project_id})
    if remaining is None:
        raise BudgetMissing(f"Project {project_id!r} has no privacy budget")
    return Claim(recorded, remaining / MICRO)


def recorded_answer(conn: Connection, project_id: str, query_hash: str, data_version: str | int,
                    idempotency_key: str | None = None) -> Any | None:
    """The answer already released for this request, or None if the query must be computed.

    A known idempotency key returns its answer whatever the data version (a retry never
    draws fresh noise); a key reused for another query raises `IdempotencyConflict`.
    Otherwise the same canonical query on the same data version returns the recorded
    answer, and a new key is bound to it. Locks the project's budget row first, so
    claims and records of one project serialise.
    """
    _check_key(idempotency_key)
    _locked_row(conn, project_id)
    if idempotency_key is not None:
        row = conn.execute(_KEYED_ANSWER, {"project": project_id, "key": idempotency_key}).first()
        if row is not None:
            if row.query_hash != query_hash:
                raise IdempotencyConflict("This idempotency key was already used for a different query")
            return json.loads(row.response)
    response = conn.scalar(_RECORDED_ANSWER, {"project": project_id, "query_hash": query_hash,
                                              "data_version": str(data_version)})
    if response is None:
        return None
    recorded = json.loads(response)
    _bind_key(conn, project_id, idempotency_key, query_hash, recorded)
    return recorded


def record_answer(conn: Connection, project_id: str, query_hash: str, data_version: str | int, response: Any,
                  idempotency_key: str | None = None) -> Any:
    """Record the noisy answer (JSON-serialisable) of a claimed request; returns the answer to release.

    If the same request was answered meanwhile (an identical question, or the same
    idempotency key, computed at the same time), that first answer is returned and
    `response` is discarded: one request, one answer.
    """
    earlier = recorded_answer(conn, project_id, query_hash, data_version, idempotency_key)
    if earlier is not None:
        return earlier
    conn.execute(insert(answers), {"project_id": project_id, "query_hash": query_hash,
                                   "data_version": str(data_version), "created": now_us(),
                                   "response": _dumps(response)})
    _bind_key(conn, project_id, idempotency_key, query_hash, response)
    return response


def _dumps(response: Any) -> str:
    return json.dumps(response, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _bind_key(conn: Connection, project_id: str, idempotency_key: str | None, query_hash: str, response: Any) -> None:
    """Remember which answer a request with this idempotency key received (no-op without a key)."""
    if idempotency_key is not None:
        conn.execute(insert(answer_keys), {"project_id": project_id, "idempotency_key": idempotency_key,
                                           "query_hash": query_hash, "response": _dumps(response),
                                           "created": now_us()})


# --- helpers -----------------------------------------------------------------------------------

def _check_key(idempotency_key: str | None) -> None:
    if idempotency_key is not None and (not isinstance(idempotency_key, str) or not 1 <= len(idempotency_key) <= 255):
        raise InvalidRequest("An idempotency key must be a string of 1 to 255 characters")


def _locked_row(conn: Connection, project_id: str) -> Any:
    return conn.execute(_LOCKED_BUDGET_ROW, {"project": project_id}).first()


def _history(conn: Connection, project_id: str, kind: str, epsilon_units: int, delta_units: int, *,
             query_hash: str | None = None, idempotency_key: str | None = None, actor: str | None = None,
             ts: int | None = None) -> None:
    conn.execute(insert(budget_spends), {
        "project_id": project_id, "ts": ts or now_us(), "kind": kind, "epsilon_micro": epsilon_units,
        "delta_pico": delta_units, "query_hash": query_hash, "idempotency_key": idempotency_key, "actor": actor})
