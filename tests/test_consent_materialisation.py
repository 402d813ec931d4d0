"""Materialised consent decisions, on the real app and database (SQLite and PostgreSQL).

A decision row is rewritten in the very transaction that writes a Consent, a Patient or
a project; a write that fails changes no decision; `consent refresh` and `init-db`
re-materialise after a change of the deployment default. Decisions are observed the way
a custodian does: `GET /fhir/Consent/$explain` and `flask consent explain`.
"""
from __future__ import annotations

import json
from typing import Any

from click.testing import Result
from fhir.resources.R4B.parameters import Parameters
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from consent import engine
from policies.fhirdates import date_range, instant
from policies.sensitivity import ACT_CODE, CATEGORIES
from service import db
from service.store.schema import decisions
from tests.fhir_helpers import create, issue, observation, patient, post_entry, search, transaction

PATIENT_URN = "urn:uuid:0c4e6b9a-1111-4000-8000-000000000001"
CONSENT_URN = "urn:uuid:0c4e6b9a-1111-4000-8000-000000000002"
ALL_CATEGORIES = list(CATEGORIES)


# --- builders and observers ------------------------------------------------------------------------

def run(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=list(args))


def cli_json(app: Flask, *args: str) -> Any:
    """Run a command that must succeed and print exactly one JSON object on stdout."""
    result = run(app, *args)
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.strip().splitlines()
    return json.loads(line)


def refused_readably(result: Result, message: str) -> None:
    assert result.exit_code != 0
    assert message in result.stderr, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def new_project(app: Flask, tier: str = "record", *extra: str) -> str:
    return cli_json(app, "project", "create", "--name", f"Study {tier}", "--tier", tier, "--epsilon", "1.0",
                    *extra)["project_id"]


def new_patient(client: FlaskClient, headers: dict[str, str], family: str = "Martin") -> str:
    return create(client, headers, patient(family=family))["id"]


