"""The research API: each path × each consent situation and role shows exactly what is allowed.

Visible: the consented patient's data; the no-mental-health patient's data without the
depression Condition; the recent-only patient's data from 2020 on. Invisible everywhere:
aggregate-only, refused and silent (default deny) patients, and the patient who
consented to another project only.
"""
from __future__ import annotations

import pytest

from tests.research_world import DEPRESSION, World, bearer, token

RECORD_VISIBLE = {"consented": 2, "no_mental_health": 2, "recent_only": 1}
HIDDEN = ("aggregate_only", "refused", "silent", "other_project")


def _markers(bundle: dict) -> list[float]:
    return sorted(e["resource"]["valueQuantity"]["value"] for e in bundle.get("entry", [])
                  if e["resource"]["resourceType"] == "Observation")


def _expected_markers(world: World) -> list[float]:
    return sorted(world.marker[role] for role, n in RECORD_VISIBLE.items() for _ in range(n))


def _get(client, url: str, headers: dict[str, str]):
    return client.get(url.replace("http://localhost", ""), headers=headers)


# -- search --------------------------------------------------------------------------------


def test_search_returns_only_consented_in_period_observations(client, world, research):
    body = client.get("/research/fhir/Observation?_count=100", headers=research).get_json()
    assert _markers(body) == _expected_markers(world)


def test_total_counts_only_what_the_caller_may_see(client, world, research):
    body = client.get("/research/fhir/Observation?_total=accurate&_count=1", headers=research).get_json()
    assert body["total"] == sum(RECORD_VISIBLE.values())


def test_summary_count_counts_only_visible_resources(client, world, research):
    body = client.get("/research/fhir/Patient?_summary=count", headers=research).get_json()
    assert body["total"] == len(RECORD_VISIBLE)
    assert "entry" not in body


def test_an_excluded_sensitive_category_is_invisible(client, world, research):
    body = client.get(f"/research/fhir/Condition?code=http://snomed.info/sct|{DEPRESSION}&_total=accurate",
                      headers=research).get_json()
    assert body["total"] == 2  # consented and recent_only; not no_mental_health


def test_paging_is_full_and_stable_and_shows_each_visible_resource_once(client, world, research):
    url, seen, sizes = "/research/fhir/Observation?_count=2", [], []
    while url:
        body = _get(client, url, research).get_json()
        sizes.append(len(body.get("entry", [])))
        seen += _markers(body)
        url = next((link["url"] for link in body["link"] if link["relation"] == "next"), None)
    assert sorted(seen) == _expected_markers(world)
    assert sizes[:-1] == [2] * (len(sizes) - 1)


def test_include_carries_only_visible_patients(client, world, research):
    body = client.get("/research/fhir/Observation?_include=Observation:subject&_count=100",
                      headers=research).get_json()
    included = [e for e in body["entry"] if e["search"]["mode"] == "include"]
    assert len(included) == len(RECORD_VISIBLE)
    assert all(e["resource"]["resourceType"] == "Patient" for e in included)


def test_references_point_at_readable_pseudonyms(client, world, research):
    body = client.get("/research/fhir/Observation?_count=1", headers=research).get_json()
    reference = body["entry"][0]["resource"]["subject"]["reference"]
    assert reference.startswith("Patient/")
    response = client.get(f"/research/fhir/{reference}", headers=research)
    assert response.status_code == 200
    assert response.get_json()["id"] == reference.split("/")[1]


def test_search_by_patient_pseudonym(client, world, research):
    first = client.get("/research/fhir/Observation?_count=1", headers=research).get_json()
    subject = first["entry"][0]["resource"]["subject"]["reference"]
    marker = first["entry"][0]["resource"]["valueQuantity"]["value"]
    body = client.get(f"/research/fhir/Observation?patient={subject}", headers=research).get_json()
    assert {e["resource"]["valueQuantity"]["value"] for e in body["entry"]} == {marker}


def test_no_real_id_name_or_phone_appears_in_research_responses(client, world, research):
    raw = client.get("/research/fhir/Observation?_include=Observation:subject&_count=100",
                     headers=research).data
    raw += client.get("/research/fhir/Patient?_count=100", headers=research).data
    for role, real_id in world.patients.items():
        assert real_id.encode() not in raw
        assert f"Family{role}".encode() not in raw
    assert b"Secret" not in raw and b"+33 6" not in raw and b"1950-02-03" not in raw


# -- read and vread ------------------------------------------------------------------------


def _pseudonym_of(client, research, role_marker: float) -> str:
    body = client.get("/research/fhir/Observation?_count=100", headers=research).get_json()
    entry = next(e for e in body["entry"] if e["resource"]["valueQuantity"]["value"] == role_marker)
    return entry["resource"]["subject"]["reference"].split("/")[1]


