"""The custodian side of consent, on the real app and database (SQLite and PostgreSQL).

Every Consent Passerelle builds says who agreed and how (the patient, on the web form or on
a signed paper form, and who recorded the paper form); `consent set` records the signing
date, the recorder, the scanned form (never released to research) and when the consent is
in force, naming the patient by id or medical record number. A Consent that changes no
decision because a more recent one governs is stored all the same, and every write path
says so. Projects carry the plain-language text patients read, in English and French.
"""
from __future__ import annotations

import base64
import getpass
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from consent import engine, patients, projects, writer
from consent.materialise import overruled
from service import db
from service.errors import InvalidRequest
from tests.fhir_helpers import create, patient, post_entry, search, transaction
from tests.research_world import bearer, token
from tests.test_consent_materialisation import (
    PERMIT,
    cli_json,
    consent_count,
    explained,
    new_patient,
    new_project,
    refused_readably,
    research_consent,
    run,
    tier_of,
)

MR = {"coding": [{"system": patients.IDENTIFIER_TYPES, "code": "MR"}]}
SCAN = b"%PDF-1.4\n% a signed consent form, scanned\n"
TRANSLATION = "http://hl7.org/fhir/StructureDefinition/translation"


def numbered_patient(client: FlaskClient, headers: dict[str, str], number: str) -> str:
    return create(client, headers, patient(identifier=[{"type": MR, "system": "urn:mrn", "value": number}]))["id"]


def stored_consent(client: FlaskClient, headers: dict[str, str], recorded: dict[str, Any]) -> dict[str, Any]:
    response = client.get(f"/fhir/{recorded['consent'].split('/_history')[0]}", headers=headers)
    assert response.status_code == 200
    return response.get_json()


def scan_file(tmp_path: Path, name: str = "form.pdf", data: bytes = SCAN) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# --- who and how ------------------------------------------------------------------------------------------

