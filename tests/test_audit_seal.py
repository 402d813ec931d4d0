"""The audit chain sealed under a key derived from the master key, and `audit verify` finding every
kind of tampering done directly in the database, on SQLite and PostgreSQL, with writers at once."""
from __future__ import annotations

import hashlib
import json
import threading

import orjson
import pytest
from sqlalchemy import delete, insert, select, update

from service import audit, db
from service.store.schema import audit as audit_table
from service.store.schema import audit_head, audit_seals

ENTRIES = 2 * audit.SEAL_EVERY + 10  # two periodic seals, and an unsealed tail


def _write(app, n: int, actor: str = "client-a") -> None:
    with app.app_context():
        for i in range(n):
            with db.write() as conn:
                audit.record(conn, actor=actor, action="search", project_id="p1",
                             detail={"type": "Observation", "n": i, "resources": 1}, patients=[f"pat-{i % 3}"])


def _cli(app, *args: str):
    return app.test_cli_runner().invoke(args=list(args))


def _verify(app) -> dict:
    result = _cli(app, "audit", "verify")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (result.exit_code == 0) == report["intact"], result.output
    return report


def _tamper(app, *statements) -> None:
    with app.app_context(), db.write() as conn:
        for statement in statements:
            conn.execute(statement)


def _row(app, seq: int):
    with app.app_context(), db.read() as conn:
        return conn.execute(select(audit_table).where(audit_table.c.seq == seq)).one()


def _digest(prev: str, row: dict) -> str:
    """The chain's published hash rule: what anyone able to write the database can recompute."""
    entry = {k: row[k] for k in ("seq", "ts", "actor", "action", "project_id", "detail")}
    return hashlib.sha256(prev.encode() + orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _rewrite_chain_from(app, first: int) -> None:
    """Recompute every hash from entry `first` on, and the head, as a forger without the key would."""
    with app.app_context(), db.write() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(audit_table).order_by(audit_table.c.seq))]
        prev = audit.GENESIS
        for row in rows:
            if row["seq"] >= first:
                digest = _digest(prev, row)
                conn.execute(update(audit_table).where(audit_table.c.seq == row["seq"])
                             .values(prev_hash=prev, hash=digest))
                row["hash"] = digest
            prev = row["hash"]
        conn.execute(update(audit_head).values(seq=rows[-1]["seq"], hash=prev))


@pytest.fixture
def chain(app):
    _write(app, ENTRIES)
    return app


def test_every_nth_entry_is_sealed_and_an_intact_chain_verifies(chain):
    with chain.app_context(), db.read() as conn:
        sealed = list(conn.execute(select(audit_seals.c.seq).order_by(audit_seals.c.seq)).scalars())
    assert sealed == [audit.SEAL_EVERY, 2 * audit.SEAL_EVERY]
    report = _verify(chain)
    assert report["intact"] and report["entries"] == ENTRIES


def test_audit_seal_seals_the_head_on_demand_once(chain):
    first = json.loads(_cli(chain, "audit", "seal").stdout)
    again = json.loads(_cli(chain, "audit", "seal").stdout)
    assert first == again == {"sealed": ENTRIES}
    with chain.app_context(), db.read() as conn:
        assert conn.scalar(select(audit_seals.c.hash).where(audit_seals.c.seq == ENTRIES)) == _row(chain, ENTRIES).hash
    assert _verify(chain)["intact"]


def test_a_chain_written_before_seals_existed_is_sealed_by_audit_seal(chain):
    _tamper(chain, delete(audit_seals))
    assert "lacks its seal" in _verify(chain)["message"]
    assert json.loads(_cli(chain, "audit", "seal").stdout) == {"sealed": ENTRIES}
    with chain.app_context(), db.read() as conn:
        sealed = list(conn.execute(select(audit_seals.c.seq).order_by(audit_seals.c.seq)).scalars())
    assert sealed == [audit.SEAL_EVERY, 2 * audit.SEAL_EVERY, ENTRIES]
    assert _verify(chain)["intact"]


def test_audit_seal_refuses_to_seal_over_an_edited_entry(chain):
    _tamper(chain, update(audit_table).where(audit_table.c.seq == ENTRIES - 2).values(actor="someone-else"))
    result = _cli(chain, "audit", "seal")
    assert result.exit_code == 1 and f"entry {ENTRIES - 2}" in result.output
    with chain.app_context(), db.read() as conn:
        assert conn.scalar(select(audit_seals.c.seq).where(audit_seals.c.seq == ENTRIES)) is None


