"""The seeded synthetic data generator: valid FHIR R4B, deterministic, realistic, self-consistent.

No database here: the generator is pure, and these tests only read what it yields.
"""
from __future__ import annotations

import base64
import hashlib
import html
import os
import statistics
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import synthetic
from service.synthetic.organisations import npi_check_digit

SEED = 0
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ORG_CONDITION = "Organization?identifier=https://passerelle.example/org|"
NPI_CONDITION = "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|"
#: Sensitive conditions (SNOMED) and the v3 label each must carry.
SENSITIVE = {
    "370143000": "PSY", "21897009": "PSY", "58214004": "PSY",
    "86406008": "HIV",
    "105629000": "SEX", "15628003": "SEX", "76272004": "SEX",
    "7200002": "SUD", "75544000": "SUD",
    "254843006": "GDIS",
}

Resource = dict[str, Any]


@pytest.fixture(scope="module")
def sample() -> list[Resource]:
    """30 patients as transaction Bundles."""
    return list(synthetic.patient_bundles(30, seed=SEED))


@pytest.fixture(scope="module")
def cohort() -> list[Resource]:
    """500 patients: enough for the rare cases (sensitive categories, the very old)."""
    return list(synthetic.patient_bundles(500, seed=SEED))


@pytest.fixture(scope="module")
def stored() -> list[Resource]:
    """The same 30 patients (and the organisations) as NDJSON resources."""
    return list(synthetic.ndjson_resources(30, seed=SEED))


def resources(bundle: Resource) -> list[Resource]:
    return [entry["resource"] for entry in bundle["entry"]]


def patient(bundle: Resource) -> Resource:
    first = bundle["entry"][0]["resource"]
    assert first["resourceType"] == "Patient"
    return first


def of_type(bundles: list[Resource], resource_type: str) -> Iterator[tuple[Resource, Resource]]:
    """(patient, resource) for every resource of that type."""
    for bundle in bundles:
        for resource in resources(bundle):
            if resource["resourceType"] == resource_type:
                yield patient(bundle), resource


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def validate(resource: Resource) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def phones(person: Resource) -> list[str]:
    return [t["value"] for t in person["telecom"] if t["system"] == "phone"]


def full_name(person: Resource) -> str:
    name = person["name"][0]
    return f"{name['given'][0]} {name['family']}"


def age(person: Resource) -> float:
    return (date(2026, 1, 1) - date.fromisoformat(person["birthDate"])).days / 365.2425


def labels(resource: Resource) -> set[str]:
    return {tag["code"] for tag in resource.get("meta", {}).get("security", []) if tag["system"] == ACT_CODE}


# -- valid FHIR R4B ---------------------------------------------------------------------------------------------


def test_patient_bundles_validate_as_r4b_transaction_bundles(sample):
    for bundle in sample:
        assert Bundle.model_validate(bundle).type == "transaction"


def test_every_resource_in_the_patient_bundles_validates_against_its_r4b_model(sample):
    for bundle in sample:
        for resource in resources(bundle):
            validate(resource)


def test_organisation_bundles_and_their_resources_validate():
    for bundle in synthetic.organisation_bundles(SEED):
        Bundle.model_validate(bundle)
        for resource in resources(bundle):
            validate(resource)


def test_every_ndjson_resource_validates_against_its_r4b_model(stored):
    for resource in stored:
        validate(resource)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=-(2**40), max_value=2**40))
def test_any_seed_gives_a_valid_self_contained_patient_bundle(seed):
    bundle = next(synthetic.patient_bundles(1, seed=seed))
    full_urls = {entry["fullUrl"] for entry in bundle["entry"]}
    for resource in resources(bundle):
        validate(resource)
        for reference in references(resource):
            assert reference in full_urls or reference.startswith((ORG_CONDITION, NPI_CONDITION))


# -- deterministic ---------------------------------------------------------------------------------------------


def dump(n: int, seed: int) -> bytes:
    """Everything the generator yields for (n, seed), serialised."""
    bundles = [*synthetic.organisation_bundles(seed), *synthetic.patient_bundles(n, seed)]
    return orjson.dumps([*bundles, *synthetic.ndjson_resources(n, seed)])


def test_the_same_seed_gives_byte_identical_output():
    assert dump(8, 42) == dump(8, 42)


