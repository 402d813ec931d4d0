"""Transaction and batch Bundles (FHIR R4 §3.1.0.11).

A transaction is all-or-nothing: every entry is validated before anything is written,
`urn:uuid:` and conditional references are resolved to server ids (a conditional one after
the entries it may match, the Bundle's own creates included, are written), links of the
narrative to entries (`<a href="urn:uuid:…">`) rewritten likewise, every literal reference
must resolve to the database or to an entry (service/references.py), and the caller's
single database transaction rolls everything back on the first error. A batch runs
each entry in its own savepoint and reports per-entry outcomes. History records each
version under its entry's method (POST, PUT).
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from sqlalchemy import Connection, text

from consent.materialise import overruled_warnings
from service import auditevent, references
from service.errors import (
    Conflict,
    FhirError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    NotSupported,
    PreconditionFailed,
    operation_outcome,
)
from service.store import repository, search
from service.store.repository import Change, Stored
from service.validation import check_type, validate, version_number

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}

#: Answers a GET entry's search (type, parameters) → searchset Bundle; only the HTTP API has one.
SearchFn = Callable[[str, list[tuple[str, str]]], dict[str, Any]]


@dataclass
class Entry:
    """One parsed Bundle entry with its target once resolved."""

    index: int
    method: str
    resource_type: str
    resource_id: str | None
    query: list[tuple[str, str]] | None
    full_url: str | None
    resource: dict[str, Any] | None
    if_none_exist: list[tuple[str, str]] | None
    if_match: int | None
    existing: str | None = None  # id found by If-None-Exist: nothing to write
    version: int | None = None  # a GET entry's `Type/id/_history/version` (vread)
    response: dict[str, Any] = field(default_factory=dict)
    patient_id: str | None = None  # the patient of the resource version written or read


def parse_if_match(value: str | None, where: str = "If-Match") -> int | None:
    """`W/"3"` → 3."""
    if not value:
        return None
    text = value.strip()
    text = text[2:] if text.startswith("W/") else text
    text = text.strip('"')
    if not text.isdigit():
        raise InvalidRequest(f"{where} must be a version ETag like W/\"3\", got {value!r}")
    return int(text)


def _parse_entry(index: int, raw: Any, bundle_type: str) -> Entry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("request"), dict):
        raise InvalidRequest(f"{where}.request is required in a {bundle_type} Bundle", expression=f"{where}.request")
    request = raw["request"]
    method = request.get("method")
    if method not in _ORDER:
        raise InvalidRequest(f"{where}.request.method {method!r} is not supported (GET, POST, PUT, DELETE)",
                             expression=f"{where}.request.method")
    url = request.get("url")
    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"{where}.request.url is required", expression=f"{where}.request.url")
    split = urlsplit(url)
    parts = [p for p in split.path.split("/") if p]
    if not parts:
        raise InvalidRequest(f"{where}.request.url {url!r} names no resource type", expression=f"{where}.request.url")
    resource_type, resource_id = parts[0], parts[1] if len(parts) > 1 else None
    vread = method == "GET" and len(parts) == 4 and parts[2] == "_history"
    if (len(parts) > 2 and not vread) or (resource_id or "x")[0] in "_$":
        raise NotSupported(f"{where}.request.url {url!r}: a Bundle entry takes Type, Type/id, Type?search or (GET) "
                           "Type/id/_history/version; history and operations are answered at their own URLs",
                           expression=f"{where}.request.url")
    check_type(resource_type)
    if resource_type == auditevent.TYPE:
        raise MethodNotAllowed(f"{where}: AuditEvent is the audit trail, read only at /fhir/AuditEvent",
                               expression=f"{where}.request.url")
    query = parse_qsl(split.query, keep_blank_values=True) if split.query else None
    resource = raw.get("resource")
    if method in ("POST", "PUT"):
        validate(resource, resource_type, where=f"{where}.resource")
        if method == "PUT" and resource_id is None and query is None:
            raise InvalidRequest(f"{where}: PUT needs Type/id or a conditional Type?query url")
    elif method in ("DELETE",) and resource_id is None and query is None:
        raise InvalidRequest(f"{where}: DELETE needs Type/id or a conditional Type?query url")
    if resource_id is not None:
        repository.check_id(resource_id)
    if_none_exist = request.get("ifNoneExist")
    return Entry(
        index=index, method=method, resource_type=resource_type, resource_id=resource_id, query=query,
        full_url=raw.get("fullUrl"), resource=resource,
        if_none_exist=parse_qsl(if_none_exist.lstrip("?"), keep_blank_values=True) if if_none_exist else None,
        if_match=parse_if_match(request.get("ifMatch"), f"{where}.request.ifMatch"),
        version=version_number(parts[3], f"{resource_type}/{resource_id}") if vread else None,
    )


def single_match(conn: Connection, resource_type: str, query: list[tuple[str, str]], what: str, *,
                 writing: bool = False) -> str | None:
    """The id of the one resource a conditional interaction's search matches, None for none; 412 for
    several (the search's parameter names are given, never its values, which may identify a patient).
    A search that filters nothing (`_count=1` alone) is refused (400): it would match any resource.

    `writing` (a conditional create or update, which writes when nothing matches): concurrent
    transactions with the same search wait for each other (SQLite's writer lock does it; on
    PostgreSQL a transaction-scoped advisory lock on the search), so two never both create."""
    if all(name.partition(":")[0] in search.RESULT_PARAMS for name, _ in query):
        raise InvalidRequest(f"{what}: the search names no parameter that selects a {resource_type}")
    if writing and conn.dialect.name == "postgresql":
        digest = hashlib.blake2b(orjson.dumps([resource_type, sorted(query)]), digest_size=8).digest()
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": int.from_bytes(digest, "big", signed=True)})
    ids = search.matching_ids(conn, resource_type, query)
    if len(ids) > 1:
        names = ", ".join(sorted({name for name, _ in query}))
        raise PreconditionFailed(f"{what}: more than one {resource_type} matches the search ({names}); "
                                 "make it more selective")
    return ids[0] if ids else None


#: A link of narrative XHTML to a Bundle entry (`<a href="urn:uuid:…">`, `<img src="urn:uuid:…">`).
_NARRATIVE_LINK = re.compile(r"""(\b(?:href|src)\s*=\s*["'])(urn:(?:uuid|oid):[^"']+)(["'])""")


def conditional_update_id(conn: Connection, resource_type: str, query: list[tuple[str, str]],
                          resource: dict[str, Any], what: str) -> str:
    """The id a conditional update (`PUT Type?query`) writes, set on `resource`: the one match's (the
    body's id, if it has one, must be that one: else 400), or with no match the body's id (update as
    create) or a new one; several matches are 412."""
    found = single_match(conn, resource_type, query, what, writing=True)
    sent = resource.get("id")
    if found is not None and sent is not None and sent != found:
        raise InvalidRequest(f"{what}: the resource id {sent!r} is not the id of the {resource_type} the search "
                             "matches", expression=f"{resource_type}.id")
    if found is None and isinstance(sent, str) and sent:
        existing = repository.current(conn, [(resource_type, sent)]).get((resource_type, sent))
        if existing is not None and not existing.deleted:
            raise Conflict(f"{what}: no {resource_type} matches the search, but {resource_type}/{sent} exists: "
                           "the update would replace a resource the search did not select",
                           expression=f"{resource_type}.id")
    resource["id"] = found or (repository.check_id(sent) if isinstance(sent, str) and sent else repository.new_id())
    return resource["id"]


def _rewrite_references(node: Any, resolve: Callable[[str], str], ids: dict[str, str], parent: str = "") -> None:
    """Replace every Reference.reference in place using `resolve`, and each narrative link to a
    Bundle entry's fullUrl by that entry's `Type/id` (FHIR R4 §3.1.0.11.2)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                node[key] = resolve(value)
            elif key == "div" and parent == "text" and isinstance(value, str) and "urn:" in value:
                node[key] = _NARRATIVE_LINK.sub(lambda m: m[1] + ids.get(m[2], m[2]) + m[3], value)
            elif isinstance(value, (dict, list)):
                _rewrite_references(value, resolve, ids, key)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, (dict, list)):
                _rewrite_references(item, resolve, ids, parent)


