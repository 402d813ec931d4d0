"""Search on the custodian API: parameters, prefixes, modifiers, sorting, paging, totals, _include."""
from __future__ import annotations

import pytest
from fhir.resources.R4B.bundle import Bundle

from tests.fhir_helpers import create, ids, issue, observation, patient, search


@pytest.fixture
def people(client, custodian_headers):
    """Three patients with distinct names, genders, birth dates and identifiers."""
    made = {}
    for key, family, given, gender, born in (
        ("ana", "Müller", "Ana", "female", "1950-06-15"),
        ("bob", "Martin", "Bob", "male", "1985-01-02"),
        ("cle", "Martinez", "Clémence", "female", "2001-11-30"),
    ):
        made[key] = create(client, custodian_headers, patient(
            family=family, given=given, gender=gender, birthDate=born,
            identifier=[{"system": "urn:mrn", "value": f"MRN-{key}"}],
            telecom=[{"system": "phone", "value": f"555-{key}"}]))
    return made


def test_search_by_identifier_system_and_value(client, custodian_headers, people):
    assert ids(search(client, custodian_headers, "Patient?identifier=urn:mrn|MRN-bob")) == [people["bob"]["id"]]


def test_search_by_identifier_value_alone(client, custodian_headers, people):
    assert ids(search(client, custodian_headers, "Patient?identifier=MRN-ana")) == [people["ana"]["id"]]


def test_identifier_with_the_wrong_system_matches_nothing(client, custodian_headers, people):
    assert ids(search(client, custodian_headers, "Patient?identifier=urn:other|MRN-ana")) == []


def test_name_matches_by_prefix_ignoring_case_and_accents(client, custodian_headers, people):
    found = ids(search(client, custodian_headers, "Patient?name=MARTIN"))
    assert sorted(found) == sorted([people["bob"]["id"], people["cle"]["id"]])
    assert ids(search(client, custodian_headers, "Patient?given=clemence")) == [people["cle"]["id"]]
    assert ids(search(client, custodian_headers, "Patient?family=muller")) == [people["ana"]["id"]]


def test_family_exact_is_case_and_accent_sensitive(client, custodian_headers, people):
    assert ids(search(client, custodian_headers, "Patient?family:exact=Müller")) == [people["ana"]["id"]]
    assert ids(search(client, custodian_headers, "Patient?family:exact=Muller")) == []


def test_string_contains(client, custodian_headers, people):
    assert sorted(ids(search(client, custodian_headers, "Patient?family:contains=tin"))) == sorted(
        [people["bob"]["id"], people["cle"]["id"]])


def test_gender_token(client, custodian_headers, people):
    assert sorted(ids(search(client, custodian_headers, "Patient?gender=female"))) == sorted(
        [people["ana"]["id"], people["cle"]["id"]])


def test_token_not_modifier(client, custodian_headers, people):
    assert ids(search(client, custodian_headers, "Patient?gender:not=female")) == [people["bob"]["id"]]


def test_comma_means_or(client, custodian_headers, people):
    found = ids(search(client, custodian_headers, "Patient?identifier=MRN-ana,MRN-bob"))
    assert sorted(found) == sorted([people["ana"]["id"], people["bob"]["id"]])


def test_repeated_parameters_mean_and(client, custodian_headers, people):
    assert ids(search(client, custodian_headers, "Patient?family=mart&gender=male")) == [people["bob"]["id"]]


@pytest.mark.parametrize(("query", "expected"), [
    ("birthdate=1985", ["bob"]),
    ("birthdate=eq1985-01", ["bob"]),
    ("birthdate=ne1985-01-02", ["ana", "cle"]),
    ("birthdate=lt1985-01-02", ["ana"]),
    ("birthdate=le1985-01-02", ["ana", "bob"]),
    ("birthdate=gt1985-01-02", ["cle"]),
    ("birthdate=ge1985-01-02", ["bob", "cle"]),
    ("birthdate=ge1950&birthdate=lt2000", ["ana", "bob"]),
    ("birthdate=sa1990", ["cle"]),
    ("birthdate=eb1960", ["ana"]),
])
def test_date_prefixes(client, custodian_headers, people, query, expected):
    found = ids(search(client, custodian_headers, f"Patient?{query}"))
    assert sorted(found) == sorted(people[k]["id"] for k in expected)


def test_phone_token(client, custodian_headers, people):
    assert ids(search(client, custodian_headers, "Patient?phone=555-ana")) == [people["ana"]["id"]]


def test_id_parameter(client, custodian_headers, people):
    assert ids(search(client, custodian_headers, f"Patient?_id={people['bob']['id']}")) == [people["bob"]["id"]]


