"""`Patient/{id}/$everything`: the patient's compartment, with `_since`, `_type` and paging."""
from __future__ import annotations

import time

from tests.fhir_helpers import create, issue, observation, patient


def _everything(client, headers, patient_id: str, query: str = "") -> dict:
    response = client.get(f"/fhir/Patient/{patient_id}/$everything{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def _names(body: dict) -> list[str]:
    return [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in body.get("entry", [])]


def _condition(patient_id: str) -> dict:
    return {"resourceType": "Condition", "subject": {"reference": f"Patient/{patient_id}"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]}}


def test_everything_returns_the_patient_and_its_compartment_only(client, custodian_headers):
    mine = create(client, custodian_headers, patient(family="Mine"))
    other = create(client, custodian_headers, patient(family="Other"))
    made = [create(client, custodian_headers, observation(mine["id"]))["id"],
            create(client, custodian_headers, _condition(mine["id"]))["id"]]
    create(client, custodian_headers, observation(other["id"]))
    body = _everything(client, custodian_headers, mine["id"])
    assert body["type"] == "searchset"
    assert sorted(_names(body)) == sorted([f"Patient/{mine['id']}", f"Observation/{made[0]}",
                                           f"Condition/{made[1]}"])
    assert body["total"] == 3


def test_everything_leaves_out_deleted_resources(client, custodian_headers):
    mine = create(client, custodian_headers, patient())
    gone = create(client, custodian_headers, observation(mine["id"]))
    client.delete(f"/fhir/Observation/{gone['id']}", headers=custodian_headers)
    assert _names(_everything(client, custodian_headers, mine["id"])) == [f"Patient/{mine['id']}"]


def test_type_limits_the_resource_types(client, custodian_headers):
    mine = create(client, custodian_headers, patient())
    kept = create(client, custodian_headers, observation(mine["id"]))
    create(client, custodian_headers, _condition(mine["id"]))
    body = _everything(client, custodian_headers, mine["id"], "?_type=Observation")
    assert _names(body) == [f"Observation/{kept['id']}"]


def test_since_keeps_what_changed_at_or_after_it(client, custodian_headers):
    mine = create(client, custodian_headers, patient())
    time.sleep(0.01)
    later = create(client, custodian_headers, observation(mine["id"]))
    since = later["meta"]["lastUpdated"].replace("+", "%2B")
    assert _names(_everything(client, custodian_headers, mine["id"], f"?_since={since}")) == [
        f"Observation/{later['id']}"]


def test_count_pages_through_the_compartment_once(client, custodian_headers):
    mine = create(client, custodian_headers, patient())
    for value in range(4):
        create(client, custodian_headers, observation(mine["id"], value=float(value)))
    seen: list[str] = []
    url: str | None = f"/fhir/Patient/{mine['id']}/$everything?_count=2"
    while url:
        body = client.get(url, headers=custodian_headers).get_json()
        seen += _names(body)
        following = [link["url"] for link in body["link"] if link["relation"] == "next"]
        url = "/" + following[0].split("://", 1)[1].partition("/")[2] if following else None
    assert len(seen) == 5 and len(set(seen)) == 5


def test_everything_of_an_unknown_patient_is_404(client, custodian_headers):
    assert client.get("/fhir/Patient/nobody/$everything", headers=custodian_headers).status_code == 404


def test_an_unsupported_everything_parameter_is_400_naming_it(client, custodian_headers):
    mine = create(client, custodian_headers, patient())
    response = client.get(f"/fhir/Patient/{mine['id']}/$everything?_sort=date", headers=custodian_headers)
    assert response.status_code == 400
    assert issue(response)["expression"] == ["_sort"]


def test_start_and_end_keep_what_happened_in_the_period_and_what_has_no_date(client, custodian_headers):
    mine = create(client, custodian_headers, patient())
    early = create(client, custodian_headers, observation(mine["id"], when="2019-06-01T10:00:00Z"))
    late = create(client, custodian_headers, observation(mine["id"], when="2021-06-01T10:00:00Z"))
    assert sorted(_names(_everything(client, custodian_headers, mine["id"], "?start=2020-01-01"))) == sorted(
        [f"Patient/{mine['id']}", f"Observation/{late['id']}"])
    assert sorted(_names(_everything(client, custodian_headers, mine["id"], "?end=2020-01-01"))) == sorted(
        [f"Patient/{mine['id']}", f"Observation/{early['id']}"])


def test_an_unknown_type_is_400(client, custodian_headers):
    mine = create(client, custodian_headers, patient())
    response = client.get(f"/fhir/Patient/{mine['id']}/$everything?_type=Nonsense", headers=custodian_headers)
    assert response.status_code == 400
    assert issue(response)["expression"] == ["_type"]


def test_everything_includes_what_the_compartment_refers_to_outside_any_compartment(client, custodian_headers):
    doctor = create(client, custodian_headers, {"resourceType": "Practitioner", "name": [{"family": "House"}]})
    mine = create(client, custodian_headers, patient())
    other = create(client, custodian_headers, patient(family="Other"))
    seen = create(client, custodian_headers, observation(mine["id"], performer=[
        {"reference": f"Practitioner/{doctor['id']}"}, {"reference": f"Patient/{other['id']}"}]))
    body = _everything(client, custodian_headers, mine["id"])
    modes = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["search"]["mode"] for e in body["entry"]}
    assert modes == {f"Patient/{mine['id']}": "match", f"Observation/{seen['id']}": "match",
                     f"Practitioner/{doctor['id']}": "include"}
    assert body["total"] == 2
