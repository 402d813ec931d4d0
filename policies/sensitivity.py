"""Sensitive data categories: which categories a resource falls in, and which it inherits.

The rules are data: one file per code system or source under `policies/data/sensitive/`,
each naming its source. `labels.json` maps HL7 v3 sensitivity labels (matched without
regard to case); `snomed-ct.json`, `loinc.json`, `rxnorm.json` are code sets;
`icd-10.json`, `icd-9-cm.json`, `atc.json` are ranges; `terms.json` is the French and
English fall-back term list. Code systems are compared through
`terminology.canonical_system`, so OID spellings match their URI.

`classify` walks every element of a resource (contained resources, components and
extensions included): each Coding (an object with a `code` and a `system` or `display`)
is matched on its code when its system has rules, and on its `display` by the term list
when it has none (a local code); every CodeableConcept `text` is matched by the term
list. The result is the resource's own mask and the references it holds.

A resource also carries the categories of what it references (`propagate`): another
resource of the same patient (never the Patient itself), or a shared resource of a
type in `SHARED_TYPES` (a Medication). Inheritance is transitive: an Observation made
during an Encounter whose diagnosis is an HIV Condition is HIV.

A resource labelled `custodian-only` (a Coding of `RELEASE_SYSTEM` anywhere in it, as
`meta.security` normally; `$score` writes it on every RiskAssessment), or holding any Coding
of `MODEL_SYSTEM` (a Passerelle model's name: `$score`'s `method`, so a score stays withheld
even if an edit drops its label), gets the `CUSTODIAN_ONLY` bit, which no consent can
release (service/release.py). It is inherited like a category: what refers to such a
resource of the same patient (or to a shared one) is custodian-only too.

The masks are stored (`resources.sensitive_mask`), so a research query filters with
`sensitive_mask & excluded_mask = 0`; `VERSION` changes whenever these rules change,
which tells the store to classify everything again.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

from policies.terminology import DATA as CODE_SYSTEMS
from policies.terminology import canonical_system, is_known

CATEGORIES: tuple[str, ...] = ("mental-health", "hiv", "sexual-health", "substance-use", "genetics")
BIT: dict[str, int] = {name: 1 << i for i, name in enumerate(CATEGORIES)}

#: Passerelle's own code system for naming a whole category in a Consent provision.code.
CATEGORY_SYSTEM = "https://passerelle.example/fhir/CodeSystem/sensitive-category"
#: Passerelle's own security labels: `CUSTODIAN_ONLY_CODE` marks a resource that never leaves for research.
RELEASE_SYSTEM = "https://passerelle.example/fhir/CodeSystem/release"
CUSTODIAN_ONLY_CODE = "custodian-only"
CUSTODIAN_ONLY_LABEL: dict[str, str] = {"system": RELEASE_SYSTEM, "code": CUSTODIAN_ONLY_CODE}
#: Names of imported Passerelle models (`$score`'s RiskAssessment.method): every code of it is custodian-only.
MODEL_SYSTEM = "https://passerelle.example/fhir/CodeSystem/model"
#: The mask bit of a custodian-only resource: no category's (those count up from bit 0), in no consent.
CUSTODIAN_ONLY = 1 << 62
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

#: Patient-less resource types whose categories pass to every resource referencing them.
SHARED_TYPES = frozenset({"Medication"})
#: Types whose categories pass to nothing: the compartment's root.
NOT_INHERITED = frozenset({"Patient"})

RULES = Path(__file__).resolve().parent / "data" / "sensitive"
_TERMS_FILE = "terms.json"
#: The keys a CodeableConcept may have: its `text` is read by the term list.
_CONCEPT_KEYS = frozenset({"coding", "text", "id", "extension"})


class RulesError(ValueError):
    """A rules file under policies/data/sensitive is malformed."""


@dataclass(frozen=True)
class _Rules:
    """How one code system's codes map to categories."""

    match: str  # "exact", "label" (exact without regard to case), "range" or "system" (every code: exact[""])
    exact: Mapping[str, int]
    ranges: tuple[tuple[str, str, int], ...]

    def mask(self, code: str) -> int:
        if self.match == "system":
            return self.exact[""]
        if self.match == "exact":
            return self.exact.get(code.strip(), 0)
        if self.match == "label":
            return self.exact.get(code.strip().upper(), 0)
        head = code.strip().upper().replace(".", "")
        mask = 0
        for low, high, bit in self.ranges:
            if low <= head[:len(low)] and head[:len(high)] <= high:
                mask |= bit
        return mask


