"""Searchset Bundles: paging links with encrypted keyset cursors.

A cursor carries the last row's sort key, which may hold internal row numbers and
real (unshifted) values, so it is encrypted and authenticated (Fernet), and bound to
the search and to the caller's view (custodian, or one research project).
"""
from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import orjson
from cryptography.fernet import Fernet, InvalidToken
from flask import current_app

from policies.keys import derive_key
from service import keyring
from service.errors import InvalidRequest
from service.store import search
from service.store.search import Page, Query


def _fernet() -> Fernet:
    cipher = current_app.extensions.get("passerelle.cursor_cipher")
    if cipher is None:
        key = derive_key(keyring.master(), "paging-cursor")
        cipher = current_app.extensions["passerelle.cursor_cipher"] = Fernet(base64.urlsafe_b64encode(key))
    return cipher


def _fingerprint(view: str, path: str, echo: list[tuple[str, str]]) -> str:
    return hashlib.sha256(orjson.dumps([view, path, echo])).hexdigest()[:16]


def _encode(payload: dict[str, Any]) -> str:
    return _fernet().encrypt(orjson.dumps(payload)).decode()


def decode_cursor(token: str | None, view: str, path: str, query: Query) -> tuple[list[Any] | None, bool]:
    """The (anchor, backwards) a `_cursor` carries; refused if tampered with or from another search."""
    if not token:
        return None, False
    try:
        data = orjson.loads(_fernet().decrypt(token.encode()))
    except (InvalidToken, orjson.JSONDecodeError, UnicodeError):
        raise InvalidRequest("The paging cursor is invalid", expression="_cursor") from None
    if data.get("f") != _fingerprint(view, path, query.echo):
        raise InvalidRequest("The paging cursor does not belong to this search", expression="_cursor")
    return data["k"], bool(data["b"])


def _link(relation: str, base: str, path: str, echo: list[tuple[str, str]], cursor: str | None = None) -> dict:
    params = list(echo)
    if cursor:
        params.append(("_cursor", cursor))
    query = urlencode(params, safe=":|,")
    return {"relation": relation, "url": f"{base}{path}" + (f"?{query}" if query else "")}


#: Turns stored rows into Bundle entries (fullUrl, resource, search.mode); research de-identifies here.
#: An entry's resource is the JSON text to send (bytes: embedded as is, never re-encoded) or a dict.
Render = Callable[[list[Any], str], list[dict[str, Any]]]


def render_stored(base: str) -> Render:
    """Entries holding the stored JSON as is (the custodian view)."""
    def render(rows: list[Any], mode: str) -> list[dict[str, Any]]:
        return [{"fullUrl": f"{base}/{row.type}/{row.id}", "resource": row.json, "search": {"mode": mode}}
                for row in rows]
    return render


def bundle(page: Page, query: Query, *, base: str, view: str, path: str, request_cursor: str | None,
           render: Render) -> dict[str, Any]:
    """A searchset Bundle for one page. `base` is the FHIR base URL, `path` like `/Observation`."""
    fingerprint = _fingerprint(view, path, query.echo)
    links = [_link("self", base, path, query.echo, request_cursor), _link("first", base, path, query.echo)]
    if page.previous_key is not None:
        token = _encode({"f": fingerprint, "k": page.previous_key, "b": True})
        links.append(_link("previous", base, path, query.echo, token))
    if page.next_key is not None:
        token = _encode({"f": fingerprint, "k": page.next_key, "b": False})
        links.append(_link("next", base, path, query.echo, token))
    result: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if page.total is not None:
        result["total"] = page.total
    result["link"] = links
    entries = (_subsetted(render(page.rows, "match"), query, match=True)
               + _subsetted(render(page.included, "include"), query, match=False))
    for entry in entries:
        if type(entry["resource"]) is bytes:
            entry["resource"] = orjson.Fragment(entry["resource"])
    if entries:
        result["entry"] = entries
    return result


def _subsetted(entries: list[dict[str, Any]], query: Query, *, match: bool) -> list[dict[str, Any]]:
    """The entries with their rendered resources subsetted as `_summary`/`_elements` ask
    (service/subsetting.py): on the research view, subsets of the de-identified forms."""
    if query.subset is None or not query.subset.applies(match=match):
        return entries
    for entry in entries:
        resource = entry["resource"]
        entry["resource"] = query.subset.apply(orjson.loads(resource) if type(resource) is bytes else resource,
                                               match=match)
    return entries


def run_search(conn: Any, resource_type: str, args: list[tuple[str, str]], *, base: str, view: str,
               strict: bool, render: Render, restrict: search.RowFilter,
               echo: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Parse, execute and render one search request.

    `echo` replaces the parameters shown in links (the research view shows the caller's
    pseudonyms, not the real ids it searched with).
    """
    cursor = next((value for name, value in args if name == "_cursor"), None)
    query = search.parse(resource_type, args, default_count=current_app.config["DEFAULT_PAGE_SIZE"],
                         max_count=current_app.config["MAX_PAGE_SIZE"], strict=strict)
    if echo is not None:
        query.echo = echo
    path = f"/{resource_type}"
    anchor, backwards = decode_cursor(cursor, view, path, query)
    page = search.run(conn, query, anchor=anchor, backwards=backwards, restrict=restrict)
    return bundle(page, query, base=base, view=view, path=path, request_cursor=cursor, render=render)
