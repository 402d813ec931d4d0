"""Specifications of the generalisation of ages, shifted date-times and postal codes (pure functions)."""
from __future__ import annotations

from typing import Any

import pytest

from policies.generalize import (
    UCUM,
    PostalRule,
    age_in_years,
    country_code,
    generalized_postal_code,
    is_age_code,
    is_time_quantity,
    postal_rules,
    released_age,
    released_age_range,
    round_time,
    shift_date,
    top_coded_age,
)

FRANCE = {"digits": 2, "longer": {"97": 3, "98": 3}, "suppress": ["975", "977"]}
RULES = postal_rules({"US": {"digits": 3, "suppress": ["036", "059"]}, "FR": FRANCE})


def age(value: Any, code: str | None = "a", unit: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"value": value}
    if code is not None:
        out.update(system=UCUM, code=code)
    if unit is not None:
        out["unit"] = unit
    return out


# -- ages ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("quantity", "years"), [
    (age(95), 95.0),
    (age(1200, "mo"), 100.0),
    (age(1100, "mo"), 1100 / 12),
    (age(52, "wk"), 52 / (365.25 / 7)),
    (age(365.25, "d"), 1.0),
    (age(8766, "h"), 1.0),
    (age(525960, "min"), 1.0),
    (age(95, None, "years"), 95.0),
    (age(1200, None, "Months"), 100.0),
    (age(95, None), 95.0),
])
def test_an_age_is_read_in_years_with_its_ucum_unit(quantity: dict[str, Any], years: float) -> None:
    assert age_in_years(quantity) == pytest.approx(years)


@pytest.mark.parametrize("quantity", [age("95"), age(True), age(95, "decades"), age(95, None, "ans et demi"), "95"])
def test_an_age_that_cannot_be_read_is_reported_so(quantity: Any) -> None:
    assert age_in_years(quantity) is None


@pytest.mark.parametrize(("quantity", "top_coded"), [
    (age(89), False), (age(89.9), False), (age(90), True), (age(95), True),
    (age(1079, "mo"), False), (age(1080, "mo"), True), (age(1100, "mo"), True), (age(40000, "d"), True),
])
def test_ages_of_90_years_or_more_are_top_coded(quantity: dict[str, Any], top_coded: bool) -> None:
    released, over = released_age(dict(quantity), quantity, 89)
    assert over is top_coded
    assert released == (top_coded_age(89) if top_coded else quantity)


@pytest.mark.parametrize(("quantity", "expected"), [(age(3, "wk"), True), (age(3, "a"), True),
                                                   (age(3, "kg"), False), (age(3, None, "years"), False)])
def test_a_quantity_in_a_ucum_unit_of_time_is_recognised(quantity: dict[str, Any], expected: bool) -> None:
    assert is_time_quantity(quantity) is expected


def test_the_top_coded_age_says_90_or_more_years() -> None:
    assert top_coded_age(89) == {"value": 90, "comparator": ">=", "unit": "a", "system": UCUM, "code": "a"}


def test_an_unreadable_age_is_withheld_and_an_age_without_value_is_kept() -> None:
    assert released_age(age(95, "decades"), age(95, "decades"), 89) == (None, False)
    assert released_age({"code": "a"}, {"code": "a"}, 89) == ({"code": "a"}, False)


def test_a_range_of_ages_keeps_its_low_bound_top_coded_and_loses_a_high_bound_over_the_limit() -> None:
    source = {"low": age(1100, "mo"), "high": age(100)}
    released, over = released_age_range(source, source, 89)
    assert over and released == {"low": {"value": 90, "unit": "a", "system": UCUM, "code": "a"}}
    younger = {"low": age(40), "high": age(95)}
    assert released_age_range(younger, younger, 89) == ({"low": age(40)}, True)
    assert released_age_range({"high": age(95)}, {"high": age(95)}, 89) == (None, True)


@pytest.mark.parametrize(("coding", "expected"), [
    ({"system": "http://loinc.org", "code": "30525-0"}, True),
    ({"system": "http://loinc.org", "code": "21612-7"}, True),
    ({"system": "http://loinc.org", "code": "29553-5"}, True),
    ({"system": "urn:oid:2.16.840.1.113883.6.1", "code": "30525-0"}, True),
    ({"system": "http://snomed.info/sct", "code": "424144002"}, True),
    ({"system": "http://loinc.org", "code": "8302-2"}, False),
    ({"system": "http://example.org/local", "code": "30525-0"}, False),
])
def test_age_observations_are_recognised_by_their_code(coding: dict[str, str], expected: bool) -> None:
    assert is_age_code({"coding": [{"system": "http://loinc.org", "code": "8867-4"}, coding]}) is expected


