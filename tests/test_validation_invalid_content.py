"""Invalid content is refused on every way in — POST, PUT, a transaction entry, CLI ingest —
with the FHIR issue code and the element's path, and nothing is stored.

The cases are the invalid-content list of issue 14 (codes outside required bindings, strings
for numbers and booleans, empty elements, broken invariants, unsafe narrative, a type R4 does
not define), each one behaviour; references that do not resolve are tested with the bundles.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from flask import Flask
from sqlalchemy import func, select

from service import db
from service.store.schema import resources
from tests.fhir_helpers import issue, observation, patient, post_entry, transaction

XHTML = 'xmlns="http://www.w3.org/1999/xhtml"'


def narrative(div: str) -> dict[str, Any]:
    return {"status": "generated", "div": div}


def consent(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Consent", "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "research"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
            "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                       "code": "OPTIN"}]}, **extra}


class Case(NamedTuple):
    resource: dict[str, Any]
    code: str
    expression: str
    said: str  # what the diagnostics must name besides the path (the invariant, the value…)


OBS = {k: v for k, v in observation("none").items() if k != "subject"}  # valid but for what each case breaks
CASES = {
    # codes outside a required binding
    "gender-x": Case(patient(gender="x"), "code-invalid", "Patient.gender", "'x'"),
    "observation-status-bogus": Case({**OBS, "status": "bogus"}, "code-invalid", "Observation.status", "'bogus'"),
    "consent-status-maybe": Case(consent(status="maybe"), "code-invalid", "Consent.status", "'maybe'"),
    "condition-clinical-status-outside": Case(
        {"resourceType": "Condition", "code": {"text": "asthma"}, "subject": {"display": "a patient"},
         "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                        "code": "cured"}]}},
        "code-invalid", "Condition.clinicalStatus", "http://hl7.org/fhir/ValueSet/condition-clinical"),
    # no coercion of JSON types
    "quantity-value-string": Case({**OBS, "valueQuantity": {**OBS["valueQuantity"], "value": "12"}}, "structure",
                                  "Observation.valueQuantity.value", '"12"'),
    "active-string": Case(patient(active="true"), "structure", "Patient.active", '"true"'),
    "multiple-birth-string": Case(patient(multipleBirthInteger="2"), "structure", "Patient.multipleBirthInteger",
                                  '"2"'),
    # empty elements
    "empty-object-in-array": Case(patient(name=[{}]), "invariant", "Patient.name[0]", "ele-1"),
    "empty-object": Case(patient(maritalStatus={}), "invariant", "Patient.maritalStatus", "ele-1"),
    "element-with-only-an-id": Case(patient(maritalStatus={"id": "m"}), "invariant", "Patient.maritalStatus",
                                    "ele-1"),
    "empty-array": Case(patient(telecom=[]), "structure", "Patient.telecom", "empty array"),
    "empty-string": Case(patient(name=[{"family": "", "given": ["Jean"]}]), "structure", "Patient.name[0].family",
                         "empty string"),
    # invariants
    "ext-1-value-and-extensions": Case(patient(extension=[{"url": "http://example.org/x", "valueString": "a",
                                                           "extension": [{"url": "y", "valueString": "b"}]}]),
                                       "invariant", "Patient.extension[0]", "ext-1"),
    "ext-1-neither": Case(patient(extension=[{"url": "http://example.org/x"}]), "invariant",
                          "Patient.extension[0]", "ext-1"),
    "obs-6-absent-reason-with-value": Case({**OBS, "dataAbsentReason": {"text": "not asked"}}, "invariant",
                                           "Observation", "obs-6"),
    "pat-1-contact-without-details": Case(patient(contact=[{"gender": "female"}]), "invariant",
                                          "Patient.contact[0]", "pat-1"),
    "per-1-end-before-start": Case(patient(name=[{"family": "D", "period": {"start": "2020-02", "end": "2020-01-31"}}]),
                                   "invariant", "Patient.name[0].period", "per-1"),
    "per-1-instants-out-of-order": Case(
        {**{k: v for k, v in OBS.items() if k != "effectiveDateTime"},
         "effectivePeriod": {"start": "2020-01-01T10:00:00Z", "end": "2020-01-01T11:00:00+02:00"}},
        "invariant", "Observation.effectivePeriod", "per-1"),
    "qty-3-code-without-system": Case({**OBS, "valueQuantity": {"value": 12, "unit": "mg", "code": "mg"}},
                                      "invariant", "Observation.valueQuantity", "qty-3"),
    "qty-3-in-a-range": Case({**OBS, "referenceRange": [{"low": {"value": 1, "code": "mg"}}]}, "invariant",
                             "Observation.referenceRange[0].low", "qty-3"),
    # narrative XHTML
    "narrative-script": Case(patient(text=narrative(f"<div {XHTML}><script>alert(1)</script>x</div>")),
                             "invariant", "Patient.text.div", "txt-1"),
    "narrative-event-attribute": Case(patient(text=narrative(f'<div {XHTML}><p onclick="steal()">x</p></div>')),
                                      "invariant", "Patient.text.div", "onclick"),
    "narrative-javascript-url": Case(patient(text=narrative(f'<div {XHTML}><a href="javascript:steal()">x</a></div>')),
                                     "invariant", "Patient.text.div", "script URL"),
    "narrative-not-allowed-element": Case(patient(text=narrative(f'<div {XHTML}><iframe src="x"/>x</div>')),
                                          "invariant", "Patient.text.div", "<iframe>"),
    "narrative-without-content": Case(patient(text=narrative(f"<div {XHTML}>  </div>")), "invariant",
                                      "Patient.text.div", "txt-2"),
    "narrative-not-xml": Case(patient(text=narrative(f"<div {XHTML}><p>x</div>")), "invariant",
                              "Patient.text.div", "well-formed"),
    # a code in a contained resource is checked like any other
    "contained-gender-x": Case({**OBS, "contained": [patient(id="c", gender="x")]}, "code-invalid",
                               "Observation.contained[0].gender", "'x'"),
}
IDS = list(CASES)


def stored(app: Flask) -> int:
    with db.read(app.extensions["passerelle.engine"]) as conn:
        return conn.scalar(select(func.count()).select_from(resources))


def assert_refused(response: Any, case: Case, expression: str | None = None) -> None:
    assert response.status_code == 400, response.get_json()
    found = issue(response)
    assert found["code"] == case.code
    assert found["expression"] == [expression or case.expression]
    assert case.expression in found["diagnostics"]
    assert case.said in found["diagnostics"]


@pytest.mark.parametrize("name", IDS)
def test_post_refuses_invalid_content_and_stores_nothing(app, client, custodian_headers, name):
    case = CASES[name]
    response = client.post(f"/fhir/{case.resource['resourceType']}", json=case.resource, headers=custodian_headers)
    assert_refused(response, case)
    assert stored(app) == 0


@pytest.mark.parametrize("name", IDS)
def test_put_refuses_invalid_content_and_stores_nothing(app, client, custodian_headers, name):
    case = CASES[name]
    resource = {**case.resource, "id": "put-1"}
    response = client.put(f"/fhir/{resource['resourceType']}/put-1", json=resource, headers=custodian_headers)
    assert_refused(response, case)
    assert stored(app) == 0


@pytest.mark.parametrize("name", IDS)
def test_a_transaction_with_invalid_content_is_refused_whole(app, client, custodian_headers, name):
    case = CASES[name]
    bundle = transaction(post_entry(patient(family="Valide")), post_entry(case.resource))
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    where = "Bundle.entry[1].resource" + case.expression[len(case.resource["resourceType"]):]
    assert_refused(response, case, expression=where)
    assert stored(app) == 0


@pytest.mark.parametrize("name", IDS)
def test_cli_ingest_reports_invalid_content_on_a_readable_line_and_stores_nothing(app, tmp_path: Path, name):
    case = CASES[name]
    path = tmp_path / "invalid.ndjson"
    path.write_text(json.dumps(case.resource) + "\n")
    result = app.test_cli_runner().invoke(args=["ingest", str(path)])
    assert result.exit_code != 0
    (line,) = [line for line in result.stderr.splitlines() if f"{path}:1: " in line]
    assert case.expression in line
    assert case.said in line
    assert case.code in line
    assert stored(app) == 0


def test_a_resource_type_r4_does_not_define_is_refused_in_a_body(app, client, custodian_headers):
    citation = {"resourceType": "Citation", "status": "active"}  # R4B only
    response = client.post("/fhir/Patient", json=citation, headers=custodian_headers)
    assert response.status_code == 400
    assert issue(response)["expression"] == ["resourceType"]
    assert "R4" in issue(response)["diagnostics"]
    assert stored(app) == 0