def test_missing_modifier(client, custodian_headers, people):
    create(client, custodian_headers, patient(family="Nobirth"))
    found = search(client, custodian_headers, "Patient?birthdate:missing=true")
    assert [e["resource"]["name"][0]["family"] for e in found["entry"]] == ["Nobirth"]


@pytest.fixture
def readings(client, custodian_headers):
    """One patient with systolic readings 110..150 on consecutive days, and one other patient's."""
    subject = create(client, custodian_headers, patient())
    other = create(client, custodian_headers, patient(family="Other"))
    made = [create(client, custodian_headers,
                   observation(subject["id"], value=v, when=f"2021-05-{day:02d}T08:00:00Z"))
            for day, v in enumerate((110, 120, 130, 140, 150), start=1)]
    create(client, custodian_headers, observation(other["id"], code="8867-4", value=70, unit="/min"))
    return subject, other, made


def test_patient_and_subject_find_a_patients_observations(client, custodian_headers, readings):
    subject, _, made = readings
    expected = sorted(o["id"] for o in made)
    assert sorted(ids(search(client, custodian_headers, f"Observation?patient={subject['id']}"))) == expected
    assert sorted(ids(search(client, custodian_headers,
                             f"Observation?subject=Patient/{subject['id']}&_count=100"))) == expected


def test_code_with_system(client, custodian_headers, readings):
    assert len(ids(search(client, custodian_headers, "Observation?code=http://loinc.org|8480-6"))) == 5
    assert len(ids(search(client, custodian_headers, "Observation?code=http://loinc.org|8867-4"))) == 1
    assert ids(search(client, custodian_headers, "Observation?code=http://snomed.info/sct|8480-6")) == []


def test_category_and_status(client, custodian_headers, readings):
    assert len(ids(search(client, custodian_headers, "Observation?category=vital-signs&status=final"))) == 6


@pytest.mark.parametrize(("query", "count"), [
    ("value-quantity=gt130", 2),
    ("value-quantity=ge130", 3),
    ("value-quantity=lt120||mm[Hg]", 1),
    ("value-quantity=130", 1),
    ("value-quantity=130|http://unitsofmeasure.org|mm[Hg]", 1),
    ("value-quantity=le150||mm[Hg]", 5),
    ("value-quantity=ne130||mm[Hg]", 4),
])
def test_value_quantity(client, custodian_headers, readings, query, count):
    assert len(ids(search(client, custodian_headers, f"Observation?{query}&_count=50"))) == count


def test_observation_date_prefixes(client, custodian_headers, readings):
    assert len(ids(search(client, custodian_headers, "Observation?date=ge2021-05-03&date=le2021-05-04"))) == 2


def test_sort_by_date_descending(client, custodian_headers, readings):
    _, _, made = readings
    found = ids(search(client, custodian_headers, "Observation?code=8480-6&_sort=-date"))
    assert found == [o["id"] for o in reversed(made)]


def test_sort_by_value_ascending_puts_missing_values_last(client, custodian_headers, people):
    create(client, custodian_headers, patient(family="Zed"))
    found = search(client, custodian_headers, "Patient?_sort=birthdate")
    assert [e["resource"]["name"][0]["family"] for e in found["entry"]] == ["Müller", "Martin", "Martinez", "Zed"]


def test_last_updated_filters_and_sorts(client, custodian_headers, people):
    found = search(client, custodian_headers, "Patient?_lastUpdated=gt2000-01-01&_sort=-_lastUpdated")
    assert ids(found) == [people["cle"]["id"], people["bob"]["id"], people["ana"]["id"]]


def _walk(client, headers, first_url, relation="next"):
    pages, url = [], first_url
    while url:
        body = client.get(url.replace("http://localhost", ""), headers=headers).get_json()
        pages.append(body)
        url = next((link["url"] for link in body["link"] if link["relation"] == relation), None)
    return pages


@pytest.mark.parametrize("sort", ["", "&_sort=-date", "&_sort=value-quantity", "&_sort=_id"])
def test_paging_returns_every_match_exactly_once(client, custodian_headers, sort):
    subject = create(client, custodian_headers, patient())
    made = {create(client, custodian_headers,
                   observation(subject["id"], value=v % 4, when=f"2021-0{1 + v % 3}-10"))["id"] for v in range(11)}
    pages = _walk(client, custodian_headers, f"/fhir/Observation?patient={subject['id']}&_count=3{sort}")
    seen = [i for page in pages for i in ids(page)]
    assert [len(ids(p)) for p in pages] == [3, 3, 3, 2]
    assert sorted(seen) == sorted(made)


