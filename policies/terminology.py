"""Code systems Passerelle knows: canonical URIs, their OID spellings, and which are known.

One table (`policies/data/code-systems.json`, which names its source) serves every
component that reads codes: the sensitivity classifier matches codes only after
`canonical_system` has turned `urn:oid:2.16.840.1.113883.6.96` (or the bare OID, or a
trailing slash) into `http://snomed.info/sct`; de-identification keeps codings only of
systems `is_known` accepts; `$aggregate` refuses searches naming an unknown system.
`display_of` gives the display text released for a code (`policies/data/displays.json`).
"""
from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import orjson

DATA = Path(__file__).resolve().parent / "data" / "code-systems.json"
DISPLAYS = Path(__file__).resolve().parent / "data" / "displays.json"


@cache
def _table() -> tuple[dict[str, str], frozenset[str], tuple[str, ...], tuple[str, ...]]:
    """(alias → canonical URI, canonical URIs, known URI prefixes, identifier namespaces), read once."""
    data: dict[str, Any] = orjson.loads(DATA.read_bytes())
    aliases: dict[str, str] = {}
    for system in data["systems"]:
        url = system["url"]
        aliases[url] = url
        for oid in system["oids"]:
            aliases[oid] = url
            aliases[f"urn:oid:{oid}"] = url
    return aliases, frozenset(aliases.values()), tuple(data["prefixes"]), tuple(data["identifier_namespaces"])


def canonical_system(system: Any) -> str | None:
    """The canonical URI of a code system as written in a Coding (None if it is not a string).

    OIDs (`urn:oid:…` or bare) of a registered system become its URI; a trailing slash
    is dropped; anything else is returned as written.
    """
    if not isinstance(system, str):
        return None
    trimmed = system.strip().rstrip("/")
    return _table()[0].get(trimmed, trimmed)


def is_known(system: Any) -> bool:
    """Whether a code system is one of the registered systems or of a known family (HL7's)."""
    canonical = canonical_system(system)
    if canonical is None:
        return False
    _, known, prefixes, identifiers = _table()
    if canonical in known:
        return True
    # Under a known family, but a namespace of identifiers (…/sid/us-ssn): its "codes" are people's numbers.
    return canonical.startswith(prefixes) and not canonical.startswith(identifiers)


@cache
def _displays() -> dict[tuple[str, str], str]:
    table: dict[str, dict[str, str]] = orjson.loads(DISPLAYS.read_bytes())["systems"]
    return {(system, code): text for system, codes in table.items() for code, text in codes.items()}


def display_of(system: str, code: str) -> str | None:
    """The display `policies/data/displays.json` gives a code of a canonical system, if any."""
    return _displays().get((system, code))
