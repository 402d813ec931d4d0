"""De-identification of FHIR R4 resources by a declarative, default-deny profile.

A profile is an ordered list of rules (`policies/profiles/README.md` documents the
format). It is checked against the FHIR R4B element definitions when it is loaded and
compiled, once per resource type, into a plan: for every element a ready-made action,
so de-identifying a resource is a walk over plain dicts with one dictionary look-up per
key and no pattern matching.

What every released resource is guaranteed, whatever the profile says:

* **Default deny**: an element that no rule releases is removed, and so is every key
  that is not a FHIR element of its parent.
* `id` is the project's pseudonym of the stored row; every `Reference.reference` that
  points at a stored resource is rewritten to `Type/<pseudonym>` the same way, so a
  research client can follow it; `urn:uuid:` references get a keyed pseudonym UUID.
  A Reference whose target cannot be followed (not stored, or not in the caller's
  mapping) is removed whole, its `type` included; a versioned reference, when a mapping
  is given, only if the mapping names that version. `Reference.display` and
  `Reference.identifier` are always removed (they embed names and identifier values).
* The narrative `text` is removed; `meta` keeps only a numeric `versionId` and the
  `security` codings of released code systems, to which the `PSEUDED` label (and
  `ABSTRED` when a value was generalised) is added.
* **Free text never leaves by a container**: inside a released element, an element of a
  text type (string, markdown, URIs, ids, base64Binary) is removed unless a rule names
  it, and a code unless it belongs to its required value set. Data types follow their
  own rules wherever they sit: a Coding is released only for a code system the profile
  releases (`Profile.released_system`), as its canonical system, code and version, with
  no display but the one `policies.terminology.display_of` gives; a Quantity keeps its
  value and comparator, its UCUM code also as unit, never its written unit; Money an
  ISO currency; SampledData its data only if it is a list of numbers.
* An extension stays only if a rule keeps its URL, with only the sub-extensions (by
  `url`) and value types its rule lists; on a primitive (`_x`) only if its rule says
  `primitives`. An element carrying a `modifierExtension` that no rule keeps is
  removed, because its meaning depends on it.
* A date, dateTime or instant is released unshifted only if a rule names it directly
  with `keep`; inside any other released element it is shifted by the patient's offset
  (and removed from a resource of no patient), its time written in UTC and rounded as
  the profile's `round_times` says; a `time` of day is rounded the same way.
* Ages over the profile's `max_age` are top-coded wherever they are released (`Age`,
  a Range of ages, the value of an Observation or component with an age code), the
  resource marked `ABSTRED` and age-top-coded; an unreadable age is removed.
* Element ids (`id` inside data types) are removed; contained resources keep their
  local ids and are de-identified by the rules of their own type.
* A required element that was removed is replaced by a data-absent-reason extension
  (`masked`), so the output still validates against the R4B models.

The engine works on dicts as `orjson` loads them and never mutates its input.
"""
from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache, partial
from pathlib import Path
from typing import Any

import orjson
import yaml

from policies.generalize import (
    MAX_AGE,
    ROUNDINGS,
    PostalRule,
    generalized_postal_code,
    is_age_code,
    is_time_quantity,
    postal_rules,
    released_age,
    released_age_range,
    round_time,
    shift_date,
)
from policies.pseudonym import PseudonymError, PseudonymKey
from policies.terminology import canonical_system, display_of, is_known

METHODS = ("keep", "redact", "pseudonymise", "dateshift", "generalize", "encrypt")
SECURITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
PSEUDED = {"system": SECURITY_SYSTEM, "code": "PSEUDED", "display": "pseudonymized"}
ABSTRED = {"system": SECURITY_SYSTEM, "code": "ABSTRED", "display": "abstracted"}
REDACTED = {"system": SECURITY_SYSTEM, "code": "REDACTED", "display": "redacted"}
DATA_ABSENT_REASON = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
#: Marks a resource in which a birth year or an age was top-coded (ages over `max_age` aggregated).
TOP_CODED_AGE = "https://passerelle.example/fhir/StructureDefinition/age-top-coded"

_DATE_TYPES = frozenset({"date", "dateTime", "instant"})
_STRING_TYPES = frozenset({"string", "markdown"})
#: Primitive types that can carry any text: released only where a rule names the element.
_FREE_TEXT = frozenset({"string", "markdown", "uri", "url", "canonical", "oid", "uuid", "id", "base64Binary", "xhtml"})
UCUM = "http://unitsofmeasure.org"
_QUANTITIES = frozenset({"Quantity", "Age", "Count", "Distance", "Duration", "MoneyQuantity", "SimpleQuantity"})
_COMPARATORS = frozenset({"<", "<=", ">=", ">"})
_QUANTITY_CODING = ("unit", "system", "code")
_UCUM_CODE = re.compile(r"[!-~]{1,40}")  # printable ASCII without spaces, as UCUM's grammar
_CURRENCY = re.compile(r"[A-Z]{3}")
#: Released versions of a code system: dotted numbers, a date, or a SNOMED CT edition URI.
_VERSION = re.compile(r"\d{1,4}(?:\.\d{1,4}){0,3}|\d{8}|http://snomed\.info/sct/\d{1,18}(?:/version/\d{8})?")
_DECIMAL = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
_SAMPLED_DATA = re.compile(rf"(?:{_DECIMAL}|[ELU])(?: (?:{_DECIMAL}|[ELU]))*")
#: The types each method can transform; keep and redact apply to every element.
_APPLIES: dict[str, frozenset[str]] = {
    "dateshift": _DATE_TYPES | {"Period", "Timing"},
    "pseudonymise": _STRING_TYPES | {"code", "id", "uri", "Identifier", "ContactPoint"},
    "encrypt": _STRING_TYPES,
    "generalize:to": frozenset({"date", "dateTime"}),
    "generalize:countries": frozenset({"string"}),
}
#: Root elements the engine manages itself: no rule may name them.
_ENGINE_ROOT = frozenset({"id", "meta", "text"})
_EXTENSIONS = frozenset({"extension", "modifierExtension"})
_RULE_KEYS = frozenset({"path", "method", "url", "to", "top_code", "countries", "why", "extensions", "values",
                        "primitives"})
_EXTENSION_PARAMS = frozenset({"extensions", "values", "primitives"})
_PARAMS: dict[str, frozenset[str]] = {"generalize": frozenset({"to", "top_code", "countries"}),
                                      "keep": _EXTENSION_PARAMS}
