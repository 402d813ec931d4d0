"""Every access is audited (issue 13): who, what, whose data, the outcome and the request id.

Custodian reads, searches, version reads and histories are recorded before the response leaves
(an access that cannot be recorded answers an error and releases nothing); writes and Bundles in
the transaction that makes them; failed requests with the status they got; search values that
identify a person only as a keyed hash. Research releases carry the request id too, and command-
line administration and the patient portal's sign-ins and consent changes are recorded as well.
"""
from __future__ import annotations

import json
import re
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from service import audit, db
from service.store.schema import audit as audit_table
from service.store.schema import clients, resources
from tests.fhir_helpers import create, observation, patient, post_entry, transaction
from tests.portal_helpers import PASSPHRASE, cli, form_token, sign_in, signed_in_patient
from tests.research_world import bearer, token
from tests.test_aggregate_release import _refusing_inserts


def entries(app: Flask) -> list[dict[str, Any]]:
    """Every audit entry, oldest first: its columns, its detail parsed and the patients it names."""
    with app.app_context(), db.read() as conn:
        rows = conn.execute(select(audit_table).order_by(audit_table.c.seq)).all()
        named = audit.patients_named(conn, [r.seq for r in rows])
    return [{"actor": r.actor, "action": r.action, "project_id": r.project_id, "detail": json.loads(r.detail),
             "patients": set(named[r.seq])} for r in rows]


def text_of(app: Flask) -> str:
    """Everything the audit trail says, as one text."""
    return json.dumps([{**e, "patients": sorted(e["patients"])} for e in entries(app)])


def last(app: Flask) -> dict[str, Any]:
    return entries(app)[-1]


def custodian_id(app: Flask) -> str:
    with app.app_context(), db.read() as conn:
        return conn.scalar(select(clients.c.client_id).where(clients.c.role == "custodian"))


def count_entries(app: Flask) -> int:
    with app.app_context(), db.read() as conn:
        return conn.scalar(select(func.count()).select_from(audit_table))


def intact(app: Flask) -> bool:
    with app.app_context(), db.read() as conn:
        return audit.verify(conn)[0]


@pytest.fixture
def stored(client, custodian_headers) -> tuple[str, str]:
    """A patient and one of their observations, as (patient id, observation id)."""
    made = create(client, custodian_headers, patient(family="Dupont", birthDate="1970-01-02",
                                                     address=[{"city": "Lyon"}]))
    reading = create(client, custodian_headers, observation(made["id"]))
    return made["id"], reading["id"]


def test_a_custodian_read_is_audited_with_who_whose_data_and_the_request_id(app, client, custodian_headers, stored):
    patient_id, _ = stored
    response = client.get(f"/fhir/Patient/{patient_id}", headers={**custodian_headers, "X-Request-ID": "req-42.a"})
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "req-42.a"
    entry = last(app)
    assert entry["actor"] == custodian_id(app) and entry["action"] == "read" and entry["project_id"] is None
    assert entry["detail"] == {"type": "Patient", "id": patient_id, "version": None, "outcome": "success",
                               "request_id": "req-42.a"}
    assert entry["patients"] == {patient_id}


@pytest.mark.parametrize("sent", ["", "two words", "x" * 65, "<script>"])
def test_a_request_without_a_sane_id_gets_one_generated(app, client, custodian_headers, stored, sent):
    response = client.get(f"/fhir/Observation/{stored[1]}", headers={**custodian_headers, "X-Request-ID": sent})
    generated = response.headers["X-Request-ID"]
    assert generated != sent and re.fullmatch(r"[0-9a-f]{32}", generated)
    assert last(app)["detail"]["request_id"] == generated


def test_every_response_carries_its_request_id_even_a_refused_one(client):
    assert re.fullmatch(r"[0-9a-f]{32}", client.get("/fhir/Patient").headers["X-Request-ID"])  # no token: 401