class _Deferred(Exception):
    """An entry's conditional reference may match an entry of the Bundle not written yet."""


def _resolver(conn: Connection, ids: dict[str, str], where: str, waiting: Counter[str] | None = None,
              own: str = "") -> Callable[[str], str]:
    """Resolves an entry's references: a fullUrl to its entry's `Type/id`, a conditional reference
    (`Type?query`) to the one resource matching it. `waiting` counts by type the entries still to
    be written (the entry itself, of type `own`, among them): a conditional reference to a type
    another of them has is deferred (`_Deferred`)."""
    def unwritten(resource_type: str) -> bool:
        return waiting is not None and waiting[resource_type] > (1 if resource_type == own else 0)

    def resolve(reference: str) -> str:
        if reference in ids:
            return ids[reference]
        if reference.startswith("urn:uuid:") or reference.startswith("urn:oid:"):
            raise InvalidRequest(f"{where}: reference {reference!r} matches no fullUrl in the Bundle")
        if "?" in reference and "/" not in reference.split("?", 1)[0]:
            resource_type, query = reference.split("?", 1)
            check_type(resource_type)
            if unwritten(resource_type):
                raise _Deferred(reference)
            found = single_match(conn, resource_type, parse_qsl(query, keep_blank_values=True),
                                  f"{where}: conditional reference {reference!r}")
            if found is None:
                raise PreconditionFailed(f"{where}: conditional reference {reference!r} matches no resource")
            ids[reference] = f"{resource_type}/{found}"
            return ids[reference]
        return reference
    return resolve


