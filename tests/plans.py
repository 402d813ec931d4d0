"""Query plans of the statements a request runs: that a page is read in index order, not sorted."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask
from sqlalchemy import event, text

from service import db


def paged_statements(app: Flask, prefix: str, request: Callable[[], Any]) -> list[tuple[str, Any]]:
    """The statements starting with `prefix` and holding a LIMIT that `request()` runs, with their parameters."""
    return statements(app, prefix, request, holding="LIMIT")


def statements(app: Flask, prefix: str, request: Callable[[], Any], holding: str = "") -> list[tuple[str, Any]]:
    """The statements starting with `prefix` (and holding `holding`) that `request()` runs, with their parameters."""
    captured = []

    def capture(_conn, _cursor, statement, parameters, _context, _many):
        if statement.lstrip().startswith(prefix) and holding in statement:
            captured.append((statement, parameters))

    engine = app.extensions["passerelle.engine"]
    event.listen(engine, "before_cursor_execute", capture)
    try:
        request()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return captured


def assert_no_sort_step(app: Flask, statement: str, parameters: Any) -> None:
    """The database can read the statement's rows in the order asked, without sorting them."""
    with app.app_context(), db.read() as conn:
        raw = conn.connection.dbapi_connection.cursor()
        if conn.dialect.name == "sqlite":
            raw.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
            plan = " / ".join(row[3] for row in raw.fetchall())
            assert "TEMP B-TREE" not in plan, plan
        else:
            # With sorting priced out, a Sort node remains only if no plan can read the rows in order.
            conn.execute(text("SET LOCAL enable_seqscan = off"))
            conn.execute(text("SET LOCAL enable_sort = off"))
            raw.execute(f"EXPLAIN {statement}", parameters)
            plan = " / ".join(row[0] for row in raw.fetchall())
            assert "Sort" not in plan, plan
