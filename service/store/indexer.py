"""Extract search-index rows and the patient compartment from a resource (pure).

Runs once per stored version at ingest; the query builder then answers every search
from these rows, never by scanning stored JSON.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from typing import Any

from policies.fhirdates import MAX_US, MIN_US, DateFormatError, date_range
from policies.sensitivity import NOT_INHERITED, SHARED_TYPES
from service.store.searchparams import (
    CLINICAL_DATE,
    COMPARTMENT,
    SearchParam,
    identifier_index,
    identifier_index_of,
    indexed_params,
    of_type_index,
    text_index,
)

Rows = dict[str, list[dict[str, Any]]]
#: Changes whenever `extract` yields other rows for the same resource, so that `init-db`
#: indexes the stored resources again (`service/store/reindex.py`). 2: token text,
#: identifier types and reference identifiers. 3: only relative references (`LOCAL_REFERENCE`)
#: are indexed as references to this server's resources. 4: RiskAssessment's parameters.
VERSION = "4"


def normalise(text: str) -> str:
    """Case- and accent-insensitive form used for string search (`Müller` → `muller`)."""
    if text.isascii():  # nothing to decompose (the common case, at ingest)
        return text.casefold()[:255]
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()[:255]


def walk(node: Any, steps: tuple[tuple[str, str | None, str | None], ...]) -> Iterator[Any]:
    """Yield every value reached by following element names (lists are flattened)."""
    if not steps:
        if isinstance(node, list):
            yield from node
        else:
            yield node
        return
    (name, key, wanted), rest = steps[0], steps[1:]
    items = node if isinstance(node, list) else (node,)
    for item in items:
        if not isinstance(item, dict):
            continue
        child = item.get(name)
        if child is None:
            continue
        for value in child if isinstance(child, list) else (child,):
            if key is not None and (not isinstance(value, dict) or value.get(key) != wanted):
                continue
            yield from walk(value, rest)


#: A literal reference to a resource of this server as it is stored: `Type/id` or `Type/id/_history/v`.
#: (An id outside FHIR's id syntax names nothing stored: such a reference resolves to nothing.)
LOCAL_REFERENCE = re.compile(r"([A-Z][A-Za-z]{0,63})/([^/?#:\s]{1,64})(?:/_history/[^/?#:\s]{1,64})?")
_BARE_ID = re.compile(r"[^/?#:\s]{1,64}")


def parse_reference(ref: str) -> tuple[str | None, str] | None:
    """`Patient/1` or `Patient/1/_history/2` → ("Patient", "1"); a bare id `1` (a search value) →
    (None, "1"); anything else → None: contained (`#x`), `urn:` and conditional references,
    absolute URLs (another server's: the write path stores references to this server's own base
    as relative ones, service/references.py) and odd spellings (`./Patient/1`, `Patient/1/`)."""
    match = LOCAL_REFERENCE.fullmatch(ref)
    if match:
        return match[1], match[2]
    return (None, ref) if _BARE_ID.fullmatch(ref) else None


def _tokens(value: Any, contact: bool) -> Iterable[tuple[str | None, str]]:
    """(system, code) pairs of a code, boolean, Coding, CodeableConcept, Identifier or ContactPoint."""
    if isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, str):
        yield None, value
    elif not isinstance(value, dict):
        return
    elif "coding" in value:
        for coding in value["coding"]:
            if coding.get("code") is not None:
                yield coding.get("system"), coding["code"]
    elif "code" in value:
        yield value.get("system"), value["code"]
    elif "value" in value:
        # A ContactPoint's `system` is a kind (phone, email), not a namespace: match on the value.
        yield (None if contact else value.get("system")), value["value"]


def _token_texts(value: Any) -> Iterable[str]:
    """The text `:text` searches: CodeableConcept.text, Coding.display, Identifier.type.text."""
    if not isinstance(value, dict):
        return
    if isinstance(value.get("text"), str):
        yield value["text"]
    codings = value.get("coding") if isinstance(value.get("coding"), list) else [value]
    for coding in codings:
        if isinstance(coding, dict) and isinstance(coding.get("display"), str):
            yield coding["display"]
    kind = value.get("type")
    if isinstance(kind, dict) and isinstance(kind.get("text"), str):
        yield kind["text"]


def _identifier_types(value: Any) -> Iterable[tuple[str | None, str]]:
    """(type system, `type-code|value`) of an Identifier with a coded type (`:of-type`)."""
    if not isinstance(value, dict) or not isinstance(value.get("value"), str):
        return
    kind = value.get("type")
    for coding in kind.get("coding", ()) if isinstance(kind, dict) else ():
        if isinstance(coding, dict) and coding.get("code") is not None:
            yield coding.get("system"), f"{coding['code']}|{value['value']}"


#: A resource type's name (the longest in R4 has 30 letters): what a derived index name may
#: end with and still fit its column (`searchparams.identifier_index_of`).
_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{0,29}")


def _reference_identifiers(value: Any, target: str | None) -> Iterable[tuple[str | None, str, str | None]]:
    """(system, value, target type if known) of a Reference's identifier (`:identifier`)."""
    if not isinstance(value, dict):
        return
    identifier = value.get("identifier")
    if not isinstance(identifier, dict) or not isinstance(identifier.get("value"), str):
        return
    declared = value.get("type") if isinstance(value.get("type"), str) else None
    parsed = parse_reference(value["reference"]) if isinstance(value.get("reference"), str) else None
    kind = declared or (parsed[0] if parsed else None) or target
    if kind is not None and not _TYPE_NAME.fullmatch(kind):
        kind = None  # e.g. the absolute URL of a logical model: no resource type to index it under
    if target is None or kind == target:
        yield identifier.get("system"), identifier["value"], kind


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key in ("text", "family", "given", "prefix", "suffix", "line", "city", "district", "state",
                    "postalCode", "country"):
            part = value.get(key)
            if isinstance(part, str):
                yield part
            elif isinstance(part, list):
                yield from (p for p in part if isinstance(p, str))


