"""The `deleted` array of a research export with `_since` (Bulk Data Access IG v2).

An export with `_since` (an earlier manifest's transactionTime) lists, besides what changed,
the resources deleted since then: NDJSON files of transaction Bundles whose entries are
DELETE requests naming the project's pseudonyms. A project learns only of the deletion of a
resource it could have received at `_since` and could still receive now: nothing about a
withheld patient's data, nor about a resource created after its last export.
"""
from __future__ import annotations

from tests.fhir_helpers import create, observation, search
from tests.research_world import World
from tests.test_bulk_kickoff import _completed, _patient_parameters, _post, _pseudonym
from tests.test_export import _consent, _files, _lines, _manifest

EXPORT = "/research/fhir/$export"


def _observations(client, custodian_headers, world: World, role: str) -> list[str]:
    bundle = search(client, custodian_headers, f"Observation?subject=Patient/{world.patients[role]}")
    return sorted(entry["resource"]["id"] for entry in bundle["entry"])


def _delete(client, custodian_headers, resource_type: str, real_id: str) -> None:
    assert client.delete(f"/fhir/{resource_type}/{real_id}", headers=custodian_headers).status_code in (200, 204)


def _since(app, client, worker, research) -> tuple[str, dict[str, bytes]]:
    first = _manifest(app, client, worker, research, f"{EXPORT}?_type=Observation")
    return first["transactionTime"], _files(client, first, research)


def _deleted_urls(client, manifest: dict, headers: dict[str, str]) -> list[str]:
    urls = []
    for item in manifest["deleted"]:
        assert item["type"] == "Bundle"
        response = client.get(item["url"].replace("http://localhost", ""), headers=headers)
        assert response.status_code == 200
        for bundle in _lines(response.data):
            assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
            assert "meta" not in bundle  # a deletion's time is a real write time
            urls.extend(entry["request"]["url"] for entry in bundle["entry"]
                        if entry["request"]["method"] == "DELETE")
    return sorted(urls)


def test_an_export_since_an_earlier_one_lists_the_deletions_since_then(
        app, client, world, research, custodian_headers, export_worker):
    since, earlier = _since(app, client, export_worker, research)
    doomed = _observations(client, custodian_headers, world, "consented")[0]
    _delete(client, custodian_headers, "Observation", doomed)
    manifest = _manifest(app, client, export_worker, research, f"{EXPORT}?_type=Observation&_since={since}")
    pseudonym = _pseudonym(app, world.project, "Observation", doomed)
    assert _deleted_urls(client, manifest, research) == [f"Observation/{pseudonym}"]
    assert pseudonym in {o["id"] for o in _lines(earlier["Observation"])}  # the id the project received
    assert manifest["output"] == []


def test_an_export_without_since_lists_no_deletions(app, client, world, research, custodian_headers, export_worker):
    _delete(client, custodian_headers, "Observation", _observations(client, custodian_headers, world, "consented")[0])
    assert _manifest(app, client, export_worker, research, f"{EXPORT}?_type=Observation")["deleted"] == []


def test_the_deletion_of_a_withheld_patients_data_is_not_listed(
        app, client, world, research, custodian_headers, export_worker):
    since, _ = _since(app, client, export_worker, research)
    for role in ("refused", "aggregate_only", "silent", "other_project"):
        _delete(client, custodian_headers, "Observation", _observations(client, custodian_headers, world, role)[0])
    manifest = _manifest(app, client, export_worker, research, f"{EXPORT}?_type=Observation&_since={since}")
    assert manifest["deleted"] == []


def test_the_deletion_of_data_outside_the_consented_period_is_not_listed(
        app, client, world, research, custodian_headers, export_worker):
    since, _ = _since(app, client, export_worker, research)
    for real_id in _observations(client, custodian_headers, world, "recent_only"):  # 2019 withheld, 2021 released
        _delete(client, custodian_headers, "Observation", real_id)
    manifest = _manifest(app, client, export_worker, research, f"{EXPORT}?_type=Observation&_since={since}")
    assert len(_deleted_urls(client, manifest, research)) == 1


def test_a_resource_created_and_deleted_after_since_is_not_listed(
        app, client, world, research, custodian_headers, export_worker):
    since, _ = _since(app, client, export_worker, research)
    fleeting = create(client, custodian_headers, observation(world.patients["consented"], value=7.0))
    _delete(client, custodian_headers, "Observation", fleeting["id"])
    manifest = _manifest(app, client, export_worker, research, f"{EXPORT}?_type=Observation&_since={since}")
    assert manifest["deleted"] == []


def test_a_resource_updated_then_deleted_after_since_is_listed(
        app, client, world, research, custodian_headers, export_worker):
    since, _ = _since(app, client, export_worker, research)
    real_id = _observations(client, custodian_headers, world, "consented")[0]
    current = client.get(f"/fhir/Observation/{real_id}", headers=custodian_headers).get_json()
    assert client.put(f"/fhir/Observation/{real_id}", json={**current, "status": "amended"},
                      headers=custodian_headers).status_code == 200
    _delete(client, custodian_headers, "Observation", real_id)
    manifest = _manifest(app, client, export_worker, research, f"{EXPORT}?_type=Observation&_since={since}")
    assert _deleted_urls(client, manifest, research) == [
        f"Observation/{_pseudonym(app, world.project, 'Observation', real_id)}"]


def test_a_patient_who_withdrew_is_not_named_in_deletions(
        app, client, world, research, custodian_headers, export_worker):
    since, _ = _since(app, client, export_worker, research)
    _delete(client, custodian_headers, "Observation", _observations(client, custodian_headers, world, "consented")[0])
    _consent(app, world, "consented", tier="none")
    manifest = _manifest(app, client, export_worker, research, f"{EXPORT}?_type=Observation&_since={since}")
    assert manifest["deleted"] == []


def test_a_withdrawal_after_the_export_removes_the_deletion_from_the_download(
        app, client, world, research, custodian_headers, export_worker):
    since, _ = _since(app, client, export_worker, research)
    _delete(client, custodian_headers, "Observation", _observations(client, custodian_headers, world, "consented")[0])
    manifest = _manifest(app, client, export_worker, research, f"{EXPORT}?_type=Observation&_since={since}")
    assert len(manifest["deleted"]) == 1
    _consent(app, world, "consented", tier="none")
    assert _deleted_urls(client, manifest, research) == []


def test_deletions_keep_to_the_patient_parameter(app, client, world, research, custodian_headers, export_worker):
    since, _ = _since(app, client, export_worker, research)
    for role in ("consented", "no_mental_health"):
        _delete(client, custodian_headers, "Observation", _observations(client, custodian_headers, world, role)[0])
    patient = _pseudonym(app, world.project, "Patient", world.patients["consented"])
    kick = _post(client, research, "/research/fhir/Patient/$export",
                 [{"name": "_type", "valueString": "Observation"}, {"name": "_since", "valueInstant": since},
                  *_patient_parameters(f"Patient/{patient}")])
    manifest = _completed(app, client, export_worker, research, kick)
    assert len(_deleted_urls(client, manifest, research)) == 1
