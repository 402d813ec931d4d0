"""Searchset Bundles: paging links with signed keyset cursors, entries from stored JSON.

Stored resources are embedded as raw JSON fragments, so a page is never decoded and
re-encoded on its way out.
"""
from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import urlencode

import orjson
from flask import current_app
from itsdangerous import BadSignature, URLSafeSerializer

from policies.keys import derive_key, load_master_key
from service.errors import InvalidRequest
from service.store import search
from service.store.search import Page, Query


def _serializer() -> URLSafeSerializer:
    key = current_app.extensions.get("passerelle.cursor_key")
    if key is None:
        key = derive_key(load_master_key(current_app.config["MASTER_KEY_FILE"]), "paging-cursor")
        current_app.extensions["passerelle.cursor_key"] = key
    return URLSafeSerializer(key, salt="search-cursor")


def _fingerprint(path: str, echo: list[tuple[str, str]]) -> str:
    return hashlib.sha256(orjson.dumps([path, echo])).hexdigest()[:16]


def decode_cursor(token: str | None, path: str, query: Query) -> tuple[list[Any] | None, bool]:
    """The (anchor, backwards) a `_cursor` carries; refused if tampered with or from another search."""
    if not token:
        return None, False
    try:
        data = _serializer().loads(token)
    except BadSignature:
        raise InvalidRequest("The paging cursor is invalid", expression="_cursor") from None
    if data.get("f") != _fingerprint(path, query.echo):
        raise InvalidRequest("The paging cursor does not belong to this search", expression="_cursor")
    return data["k"], bool(data["b"])


def _link(relation: str, base: str, path: str, echo: list[tuple[str, str]], cursor: str | None = None) -> dict:
    params = list(echo)
    if cursor:
        params.append(("_cursor", cursor))
    query = urlencode(params, safe=":|,")
    return {"relation": relation, "url": f"{base}{path}" + (f"?{query}" if query else "")}


def bundle(page: Page, query: Query, *, base: str, path: str, request_cursor: str | None) -> dict[str, Any]:
    """A searchset Bundle for one page. `base` is the FHIR base URL, `path` like `/Observation`."""
    fingerprint = _fingerprint(path, query.echo)
    serializer = _serializer()
    links = [_link("self", base, path, query.echo, request_cursor), _link("first", base, path, query.echo)]
    if page.previous_key is not None:
        token = serializer.dumps({"f": fingerprint, "k": page.previous_key, "b": True})
        links.append(_link("previous", base, path, query.echo, token))
    if page.next_key is not None:
        token = serializer.dumps({"f": fingerprint, "k": page.next_key, "b": False})
        links.append(_link("next", base, path, query.echo, token))
    result: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if page.total is not None:
        result["total"] = page.total
    result["link"] = links
    entries = [_entry(base, row, "match") for row in page.rows]
    entries += [_entry(base, row, "include") for row in page.included]
    if entries:
        result["entry"] = entries
    return result


def _entry(base: str, row: Any, mode: str) -> dict[str, Any]:
    return {"fullUrl": f"{base}/{row.type}/{row.id}", "resource": orjson.Fragment(row.json), "search": {"mode": mode}}


def run_search(conn: Any, resource_type: str, args: list[tuple[str, str]], *, base: str, strict: bool,
               restrict: search.RowFilter | None = None) -> dict[str, Any]:
    """Parse, execute and render one search request."""
    cursor = next((value for name, value in args if name == "_cursor"), None)
    query = search.parse(resource_type, args, default_count=current_app.config["DEFAULT_PAGE_SIZE"],
                         max_count=current_app.config["MAX_PAGE_SIZE"], strict=strict)
    path = f"/{resource_type}"
    anchor, backwards = decode_cursor(cursor, path, query)
    page = search.run(conn, query, anchor=anchor, backwards=backwards, restrict=restrict)
    return bundle(page, query, base=base, path=path, request_cursor=cursor)