def research_consent(patient_ref: str, provision: dict[str, Any], *, project: str | None = None,
                     status: str = "active", when: str = "2024-05-01T10:00:00Z") -> dict[str, Any]:
    consent: dict[str, Any] = {
        "resourceType": "Consent",
        "status": status,
        "scope": {"coding": [{"system": engine.SCOPE_SYSTEM, "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": patient_ref if "/" in patient_ref or ":" in patient_ref else f"Patient/{patient_ref}"},
        "dateTime": when,
        "policyRule": {"text": "Research consent (test)"},
        "provision": provision,
    }
    if project:
        consent["extension"] = [{"url": engine.STUDY_CONTEXT,
                                 "valueReference": {"reference": f"ResearchStudy/{project}"}}]
    return consent


PERMIT = {"type": "permit"}
PERMIT_WITHOUT_PSY = {"type": "permit", "provision": [{"type": "deny",
                                                       "securityLabel": [{"system": ACT_CODE, "code": "PSY"}]}]}


def explain_response(client: FlaskClient, headers: dict[str, str], patient_id: str, project_id: str) -> Any:
    return client.get(f"/fhir/Consent/$explain?patient={patient_id}&project={project_id}", headers=headers)


def explained(client: FlaskClient, headers: dict[str, str], patient_id: str, project_id: str) -> dict[str, Any]:
    """`$explain` read back into the same shape as `consent explain`."""
    response = explain_response(client, headers, patient_id, project_id)
    assert response.status_code == 200, response.get_json()
    out: dict[str, Any] = {"tier": None, "excluded": [], "period": None, "valid": None, "basis": []}
    for parameter in response.get_json()["parameter"]:
        name = parameter["name"]
        if name == "tier":
            out["tier"] = parameter["valueCode"]
        elif name == "excluded":
            out["excluded"].append(parameter["valueCode"])
        elif name in ("period", "valid"):
            out[name] = parameter["valuePeriod"]
        elif name == "basis":
            out["basis"].append(parameter["valueString"])
    return out


def tier_of(client: FlaskClient, headers: dict[str, str], patient_id: str, project_id: str) -> str:
    return explained(client, headers, patient_id, project_id)["tier"]


def consent_count(client: FlaskClient, headers: dict[str, str]) -> int:
    return search(client, headers, "Consent?_summary=count")["total"]


# --- a Consent written through the API ----------------------------------------------------------------

def test_a_posted_consent_changes_the_decision(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    assert tier_of(client, custodian_headers, patient_id, project) == "none"
    stored = create(client, custodian_headers, research_consent(patient_id, PERMIT))
    decision = explained(client, custodian_headers, patient_id, project)
    assert (decision["tier"], decision["excluded"]) == ("record", [])
    assert decision["basis"][0].startswith(f"Consent/{stored['id']}/_history/1 governs")


def test_a_posted_consent_with_a_denied_category_excludes_it(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    create(client, custodian_headers, research_consent(patient_id, PERMIT_WITHOUT_PSY))
    decision = explained(client, custodian_headers, patient_id, project)
    assert (decision["tier"], decision["excluded"]) == ("record", ["mental-health"])


def test_explain_answers_a_valid_fhir_parameters_resource(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    response = explain_response(client, custodian_headers, patient_id, project)
    assert response.status_code == 200
    assert response.mimetype == "application/fhir+json"
    Parameters.model_validate(response.get_json())


def test_a_transaction_creating_a_patient_and_their_consent_yields_the_decision_at_once(app, client,
                                                                                       custodian_headers):
    project = new_project(app)
    bundle = transaction(post_entry(patient(), PATIENT_URN), post_entry(research_consent(PATIENT_URN, PERMIT)))
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    assert response.status_code == 200, response.get_json()
    patient_id = response.get_json()["entry"][0]["response"]["location"].split("/")[1]
    assert tier_of(client, custodian_headers, patient_id, project) == "record"


def test_a_consent_bound_to_one_project_leaves_the_other_project_at_the_default(app, client, custodian_headers):
    bound, other = new_project(app), new_project(app)
    patient_id = new_patient(client, custodian_headers)
    create(client, custodian_headers, research_consent(patient_id, PERMIT, project=bound))
    assert tier_of(client, custodian_headers, patient_id, bound) == "record"
    assert tier_of(client, custodian_headers, patient_id, other) == "none"


def test_a_project_tier_caps_the_materialised_decision(app, client, custodian_headers):
    project = new_project(app, "aggregate")
    patient_id = new_patient(client, custodian_headers)
    create(client, custodian_headers, research_consent(patient_id, PERMIT_WITHOUT_PSY))
    decision = explained(client, custodian_headers, patient_id, project)
    assert (decision["tier"], decision["excluded"]) == ("aggregate", ["mental-health"])


def test_explain_shows_the_data_period_and_the_validity(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    provision = {"type": "permit", "period": {"start": "2024-01-01", "end": "2030-12-31"},
                 "dataPeriod": {"start": "2020-01-01"}}
    create(client, custodian_headers, research_consent(patient_id, provision))
    decision = explained(client, custodian_headers, patient_id, project)
    assert decision["period"] == {"start": "2020-01-01T00:00:00.000Z"}
    assert decision["valid"] == {"start": "2024-01-01T00:00:00.000Z",
                                 "end": instant(date_range("2030-12-31")[1])}


def test_explain_answers_for_a_consent_valid_until_a_date(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    create(client, custodian_headers, research_consent(patient_id, {"type": "permit", "period": {"end": "2030-12-31"}}))
    decision = explained(client, custodian_headers, patient_id, project)
    assert decision["valid"] == {"end": instant(date_range("2030-12-31")[1])}


def test_explain_names_a_class_excluded_by_the_consent(app, client, custodian_headers):
    project = new_project(app, "record", "--types", "Observation,Condition")
    patient_id = new_patient(client, custodian_headers)
    provision = {"type": "permit", "class": [{"system": engine.RESOURCE_TYPES, "code": "Observation"}]}
    create(client, custodian_headers, research_consent(patient_id, provision))
    decision = explained(client, custodian_headers, patient_id, project)
    assert (decision["tier"], decision["excluded"]) == ("record", ["Condition"])


def test_explain_of_an_unknown_patient_is_404(app, client, custodian_headers):
    project = new_project(app)
    response = explain_response(client, custodian_headers, "nobody", project)
    assert response.status_code == 404
    assert issue(response)["code"] == "not-found"


def test_explain_of_an_unknown_project_is_404(app, client, custodian_headers):
    patient_id = new_patient(client, custodian_headers)
    response = explain_response(client, custodian_headers, patient_id, "no-such-project")
    assert response.status_code == 404


def test_explain_without_a_project_is_400(app, client, custodian_headers):
    patient_id = new_patient(client, custodian_headers)
    response = client.get(f"/fhir/Consent/$explain?patient={patient_id}", headers=custodian_headers)
    assert response.status_code == 400
    assert "project" in issue(response)["diagnostics"]


# --- writes that fail change nothing --------------------------------------------------------------------

def test_an_unsupported_provision_is_refused_with_422_naming_it_and_nothing_changes(app, client,
                                                                                  custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    observed = create(client, custodian_headers, observation(patient_id))["id"]  # a reference that resolves
    provision = {"type": "permit",
                 "data": [{"meaning": "instance", "reference": {"reference": f"Observation/{observed}"}}]}
    response = client.post("/fhir/Consent", json=research_consent(patient_id, provision), headers=custodian_headers)
    assert response.status_code == 422
    assert "Consent.provision.data is not supported" in issue(response)["diagnostics"]
    assert consent_count(client, custodian_headers) == 0
    assert tier_of(client, custodian_headers, patient_id, project) == "none"


def test_a_consent_for_an_unknown_patient_is_refused_with_422(app, client, custodian_headers):
    new_project(app)
    response = client.post("/fhir/Consent", json=research_consent("ghost", PERMIT), headers=custodian_headers)
    assert response.status_code == 422
    assert "Patient/ghost" in issue(response)["diagnostics"]
    assert consent_count(client, custodian_headers) == 0


def test_a_consent_bound_to_an_unknown_project_is_refused_with_422(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    response = client.post("/fhir/Consent", json=research_consent(patient_id, PERMIT, project="no-such-study"),
                           headers=custodian_headers)
    assert response.status_code == 422
    assert "no-such-study" in issue(response)["diagnostics"]
    assert consent_count(client, custodian_headers) == 0
    assert tier_of(client, custodian_headers, patient_id, project) == "none"


def test_a_consent_naming_an_unknown_study_as_actor_is_refused_with_422(app, client, custodian_headers):
    new_project(app)
    patient_id = new_patient(client, custodian_headers)
    provision = {"type": "permit", "actor": [{"role": {"coding": [{"code": "IRCP"}]},
                                              "reference": {"reference": "ResearchStudy/no-such-study"}}]}
    response = client.post("/fhir/Consent", json=research_consent(patient_id, provision), headers=custodian_headers)
    assert response.status_code == 422
    assert consent_count(client, custodian_headers) == 0


def test_an_invalid_consent_is_refused_with_400_and_nothing_changes(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    invalid = research_consent(patient_id, PERMIT, when="the first of May")
    response = client.post("/fhir/Consent", json=invalid, headers=custodian_headers)
    assert response.status_code == 400
    assert issue(response)["code"] == "value"  # a dateTime that is no date
    assert consent_count(client, custodian_headers) == 0
    assert tier_of(client, custodian_headers, patient_id, project) == "none"


def test_a_transaction_with_a_valid_consent_and_an_invalid_entry_changes_no_decision(app, client,
                                                                                    custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    bundle = transaction(post_entry(research_consent(patient_id, PERMIT)),
                         post_entry(patient(family="Broken", birthDate="not-a-date")))
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    assert response.status_code == 400
    assert consent_count(client, custodian_headers) == 0
    assert tier_of(client, custodian_headers, patient_id, project) == "none"


def test_a_transaction_whose_consent_is_unsupported_stores_neither_patient_nor_consent(app, client,
                                                                                     custodian_headers):
    new_project(app)
    unsupported = research_consent(PATIENT_URN, {"type": "permit", "provision": [{"type": "deny", "period": {
        "start": "2020-01-01"}}]})
    bundle = transaction(post_entry(patient(family="Rolled-back"), PATIENT_URN), post_entry(unsupported))
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    assert response.status_code == 422
    assert "period is only supported on the root provision" in issue(response)["diagnostics"]
    assert search(client, custodian_headers, "Patient?_summary=count")["total"] == 0
    assert consent_count(client, custodian_headers) == 0


# --- a Consent that stops counting ---------------------------------------------------------------------

def test_updating_the_consent_to_inactive_falls_back_to_the_default(app, client, custodian_headers):
    assert run(app, "settings", "set", "consent-default", "aggregate").exit_code == 0
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    stored = create(client, custodian_headers, research_consent(patient_id, PERMIT))
    assert tier_of(client, custodian_headers, patient_id, project) == "record"
    response = client.put(f"/fhir/Consent/{stored['id']}", json={**stored, "status": "inactive"},
                          headers=custodian_headers)
    assert response.status_code == 200, response.get_json()
    decision = explained(client, custodian_headers, patient_id, project)
    assert (decision["tier"], decision["excluded"]) == ("aggregate", ALL_CATEGORIES)


def test_deleting_the_consent_falls_back_to_the_default(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    stored = create(client, custodian_headers, research_consent(patient_id, PERMIT))
    response = client.delete(f"/fhir/Consent/{stored['id']}", headers=custodian_headers)
    assert response.status_code in (200, 204)
    assert tier_of(client, custodian_headers, patient_id, project) == "none"


def test_a_newer_consent_supersedes_the_older_one(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    create(client, custodian_headers, research_consent(patient_id, PERMIT, when="2023-01-01T00:00:00Z"))
    create(client, custodian_headers, research_consent(patient_id, {"type": "deny"}, when="2024-01-01T00:00:00Z"))
    assert tier_of(client, custodian_headers, patient_id, project) == "none"


def test_moving_a_consent_to_another_patient_refreshes_the_patient_it_left(app, client, custodian_headers):
    # A Consent filed against the wrong patient and corrected: the first patient's decision must
    # not keep releasing data under a consent that is no longer theirs.
    project = new_project(app)
    wrong, right = new_patient(client, custodian_headers, "Wrong"), new_patient(client, custodian_headers, "Right")
    stored = create(client, custodian_headers, research_consent(wrong, PERMIT))
    corrected = {**stored, "patient": {"reference": f"Patient/{right}"}}
    response = client.put(f"/fhir/Consent/{stored['id']}", json=corrected, headers=custodian_headers)
    assert response.status_code == 200, response.get_json()
    assert tier_of(client, custodian_headers, right, project) == "record"
    assert tier_of(client, custodian_headers, wrong, project) == "none"


# --- patients and projects ------------------------------------------------------------------------------

def test_a_new_patient_gets_the_default_decision_for_every_project(app, client, custodian_headers):
    assert run(app, "settings", "set", "consent-default", "aggregate").exit_code == 0
    first, second = new_project(app, "record"), new_project(app, "aggregate")
    patient_id = new_patient(client, custodian_headers)
    for project in (first, second):
        decision = explained(client, custodian_headers, patient_id, project)
        assert (decision["tier"], decision["excluded"]) == ("aggregate", ALL_CATEGORIES)
        assert any("default" in line for line in decision["basis"])


def test_a_new_project_gets_a_decision_for_every_existing_patient(app, client, custodian_headers):
    patients = [new_patient(client, custodian_headers, name) for name in ("A", "B")]
    create(client, custodian_headers, research_consent(patients[0], PERMIT))
    project = new_project(app)
    assert [tier_of(client, custodian_headers, p, project) for p in patients] == ["record", "none"]


def test_a_deleted_patient_keeps_no_decision(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    assert client.delete(f"/fhir/Patient/{patient_id}", headers=custodian_headers).status_code in (200, 204)
    with db.read(app.extensions["passerelle.engine"]) as conn:
        left = conn.execute(select(func.count()).select_from(decisions)
                            .where(decisions.c.patient_id == patient_id)).scalar()
    assert left == 0
    assert explain_response(client, custodian_headers, patient_id, project).status_code == 404


def test_closing_a_project_sets_every_decision_of_it_to_none(app, client, custodian_headers):
    closing, staying = new_project(app), new_project(app)
    patients = [new_patient(client, custodian_headers, name) for name in ("A", "B")]
    for patient_id in patients:
        create(client, custodian_headers, research_consent(patient_id, PERMIT))
    closed = cli_json(app, "project", "close", closing)
    assert closed["status"] == "closed"
    assert [tier_of(client, custodian_headers, p, closing) for p in patients] == ["none", "none"]
    assert [tier_of(client, custodian_headers, p, staying) for p in patients] == ["record", "record"]


def test_a_closed_project_stays_at_none_when_a_new_consent_arrives(app, client, custodian_headers):
    project = new_project(app)
    cli_json(app, "project", "close", project)
    patient_id = new_patient(client, custodian_headers)
    create(client, custodian_headers, research_consent(patient_id, PERMIT, project=project))
    assert tier_of(client, custodian_headers, patient_id, project) == "none"


# --- the default regime changes ---------------------------------------------------------------------------

def test_settings_set_consent_default_rematerialises_without_sensitive_categories(app, client,
                                                                                  custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    assert tier_of(client, custodian_headers, patient_id, project) == "none"
    result = run(app, "settings", "set", "consent-default", "record")
    assert result.exit_code == 0, result.output
    assert "1 decisions materialised" in result.stderr
    decision = explained(client, custodian_headers, patient_id, project)
    assert (decision["tier"], decision["excluded"]) == ("record", ALL_CATEGORIES)


def test_a_default_change_keeps_the_decisions_of_patients_who_consented(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    create(client, custodian_headers, research_consent(patient_id, PERMIT_WITHOUT_PSY))
    assert run(app, "settings", "set", "consent-default", "record").exit_code == 0
    decision = explained(client, custodian_headers, patient_id, project)
    assert (decision["tier"], decision["excluded"]) == ("record", ["mental-health"])


def test_consent_refresh_rematerialises_under_the_database_regime(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    assert run(app, "settings", "set", "consent-default", "aggregate").exit_code == 0
    result = run(app, "consent", "refresh")
    assert result.exit_code == 0, result.output
    assert "default regime 'aggregate'" in result.stderr
    decision = explained(client, custodian_headers, patient_id, project)
    assert (decision["tier"], decision["excluded"]) == ("aggregate", ALL_CATEGORIES)


# --- `project` commands -------------------------------------------------------------------------------------

def test_project_create_prints_one_json_object_with_its_project_id(app, client, custodian_headers):
    created = cli_json(app, "project", "create", "--name", "Diabetes cohort", "--tier", "aggregate",
                       "--epsilon", "2.5", "--types", "Observation,Condition")
    assert created == {"project_id": created["project_id"], "name": "Diabetes cohort", "tier": "aggregate",
                       "epsilon": 2.5, "delta": 0.0, "epsilon_cap": 1.0, "suppression": 11,
                       "types": ["Observation", "Condition"], "organization": None, "status": "active",
                       "plain_language": None, "ends": None}
    study = client.get(f"/fhir/ResearchStudy/{created['project_id']}", headers=custodian_headers)
    assert study.status_code == 200
    assert study.get_json()["title"] == "Diabetes cohort"


def test_project_create_refuses_an_unknown_tier_readably(app):
    result = run(app, "project", "create", "--name", "X", "--tier", "everything", "--epsilon", "1")
    refused_readably(result, "--tier")


def test_project_create_refuses_a_non_positive_epsilon_readably(app):
    result = run(app, "project", "create", "--name", "X", "--tier", "record", "--epsilon", "0")
    refused_readably(result, "epsilon must be > 0")


def test_project_create_refuses_unknown_resource_types_readably(app):
    result = run(app, "project", "create", "--name", "X", "--tier", "record", "--epsilon", "1",
                 "--types", "Observation,Spaceship")
    refused_readably(result, "Spaceship")


def test_project_create_refusal_stores_no_project(app):
    run(app, "project", "create", "--name", "X", "--tier", "record", "--epsilon", "-1")
    assert run(app, "project", "list").stdout.strip() == ""


def test_project_list_prints_one_json_object_per_project(app):
    first, second = new_project(app, "record"), new_project(app, "aggregate")
    result = run(app, "project", "list")
    assert result.exit_code == 0, result.output
    listed = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [(p["project_id"], p["tier"]) for p in listed] == [(first, "record"), (second, "aggregate")]


def test_project_show_counts_patients_by_tier(app, client, custodian_headers):
    project = new_project(app)
    patients = [new_patient(client, custodian_headers, name) for name in ("A", "B", "C")]
    create(client, custodian_headers, research_consent(patients[0], PERMIT))
    create(client, custodian_headers, research_consent(patients[1], {"type": "permit", "action": [
        {"coding": [{"system": engine.ACTION_SYSTEM, "code": "use"}]}]}))
    shown = cli_json(app, "project", "show", project)
    assert shown["project_id"] == project
    assert shown["patients_by_tier"] == {"none": 1, "aggregate": 1, "record": 1}


def test_project_show_of_an_unknown_project_fails_readably(app):
    refused_readably(run(app, "project", "show", "no-such-project"), "no-such-project")


def test_project_close_of_an_unknown_project_fails_readably(app):
    refused_readably(run(app, "project", "close", "no-such-project"), "no-such-project")


# --- `consent` commands -------------------------------------------------------------------------------------

def test_consent_set_with_exclusions_then_explain_shows_them(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    recorded = cli_json(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "record",
                        "--exclude", "mental-health,hiv")
    assert recorded["consent"].endswith("/_history/1")
    assert (recorded["tier"], recorded["excluded"]) == ("record", ["mental-health", "hiv"])
    shown = cli_json(app, "consent", "explain", "--patient", patient_id, "--project", project)
    assert set(shown) == {"patient", "project", "tier", "excluded", "period", "valid", "basis"}
    assert (shown["patient"], shown["project"], shown["tier"]) == (patient_id, project, "record")
    assert shown["excluded"] == ["mental-health", "hiv"]
    assert shown["period"] is None and shown["valid"] is None
    assert shown["basis"][0].startswith(recorded["consent"])


def test_consent_explain_and_the_api_agree(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    cli_json(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "aggregate",
             "--exclude", "genetics")
    shown = cli_json(app, "consent", "explain", "--patient", patient_id, "--project", project)
    api = explained(client, custodian_headers, patient_id, project)
    assert {k: shown[k] for k in api} == api


def test_consent_set_twice_makes_version_two_of_the_same_consent(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    first = cli_json(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "record")
    second = cli_json(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "none")
    consent_id = first["consent"].split("/")[1]
    assert second["consent"] == f"Consent/{consent_id}/_history/2"
    assert consent_count(client, custodian_headers) == 1
    history = client.get(f"/fhir/Consent/{consent_id}/_history", headers=custodian_headers)
    assert history.status_code == 200
    assert sorted(e["resource"]["meta"]["versionId"] for e in history.get_json()["entry"]) == ["1", "2"]
    assert tier_of(client, custodian_headers, patient_id, project) == "none"


def test_consent_set_for_an_unknown_patient_fails_readably(app):
    project = new_project(app)
    refused_readably(run(app, "consent", "set", "--patient", "ghost", "--project", project, "--tier", "record"),
                     "ghost")


def test_consent_set_with_an_unknown_category_fails_readably(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    result = run(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "record",
                 "--exclude", "astrology")
    refused_readably(result, "astrology")
    assert consent_count(client, custodian_headers) == 0


def test_consent_explain_of_an_unknown_patient_fails_readably(app):
    project = new_project(app)
    refused_readably(run(app, "consent", "explain", "--patient", "ghost", "--project", project), "ghost")
