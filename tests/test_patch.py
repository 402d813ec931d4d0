"""PATCH on the custodian API: JSON Patch, FHIRPath Patch and JSON Merge Patch (as fhirpy sends it)."""
from __future__ import annotations

import json

from consent import writer
from tests.fhir_helpers import create, issue, observation, patient, search

JSON_PATCH = "application/json-patch+json"


def _patch(client, headers, path: str, body, content_type: str = JSON_PATCH, **extra):
    return client.patch(f"/fhir/{path}", data=json.dumps(body), headers={**headers, "Content-Type": content_type,
                                                                          **extra})


def _operation(kind: str, path: str, **parts) -> dict:
    part = [{"name": "type", "valueCode": kind}, {"name": "path", "valueString": path}]
    for name, value in parts.items():
        part.append({"name": name, **value} if isinstance(value, dict) else
                    {"name": name, "valueInteger" if isinstance(value, int) else "valueString": value})
    return {"name": "operation", "part": part}


def _fhirpath(*operations: dict) -> dict:
    return {"resourceType": "Parameters", "parameter": list(operations)}


# -- JSON Patch ------------------------------------------------------------------------------------

def test_json_patch_applies_every_operation_and_stores_a_new_version(client, custodian_headers):
    made = create(client, custodian_headers, patient(family="Martin", given="Anne"))
    response = _patch(client, custodian_headers, f"Patient/{made['id']}", [
        {"op": "test", "path": "/name/0/family", "value": "Martin"},
        {"op": "add", "path": "/gender", "value": "female"},
        {"op": "add", "path": "/name/0/given/-", "value": "Marie"},
        {"op": "replace", "path": "/name/0/family", "value": "Martin-Durand"},
        {"op": "copy", "from": "/name/0", "path": "/name/1"},
        {"op": "remove", "path": "/name/1/given/0"},
    ])
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["meta"]["versionId"] == "2"
    assert body["gender"] == "female"
    assert body["name"] == [{"family": "Martin-Durand", "given": ["Anne", "Marie"]},
                            {"family": "Martin-Durand", "given": ["Marie"]}]
    assert search(client, custodian_headers, "Patient?family=martin-durand")["entry"]


def test_a_failed_json_patch_test_is_422_and_changes_nothing(client, custodian_headers):
    made = create(client, custodian_headers, patient(family="Martin"))
    response = _patch(client, custodian_headers, f"Patient/{made['id']}", [
        {"op": "replace", "path": "/name/0/family", "value": "Other"},
        {"op": "test", "path": "/name/0/family", "value": "Martin"}])
    assert response.status_code == 422
    assert client.get(f"/fhir/Patient/{made['id']}", headers=custodian_headers).get_json()["meta"]["versionId"] == "1"


def test_a_json_patch_to_a_missing_path_is_422(client, custodian_headers):
    made = create(client, custodian_headers, patient())
    response = _patch(client, custodian_headers, f"Patient/{made['id']}",
                      [{"op": "remove", "path": "/telecom/0"}])
    assert response.status_code == 422


def test_a_malformed_json_patch_is_400_naming_the_operation(client, custodian_headers):
    made = create(client, custodian_headers, patient())
    response = _patch(client, custodian_headers, f"Patient/{made['id']}", [{"op": "frobnicate", "path": "/id"}])
    assert response.status_code == 400
    assert issue(response)["expression"] == ["[0].op"]


def test_a_patch_that_makes_the_resource_invalid_is_400_and_changes_nothing(client, custodian_headers):
    made = create(client, custodian_headers, patient())
    response = _patch(client, custodian_headers, f"Patient/{made['id']}",
                      [{"op": "add", "path": "/birthDate", "value": "not-a-date"}])
    assert response.status_code == 400
    assert "Patient.birthDate" in issue(response)["diagnostics"]
    assert "birthDate" not in client.get(f"/fhir/Patient/{made['id']}", headers=custodian_headers).get_json()


def test_a_patch_may_not_change_the_id(client, custodian_headers):
    made = create(client, custodian_headers, patient())
    response = _patch(client, custodian_headers, f"Patient/{made['id']}",
                      [{"op": "replace", "path": "/id", "value": "other"}])
    assert response.status_code == 422


def test_a_patch_adding_a_dangling_reference_is_422_not_found(client, custodian_headers):
    subject = create(client, custodian_headers, patient())
    made = create(client, custodian_headers, observation(subject["id"]))
    response = _patch(client, custodian_headers, f"Observation/{made['id']}",
                      [{"op": "replace", "path": "/subject/reference", "value": "Patient/gone"}])
    assert response.status_code == 422
    assert issue(response)["code"] == "not-found"
    assert issue(response)["expression"] == ["Observation.subject"]


def test_patch_honours_if_match(client, custodian_headers):
    made = create(client, custodian_headers, patient())
    operations = [{"op": "add", "path": "/gender", "value": "male"}]
    stale = _patch(client, custodian_headers, f"Patient/{made['id']}", operations, **{"If-Match": 'W/"2"'})
    assert stale.status_code == 412
    current = _patch(client, custodian_headers, f"Patient/{made['id']}", operations, **{"If-Match": 'W/"1"'})
    assert current.status_code == 200


def test_patch_of_an_unknown_resource_is_404_and_of_a_deleted_one_410(client, custodian_headers):
    operations = [{"op": "add", "path": "/gender", "value": "male"}]
    assert _patch(client, custodian_headers, "Patient/unknown", operations).status_code == 404
    made = create(client, custodian_headers, patient())
    client.delete(f"/fhir/Patient/{made['id']}", headers=custodian_headers)
    assert _patch(client, custodian_headers, f"Patient/{made['id']}", operations).status_code == 410


