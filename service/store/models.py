"""The `models` table: predictive model documents imported for `$score`, by name.

A row holds the document exactly as imported (its text), the SHA-256 of that text, and when
and by whom it was imported. What a valid document is, is policies/learning.py's to say;
nothing here parses one.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import Connection, delete, insert, select
from sqlalchemy.exc import IntegrityError

from service.db import now_us
from service.errors import Conflict
from service.store.schema import models


@dataclass(frozen=True)
class Stored:
    """One imported model."""

    name: str
    document: str
    digest: str
    imported_at: int
    imported_by: str


def digest_of(document: str) -> str:
    return hashlib.sha256(document.encode()).hexdigest()


def get(conn: Connection, name: str) -> Stored | None:
    row = conn.execute(select(models).where(models.c.name == name)).first()
    return None if row is None else Stored(*row)


def listed(conn: Connection) -> list[Stored]:
    """Every imported model, by name."""
    return [Stored(*row) for row in conn.execute(select(models).order_by(models.c.name))]


def put(conn: Connection, name: str, document: str, actor: str, *, replace: bool) -> Stored:
    """Store `document` under `name` in the caller's transaction; with `replace`, instead of what is
    stored under it, otherwise `Conflict` if a model has that name (two imports at once included)."""
    stored = Stored(name, document, digest_of(document), now_us(), actor)
    if replace:
        conn.execute(delete(models).where(models.c.name == name))
    try:  # the transaction is lost on a conflict: the caller's write rolls back as the error passes
        conn.execute(insert(models).values(name=stored.name, document=stored.document, digest=stored.digest,
                                           imported_at=stored.imported_at, imported_by=stored.imported_by))
    except IntegrityError:
        raise Conflict(f"a model named {name!r} is already imported") from None
    return stored