def test_an_edited_entry_is_detected(chain):
    _tamper(chain, update(audit_table).where(audit_table.c.seq == 5).values(detail='{"type":"Patient"}'))
    report = _verify(chain)
    assert not report["intact"] and "entry 5" in report["message"]


def test_a_deleted_entry_is_detected(chain):
    _tamper(chain, delete(audit_table).where(audit_table.c.seq == 40))
    assert not _verify(chain)["intact"]


def test_an_entry_inserted_in_the_middle_is_detected(chain):
    moved = [dict(_row(chain, seq)._mapping) for seq in range(ENTRIES, 30, -1)]
    statements = [update(audit_table).where(audit_table.c.seq == row["seq"]).values(seq=row["seq"] + 1)
                  for row in moved]
    forged = {**dict(_row(chain, 30)._mapping), "seq": 31, "actor": "nobody"}
    statements += [insert(audit_table).values(**forged), update(audit_head).values(seq=ENTRIES + 1)]
    _tamper(chain, *statements)
    assert not _verify(chain)["intact"]


def test_reordered_entries_are_detected(chain):
    a, b = _row(chain, 20), _row(chain, 21)
    _tamper(chain, update(audit_table).where(audit_table.c.seq == 20).values(seq=-1),
            update(audit_table).where(audit_table.c.seq == 21).values(seq=20),
            update(audit_table).where(audit_table.c.seq == -1).values(seq=21))
    assert (a.hash, b.hash) == (_row(chain, 21).hash, _row(chain, 20).hash)
    assert not _verify(chain)["intact"]


def test_a_chain_rewritten_consistently_without_the_key_is_detected_by_its_seals(chain):
    """The forger edits an entry and recomputes every later hash and the head: the chain alone
    looks intact, but the seal over entry SEAL_EVERY was made with the key."""
    _tamper(chain, update(audit_table).where(audit_table.c.seq == 3).values(actor="someone-else"))
    _rewrite_chain_from(chain, 3)
    report = _verify(chain)
    assert not report["intact"] and "seal" in report["message"]


def test_a_truncated_tail_is_detected_even_with_the_head_moved_back(chain):
    keep = audit.SEAL_EVERY + 5
    last = _row(chain, keep)
    _tamper(chain, delete(audit_table).where(audit_table.c.seq > keep),
            update(audit_head).values(seq=keep, hash=last.hash))
    report = _verify(chain)
    assert not report["intact"] and "tail" in report["message"]


def test_a_removed_seal_is_detected(chain):
    _tamper(chain, delete(audit_seals).where(audit_seals.c.seq == audit.SEAL_EVERY))
    report = _verify(chain)
    assert not report["intact"] and "lacks its seal" in report["message"]


def test_a_removed_head_is_detected(chain):
    _tamper(chain, delete(audit_head))
    assert not _verify(chain)["intact"]


def test_seals_do_not_verify_under_another_master_key(chain):
    chain.extensions["passerelle.keys"] = {"master": b"\x01" * 32}  # what a node with another key file holds
    with chain.app_context(), db.read() as conn:
        intact, _, message = audit.verify(conn)
    assert not intact and "seal" in message


def test_several_writers_at_once_keep_one_verifiable_chain_while_it_is_verified(app):
    """Writers on separate connections append at once while verify runs again and again: every
    verify sees an intact prefix, and the final chain holds every entry, sealed at each multiple."""
    writers, per_writer = 4, audit.SEAL_EVERY // 2 + 3
    errors: list[BaseException] = []
    done = threading.Event()
    verdicts: list[tuple[bool, int, str]] = []

    def write(n: int) -> None:
        try:
            _write(app, per_writer, actor=f"writer-{n}")
        except BaseException as exc:
            errors.append(exc)

    def verify_repeatedly() -> None:
        with app.app_context():
            while not done.is_set():
                with db.read() as conn:
                    verdicts.append(audit.verify(conn))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    checker = threading.Thread(target=verify_repeatedly)
    checker.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    checker.join()
    assert not errors
    assert verdicts and all(intact for intact, _, _ in verdicts), [v for v in verdicts if not v[0]][:3]
    report = _verify(app)
    assert report["intact"] and report["entries"] == writers * per_writer
    with app.app_context(), db.read() as conn:
        sealed = set(conn.execute(select(audit_seals.c.seq)).scalars())
    assert sealed == {s for s in range(1, writers * per_writer + 1) if s % audit.SEAL_EVERY == 0}
