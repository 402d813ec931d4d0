"""History at the instance, type and system level: what each version's entry says, and the
parameters `_since`, `_at`, `_lastUpdated`, `_count` with paging."""
from __future__ import annotations

import time

from tests.fhir_helpers import create, issue, observation, patient
from tests.plans import assert_no_sort_step, paged_statements


def _history(client, headers, path: str) -> dict:
    response = client.get(f"/fhir/{path}", headers=headers)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["resourceType"] == "Bundle" and body["type"] == "history"
    return body


def _requests(body: dict) -> list[tuple[str, str, str]]:
    return [(e["request"]["method"], e["request"]["url"], e["response"]["status"]) for e in body.get("entry", [])]


def test_a_resource_created_by_put_has_put_and_201_as_its_first_version(client, custodian_headers):
    client.put("/fhir/Patient/by-put", json=patient(id="by-put"), headers=custodian_headers)
    client.put("/fhir/Patient/by-put", json=patient(id="by-put", gender="male"), headers=custodian_headers)
    client.delete("/fhir/Patient/by-put", headers=custodian_headers)
    body = _history(client, custodian_headers, "Patient/by-put/_history")
    assert _requests(body) == [("DELETE", "Patient/by-put", "204 No Content"),
                               ("PUT", "Patient/by-put", "200 OK"),
                               ("PUT", "Patient/by-put", "201 Created")]


def test_a_resource_created_by_post_has_post_the_type_url_and_201(client, custodian_headers):
    created = create(client, custodian_headers, patient())
    body = _history(client, custodian_headers, f"Patient/{created['id']}/_history")
    [entry] = body["entry"]
    assert _requests(body) == [("POST", "Patient", "201 Created")]
    assert entry["response"]["etag"] == 'W/"1"'
    assert entry["response"]["lastModified"] == created["meta"]["lastUpdated"]


def test_recreating_a_deleted_resource_is_201_again(client, custodian_headers):
    client.put("/fhir/Patient/again", json=patient(id="again"), headers=custodian_headers)
    client.delete("/fhir/Patient/again", headers=custodian_headers)
    client.put("/fhir/Patient/again", json=patient(id="again"), headers=custodian_headers)
    statuses = [status for _, _, status in _requests(_history(client, custodian_headers, "Patient/again/_history"))]
    assert statuses == ["201 Created", "204 No Content", "201 Created"]


def test_transaction_entries_record_their_own_method(client, custodian_headers):
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient(id="tx-put"), "request": {"method": "PUT", "url": "Patient/tx-put"}}]}
    assert client.post("/fhir", json=bundle, headers=custodian_headers).status_code == 200
    assert _requests(_history(client, custodian_headers, "Patient/tx-put/_history")) == [
        ("PUT", "Patient/tx-put", "201 Created")]


def test_type_history_lists_the_versions_of_that_type_only_newest_first(client, custodian_headers):
    first = create(client, custodian_headers, patient(family="First"))
    create(client, custodian_headers, observation(first["id"]))
    second = create(client, custodian_headers, patient(family="Second"))
    body = _history(client, custodian_headers, "Patient/_history")
    assert [e["resource"]["id"] for e in body["entry"]] == [second["id"], first["id"]]
    assert body["total"] == 2


def test_system_history_lists_every_type(client, custodian_headers):
    subject = create(client, custodian_headers, patient())
    create(client, custodian_headers, observation(subject["id"]))
    body = _history(client, custodian_headers, "_history")
    assert [e["resource"]["resourceType"] for e in body["entry"]] == ["Observation", "Patient"]


def test_since_keeps_the_versions_updated_at_or_after_it(client, custodian_headers):
    create(client, custodian_headers, patient(family="Before"))
    time.sleep(0.01)
    later = create(client, custodian_headers, patient(family="After"))
    since = later["meta"]["lastUpdated"]
    body = _history(client, custodian_headers, f"Patient/_history?_since={since.replace('+', '%2B')}")
    assert [e["resource"]["id"] for e in body["entry"]] == [later["id"]]