def test_previous_links_walk_back_over_the_same_pages(client, custodian_headers):
    subject = create(client, custodian_headers, patient())
    for v in range(7):
        create(client, custodian_headers, observation(subject["id"], value=v))
    forward = _walk(client, custodian_headers, f"/fhir/Observation?patient={subject['id']}&_count=2")
    last_self = next(link["url"] for link in forward[-1]["link"] if link["relation"] == "self")
    backward = _walk(client, custodian_headers, last_self, relation="previous")
    assert [ids(p) for p in backward] == [ids(p) for p in reversed(forward)]


def test_paging_links_keep_the_search_parameters(client, custodian_headers, readings):
    body = search(client, custodian_headers, "Observation?code=8480-6&_count=2")
    Bundle.model_validate(body)
    links = {link["relation"]: link["url"] for link in body["link"]}
    assert links["self"] == "http://localhost/fhir/Observation?code=8480-6&_count=2"
    assert "code=8480-6" in links["next"] and "_cursor=" in links["next"]


def test_a_tampered_cursor_is_400(client, custodian_headers, readings):
    body = search(client, custodian_headers, "Observation?code=8480-6&_count=2")
    next_url = next(link["url"] for link in body["link"] if link["relation"] == "next")
    response = client.get(next_url.replace("http://localhost", "") + "x", headers=custodian_headers)
    assert response.status_code == 400


def test_a_cursor_from_another_search_is_400(client, custodian_headers, readings):
    body = search(client, custodian_headers, "Observation?code=8480-6&_count=2")
    cursor = next(link["url"] for link in body["link"] if link["relation"] == "next").split("_cursor=")[1]
    response = client.get(f"/fhir/Observation?code=8867-4&_count=2&_cursor={cursor}", headers=custodian_headers)
    assert response.status_code == 400


def test_total_accurate_counts_all_matches(client, custodian_headers, readings):
    body = search(client, custodian_headers, "Observation?code=8480-6&_count=2&_total=accurate")
    assert body["total"] == 5
    assert len(body["entry"]) == 2


def test_summary_count_returns_only_the_total(client, custodian_headers, readings):
    body = search(client, custodian_headers, "Observation?code=8480-6&_summary=count")
    assert body["total"] == 5
    assert "entry" not in body


def test_include_adds_the_subject_once(client, custodian_headers, readings):
    subject, _, _ = readings
    body = search(client, custodian_headers, "Observation?code=8480-6&_include=Observation:subject")
    Bundle.model_validate(body)
    assert ids(body, "include") == [subject["id"]]
    assert len(ids(body)) == 5


def test_include_of_patient_restricts_to_patients(client, custodian_headers, readings):
    subject, _, _ = readings
    body = search(client, custodian_headers, "Observation?code=8480-6&_include=Observation:patient")
    assert ids(body, "include") == [subject["id"]]


def test_an_unknown_parameter_is_400_naming_it(client, custodian_headers):
    response = client.get("/fhir/Patient?colour=blue", headers=custodian_headers)
    assert response.status_code == 400
    assert "colour" in issue(response)["diagnostics"]


def test_lenient_handling_ignores_unknown_parameters(client, custodian_headers, people):
    response = client.get("/fhir/Patient?colour=blue", headers={**custodian_headers, "Prefer": "handling=lenient"})
    assert response.status_code == 200
    assert len(ids(response.get_json())) == 3
    assert "colour" not in response.get_json()["link"][0]["url"]


@pytest.mark.parametrize("query", [
    "Patient?birthdate=yesterday", "Observation?value-quantity=abc", "Patient?_count=-1",
    "Patient?_sort=colour", "Patient?_include=Observation:subject", "Patient?family:fuzzy=x",
    "Observation?subject.organization.name=x",
])
def test_malformed_search_values_are_400(client, custodian_headers, query):
    response = client.get(f"/fhir/{query}", headers=custodian_headers)
    assert response.status_code == 400, response.get_json()


def test_post_search_takes_form_parameters(client, custodian_headers, people):
    response = client.post("/fhir/Patient/_search", data={"gender": "male"}, headers={
        "Authorization": custodian_headers["Authorization"]})
    assert response.status_code == 200
    assert ids(response.get_json()) == [people["bob"]["id"]]


def test_every_synthea_type_is_searchable_by_patient_or_subject(client, custodian_headers):
    for resource_type in ("Encounter", "Condition", "Observation", "Procedure", "MedicationRequest",
                          "Immunization", "DiagnosticReport", "AllergyIntolerance", "CarePlan", "CareTeam",
                          "Goal", "Claim", "ExplanationOfBenefit", "Device", "ImagingStudy"):
        response = client.get(f"/fhir/{resource_type}?patient=123&_total=accurate", headers=custodian_headers)
        assert response.status_code == 200, (resource_type, response.get_json())
