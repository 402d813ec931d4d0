"""Specifications of ages, dates and places in released resources (the engine and the default profile)."""
from __future__ import annotations

import json
from datetime import date
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from policies.deid import TOP_CODED_AGE, Deidentifier, Profile, ProfileError, parse_profile
from policies.generalize import UCUM
from policies.pseudonym import PseudonymKey
from tests.deid_helpers import DEFAULT_PROFILE, MASTER

LOINC = "http://loinc.org"
STORE = {("Patient", "p1"): 101}


@pytest.fixture
def deid(profile: Profile, key: PseudonymKey) -> Deidentifier:
    return engine(profile, key)


def engine(profile: Profile, key: PseudonymKey) -> Deidentifier:
    return Deidentifier(profile, key, reference_year=2025, resolve_pk=lambda t, i: STORE.get((t, i)))


def with_settings(**settings: Any) -> Profile:
    """The default profile with other profile-level settings (None: the setting removed)."""
    data = {**json.loads(DEFAULT_PROFILE.read_text()), **settings}
    return parse_profile({k: v for k, v in data.items() if v is not None})


def validate(resource: dict[str, Any]) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def top_coded(resource: dict[str, Any]) -> bool:
    """Whether the resource carries the age-top-coded mark (which always comes with ABSTRED)."""
    marked = any(e.get("url") == TOP_CODED_AGE for e in resource.get("extension", ()))
    assert not marked or any(c["code"] == "ABSTRED" for c in resource["meta"]["security"])
    return marked


def years(value: float, code: str = "a") -> dict[str, Any]:
    return {"value": value, "unit": code, "system": UCUM, "code": code}


TOP = {"value": 90, "comparator": ">=", "unit": "a", "system": UCUM, "code": "a"}


# -- places ----------------------------------------------------------------------------------

def patient(*addresses: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": "p1", "gender": "female", "address": list(addresses)}


def released_address(deid: Deidentifier, address: dict[str, Any]) -> dict[str, Any] | None:
    released = deid.apply(patient({"line": ["1 rue de la Paix"], "city": "Paris", **address}), 101, "p1")
    validate(released)
    return (released.get("address") or [None])[0]


def test_a_french_patient_keeps_the_departement(deid: Deidentifier) -> None:
    assert released_address(deid, {"postalCode": "75013", "country": "France"}) == {"postalCode": "75",
                                                                                     "country": "France"}


def test_an_overseas_french_patient_keeps_three_digits(deid: Deidentifier) -> None:
    assert released_address(deid, {"postalCode": "97411", "country": "FR"})["postalCode"] == "974"


def test_a_french_overseas_area_under_20000_inhabitants_becomes_000(deid: Deidentifier) -> None:
    assert released_address(deid, {"postalCode": "97500", "country": "FRA"})["postalCode"] == "000"


def test_a_french_postcode_is_not_read_as_a_us_zip(deid: Deidentifier) -> None:
    # 03600 (Allier) begins like the restricted US area 036: it is a département, not 000.
    assert released_address(deid, {"postalCode": "03600", "country": "FR"})["postalCode"] == "03"


def test_a_us_restricted_zip3_becomes_000(deid: Deidentifier) -> None:
    assert released_address(deid, {"postalCode": "03601-1234", "country": "United States"})["postalCode"] == "000"


def test_a_us_zip_keeps_three_digits(deid: Deidentifier) -> None:
    assert released_address(deid, {"postalCode": "02134", "country": "USA"})["postalCode"] == "021"


def test_a_postal_code_without_country_is_dropped(deid: Deidentifier) -> None:
    assert released_address(deid, {"postalCode": "75013", "state": "IDF"}) == {"state": "IDF"}


def test_a_postal_code_of_a_country_without_rule_is_dropped(deid: Deidentifier) -> None:
    assert released_address(deid, {"postalCode": "10115", "country": "DE"}) == {"country": "DE"}


def test_each_address_follows_its_own_country(deid: Deidentifier) -> None:
    released = deid.apply(patient({"postalCode": "75013", "country": "FR"}, {"postalCode": "02134", "country": "US"},
                                  {"postalCode": "69001"}), 101, "p1")
    assert [a.get("postalCode") for a in released["address"]] == ["75", "021"]


def test_postal_codes_of_other_addresses_are_not_released(deid: Deidentifier) -> None:
    location = {"resourceType": "Location", "id": "l1", "address": {"postalCode": "75013", "country": "FR"}}
    contact = patient()
    contact["contact"] = [{"address": {"postalCode": "75013", "country": "FR"}}]
    assert "75" not in json.dumps(deid.apply(location, 5, None)) + json.dumps(deid.apply(contact, 101, "p1"))


# -- ages ------------------------------------------------------------------------------------

def condition(**onset: Any) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]}, **onset}