def test_last_updated_filters_versions_with_prefixes(client, custodian_headers):
    early = create(client, custodian_headers, patient(family="Early"))
    time.sleep(0.01)
    late = create(client, custodian_headers, patient(family="Late"))
    cut = late["meta"]["lastUpdated"].replace("+", "%2B")
    assert [e["resource"]["id"] for e in _history(client, custodian_headers,
                                                   f"_history?_lastUpdated=lt{cut}")["entry"]] == [early["id"]]
    assert [e["resource"]["id"] for e in _history(client, custodian_headers,
                                                   f"_history?_lastUpdated=ge{cut}")["entry"]] == [late["id"]]


def test_at_gives_the_versions_current_at_that_instant(client, custodian_headers):
    client.put("/fhir/Patient/at", json=patient(id="at", gender="female"), headers=custodian_headers)
    time.sleep(0.01)
    client.put("/fhir/Patient/at", json=patient(id="at", gender="male"), headers=custodian_headers)
    first_version = client.get("/fhir/Patient/at/_history/1", headers=custodian_headers).get_json()
    at = first_version["meta"]["lastUpdated"].replace("+", "%2B")
    body = _history(client, custodian_headers, f"Patient/at/_history?_at={at}")
    assert [e["response"]["etag"] for e in body["entry"]] == ['W/"1"']
    assert [e["response"]["etag"] for e in _history(client, custodian_headers,
                                                     "Patient/at/_history?_at=2100-01-01")["entry"]] == ['W/"2"']


def test_count_pages_through_every_version_exactly_once(client, custodian_headers):
    made = [create(client, custodian_headers, patient(family=f"P{i}"))["id"] for i in range(5)]
    seen: list[str] = []
    url = "/fhir/Patient/_history?_count=2"
    pages = 0
    while url:
        body = client.get(url, headers=custodian_headers).get_json()
        seen += [e["resource"]["id"] for e in body.get("entry", [])]
        following = [link["url"] for link in body["link"] if link["relation"] == "next"]
        url = following[0].split("://", 1)[1].partition("/")[2] if following else None
        url = f"/{url}" if url else None
        pages += 1
        if pages == 1:
            create(client, custodian_headers, patient(family="Written while paging"))
    assert sorted(seen) == sorted(made) and len(seen) == 5
    assert pages == 3


def test_an_unknown_history_parameter_is_400_naming_it(client, custodian_headers):
    response = client.get("/fhir/Patient/_history?family=x", headers=custodian_headers)
    assert response.status_code == 400
    assert issue(response)["expression"] == ["family"]


def test_history_of_a_resource_never_stored_is_404(client, custodian_headers):
    assert client.get("/fhir/Patient/never/_history", headers=custodian_headers).status_code == 404


def test_a_patched_version_records_patch(client, custodian_headers):
    created = create(client, custodian_headers, patient())
    response = client.patch(f"/fhir/Patient/{created['id']}", json=[{"op": "add", "path": "/gender", "value": "male"}],
                            headers={**custodian_headers, "Content-Type": "application/json-patch+json"})
    assert response.status_code == 200, response.get_json()
    assert _requests(_history(client, custodian_headers, f"Patient/{created['id']}/_history"))[0] == (
        "PATCH", f"Patient/{created['id']}", "200 OK")


def test_the_research_api_serves_no_history_everything_or_patch(client, research, world):
    for method, url in (("GET", "/research/fhir/_history"), ("GET", "/research/fhir/Observation/_history"),
                        ("GET", "/research/fhir/Patient/any/$everything"), ("PATCH", "/research/fhir/Observation/any"),
                        ("PUT", "/research/fhir/Observation?code=x"), ("DELETE", "/research/fhir/Observation?code=x")):
        response = client.open(url, method=method, headers=research, json=[])
        assert response.status_code in (404, 405), (method, url, response.status_code)
        assert response.get_json()["resourceType"] == "OperationOutcome"


def test_system_history_reads_a_page_from_an_index_without_sorting(app, client, custodian_headers):
    subject = create(client, custodian_headers, patient())["id"]
    for value in (60, 61, 62):
        create(client, custodian_headers, observation(subject, value=value))
    [(statement, parameters)] = paged_statements(
        app, "SELECT history.resource_pk", lambda: _history(client, custodian_headers, "_history?_count=2"))
    assert_no_sort_step(app, statement, parameters)