def test_read_by_pseudonym_returns_the_deidentified_patient(client, world, research):
    pseudonym = _pseudonym_of(client, research, world.marker["consented"])
    body = client.get(f"/research/fhir/Patient/{pseudonym}", headers=research).get_json()
    assert body["id"] == pseudonym
    assert "name" not in body and "telecom" not in body
    assert body["birthDate"] == "1950"


def test_vread_of_a_visible_resource(client, world, research):
    pseudonym = _pseudonym_of(client, research, world.marker["consented"])
    response = client.get(f"/research/fhir/Patient/{pseudonym}/_history/1", headers=research)
    assert response.status_code == 200


def test_a_real_id_is_not_readable(client, world, research):
    response = client.get(f"/research/fhir/Patient/{world.patients['consented']}", headers=research)
    assert response.status_code == 404


def test_revocation_is_effective_on_the_next_request(app, client, world, research):
    pseudonym = _pseudonym_of(client, research, world.marker["consented"])
    runner = app.test_cli_runner()
    result = runner.invoke(args=["consent", "set", "--patient", world.patients["consented"],
                                 "--project", world.project, "--tier", "none"])
    assert result.exit_code == 0, result.output
    assert client.get(f"/research/fhir/Patient/{pseudonym}", headers=research).status_code == 404
    body = client.get("/research/fhir/Observation?_count=100", headers=research).get_json()
    assert world.marker["consented"] not in _markers(body)


@pytest.mark.parametrize("role", HIDDEN)
def test_hidden_patients_are_in_no_search_result(client, world, research, role):
    body = client.get("/research/fhir/Observation?_count=100", headers=research).get_json()
    assert world.marker[role] not in _markers(body)


def test_pseudonyms_differ_between_projects(app, client, world, research):
    other = bearer(token(client, app, "research", world.other_project))
    body_b = client.get("/research/fhir/Observation?_count=100", headers=other).get_json()
    assert _markers(body_b) == [world.marker["other_project"]] * 2
    subject_b = body_b["entry"][0]["resource"]["subject"]["reference"]
    assert client.get(f"/research/fhir/{subject_b}", headers=research).status_code == 404


# -- roles -----------------------------------------------------------------------------------


def test_no_token_is_401(client, world):
    assert client.get("/research/fhir/Observation").status_code == 401


def test_a_custodian_token_is_403(client, world, custodian_headers):
    assert client.get("/research/fhir/Observation", headers=custodian_headers).status_code == 403


def test_an_aggregate_project_gets_403_on_record_paths(app, client, world):
    aggregate = bearer(token(client, app, "research", world.aggregate_project))
    for path in ("/research/fhir/Observation", "/research/fhir/Patient/abc", "/research/fhir/Patient/abc/_history/1"):
        assert client.get(path, headers=aggregate).status_code == 403, path
    assert client.get("/research/fhir/$export", headers={**aggregate, "Prefer": "respond-async"}).status_code == 403


def test_writes_are_405(client, world, research):
    response = client.post("/research/fhir/Patient", json={"resourceType": "Patient"}, headers=research)
    assert response.status_code == 405
    assert response.get_json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("query", ["Patient?name=Family", "Patient?identifier=x", "Observation?date=ge2020",
                                   "Patient?birthdate=1950", "Observation?_sort=-date"])
def test_identifying_or_date_searches_are_refused(client, world, research, query):
    response = client.get(f"/research/fhir/{query}", headers=research)
    assert response.status_code == 403


def test_research_metadata_is_a_read_only_capability_statement(client):
    body = client.get("/research/fhir/metadata").get_json()
    interactions = {i["code"] for r in body["rest"][0]["resource"] for i in r["interaction"]}
    assert interactions.isdisjoint({"create", "update", "delete"})


def test_research_metadata_lists_no_identifying_or_date_parameter(client):
    body = client.get("/research/fhir/metadata").get_json()
    patient = next(r for r in body["rest"][0]["resource"] if r["type"] == "Patient")
    names = {p["name"] for p in patient["searchParam"]}
    assert "gender" in names
    assert names.isdisjoint({"name", "family", "identifier", "birthdate", "phone", "address"})


def test_one_patients_class_exclusion_hides_that_class_for_that_patient_only(app, client, world, research):
    from consent import writer
    from service import db

    choice = writer.build(world.patients["consented"], world.project, "record", [], source="test")
    choice["provision"]["provision"] = [{"type": "deny", "class": [
        {"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}]}]
    with app.app_context(), db.write() as conn:
        writer.record(conn, choice)
    body = client.get("/research/fhir/Observation?_count=100", headers=research).get_json()
    expected = sorted(world.marker[r] for r, n in RECORD_VISIBLE.items() if r != "consented" for _ in range(n))
    assert _markers(body) == expected
