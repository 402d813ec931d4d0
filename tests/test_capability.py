"""The CapabilityStatements say exactly what each API answers, so they cannot drift from the code.

Each statement (`/fhir/metadata`, `/research/fhir/metadata`) is checked against the server
itself: every interaction, conditional flag, search parameter, include, result parameter and
operation it declares is answered (never 404 or 405), and every interaction of FHIR R4's code
lists it does not declare is refused (400, 404 or 405 with an OperationOutcome). The code lists
come from the FHIR R4 JSON schema the project ships (service/validation/data, see its README),
not from this file.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from consent import projects
from consent.materialise import refresh
from service import db
from service.release import research_capability_types
from service.validation import r4
from tests.research_world import World, bearer, token

CUSTODIAN, RESEARCH = "/fhir", "/research/fhir"
#: A resource of each probed type that validates (the id is set per request).
MINIMAL: dict[str, dict[str, Any]] = {
    "Patient": {"gender": "female"},
    "Observation": {"status": "final", "code": {"text": "probe"}},
    "Organization": {"name": "Probe"},
}
#: A well-formed value for a search parameter of each type.
VALUES = {"token": "probe", "string": "probe", "date": "2020", "quantity": "5", "reference": "probe",
          "number": "1", "uri": "http://example.org/probe"}
#: Parameters whose values are a closed list (AuditEvent's outcome: 0, 4, 8 or 12).
VALUE_OF = {("AuditEvent", "outcome"): "0"}
#: A request of Patients with each result parameter (a declared one missing here fails the test: add it).
RESULT_QUERIES = {"_count": {"_count": "1"}, "_sort": {"_sort": "_lastUpdated"}, "_total": {"_total": "accurate"},
                  "_summary": {"_summary": "count"}, "_include": {"_include": "Patient:general-practitioner"},
                  "_revinclude": {"_revinclude": "Observation:subject"}, "_elements": {"_elements": "gender"},
                  "_has": {"_has:Observation:subject:code": "probe"}}
REFUSED = (400, 404, 405)
FHIR_JSON = "application/fhir+json"


def _codes(definition: str) -> tuple[str, ...]:
    """A code list of FHIR R4, as the shipped R4 JSON schema enumerates it."""
    return tuple(r4.schema()["definitions"][definition]["properties"]["code"]["enum"])


TYPE_INTERACTIONS = _codes("CapabilityStatement_Interaction")  # read, vread, update, … search-type
SYSTEM_INTERACTIONS = _codes("CapabilityStatement_Interaction1")  # transaction, batch, search-*, history-*


def _rest(client: FlaskClient, base: str) -> dict[str, Any]:
    return client.get(f"{base}/metadata").get_json()["rest"][0]


def _resource(rest: dict[str, Any], resource_type: str) -> dict[str, Any]:
    return next(r for r in rest["resource"] if r["type"] == resource_type)


def _declared(entry: dict[str, Any]) -> set[str]:
    return {i["code"] for i in entry.get("interaction", [])}


def _body(resource_type: str, resource_id: str | None = None) -> dict[str, Any]:
    return {"resourceType": resource_type, **({"id": resource_id} if resource_id else {}), **MINIMAL[resource_type]}


def _ask(client: FlaskClient, base: str, code: str, resource_type: str, resource_id: str,
         headers: dict[str, str]) -> TestResponse:
    """The request that asks for one type-level or instance-level interaction."""
    json = {**headers, "Content-Type": FHIR_JSON}
    at = f"{base}/{resource_type}/{resource_id}"
    if code == "read":
        return client.get(at, headers=headers)
    if code == "vread":
        return client.get(f"{at}/_history/1", headers=headers)
    if code == "update":
        return client.put(at, json=_body(resource_type, resource_id), headers=json)
    if code == "patch":
        return client.patch(at, json=[{"op": "test", "path": "/id", "value": resource_id}],
                            headers={**headers, "Content-Type": "application/json-patch+json"})
    if code == "delete":
        return client.delete(at, headers=headers)
    if code == "history-instance":
        return client.get(f"{at}/_history", headers=headers)
    if code == "history-type":
        return client.get(f"{base}/{resource_type}/_history", headers=headers)
    if code == "create":
        return client.post(f"{base}/{resource_type}", json=_body(resource_type), headers=json)
    if code == "search-type":
        return client.get(f"{base}/{resource_type}", headers=headers)
    raise AssertionError(f"no request asks for {code}")


def _ask_system(client: FlaskClient, base: str, code: str, headers: dict[str, str]) -> TestResponse:
    if code in ("transaction", "batch"):
        return client.post(base, json={"resourceType": "Bundle", "type": code, "entry": []},
                           headers={**headers, "Content-Type": FHIR_JSON})
    if code == "history-system":
        return client.get(f"{base}/_history", headers=headers)
    if code == "search-system":
        return client.get(f"{base}?_count=1", headers=headers)
    raise AssertionError(f"no request asks for {code}")


def _refused(response: TestResponse) -> bool:
    return response.status_code in REFUSED and response.get_json()["resourceType"] == "OperationOutcome"


def _create(client: FlaskClient, headers: dict[str, str], resource_type: str) -> str:
    response = client.post(f"{CUSTODIAN}/{resource_type}", json=_body(resource_type),
                           headers={**headers, "Content-Type": FHIR_JSON})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


@pytest.fixture
def everything_project(app: Flask, client: FlaskClient) -> dict[str, str]:
    """Headers of a research client whose record-level project receives every type the research
    statement lists (so no refusal there is about the project's types)."""
    with app.app_context(), db.write() as conn:
        project = projects.create(conn, name="All types", tier="record", epsilon=1.0,
                                  types=research_capability_types()).project_id
        refresh(conn)
    return bearer(token(client, app, "research", project))


# -- the statements themselves --------------------------------------------------------------------


@pytest.mark.parametrize("base", [CUSTODIAN, RESEARCH])
def test_the_statement_is_fhir_r4_4_0_1(client: FlaskClient, base: str):
    statement = client.get(f"{base}/metadata").get_json()
    assert statement["fhirVersion"] == "4.0.1"
    assert r4.check(statement) is None


def test_every_custodian_type_but_the_audit_trail_answers_the_same_interactions(client: FlaskClient):
    rest = _rest(client, CUSTODIAN)
    shapes = {frozenset(_declared(r)) for r in rest["resource"] if r["type"] != "AuditEvent"}
    assert len(shapes) == 1


# -- interactions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("resource_type", sorted(MINIMAL))
def test_each_declared_custodian_interaction_answers_and_each_other_is_refused(
        client: FlaskClient, custodian_headers: dict[str, str], resource_type: str):
    declared = _declared(_resource(_rest(client, CUSTODIAN), resource_type))
    for code in TYPE_INTERACTIONS:
        resource_id = _create(client, custodian_headers, resource_type)
        response = _ask(client, CUSTODIAN, code, resource_type, resource_id, custodian_headers)
        if code in declared:
            assert response.status_code < 400, (code, response.status_code, response.get_json())
        else:
            assert _refused(response), (code, response.status_code)


def test_the_audit_trail_answers_what_its_entry_declares(client: FlaskClient, custodian_headers: dict[str, str]):
    declared = _declared(_resource(_rest(client, CUSTODIAN), "AuditEvent"))
    client.get(f"{CUSTODIAN}/Patient", headers=custodian_headers)  # audited: the trail has an entry
    event_id = client.get(f"{CUSTODIAN}/AuditEvent?_count=1", headers=custodian_headers).get_json()[
        "entry"][0]["resource"]["id"]
    for code in TYPE_INTERACTIONS:
        if code in ("update", "create"):
            response = (client.put if code == "update" else client.post)(
                f"{CUSTODIAN}/AuditEvent" + (f"/{event_id}" if code == "update" else ""),
                json={"resourceType": "AuditEvent", "id": event_id}, headers=custodian_headers)
        else:
            response = _ask(client, CUSTODIAN, code, "AuditEvent", event_id, custodian_headers)
        if code in declared:
            assert response.status_code < 400, (code, response.status_code)
        else:
            assert _refused(response), (code, response.status_code)


@pytest.mark.parametrize("resource_type", ["Patient", "Observation"])
def test_each_declared_research_interaction_answers_and_each_other_is_refused(
        client: FlaskClient, world: World, research: dict[str, str], resource_type: str):
    declared = _declared(_resource(_rest(client, RESEARCH), resource_type))
    pseudonym = client.get(f"{RESEARCH}/{resource_type}?_count=1", headers=research).get_json()[
        "entry"][0]["resource"]["id"]
    for code in TYPE_INTERACTIONS:
        response = _ask(client, RESEARCH, code, resource_type, pseudonym, research)
        if code in declared:
            assert response.status_code < 400, (code, response.status_code, response.get_json())
        else:
            assert _refused(response), (code, response.status_code)


@pytest.mark.parametrize("base", [CUSTODIAN, RESEARCH])
def test_each_declared_system_interaction_answers_and_each_other_is_refused(
        client: FlaskClient, custodian_headers: dict[str, str], world: World, research: dict[str, str], base: str):
    headers = custodian_headers if base == CUSTODIAN else research
    declared = _declared(_rest(client, base))
    for code in SYSTEM_INTERACTIONS:
        response = _ask_system(client, base, code, headers)
        if code in declared:
            assert response.status_code < 400, (code, response.status_code, response.get_json())
        else:
            assert _refused(response), (code, response.status_code)


# -- conditional interactions ------------------------------------------------------------------------


def _flags(client: FlaskClient) -> dict[str, Any]:
    return _resource(_rest(client, CUSTODIAN), "Patient")


def _patient_with(identifier: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:probe", "value": identifier}]}


def test_conditional_create_is_as_declared(client: FlaskClient, custodian_headers: dict[str, str]):
    headers = {**custodian_headers, "If-None-Exist": "identifier=urn:probe|one"}
    statuses = [client.post(f"{CUSTODIAN}/Patient", json=_patient_with("one"), headers=headers).status_code
                for _ in range(2)]
    assert statuses == ([201, 200] if _flags(client)["conditionalCreate"] else [201, 201])


def test_conditional_read_is_as_declared(client: FlaskClient, custodian_headers: dict[str, str]):
    patient_id = _create(client, custodian_headers, "Patient")
    read = client.get(f"{CUSTODIAN}/Patient/{patient_id}", headers=custodian_headers)
    by_tag = client.get(f"{CUSTODIAN}/Patient/{patient_id}",
                        headers={**custodian_headers, "If-None-Match": read.headers["ETag"]})
    by_date = client.get(f"{CUSTODIAN}/Patient/{patient_id}",
                         headers={**custodian_headers, "If-Modified-Since": read.headers["Last-Modified"]})
    declared = _flags(client).get("conditionalRead", "not-supported")
    assert by_tag.status_code == (304 if declared in ("not-match", "full-support") else 200)
    assert by_date.status_code == (304 if declared in ("modified-since", "full-support") else 200)


def test_conditional_update_is_as_declared(client: FlaskClient, custodian_headers: dict[str, str]):
    url = f"{CUSTODIAN}/Patient?identifier=urn:probe|two"
    statuses = [client.put(url, json=_patient_with("two"), headers=custodian_headers).status_code for _ in range(2)]
    if _flags(client)["conditionalUpdate"]:
        assert statuses == [201, 200]
    else:
        assert all(status in REFUSED for status in statuses)


def test_conditional_delete_is_as_declared(client: FlaskClient, custodian_headers: dict[str, str]):
    for _ in range(2):
        client.post(f"{CUSTODIAN}/Patient", json=_patient_with("twin"), headers=custodian_headers)
    client.post(f"{CUSTODIAN}/Patient", json=_patient_with("single"), headers=custodian_headers)
    several = client.delete(f"{CUSTODIAN}/Patient?identifier=urn:probe|twin", headers=custodian_headers)
    one = client.delete(f"{CUSTODIAN}/Patient?identifier=urn:probe|single", headers=custodian_headers)
    declared = _flags(client)["conditionalDelete"]
    if declared == "not-supported":
        assert several.status_code in REFUSED and one.status_code in REFUSED
    else:
        assert one.status_code in (200, 204)
        assert several.status_code == (204 if declared == "multiple" else 412)


# -- search parameters, includes and result parameters -------------------------------------------------


@pytest.mark.parametrize("base", [CUSTODIAN, RESEARCH])
def test_each_declared_search_parameter_is_accepted(
        client: FlaskClient, custodian_headers: dict[str, str], everything_project: dict[str, str], base: str):
    headers = custodian_headers if base == CUSTODIAN else everything_project
    for entry in _rest(client, base)["resource"]:
        for param in entry.get("searchParam", []):
            value = VALUE_OF.get((entry["type"], param["name"]), VALUES[param["type"]])
            response = client.get(f"{base}/{entry['type']}", query_string={param["name"]: value}, headers=headers)
            assert response.status_code == 200, (entry["type"], param["name"], response.get_json())


def test_a_custodian_parameter_the_research_statement_does_not_declare_is_refused_there(
        client: FlaskClient, everything_project: dict[str, str]):
    custodian = {r["type"]: r for r in _rest(client, CUSTODIAN)["resource"]}
    for entry in _rest(client, RESEARCH)["resource"]:
        declared = {p["name"] for p in entry.get("searchParam", [])}
        for param in custodian[entry["type"]].get("searchParam", []):
            if param["name"] not in declared:
                response = client.get(f"{RESEARCH}/{entry['type']}",
                                      query_string={param["name"]: VALUES[param["type"]]}, headers=everything_project)
                assert response.status_code in (400, 403), (entry["type"], param["name"])


@pytest.mark.parametrize("base", [CUSTODIAN, RESEARCH])
def test_an_undeclared_search_parameter_is_refused(
        client: FlaskClient, custodian_headers: dict[str, str], everything_project: dict[str, str], base: str):
    headers = custodian_headers if base == CUSTODIAN else everything_project
    response = client.get(f"{base}/Observation?not-a-parameter=1", headers=headers)
    assert response.status_code == 400


@pytest.mark.parametrize("base", [CUSTODIAN, RESEARCH])
def test_each_declared_include_and_revinclude_is_accepted(
        client: FlaskClient, custodian_headers: dict[str, str], everything_project: dict[str, str], base: str):
    headers = custodian_headers if base == CUSTODIAN else everything_project
    declaring: dict[tuple[str, str], list[str]] = {}  # (parameter, value): the types that declare it
    for entry in _rest(client, base)["resource"]:
        for name, key in (("_include", "searchInclude"), ("_revinclude", "searchRevInclude")):
            for value in entry.get(key, []):
                declaring.setdefault((name, value), []).append(entry["type"])
    assert declaring
    for (name, value), types in declaring.items():
        for resource_type in {types[0], types[-1]}:  # a value an untyped parameter gives every type: two of them
            response = client.get(f"{base}/{resource_type}", query_string={name: value, "_count": "1"},
                                  headers=headers)
            assert response.status_code == 200, (resource_type, name, value, response.get_json())


@pytest.mark.parametrize("base", [CUSTODIAN, RESEARCH])
def test_each_declared_result_parameter_is_accepted(
        client: FlaskClient, custodian_headers: dict[str, str], everything_project: dict[str, str], base: str):
    headers = custodian_headers if base == CUSTODIAN else everything_project
    declared = _rest(client, base).get("searchParam", [])
    assert declared
    for param in declared:
        response = client.get(f"{base}/Patient", query_string=RESULT_QUERIES[param["name"]], headers=headers)
        assert response.status_code == 200, (param["name"], response.get_json())


# -- operations ----------------------------------------------------------------------------------


def _operations(rest: dict[str, Any]) -> dict[str, list[tuple[str, str | None]]]:
    """Each declared operation's code and where it is declared: (type or "", the type's entry)."""
    found: dict[str, list[tuple[str, str | None]]] = {}
    for op in rest.get("operation", []):
        found.setdefault(op["name"], []).append(("", None))
    for entry in rest["resource"]:
        for op in entry.get("operation", []):
            found.setdefault(op["name"], []).append((entry["type"], entry["type"]))
    return found


def _answered(client: FlaskClient, url: str, headers: dict[str, str]) -> bool:
    """Whether some method reaches an operation there (a 400 for missing parameters does)."""
    prefer = {**headers, "Prefer": "respond-async", "Content-Type": FHIR_JSON}
    return any(response.status_code not in (404, 405) for response in (
        client.get(url, headers=prefer), client.post(url, json={"resourceType": "Parameters"}, headers=prefer)))


@pytest.mark.parametrize("base", [CUSTODIAN, RESEARCH])
def test_each_declared_operation_answers(
        client: FlaskClient, custodian_headers: dict[str, str], world: World, research: dict[str, str], base: str):
    headers = custodian_headers if base == CUSTODIAN else research
    instances = {"Patient": world.patients["consented"], "ResearchStudy": world.project}
    for code, places in _operations(_rest(client, base)).items():
        urls = [f"{base}/${code}" for where, _ in places if not where]
        urls += [f"{base}/{where}/${code}" for where, _ in places if where]
        urls += [f"{base}/{where}/{instances[where]}/${code}" for where, _ in places if where in instances]
        assert any(_answered(client, url, headers) for url in urls), code


@pytest.mark.parametrize("base", [CUSTODIAN, RESEARCH])
def test_every_operation_route_is_declared_and_no_other(app: Flask, client: FlaskClient, base: str):
    routed = {rule.rule.rsplit("$", 1)[1] for rule in app.url_map.iter_rules()
              if rule.rule.startswith(f"{base}/") and "$" in rule.rule}
    assert set(_operations(_rest(client, base))) == routed


def test_the_operations_issue_14_asks_for_are_declared(client: FlaskClient):
    custodian, research_ops = _operations(_rest(client, CUSTODIAN)), _operations(_rest(client, RESEARCH))
    assert {"everything", "explain", "budget"} <= set(custodian)
    assert {"export", "aggregate", "budget"} <= set(research_ops)


# -- the README -------------------------------------------------------------------------------------


#: The README section that documents each API.
SECTIONS = {CUSTODIAN: "\n## The custodian API (`/fhir`)", RESEARCH: "\n## The research API (`/research/fhir`)"}


def _api_section(base: str) -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index(SECTIONS[base])
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end != -1 else None]


@pytest.mark.parametrize("base", [CUSTODIAN, RESEARCH])
def test_the_readme_api_section_names_every_declared_interaction_and_operation(client: FlaskClient, base: str):
    section = _api_section(base)
    rest = _rest(client, base)
    declared = set().union(*(_declared(r) for r in rest["resource"])) | _declared(rest)
    missing = {code for code in declared if f"`{code}`" not in section}
    missing |= {f"${code}" for code in _operations(rest) if f"${code}" not in section}
    missing |= {p["name"] for p in rest.get("searchParam", [])
                if not re.search(rf"`{re.escape(p['name'])}[`=:]", section)}  # `_total` or `_total=accurate`
    assert not missing