_PATH = re.compile(r"(\*|[A-Z][A-Za-z]*)(\.[a-z][A-Za-z0-9]*(\[x\])?)+")
_SCALARS = frozenset({str, int, float, bool})
_DAR = orjson.dumps({"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "masked"}]})
_HISTORY_VERSION = re.compile(r"[A-Za-z0-9\-.]{1,64}")


class ProfileError(ValueError):
    """A profile cannot be loaded: the message names the file, the rule and the problem."""


class DeidentificationError(ValueError):
    """The input is not a resource the engine can de-identify (no or unknown resourceType)."""


class _Drop:
    """The result of an action that releases nothing."""

    __slots__ = ()


_DROP = _Drop()


class _Withheld(Exception):
    """An element carries a modifier extension no rule keeps: the element must go."""


# -- the FHIR R4B element definitions, read from the fhir.resources models ---------------------

@dataclass(frozen=True, slots=True)
class _Element:
    key: str        # the JSON property: "valueQuantity"
    name: str       # the element name in a path: "value[x]" for a choice, else the key
    type: str       # FHIR type code: "dateTime", "CodeableConcept", "ObservationComponent", "Resource"
    many: bool
    required: bool  # min >= 1; for a choice, the choice as a whole
    codes: frozenset[str] = frozenset()  # a code's required value set, when the R4B models list it

    @property
    def primitive(self) -> bool:
        return self.type[0].islower()


@cache
def _model(type_name: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class  # slow to import: only when compiling
    return get_fhir_model_class(type_name)


@lru_cache(maxsize=4096)  # bounded: released Reference.type values reach it too
def _is_resource_type(name: str) -> bool:
    from fhir.resources.R4B.resource import Resource
    try:
        return issubclass(_model(name), Resource)
    except ValueError:
        return False


@cache
def _elements(type_name: str) -> dict[str, _Element]:
    """The elements of a resource, data type or backbone element, by JSON property."""
    out: dict[str, _Element] = {}
    for field_name, info in _model(type_name).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        kind = _type_of(info.annotation) if extra.get("element_property") else None
        if kind is None:
            continue
        key = info.alias or field_name
        choice = extra.get("one_of_many")
        required = info.is_required() or bool(extra.get("element_required") or extra.get("one_of_many_required"))
        out[key] = _Element(key, f"{choice}[x]" if choice else key, kind[0], kind[1], required,
                            frozenset(extra.get("enum_values") or ()))
    return out


def _type_of(annotation: Any) -> tuple[str, bool] | None:
    """(FHIR type code, repeats) of a model field's annotation; None for what is not an element."""
    many = False
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return None
            annotation = args[0]
        elif origin is list:
            many, annotation = True, typing.get_args(annotation)[0]
        elif origin is typing.Annotated:
            names = [getattr(m, "__visit_name__", None) for m in typing.get_args(annotation)[1:]]
            found = [n for n in names if isinstance(n, str)]
            return (found[0], many) if found else None
        else:
            break
    if annotation is bool:
        return "boolean", many
    name = getattr(annotation, "__name__", "")
    return (name[:-4], many) if name.endswith("Type") and name != "FHIRPrimitiveExtensionType" else None


# -- profiles -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """One profile rule, as written, with its position (lower wins)."""

    index: int
    path: str
    scope: str                  # a resource type, or "*"
    segments: tuple[str, ...]
    method: str
    url: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def applies_to(self, element_type: str) -> bool:
        """Whether this rule's method can transform an element of this FHIR type."""
        return self.method in ("keep", "redact") or element_type in self.transforms

    @property
    def transforms(self) -> frozenset[str]:
        """The FHIR types a transforming method (not keep or redact) works on."""
        if self.method == "generalize":
            return _APPLIES["generalize:to" if "to" in self.params else "generalize:countries"]
        return _APPLIES[self.method]

    @property
    def behaviour(self) -> tuple[Any, ...]:
        """What the rule does, independent of where it is written (plans are shared by it)."""
        return self.method, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in self.params.items()))


class Profile:
    """A checked profile. Compiles, and caches, one plan per resource type on first use."""

    def __init__(self, name: str, rules: Iterable[Rule], source: str = "<memory>",
                 code_systems: Iterable[str] = (), *, max_age: int = MAX_AGE,
                 round_times: str | None = None) -> None:
        self.name = name
        self.source = source
        self.rules = tuple(rules)
        #: Whether a release under it differs each time (it encrypts, and encryption is randomised).
        self.randomised = any(rule.method == "encrypt" for rule in self.rules)
        self.max_age = max_age  # ages over it are top-coded wherever they appear
        self.round_times = round_times  # released times are truncated to the hour or the day, or kept
        self.code_systems = frozenset(canonical_system(s) for s in code_systems)
        self._plans: dict[str, _Plan] = {}
        self._systems: dict[Any, str | None] = {}
        self._codings: dict[tuple[Any, Any, Any], tuple[str, str, str | None, str | None] | None] = {}

    def released_system(self, system: Any) -> str | None:
        """The canonical URI of a code system whose codings are released, None for any other.

        Released are the systems `policies.terminology.is_known` accepts and those the
        profile lists in `code_systems`; OID spellings become the canonical URI.
        """
        try:
            return self._systems[system]
        except KeyError:
            pass
        except TypeError:  # not hashable: not a system
            return None
        canonical = canonical_system(system)
        released = canonical if canonical and (canonical in self.code_systems or is_known(canonical)) else None
        if len(self._systems) < 4096:
            self._systems[system] = released
        return released

    def released_coding(self, system: Any, code: Any, version: Any) -> tuple[str, str, str | None, str | None] | None:
        """What a Coding with this system, code and version releases: (canonical system, code,
        version or None, display or None), or None if its system is not released or its code
        is not a string.

        The version is released when it is a version number, a date or a SNOMED CT edition;
        the display is the one `policies.terminology.display_of` gives, if any.
        """
        wanted = (system, code, version)
        try:
            return self._codings[wanted]
        except KeyError:
            pass
        except TypeError:  # not hashable: no such part is released
            return self._released_coding(system, code, version)
        if len(self._codings) >= 4096:
            self._codings.clear()
        released = self._codings[wanted] = self._released_coding(system, code, version)
        return released

    def _released_coding(self, system: Any, code: Any, version: Any) -> tuple[str, str, str | None, str | None] | None:
        canonical = self.released_system(system)
        if canonical is None or type(code) is not str:
            return None
        kept = version if type(version) is str and _VERSION.fullmatch(version) else None
        return canonical, code, kept, display_of(canonical, code)

    def __repr__(self) -> str:
        return f"Profile({self.name!r}, {len(self.rules)} rules, from {self.source})"

    def plan_for(self, resource_type: str) -> _Plan:
        """The compiled plan of one resource type (DeidentificationError if it is not one)."""
        plan = self._plans.get(resource_type)
        if plan is None:
            if not isinstance(resource_type, str) or not _is_resource_type(resource_type):
                raise DeidentificationError(f"{resource_type!r} is not a FHIR R4B resource type")
            plan = self._plans[resource_type] = _Compiler(self, resource_type).root()
        return plan


def load_profile(path: str | Path) -> Profile:
    """Read and check a profile file: JSON, or YAML when it ends in .yaml or .yml."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"{source}: cannot read the profile: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) if source.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{source}: not valid {'YAML' if source.suffix in ('.yaml', '.yml') else 'JSON'}: "
                           f"{exc}") from exc
    return parse_profile(data, source=str(source), default_name=source.stem)


def parse_profile(data: Any, *, source: str = "<memory>", default_name: str = "profile") -> Profile:
    """Check a profile given as parsed JSON; ProfileError names the first problem found."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile is an object with a 'rules' list")
    unknown = sorted(set(data) - {"name", "description", "rules", "code_systems", "max_age", "round_times"})
    if unknown:
        raise ProfileError(f"{source}: unknown profile keys {unknown} "
                           "(expected name, description, rules, code_systems, max_age, round_times)")
    systems = data.get("code_systems", [])
    if not isinstance(systems, list) or not all(isinstance(s, str) and ":" in s for s in systems):
        raise ProfileError(f"{source}: 'code_systems' must be a list of code system URIs (or urn:oid:…)")
    max_age, round_times = data.get("max_age", MAX_AGE), data.get("round_times")
    if not _is_int(max_age) or not 0 < max_age < 150:
        raise ProfileError(f"{source}: 'max_age' must be an age in years (ages over it are top-coded)")
    if round_times is not None and round_times not in ROUNDINGS:
        raise ProfileError(f"{source}: 'round_times' must be one of {', '.join(ROUNDINGS)} (or absent)")
    rules_data = data.get("rules")
    if not isinstance(rules_data, list) or not rules_data:
        raise ProfileError(f"{source}: 'rules' must be a non-empty list")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{source}: 'name' must be a non-empty string")
    rules = [_parse_rule(index, item, source) for index, item in enumerate(rules_data)]
    _check_reachable(rules, source)
    return Profile(name, rules, source, systems, max_age=max_age, round_times=round_times)