def test_a_patch_in_an_unknown_media_type_is_415(client, custodian_headers):
    made = create(client, custodian_headers, patient())
    response = _patch(client, custodian_headers, f"Patient/{made['id']}", "x", content_type="text/plain")
    assert response.status_code == 415


def test_conditional_patch_patches_the_one_match_and_404s_on_none(client, custodian_headers):
    made = create(client, custodian_headers, patient(identifier=[{"system": "urn:mrn", "value": "P-1"}]))
    operations = [{"op": "add", "path": "/gender", "value": "other"}]
    response = _patch(client, custodian_headers, "Patient?identifier=urn:mrn|P-1", operations)
    assert response.status_code == 200 and response.get_json()["id"] == made["id"]
    assert _patch(client, custodian_headers, "Patient?identifier=urn:mrn|none", operations).status_code == 404


# -- FHIRPath Patch --------------------------------------------------------------------------------

def test_fhirpath_patch_add_insert_replace_move_and_delete(client, custodian_headers):
    made = create(client, custodian_headers, patient(family="Martin", given="Anne",
                                                     telecom=[{"system": "phone", "value": "1"}]))
    body = _fhirpath(
        _operation("add", "Patient", name="gender", value={"valueCode": "female"}),
        _operation("add", "Patient.name[0]", name="given", value={"valueString": "Zoé"}),
        _operation("insert", "Patient.name[0].given", index=0, value={"valueString": "Alice"}),
        _operation("move", "Patient.name[0].given", source=2, destination=1),
        _operation("replace", "Patient.name[0].family", value={"valueString": "Durand"}),
        _operation("add", "Patient", name="deceased", value={"valueBoolean": False}),
        _operation("delete", "Patient.telecom[0]"),
        _operation("delete", "Patient.address"),  # nothing there: not an error
    )
    response = _patch(client, custodian_headers, f"Patient/{made['id']}", body, "application/fhir+json")
    assert response.status_code == 200, response.get_json()
    stored = response.get_json()
    assert stored["gender"] == "female"
    assert stored["name"] == [{"family": "Durand", "given": ["Alice", "Zoé", "Anne"]}]
    assert stored["deceasedBoolean"] is False
    assert "telecom" not in stored


def test_fhirpath_patch_replaces_a_choice_element_by_its_fhirpath_name(client, custodian_headers):
    made = create(client, custodian_headers, patient(deceasedBoolean=True))
    body = _fhirpath(_operation("replace", "Patient.deceased", value={"valueDateTime": "2020-01-02"}))
    response = _patch(client, custodian_headers, f"Patient/{made['id']}", body, "application/fhir+json")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["deceasedDateTime"] == "2020-01-02"
    assert "deceasedBoolean" not in response.get_json()


def test_fhirpath_patch_with_a_function_is_refused_naming_it(client, custodian_headers):
    made = create(client, custodian_headers, patient())
    body = _fhirpath(_operation("delete", "Patient.name.where(use = 'official')"))
    response = _patch(client, custodian_headers, f"Patient/{made['id']}", body, "application/fhir+json")
    assert response.status_code == 400
    found = issue(response)
    assert found["code"] == "not-supported"
    assert "where(use = 'official')" in found["diagnostics"]


def test_fhirpath_patch_on_a_path_matching_several_elements_is_422(client, custodian_headers):
    made = create(client, custodian_headers, patient(name=[{"family": "A"}, {"family": "B"}]))
    body = _fhirpath(_operation("replace", "Patient.name.family", value={"valueString": "C"}))
    response = _patch(client, custodian_headers, f"Patient/{made['id']}", body, "application/fhir+json")
    assert response.status_code == 422


def test_fhirpath_patch_with_an_unknown_operation_type_is_400(client, custodian_headers):
    made = create(client, custodian_headers, patient())
    body = _fhirpath(_operation("upsert", "Patient.gender"))
    assert _patch(client, custodian_headers, f"Patient/{made['id']}", body,
                  "application/fhir+json").status_code == 400


# -- consent ---------------------------------------------------------------------------------------

def _tier(client, headers, patient_id: str, project: str) -> str:
    response = client.get(f"/fhir/Consent/$explain?patient={patient_id}&project={project}", headers=headers)
    return next(p["valueCode"] for p in response.get_json()["parameter"] if p["name"] == "tier")


def test_a_patched_consent_is_materialised_again(client, custodian_headers, world):
    consented = world.patients["consented"]
    [entry] = search(client, custodian_headers, f"Consent?patient={consented}")["entry"]
    refusal = writer.build(consented, world.project, "none", [], source="test")
    response = _patch(client, custodian_headers, f"Consent/{entry['resource']['id']}",
                      [{"op": "replace", "path": "/provision", "value": refusal["provision"]}])
    assert response.status_code == 200, response.get_json()
    assert _tier(client, custodian_headers, consented, world.project) == "none"


# -- fhirpy ----------------------------------------------------------------------------------------



def test_fhirpy_patch_merges_the_given_elements(fhirpy, client, custodian_headers):
    made = create(client, custodian_headers, patient(family="Martin", gender="male"))
    patched = fhirpy.patch("Patient", made["id"], gender="female", birthDate="1970-01-01")
    assert patched["gender"] == "female" and patched["meta"]["versionId"] == "2"
    stored = client.get(f"/fhir/Patient/{made['id']}", headers=custodian_headers).get_json()
    assert (stored["gender"], stored["birthDate"], stored["name"][0]["family"]) == ("female", "1970-01-01", "Martin")


def test_fhirpy_patch_with_null_removes_an_element(fhirpy, client, custodian_headers):
    made = create(client, custodian_headers, patient(gender="male"))
    fhirpy.patch("Patient", made["id"], gender=None)
    assert "gender" not in client.get(f"/fhir/Patient/{made['id']}", headers=custodian_headers).get_json()