@pytest.mark.parametrize("hash_seed", ["1", "2"])
def test_output_does_not_depend_on_the_process_hash_seed(hash_seed):
    script = "import hashlib; from tests.test_synthetic import dump; print(hashlib.sha256(dump(4, 7)).hexdigest())"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                           cwd=Path(__file__).parent.parent)
    assert child.stdout.strip() == hashlib.sha256(dump(4, 7)).hexdigest()


def test_different_seeds_give_different_people():
    first = [patient(b) for b in synthetic.patient_bundles(10, seed=1)]
    second = [patient(b) for b in synthetic.patient_bundles(10, seed=2)]
    assert {p["id"] for p in first}.isdisjoint(p["id"] for p in second)
    assert [full_name(p) for p in first] != [full_name(p) for p in second]


def test_patient_k_is_the_same_person_whatever_the_number_generated():
    small = [orjson.dumps(b) for b in synthetic.patient_bundles(5, seed=SEED)]
    large = [orjson.dumps(b) for b in synthetic.patient_bundles(12, seed=SEED)]
    assert large[:5] == small


def test_bundles_and_ndjson_hold_the_same_patients(sample, stored):
    in_bundles = Counter(r["id"] for bundle in sample for r in resources(bundle))
    in_ndjson = Counter(r["id"] for r in stored if r["resourceType"] not in
                        ("Organization", "Practitioner", "PractitionerRole"))
    assert in_bundles == in_ndjson


# -- realistic -------------------------------------------------------------------------------------------------


def test_the_population_includes_people_over_89_and_deceased_patients(cohort):
    people = [patient(b) for b in cohort]
    assert any(age(p) >= 90 and "deceasedDateTime" not in p for p in people)
    assert 0 < sum("deceasedDateTime" in p for p in people) < len(people) * 0.15
    assert min(age(p) for p in people) < 2 and max(age(p) for p in people) < 106


def test_french_and_english_speakers_have_names_from_their_language(cohort):
    people = [patient(b) for b in cohort]
    languages = Counter(p["communication"][0]["language"]["coding"][0]["code"] for p in people)
    assert set(languages) == {"fr-FR", "en-US"}
    assert min(languages.values()) > len(people) / 4
    assert sum(not full_name(p).isascii() for p in people) > len(people) / 10
    assert len({full_name(p) for p in people}) > len(people) * 0.9


def test_patients_carry_an_mrn_and_a_national_identifier(sample):
    for bundle in sample:
        identifiers = patient(bundle)["identifier"]
        types = [i["type"]["coding"][0] for i in identifiers]
        assert types[0] == {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR",
                            "display": "Medical Record Number"}
        assert {i["system"] for i in identifiers} & {"http://hl7.org/fhir/sid/us-ssn", "urn:oid:1.2.250.1.213.1.4.8"}


def test_french_nir_carry_a_valid_key(cohort):
    nir_system = "urn:oid:1.2.250.1.213.1.4.8"
    nirs = [i["value"] for b in cohort for i in patient(b)["identifier"] if i["system"] == nir_system]
    assert nirs
    for nir in nirs:
        body = int(nir[:13].replace("2A", "19").replace("2B", "18"))
        assert len(nir) == 15 and int(nir[13:]) == 97 - body % 97


def test_npi_check_digit_follows_the_luhn_rule():
    assert npi_check_digit("123456789") == 3  # CMS's published example: 1234567893


def test_patients_have_a_generated_narrative_naming_them(sample):
    for bundle in sample:
        person = patient(bundle)
        assert person["text"]["status"] == "generated"
        assert html.escape(person["name"][0]["family"]) in person["text"]["div"]


def test_mrns_are_unique(cohort):
    mrns = [patient(b)["identifier"][0]["value"] for b in cohort]
    assert len(set(mrns)) == len(mrns)


def test_sensitive_conditions_and_only_they_carry_their_security_label(cohort):
    for _, condition in of_type(cohort, "Condition"):
        code = condition["code"]["coding"][0]["code"]
        assert labels(condition) == ({SENSITIVE[code]} if code in SENSITIVE else set()), code


def test_every_sensitive_category_occurs_in_a_few_thousand_patients():
    seen: set[str] = set()
    for bundle in synthetic.patient_bundles(3000, seed=SEED):
        seen |= {SENSITIVE[c["code"]["coding"][0]["code"]] for c in resources(bundle)
                 if c["resourceType"] == "Condition" and c["code"]["coding"][0]["code"] in SENSITIVE}
        if len(seen) == 5:
            break
    assert seen == {"PSY", "HIV", "SEX", "SUD", "GDIS"}


