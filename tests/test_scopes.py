"""SMART scopes: every route declares what it needs (service/api/scopes.py), and no path around it.

A token narrowed to some types reaches those types only: not through `POST …/_search`,
not through `_include` (two- and three-part forms, `*`, `_revinclude`), not through HEAD,
and not through the entries of a custodian Bundle.
"""
from __future__ import annotations

import pytest
from flask import Blueprint, Flask
from flask.testing import FlaskClient

from service import db
from service.api.scopes import OWN_ACCESS_BLUEPRINTS, ROUTES
from service.auth import register_client
from tests.fhir_helpers import create, issue, observation, patient
from tests.research_world import bearer, build

ONLY_OBSERVATIONS = "system/Observation.rs"


def scoped_token(app: Flask, client: FlaskClient, scope: str, project_id: str | None = None) -> dict[str, str]:
    """Headers with a token of a new client (research when `project_id` is given) granted exactly `scope`."""
    role = "research" if project_id else "custodian"
    with app.app_context(), db.write() as conn:
        registered = register_client(conn, f"scoped {role}", role, project_id)
    response = client.post("/auth/token", data={"grant_type": "client_credentials", "scope": scope},
                           auth=(registered["client_id"], registered["client_secret"]))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["scope"] == scope
    return bearer(response.get_json()["access_token"])


@pytest.fixture
def world_recipe():
    return build


@pytest.fixture
def observations_only(app, client, world) -> dict[str, str]:
    """A research token of the record project narrowed to Observations."""
    return scoped_token(app, client, ONLY_OBSERVATIONS, world.project)


def assert_forbidden(response) -> None:
    assert response.status_code == 403, response.get_json()
    assert issue(response)["code"] == "forbidden"


# -- the table -------------------------------------------------------------------------------


def test_every_route_of_the_app_declares_its_access(app):
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()
                 if rule.endpoint.partition(".")[0] not in OWN_ACCESS_BLUEPRINTS}
    undeclared = sorted(endpoints - set(ROUTES))
    assert undeclared == [], f"add these endpoints to ROUTES in service/api/scopes.py: {undeclared}"


def test_every_declaration_names_a_route_of_the_app(app):
    assert sorted(set(ROUTES) - {rule.endpoint for rule in app.url_map.iter_rules()}) == []


def test_a_route_without_a_declaration_is_refused(app):
    extra = Blueprint("undeclared", __name__)
    extra.add_url_rule("/undeclared", "open", lambda: "reached")
    app.register_blueprint(extra)
    response = app.test_client().get("/undeclared")
    assert response.status_code == 500
    assert b"reached" not in response.data


# -- research: POST _search ------------------------------------------------------------------


@pytest.mark.parametrize("resource_type", ["Patient", "Condition"])
def test_post_search_on_a_type_outside_the_scope_is_403(client, observations_only, resource_type):
    assert_forbidden(client.post(f"/research/fhir/{resource_type}/_search", data={}, headers=observations_only))


def test_post_search_on_a_type_within_the_scope_is_answered(client, observations_only):
    response = client.post("/research/fhir/Observation/_search", data={"_count": "5"}, headers=observations_only)
    assert response.status_code == 200, response.get_json()
    assert {e["resource"]["resourceType"] for e in response.get_json()["entry"]} == {"Observation"}


def test_head_search_on_a_type_outside_the_scope_is_403(client, observations_only):
    assert client.head("/research/fhir/Patient", headers=observations_only).status_code == 403


def test_read_needs_r_and_search_needs_s(app, client, world):
    search_only = scoped_token(app, client, "system/Observation.s", world.project)
    observation = client.get("/research/fhir/Observation?_count=1", headers=search_only).get_json()
    pseudonym = observation["entry"][0]["resource"]["id"]
    assert_forbidden(client.get(f"/research/fhir/Observation/{pseudonym}", headers=search_only))


def test_an_export_needs_every_type(client, observations_only):
    response = client.get("/research/fhir/$export", headers={**observations_only, "Prefer": "respond-async"})
    assert_forbidden(response)