def _respond(entry: Entry, stored: Stored, created: bool) -> None:
    """Answer an entry that wrote or read `stored`."""
    entry.response = {"status": "201 Created" if created else "200 OK",
                      "location": f"{stored.type}/{stored.id}/_history/{stored.version}",
                      "etag": stored.etag, "lastModified": stored.last_modified}
    entry.patient_id = stored.patient_id


def _assign(conn: Connection, entry: Entry, ids: dict[str, str]) -> None:
    """Decide the id each POST/PUT entry will have, so references can point at it."""
    where = f"Bundle.entry[{entry.index}]"
    if entry.method == "POST":
        if entry.if_none_exist is not None:
            entry.existing = single_match(conn, entry.resource_type, entry.if_none_exist, f"{where} ifNoneExist",
                                          writing=True)
        entry.resource_id = entry.existing or repository.new_id()
    elif entry.method == "PUT" and entry.resource_id is None:
        assert entry.query is not None and entry.resource is not None
        entry.resource_id = conditional_update_id(conn, entry.resource_type, entry.query, entry.resource, where)
    if entry.full_url and entry.resource_id:
        ids[entry.full_url] = f"{entry.resource_type}/{entry.resource_id}"


def _refuse_duplicates(conn: Connection, conditional: list[tuple[Entry, list[tuple[str, str]]]]) -> None:
    """After a transaction's writes: each conditional create or update must leave its search matching
    one resource. Two entries whose searches each matched nothing would otherwise both create (a
    duplicate): 412, and the caller rolls the transaction back."""
    for entry, query in conditional:
        if len(search.matching_ids(conn, entry.resource_type, query)) > 1:
            names = ", ".join(sorted({name for name, _ in query}))
            raise PreconditionFailed(f"Bundle.entry[{entry.index}]: another entry of this transaction creates a "
                                     f"{entry.resource_type} its conditional search ({names}) matches too")


def _delete(conn: Connection, entry: Entry) -> None:
    target = entry.resource_id
    if target is None:
        assert entry.query is not None
        target = single_match(conn, entry.resource_type, entry.query, f"Bundle.entry[{entry.index}]")
    if target is None:
        entry.response = {"status": "204 No Content"}
        return
    try:
        stored = repository.remove(conn, entry.resource_type, target, entry.if_match)
    except NotFound:
        stored = None
    entry.response = {"status": "204 No Content", **({"etag": stored.etag} if stored else {})}


