"""Referential integrity: literal references to resources on this server must resolve.

A literal reference is a `Reference.reference` of the form `Type/id` (optionally
`/_history/v`: `indexer.LOCAL_REFERENCE`, the one grammar the index, the consent filter and
de-identification read), or the same under this server's own base URL, which `settle`
stores as the relative form. Each must name a resource this server holds and has not
deleted, or one written in the same request (`known`: the other entries of a Bundle). Not
checked, and never taken for a resource of this server: absolute URLs of other servers,
contained references (`#id`), `urn:` references (a transaction resolves those to its
entries first), conditional references (`Type?query`, resolved by a transaction), logical
references (an `identifier` without `reference`) and any other spelling (`./Patient/1`).

`check` costs one database query for a whole set of resources, whatever the number of
references they hold.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, select

from service.errors import UnresolvedReference
from service.store.indexer import LOCAL_REFERENCE
from service.store.keyed import by_type_and_id
from service.store.schema import resources

Key = tuple[str, str]


def target(reference: str, base: str | None = None) -> Key | None:
    """The (type, id) a literal reference to this server names, or None for any other kind."""
    if base and reference.startswith(base + "/"):
        reference = reference[len(base) + 1:]
    match = LOCAL_REFERENCE.fullmatch(reference)
    return (match[1], match[2]) if match else None


def _targets(node: Any, base: str | None, into: set[Key], localise: bool = False) -> None:
    """Add the (type, id) of each literal reference to this server under `node` to `into`; with
    `localise`, also rewrite in place each one under `base` to its relative form."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                found = target(value, base)
                if found is not None:
                    into.add(found)
                    if localise and base and value.startswith(base + "/"):
                        node[key] = value[len(base) + 1:]
            elif isinstance(value, (dict, list)):
                _targets(value, base, into, localise)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, (dict, list)):
                _targets(item, base, into, localise)


def targets(resource: dict[str, Any], base: str | None = None) -> set[Key]:
    """The (type, id) of every literal reference to this server in `resource`."""
    found: set[Key] = set()
    _targets(resource, base, found)
    return found


def references(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """(element path, reference) of every `reference` string under `node`, e.g. ("Observation.subject", …)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield path, value
            else:
                yield from references(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from references(item, f"{path}[{index}]")


def existing(conn: Connection, keys: Sequence[Key]) -> set[Key]:
    """Which of `keys` this server holds and has not deleted."""
    found: set[Key] = set()
    for start in range(0, len(keys), 500):
        rows = conn.execute(select(resources.c.type, resources.c.id)
                            .where(by_type_and_id(keys[start:start + 500]), resources.c.deleted.is_(False)))
        found.update((row.type, row.id) for row in rows)
    return found


def settle(conn: Connection, items: Sequence[tuple[str, dict[str, Any]]], *,
           known: frozenset[Key] | set[Key] = frozenset(), base: str | None = None) -> None:
    """Before `items` — (where, resource) pairs, `where` prefixing the message ("Bundle.entry[2]"
    or "") — are stored: rewrite in place each reference under this server's `base` to its
    relative form (how it is stored and indexed), then raise UnresolvedReference (422,
    `not-found`, naming the element) for the first literal reference that names neither a
    resource in `known` nor a current resource of the database."""
    wanted: set[Key] = set()
    for _, resource in items:
        _targets(resource, base, wanted, localise=True)
    wanted -= known
    if not wanted:
        return
    missing = wanted - existing(conn, sorted(wanted))
    if not missing:
        return
    for where, resource in items:
        for path, reference in references(resource, str(resource.get("resourceType"))):
            key = target(reference, base)
            if key in missing:
                prefix = f"{where}: " if where else ""
                raise UnresolvedReference(
                    f"{prefix}{path}: {reference!r} does not resolve: no current {key[0]} with id {key[1]!r} "
                    "on this server", expression=path)


class Pending:
    """Literal references of a bulk load that did not resolve when their chunk was stored.

    A bulk load (NDJSON) may store a resource before the one it refers to, so its references
    are checked once the whole load is stored: `note` each stored chunk (one query per chunk),
    then `unresolved` (one query) names those that still do not resolve. What was stored stays
    stored: a load is not a transaction.
    """

    def __init__(self, base: str | None = None):
        self.base = base
        self.first: dict[Key, tuple[str, str, str]] = {}  # target → (resource, element path, reference)

    def note(self, conn: Connection, stored: Sequence[dict[str, Any]]) -> None:
        """Remember the references of `stored` (resources with their ids) that do not resolve yet."""
        wanted: set[Key] = set()
        for resource in stored:
            _targets(resource, self.base, wanted)
        wanted -= {(r["resourceType"], r["id"]) for r in stored}
        wanted -= self.first.keys()
        if not wanted:
            return
        missing = wanted - existing(conn, sorted(wanted))
        for resource in stored if missing else ():
            for path, reference in references(resource, resource["resourceType"]):
                key = target(reference, self.base)
                if key in missing and key not in self.first:
                    self.first[key] = (f"{resource['resourceType']}/{resource['id']}", path, reference)

    def unresolved(self, conn: Connection) -> list[str]:
        """One line per target still missing, naming the first stored resource and element that refer to it."""
        if not self.first:
            return []
        found = existing(conn, sorted(self.first))
        return [f"{where} (stored): {path}: {reference!r} does not resolve to a resource of this load or server "
                f"(issue not-found)" for key, (where, path, reference) in sorted(self.first.items())
                if key not in found]