# -- research: _include ----------------------------------------------------------------------


@pytest.mark.parametrize("include", [
    "Observation:patient",  # two-part form: the parameter's declared target
    "Observation:subject:Patient",  # three-part form
    "Observation:subject",  # a subject may be of several types: needs them all
    "*",
    "Observation:*",
])
def test_include_of_a_type_outside_the_scope_is_403(client, observations_only, include):
    assert_forbidden(client.get(f"/research/fhir/Observation?_include={include}", headers=observations_only))


def test_include_in_a_post_search_body_is_checked_too(client, observations_only):
    response = client.post("/research/fhir/Observation/_search", data={"_include": "Observation:patient"},
                           headers=observations_only)
    assert_forbidden(response)


@pytest.mark.parametrize("name", ["_include:iterate", "_revinclude"])
def test_other_include_forms_are_checked_too(client, observations_only, name):
    value = "Observation:patient" if name == "_include:iterate" else "Condition:subject"
    assert_forbidden(client.get(f"/research/fhir/Observation?{name}={value}", headers=observations_only))


def test_include_within_the_scope_is_answered(app, client, world):
    both = scoped_token(app, client, "system/Observation.rs system/Patient.r", world.project)
    response = client.get("/research/fhir/Observation?_include=Observation:patient", headers=both)
    assert response.status_code == 200, response.get_json()
    included = {e["resource"]["resourceType"] for e in response.get_json()["entry"] if e["search"]["mode"] == "include"}
    assert included == {"Patient"}


def test_include_of_several_possible_types_needs_them_all(app, client, world):
    both = scoped_token(app, client, "system/Observation.rs system/Patient.r", world.project)
    assert_forbidden(client.get("/research/fhir/Observation?_include=Observation:subject", headers=both))


# -- custodian -------------------------------------------------------------------------------


@pytest.fixture
def custodian_observations(app, client) -> dict[str, str]:
    return scoped_token(app, client, "system/Observation.cruds")


def test_custodian_search_outside_the_scope_is_403_by_get_and_by_post(client, custodian_observations):
    assert_forbidden(client.get("/fhir/Patient", headers=custodian_observations))
    assert_forbidden(client.post("/fhir/Patient/_search", data={}, headers=custodian_observations))


def test_custodian_include_outside_the_scope_is_403(client, custodian_observations):
    assert_forbidden(client.get("/fhir/Observation?_include=Observation:patient", headers=custodian_observations))


def test_custodian_include_in_a_post_search_body_is_403(client, custodian_observations):
    response = client.post("/fhir/Observation/_search", data={"_include": "Observation:subject:Patient"},
                           headers=custodian_observations)
    assert_forbidden(response)


def test_custodian_post_search_within_the_scope_still_reads_its_form_body(app, client, custodian_headers):
    owner = create(client, custodian_headers, patient())["id"]
    for value in (120.0, 130.0):
        create(client, custodian_headers, observation(owner, value=value))
    headers = scoped_token(app, client, "system/Observation.cruds system/Patient.r")
    response = client.post("/fhir/Observation/_search", data={"_include": "Observation:patient", "_count": "1"},
                           headers=headers)
    assert response.status_code == 200, response.get_json()
    assert [e["search"]["mode"] for e in response.get_json()["entry"]] == ["match", "include"]


@pytest.mark.parametrize("entry_url", ["Patient?name=x", "Observation?_include=Observation:patient",
                                       "Patient/123"])
def test_custodian_batch_entries_outside_the_scope_are_403(client, custodian_observations, entry_url):
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": entry_url}}]}
    response = client.post("/fhir", json=batch, headers=custodian_observations)
    assert_forbidden(response)


@pytest.mark.parametrize("path", ["/fhir/Consent/$explain?patient=p&project=q", "/fhir/ResearchStudy/q/$budget"])
def test_custodian_operations_need_their_own_type(client, custodian_observations, path):
    assert_forbidden(client.get(path, headers=custodian_observations))