def _parse_rule(index: int, item: Any, source: str) -> Rule:
    where = f"{source}: rule {index + 1}"
    if not isinstance(item, dict):
        raise ProfileError(f"{where}: a rule is an object with 'path' and 'method'")
    unknown = sorted(set(item) - _RULE_KEYS)
    if unknown:
        raise ProfileError(f"{where}: unknown keys {unknown}")
    path, method = item.get("path"), item.get("method")
    if not isinstance(item.get("why", ""), str):
        raise ProfileError(f"{where}: 'why' is a comment: a string")
    if not isinstance(path, str) or not _PATH.fullmatch(path):
        raise ProfileError(f"{where}: bad path {path!r}: expected '<ResourceType or *>.<element>[.<element>…]' "
                           "with FHIR element names, e.g. 'Observation.value[x]'")
    where = f"{where} ({path})"
    if method not in METHODS:
        raise ProfileError(f"{where}: unknown method {method!r} (one of {', '.join(METHODS)})")
    scope, *segments = path.split(".")
    params = {k: item[k] for k in item if k in _PARAMS.get(method, ())}
    stray = sorted(set(item) - {"path", "method", "url", "why"} - set(params))
    if stray:
        raise ProfileError(f"{where}: method {method} takes no {stray}")
    if method == "generalize":
        _check_generalize(params, segments, where)
    rule = Rule(index, path, scope, tuple(segments), method, item.get("url"), params)
    if scope != "*" and not _is_resource_type(scope):
        raise ProfileError(f"{where}: unknown resource type {scope!r}")
    _check_rule_path(rule, where)
    return rule


def _check_generalize(params: dict[str, Any], segments: list[str], where: str) -> None:
    if ("to" in params) == ("countries" in params):
        raise ProfileError(f"{where}: generalize needs either 'to' (year or month) or 'countries' (postal codes)")
    if "to" in params:
        if params["to"] not in ("year", "month"):
            raise ProfileError(f"{where}: 'to' must be 'year' or 'month'")
        if params.get("top_code", False) not in (True, False) or (params.get("top_code") and params["to"] != "year"):
            raise ProfileError(f"{where}: 'top_code' is true or false, with 'to': 'year' (a birth date)")
        return
    if segments[-1] != "postalCode" or "top_code" in params:
        raise ProfileError(f"{where}: 'countries' generalises an Address.postalCode, alone")
    try:
        postal_rules(params["countries"])
    except ValueError as exc:
        raise ProfileError(f"{where}: {exc}") from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_rule_path(rule: Rule, where: str) -> None:
    """Check what can be checked of a path: all of it for a resource type, its form for '*'."""
    head, last = rule.segments[0], rule.segments[-1]
    if head in _ENGINE_ROOT:
        raise ProfileError(f"{where}: {head!r} is managed by the engine and cannot be named by a rule")
    if rule.url is not None or last in _EXTENSIONS:
        _check_extension_rule(rule, where)
        return
    if rule.params and rule.method == "keep":
        raise ProfileError(f"{where}: {', '.join(sorted(rule.params))} choose what of an extension is kept: "
                           "only a rule with a 'url' takes them")
    if any(s in _EXTENSIONS for s in rule.segments):
        raise ProfileError(f"{where}: extensions are selected by URL: use a rule on "
                           f"'{rule.scope}.extension' with a 'url'")
    if rule.scope == "*":
        return
    finals = _resolve(rule.scope, rule.segments, where)
    if not any(rule.applies_to(e.type) for e in finals):
        kinds = ", ".join(sorted({e.type for e in finals}))
        raise ProfileError(f"{where}: method {rule.method} cannot apply to {kinds} "
                           f"(it applies to {', '.join(sorted(rule.transforms))})")