def test_sensitive_conditions_are_rare(cohort):
    share = Counter(label for bundle in cohort for label in {lbl for r in resources(bundle) for lbl in labels(r)})
    assert share["PSY"] < len(cohort) * 0.2
    for label in ("HIV", "SEX", "SUD", "GDIS"):
        assert share[label] < len(cohort) * 0.06, label


def test_treatments_and_plans_for_a_sensitive_condition_carry_its_label(cohort):
    checked = 0
    for bundle in cohort:
        label_of = {f"urn:uuid:{r['id']}": SENSITIVE[r["code"]["coding"][0]["code"]] for r in resources(bundle)
                    if r["resourceType"] == "Condition" and r["code"]["coding"][0]["code"] in SENSITIVE}
        for resource in resources(bundle):
            for reason in resource.get("reasonReference", []) + resource.get("addresses", []):
                if reason["reference"] in label_of:
                    assert label_of[reason["reference"]] in labels(resource), resource["resourceType"]
                    checked += 1
    assert checked > 20


def test_blood_pressure_panels_have_systolic_and_diastolic_components(sample):
    panels = [o for _, o in of_type(sample, "Observation") if o["code"]["coding"][0]["code"] == "85354-9"]
    assert panels
    for panel in panels:
        systolic, diastolic = panel["component"]
        assert systolic["code"]["coding"][0]["code"] == "8480-6"
        assert diastolic["code"]["coding"][0]["code"] == "8462-4"
        assert systolic["valueQuantity"]["code"] == diastolic["valueQuantity"]["code"] == "mm[Hg]"
        assert 60 < diastolic["valueQuantity"]["value"] + 25 <= systolic["valueQuantity"]["value"] < 250


def test_vital_signs_use_loinc_and_ucum(sample):
    units = {"8302-2": "cm", "29463-7": "kg", "39156-5": "kg/m2", "8867-4": "/min", "8310-5": "Cel"}
    seen = set()
    for _, observation in of_type(sample, "Observation"):
        code = observation["code"]["coding"][0]
        if code["code"] in units:
            seen.add(code["code"])
            assert code["system"] == "http://loinc.org"
            assert observation["category"][0]["coding"][0]["code"] == "vital-signs"
            assert observation["valueQuantity"]["system"] == "http://unitsofmeasure.org"
            assert observation["valueQuantity"]["code"] == units[code["code"]]
    assert seen == set(units)


def test_diabetics_have_a_higher_hba1c(cohort):
    diabetic = {p["id"] for p, c in of_type(cohort, "Condition") if c["code"]["coding"][0]["code"] == "44054006"}
    values: dict[bool, list[float]] = {True: [], False: []}
    for person, observation in of_type(cohort, "Observation"):
        if observation["code"]["coding"][0]["code"] == "4548-4":
            values[person["id"] in diabetic].append(observation["valueQuantity"]["value"])
    assert values[True] and values[False]
    assert statistics.mean(values[True]) > statistics.mean(values[False]) + 1.0


def test_observations_are_taken_during_their_encounter(sample):
    for bundle in sample:
        periods = {f"urn:uuid:{r['id']}": r["period"] for r in resources(bundle) if r["resourceType"] == "Encounter"}
        for resource in resources(bundle):
            if resource["resourceType"] == "Observation":
                period = periods[resource["encounter"]["reference"]]
                when = datetime.fromisoformat(resource["effectiveDateTime"])
                assert datetime.fromisoformat(period["start"]) <= when <= datetime.fromisoformat(period["end"])
                assert datetime.fromisoformat(resource["issued"]) >= when


def test_nothing_happens_after_death_or_the_reference_date(cohort):
    for bundle in cohort:
        person = patient(bundle)
        end = datetime.fromisoformat(person.get("deceasedDateTime", "2026-01-01T00:00:00+00:00"))
        for resource in resources(bundle):
            if resource["resourceType"] == "Encounter":
                assert datetime.fromisoformat(resource["period"]["end"]) <= end


def test_diagnostic_reports_list_their_observations(sample):
    for bundle in sample:
        observations = {f"urn:uuid:{r['id']}" for r in resources(bundle) if r["resourceType"] == "Observation"}
        for report in (r for r in resources(bundle) if r["resourceType"] == "DiagnosticReport"):
            assert report["result"] and {ref["reference"] for ref in report["result"]} <= observations


