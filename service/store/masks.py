"""Sensitivity masks in the store: kept equal to a fresh classification of what is stored.

`resolve` runs inside every `repository.write`: it gives each new version its mask
(its own categories and those it inherits, `policies.sensitivity.propagate`) and
recomputes, in the same transaction, the masks of every stored resource that refers
to a written one, directly or through others (found through the `INHERITS` rows of
`idx_reference`); their `resources` row and current `history` row change together.
`refresh` classifies the whole store again (after the classifier changed) and records
the classifier version it used in `settings`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, and_, bindparam, delete, insert, select, update

from policies.sensitivity import VERSION, Key, Node, classify, propagate, with_inherited
from service.store.indexer import INHERITS, inherited_targets
from service.store.keyed import by_type_and_id
from service.store.schema import history, idx_reference, resources, settings

SETTING = "sensitivity-classifier"
_CHUNK = 500


@dataclass(frozen=True)
class Recomputed:
    """A stored resource whose current version gets a new mask."""

    pk: int
    version: int
    mask: int


def node(patient_id: str | None, resource: dict[str, Any]) -> tuple[Node, list[str]]:
    """A resource's graph node and the references it holds (as written)."""
    found = classify(resource)
    return Node(patient_id, found.mask, tuple(inherited_targets(found.references))), list(found.references)


def resolve(conn: Connection, batch: Mapping[Key, Node], removed: Iterable[Key] = ()
            ) -> tuple[dict[Key, int], list[Recomputed]]:
    """The masks of the versions being written (`removed`: being deleted), and the changed masks
    of the stored resources that refer to them, transitively. Reads only; the caller writes."""
    gone = set(removed)
    referrers: dict[Key, tuple[int, int, int, Node]] = {}  # key → (pk, version, stored mask, node)
    frontier = [*batch, *gone]
    while frontier:
        found = [row for row in _referring(conn, frontier) if (row.type, row.id) not in batch
                 and (row.type, row.id) not in gone and (row.type, row.id) not in referrers]
        frontier = []
        for row in found:
            key = (row.type, row.id)
            if key not in referrers:
                referrers[key] = (row.pk, row.version, row.sensitive_mask,
                                  node(row.patient_id, orjson.loads(row.json))[0])
                frontier.append(key)
    nodes: dict[Key, Node] = {**batch, **{key: item[3] for key, item in referrers.items()}}
    outside = sorted({target for n in nodes.values() for target in n.targets if target not in nodes} - gone)
    masks = propagate(nodes, _settled(conn, outside))
    changed = [Recomputed(pk, version, masks[key]) for key, (pk, version, stored, _) in referrers.items()
               if masks[key] != stored]
    return {key: masks[key] for key in batch}, changed


def apply(conn: Connection, changed: Iterable[Recomputed]) -> None:
    """Store new masks on the current row and the current history row of each resource."""
    params = [{"p": c.pk, "v": c.version, "m": c.mask} for c in changed]
    if not params:
        return
    conn.execute(update(resources).where(resources.c.pk == bindparam("p")).values(sensitive_mask=bindparam("m")),
                 params)
    conn.execute(update(history).where(and_(history.c.resource_pk == bindparam("p"),
                                            history.c.version == bindparam("v")))
                 .values(sensitive_mask=bindparam("m")), params)


def _referring(conn: Connection, targets: list[Key]) -> list[Any]:
    """The current, undeleted resources holding an `INHERITS` reference to one of `targets`."""
    wanted = set(targets)
    ids = sorted({target_id for _, target_id in wanted})
    pks: set[int] = set()
    for start in range(0, len(ids), _CHUNK):
        rows = conn.execute(select(idx_reference.c.resource_pk, idx_reference.c.target_type, idx_reference.c.target_id)
                            .where(idx_reference.c.param == INHERITS,
                                   idx_reference.c.target_id.in_(ids[start:start + _CHUNK])))
        pks.update(pk for pk, target_type, target_id in rows if (target_type, target_id) in wanted)
    found: list[Any] = []
    ordered = sorted(pks)
    for start in range(0, len(ordered), _CHUNK):
        found.extend(conn.execute(
            select(resources.c.pk, resources.c.type, resources.c.id, resources.c.version,
                   resources.c.patient_id, resources.c.sensitive_mask, resources.c.json)
            .where(resources.c.pk.in_(ordered[start:start + _CHUNK]), resources.c.deleted.is_(False))))
    return found


