"""Generalisation of quasi-identifiers: ages, shifted date-times and postal codes.

Pure functions over FHIR JSON values; `policies.deid` decides where they apply and
with which profile settings. The reference data they read are files in
`policies/data/` that name their source: the codes that make an Observation an age
(`age-codes.json`) and the country names an `Address.country` may be written in
(`countries.json`).
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import orjson

from policies.terminology import canonical_system

DATA = Path(__file__).resolve().parent / "data"
UCUM = "http://unitsofmeasure.org"
#: How a released time may be coarsened: to its hour, or to its day.
ROUNDINGS = ("hour", "day")
#: HIPAA Safe Harbor: ages over 89, and the dates that imply them, are aggregated into one category.
MAX_AGE = 89

# -- ages ------------------------------------------------------------------------------------

#: UCUM units of time an age is written in, as the number of them in a year (UCUM: a = 365.25 d, mo = a/12).
_PER_YEAR: dict[str, float] = {"a": 1.0, "mo": 12.0, "wk": 365.25 / 7, "d": 365.25, "h": 365.25 * 24,
                               "min": 365.25 * 24 * 60, "s": 365.25 * 86_400}
#: The same units as people write them in `Quantity.unit` (English), read when there is no UCUM code.
_UNIT_WORDS: dict[str, str] = {"year": "a", "years": "a", "yr": "a", "month": "mo", "months": "mo", "week": "wk",
                               "weeks": "wk", "day": "d", "days": "d", "hour": "h", "hours": "h",
                               "minute": "min", "minutes": "min"}


@cache
def _age_codes() -> frozenset[tuple[str, str]]:
    data = orjson.loads((DATA / "age-codes.json").read_bytes())
    return frozenset((c["system"], c["code"]) for c in data["codes"])


@cache
def _age_code_values() -> frozenset[str]:
    """The codes of `_age_codes`, whatever their system: most codings are told apart by them alone."""
    return frozenset(code for _system, code in _age_codes())


def is_age_code(concept: Any) -> bool:
    """Whether a CodeableConcept has a coding that says its value is the patient's age.

    The codes are those of `policies/data/age-codes.json`; OID spellings of the code
    systems are recognised.
    """
    if not isinstance(concept, dict) or not isinstance(concept.get("coding"), list):
        return False
    codes, values = _age_codes(), _age_code_values()
    for coding in concept["coding"]:
        if not isinstance(coding, dict):
            continue
        code = coding.get("code")
        if code in values and (canonical_system(coding.get("system")), code) in codes:
            return True
    return False


def age_in_years(quantity: Any) -> float | None:
    """The age an Age (or a Quantity holding an age) states, in years; None if it cannot be read.

    The unit is the UCUM `code` (a, mo, wk, d, h, min, s), else the `unit` (those codes
    or their English words); with neither, years. A value that is not a number, or a
    unit that is not one of these, cannot be read.
    """
    if not isinstance(quantity, dict):
        return None
    value = quantity.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    unit = quantity.get("code") if isinstance(quantity.get("code"), str) else quantity.get("unit")
    if unit is None:
        return float(value)
    per_year = _PER_YEAR.get(_UNIT_WORDS.get(unit.strip().casefold(), unit)) if isinstance(unit, str) else None
    return None if per_year is None else value / per_year


def is_time_quantity(quantity: Any) -> bool:
    """Whether a Quantity is written in a UCUM unit of time (a duration or an age)."""
    return isinstance(quantity, dict) and quantity.get("code") in _PER_YEAR


def top_coded_age(max_age: int) -> dict[str, Any]:
    """The Age released for any age over `max_age` years: `>= max_age + 1` years."""
    return {"value": max_age + 1, "comparator": ">=", "unit": "a", "system": UCUM, "code": "a"}


def released_age(released: dict[str, Any], source: Any, max_age: int) -> tuple[dict[str, Any] | None, bool]:
    """(what to release of an age, whether it was top-coded).

    `released` is the de-identified form of `source`. An age over `max_age` years
    becomes `top_coded_age`; an age whose value is present but not a number is
    withheld (None); any other is released as it is.
    """
    if not isinstance(source, dict) or "value" not in source:
        return released, False
    years = age_in_years(source)
    if years is None:
        return None, False
    if years >= max_age + 1:
        return top_coded_age(max_age), True
    return released, False


def released_age_range(released: dict[str, Any], source: Any,
                       max_age: int) -> tuple[dict[str, Any] | None, bool]:
    """(what to release of a Range of ages, whether it was top-coded).

    A low bound over `max_age` years becomes `max_age + 1` years; a high bound over it
    is removed (the range is then open: "90 or more"); an unreadable bound is removed.
    None if nothing is left.
    """
    if not isinstance(source, dict):
        return None, False
    out, top_coded = dict(released), False
    for bound in ("low", "high"):
        if bound not in out:
            continue
        kept, over = released_age(out[bound], source.get(bound), max_age)
        top_coded |= over
        if kept is None or (over and bound == "high"):
            del out[bound]
        elif over:
            out[bound] = {k: v for k, v in kept.items() if k != "comparator"}  # a SimpleQuantity has none
    return out or None, top_coded


# -- dates and times -------------------------------------------------------------------------

_DATE_TIME = re.compile(r"(\d{4}-\d{2}-\d{2})T(\d{2}):(\d{2})(:\d{2}(?:\.\d+)?)?(Z|[+-]\d{2}:\d{2})?")


def shift_date(value: str, days: int, rounding: str | None = None, *, instant: bool = False) -> str | None:
    """Shift a FHIR date, dateTime or instant by whole days; a time is written in UTC.

    A year alone is returned unchanged (shifting it would only add noise of a year); a
    year-month moves with its 15th day; a date keeps its precision. A value with a time
    is converted to UTC (`Z`; a time without a zone is taken as UTC) and then shifted,
    so the local offset, which tells winter from summer, is never released. `rounding`
    "hour" truncates the time to its hour; "day" keeps the UTC date alone (for an
    `instant`, which must have a time, midnight UTC). None if the value is not a FHIR date.
    """
    try:
        if len(value) == 4:
            return value if value.isascii() and value.isdigit() else None
        if len(value) == 7 and value[4] == "-":
            moved = date(int(value[:4]), int(value[5:7]), 15) + timedelta(days=days)
            return f"{moved.year:04d}-{moved.month:02d}"
        if len(value) == 10 and value[4] == "-":
            return (date.fromisoformat(value) + timedelta(days=days)).isoformat()
        match = _DATE_TIME.fullmatch(value)
        if match is None:
            return None
        day, hour, minute, seconds, zone = match.groups()
        moved = datetime.fromisoformat(f"{day}T{hour}:{minute}")
        if zone and zone != "Z":
            seconds_east = int(zone[1:3]) * 3600 + int(zone[4:6]) * 60
            moved -= timedelta(0, seconds_east if zone[0] == "+" else -seconds_east)
        moved += timedelta(days)
    except (ValueError, OverflowError):
        return None
    if rounding == "day":
        return f"{moved.date().isoformat()}T00:00:00Z" if instant else moved.date().isoformat()
    if moved.year < 1000:  # strftime writes such a year without its leading zeros
        return f"{moved:%Y-%m-%dT%H}:00:00Z" if rounding == "hour" else f"{moved:%Y-%m-%dT%H:%M}{seconds or ''}Z"
    text = moved.isoformat()  # YYYY-MM-DDTHH:MM:SS: no microseconds were read
    return f"{text[:13]}:00:00Z" if rounding == "hour" else f"{text[:16]}{seconds or ''}Z"


_TIME = re.compile(r"([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?")


def round_time(value: str, rounding: str | None) -> str | None:
    """A FHIR time of day coarsened like the times of shifted dates: "hour" keeps the hour,
    "day" releases nothing (None), no rounding keeps it. None if it is not a FHIR time."""
    if _TIME.fullmatch(value) is None or rounding == "day":
        return None
    return f"{value[:2]}:00:00" if rounding == "hour" else value


# -- postal codes ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PostalRule:
    """How the postal codes of one country are generalised.

    The first `digits` characters are kept, or more where a `longer` prefix says so
    (France: 2 digits, 3 for the overseas 97x/98x); a kept prefix listed in `suppress`
    (an area too small to hide in) becomes as many zeros.
    """

    digits: int
    longer: Mapping[str, int]
    suppress: frozenset[str]

    def length(self, code: str) -> int:
        """How many leading characters of a (compact) postal code are kept."""
        found = [n for prefix, n in self.longer.items() if code.startswith(prefix)]
        return max(found, default=self.digits)

    def apply(self, code: str) -> str | None:
        """The generalised postal code, None if it is too short to generalise."""
        length = self.length(code)
        if len(code) < length:
            return None
        prefix = code[:length]
        return "0" * length if prefix in self.suppress else prefix


def postal_rules(data: Any) -> dict[str, PostalRule]:
    """Read a profile's `countries` object ({ISO alpha-2: {digits, longer?, suppress?, why?}}).

    Raises ValueError with a readable message for anything else.
    """
    if not isinstance(data, dict) or not data:
        raise ValueError("'countries' must be an object of ISO 3166 alpha-2 codes → {'digits': N, …}")
    rules = {}
    for country, spec in data.items():
        if country_code(country) != country:
            raise ValueError(f"'countries': {country!r} is not a known ISO 3166 alpha-2 code")
        where = f"'countries'.{country}"
        if not isinstance(spec, dict) or set(spec) - {"digits", "longer", "suppress", "why"}:
            raise ValueError(f"{where} takes 'digits', and optionally 'longer', 'suppress' and 'why'")
        longer = spec.get("longer", {})
        if not _is_length(spec.get("digits")) or not isinstance(longer, dict) or not all(
                isinstance(p, str) and p and _is_length(n) and n >= len(p) for p, n in longer.items()):
            raise ValueError(f"{where}: 'digits' is a length from 1 to 9; 'longer' maps a prefix to a length")
        rule = PostalRule(spec["digits"], dict(longer), frozenset(spec.get("suppress", ())))
        suppress = spec.get("suppress", [])
        if not isinstance(suppress, list) or not all(isinstance(s, str) and len(s) == rule.length(s)
                                                     for s in suppress):
            raise ValueError(f"{where}: 'suppress' lists kept prefixes, each as long as the rule keeps")
        rules[country] = rule
    return rules


def _is_length(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10


@cache
def _countries() -> dict[str, str]:
    """Every accepted spelling of a country, folded, → its ISO 3166 alpha-2 code."""
    data = orjson.loads((DATA / "countries.json").read_bytes())
    return {_fold(name): c["alpha2"] for c in data["countries"] for name in (c["alpha2"], c["alpha3"], *c["names"])}


def _fold(text: str) -> str:
    """Case, accents, dots and spacing removed: 'États-Unis' and 'etats unis', 'U.S.A.' and 'usa' match."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().casefold()
    return re.sub(r"[\s.\-']+", "", plain)


def country_code(value: Any) -> str | None:
    """The ISO 3166 alpha-2 code of a country as written in an Address ('FRA', 'France' → 'FR')."""
    return _countries().get(_fold(value)) if isinstance(value, str) else None


def generalized_postal_code(value: Any, country: Any, rules: Mapping[str, PostalRule]) -> str | None:
    """A postal code generalised by its country's rule; None (not released) without a rule.

    Spaces and hyphens are removed first. A code without a country, of a country the
    rules do not name, or too short for its rule is not released.
    """
    rule = rules.get(country_code(country) or "")
    if rule is None or not isinstance(value, str):
        return None
    compact = value.replace(" ", "").replace("-", "")
    return rule.apply(compact) if compact.isalnum() else None
