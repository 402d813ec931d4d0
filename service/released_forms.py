"""Released forms remembered between requests: the de-identified JSON of stored rows, per app.

De-identifying a row (`Deidentifier.apply`) depends only on the project's pseudonym key (its
project and key version), the profile, the reference year, the row (its number, its patient and
its stored JSON) and what the engine finds when it looks up the resources the row references:
whether the project may receive each one now, and its row number. A remembered form is given
again only when all of these are the same: the key, profile, year and row make the look-up key
(the JSON by its BLAKE2b digest), and every reference look-up the engine made when it computed
the form is asked again of the request's own released targets, and must answer the same.

Which rows are released is never remembered: the consent filter runs in every request, and only
the rows it lets through are rendered here. A profile that encrypts is never remembered: each
release must encrypt afresh. Each app keeps at most `MAX_BYTES` of released JSON, dropping the
least recently used forms first. A form is given as JSON text, as it is remembered (`Form`).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import orjson
from flask import current_app

from policies.deid import Deidentifier

MAX_BYTES = 32 * 1024 * 1024

Targets = Mapping[tuple[str, ...], int]
#: Each look-up the engine made, with what it found (None: not released).
Asked = tuple[tuple[tuple[str, ...], int | None], ...]


class Form(NamedTuple):
    """A released form: its resource type, its id (the pseudonym) and its JSON text."""

    resource_type: str
    id: str
    json: bytes


def form_of(released: dict[str, Any]) -> Form:
    """The form of a resource the engine released."""
    return Form(released["resourceType"], released["id"], orjson.dumps(released))


class _Noting(Mapping[tuple[str, ...], int]):
    """Released targets that note every key looked up in them, and what was found."""

    def __init__(self, targets: Targets) -> None:
        self._targets = targets
        self.asked: dict[tuple[str, ...], int | None] = {}
        #: Whether the whole mapping was read (then no list of look-ups describes what was used).
        self.listed = False

    def __getitem__(self, key: tuple[str, ...]) -> int:
        found = self._targets.get(key)
        self.asked[key] = found
        if found is None:
            raise KeyError(key)
        return found

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        self.listed = True
        return iter(self._targets)

    def __len__(self) -> int:
        self.listed = True
        return len(self._targets)


class ReleasedForms:
    """A bounded, thread-safe memory of released forms (see the module docstring)."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._forms: OrderedDict[tuple[Any, ...], tuple[Asked, Form]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._forms)

    def release(self, deid: Deidentifier, row: Any, targets: Targets) -> Form:
        """The released form of a stored row (pk, json, patient_id) under `deid`, whose references
        are followed only to `targets` ((type, id) and (type, id, version) → row number)."""
        if deid.profile.randomised:
            return form_of(deid.apply(orjson.loads(row.json), row.pk, row.patient_id, targets))
        key = (deid.key, deid.profile, deid.reference_year, row.pk, row.patient_id,
               hashlib.blake2b(row.json, digest_size=16).digest())
        with self._lock:
            known = self._forms.get(key)
            if known is not None:
                self._forms.move_to_end(key)
        if known is not None and all(targets.get(target) == found for target, found in known[0]):
            return known[1]
        noting = _Noting(targets)
        # A Deidentifier of its own, so that nothing another row taught it answers a look-up.
        fresh = Deidentifier(deid.profile, deid.key, reference_year=deid.reference_year)
        form = form_of(fresh.apply(orjson.loads(row.json), row.pk, row.patient_id, noting))
        if not noting.listed:
            self._keep(key, (tuple(noting.asked.items()), form))
        return form

    def _keep(self, key: tuple[Any, ...], kept: tuple[Asked, Form]) -> None:
        if len(kept[1].json) > self.max_bytes:
            return
        with self._lock:
            replaced = self._forms.pop(key, None)
            if replaced is not None:
                self.size -= len(replaced[1].json)
            self._forms[key] = kept
            self.size += len(kept[1].json)
            while self.size > self.max_bytes:
                _, dropped = self._forms.popitem(last=False)
                self.size -= len(dropped[1].json)


def of_app() -> ReleasedForms:
    """The current app's released forms (one per app, so one per process in production)."""
    forms = current_app.extensions.get("passerelle.released_forms")
    if forms is None:
        forms = current_app.extensions.setdefault("passerelle.released_forms", ReleasedForms())
    return forms
