"""Reading the audit: FHIR AuditEvents at /fhir/AuditEvent, `audit disclosures` and `audit report`,
and the budget history with the questions asked (custodian and the research client's own `$budget`)."""
from __future__ import annotations

import base64
import csv
import io
import json
from typing import Any

import pytest

from policies import budget
from service import db
from tests.research_world import bearer, build, token
from tests.test_aggregate import HYPERTENSION as ILL
from tests.test_aggregate import SNOMED, consent, count, new_project, person, post

MRN_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
CONDITION = f"Condition?code={SNOMED}|{ILL}"


def _entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", ())]


def _patients(event: dict[str, Any]) -> set[str]:
    return {e["what"]["reference"] for e in event.get("entity", ()) if e.get("role", {}).get("code") == "1"}


def _cli(app, *args: str):
    result = app.test_cli_runner().invoke(args=list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def released(app, client, custodian_headers):
    """The research world after one search and one read by project A's client."""
    world = build(app, client, custodian_headers)
    research = bearer(token(client, app, "research", world.project))
    found = client.get("/research/fhir/Observation?_count=100", headers=research).get_json()
    subject = found["entry"][0]["resource"]["subject"]["reference"]
    assert client.get(f"/research/fhir/{subject}", headers=research).status_code == 200
    return world, research


def _search(client, headers, query: str) -> list[dict[str, Any]]:
    response = client.get(f"/fhir/AuditEvent?{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return _entries(response.get_json())


def test_a_research_search_reads_back_as_a_balp_rest_query_event(app, client, custodian_headers, released):
    world, _ = released
    (event,) = [e for e in _search(client, custodian_headers, "subtype=search-type")
                if any(c.get("code") == "ResearchStudy" for c in [x["type"] for x in e.get("entity", ())])]
    assert event["type"] == {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                             "display": "Restful Operation"}
    assert {"system": "http://hl7.org/fhir/restful-interaction", "code": "search-type"} in event["subtype"]
    assert event["action"] == "E" and event["outcome"] == "0"
    entities = {e["type"]["code"]: e for e in event["entity"]}
    assert entities["ResearchStudy"]["what"] == {"reference": f"ResearchStudy/{world.project}"}
    assert entities["Observation"]["role"]["code"] == "4"
    assert {"type": "resources", "valueString": "5"} in entities["Observation"]["detail"]
    released_to = {f"Patient/{world.patients[r]}" for r in ("consented", "no_mental_health", "recent_only")}
    assert released_to <= _patients(event)
    assert f"Patient/{world.patients['refused']}" not in _patients(event)
    user = next(a for a in event["agent"] if a["requestor"])
    assert user["type"]["coding"][0]["code"] == "IRCP"
    assert user["purposeOfUse"][0]["coding"][0]["code"] == "HRESCH"
    again = client.get(f"/fhir/AuditEvent/{event['id']}", headers=custodian_headers)
    assert again.status_code == 200 and again.get_json() == event


def test_audit_events_are_searched_by_patient_agent_subtype_entity_type_outcome_and_date(
        app, client, custodian_headers, released):
    world, _ = released
    consented = world.patients["consented"]
    refused = world.patients["refused"]
    mine = _search(client, custodian_headers, f"patient={consented}")
    assert mine and all(f"Patient/{consented}" in _patients(e) for e in mine)
    assert {s["code"] for e in mine for s in e["subtype"]} >= {"search-type", "read"}
    assert not [e for e in _search(client, custodian_headers, f"patient=Patient/{refused}")
                if e.get("purposeOfEvent")]  # no research release named the refusing patient
    reads = _search(client, custodian_headers, f"patient={consented}&subtype=read")
    assert reads and all(any(s["code"] == "read" for s in e["subtype"]) for e in reads)
    research_agent = next(a for a in reads[0]["agent"] if a["requestor"])["who"]["identifier"]["value"]
    by_agent = _search(client, custodian_headers, f"agent={research_agent}")
    assert by_agent and all(next(a for a in e["agent"] if a["requestor"])["who"]["identifier"]["value"]
                            == research_agent for e in by_agent)
    typed = _search(client, custodian_headers, "entity-type=http://hl7.org/fhir/resource-types|Observation")
    assert typed and all(any(x["type"]["code"] == "Observation" for x in e["entity"]) for e in typed)
    assert _search(client, custodian_headers, "outcome=0")
    assert all(e["outcome"] == "8" for e in _search(client, custodian_headers, "outcome=8"))
    assert _search(client, custodian_headers, "date=ge2000-01-01&date=le2999-12-31")
    assert _search(client, custodian_headers, "date=lt2000-01-01") == []


def test_audit_events_page_newest_first(app, client, custodian_headers, released):
    seen: list[int] = []
    url = "/fhir/AuditEvent?_count=2"
    while url:
        body = client.get(url, headers=custodian_headers).get_json()
        page = [int(e["id"]) for e in _entries(body)]
        assert len(page) <= 2
        seen += page
        url = next((link["url"].split("/fhir", 1)[1] for link in body["link"] if link["relation"] == "next"), None)
        url = f"/fhir{url}" if url else None
    # Each page read is audited in turn: the entries written while paging are newer than the first page.
    everything = [int(e["id"]) for e in _search(client, custodian_headers, "_count=1000") if int(e["id"]) <= seen[0]]
    assert seen == everything == sorted(everything, reverse=True) and len(seen) > 2


def test_audit_events_cannot_be_written_and_refuse_what_they_do_not_know(app, client, custodian_headers, released):
    event = {"resourceType": "AuditEvent", "type": {"code": "rest"}, "recorded": "2024-01-01T00:00:00Z",
             "agent": [{"requestor": True}], "source": {"observer": {"display": "x"}}}
    for method, url in (("post", "/fhir/AuditEvent"), ("put", "/fhir/AuditEvent/1"),
                        ("delete", "/fhir/AuditEvent/1"), ("patch", "/fhir/AuditEvent/1")):
        response = getattr(client, method)(url, json=event, headers=custodian_headers)
        assert response.status_code == 405, (method, url)
        assert response.get_json()["resourceType"] == "OperationOutcome"
        assert response.headers["Allow"] == "GET"
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": event, "request": {"method": "POST", "url": "AuditEvent"}}]}
    assert client.post("/fhir", json=bundle, headers=custodian_headers).status_code in (400, 405, 422)
    assert client.get("/fhir/AuditEvent/999999", headers=custodian_headers).status_code == 404
    assert client.get("/fhir/AuditEvent/abc", headers=custodian_headers).status_code == 404
    unknown = client.get("/fhir/AuditEvent?name=x", headers=custodian_headers)
    assert unknown.status_code == 400 and unknown.get_json()["resourceType"] == "OperationOutcome"
    assert client.get("/fhir/AuditEvent?date=yesterday", headers=custodian_headers).status_code == 400


def test_only_custodians_read_the_audit(app, client, custodian_headers, released):
    _, research = released
    assert client.get("/fhir/AuditEvent", headers=research).status_code in (401, 403)
    assert client.get("/fhir/AuditEvent").status_code == 401


def test_the_custodian_capability_statement_lists_audit_event_read_only(client):
    statement = client.get("/fhir/metadata").get_json()
    (entry,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "AuditEvent"]
    assert [i["code"] for i in entry["interaction"]] == ["read", "search-type"]
    assert {p["name"] for p in entry["searchParam"]} == {"date", "agent", "patient", "entity-type", "subtype",
                                                         "outcome"}


# -- who received what: the DPO's commands ---------------------------------------------------------


@pytest.fixture
def disclosed(app, client, custodian_headers):
    """A patient with an MRN whose records went to a record project and whose data counted in an
    aggregate answer of another project, and a patient who never consented."""
    world = build(app, client, custodian_headers)
    mrn = "MRN-4711"
    target = world.patients["consented"]
    stored = client.get(f"/fhir/Patient/{target}", headers=custodian_headers).get_json()
    stored["identifier"] = [{"type": {"coding": [{"system": MRN_SYSTEM, "code": "MR"}]}, "value": mrn}]
    assert client.put(f"/fhir/Patient/{target}", json=stored, headers=custodian_headers).status_code == 200
    research = bearer(token(client, app, "research", world.project))
    assert client.get("/research/fhir/Observation?_count=100", headers=research).status_code == 200
    stats = new_project(app)
    for patient_id in (target, *(person(client, custodian_headers, "female", "1960-01-01", codes=(ILL,))
                                 for _ in range(2))):
        consent(app, patient_id, stats, "aggregate")
    analyst = bearer(token(client, app, "research", stats))
    assert post(client, analyst, count(epsilon=0.25)).status_code == 200
    return world, target, mrn, stats, analyst


def test_disclosures_list_every_release_per_project_and_kind(app, disclosed):
    world, target, mrn, stats, _ = disclosed
    found = json.loads(_cli(app, "audit", "disclosures", "--patient", mrn, "--format", "json"))
    assert found["patient"] == target
    recipients = {(r["project"], r["kind"]): r for r in found["recipients"]}
    assert set(recipients) == {(world.project, "records"), (stats, "aggregate")}
    assert recipients[(world.project, "records")]["resources"] >= 2
    assert recipients[(stats, "aggregate")]["epsilon"] == 0.25
    assert recipients[(stats, "aggregate")]["releases"] == 1
    by_id = json.loads(_cli(app, "audit", "disclosures", "--patient", target, "--format", "json"))
    assert by_id == found
    never = json.loads(_cli(app, "audit", "disclosures", "--patient", world.patients["refused"], "--format", "json"))
    assert never["releases"] == [] and never["recipients"] == []
    later = json.loads(_cli(app, "audit", "disclosures", "--patient", target, "--since", "2999", "--format", "json"))
    assert later["releases"] == []


def test_disclosures_as_csv_and_table(app, disclosed):
    world, target, _, stats, _ = disclosed
    rows = list(csv.DictReader(io.StringIO(_cli(app, "audit", "disclosures", "--patient", target,
                                                 "--format", "csv"))))
    assert {(r["project"], r["kind"]) for r in rows} == {(world.project, "records"), (stats, "aggregate")}
    assert {r["resource_type"] for r in rows if r["kind"] == "records"} == {"Observation"}
    table = _cli(app, "audit", "disclosures", "--patient", target)
    assert world.project in table and stats in table and "aggregate" in table


def test_disclosures_refuse_an_unknown_patient(app):
    result = app.test_cli_runner().invoke(args=["audit", "disclosures", "--patient", "nobody"])
    assert result.exit_code == 1 and "nobody" in result.output


def test_report_says_what_a_project_received(app, disclosed):
    world, _, _, stats, _ = disclosed
    records = json.loads(_cli(app, "audit", "report", "--project", world.project, "--format", "json"))
    assert records["resources_by_type"] == {"Observation": records["resources"]} and records["resources"] >= 5
    assert records["patients"] == 3  # consented, no_mental_health, recent_only
    answers = json.loads(_cli(app, "audit", "report", "--project", stats, "--format", "json"))
    assert answers["patients_in_aggregates"] == 3 and answers["resources"] == 0
    assert answers["budget"]["spent"] == 0.25
    (day,) = answers["budget"]["spent_per_day"]
    assert day["epsilon"] == day["cumulative"] == 0.25
    (question,) = answers["budget"]["questions"]
    assert json.loads(question["question"])["measure"] == "count"
    assert "ε total" in _cli(app, "audit", "report", "--project", stats)


# -- the budget history with its questions -------------------------------------------------------------


def _history(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [{part["name"]: next(v for k, v in part.items() if k.startswith("value")) for part in p["part"]}
            for p in body["parameter"] if p["name"] == "spend"]


def _value(body: dict[str, Any], name: str) -> Any:
    return next(p["valueDecimal"] for p in body["parameter"] if p["name"] == name)


def test_the_budget_history_records_the_canonical_question(app, client, custodian_headers, disclosed):
    _, _, _, stats, analyst = disclosed
    assert post(client, analyst, count(CONDITION, epsilon=0.5)).status_code == 200
    custodian = client.get(f"/fhir/ResearchStudy/{stats}/$budget", headers=custodian_headers).get_json()
    queries = [h for h in _history(custodian) if h["kind"] == "query"]
    assert len(queries) == 2
    for item in queries:
        assert budget.text_hash(item["question"]) == item["query"]
    assert json.loads(queries[0]["question"])["cohort"] == [CONDITION]  # newest first


def test_a_research_client_reads_its_own_budget_without_spending(app, client, custodian_headers, disclosed):
    world, _, _, stats, analyst = disclosed
    first = client.get("/research/fhir/$budget", headers=analyst)
    assert first.status_code == 200, first.get_json()
    again = client.get("/research/fhir/$budget", headers=analyst).get_json()
    assert again == first.get_json()
    assert _value(again, "spent") == 0.25 and _value(again, "remaining") == _value(again, "total") - 0.25
    custodian = client.get(f"/fhir/ResearchStudy/{stats}/$budget", headers=custodian_headers).get_json()
    assert custodian == again  # one rendering
    (asked,) = [h for h in _history(again) if h["kind"] == "query"]
    assert json.loads(asked["question"])["measure"] == "count"
    other = bearer(token(client, app, "research", world.other_project))
    theirs = client.get("/research/fhir/$budget", headers=other).get_json()
    assert next(p for p in theirs["parameter"] if p["name"] == "project")["valueReference"]["reference"] \
        == f"ResearchStudy/{world.other_project}"
    assert [h for h in _history(theirs) if h["kind"] == "query"] == []
    with app.app_context(), db.read() as conn:
        assert budget.status(conn, stats, history_limit=0)["spent"] == 0.25


def test_the_query_entity_carries_the_question_in_base64(app, client, custodian_headers, disclosed):
    (event,) = _search(client, custodian_headers, "subtype=aggregate")
    query = next(e for e in event["entity"] if e.get("role", {}).get("code") == "24")
    assert json.loads(base64.b64decode(query["query"]))["measure"] == "count"
    assert {"type": "epsilon", "valueString": "0.25"} in query["detail"]