def test_notes_name_the_patient_and_give_their_phone(sample):
    for bundle in sample:
        person = patient(bundle)
        name, phone = full_name(person), phones(person)[0]
        texts = [note["text"] for r in resources(bundle) for note in r.get("note", [])]
        texts += [base64.b64decode(r["content"][0]["attachment"]["data"]).decode()
                  for r in resources(bundle) if r["resourceType"] == "DocumentReference"]
        assert any(name in text and phone in text for text in texts), name
    annotations = [note["text"] for bundle in sample for r in resources(bundle) for note in r.get("note", [])]
    assert len(annotations) > len(sample)


def test_subject_references_display_the_patient_name(sample):
    for bundle in sample:
        person = patient(bundle)
        for resource in resources(bundle)[1:]:
            who = resource.get("subject") or resource.get("patient")
            assert who["reference"] == f"urn:uuid:{person['id']}"
            assert full_name(person) in who["display"]


# -- references ------------------------------------------------------------------------------------------------


def test_references_inside_a_patient_bundle_resolve_to_its_full_urls(sample):
    for bundle in sample:
        full_urls = {entry["fullUrl"] for entry in bundle["entry"]}
        for entry in bundle["entry"]:
            assert entry["fullUrl"] == f"urn:uuid:{entry['resource']['id']}"
            assert entry["request"] == {"method": "POST", "url": entry["resource"]["resourceType"]}
            for reference in references(entry["resource"]):
                assert reference in full_urls or not reference.startswith("urn:uuid:")


def test_organisations_and_practitioners_are_conditional_references_to_what_organisation_bundles_create(sample):
    created = {f"{e['resource']['resourceType']}?{e['request']['ifNoneExist']}"
               for b in synthetic.organisation_bundles(SEED) for e in b["entry"]}
    external = [ref for bundle in sample for ref in references(bundle) if not ref.startswith("urn:uuid:")]
    assert any(ref.startswith(ORG_CONDITION) for ref in external)
    assert any(ref.startswith(NPI_CONDITION) for ref in external)
    assert set(external) <= created


def test_organisation_bundles_create_each_resource_only_if_its_identifier_is_new():
    for bundle in synthetic.organisation_bundles(SEED):
        assert bundle["type"] == "transaction"
        for entry in bundle["entry"]:
            resource, request = entry["resource"], entry["request"]
            system, value = request["ifNoneExist"].removeprefix("identifier=").split("|")
            assert request["method"] == "POST" and request["url"] == resource["resourceType"]
            assert {"system": system, "value": value} in [{"system": i["system"], "value": i["value"]}
                                                          for i in resource["identifier"]]


def test_ndjson_references_point_at_resources_it_contains(stored):
    present = {f"{r['resourceType']}/{r['id']}" for r in stored}
    first_patient = next(i for i, r in enumerate(stored) if r["resourceType"] == "Patient")
    assert {r["resourceType"] for r in stored[:first_patient]} == {"Organization", "Practitioner", "PractitionerRole"}
    for resource in stored:
        for reference in references(resource):
            assert reference in present, reference


# -- NDJSON files ----------------------------------------------------------------------------------------------


def test_write_ndjson_writes_one_file_per_type_with_the_counts_it_returns(tmp_path):
    counts = synthetic.write_ndjson(tmp_path / "out", 12, seed=SEED)
    files = {p.stem: p for p in (tmp_path / "out").iterdir()}
    assert set(files) == set(counts) and {"Patient", "Observation", "Organization"} <= set(counts)
    assert counts["Patient"] == 12
    for resource_type, path in files.items():
        assert path.name == f"{resource_type}.ndjson"
        lines = path.read_bytes().splitlines()
        assert len(lines) == counts[resource_type]
        assert all(orjson.loads(line)["resourceType"] == resource_type for line in lines)


def test_write_ndjson_writes_exactly_ndjson_resources(tmp_path):
    synthetic.write_ndjson(tmp_path, 3, seed=SEED)
    written = sorted(line for path in tmp_path.iterdir() for line in path.read_bytes().splitlines())
    assert written == sorted(orjson.dumps(r) for r in synthetic.ndjson_resources(3, seed=SEED))