def _category_bit(name: str, source: str) -> int:
    if name not in BIT:
        raise RulesError(f"{source}: unknown category {name!r} (known: {', '.join(CATEGORIES)})")
    return BIT[name]


def _load_rules(path: Path, data: dict[str, Any]) -> tuple[list[str], _Rules]:
    if not isinstance(data.get("source"), str) or not data["source"]:
        raise RulesError(f"{path.name}: every rules file names its source")
    systems = [canonical_system(s) or "" for s in data.get("systems") or ()]
    if not systems or not all(is_known(s) for s in systems):
        raise RulesError(f"{path.name}: systems must be registered in {CODE_SYSTEMS.name}")
    match = data.get("match")
    exact: dict[str, int] = {}
    ranges: list[tuple[str, str, int]] = []
    if match in ("exact", "label"):
        for category, codes in data["codes"].items():
            bit = _category_bit(category, path.name)
            for code in codes:
                key = code.upper() if match == "label" else code
                exact[key] = exact.get(key, 0) | bit
    elif match == "range":
        for category, bounds in data["ranges"].items():
            bit = _category_bit(category, path.name)
            ranges.extend((low.upper().replace(".", ""), high.upper().replace(".", ""), bit) for low, high in bounds)
    else:
        raise RulesError(f"{path.name}: match must be exact, label or range")
    return systems, _Rules(match, exact, tuple(ranges))


_WORDS = re.compile(r"[a-z0-9]+")


def _normalise(text: str) -> str:
    """Lower case, no accents, every run of other characters one space, padded with spaces."""
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " " + " ".join(_WORDS.findall(text.casefold())) + " "


def _load_terms(data: dict[str, Any]) -> tuple[tuple[re.Pattern[str], int], ...]:
    patterns = []
    for category, terms in data["terms"].items():
        bit = _category_bit(category, _TERMS_FILE)
        words = sorted({_normalise(t).strip() for t in terms}, key=len, reverse=True)
        patterns.append((re.compile(" (?:" + "|".join(re.escape(w) for w in words) + ") "), bit))
    return tuple(patterns)


def _load() -> tuple[dict[str, _Rules], tuple[tuple[re.Pattern[str], int], ...], tuple[str, ...], dict[str, str],
                     str]:
    rules: dict[str, _Rules] = {}
    labels: dict[str, str] = {}
    digest = hashlib.sha256(Path(__file__).read_bytes() + CODE_SYSTEMS.read_bytes())
    terms: dict[str, Any] = {}
    for path in sorted(RULES.glob("*.json")):
        raw = path.read_bytes()
        digest.update(path.name.encode() + raw)
        data = orjson.loads(raw)
        if path.name == _TERMS_FILE:
            terms = data
            continue
        systems, table = _load_rules(path, data)
        if table.match == "label":
            for category, codes in data["codes"].items():
                labels.update((code.upper(), category) for code in codes)
        for system in systems:
            if system in rules:
                raise RulesError(f"{path.name}: {system} already has rules in another file")
            rules[system] = table
    rules[CATEGORY_SYSTEM] = _Rules("exact", dict(BIT), ())
    rules[RELEASE_SYSTEM] = _Rules("exact", {CUSTODIAN_ONLY_CODE: CUSTODIAN_ONLY}, ())
    rules[MODEL_SYSTEM] = _Rules("system", {"": CUSTODIAN_ONLY}, ())
    exceptions = tuple(sorted({_normalise(e) for e in terms.get("except", ())}, key=len, reverse=True))
    return rules, _load_terms(terms), exceptions, labels, digest.hexdigest()[:16]


_RULES, _TERMS, _EXCEPTIONS, LABELS, VERSION = _load()
#: The label written on consents for each category: the first listed for it in labels.json.
LABEL_OF: dict[str, str] = {}
for _code, _category in LABELS.items():
    LABEL_OF.setdefault(_category, _code)