# -- dates and times -------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "days", "expected"), [
    ("2021-07-01T10:00:00+02:00", 0, "2021-07-01T08:00:00Z"),
    ("2021-01-15T10:00:00+01:00", 0, "2021-01-15T09:00:00Z"),
    ("2021-07-01T10:00:00+02:00", 3, "2021-07-04T08:00:00Z"),
    ("2021-07-01T01:30:00+02:00", 3, "2021-07-03T23:30:00Z"),
    ("2021-07-01T22:30:15.123-05:00", -1, "2021-07-01T03:30:15.123Z"),
    ("2021-07-01T10:00:00Z", 1, "2021-07-02T10:00:00Z"),
    ("2021-07-01T10:00:00", 1, "2021-07-02T10:00:00Z"),
    ("2021-07-01T10:00+05:45", 0, "2021-07-01T04:15Z"),
    ("2021-07-01", 3, "2021-07-04"),
    ("2021-07-01T25:00:00Z", 1, None),
    ("2021-07-01T10:00:00+2:00", 1, None),
])
def test_a_shifted_time_is_written_in_utc(value: str, days: int, expected: str | None) -> None:
    assert shift_date(value, days) == expected


def test_summer_and_winter_times_no_longer_show_their_offset() -> None:
    summer, winter = shift_date("2021-07-01T10:00:00+02:00", 5), shift_date("2021-01-15T10:00:00+01:00", 5)
    assert summer is not None and winter is not None
    assert summer.endswith("Z") and winter.endswith("Z") and "+" not in summer + winter


@pytest.mark.parametrize(("value", "rounding", "instant", "expected"), [
    ("2021-07-01T10:17:43.250+02:00", "hour", False, "2021-07-01T08:00:00Z"),
    ("2021-07-01T10:17:43+02:00", "day", False, "2021-07-01"),
    ("2021-07-01T01:17:43+02:00", "day", False, "2021-06-30"),
    ("2021-07-01T10:17:43+02:00", "day", True, "2021-07-01T00:00:00Z"),
    ("2021-07-01", "hour", False, "2021-07-01"),
    ("2021-07", "day", False, "2021-07"),
])
def test_times_can_be_rounded_to_the_hour_or_the_day(value: str, rounding: str, instant: bool,
                                                     expected: str) -> None:
    assert shift_date(value, 0, rounding, instant=instant) == expected


@pytest.mark.parametrize(("value", "rounding", "expected"), [
    ("10:17:43", None, "10:17:43"), ("10:17:43", "hour", "10:00:00"), ("10:17:43", "day", None), ("10h17", None, None),
])
def test_a_time_of_day_is_rounded_like_the_times_of_dates(value: str, rounding: str | None,
                                                          expected: str | None) -> None:
    assert round_time(value, rounding) == expected


# -- postal codes ----------------------------------------------------------------------------

@pytest.mark.parametrize(("written", "code"), [
    ("FR", "FR"), ("FRA", "FR"), ("France", "FR"), ("france ", "FR"), ("République française", "FR"),
    ("US", "US"), ("USA", "US"), ("U.S.A.", "US"), ("United States", "US"), ("united states of america", "US"),
    ("États-Unis", "US"), ("etats unis", "US"), ("Atlantis", None), ("", None), (None, None),
])
def test_a_country_is_recognised_however_it_is_written(written: Any, code: str | None) -> None:
    assert country_code(written) == code


@pytest.mark.parametrize(("postal", "country", "expected"), [
    ("75013", "FR", "75"),
    ("20000", "France", "20"),
    ("2A004", "FR", "2A"),
    ("97411", "FRA", "974"),
    ("98800", "FR", "988"),
    ("97500", "FR", "000"),
    ("97133", "FR", "971"),
    ("75 013", "FR", "75"),
    ("02134", "US", "021"),
    ("03601-1234", "USA", "000"),
    ("75013", "US", "750"),
    ("03601", "FR", "03"),
    ("75013", None, None),
    ("75013", "Atlantis", None),
    ("75013", "DE", None),
    ("7", "FR", None),
    ("75<013", "FR", None),
])
def test_a_postal_code_follows_the_rule_of_its_country(postal: str, country: Any, expected: str | None) -> None:
    assert generalized_postal_code(postal, country, RULES) == expected


def test_postal_rules_keep_the_longest_matching_prefix() -> None:
    rule = PostalRule(2, {"9": 3, "97": 4}, frozenset())
    assert (rule.apply("97411"), rule.apply("95000"), rule.apply("75000")) == ("9741", "950", "75")


@pytest.mark.parametrize(("data", "message"), [
    ([], "'countries' must be an object"),
    ({"XX": {"digits": 2}}, "'XX' is not a known ISO 3166 alpha-2 code"),
    ({"France": {"digits": 2}}, "'France' is not a known ISO 3166 alpha-2 code"),
    ({"FR": {"digits": 0}}, "'digits' is a length from 1 to 9"),
    ({"FR": {"digits": 2, "longer": {"97": "3"}}}, "'longer' maps a prefix to a length"),
    ({"FR": {"digits": 2, "suppress": ["975"]}}, "each as long as the rule keeps"),
    ({"FR": {"digits": 2, "drop": True}}, "takes 'digits'"),
])
def test_bad_postal_rules_are_refused_with_a_clear_message(data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        postal_rules(data)
