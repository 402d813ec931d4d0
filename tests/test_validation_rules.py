"""What the validator accepts is stored exactly as sent, and its rules come from the
specification's data: the invariants' keys and expressions, the narrative's allowed XHTML; all it
reads is loaded at once when a gunicorn worker starts.

(The refusals are in tests/test_validation_invalid_content.py.)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.validation import bindings, invariants, narrative
from service.validation.generate import _quoted_names, _r4_0_1
from tests.fhir_helpers import create, observation, patient

XHTML = 'xmlns="http://www.w3.org/1999/xhtml"'
ROOT = Path(__file__).resolve().parent.parent


def vital(**extra: Any) -> dict[str, Any]:
    """A blood pressure Observation about no one (references are not what these tests are about)."""
    return {k: v for k, v in observation("none", **extra).items() if k != "subject"}


ACCEPTED = {
    "narrative-with-table-link-image": patient(text={"status": "generated", "div": (
        f'<div {XHTML}><h1>Jean</h1><table class="t"><tr><td style="color: red">x</td></tr></table>'
        '<a href="https://example.org/a">link</a><img src="data:image/png;base64,AAAA" alt="i"/></div>')}),
    "primitive-extension": patient(birthDate="1970-01-01", _birthDate={"extension": [
        {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
         "valueDateTime": "1970-01-01T08:00:00Z"}]}),
    "aligned-primitive-array-with-null": patient(name=[{"family": "Dupont", "given": ["Jean", "Paul"], "_given": [
        None, {"extension": [{"url": "http://example.org/x", "valueString": "y"}]}]}]),
    "complex-extension-without-value": patient(extension=[{"url": "http://example.org/outer", "extension": [
        {"url": "inner", "valueCode": "a"}]}]),
    "data-absent-reason-without-value": {**{k: v for k, v in vital().items() if k != "valueQuantity"},
                                         "dataAbsentReason": {"text": "asked but declined"}},
    "contact-with-a-name": patient(contact=[{"name": {"family": "Martin"}}]),
    "quantity-with-code-and-system": vital(),
    "quantity-without-code": vital(valueQuantity={"value": 3, "unit": "tablets"}),
    "periods-in-order-at-their-common-precision": patient(name=[
        {"family": "A", "period": {"start": "2020-01", "end": "2020-01-15"}},
        {"family": "B", "period": {"start": "2020-01-01T10:00:00+01:00", "end": "2020-01-01T09:30:00Z"}},
        {"family": "C", "period": {"start": "2020-03-01T10:00:00Z", "end": "2020-03-01"}}]),
    "condition-status-from-the-required-value-set": {
        "resourceType": "Condition", "code": {"text": "asthma"}, "subject": {"display": "a patient"},
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                       "code": "remission"}]}},
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_valid_content_is_stored_exactly_as_sent(client, custodian_headers, name):
    sent: dict[str, Any] = ACCEPTED[name]
    created = create(client, custodian_headers, sent)
    stored = client.get(f"/fhir/{sent['resourceType']}/{created['id']}", headers=custodian_headers).get_json()
    assert {k: v for k, v in stored.items() if k not in ("id", "meta")} == sent


def test_every_invariant_checked_is_defined_by_the_specification_data():
    checked = {key for checks in invariants.BY_TYPE.values() for key, _ in checks}
    checked |= {key for key, _ in invariants.ON_RESOURCES} | {"ele-1", "txt-1", "txt-2"}
    assert checked == set(invariants.definitions())


def test_each_invariant_check_states_the_specifications_expression():
    for checks in (*invariants.BY_TYPE.values(), invariants.ON_RESOURCES):
        for key, check in checks:
            assert check.__doc__.splitlines()[0] == invariants.definitions()[key]["expression"], key


def test_the_narrative_allows_exactly_the_elements_txt_1_lists():
    elements, attributes = narrative._allowed()
    assert {"p", "table", "a", "img"} <= elements
    assert not {"script", "iframe", "form", "object", "style", "body"} & elements
    assert not any(name.startswith("on") for name in attributes)


def test_the_generator_reads_txt_1s_lists_from_its_xpath():
    xpath = ("not(descendant-or-self::*[not(local-name(.)=('a', 'b'))]) and "
             "not(descendant-or-self::*/@*[not(name(.)=('href', 'style'))])")
    assert _quoted_names(xpath, "local-name") == ["a", "b"]
    assert _quoted_names(xpath, "name") == ["href", "style"]


def test_the_generator_takes_only_added_codes_from_the_4_0_1_schema():
    published = {"definitions": {"T": {"properties": {"v": {"enum": ["4.0.0"]}, "s": {"type": "string"}}}}}
    later = {"definitions": {"T": {"properties": {"v": {"enum": ["4.0.0", "4.0.1"]}, "s": {"type": "string"},
                                                  "extra": {"type": "string"}}}}}
    assert _r4_0_1(published, later) == ["T.v: added ['4.0.1']"]
    assert published["definitions"]["T"]["properties"] == {"v": {"enum": ["4.0.0", "4.0.1"]},
                                                           "s": {"type": "string"}}


def test_the_generator_stops_when_the_4_0_1_schema_changes_more_than_codes():
    published = {"definitions": {"T": {"properties": {"s": {"type": "string"}}}}}
    with pytest.raises(SystemExit):
        _r4_0_1(published, {"definitions": {"T": {"properties": {"s": {"type": "number"}}}}})


def test_required_codings_come_from_the_specifications_value_sets():
    clinical = bindings.by_type()["Condition"]["clinicalStatus"]
    assert clinical.value_set == "http://hl7.org/fhir/ValueSet/condition-clinical"
    # the code system's nested codes (active → relapse) are expanded too
    assert ("http://terminology.hl7.org/CodeSystem/condition-clinical", "relapse") in clinical.codes


# The Python checks against the specification's FHIRPath, evaluated by fhirpathpy on elements
# that keep and that break each invariant (ele-1's hasValue() is not implemented there).
FHIRPATH_CASES = {
    "ext-1": ("Extension", [{"url": "u", "valueString": "a"}, {"url": "u", "extension": [{"url": "v",
                                                                                          "valueCode": "b"}]},
                            {"url": "u"}, {"url": "u", "valueString": "a", "extension": [{"url": "v",
                                                                                         "valueCode": "b"}]}]),
    "qty-3": ("Quantity", [{"value": 1}, {"value": 1, "code": "mg", "system": "http://unitsofmeasure.org"},
                           {"value": 1, "code": "mg"}]),
    "pat-1": ("Patient.contact", [{"name": {"family": "M"}}, {"organization": {"display": "O"}},
                                  {"gender": "male"}, {"relationship": [{"text": "sister"}]}]),
    "obs-6": (None, [vital(), {**vital(), "dataAbsentReason": {"text": "x"}},
                     {**{k: v for k, v in vital().items() if k != "valueQuantity"}, "dataAbsentReason": {"text": "x"}},
                     {**{k: v for k, v in vital().items() if k != "valueQuantity"}, "valueString": "x",
                      "dataAbsentReason": {"text": "x"}}]),
    "dom-2": (None, [patient(contained=[patient(id="c")]),
                     patient(contained=[patient(id="c", contained=[patient(id="d")])])]),
    "dom-4": (None, [patient(contained=[patient(id="c", meta={"tag": [{"code": "t"}]})]),
                     patient(contained=[patient(id="c", meta={"versionId": "2"})]),
                     patient(contained=[patient(id="c", meta={"lastUpdated": "2020-01-01T00:00:00Z"})])]),
}


@pytest.mark.parametrize("key", list(FHIRPATH_CASES))
def test_each_invariant_check_agrees_with_the_specifications_fhirpath(key):
    from fhirpathpy import evaluate
    from fhirpathpy.models import models

    checks = {k: c for group in (*invariants.BY_TYPE.values(), invariants.ON_RESOURCES) for k, c in group}
    base, nodes = FHIRPATH_CASES[key]
    expression = invariants.definitions()[key]["expression"]
    path = {"base": base, "expression": expression} if base else expression
    verdicts = [(checks[key](node), evaluate(node, path, {}, models["r4"]) == [True]) for node in nodes]
    assert all(ours == spec for ours, spec in verdicts), verdicts
    assert {ours for ours, _ in verdicts} == {True, False}  # each case set keeps and breaks the invariant


# What a gunicorn worker runs as it starts (deploy/gunicorn.conf.py), then validation of a demo population;
# prints the modules validating it imported.
_LOADED_FIRST = """
import json, sys
from service import synthetic, validation
validation.load()
resources = list(synthetic.ndjson_resources(30, 7))
before = set(sys.modules)
for resource in resources:
    validation.validate(resource)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_once_validation_is_loaded_validating_imports_no_module() -> None:
    """Every model a resource's elements need is loaded with the rest, not on the first request that
    validates one (fhir.resources imports a data type's model the first time it meets one)."""
    child = subprocess.run([sys.executable, "-c", _LOADED_FIRST], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout.strip().splitlines()[-1]) == []