def test_a_search_records_identifying_values_only_as_keyed_hashes(app, client, custodian_headers, stored):
    patient_id, _ = stored
    query = "family=Dupont&birthdate=1970-01-02&gender:missing=true&address-city=Lyon&name:contains=Dup"
    for _ in range(2):
        assert client.get(f"/fhir/Patient?{query}", headers=custodian_headers).status_code == 200
    first, second = entries(app)[-2:]
    recorded = dict(first["detail"]["query"])
    assert recorded["gender:missing"] == "true"
    for name in ("family", "birthdate", "address-city", "name:contains"):
        assert recorded[name].startswith("hmac:")
    assert first["detail"]["query"] == second["detail"]["query"]  # the same value, the same hash
    assert first["action"] == "search" and first["detail"]["type"] == "Patient"
    assert first["detail"]["resources"] == 1 and first["patients"] == {patient_id}
    text = text_of(app)
    assert not any(value in text for value in ("Dupont", "1970-01-02", "Lyon", "Dup\""))


def test_a_posted_search_is_concealed_alike(app, client, custodian_headers, stored):
    response = client.post("/fhir/Patient/_search", data="given=Jean&gender:missing=true",
                           headers={**custodian_headers, "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200
    recorded = dict(last(app)["detail"]["query"])
    assert recorded["given"].startswith("hmac:") and recorded["gender:missing"] == "true"
    assert last(app)["patients"] == {stored[0]}


@pytest.mark.parametrize(("name", "identifying"), [
    ("subject:Patient.family", True), ("patient.name:exact", True), ("address-postalcode", True),
    ("telecom", True), ("identifier:of-type", True), ("_content", True),
    ("code", False), ("gender", False), ("_include", False), ("patient", False), ("date", False)])
def test_which_parameters_count_as_identifying(name, identifying):
    assert audit.is_identifying(name) is identifying


def test_version_reads_and_histories_are_audited(app, client, custodian_headers, stored):
    patient_id, reading_id = stored
    assert client.get(f"/fhir/Observation/{reading_id}/_history/1", headers=custodian_headers).status_code == 200
    vread = last(app)
    assert (vread["action"], vread["detail"]["version"], vread["patients"]) == ("read", 1, {patient_id})
    assert client.get(f"/fhir/Observation/{reading_id}/_history", headers=custodian_headers).status_code == 200
    history = last(app)
    assert (history["action"], history["detail"]["resources"], history["patients"]) == ("history", 1, {patient_id})


def test_writes_are_audited_with_the_patient_whose_record_changed(app, client, custodian_headers, stored):
    patient_id, reading_id = stored
    created = [e for e in entries(app) if e["action"] == "create"]
    assert [e["detail"]["type"] for e in created] == ["Patient", "Observation"]
    assert all(e["patients"] == {patient_id} for e in created)
    changed = {**observation(patient_id, value=130.0), "id": reading_id}
    assert client.put(f"/fhir/Observation/{reading_id}", json=changed, headers=custodian_headers).status_code == 200
    assert (last(app)["action"], last(app)["detail"]["version"]) == ("update", 2)
    assert client.delete(f"/fhir/Observation/{reading_id}", headers=custodian_headers).status_code == 204
    assert last(app)["action"] == "delete" and last(app)["detail"]["id"] == reading_id
    assert intact(app)


def test_a_write_that_cannot_be_audited_is_not_stored(app, client, custodian_headers):
    with app.app_context(), db.read() as conn:
        before = conn.scalar(select(func.count()).select_from(resources))
    with _refusing_inserts(app, "audit"):
        response = client.post("/fhir/Patient", json=patient(family="Martin"), headers=custodian_headers)
    assert response.status_code == 500
    with app.app_context(), db.read() as conn:
        assert conn.scalar(select(func.count()).select_from(resources)) == before
    assert "Martin" not in text_of(app)


@pytest.mark.parametrize("path", ["/fhir/Patient/{p}", "/fhir/Patient?family=Dupont", "/fhir/Patient/{p}/_history",
                                  "/fhir/Patient/{p}/_history/1"])
def test_a_read_that_cannot_be_audited_releases_nothing(app, client, custodian_headers, stored, path):
    with _refusing_inserts(app, "audit"):
        response = client.get(path.format(p=stored[0]), headers=custodian_headers)
    assert response.status_code == 500
    assert response.get_json()["resourceType"] == "OperationOutcome"
    assert "Dupont" not in response.get_data(as_text=True)


def test_a_transaction_bundle_is_audited_in_its_transaction_with_its_types_and_patients(app, client,
                                                                                        custodian_headers):
    bundle = transaction(post_entry(patient(family="Bernard"), "urn:uuid:p1"),
                         post_entry(observation("x", subject={"reference": "urn:uuid:p1"}), "urn:uuid:o1"))
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    assert response.status_code == 200, response.get_json()
    made = response.get_json()["entry"][0]["response"]["location"].split("/")[1]
    entry = last(app)
    assert entry["action"] == "bundle" and entry["patients"] == {made}
    assert entry["detail"]["bundle"] == "transaction" and entry["detail"]["types"] == ["Observation", "Patient"]
    assert entry["detail"]["entries"] == 2
    before = count_entries(app)
    with _refusing_inserts(app, "audit"):
        assert client.post("/fhir", json=bundle, headers=custodian_headers).status_code == 500
    with app.app_context(), db.read() as conn:
        assert conn.scalar(select(func.count()).select_from(resources).where(resources.c.type == "Patient")) == 1
    assert count_entries(app) == before


def test_a_batch_bundle_is_audited_with_the_patients_of_what_its_entries_read_and_wrote(app, client,
                                                                                         custodian_headers):
    read, found, written, failed = (create(client, custodian_headers, patient(family=f))["id"]
                                    for f in ("Adam", "Blanc", "Caron", "Dumas"))
    create(client, custodian_headers, observation(found, identifier=[{"system": "urn:s", "value": "o1"}]))
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{read}"}},
        {"resource": observation(found), "request": {"method": "POST", "url": "Observation",
                                                     "ifNoneExist": "identifier=urn:s|o1"}},
        post_entry(observation(written)),
        {"resource": {**patient(family="Dumas"), "id": failed},
         "request": {"method": "PUT", "url": f"Patient/{failed}", "ifMatch": 'W/"7"'}}]}
    response = client.post("/fhir", json=bundle, headers=custodian_headers)
    assert [e["response"]["status"][:3] for e in response.get_json()["entry"]] == ["200", "200", "201", "412"]
    assert last(app)["patients"] == {read, found, written}