def age_observation(**value: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": LOINC, "code": "30525-0", "display": "Age"}]}, **value}


def test_an_onset_age_of_95_years_is_released_as_90_with_the_marker(deid: Deidentifier) -> None:
    released = deid.apply(condition(onsetAge=years(95)), 501, "p1")
    assert released["onsetAge"] == TOP and top_coded(released)
    validate(released)


def test_an_onset_age_under_90_is_released_unmarked(deid: Deidentifier) -> None:
    released = deid.apply(condition(onsetAge=years(62)), 501, "p1")
    assert released["onsetAge"] == years(62) and not top_coded(released)


def test_an_age_in_months_over_89_years_is_top_coded(deid: Deidentifier) -> None:
    released = deid.apply(condition(abatementAge=years(1100, "mo")), 501, "p1")
    assert released["abatementAge"] == TOP and top_coded(released)


def test_an_age_observation_of_1200_months_is_top_coded(deid: Deidentifier) -> None:
    released = deid.apply(age_observation(valueQuantity=years(1200, "mo")), 701, "p1")
    assert released["valueQuantity"] == TOP and top_coded(released)
    validate(released)


@pytest.mark.parametrize("code", ["21612-7", "29553-5"])
def test_reported_and_calculated_age_observations_are_top_coded(deid: Deidentifier, code: str) -> None:
    source = age_observation(valueQuantity=years(97))
    source["code"]["coding"][0]["code"] = code
    assert deid.apply(source, 701, "p1")["valueQuantity"] == TOP


def test_an_age_observation_coded_with_the_loinc_oid_is_top_coded(deid: Deidentifier) -> None:
    source = age_observation(valueQuantity=years(97))
    source["code"]["coding"][0]["system"] = "urn:oid:2.16.840.1.113883.6.1"
    assert deid.apply(source, 701, "p1")["valueQuantity"] == TOP


def test_an_age_component_is_top_coded(deid: Deidentifier) -> None:
    source = age_observation(component=[{"code": {"coding": [{"system": LOINC, "code": "21612-7"}]},
                                         "valueQuantity": years(35000, "d")}])
    source["code"] = {"coding": [{"system": LOINC, "code": "72166-2"}]}
    released = deid.apply(source, 701, "p1")
    assert released["component"][0]["valueQuantity"] == TOP and top_coded(released)


def test_an_age_observation_as_an_integer_is_top_coded(deid: Deidentifier) -> None:
    released = deid.apply(age_observation(valueInteger=93), 701, "p1")
    assert released["valueInteger"] == 90 and top_coded(released)


def test_an_age_range_over_89_is_open_from_90(deid: Deidentifier) -> None:
    released = deid.apply(condition(onsetRange={"low": years(92), "high": years(96)}), 501, "p1")
    assert released["onsetRange"] == {"low": {"value": 90, "unit": "a", "system": UCUM, "code": "a"}}
    assert top_coded(released)
    validate(released)


def test_an_age_range_of_an_age_observation_loses_its_bound_over_89(deid: Deidentifier) -> None:
    released = deid.apply(age_observation(valueRange={"low": years(85), "high": years(95)}), 701, "p1")
    assert released["valueRange"] == {"low": years(85)} and top_coded(released)


def test_a_relatives_ages_are_top_coded(deid: Deidentifier) -> None:
    history = {"resourceType": "FamilyMemberHistory", "id": "f1", "status": "completed",
               "patient": {"reference": "Patient/p1"},
               "relationship": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                                            "code": "MTH"}]},
               "ageAge": years(101), "deceasedAge": years(1250, "mo")}
    released = deid.apply(history, 801, "p1")
    assert released["ageAge"] == TOP and released["deceasedAge"] == TOP and top_coded(released)
    validate(released)


