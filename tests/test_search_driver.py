"""A `system|code` search in row order starts from that code's index entries: a page reads
about as many rows as it returns, and still returns every match exactly once."""
from __future__ import annotations

from tests.fhir_helpers import create, ids, observation, patient, search
from tests.plans import assert_no_sort_step, paged_statements

LOINC = "http://loinc.org"


def _link(body, relation):
    return next((link["url"].split("/fhir/", 1)[1] for link in body["link"] if link["relation"] == relation), None)


def _walk(client, headers, url):
    found = []
    while url:
        body = search(client, headers, url)
        found += ids(body)
        url = _link(body, "next")
    return found


def test_code_search_pages_through_every_match_once_in_row_order(client, custodian_headers):
    subject = create(client, custodian_headers, patient())["id"]
    wanted = []
    for i in range(7):
        wanted.append(create(client, custodian_headers, observation(subject, code="8867-4", value=60 + i))["id"])
        create(client, custodian_headers, observation(subject, code="8480-6", value=120 + i))
    found = _walk(client, custodian_headers, f"Observation?code={LOINC}|8867-4&_count=3")
    assert found == wanted


def test_code_search_pages_back_over_the_same_matches(client, custodian_headers):
    subject = create(client, custodian_headers, patient())["id"]
    for i in range(5):
        create(client, custodian_headers, observation(subject, code="8867-4", value=60 + i))
    body = search(client, custodian_headers, f"Observation?code={LOINC}|8867-4&_count=2")
    second = search(client, custodian_headers, _link(body, "next"))
    back = search(client, custodian_headers, _link(second, "previous"))
    assert ids(back) == ids(body)


def test_a_resource_coded_twice_with_the_code_is_found_once(client, custodian_headers):
    subject = create(client, custodian_headers, patient())["id"]
    twice = observation(subject, code="8867-4")
    twice["code"]["coding"].append({"system": LOINC, "code": "8867-4", "display": "Heart rate"})
    made = create(client, custodian_headers, twice)["id"]
    body = search(client, custodian_headers, f"Observation?code={LOINC}|8867-4&_total=accurate")
    assert ids(body) == [made] and body["total"] == 1


def test_code_search_with_other_filters_keeps_them(client, custodian_headers):
    subject = create(client, custodian_headers, patient())["id"]
    create(client, custodian_headers, observation(subject, code="8867-4", value=60))
    high = create(client, custodian_headers, observation(subject, code="8867-4", value=110))["id"]
    found = ids(search(client, custodian_headers, f"Observation?code={LOINC}|8867-4&value-quantity=gt100"))
    assert found == [high]


def test_code_search_in_row_order_needs_no_sort_step(app, client, custodian_headers):
    subject = create(client, custodian_headers, patient())["id"]
    for i in range(3):
        create(client, custodian_headers, observation(subject, code="8867-4", value=60 + i))
    [(statement, parameters)] = paged_statements(
        app, "SELECT resources.pk",
        lambda: search(client, custodian_headers, f"Observation?code={LOINC}|8867-4&_count=2"))
    assert_no_sort_step(app, statement, parameters)
