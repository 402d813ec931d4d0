"""A `system|code` search in row order starts from that code's index entries: a page reads
about as many rows as it returns, and still returns every match exactly once."""
from __future__ import annotations

from sqlalchemy import event, text

from service import db
from tests.fhir_helpers import create, ids, observation, patient, search

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


def _statement_of(app, client, headers, query):
    captured = []

    def capture(_conn, _cursor, statement, parameters, _context, _many):
        if statement.lstrip().startswith("SELECT resources.pk") and "LIMIT" in statement:
            captured.append((statement, parameters))

    engine = app.extensions["passerelle.engine"]
    event.listen(engine, "before_cursor_execute", capture)
    try:
        search(client, headers, query)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return captured


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
    [(statement, parameters)] = _statement_of(app, client, custodian_headers,
                                              f"Observation?code={LOINC}|8867-4&_count=2")
    with app.app_context(), db.read() as conn:
        raw = conn.connection.dbapi_connection.cursor()
        if conn.dialect.name == "sqlite":
            raw.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
            plan = " / ".join(row[3] for row in raw.fetchall())
            assert "TEMP B-TREE" not in plan, plan
        else:
            # With sorting priced out, a Sort node remains only if no plan can read the rows in order.
            conn.execute(text("SET LOCAL enable_seqscan = off"))
            conn.execute(text("SET LOCAL enable_sort = off"))
            raw.execute(f"EXPLAIN {statement}", parameters)
            plan = " / ".join(row[0] for row in raw.fetchall())
            assert "Sort" not in plan, plan