def _dates(value: Any) -> Iterable[tuple[int, int]]:
    if isinstance(value, str):
        yield date_range(value)
    elif isinstance(value, dict) and ("start" in value or "end" in value):
        low = date_range(value["start"])[0] if value.get("start") else MIN_US
        high = date_range(value["end"])[1] if value.get("end") else MAX_US
        yield low, high


def _quantities(value: Any) -> Iterable[tuple[float, str | None, str | None]]:
    if isinstance(value, dict) and isinstance(value.get("value"), (int, float)):
        yield float(value["value"]), value.get("system"), value.get("code") or value.get("unit")


def _references(value: Any, target: str | None) -> Iterable[tuple[str | None, str]]:
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        parsed = parse_reference(value["reference"])
        if parsed and (target is None or parsed[0] == target):
            yield parsed


def _rows_for(param: SearchParam, resource: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    name = param.index_name
    for steps in param.steps:
        for value in walk(resource, steps):
            if param.kind == "token":
                if param.name == "deceased" and isinstance(value, str):
                    value = True  # a death date means deceased
                for system, code in _tokens(value, steps[0][0] == "telecom"):
                    yield "idx_token", {"param": name, "system": system, "code": str(code)[:255]}
                if isinstance(value, dict):
                    for text in _token_texts(value):
                        yield "idx_string", {"param": text_index(param), "value": normalise(text),
                                             "exact": text[:255]}
                    if "type" in value:
                        for system, code in _identifier_types(value):
                            yield "idx_token", {"param": of_type_index(param), "system": system, "code": code[:255]}
            elif param.kind == "string":
                for text in _strings(value):
                    yield "idx_string", {"param": name, "value": normalise(text), "exact": text[:255]}
            elif param.kind == "date":
                try:
                    for low, high in _dates(value):
                        yield "idx_date", {"param": name, "low": low, "high": high}
                except DateFormatError:
                    continue  # the model validated the resource; an unparsable partial date is not indexed
            elif param.kind == "quantity":
                for number, system, code in _quantities(value):
                    yield "idx_quantity", {"param": name, "value": number, "system": system, "code": code}
            else:
                for target_type, target_id in _references(value, param.target):
                    yield "idx_reference", {"param": name, "target_type": target_type, "target_id": target_id}
                for system, code, target_type in (_reference_identifiers(value, param.target)
                                                  if isinstance(value, dict) and "identifier" in value else ()):
                    yield "idx_token", {"param": identifier_index(param), "system": system, "code": code[:255]}
                    if target_type and not param.target:
                        yield "idx_token", {"param": identifier_index_of(name, target_type), "system": system,
                                            "code": code[:255]}


#: The `idx_reference` rows under this name list what a resource may inherit sensitive
#: categories from, so that the resources referring to one that changes are found
#: (`service/store/masks.py`).
INHERITS = "_inherits"
#: Types a resource may inherit categories from: patient-compartment types (the Patient
#: itself excepted) and shared types; other types (Practitioner, Organization, …) have no
#: patient and so never pass categories (`policies.sensitivity.inherits`).
_INHERITABLE = frozenset((set(COMPARTMENT) - NOT_INHERITED) | SHARED_TYPES)


def inherited_targets(references: Iterable[str]) -> list[tuple[str, str]]:
    """The (type, id) of each reference a resource's categories may come from, once each, in order."""
    targets: dict[tuple[str, str], None] = {}
    for reference in references:
        parsed = parse_reference(reference)
        if parsed and parsed[0] in _INHERITABLE and len(parsed[1]) <= 64:
            targets[(parsed[0], parsed[1])] = None
    return list(targets)


def extract(resource_type: str, resource: dict[str, Any], references: Iterable[str] = ()) -> Rows:
    """Index rows for every indexed parameter of the resource, grouped by index table,
    plus an `INHERITS` row for each of `references` (as written) a category may come from."""
    rows: Rows = {}
    seen: set[tuple[Any, ...]] = set()
    for param in indexed_params(resource_type):
        for table, row in _rows_for(param, resource):
            key = (table, *row.values())
            if key not in seen:
                seen.add(key)
                rows.setdefault(table, []).append(row)
    inherited = [{"param": INHERITS, "target_type": target_type, "target_id": target_id}
                 for target_type, target_id in inherited_targets(references)]
    if inherited:
        rows.setdefault("idx_reference", []).extend(inherited)
    return rows


def patient_of(resource_type: str, resource: dict[str, Any]) -> str | None:
    """The id of the patient whose compartment the resource belongs to, if any."""
    if resource_type == "Patient":
        return resource.get("id")
    for element in COMPARTMENT.get(resource_type, ()):
        value = resource.get(element)
        for ref in value if isinstance(value, list) else (value,):
            if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
                parsed = parse_reference(ref["reference"])
                if parsed and parsed[0] == "Patient":
                    return parsed[1]
    return None


def clinical_range(resource_type: str, rows: Rows | None) -> tuple[int | None, int | None]:
    """The span of the resource's clinical date (its type's CLINICAL_DATE parameter), if it has one."""
    param = CLINICAL_DATE.get(resource_type)
    dates = [r for r in (rows or {}).get("idx_date", ()) if r["param"] == param]
    if not dates:
        return None, None
    return min(r["low"] for r in dates), max(r["high"] for r in dates)