def test_a_failed_request_is_audited_with_the_status_it_got(app, client, custodian_headers):
    response = client.get("/fhir/Patient/nobody", headers={**custodian_headers, "X-Request-ID": "r1"})
    assert response.status_code == 404
    entry = last(app)
    assert entry["action"] == "read" and entry["actor"] == custodian_id(app)
    assert entry["detail"] == {"type": "Patient", "outcome": 404, "request_id": "r1"}
    assert client.get("/fhir/NoSuchType", headers=custodian_headers).status_code == 404
    assert "NoSuchType" not in text_of(app)  # a URL's arbitrary text is not recorded


def test_a_request_without_a_valid_token_writes_nothing(app, client):
    before = count_entries(app)
    assert client.get("/fhir/Patient", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert count_entries(app) == before


def test_research_releases_carry_the_request_id(app, client, custodian_headers, world):
    headers = {**bearer(token(client, app, "research", world.project)), "X-Request-ID": "study-7"}
    assert client.get("/research/fhir/Observation", headers=headers).status_code == 200
    entry = last(app)
    assert (entry["action"], entry["project_id"]) == ("search", world.project)
    assert entry["detail"]["request_id"] == "study-7" and entry["detail"]["outcome"] == "success"
    assert intact(app)


def test_explain_and_budget_reads_are_audited(app, client, custodian_headers, world):
    patient_id = next(iter(world.patients.values()))
    assert client.get(f"/fhir/ResearchStudy/{world.project}/$budget", headers=custodian_headers).status_code == 200
    assert (last(app)["action"], last(app)["detail"]["id"]) == ("budget-read", world.project)
    response = client.get(f"/fhir/Consent/$explain?patient={patient_id}&project={world.project}",
                          headers=custodian_headers)
    assert response.status_code == 200
    assert last(app)["action"] == "consent-explain" and last(app)["patients"] == {patient_id}


def test_reading_the_audit_trail_is_itself_audited(app, client, custodian_headers, stored):
    client.get("/fhir/Patient", headers=custodian_headers)
    found = client.get("/fhir/AuditEvent?_count=5", headers=custodian_headers)
    assert found.status_code == 200
    assert last(app)["action"] == "audit-search"
    assert last(app)["detail"]["resources"] == len(found.get_json()["entry"])
    event_id = found.get_json()["entry"][0]["resource"]["id"]
    assert client.get(f"/fhir/AuditEvent/{event_id}", headers=custodian_headers).status_code == 200
    assert (last(app)["action"], last(app)["detail"]["id"]) == ("audit-read", event_id)
    assert intact(app)


def test_command_line_administration_is_audited_with_the_operator(app, client, custodian_headers):
    made = create(client, custodian_headers, patient())
    project = json.loads(cli(app, "project", "create", "--name", "study", "--tier", "record",
                             "--epsilon", "1").stdout)["project_id"]
    partner = json.loads(cli(app, "client", "create", "--name", "lab", "--role", "research",
                             "--project", project).stdout)["client_id"]
    for args in (("client", "disable", partner), ("project", "raise-budget", project, "--epsilon", "2"),
                 ("consent", "set", "--patient", made["id"], "--project", project, "--tier", "record"),
                 ("keys", "rotate", "--project", project), ("project", "close", project)):
        result = cli(app, *args)
        assert result.exit_code == 0, result.output
    done = [e for e in entries(app) if e["actor"].startswith("cli:")]
    assert [e["action"] for e in done] == ["project-create", "client-create", "client-disable", "budget-raise",
                                           "consent-change", "keys-rotate", "project-close"]
    assert all(e["project_id"] == project for e in done if e["action"] != "client-disable")
    assert done[1]["detail"]["client_id"] == partner and done[2]["detail"]["client_id"] == partner
    assert done[4]["patients"] == {made["id"]} and done[4]["detail"]["method"] == "paper"
    assert intact(app)


def test_portal_sign_ins_are_audited_success_and_failure_never_the_passphrase(app, client, custodian_headers):
    signed_in_patient(app, client, custodian_headers, "p-audit", "MRN-77")
    client.post("/consent/signout", data={"csrf_token": form_token(client)})
    assert sign_in(client, "MRN-77", "not the passphrase").status_code == 400
    assert sign_in(client, "MRN-99", PASSPHRASE).status_code == 400
    assert sign_in(client, "MRN-77").status_code == 303
    portal = [(e["actor"], e["action"], e["detail"].get("reason")) for e in entries(app)
              if e["action"] in ("account-invite", "sign-in", "sign-out")]
    assert portal[0][1] == "account-invite" and portal[0][0].startswith("cli:")
    assert portal[1:] == [("patient:p-audit", "sign-in", None), ("patient:p-audit", "sign-out", None),
                          ("patient:p-audit", "sign-in", "wrong-passphrase"),
                          ("patient:unknown", "sign-in", "unknown-number"), ("patient:p-audit", "sign-in", None)]
    unknown = next(e for e in entries(app) if e["actor"] == "patient:unknown")
    assert unknown["detail"]["number"].startswith("hmac:") and unknown["detail"]["outcome"] == "failure"
    text = text_of(app)
    assert PASSPHRASE not in text and "not the passphrase" not in text and "MRN-99" not in text


def test_a_consent_change_on_the_portal_is_audited_in_its_transaction(app, client, custodian_headers):
    signed_in_patient(app, client, custodian_headers, "p-form", "MRN-78")
    response = client.post("/consent/save", data={"csrf_token": form_token(client), "kind": "withdraw"})
    assert response.status_code == 303, response.get_data(as_text=True)
    entry = last(app)
    assert (entry["actor"], entry["action"], entry["patients"]) == ("patient:p-form", "consent-change", {"p-form"})
    assert entry["detail"]["method"] == "web" and entry["detail"]["consents"]