def test_consent_set_records_the_paper_form_who_signed_when_and_who_recorded_it(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    recorded = cli_json(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "record",
                        "--signed", "2026-03-02", "--recorded-by", "Claire Martin (records office)")
    consent = stored_consent(client, custodian_headers, recorded)
    assert consent["dateTime"] == "2026-03-02"
    assert consent["performer"] == [{"reference": f"Patient/{patient_id}"}]
    assert writer.how(consent) == {"method": "paper", "recorded_by": "Claire Martin (records office)"}
    (verification,) = consent["verification"]
    assert verification["verified"] is True and verification["verifiedWith"] == {"reference": f"Patient/{patient_id}"}
    assert {"url": writer.VERIFIED_BY, "valueReference": {"display": "Claire Martin (records office)"}} in \
        verification["extension"]


def test_consent_set_without_a_recorder_names_the_operating_system_user(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    recorded = cli_json(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "record")
    assert writer.how(stored_consent(client, custodian_headers, recorded))["recorded_by"] == getpass.getuser()


def test_a_web_form_choice_is_the_patients_own_with_no_recorder():
    consent = writer.build("p-1", None, "aggregate", [], source="web form", method="web")
    assert consent["performer"] == [{"reference": "Patient/p-1"}]
    assert writer.how(consent) == {"method": "web", "recorded_by": None}
    assert "verification" not in consent and "sourceAttachment" not in consent
    assert datetime.fromisoformat(consent["dateTime"]) > datetime.now(UTC) - timedelta(minutes=1)


@pytest.mark.parametrize("claim", ["recorder", "scan", "unknown method"])
def test_a_web_form_choice_cannot_claim_a_paper_recorder_or_scan_nor_an_unknown_method(claim):
    extra = {"recorder": lambda: {"recorded_by": "Claire"},
             "scan": lambda: {"attachment": writer.scanned_form(SCAN, "f.pdf")},
             "unknown method": lambda: {"method": "fax"}}[claim]()
    with pytest.raises(InvalidRequest):
        writer.build("p-1", None, "record", [], source="web form", **{"method": "web", **extra})


def test_a_consent_written_through_the_api_has_no_recorded_method():
    assert writer.how(research_consent("p-1", PERMIT)) == {"method": None, "recorded_by": None}


def test_consent_set_and_explain_accept_the_medical_record_number(app, client, custodian_headers):
    project = new_project(app)
    patient_id = numbered_patient(client, custodian_headers, "MRN-0042")
    recorded = cli_json(app, "consent", "set", "--patient", "MRN-0042", "--project", project, "--tier", "aggregate")
    assert recorded["patient"] == patient_id
    assert stored_consent(client, custodian_headers, recorded)["patient"] == {"reference": f"Patient/{patient_id}"}
    assert cli_json(app, "consent", "explain", "--patient", "MRN-0042", "--project", project)["tier"] == "aggregate"


def test_consent_set_period_bounds_when_the_consent_is_in_force(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    recorded = cli_json(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "record",
                        "--period", "2026-01-01..2030-12-31")
    assert stored_consent(client, custodian_headers, recorded)["provision"]["period"] == {
        "start": "2026-01-01", "end": "2030-12-31"}
    assert recorded["valid"]["start"].startswith("2026-01-01") and recorded["valid"]["end"].startswith("2030-12-31")
    open_ended = cli_json(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "record",
                          "--period", "2026-06-01..")
    assert stored_consent(client, custodian_headers, open_ended)["provision"]["period"] == {"start": "2026-06-01"}


# --- the scanned form --------------------------------------------------------------------------------------

def test_consent_set_keeps_the_scanned_form_as_the_consents_source_attachment(app, client, custodian_headers,
                                                                              tmp_path):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    recorded = cli_json(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "record",
                        "--attachment", scan_file(tmp_path, "Signed Form.PDF"))
    scan = stored_consent(client, custodian_headers, recorded)["sourceAttachment"]
    assert base64.b64decode(scan["data"]) == SCAN
    assert (scan["contentType"], scan["title"], scan["size"]) == ("application/pdf", "Signed Form.PDF", len(SCAN))
    assert scan["hash"] == base64.b64encode(hashlib.sha1(SCAN).digest()).decode()


def test_the_scanned_form_is_never_released_to_research(app, client, custodian_headers, world, tmp_path):
    """Consent is no type a project can receive: the research API refuses it, whatever the project."""
    recorded = cli_json(app, "consent", "set", "--patient", world.patients["consented"], "--project", world.project,
                        "--tier", "record", "--attachment", scan_file(tmp_path))
    consent_id = recorded["consent"].split("/")[1]
    with app.app_context(), db.read() as conn:
        every = projects.all_projects(conn)
    assert every and all("Consent" not in p.released_types for p in every)
    assert "Consent" not in projects.PATIENT_DATA_TYPES + projects.DIRECTORY_TYPES
    for project in every:
        research = bearer(token(client, app, "research", project.project_id))
        for path in ("Consent", f"Consent/{consent_id}", f"Consent?patient={world.patients['consented']}"):
            response = client.get(f"/research/fhir/{path}", headers=research)
            assert response.status_code == 403, (path, response.get_json())
            assert base64.b64encode(SCAN).decode() not in response.get_data(as_text=True)
    refused_readably(run(app, "project", "create", "--name", "Forms", "--tier", "record", "--epsilon", "1",
                         "--types", "Observation,Consent"), "Consent")


# --- bad input: one readable line, nothing written --------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (("--signed", "02/03/2026"), "02/03/2026"),
    (("--signed", "2999-01-01"), "future"),
    (("--period", "2027-01-01..2026-01-01"), "before it starts"),
    (("--period", "2026-01-01"), "START..END"),
    (("--period", "2026-13-01.."), "2026-13-01"),
    (("--recorded-by", "  "), "cannot be empty"),
])
def test_consent_set_refuses_bad_input_readably_and_writes_nothing(app, client, custodian_headers, args, message):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    refused_readably(run(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "record",
                         *args), message)
    assert consent_count(client, custodian_headers) == 0


@pytest.mark.parametrize(("name", "data", "message"), [
    ("form.docx", SCAN, ".pdf"),
    ("form.pdf", b"", "empty"),
    ("form.png", b"\x89PNG" + b"\0" * 10 * 2**20, "MiB"),
])
def test_consent_set_refuses_an_unusable_scan_readably(app, client, custodian_headers, tmp_path, name, data, message):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    refused_readably(run(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "record",
                         "--attachment", scan_file(tmp_path, name, data)), message)
    assert consent_count(client, custodian_headers) == 0


def test_consent_set_refuses_a_missing_scan_and_an_unknown_patient_number(app, client, custodian_headers, tmp_path):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    refused_readably(run(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "record",
                         "--attachment", str(tmp_path / "nowhere.pdf")), "nowhere.pdf")
    refused_readably(run(app, "consent", "set", "--patient", "MRN-404", "--project", project, "--tier", "record"),
                     "MRN-404")
    assert consent_count(client, custodian_headers) == 0


# --- a Consent a more recent one overrules: stored, with a warning ----------------------------------------

def _research_wide_permit(client: FlaskClient, headers: dict[str, str], patient_id: str) -> dict[str, Any]:
    return create(client, headers, research_consent(patient_id, PERMIT, when="2026-02-01T10:00:00Z"))


def _back_dated_project_deny(patient_id: str, project: str) -> dict[str, Any]:
    return research_consent(patient_id, {"type": "deny"}, project=project, when="2025-06-01T10:00:00Z")


def test_consent_set_under_a_newer_research_wide_permit_is_stored_with_a_warning(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    permit = _research_wide_permit(client, custodian_headers, patient_id)
    result = run(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "none",
                 "--signed", "2025-06-01")
    assert result.exit_code == 0, result.output
    (warning,) = result.stderr.strip().splitlines()
    assert warning.startswith("warning: ") and f"Consent/{permit['id']}" in warning and project in warning
    assert consent_count(client, custodian_headers) == 2
    assert tier_of(client, custodian_headers, patient_id, project) == "record"


def test_consent_set_that_governs_prints_no_warning(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    _research_wide_permit(client, custodian_headers, patient_id)
    result = run(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "none")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert tier_of(client, custodian_headers, patient_id, project) == "none"


def test_an_overruled_consent_posted_with_return_operation_outcome_carries_a_warning_issue(app, client,
                                                                                          custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    permit = _research_wide_permit(client, custodian_headers, patient_id)
    response = client.post("/fhir/Consent", json=_back_dated_project_deny(patient_id, project),
                           headers={**custodian_headers, "Prefer": "return=OperationOutcome"})
    assert response.status_code == 201
    issues = response.get_json()["issue"]
    assert [i["severity"] for i in issues] == ["information", "warning"]
    assert issues[1]["code"] == "business-rule" and f"Consent/{permit['id']}" in issues[1]["diagnostics"]
    assert tier_of(client, custodian_headers, patient_id, project) == "record"
    assert consent_count(client, custodian_headers) == 2


def test_an_overruled_consent_put_carries_the_warning_and_a_governing_one_does_not(app, client, custodian_headers):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    _research_wide_permit(client, custodian_headers, patient_id)
    prefer = {**custodian_headers, "Prefer": "return=OperationOutcome"}
    deny = {**_back_dated_project_deny(patient_id, project), "id": "paper-deny"}
    first = client.put("/fhir/Consent/paper-deny", json=deny, headers=prefer)
    assert first.status_code == 201
    assert [i["severity"] for i in first.get_json()["issue"]] == ["information", "warning"]
    second = client.put("/fhir/Consent/paper-deny", json={**deny, "dateTime": "2026-03-01T10:00:00Z"}, headers=prefer)
    assert second.status_code == 200
    assert [i["severity"] for i in second.get_json()["issue"]] == ["information"]
    assert tier_of(client, custodian_headers, patient_id, project) == "none"


def test_an_overruled_consent_posted_without_prefer_answers_the_stored_consent(app, client, custodian_headers):
    """return=representation (the default) has no room for an OperationOutcome: the body is the Consent."""
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    _research_wide_permit(client, custodian_headers, patient_id)
    response = client.post("/fhir/Consent", json=_back_dated_project_deny(patient_id, project),
                           headers=custodian_headers)
    assert response.status_code == 201 and response.get_json()["resourceType"] == "Consent"


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_an_overruled_consent_in_a_bundle_has_a_warning_outcome_on_its_entry(app, client, custodian_headers, kind):
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    bundle = transaction(post_entry(research_consent(patient_id, PERMIT, when="2026-02-01T10:00:00Z")),
                         post_entry(_back_dated_project_deny(patient_id, project)))
    response = client.post("/fhir", json={**bundle, "type": kind}, headers=custodian_headers)
    assert response.status_code == 200, response.get_json()
    permit_entry, deny_entry = response.get_json()["entry"]
    assert permit_entry["response"]["status"] == deny_entry["response"]["status"] == "201 Created"
    assert "outcome" not in permit_entry["response"]
    (issue,) = deny_entry["response"]["outcome"]["issue"]
    assert issue["severity"] == "warning" and permit_entry["response"]["location"].split("/_history")[0] in \
        issue["diagnostics"]
    assert consent_count(client, custodian_headers) == 2


def test_overruled_names_where_another_consent_governs_instead():
    wide = {**research_consent("p", PERMIT, when="2026-01-01"), "id": "wide"}
    newer_a = {**research_consent("p", {"type": "deny"}, project="a", when="2026-02-01"), "id": "newer-a"}
    older_b = {**research_consent("p", {"type": "deny"}, project="b", when="2025-01-01"), "id": "older-b"}
    held = [wide, newer_a, older_b]
    assert overruled(wide, held, ["a", "b", "c"]) == {"a": newer_a}
    assert overruled(older_b, held, ["a", "b", "c"]) == {"b": wide}
    assert overruled(newer_a, held, ["a", "b", "c"]) == {}
    withdrawn = {**older_b, "status": "inactive"}
    assert overruled(withdrawn, [wide, newer_a, withdrawn], ["b"]) == {}
    assert engine.governing(held, "b") is wide


# --- projects in plain language ---------------------------------------------------------------------------

PLAIN = ("--title-en", "Heart health after 60", "--title-fr", "La santé du cœur après 60 ans",
         "--purpose-en", "To learn which treatments prevent a second heart attack.",
         "--purpose-fr", "Savoir quels traitements évitent un second infarctus.",
         "--sponsor-en", "University Hospital cardiology team", "--sponsor-fr", "Équipe de cardiologie du CHU")


def _translation(element: dict[str, Any]) -> dict[str, str]:
    out = {}
    for ext in element["extension"]:
        assert ext["url"] == TRANSLATION
        parts = {e["url"]: e.get("valueCode") or e.get("valueString") for e in ext["extension"]}
        out[parts["lang"]] = parts["content"]
    return out


def test_project_create_stores_the_plain_language_text_and_end_date(app, client, custodian_headers):
    ends = (datetime.now(UTC) + timedelta(days=400)).date().isoformat()
    made = cli_json(app, "project", "create", "--name", "cardio-60", "--tier", "record", "--epsilon", "1",
                    *PLAIN, "--until", ends)
    expected = {"en": {"title": "Heart health after 60",
                       "purpose": "To learn which treatments prevent a second heart attack.",
                       "sponsor": "University Hospital cardiology team"},
                "fr": {"title": "La santé du cœur après 60 ans",
                       "purpose": "Savoir quels traitements évitent un second infarctus.",
                       "sponsor": "Équipe de cardiologie du CHU"}}
    assert (made["plain_language"], made["ends"]) == (expected, ends)
    shown = cli_json(app, "project", "show", made["project_id"])
    assert (shown["plain_language"], shown["ends"]) == (expected, ends)
    (listed,) = [json.loads(line) for line in run(app, "project", "list").stdout.splitlines()]
    assert (listed["plain_language"], listed["ends"]) == (expected, ends)
    with app.app_context(), db.read() as conn:
        record = projects.get(conn, made["project_id"])
    assert (record.plain_language, record.ends) == (expected, ends)
    assert record.plain("fr") == expected["fr"]
    study = client.get(f"/fhir/ResearchStudy/{made['project_id']}", headers=custodian_headers).get_json()
    assert (study["title"], _translation(study["_title"])) == (expected["en"]["title"], {"fr": expected["fr"]["title"]})
    assert (study["description"], _translation(study["_description"])) == (expected["en"]["purpose"],
                                                                            {"fr": expected["fr"]["purpose"]})
    assert (study["sponsor"]["display"], _translation(study["sponsor"]["_display"])) == (
        expected["en"]["sponsor"], {"fr": expected["fr"]["sponsor"]})
    assert study["period"]["end"] == ends


def test_a_project_without_plain_text_shows_its_name_in_both_languages(app, client, custodian_headers):
    made = cli_json(app, "project", "create", "--name", "Study X", "--tier", "aggregate", "--epsilon", "1")
    assert (made["plain_language"], made["ends"]) == (None, None)
    with app.app_context(), db.read() as conn:
        record = projects.get(conn, made["project_id"])
    for language in projects.LANGUAGES:
        assert record.plain(language) == {"title": "Study X", "purpose": None, "sponsor": None}
    study = client.get(f"/fhir/ResearchStudy/{made['project_id']}", headers=custodian_headers).get_json()
    assert study["title"] == "Study X" and "_title" not in study and "end" not in study["period"]


@pytest.mark.parametrize(("args", "message"), [
    (("--title-en", "Heart health"), "fr"),
    (("--purpose-fr", "Savoir"), "en"),
    (("--until", "2020-01-01"), "past"),
    (("--until", "next year"), "next year"),
    (("--description", "Heart", "--purpose-en", "Heart", "--purpose-fr", "Cœur"), "give it once"),
])
def test_project_create_refuses_incomplete_text_or_a_bad_end_date_readably(app, args, message):
    refused_readably(run(app, "project", "create", "--name", "S", "--tier", "record", "--epsilon", "1", *args),
                     message)
    assert run(app, "project", "list").stdout == ""


def test_consent_set_takes_a_signing_date_and_time(app, client, custodian_headers):
    """`--signed` may be a date and time; the command prints the decision it leads to, as `$explain` does."""
    project = new_project(app)
    patient_id = new_patient(client, custodian_headers)
    recorded = cli_json(app, "consent", "set", "--patient", patient_id, "--project", project, "--tier", "aggregate",
                        "--signed", "2026-01-05T09:30:00+01:00")
    assert {k: recorded[k] for k in ("tier", "excluded")} == {
        k: explained(client, custodian_headers, patient_id, project)[k] for k in ("tier", "excluded")}
    assert search(client, custodian_headers, f"Consent?patient={patient_id}")["entry"][0]["resource"]["dateTime"] == \
        "2026-01-05T09:30:00+01:00"


@pytest.mark.parametrize("param,value", [("project", "a\x00b"), ("patient", "Patient/a\x00b"),
                                         ("project", "a" * 65), ("project", "a b")])
def test_explain_refuses_a_parameter_that_is_not_a_fhir_id(client: FlaskClient, custodian_headers, param, value):
    """Found by the fuzzer: a NUL reached the query, and PostgreSQL's text columns cannot hold one (a 500)."""
    query = {"patient": "someone", "project": "someproject", param: value}
    response = client.get("/fhir/Consent/$explain", query_string=query, headers=custodian_headers)
    assert response.status_code == 400
    assert "not a valid FHIR id" in response.get_json()["issue"][0]["diagnostics"]