def _write(conn: Connection, entries: list[Entry], ids: dict[str, str], base: str | None,
           present: frozenset[tuple[str, str]] = frozenset()) -> None:
    """Resolve references, check that they resolve (to an entry, to `present`, known to exist, or to
    the database), then store every POST/PUT version.

    Conditional references are resolved after the entries they may match are written (the
    Bundle's own creates included): an entry whose conditional reference names a type that
    other entries still to be written have waits for them, in a later batched write (in a cycle,
    what is left is written at once, its conditional references matched against the database)."""
    current = repository.current(conn, [(e.resource_type, e.resource_id) for e in entries
                                        if e.existing is None and e.resource_id and e.method == "PUT"])
    seen: set[tuple[str, str]] = set()
    pending: list[Entry] = []
    for entry in entries:
        assert entry.resource is not None and entry.resource_id is not None
        if entry.existing is not None:
            _respond(entry, repository.read(conn, entry.resource_type, entry.existing), False)
            continue
        key = (entry.resource_type, entry.resource_id)
        if key in seen:
            raise InvalidRequest(f"Bundle.entry[{entry.index}]: {entry.resource_type}/{entry.resource_id} "
                                 "appears twice in the Bundle")
        seen.add(key)
        pending.append(entry)
    known = frozenset(seen) | present
    defer = True
    while pending:
        waiting = Counter(e.resource_type for e in pending)
        ready, later = [], []
        for entry in pending:
            resolve = _resolver(conn, ids, f"Bundle.entry[{entry.index}]", waiting if defer else None,
                                entry.resource_type)
            try:
                _rewrite_references(entry.resource, resolve, ids)
                ready.append(entry)
            except _Deferred:
                later.append(entry)
        defer = bool(ready)  # a round where every entry waits for another: the rest is written at once
        _write_ready(conn, ready, current, known, base)
        pending = later


def _write_ready(conn: Connection, writing: list[Entry], current: dict[tuple[str, str], repository.Current],
                 known: frozenset[tuple[str, str]], base: str | None) -> None:
    """Store entries whose references are resolved, in one batched write."""
    changes: list[Change] = []
    for entry in writing:
        assert entry.resource is not None and entry.resource_id is not None
        where = f"Bundle.entry[{entry.index}]"
        existing = current.get((entry.resource_type, entry.resource_id))
        if entry.method == "PUT":
            if entry.resource.get("id") != entry.resource_id:
                raise InvalidRequest(f"{where}: resource id must equal the id in request.url")
            if entry.if_match is not None and (existing is None or existing.version != entry.if_match):
                raise PreconditionFailed(f"{where}: ifMatch expected version {entry.if_match}")
        changes.append(Change(entry.resource_type, entry.resource_id, entry.resource, existing, entry.method))
    references.settle(conn, [(f"Bundle.entry[{e.index}]", e.resource) for e in writing if e.resource],
                     known=known, base=base)
    written = repository.write(conn, changes)
    for entry, stored, change in zip(writing, written, changes, strict=True):
        _respond(entry, stored, change.current is None or change.current.deleted)
    consents = [(entry, stored) for entry, stored in zip(writing, written, strict=True) if stored.type == "Consent"]
    if consents:
        # A Consent a more recent one overrules is stored all the same, with a warning (README, "Consent").
        warnings = overruled_warnings(conn, [stored.resource() for _, stored in consents])
        for (entry, _), warning in zip(consents, warnings, strict=True):
            if warning:
                entry.response["outcome"] = operation_outcome(warning, code="business-rule", severity="warning")


def _get(conn: Connection, entry: Entry, read_search: SearchFn | None) -> dict[str, Any]:
    if read_search is None:
        raise NotSupported(f"Bundle.entry[{entry.index}]: GET entries are only answered by the HTTP API")
    if entry.resource_id is not None:
        stored = repository.read(conn, entry.resource_type, entry.resource_id) if entry.version is None \
            else repository.vread(conn, entry.resource_type, entry.resource_id, entry.version)
        _respond(entry, stored, False)
        return stored.resource()
    entry.response = {"status": "200 OK"}
    return read_search(entry.resource_type, entry.query or [])


def transaction(conn: Connection, bundle: dict[str, Any], read_search: SearchFn | None, base: str | None = None,
                patients: set[str] | None = None) -> dict[str, Any]:
    """Process a transaction Bundle on `conn`; any error propagates and the caller rolls back.
    `patients` (as in `process`) receives the patients of what it wrote or read."""
    entries = [_parse_entry(i, raw, "transaction") for i, raw in enumerate(bundle.get("entry") or [])]
    ordered = sorted(entries, key=lambda e: _ORDER[e.method])
    ids: dict[str, str] = {}
    conditional: list[tuple[Entry, list[tuple[str, str]]]] = []
    for entry in ordered:
        if entry.method == "DELETE":
            _delete(conn, entry)
        elif entry.method in ("POST", "PUT"):
            query = entry.if_none_exist if entry.method == "POST" else entry.query
            if query is not None and (entry.method == "POST" or entry.resource_id is None):
                conditional.append((entry, query))
            _assign(conn, entry, ids)
    _write(conn, [e for e in ordered if e.method in ("POST", "PUT")], ids, base)
    _refuse_duplicates(conn, conditional)
    results: dict[int, dict[str, Any]] = {}
    for entry in ordered:
        if entry.method == "GET":
            results[entry.index] = _get(conn, entry, read_search)
    if patients is not None:
        patients.update(entry.patient_id for entry in entries if entry.patient_id)
    return _response_bundle("transaction-response", entries, results)