def _check_extension_rule(rule: Rule, where: str) -> None:
    if len(rule.segments) != 1 or rule.segments[0] not in _EXTENSIONS:
        raise ProfileError(f"{where}: a rule with a 'url' has the path '<ResourceType or *>.extension' "
                           "(or .modifierExtension): an extension's URL names it wherever it appears")
    if not isinstance(rule.url, str) or not rule.url:
        raise ProfileError(f"{where}: an extension rule needs the extension's 'url'")
    if rule.method not in ("keep", "redact"):
        raise ProfileError(f"{where}: an extension is kept or redacted (dates in it are shifted)")
    subs = rule.params.get("extensions", [])
    if not isinstance(subs, list) or not all(isinstance(u, str) and u for u in subs):
        raise ProfileError(f"{where}: 'extensions' lists the 'url's of the sub-extensions to keep")
    values = rule.params.get("values", [])
    allowed = sorted(e.type for e in _elements("Extension").values() if e.name == "value[x]")
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ProfileError(f"{where}: 'values' lists the FHIR types of the values to keep, e.g. ['Coding']")
    for value in values:
        if value not in allowed:
            hint = difflib.get_close_matches(value, allowed, n=1)
            raise ProfileError(f"{where}: {value!r} is not a type an extension value can have"
                               + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if not isinstance(rule.params.get("primitives", False), bool):
        raise ProfileError(f"{where}: 'primitives' is true or false")


def _resolve(scope: str, segments: tuple[str, ...], where: str) -> list[_Element]:
    """The elements a typed path names (several for a choice), or ProfileError."""
    types_here = [scope]
    for depth, segment in enumerate(segments):
        found = [e for t in types_here for e in _elements(t).values()
                 if e.key == segment or (segment.endswith("[x]") and e.name == segment)]
        if not found:
            known = sorted({e.name for t in types_here for e in _elements(t).values()})
            hint = difflib.get_close_matches(segment, known, n=1)
            raise ProfileError(f"{where}: {'/'.join(types_here)} has no element {segment!r}"
                               + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        if depth == len(segments) - 1:
            return found
        inner = [e for e in found if not e.primitive and e.type not in ("Reference", "Resource")]
        if not inner:
            kind = found[0].type
            reason = {"Reference": "references are rewritten by the engine: keep or redact the whole Reference",
                      "Resource": "contained resources follow the rules of their own type"}.get(
                kind, f"it is a primitive ({kind})")
            raise ProfileError(f"{where}: cannot descend into {segment!r}: {reason}")
        types_here = [e.type for e in inner]
    raise AssertionError("unreachable: a path has at least one element")


def _check_reachable(rules: list[Rule], source: str) -> None:
    """Refuse a rule that an earlier keep/redact rule always decides first (first match wins)."""
    decided = _Deciding()
    for later in rules:
        earlier = decided.first_deciding(later)
        if earlier is not None:
            raise ProfileError(
                f"{source}: rule {later.index + 1} ({later.path}) can never apply: rule {earlier.index + 1} "
                f"({earlier.path}, {earlier.method}) comes first and covers it. Rules are ordered and the "
                "first match wins: put the more specific rule first")
        decided.add(later)


@dataclass(slots=True)
class _Segments:
    """A tree of the path segments of rules: the rule ending at each node, and its children."""

    rule: Rule | None = None
    children: dict[str, _Segments] = field(default_factory=dict)
    choices: dict[str, _Segments] = field(default_factory=dict)  # "value[x]"'s child under "value"


class _Deciding:
    """The rules seen so far that decide whatever a later rule names, indexed so that finding the first
    of them costs a walk along the later rule's path, not a comparison with every earlier rule.

    An earlier rule decides a later one when it applies to the same resource type (or to every type,
    `*`) and either both select the same extension (`url`) at the same path, or neither selects an
    extension, the earlier one keeps or redacts, and its path is a prefix of the later one's in which a
    choice segment (`value[x]`) also stands for each of its typed names (`valueQuantity`)."""

    def __init__(self) -> None:
        self.trees: dict[str, _Segments] = {}
        self.extensions: dict[tuple[str, str, tuple[str, ...]], Rule] = {}

    def add(self, rule: Rule) -> None:
        if rule.url is not None:
            self.extensions.setdefault((rule.scope, rule.url, rule.segments), rule)
            return
        if rule.method not in ("keep", "redact"):
            return
        node = self.trees.setdefault(rule.scope, _Segments())
        for segment in rule.segments:
            child = node.children.get(segment)
            if child is None:
                child = node.children[segment] = _Segments()
                if segment.endswith("[x]"):
                    node.choices[segment[:-3]] = child
            node = child
        node.rule = rule  # none ended here before: that one would decide this one, which is refused

    def first_deciding(self, later: Rule) -> Rule | None:
        scopes = {"*", later.scope}
        if later.url is not None:
            found = [self.extensions.get((scope, later.url, later.segments)) for scope in scopes]
        else:
            found = [rule for scope in scopes if scope in self.trees
                     for rule in _ending_along(self.trees[scope], later.segments)]
        return min((rule for rule in found if rule is not None), key=lambda rule: rule.index, default=None)


def _ending_along(node: _Segments, segments: tuple[str, ...]) -> Iterator[Rule]:
    """The rules of the tree whose paths lead along `segments` (each ends on its way or at its end)."""
    if node.rule is not None:
        yield node.rule
    if not segments:
        return
    segment, rest = segments[0], segments[1:]
    exact = node.children.get(segment)
    if exact is not None:
        yield from _ending_along(exact, rest)
    for base, choice in node.choices.items():
        if segment.startswith(base) and segment[len(base):len(base) + 1].isupper():
            yield from _ending_along(choice, rest)


# -- compiled plans -----------------------------------------------------------------------------

Action = Callable[[Any, "_Context"], Any]
#: Completes a released object from its source: (source, released, context), changing `released`.
WholeRule = Callable[[dict[str, Any], dict[str, Any], "_Context"], None]


@dataclass(slots=True)
class _Plan:
    """What to do with each key of one kind of object, and what must be present after."""

    fields: dict[str, Action] = field(default_factory=dict)
    required: tuple[tuple[tuple[str, ...], str, bytes], ...] = ()  # (any of these keys, else set key, to)
    whole: tuple[WholeRule, ...] = ()  # rules that read the whole object: see `_whole_rules`


class _Trie:
    """The rules of one resource type arranged by path."""

    __slots__ = ("children", "deep_min", "rules")

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.children: dict[str, _Trie] = {}
        self.deep_min = _NEVER  # lowest rule index strictly below this node

    def add(self, rule: Rule) -> None:
        node = self
        for segment in rule.segments:
            node.deep_min = min(node.deep_min, rule.index)
            node = node.children.setdefault(segment, _Trie())
        node.rules.append(rule)


_NEVER = 1 << 62


class _Compiler:
    """Builds the plan of one resource type from the profile and the R4B element definitions."""

    def __init__(self, profile: Profile, resource_type: str) -> None:
        self.profile = profile
        self.resource_type = resource_type
        self.trie = _Trie()
        self.urls: dict[str, Rule] = {}
        for rule in profile.rules:
            if rule.scope not in ("*", resource_type):
                continue
            if rule.url is None:
                self.trie.add(rule)
            else:
                self.urls.setdefault(rule.url, rule)
        self.memo: dict[tuple[Any, ...], _Plan] = {}
        self.extensions: dict[str, Action] = {}  # by URL, for extension and modifierExtension alike
        self.primitive_extensions: dict[str, Action] = {}  # by URL, on a primitive's `_x`
        self.on_primitives = any(r.method == "keep" and r.params.get("primitives") for r in self.urls.values())

    def root(self) -> _Plan:
        for url, rule in self.urls.items():
            if rule.method == "keep":
                self.extensions[url] = action = partial(_extension, self.plan("Extension", (), rule))
                if rule.params.get("primitives"):
                    self.primitive_extensions[url] = action
        return self.plan(self.resource_type, (self.trie,), None, root=True)

    def plan(self, type_name: str, nodes: tuple[_Trie, ...], inherited: Rule | None, root: bool = False) -> _Plan:
        """The plan of one object type under the rules at `nodes` and the rule it inherits."""
        key = (type_name, tuple(id(n) for n in nodes),
               (inherited.index if nodes else inherited.behaviour) if inherited else None, root)
        plan = self.memo.get(key)
        if plan is not None:
            return plan
        plan = self.memo[key] = _Plan()  # registered first: data types are recursive
        elements = _elements(type_name)
        for element in elements.values():
            if element.key in _ENGINE_ROOT if root else element.key == "id":
                continue
            action = self.field(type_name, element, nodes, inherited)
            if action is not None:
                plan.fields[element.key] = action
                if element.primitive and self.on_primitives:
                    plan.fields["_" + element.key] = partial(_each_optional if element.many else _primitive_extension,
                                                             self.primitive_extensions)
        plan.required = _required(type_name)
        plan.whole = (*self.datatype_rules(type_name), *_whole_rules(type_name, plan.fields, self.profile.max_age))
        return plan

    def field(self, owner: str, element: _Element, nodes: tuple[_Trie, ...], inherited: Rule | None) -> Action | None:
        """The action for one element, or None to drop it."""
        if element.key in _EXTENSIONS:
            return self.extension_field(owner, element, inherited)
        if owner == "Extension" and element.key == "url":
            return _keep  # the URL the extension was chosen by
        matching = [c for n in nodes for c in {n.children.get(element.key), n.children.get(element.name)} if c]
        here = [r for c in matching for r in c.rules if r.applies_to(element.type)]
        decided = min([*here, *([inherited] if inherited else [])], key=lambda r: r.index, default=None)
        limit = decided.index if decided else _NEVER
        deeper = tuple(c for c in matching if c.deep_min < limit)
        if decided is not None and decided.method == "redact":
            decided = None
        direct = decided in here
        if owner == "Extension" and element.name == "value[x]" and decided is not None and "values" in decided.params:
            if element.type not in decided.params["values"]:
                return None
            direct = True  # the extension's rule names this type of value
        if element.primitive:
            return _primitive_action(element, decided, direct, self.profile) if decided else None
        if element.type == "Resource":
            return partial(_each, partial(_contained, self.profile)) if decided else None
        if element.type == "Reference":
            reference = partial(_reference, self.extensions)
            return (partial(_each, reference) if element.many else reference) if decided else None
        if decided is None and not deeper:
            return None
        inner = self.plan(element.type, deeper, decided)
        return partial(_each_walk, inner) if element.many else partial(_walk, inner)

    def datatype_rules(self, type_name: str) -> tuple[WholeRule, ...]:
        """The rules of a data type that complete (or refuse) what its plan released of it."""
        if type_name == "Coding":
            return (partial(_finish_coding, self.profile.released_coding),)
        if type_name in _QUANTITIES:
            return (_finish_quantity,)
        finish = {"Money": _finish_money, "SampledData": _finish_sampled_data}.get(type_name)
        return () if finish is None else (finish,)

    def extension_field(self, owner: str, element: _Element, inherited: Rule | None) -> Action | None:
        if owner == "Extension" and inherited is not None:
            # Inside a kept extension: the sub-extensions its rule lists by `url` (local names).
            urls = inherited.params.get("extensions", ())
            sub = partial(_extension, self.plan("Extension", (), inherited))
            return partial(_extensions, dict.fromkeys(urls, sub)) if urls else None
        if element.key == "modifierExtension":
            return partial(_modifier_extensions, self.extensions)
        return partial(_extensions, self.extensions)


@cache
def _required(type_name: str) -> tuple[tuple[tuple[str, ...], str, bytes], ...]:
    """For each required element (or choice): the keys that satisfy it, and the placeholder.

    The placeholder is a data-absent-reason extension (`masked`): on the element itself
    when it is complex, on its `_x` sibling when it is primitive. A required choice of
    primitives only (Immunization.occurrence[x]) must carry a value for the R4B models, so
    it gets the fixed text "masked" in its string form (every such choice has one).
    """
    groups: dict[str, list[_Element]] = {}
    for element in _elements(type_name).values():
        if element.required and element.key != "id":
            groups.setdefault(element.name, []).append(element)
    out = []
    for variants in groups.values():
        keys = tuple(k for e in variants for k in (e.key, "_" + e.key))
        complex_variant = next((e for e in variants if not e.primitive), None)
        if complex_variant is not None:
            key, value, many = complex_variant.key, _placeholder(complex_variant.type), complex_variant.many
        elif len(variants) > 1:
            text = next(e for e in variants if e.type == "string")
            key, value, many = text.key, "masked", text.many
        else:
            key, value, many = "_" + variants[0].key, _placeholder(variants[0].type), variants[0].many
        out.append((keys, key, orjson.dumps([value] if many else value)))
    return tuple(out)


def _placeholder(type_name: str) -> dict[str, Any]:
    """A data-absent-reason value of a type, with placeholders for its own required elements."""
    value: dict[str, Any] = orjson.loads(_DAR)
    if type_name[0].isupper() and type_name != "Resource":
        for _keys, key, encoded in _required(type_name):
            value[key] = orjson.loads(encoded)
    return value


# -- actions: each takes (value, context) and returns the released value or _DROP --------------

@dataclass(slots=True)
class _Context:
    """The state of one `Deidentifier.apply` call."""

    deid: Deidentifier
    offset: int | None
    pks: Mapping[tuple[str, ...], int] | None
    local_ids: frozenset[str] = frozenset()
    missing: set[tuple[str, str]] = field(default_factory=set)
    abstracted: bool = False
    top_coded: bool = False


def _walk(plan: _Plan, node: Any, ctx: _Context) -> Any:
    """Release an object: its kept keys, transformed; placeholders for removed required ones."""
    if type(node) is not dict:
        return _DROP
    try:
        out = _release(plan, node, ctx)
    except _Withheld:
        return _DROP
    for rule in plan.whole:
        rule(node, out, ctx)
    if not out:
        return _DROP
    if plan.required:
        _fill_required(plan, out)
    return out


def _release(plan: _Plan, node: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    """The kept keys of an object, transformed (raises _Withheld from a modifier extension)."""
    out = {}
    get = plan.fields.get
    for key, value in node.items():
        action = get(key)
        if action is _keep:  # most leaves: inlined, a call costs as much as the rest of the loop
            if type(value) in _SCALARS:
                out[key] = value
        elif action is not None:
            result = action(value, ctx)
            if result is not _DROP:
                out[key] = result
    return out


def _fill_required(plan: _Plan, out: dict[str, Any]) -> None:
    present = out.keys()
    for keys, key, encoded in plan.required:
        if present.isdisjoint(keys):
            out[key] = orjson.loads(encoded)


def _each(action: Action, values: Any, ctx: _Context) -> Any:
    if type(values) is not list:
        return _DROP
    out = []
    for value in values:
        result = action(value, ctx)
        if result is not _DROP:
            out.append(result)
    return out or _DROP


def _each_walk(plan: _Plan, values: Any, ctx: _Context) -> Any:
    """`_each` of `_walk`, without a call between them: repeating objects are many."""
    if type(values) is not list:
        return _DROP
    out = []
    for value in values:
        result = _walk(plan, value, ctx)
        if result is not _DROP:
            out.append(result)
    return out or _DROP


def _each_value(action: Action, values: Any, ctx: _Context) -> Any:
    """A repeating primitive: all items transform or none is released (keeps `_x` alignment)."""
    if type(values) is not list:
        return _DROP
    out = []
    for value in values:
        result = None if value is None else action(value, ctx)
        if result is _DROP:
            return _DROP
        out.append(result)
    return out if any(v is not None for v in out) else _DROP


def _each_optional(extensions: dict[str, Action], values: Any, ctx: _Context) -> Any:
    """The `_x` array of a repeating primitive: position-aligned, None where nothing is kept."""
    if type(values) is not list:
        return _DROP
    out = [None if v is None or (r := _primitive_extension(extensions, v, ctx)) is _DROP else r for v in values]
    return out if any(v is not None for v in out) else _DROP


def _keep(value: Any, ctx: _Context) -> Any:
    return value if type(value) in _SCALARS else _DROP


def _shift(rounding: str | None, instant: bool, value: Any, ctx: _Context) -> Any:
    if ctx.offset is None or type(value) is not str:
        return _DROP  # a date of no patient cannot be shifted consistently: it is not released
    return ctx.deid._shift(value, ctx.offset, rounding, instant)


def _round_time(rounding: str | None, value: Any, ctx: _Context) -> Any:
    rounded = round_time(value, rounding) if type(value) is str else None
    return _DROP if rounded is None else rounded


def _pseudonymise(value: Any, ctx: _Context) -> Any:
    return ctx.deid.key.pseudonymise_value(value) if type(value) is str and value else _DROP


def _encrypt(value: Any, ctx: _Context) -> Any:
    return ctx.deid.key.encrypt(value) if type(value) is str and value else _DROP


def _to_year(max_age: int | None, value: Any, ctx: _Context) -> Any:
    if type(value) is not str or len(value) < 4 or not (value[:4].isascii() and value[:4].isdigit()):
        return _DROP
    year = int(value[:4])
    ctx.abstracted = True
    reference_year = ctx.deid.reference_year
    if max_age is not None and reference_year - year > max_age:
        # Every birth year that may mean an age above max_age becomes the same year and is
        # marked, including the boundary year, so the mark itself reveals nothing more.
        ctx.top_coded = True
        year = reference_year - max_age - 1
    return f"{year:04d}"


def _to_month(value: Any, ctx: _Context) -> Any:
    if type(value) is not str or len(value) < 4 or not (value[:4].isascii() and value[:4].isdigit()):
        return _DROP
    ctx.abstracted = True
    return value[:7] if len(value) >= 7 else value[:4]


class _ByCountry:
    """`generalize` with `countries`: a postal code by the rule of its Address's country.

    The country is a sibling, so the Address's plan applies it (`release`, a whole-object
    rule); as a field action it releases nothing.
    """

    __slots__ = ("rules",)

    def __init__(self, rules: Mapping[str, PostalRule]) -> None:
        self.rules = rules

    def __call__(self, value: Any, ctx: _Context) -> Any:
        return _DROP

    def release(self, source: dict[str, Any], out: dict[str, Any], ctx: _Context) -> None:
        code = generalized_postal_code(source.get("postalCode"), source.get("country"), self.rules)
        if code is not None:
            out["postalCode"] = code
            ctx.abstracted = True


def _whole_rules(type_name: str, fields: dict[str, Action], max_age: int) -> tuple[WholeRule, ...]:
    """The rules of an object type that read the whole object, for the elements its plan releases.

    * an `Age`, and a `Range` of ages (a Range in a choice that allows an Age but not any
      Quantity, or an element named `age`), is top-coded over `max_age` years, its unit
      honoured;
    * the `value[x]` of an object whose `code` is an age code (an age Observation or
      component) likewise, and its `valueQuantity` in a unit of time whatever its code
      (a duration over `max_age` years is an age);
    * a postal code generalised by country reads the Address's `country`.
    """
    elements = _elements(type_name)
    rules: list[WholeRule] = []
    for key, element in elements.items():
        if key not in fields or element.many:
            continue
        if element.type == "Age":
            rules.append(partial(_age_element, released_age, key, max_age))
        elif element.type == "Range" and (element.key == "age" or _choice_of_ages(elements, element.name)):
            rules.append(partial(_age_element, released_age_range, key, max_age))
    if "code" in elements and any(k in fields for k in ("valueQuantity", "valueRange", "valueInteger")):
        rules.append(partial(_coded_age, max_age))
    postal = fields.get("postalCode")
    if isinstance(postal, _ByCountry):
        rules.append(postal.release)
    return tuple(rules)


def _choice_of_ages(elements: dict[str, _Element], name: str) -> bool:
    """Whether a choice holds ages: it allows an Age but not any Quantity (as Extension.value[x] does)."""
    kinds = {e.type for e in elements.values() if e.name == name}
    return "Age" in kinds and "Quantity" not in kinds


AgeJudge = Callable[[dict[str, Any], Any, int], tuple[dict[str, Any] | None, bool]]


def _age_element(judge: AgeJudge, key: str, max_age: int, source: dict[str, Any], out: dict[str, Any],
                 ctx: _Context) -> None:
    released = out.get(key)
    if type(released) is not dict:
        return
    kept, top_coded = judge(released, source.get(key), max_age)
    if kept is None:
        del out[key]
    else:
        out[key] = kept
    if top_coded:
        ctx.abstracted = ctx.top_coded = True


def _coded_age(max_age: int, source: dict[str, Any], out: dict[str, Any], ctx: _Context) -> None:
    """The value of an Observation or component: with an age code, top-coded like an Age (an
    integer read in years); with any other code, a valueQuantity in a unit of time likewise."""
    if not is_age_code(source.get("code")):
        if is_time_quantity(source.get("valueQuantity")):
            _age_element(released_age, "valueQuantity", max_age, source, out, ctx)
        return
    _age_element(released_age, "valueQuantity", max_age, source, out, ctx)
    _age_element(released_age_range, "valueRange", max_age, source, out, ctx)
    if "valueInteger" in out:
        years = out["valueInteger"]
        if type(years) is not int or years > max_age:
            ctx.abstracted = ctx.top_coded = True
            out["valueInteger"] = max_age + 1


def _primitive_action(element: _Element, rule: Rule, direct: bool, profile: Profile) -> Action | None:
    """The transformation of a primitive element under the rule that decides it (None: drop it).

    Inside a released element, text (string, markdown, URIs, ids, binary data) is dropped
    and a code is released only if it is one of its required value set's codes: only a
    rule naming the element itself releases them.
    """
    method = rule.method
    if method == "generalize":
        params = rule.params
        if "countries" in params:
            return _ByCountry(postal_rules(params["countries"]))
        if params["to"] == "year":
            action: Action = partial(_to_year, profile.max_age if params.get("top_code") else None)
        else:
            action = _to_month
    elif method == "encrypt":
        action = _encrypt
    elif method == "pseudonymise" and (direct or element.key == "value"):
        action = _pseudonymise  # directly named, or the value of an Identifier/ContactPoint
    elif element.type in _DATE_TYPES and not (method == "keep" and direct):
        # A date inside a released element is shifted: only a rule naming the date itself
        # with keep releases it unshifted, so no keep on a container leaks exact dates.
        action = partial(_shift, profile.round_times, element.type == "instant")
    elif element.type == "time":
        action = partial(_round_time, profile.round_times)  # a time of day links releases like a date's time
    elif not direct and element.type in _FREE_TEXT:
        return None
    elif not direct and element.type == "code":
        if not element.codes:
            return None
        action = partial(_member, element.codes)
    else:
        action = _keep
    return partial(_each_value, action) if element.many else action


def _member(codes: frozenset[str], value: Any, ctx: _Context) -> Any:
    return value if type(value) is str and value in codes else _DROP


def _primitive_extension(extensions: dict[str, Action], value: Any, ctx: _Context) -> Any:
    """The `_x` sibling of a primitive: only its kept extensions."""
    if type(value) is not dict:
        return _DROP
    kept = _extensions(extensions, value.get("extension"), ctx)
    return _DROP if kept is _DROP else {"extension": kept}


def _extensions(extensions: dict[str, Action], values: Any, ctx: _Context) -> Any:
    if type(values) is not list:
        return _DROP
    out = []
    for item in values:
        url = item.get("url") if type(item) is dict else None
        action = extensions.get(url) if type(url) is str else None
        if action is not None and (result := action(item, ctx)) is not _DROP:
            out.append(result)
    return out or _DROP


def _extension(plan: _Plan, value: Any, ctx: _Context) -> Any:
    """A kept extension, released only if a value or a sub-extension survives beside its url."""
    out = _walk(plan, value, ctx)
    return out if out is not _DROP and len(out) > 1 else _DROP


def _finish_coding(released_coding: Callable[[Any, Any, Any], tuple[str, str, str | None, str | None] | None],
                   value: dict[str, Any], out: dict[str, Any], ctx: _Context | None = None) -> None:
    """A Coding of a released code system: its canonical system, code and version (when it is
    a version number, a date or a SNOMED CT edition); a display only from the shipped table
    (or where a rule names it). Any other Coding is emptied, so that it is not released."""
    released = released_coding(value.get("system"), value.get("code"), value.get("version"))
    if released is None:
        out.clear()
        return
    system, code, version, display = released
    out["system"], out["code"] = system, code
    if version is not None:
        out["version"] = version
    if display is not None and "display" not in out:
        out["display"] = display


def _finish_quantity(value: dict[str, Any], out: dict[str, Any], ctx: _Context) -> None:
    """A Quantity keeps its value and comparator; a UCUM code is kept and is also its unit.

    The written unit is never released, nor a code of another system.
    """
    if not out.keys().isdisjoint(_QUANTITY_CODING):
        for key in _QUANTITY_CODING:
            out.pop(key, None)
    comparator = value.get("comparator")
    if type(comparator) is str and comparator in _COMPARATORS:
        out["comparator"] = comparator
    code, system = value.get("code"), value.get("system")
    if type(code) is str and _UCUM_CODE.fullmatch(code) and (system == UCUM or canonical_system(system) == UCUM):
        out["system"], out["code"], out["unit"] = UCUM, code, code


def _finish_money(value: dict[str, Any], out: dict[str, Any], ctx: _Context) -> None:
    """Money keeps its value and an ISO 4217 currency code."""
    currency = value.get("currency")
    if type(currency) is str and _CURRENCY.fullmatch(currency):
        out["currency"] = currency


def _finish_sampled_data(value: dict[str, Any], out: dict[str, Any], ctx: _Context) -> None:
    """SampledData keeps `data` only if it is a list of decimals or E, L, U, separated by spaces."""
    data = value.get("data")
    if "data" not in out and type(data) is str and _SAMPLED_DATA.fullmatch(data):
        out["data"] = data


def _modifier_extensions(extensions: dict[str, Action], values: Any, ctx: _Context) -> Any:
    kept = _extensions(extensions, values, ctx)
    if type(values) is list and (kept is _DROP or len(kept) != len(values)):
        raise _Withheld
    return kept


def _reference(extensions: dict[str, Action], value: Any, ctx: _Context) -> Any:
    """A Reference: its target rewritten to a pseudonym, its type, its kept extensions; no display."""
    if type(value) is not dict:
        return _DROP
    out: dict[str, Any] = {}
    target = value.get("reference")
    if type(target) is str:
        rewritten = ctx.deid._rewrite_reference(target, ctx)
        if rewritten is None:
            return _DROP  # even its type would say that something withheld exists
        out["reference"] = rewritten
    kind = value.get("type")
    if type(kind) is str and _is_resource_type(kind):
        out["type"] = kind
    if "extension" in value and (kept := _extensions(extensions, value["extension"], ctx)) is not _DROP:
        out["extension"] = kept
    return out or _DROP


def _contained(profile: Profile, value: Any, ctx: _Context) -> Any:
    """A contained resource: its own type's rules, its local id kept for `#id` references."""
    if type(value) is not dict or type(value.get("id")) is not str:
        return _DROP
    kind = value.get("resourceType")
    try:
        plan = profile.plan_for(kind)
    except DeidentificationError:
        return _DROP
    return {"resourceType": kind, "id": value["id"], **_release_resource(plan, value, ctx)[0]}


# -- the engine ---------------------------------------------------------------------------------

class Deidentifier:
    """Applies one profile with one project's key. Cheap to build: plans live in the Profile.

    `resolve_pk(type, id)` returns the stored row number of a referenced resource, or None
    if it is not stored; `apply` may also be given a prefetched {(type, id): pk} mapping
    for a batch, which is consulted first; with a mapping, a versioned reference is
    followed only if the mapping also holds its (type, id, version). Found pseudonyms are
    cached for the life of the Deidentifier (one request), misses for one `apply` call;
    so are the patients' date offsets, shifted dates and rewritten references.
    """

    #: Entries per cache; a full cache is emptied. With the key's own memory of pseudonyms,
    #: the caches of one Deidentifier hold about 10 MB at most however large an export is.
    _CACHE_LIMIT = 16_384

    def __init__(self, profile: Profile, key: PseudonymKey, *, reference_year: int,
                 resolve_pk: Callable[[str, str], int | None] | None = None) -> None:
        if not isinstance(profile, Profile) or not isinstance(key, PseudonymKey):
            raise TypeError("Deidentifier needs a Profile and a PseudonymKey")
        if not _is_int(reference_year) or not 1900 <= reference_year <= 9999:
            raise ValueError("reference_year must be a calendar year")
        self.profile = profile
        self.key = key
        self.reference_year = reference_year
        self._resolve_pk = resolve_pk
        self._targets: dict[tuple[str, str], str] = {}
        self._offsets: dict[str, int] = {}
        self._shifted: dict[tuple[str, int, str | None, bool], Any] = {}
        #: literal reference -> (target, its pseudonym, released form); valid while `_targets` agrees
        self._references: dict[str, tuple[tuple[str, str] | None, str | None, str]] = {}

    def apply(self, resource: dict[str, Any], pk: int, patient_id: str | None,
              pks: Mapping[tuple[str, ...], int] | None = None) -> dict[str, Any]:
        """The released form of a stored resource (row `pk`, in `patient_id`'s compartment).

        The input is not modified. Dates are shifted by the patient's offset for this
        project; a resource of no patient has its dates removed. Raises
        DeidentificationError if the input is not a resource, PseudonymError for a bad pk.
        """
        if not isinstance(resource, dict):
            raise DeidentificationError("a resource is a JSON object")
        kind = resource.get("resourceType")
        plan = self.profile.plan_for(kind)
        own = self.key.pseudonym(kind, pk)
        if type(resource.get("id")) is str:
            self._remember((kind, resource["id"]), own)
        ctx = _Context(self, self._offset(patient_id) if patient_id else None, pks,
                       _local_ids(resource, plan) if "contained" in resource else frozenset())
        out: dict[str, Any] = {"resourceType": kind, "id": own}
        body, withheld = _release_resource(plan, resource, ctx)
        labels = _LABELS[withheld, ctx.abstracted]
        out["meta"] = _meta(resource.get("meta"), labels, self.profile.released_coding)
        out.update(body)
        if ctx.top_coded:
            out["extension"] = [*out.get("extension", ()), {"url": TOP_CODED_AGE, "valueBoolean": True}]
        return out

    def _offset(self, patient_id: str) -> int:
        if type(patient_id) is not str:
            return self.key.date_offset_days(patient_id)  # which refuses it
        offset = self._offsets.get(patient_id)
        if offset is None:
            if len(self._offsets) >= self._CACHE_LIMIT:
                self._offsets.clear()
            offset = self._offsets[patient_id] = self.key.date_offset_days(patient_id)
        return offset

    def _shift(self, value: str, offset: int, rounding: str | None, instant: bool) -> Any:
        """`shift_date` of a value (_DROP for None), remembered: a patient's dates repeat."""
        wanted = (value, offset, rounding, instant)
        shifted = self._shifted.get(wanted)
        if shifted is None:
            if len(self._shifted) >= self._CACHE_LIMIT:
                self._shifted.clear()
            shifted = shift_date(value, offset, rounding, instant=instant)
            shifted = self._shifted[wanted] = _DROP if shifted is None else shifted
        return shifted

    def _rewrite_reference(self, reference: str, ctx: _Context) -> str | None:
        """The released form of a literal reference, or None if it cannot be followed."""
        if reference.startswith("#"):
            return reference if reference == "#" or reference[1:] in ctx.local_ids else None
        known = self._references.get(reference)
        if known is not None and (known[0] is None or self._targets.get(known[0]) is known[1]):
            return known[2]  # the same target, found the same way: the same answer as below
        if reference.startswith("urn:uuid:"):
            try:
                rewritten = "urn:uuid:" + self.key.pseudonymise_uuid(reference[9:])
            except PseudonymError:
                return None
            self._remember_reference(reference, None, None, rewritten)
            return rewritten
        if "?" in reference or reference.startswith("urn:"):
            return None  # conditional references and other URNs name nothing stored here
        parts = reference.split("/")
        version = None
        if len(parts) >= 4 and parts[-2] == "_history":
            version, parts = parts[-1], parts[:-2]
        if len(parts) != 2:
            return None  # absolute URLs name other servers' resources (this server's are stored relative)
        if version is not None and ctx.pks is not None and (parts[-2], parts[-1], version) not in ctx.pks:
            return None  # that version is not one the caller may follow
        pseudonym = self._target(parts[-2], parts[-1], ctx)
        if pseudonym is None:
            return None
        if version is not None:
            suffix = f"/_history/{version}" if version and _HISTORY_VERSION.fullmatch(version) else ""
            return f"{parts[-2]}/{pseudonym}{suffix}"
        rewritten = f"{parts[-2]}/{pseudonym}"
        self._remember_reference(reference, (parts[-2], parts[-1]), pseudonym, rewritten)
        return rewritten

    def _remember_reference(self, reference: str, target: tuple[str, str] | None, pseudonym: str | None,
                            rewritten: str) -> None:
        if len(self._references) >= self._CACHE_LIMIT:
            self._references.clear()
        self._references[reference] = (target, pseudonym, rewritten)

    def _target(self, kind: str, ident: str, ctx: _Context) -> str | None:
        wanted = (kind, ident)
        found = self._targets.get(wanted)
        if found is not None or wanted in ctx.missing:
            return found
        pk = ctx.pks.get(wanted) if ctx.pks is not None else None
        if pk is None and self._resolve_pk is not None:
            pk = self._resolve_pk(kind, ident)
        try:
            pseudonym = None if pk is None else self.key.pseudonym(kind, pk)
        except PseudonymError:
            pseudonym = None
        if pseudonym is None:
            ctx.missing.add(wanted)
        else:
            self._remember(wanted, pseudonym)
        return pseudonym

    def _remember(self, wanted: tuple[str, str], pseudonym: str) -> None:
        if len(self._targets) >= self._CACHE_LIMIT:
            self._targets.clear()
        self._targets[wanted] = pseudonym


def _release_resource(plan: _Plan, resource: dict[str, Any], ctx: _Context) -> tuple[dict[str, Any], bool]:
    """The body of a resource, and whether it was withheld whole for a modifier extension."""
    try:
        body, withheld = _release(plan, resource, ctx), False
        for rule in plan.whole:
            rule(resource, body, ctx)
    except _Withheld:
        body, withheld = {}, True
    _fill_required(plan, body)
    return body, withheld


def _local_ids(resource: dict[str, Any], plan: _Plan) -> frozenset[str]:
    """The ids of the contained resources that will be released, which `#id` may point at."""
    contained = resource.get("contained")
    if "contained" not in plan.fields or type(contained) is not list:
        return frozenset()
    return frozenset(c["id"] for c in contained if type(c) is dict and type(c.get("id")) is str
                     and type(c.get("resourceType")) is str and _is_resource_type(c["resourceType"]))


#: The engine's security labels of a resource, by (withheld for a modifier extension, abstracted).
_LABELS = {(withheld, abstracted): (PSEUDED, *([REDACTED] if withheld else []), *([ABSTRED] if abstracted else []))
           for withheld in (False, True) for abstracted in (False, True)}


def _meta(source: Any, labels: tuple[dict[str, str], ...],
          released_coding: Callable[[Any, Any, Any], tuple[str, str, str | None, str | None] | None]
          ) -> dict[str, Any]:
    """A numeric versionId and the security labels of released code systems (as any Coding)
    survive; lastUpdated, source, profile and tags do not.

    lastUpdated is an exact ingest time; a de-identified resource no longer conforms to the
    profiles it claimed (they often require names and identifiers); tags are local workflow
    markers.
    """
    if type(source) is not dict or not (source.get("versionId") or source.get("security")):
        return {"security": list(map(dict.copy, labels))}  # nothing of it survives: the engine's labels
    meta: dict[str, Any] = {}
    security: list[dict[str, str]] = []
    version = source.get("versionId")
    if type(version) is str and version.isascii() and version.isdigit():
        meta["versionId"] = version
    for coding in source.get("security") or ():
        label: dict[str, str] = {}
        if type(coding) is dict:
            _finish_coding(released_coding, coding, label)
        if label:
            security.append(label)
    present = {(c.get("system"), c["code"]) for c in security}
    security.extend(dict(label) for label in labels if (label["system"], label["code"]) not in present)
    meta["security"] = security
    return meta