def test_a_duration_of_90_years_or_more_is_top_coded_whatever_its_code(deid: Deidentifier) -> None:
    source = age_observation(valueQuantity=years(96))
    source["code"] = {"coding": [{"system": LOINC, "code": "63582-1"}]}
    released = deid.apply(source, 701, "p1")
    assert released["valueQuantity"] == TOP and top_coded(released)


def test_ages_in_a_kept_extension_are_top_coded_and_other_ranges_are_not(key: PseudonymKey) -> None:
    rules = [{"path": "*.extension", "url": "http://example.org/age", "method": "keep"},
             {"path": "*.extension", "url": "http://example.org/range", "method": "keep"},
             {"path": "Observation.status", "method": "keep"}]
    pressure = {"low": years(95, "mm[Hg]"), "high": years(140, "mm[Hg]")}
    source = {**observation("2021-07-01"), "extension": [{"url": "http://example.org/age", "valueAge": years(97)},
                                                        {"url": "http://example.org/range", "valueRange": pressure}]}
    released = engine(parse_profile({"rules": rules}), key).apply(source, 701, "p1")
    assert released["extension"][:2] == [{"url": "http://example.org/age", "valueAge": TOP},
                                         {"url": "http://example.org/range", "valueRange": pressure}]
    assert top_coded(released)


def test_an_age_in_an_unknown_unit_is_withheld(deid: Deidentifier) -> None:
    assert "onsetAge" not in deid.apply(condition(onsetAge={"value": 9.5, "unit": "decades"}), 501, "p1")


def test_the_profiles_max_age_applies_to_birth_dates_and_ages_alike(key: PseudonymKey) -> None:
    strict = engine(with_settings(max_age=79), key)
    assert strict.apply(condition(onsetAge=years(85)), 501, "p1")["onsetAge"]["value"] == 80
    assert strict.apply({**patient(), "birthDate": "1940-01-01"}, 101, "p1")["birthDate"] == "1945"


def test_a_numeric_value_without_an_age_code_is_not_an_age(deid: Deidentifier) -> None:
    weight = age_observation(valueQuantity=years(120, "kg"))
    weight["code"] = {"coding": [{"system": LOINC, "code": "29463-7"}]}
    assert deid.apply(weight, 701, "p1")["valueQuantity"]["value"] == 120


# -- dates and times -------------------------------------------------------------------------

def observation(when: str, issued: str | None = None) -> dict[str, Any]:
    source = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"},
              "code": {"coding": [{"system": LOINC, "code": "8867-4"}]}, "effectiveDateTime": when}
    return {**source, "issued": issued} if issued else source


def shifted_day(day: str, key: PseudonymKey) -> str:
    return date.fromordinal(date.fromisoformat(day).toordinal() + key.date_offset_days("p1")).isoformat()


def test_a_summer_time_is_released_in_utc_and_shifted(deid: Deidentifier, key: PseudonymKey) -> None:
    released = deid.apply(observation("2021-07-01T10:00:00+02:00"), 701, "p1")
    assert released["effectiveDateTime"] == f"{shifted_day('2021-07-01', key)}T08:00:00Z"


def test_a_winter_time_is_released_in_utc_and_shifted(deid: Deidentifier, key: PseudonymKey) -> None:
    released = deid.apply(observation("2021-01-15T10:00:00+01:00"), 701, "p1")
    assert released["effectiveDateTime"] == f"{shifted_day('2021-01-15', key)}T09:00:00Z"


def test_no_local_offset_is_released_anywhere(deid: Deidentifier) -> None:
    encounter = {"resourceType": "Encounter", "id": "e1", "status": "finished", "subject": {"reference": "Patient/p1"},
                 "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                 "period": {"start": "2021-07-01T10:00:00+02:00", "end": "2021-07-01T11:30:00+02:00"},
                 "participant": [{"period": {"start": "2021-07-01T10:05:00+02:00"}}]}
    released = json.dumps(deid.apply(encounter, 201, "p1"))
    assert "+02:00" not in released and "T08:00:00Z" in released