def batch(conn: Connection, bundle: dict[str, Any], read_search: SearchFn | None, base: str | None = None,
          patients: set[str] | None = None) -> dict[str, Any]:
    """Process each batch entry independently, in its own savepoint; `patients` (as in `process`)
    receives the patients of what its entries that succeeded wrote or read."""
    raws = bundle.get("entry") or []
    order = sorted(range(len(raws)), key=lambda i: _ORDER.get((raws[i].get("request") or {}).get("method"), 9)
                   if isinstance(raws[i], dict) else 9)
    by_index: dict[int, dict[str, Any]] = {}
    present: frozenset[tuple[str, str]] | None = None
    for i in order:
        try:
            with conn.begin_nested():
                entry = _parse_entry(i, raws[i], "batch")
                result = None
                if entry.method == "DELETE":
                    _delete(conn, entry)
                elif entry.method == "GET":
                    result = _get(conn, entry, read_search)
                else:
                    if present is None:  # once the deletes are done: one look-up for every entry's references
                        present = _existing_targets(conn, raws, base)
                    _assign(conn, entry, {})
                    _write(conn, [entry], {}, base, present)
            item: dict[str, Any] = {"response": entry.response}
            if result is not None:
                item["resource"] = result
            if patients is not None and entry.patient_id:
                patients.add(entry.patient_id)
        except FhirError as exc:
            item = {"response": {"status": f"{exc.status} {_REASONS.get(exc.status, 'Error')}",
                                 "outcome": exc.outcome()}}
        by_index[i] = item
    outcomes = [by_index[i] for i in range(len(raws))]
    return {"resourceType": "Bundle", "type": "batch-response", "entry": outcomes}


def _existing_targets(conn: Connection, raws: list[Any], base: str | None) -> frozenset[tuple[str, str]]:
    """Which resources the POST and PUT entries of a batch refer to exist in the database."""
    wanted: set[tuple[str, str]] = set()
    for raw in raws:
        request = raw.get("request") if isinstance(raw, dict) else None
        if isinstance(request, dict) and request.get("method") in ("POST", "PUT") \
                and isinstance(raw.get("resource"), dict):
            wanted |= references.targets(raw["resource"], base)
    return frozenset(references.existing(conn, sorted(wanted)))


_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
            410: "Gone", 412: "Precondition Failed", 422: "Unprocessable Entity"}


def _response_bundle(kind: str, entries: list[Entry], results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    out = []
    for entry in entries:
        item: dict[str, Any] = {"response": entry.response}
        if entry.index in results:
            item["resource"] = results[entry.index]
        out.append(item)
    return {"resourceType": "Bundle", "type": kind, "entry": out}


def process(conn: Connection, bundle: Any, read_search: SearchFn | None = None, base: str | None = None,
            patients: set[str] | None = None) -> dict[str, Any]:
    """Dispatch a Bundle POSTed to the base URL by its type; one of `repository.LARGE_WRITE` entries
    or more refreshes the planner's statistics in the same transaction. References under `base`
    (this server's FHIR base URL) are checked like relative ones (service/references.py).
    `patients`, when given, receives the patient of each resource version the Bundle's entries
    wrote or read by id (the patients its searches return are for `read_search` to note)."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InvalidRequest("POST to the base URL takes a Bundle of type transaction or batch")
    kind = bundle.get("type")
    if kind not in ("transaction", "batch"):
        raise InvalidRequest(f"Bundle.type {kind!r} cannot be processed here; use transaction or batch",
                             expression="Bundle.type")
    if not isinstance(bundle.get("entry", []), list):
        raise InvalidRequest("Bundle.entry must be a list", expression="Bundle.entry")
    response = (transaction if kind == "transaction" else batch)(conn, bundle, read_search, base, patients)
    if len(response["entry"]) >= repository.LARGE_WRITE:
        repository.refresh_statistics(conn)
    return response
