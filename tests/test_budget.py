"""The privacy-budget ledger on real databases (SQLite file and PostgreSQL schema).

Spends are exact integers, overspend is refused (also under 8 concurrent processes),
recorded answers and idempotency keys never draw fresh noise, totals only go up, and
everything survives a restart.
"""
from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select

from policies import budget
from service import db
from service.store.schema import answers, budget_spends, budgets

P = "proj-1"


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = db.make_engine(database_url)
    db.migrate(eng)
    yield eng
    eng.dispose()


def _status(eng: Engine, project_id: str = P, **kwargs: Any) -> dict[str, Any]:
    with db.read(eng) as conn:
        return budget.status(conn, project_id, **kwargs)


def _spent_micro(eng: Engine, project_id: str = P) -> int:
    with db.read(eng) as conn:
        return conn.scalar(select(budgets.c.spent_micro).where(budgets.c.project_id == project_id))


def _reserve(eng: Engine, epsilon: float, delta: float = 0.0, **kwargs: Any) -> None:
    with db.write(eng) as conn:
        budget.reserve(conn, P, epsilon, delta, **kwargs)


# --- amounts -----------------------------------------------------------------------------------

def test_amounts_are_integers_rounded_against_the_spender() -> None:
    assert budget.epsilon_micro(0.07) == 70_000          # not 70_001 from 0.07 * 1e6 = 70000.00000000001
    assert budget.epsilon_micro(0.01) == 10_000
    assert budget.epsilon_micro(1e-7) == 1               # a spend rounds up…
    assert budget.epsilon_micro(1e-7, spend=False) == 0  # …a total rounds down
    assert budget.epsilon_micro(2.0000005, spend=False) == 2_000_000
    assert budget.delta_pico(1e-5) == 10_000_000
    for bad in (-0.1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(budget.InvalidRequest):
            budget.epsilon_micro(bad)
    with pytest.raises(budget.InvalidRequest):
        budget.delta_pico(1.5)


def test_canonical_hash_ignores_key_order_only() -> None:
    a = budget.canonical_hash({"kind": "count", "filters": {"code": "E11", "gender": "f"}, "epsilon": 0.1})
    b = budget.canonical_hash({"epsilon": 0.1, "filters": {"gender": "f", "code": "E11"}, "kind": "count"})
    c = budget.canonical_hash({"epsilon": 0.1, "filters": {"gender": "m", "code": "E11"}, "kind": "count"})
    assert a == b != c and len(a) == 64 and int(a, 16) >= 0


# --- reservations --------------------------------------------------------------------------------

def test_reserve_spends_exactly_and_refuses_overspend(engine: Engine) -> None:
    with db.write(engine) as conn:
        assert budget.ensure_budget(conn, P, 1.0)
    for _ in range(3):
        _reserve(engine, 0.3, query_hash="h", actor="client-a")
    assert _spent_micro(engine) == 900_000
    with pytest.raises(budget.BudgetExhausted) as refused:
        _reserve(engine, 0.2)
    assert refused.value.remaining_epsilon == 0.1
    assert (refused.value.status, refused.value.code) == (403, "too-costly")
    assert "0.100000" in refused.value.message
    assert _spent_micro(engine) == 900_000  # a refusal spends nothing
    _reserve(engine, 0.1)                   # exactly the remainder is allowed
    with pytest.raises(budget.BudgetExhausted) as refused:
        _reserve(engine, 1e-7)              # rounds up to 1 µε: still too much
    assert refused.value.remaining_epsilon == 0
    state = _status(engine)
    assert (state["total"], state["spent"], state["remaining"]) == (1.0, 1.0, 0.0)
    assert [h["kind"] for h in state["history"]] == ["query"] * 4 + ["raise"]  # newest first
    assert state["history"][-2]["actor"] == "client-a" and state["history"][-2]["query_hash"] == "h"


def test_delta_is_reserved_in_the_same_statement(engine: Engine) -> None:
    with db.write(engine) as conn:
        budget.ensure_budget(conn, P, 1.0, 1e-6)
    _reserve(engine, 0.1, 6e-7)
    with pytest.raises(budget.BudgetExhausted) as refused:
        _reserve(engine, 0.1, 6e-7)
    assert refused.value.remaining_delta == pytest.approx(4e-7)
    assert _spent_micro(engine) == 100_000  # ε was not spent either: one condition, one statement
    state = _status(engine)
    assert state["delta_spent"] == pytest.approx(6e-7) and state["delta_total"] == pytest.approx(1e-6)


def test_a_project_without_budget_can_spend_nothing(engine: Engine) -> None:
    with pytest.raises(budget.BudgetMissing):
        _reserve(engine, 0.1)
    with pytest.raises(budget.BudgetMissing):
        _status(engine)
    with db.write(engine) as conn, pytest.raises(budget.InvalidRequest):
        budget.ensure_budget(conn, P, 0.0)


def test_ensure_budget_creates_once(engine: Engine) -> None:
    with db.write(engine) as conn:
        assert budget.ensure_budget(conn, P, 2.0, actor="init-db")
        assert not budget.ensure_budget(conn, P, 5.0)
    state = _status(engine)
    assert state["total"] == 2.0 and len(state["history"]) == 1
    assert state["history"][0]["actor"] == "init-db"


# --- raising -------------------------------------------------------------------------------------

def test_raise_only_upwards_and_audited(engine: Engine) -> None:
    with db.write(engine) as conn:
        budget.ensure_budget(conn, P, 0.5)
    _reserve(engine, 0.5)
    with pytest.raises(budget.BudgetExhausted):
        _reserve(engine, 0.1)
    with db.write(engine) as conn:
        assert budget.raise_budget(conn, P, 1.25, actor="custodian-1")
    _reserve(engine, 0.1)
    with db.write(engine) as conn, pytest.raises(budget.BudgetLoweringRefused) as refused:
        budget.raise_budget(conn, P, 1.0, actor="custodian-1")
    assert refused.value.status == 409 and "only be raised" in refused.value.message
    with db.write(engine) as conn:
        budget.ensure_budget(conn, "proj-2", 1.0, 1e-6)
    with db.write(engine) as conn, pytest.raises(budget.BudgetLoweringRefused):
        budget.raise_budget(conn, "proj-2", 2.0, actor="c", new_delta_total=5e-7)  # ε up but δ down
    assert _status(engine, "proj-2")["total"] == 1.0  # refused as a whole
    with db.write(engine) as conn:
        assert not budget.raise_budget(conn, P, 1.25, actor="custodian-1")  # same total: no-op, no history
    state = _status(engine)
    assert state["total"] == 1.25 and state["spent"] == 0.6
    raises = [h for h in state["history"] if h["kind"] == "raise"]
    assert [(h["epsilon"], h["actor"]) for h in raises] == [(0.75, "custodian-1"), (0.5, "system")]


def test_ledger_history_explains_the_totals(engine: Engine) -> None:
    with db.write(engine) as conn:
        budget.ensure_budget(conn, P, 1.0, 1e-6)
        budget.raise_budget(conn, P, 2.0, actor="c", new_delta_total=2e-6)
        for _ in range(7):
            budget.reserve(conn, P, 0.123, 1e-7)
    with db.read(engine) as conn:
        row = conn.execute(select(budgets).where(budgets.c.project_id == P)).one()
        sums = dict(conn.execute(select(budget_spends.c.kind, func.sum(budget_spends.c.epsilon_micro))
                                 .where(budget_spends.c.project_id == P).group_by(budget_spends.c.kind)).all())
    assert sums == {"raise": row.total_micro, "query": row.spent_micro} and row.spent_micro == 7 * 123_000


# --- recorded answers and idempotency --------------------------------------------------------------

def _aggregate(eng: Engine, params: dict[str, Any], data_version: str, key: str | None = None,
               *, fail_after_reserve: bool = False) -> dict[str, Any]:
    """The caller's flow, as `$aggregate` runs it: claim, compute outside any write transaction, record."""
    # Imported here so the spawned concurrency workers, which import this module, skip diffprivlib.
    from policies import dp

    query_hash = budget.canonical_hash(params)
    with db.write(eng) as conn:
        claim = budget.claim(conn, P, query_hash, data_version, params["epsilon"], idempotency_key=key,
                             actor="client")
    if claim.answer is not None:
        return claim.answer
    if fail_after_reserve:
        raise RuntimeError("the aggregate query failed")
    released = dp.Count(params["epsilon"]).release(40)
    with db.write(eng) as conn:
        return budget.record_answer(conn, P, query_hash, data_version,
                                    {"value": released.value, "interval": list(released.interval)}, key)


def test_identical_query_returns_the_recorded_answer_and_spends_nothing(engine: Engine) -> None:
    with db.write(engine) as conn:
        budget.ensure_budget(conn, P, 1.0)
    params = {"kind": "count", "code": "E11", "epsilon": 0.1}
    first = _aggregate(engine, params, "v1")
    again = [_aggregate(engine, dict(reversed(params.items())), "v1") for _ in range(20)]
    assert all(answer == first for answer in again)
    assert _spent_micro(engine) == 100_000
    _aggregate(engine, params, "v2")  # new data version: a new release, a new spend
    assert _spent_micro(engine) == 200_000


def test_idempotency_key_never_draws_fresh_noise(engine: Engine) -> None:
    with db.write(engine) as conn:
        budget.ensure_budget(conn, P, 1.0)
    params = {"kind": "count", "code": "E11", "epsilon": 0.1}
    first = _aggregate(engine, params, "v1", key="req-1")
    # A retry after the data changed still gets the answer the key was given.
    assert _aggregate(engine, params, "v2", key="req-1") == first
    assert _spent_micro(engine) == 100_000
    with pytest.raises(budget.IdempotencyConflict) as conflict:
        _aggregate(engine, {**params, "code": "I10"}, "v1", key="req-1")
    assert conflict.value.status == 422
    assert _spent_micro(engine) == 100_000
    with db.read(engine) as conn:
        assert budget.recorded_answer(conn, P, "unknown", "v1", "req-2") is None


def test_a_claim_tells_the_remaining_budget_after_it(engine: Engine) -> None:
    with db.write(engine) as conn:
        budget.ensure_budget(conn, P, 1.0)
        assert budget.claim(conn, P, "h", "v1", 0.3) == budget.Claim(None, 0.7)
        budget.record_answer(conn, P, "h", "v1", {"value": 1})
        assert budget.claim(conn, P, "h", "v1", 0.3) == budget.Claim({"value": 1}, 0.7)


def test_a_failed_computation_keeps_its_reservation_and_records_nothing(engine: Engine) -> None:
    """No refunds: a failure after the reservation may depend on the data, so it is paid for."""
    with db.write(engine) as conn:
        budget.ensure_budget(conn, P, 1.0)
    with pytest.raises(RuntimeError):
        _aggregate(engine, {"kind": "count", "epsilon": 0.1}, "v1", fail_after_reserve=True)
    assert _spent_micro(engine) == 100_000
    with db.read(engine) as conn:
        assert conn.scalar(select(func.count()).select_from(answers)) == 0


def test_an_answer_recorded_meanwhile_is_the_one_released(engine: Engine) -> None:
    """Two identical questions computed at once both pay, and both get the first recorded answer."""
    with db.write(engine) as conn:
        budget.ensure_budget(conn, P, 1.0)
        for _ in range(2):
            assert budget.claim(conn, P, "h", "v1", 0.25, idempotency_key=None).answer is None
        first = budget.record_answer(conn, P, "h", "v1", {"value": 1}, "key-1")
        second = budget.record_answer(conn, P, "h", "v1", {"value": 2}, "key-2")
    assert first == second == {"value": 1}
    with db.read(engine) as conn:
        assert budget.recorded_answer(conn, P, "h", "v2", "key-2") == {"value": 1}  # the key was bound to it
    assert _spent_micro(engine) == 500_000


def test_an_error_before_the_claim_commits_spends_nothing(engine: Engine) -> None:
    with db.write(engine) as conn:
        budget.ensure_budget(conn, P, 1.0)
    with pytest.raises(RuntimeError), db.write(engine) as conn:
        budget.claim(conn, P, "h", "v1", 0.5)
        raise RuntimeError("the transaction failed before it committed")
    assert _spent_micro(engine) == 0


# --- durability and concurrency ----------------------------------------------------------------------

def test_spend_survives_a_restart(database_url: str, engine: Engine) -> None:
    with db.write(engine) as conn:
        budget.ensure_budget(conn, P, 1.0)
        budget.reserve(conn, P, 0.37)
        budget.record_answer(conn, P, "h", "v1", {"value": 12})
    engine.dispose()
    fresh = db.make_engine(database_url)
    try:
        assert _status(fresh)["spent"] == 0.37
        with db.write(fresh) as conn:
            assert budget.recorded_answer(conn, P, "h", "v1") == {"value": 12}
            with pytest.raises(budget.BudgetExhausted):
                budget.reserve(conn, P, 0.64)
    finally:
        fresh.dispose()


def _reserve_worker(url: str, count: int, barrier: Any, results: Any) -> None:
    """One process: its own engine, `count` reservations of ε = 0.01, each its own transaction."""
    eng = db.make_engine(url, pool_size=1)
    granted = refused = 0
    barrier.wait()
    for _ in range(count):
        try:
            with db.write(eng) as conn:
                budget.reserve(conn, P, 0.01, actor="worker")
            granted += 1
        except budget.BudgetExhausted:
            refused += 1
    eng.dispose()
    results.put((granted, refused))


def test_concurrent_reservations_never_overspend(database_url: str, engine: Engine) -> None:
    processes, per_process = 8, 50
    with db.write(engine) as conn:
        budget.ensure_budget(conn, P, 1.0)  # room for exactly 100 reservations of 0.01
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_reserve_worker, args=(database_url, per_process, barrier, results))
               for _ in range(processes)]
    for w in workers:
        w.start()
    try:
        outcomes = [results.get(timeout=120) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=30)
    assert [w.exitcode for w in workers] == [0] * processes
    assert sum(g for g, _ in outcomes) == 100
    assert sum(r for _, r in outcomes) == processes * per_process - 100
    state = _status(engine, history_limit=None)
    assert state["spent"] == state["total"] == 1.0
    assert sum(h["kind"] == "query" for h in state["history"]) == 100