def test_the_default_profile_rounds_times_to_the_hour(deid: Deidentifier, key: PseudonymKey) -> None:
    released = deid.apply(observation("2021-07-01T10:17:43+02:00", "2021-07-01T10:47:12.345+02:00"), 701, "p1")
    day = shifted_day("2021-07-01", key)
    assert (released["effectiveDateTime"], released["issued"]) == (f"{day}T08:00:00Z", f"{day}T08:00:00Z")
    validate(released)


def test_a_profile_may_round_times_to_the_day(key: PseudonymKey) -> None:
    released = engine(with_settings(round_times="day"), key).apply(
        observation("2021-07-01T10:17:43+02:00", "2021-07-01T10:47:12+02:00"), 701, "p1")
    day = shifted_day("2021-07-01", key)
    assert (released["effectiveDateTime"], released["issued"]) == (day, f"{day}T00:00:00Z")  # issued is an instant
    validate(released)


def test_without_rounding_times_keep_their_minutes_and_seconds_in_utc(key: PseudonymKey) -> None:
    released = engine(with_settings(round_times=None), key).apply(observation("2021-07-01T10:17:43.5+02:00"), 701, "p1")
    assert released["effectiveDateTime"] == f"{shifted_day('2021-07-01', key)}T08:17:43.5Z"


def test_a_time_of_day_value_is_rounded_too(deid: Deidentifier) -> None:
    source = {**observation("2021-07-01"), "valueTime": "10:17:43"}
    assert deid.apply(source, 701, "p1")["valueTime"] == "10:00:00"


def test_rounding_leaves_two_projects_only_whole_days_apart_with_no_time_of_day_to_link(profile: Profile) -> None:
    source = observation("2021-07-01T10:17:43+02:00", "2021-07-01T10:52:09.417+02:00")
    exact = with_settings(round_times=None)
    keys = PseudonymKey(MASTER, "project-a", 1), PseudonymKey(MASTER, "project-b", 1)

    def releases(chosen: Profile) -> list[tuple[str, str]]:
        return [(r["effectiveDateTime"], r["issued"]) for r in
                (engine(chosen, k).apply(source, 701, "p1") for k in keys)]

    # Without rounding, both releases carry the same times of day to the second: a link.
    (a_seen, a_issued), (b_seen, b_issued) = releases(exact)
    assert a_seen[10:] == b_seen[10:] == "T08:17:43Z" and a_issued[10:] == b_issued[10:] == "T08:52:09.417Z"
    # Rounded, the releases differ by whole days and keep only an hour that many records share.
    (a_seen, a_issued), (b_seen, b_issued) = releases(profile)
    assert a_seen[10:] == a_issued[10:] == b_seen[10:] == b_issued[10:] == "T08:00:00Z"
    apart = date.fromisoformat(a_seen[:10]) - date.fromisoformat(b_seen[:10])
    assert apart.days == keys[0].date_offset_days("p1") - keys[1].date_offset_days("p1") != 0


# -- profile settings ------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "message"), [
    ({"round_times": "minute"}, "'round_times' must be one of hour, day"),
    ({"max_age": "89"}, "'max_age' must be an age in years"),
    ({"max_age": 0}, "'max_age' must be an age in years"),
    ({"rules": [{"path": "Patient.birthDate", "method": "generalize", "to": "month", "top_code": True}]},
     "'top_code' is true or false, with 'to': 'year'"),
    ({"rules": [{"path": "Patient.birthDate", "method": "generalize", "countries": {"FR": {"digits": 2}}}]},
     "'countries' generalises an Address.postalCode"),
    ({"rules": [{"path": "Patient.address.postalCode", "method": "generalize", "countries": {"XX": {"digits": 2}}}]},
     "'XX' is not a known ISO 3166 alpha-2 code"),
    ({"rules": [{"path": "Patient.address.postalCode", "method": "generalize", "digits": 3}]}, "unknown keys"),
])
def test_bad_age_date_and_place_settings_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        parse_profile({"rules": [{"path": "Patient.gender", "method": "keep"}], **change}, source="bad.json")