def _settled(conn: Connection, keys: list[Key]) -> dict[Key, tuple[str | None, int]]:
    """(patient, stored mask) of the existing, undeleted resources among `keys`."""
    settled: dict[Key, tuple[str | None, int]] = {}
    for start in range(0, len(keys), _CHUNK):
        rows = conn.execute(
            select(resources.c.type, resources.c.id, resources.c.patient_id, resources.c.sensitive_mask)
            .where(by_type_and_id(keys[start:start + _CHUNK]),
                   resources.c.deleted.is_(False)))
        settled.update({(row.type, row.id): (row.patient_id, row.sensitive_mask) for row in rows})
    return settled


# -- the whole store ---------------------------------------------------------------------------

@dataclass
class Fresh:
    """A fresh classification of every current resource: pk, version, patient, mask and references by key."""

    pk: dict[Key, int]
    version: dict[Key, int]
    patient: dict[Key, str | None]
    masks: dict[Key, int]
    references: dict[Key, list[str]]


def fresh(conn: Connection, progress: Callable[[int], None] = lambda _: None) -> Fresh:
    """Classify every current, undeleted resource from its stored JSON (nothing is written)."""
    nodes: dict[Key, Node] = {}
    result = Fresh({}, {}, {}, {}, {})
    rows = conn.execute(
        select(resources.c.pk, resources.c.type, resources.c.id, resources.c.version, resources.c.patient_id,
               resources.c.json).where(resources.c.deleted.is_(False)).order_by(resources.c.pk)
        .execution_options(yield_per=_CHUNK))
    for row in rows:
        key = (row.type, row.id)
        nodes[key], result.references[key] = node(row.patient_id, orjson.loads(row.json))
        result.pk[key], result.version[key], result.patient[key] = row.pk, row.version, row.patient_id
        progress(1)
    result.masks = propagate(nodes, {})
    return result


def stored_version(conn: Connection) -> str | None:
    """The classifier version the stored masks were computed with (None: never recorded)."""
    return conn.scalar(select(settings.c.value).where(settings.c.name == SETTING))


def refresh(conn: Connection, progress: Callable[[int], None] = lambda _: None) -> dict[str, Any]:
    """Classify every stored resource and version again, rewrite what differs, record the version.

    Current versions get their fresh mask; an older version gets its own categories and
    those of the current resources it references. `progress` is called once per version read.
    """
    now = fresh(conn, progress)
    stored = {pk: (mask, in_history) for pk, mask, in_history in conn.execute(
        select(resources.c.pk, resources.c.sensitive_mask, history.c.sensitive_mask)
        .join(history, and_(history.c.resource_pk == resources.c.pk, history.c.version == resources.c.version))
        .where(resources.c.deleted.is_(False)))}
    current = [Recomputed(now.pk[key], now.version[key], mask) for key, mask in now.masks.items()]
    changed = [c for c in current if stored.get(c.pk) != (c.mask, c.mask)]
    apply(conn, changed)
    _rewrite_inherits(conn, now)
    versions_changed = _refresh_old_versions(conn, now, progress)
    conn.execute(delete(settings).where(settings.c.name == SETTING))
    conn.execute(insert(settings).values(name=SETTING, value=VERSION))
    return {"classifier": VERSION, "resources": len(current), "changed": len(changed),
            "older_versions_changed": versions_changed}


def _rewrite_inherits(conn: Connection, now: Fresh) -> None:
    conn.execute(delete(idx_reference).where(idx_reference.c.param == INHERITS))
    rows = [{"resource_pk": now.pk[key], "patient_id": now.patient[key], "param": INHERITS, "target_type": t,
             "target_id": i} for key, references in now.references.items() for t, i in inherited_targets(references)]
    for start in range(0, len(rows), 5000):
        conn.execute(insert(idx_reference), rows[start:start + 5000])


def _refresh_old_versions(conn: Connection, now: Fresh, progress: Callable[[int], None]) -> int:
    settled = {key: (now.patient[key], mask) for key, mask in now.masks.items()}
    changes: list[dict[str, int]] = []
    rows = conn.execute(
        select(history.c.resource_pk, history.c.version, history.c.patient_id, history.c.sensitive_mask,
               history.c.json)
        .join(resources, resources.c.pk == history.c.resource_pk)
        .where(history.c.version < resources.c.version, history.c.deleted.is_(False))).all()
    for row in rows:
        mask = with_inherited(node(row.patient_id, orjson.loads(row.json))[0], settled)
        if mask != row.sensitive_mask:
            changes.append({"p": row.resource_pk, "v": row.version, "m": mask})
        progress(1)
    if changes:
        conn.execute(update(history).where(and_(history.c.resource_pk == bindparam("p"),
                                                history.c.version == bindparam("v")))
                     .values(sensitive_mask=bindparam("m")), changes)
    return len(changes)