@lru_cache(maxsize=1 << 16)
def terms_mask(text: str) -> int:
    """The categories a free text names (whole words, regardless of accents and case)."""
    normalised = _normalise(text)
    for phrase in _EXCEPTIONS:
        normalised = normalised.replace(phrase, "  ")
    mask = 0
    for pattern, bit in _TERMS:
        if pattern.search(normalised):
            mask |= bit
    return mask


def coding_mask(system: Any, code: Any, display: Any = None) -> int:
    """The categories of one Coding: by its code where its system has rules, else by its display."""
    rules = _RULES.get(canonical_system(system) or "")
    if rules is not None:
        return rules.mask(code) if isinstance(code, str) else 0
    return terms_mask(display) if isinstance(display, str) else 0


@dataclass(frozen=True)
class Classification:
    """A resource's own categories and the references (as written) it holds."""

    mask: int
    references: tuple[str, ...]


def classify(resource: dict[str, Any]) -> Classification:
    """Walk every element of a resource once: its own mask, and every `reference` it holds."""
    mask = 0
    references: list[str] = []
    stack: list[Any] = [resource]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(item for item in node if isinstance(item, (dict, list)))
            continue
        code = node.get("code")
        if isinstance(code, str) and ("system" in node or "display" in node):
            mask |= coding_mask(node.get("system"), code, node.get("display"))
        text = node.get("text")
        if isinstance(text, str) and node.keys() <= _CONCEPT_KEYS:
            mask |= terms_mask(text)
        reference = node.get("reference")
        if isinstance(reference, str):
            references.append(reference)
        stack.extend(value for value in node.values() if isinstance(value, (dict, list)))
    for label in (resource.get("meta") or {}).get("security") or ():
        if isinstance(label, dict) and label.get("system") is None and isinstance(label.get("code"), str):
            mask |= BIT.get(LABELS.get(label["code"].strip().upper(), ""), 0)  # a label written without system
    return Classification(mask, tuple(references))


def mask_of(resource: dict[str, Any]) -> int:
    """The categories a resource falls in by its own content (labels, codes, texts)."""
    return classify(resource).mask


Key = tuple[str, str]


@dataclass(frozen=True)
class Node:
    """A resource to judge: its patient, its own mask and the (type, id) of what it references."""

    patient_id: str | None
    own: int
    targets: tuple[Key, ...]


def inherits(patient_id: str | None, target_type: str, target_patient: str | None) -> bool:
    """Whether a resource of `patient_id` carries the categories of a resource it references."""
    if target_type in SHARED_TYPES:
        return True
    return target_type not in NOT_INHERITED and patient_id is not None and target_patient == patient_id


def with_inherited(node: Node, masks: Mapping[Key, tuple[str | None, int]]) -> int:
    """A node's own mask with those of its targets it inherits from, given (patient, mask) by key."""
    mask = node.own
    for target in node.targets:
        found = masks.get(target)
        if found is not None and inherits(node.patient_id, target[0], found[0]):
            mask |= found[1]
    return mask


def propagate(nodes: Mapping[Key, Node], settled: Mapping[Key, tuple[str | None, int]]) -> dict[Key, int]:
    """The mask of each node: its own categories and, transitively, those of what it inherits from.

    `settled` gives (patient, mask) of referenced resources outside `nodes`, whose masks
    do not depend on any node; references to anything in neither are ignored. The
    result is the least fixed point (a cycle adds nothing of its own).
    """
    known: dict[Key, tuple[str | None, int]] = {**settled, **{k: (n.patient_id, n.own) for k, n in nodes.items()}}
    changed = True
    while changed:
        changed = False
        for key, node in nodes.items():
            mask = with_inherited(node, known)
            if mask != known[key][1]:
                known[key] = (node.patient_id, mask)
                changed = True
    return {key: known[key][1] for key in nodes}


def names(mask: int) -> list[str]:
    return [name for name in CATEGORIES if mask & BIT[name]]


def mask(categories: Iterable[str]) -> int:
    result = 0
    for name in categories:
        result |= BIT[name]
    return result
