"""Golden output: the exact released form of a rich set of resources is pinned.

`tests/data/deid-golden.json.gz` holds 88 stored resources — the hand-written ones of
`test_deid.py`, synthetic ones of every generated type, one resource of every
property-test type with a marker in each text element and extensions on complex
elements and primitives, and resources written for the corners (ages over the
top-coding age, a modifier extension, contained resources, `#`, `urn:uuid:`, versioned,
absolute, conditional and unresolvable references, postal codes by country, meta
security labels) — and their released forms under the shipped default profile (with a
prefetched mapping of row numbers) and under a second profile (in the file) that
rounds times to the day, pseudonymises, generalises to the month, keeps dates
unshifted and keeps extensions on primitives (with a resolver, no mapping).

An optimisation of the engine must leave every byte of every output as it is: any
change of released values, of key order or of labels fails here. A deliberate change
of the rules rewrites the expected outputs in the file (`released` gives them; the inputs
and the second profile stay) and says so in its review.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import orjson
import pytest

from policies.deid import Deidentifier, load_profile, parse_profile
from policies.pseudonym import PseudonymKey
from tests.deid_helpers import DEFAULT_PROFILE, MASTER

GOLDEN = orjson.loads(gzip.decompress((Path(__file__).parent / "data" / "deid-golden.json.gz").read_bytes()))
MAPPING: dict[tuple[Any, ...], int] = {tuple(entry[:-1]): entry[-1] for entry in GOLDEN["pks"]}
CASES = list(enumerate(zip(GOLDEN["inputs"], GOLDEN["owners"], strict=True), start=1))


def released(profile_name: str) -> list[bytes]:
    key = PseudonymKey(MASTER, "golden", 1)
    if profile_name == "default":
        deid = Deidentifier(load_profile(DEFAULT_PROFILE), key, reference_year=2026)
        return [orjson.dumps(deid.apply(resource, pk, owner, MAPPING)) for pk, (resource, owner) in CASES]
    deid = Deidentifier(parse_profile(GOLDEN["second_profile"]), key, reference_year=2026,
                        resolve_pk=lambda kind, ident: MAPPING.get((kind, ident)))
    return [orjson.dumps(deid.apply(resource, pk, owner)) for pk, (resource, owner) in CASES]


@pytest.mark.parametrize("profile_name", ["default", "second"])
def test_every_released_resource_is_byte_for_byte_the_pinned_one(profile_name: str) -> None:
    expected = [orjson.dumps(resource) for resource in GOLDEN[profile_name]]
    actual = released(profile_name)
    differing = [(GOLDEN["inputs"][i]["resourceType"], GOLDEN["inputs"][i]["id"])
                 for i, (a, e) in enumerate(zip(actual, expected, strict=True)) if a != e]
    assert differing == []


def test_the_inputs_are_left_as_they_were() -> None:
    before = orjson.dumps(GOLDEN["inputs"])
    released("default")
    released("second")
    assert orjson.dumps(GOLDEN["inputs"]) == before
