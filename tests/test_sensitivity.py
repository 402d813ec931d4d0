"""The sensitivity classifier on a labelled set of codings (tests/data/sensitive-codings.json).

The labels were written from the code systems' own publications, apart from the
classifier's rules (policies/data/sensitive), so the tests check the rules rather than
restating them. Every coding is placed in several element positions of several resource types.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from policies import sensitivity
from policies.sensitivity import BIT, Node, mask_of, propagate

LABELLED = json.loads((Path(__file__).parent / "data" / "sensitive-codings.json").read_text(encoding="utf-8"))
POSITIONS = LABELLED["positions"]
#: How many positions each coding is tried in (consecutive positions, starting at its own index).
SPREAD = 3


def placed(coding: dict[str, Any], position: dict[str, Any]) -> dict[str, Any]:
    """The position's resource with the coding in its slot (as a CodeableConcept or a Coding)."""
    def fill(node: Any) -> Any:
        if node == "$CONCEPT":
            return {"coding": [coding]}
        if node == "$CODING":
            return coding
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        return node
    return fill(copy.deepcopy(position["resource"]))


def placements(kind: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(labelled entry, position) pairs: each entry in SPREAD consecutive positions."""
    return [(entry, POSITIONS[(i + shift) % len(POSITIONS)])
            for i, entry in enumerate(LABELLED[kind]) for shift in range(SPREAD)]


def coding_of(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "category"}


def test_the_labelled_set_is_large_and_varied_enough():
    assert len(LABELLED["sensitive"]) >= 200
    assert len(LABELLED["look_alikes"]) >= len(LABELLED["sensitive"])
    assert len(POSITIONS) >= 15
    assert len({p["resource"]["resourceType"] for p in POSITIONS}) >= 10
    assert {p["name"] for _, p in placements("sensitive")} == {p["name"] for p in POSITIONS}


def test_every_sensitive_coding_is_classified_in_its_category_in_every_position():
    missed = [(entry["system"], entry["code"], entry.get("display"), position["name"])
              for entry, position in placements("sensitive")
              if not mask_of(placed(coding_of(entry), position)) & BIT[entry["category"]]]
    assert missed == []


def test_no_look_alike_is_classified_in_any_category_in_any_position():
    flagged = [(entry["system"], entry["code"], entry.get("display"), position["name"])
               for entry, position in placements("look_alikes")
               if mask_of(placed(coding_of(entry), position))]
    assert flagged == []


@pytest.mark.parametrize(("text", "category"), [
    ("Suivi VIH", "hiv"), ("hiv follow-up", "hiv"), ("SCHIZOPHRENIE", "mental-health"),
    ("Épisode dépressif", "mental-health"), ("toxicomanie", "substance-use"), ("Syphilis", "sexual-health"),
])
def test_a_concept_known_only_by_its_text_is_classified_by_the_term_list(text, category):
    goal = {"resourceType": "Goal", "description": {"text": text}}
    assert mask_of(goal) == BIT[category]


def test_a_standard_code_is_judged_by_its_code_not_its_display():
    observation = {"resourceType": "Observation",
                   "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "HIV"}]}}
    assert mask_of(observation) == 0


def test_a_security_label_without_a_system_counts():
    assert mask_of({"resourceType": "Observation", "meta": {"security": [{"code": "hiv"}]}}) == BIT["hiv"]


def test_categories_pass_along_references_of_the_same_patient_transitively():
    nodes = {("Observation", "o"): Node("p", 0, (("Encounter", "e"),)),
             ("Encounter", "e"): Node("p", 0, (("Condition", "c"),)),
             ("Condition", "c"): Node("p", BIT["hiv"], ())}
    assert propagate(nodes, {})[("Observation", "o")] == BIT["hiv"]


def test_categories_do_not_pass_to_another_patients_resource():
    nodes = {("Observation", "o"): Node("p", 0, (("Encounter", "e"),))}
    assert propagate(nodes, {("Encounter", "e"): ("q", BIT["hiv"])})[("Observation", "o")] == 0


def test_a_shared_medications_categories_pass_to_whoever_references_it():
    nodes = {("MedicationRequest", "r"): Node("p", 0, (("Medication", "m"),))}
    assert propagate(nodes, {("Medication", "m"): (None, BIT["hiv"])})[("MedicationRequest", "r")] == BIT["hiv"]


def test_a_cycle_adds_nothing_of_its_own():
    nodes = {("Encounter", "e"): Node("p", 0, (("Condition", "c"),)),
             ("Condition", "c"): Node("p", 0, (("Encounter", "e"),))}
    assert propagate(nodes, {}) == {("Encounter", "e"): 0, ("Condition", "c"): 0}


def test_every_rules_file_names_its_source():
    for path in sensitivity.RULES.glob("*.json"):
        assert json.loads(path.read_text(encoding="utf-8"))["source"], path.name


@pytest.mark.parametrize(("system", "code", "category"), [
    ("http://hl7.org/fhir/sid/icd-10", "b20.1", "hiv"), ("http://snomed.info/sct", " 86406008 ", "hiv"),
    ("http://www.whocc.no/atc", "n05ax08", "mental-health"),
    ("urn:oid:2.16.840.1.113883.6.88", "312831", "mental-health"),
])
def test_codes_match_whatever_their_case_spacing_or_system_spelling(system, code, category):
    nested = {"resourceType": "Observation", "contained": [
        {"resourceType": "Observation", "id": "x", "extension": [{"url": "http://example.org/e", "extension": [
            {"url": "inner", "valueCoding": {"system": system, "code": code}}]}]}]}
    assert mask_of(nested) == BIT[category]