def _identical_query_worker(url: str, count: int, barrier: Any, results: Any) -> None:
    """One process asking the same question `count` times: claim, compute slowly with no
    transaction open, record."""
    import random

    eng = db.make_engine(url, pool_size=1)
    barrier.wait()
    seen = []
    for _ in range(count):
        with db.write(eng) as conn:
            answer = budget.claim(conn, P, "same-query", "v1", 0.1).answer
        if answer is None:
            time.sleep(0.05)  # widen the window in which a second runner could slip in
            with db.write(eng) as conn:
                answer = budget.record_answer(conn, P, "same-query", "v1", {"value": random.random()})
        seen.append(answer["value"])
    eng.dispose()
    results.put(seen)


def test_concurrent_identical_queries_release_one_answer_and_never_overspend(database_url: str,
                                                                             engine: Engine) -> None:
    # Runners computing at the same time each pay (nothing is locked while computing), but
    # record_answer serialises on the budget row and all of them release the first answer.
    with db.write(engine) as conn:
        budget.ensure_budget(conn, P, 1.0)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_identical_query_worker, args=(database_url, 3, barrier, results))
               for _ in range(4)]
    for w in workers:
        w.start()
    try:
        seen = [value for _ in workers for value in results.get(timeout=120)]
    finally:
        for w in workers:
            w.join(timeout=30)
    assert [w.exitcode for w in workers] == [0] * 4
    assert len(seen) == 12 and len(set(seen)) == 1
    state = _status(engine, history_limit=None)
    claims = sum(h["kind"] == "query" for h in state["history"])
    assert 1 <= claims <= 4  # at most one per runner: its later questions find the recorded answer
    assert _spent_micro(engine) == claims * 100_000


@pytest.mark.parametrize("prior", [10, 10_000])
def test_reservation_latency(engine: Engine, prior: int, capsys: pytest.CaptureFixture[str]) -> None:
    with db.write(engine) as conn:
        budget.ensure_budget(conn, P, 1_000.0)
        # Prior spends written in bulk (a real history would come from reserve itself).
        conn.execute(insert(budget_spends), [
            {"project_id": P, "ts": i, "kind": "query", "epsilon_micro": 1, "delta_pico": 0, "query_hash": f"{i:064x}"}
            for i in range(prior)])
    timings = []
    for _ in range(50):
        start = time.perf_counter()
        _reserve(engine, 0.001)
        timings.append((time.perf_counter() - start) * 1000)
    with capsys.disabled():
        print(f"\n[{engine.dialect.name}] reserve with {prior} prior spends: median "
              f"{statistics.median(timings):.2f} ms, max {max(timings):.2f} ms (own write transaction each)")
    assert _spent_micro(engine) == 50 * 1_000
