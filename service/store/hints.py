"""Hints to the query planner, written into the SQL itself.

Queries are written so that their good plan does not depend on the planner's statistics on
SQLite, which has none until `ANALYZE`; on PostgreSQL, which plans from its statistics, a
hint must not hide a column from them.
"""
from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import ColumnElement
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.visitors import InternalTraversal


def unindexed(column: Any) -> Any:
    """`column` where SQLite must not start from an index keyed on it: SQLite, which has no
    statistics unless `ANALYZE`d, checks it on rows it found otherwise (an index table joined
    on `param` and a resource is read by resource, not scanned by `param` across every
    resource). PostgreSQL gets the column itself: it plans from its statistics, and an
    expression it has none for would be estimated at a fraction of a percent of the rows."""
    return _Unindexed(column)


class _Unindexed(ColumnElement[Any]):
    """`unindexed(column)`: `+column` on SQLite (a no-op that no index matches), the column elsewhere."""

    inherit_cache = True
    _traverse_internals: ClassVar = [("column", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: Any) -> None:
        self.column = column
        self.type = column.type


@compiles(_Unindexed)
def _column_itself(element: _Unindexed, compiler: Any, **kw: Any) -> str:
    return compiler.process(element.column, **kw)


@compiles(_Unindexed, "sqlite")
def _unary_plus(element: _Unindexed, compiler: Any, **kw: Any) -> str:
    return f"(+{compiler.process(element.column, **kw)})"
