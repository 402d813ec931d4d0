"""Bulk Data `$export` kick-off parameters (Bulk Data Access IG v2) on the research API.

POST kick-off with a Parameters body, `_type` in every form, `_typeFilter` held to the
research search rules, the `patient` parameter by the pseudonyms the project sees, and a
status whose `X-Progress` starts with a percentage. The world is tests/research_world.py:
project A sees the consented, no-mental-health and recent-only patients; each patient's
Observations carry a value unique to them (its marker).
"""
from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from service import db, keyring
from service.store import jobs
from service.store.schema import resources
from tests.fhir_helpers import issue
from tests.research_world import HYPERTENSION, SNOMED
from tests.test_export import _cli, _consent, _files, _get, _group, _kick, _lines, _manifest, _markers

EXPORT = "/research/fhir/$export"
PATIENT_EXPORT = "/research/fhir/Patient/$export"


def _post(client, headers: dict[str, str], path: str, parameters: list[dict], **extra):
    return client.post(path, json={"resourceType": "Parameters", "parameter": parameters},
                       headers={**headers, "Prefer": "respond-async", **extra})


def _completed(app, client, worker, headers: dict[str, str], kick) -> dict:
    """Run the job a kick-off queued and return its manifest."""
    assert kick.status_code == 202, kick.get_json()
    app.config["EXPORT_POLL_SECONDS"] = 0
    worker.work()
    done = _get(client, kick.headers["Content-Location"], headers)
    assert done.status_code == 200, done.get_json()
    return done.get_json()


def _pseudonym(app, project_id: str, resource_type: str, real_id: str) -> str:
    with app.app_context(), db.read() as conn:
        pk = conn.execute(select(resources.c.pk).where(resources.c.type == resource_type,
                                                       resources.c.id == real_id)).scalar_one()
        return keyring.project_key(conn, project_id).pseudonym(resource_type, pk)


def _types(manifest: dict) -> list[str]:
    return sorted(item["type"] for item in manifest["output"])


# -- _type -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["_type=Patient&_type=Observation", "_type=Patient,Observation",
                                   "_type=Patient&_type=Observation,Patient"])
def test_every_form_of_type_exports_each_named_type(app, client, world, research, export_worker, query):
    manifest = _manifest(app, client, export_worker, research, f"{EXPORT}?{query}")
    assert _types(manifest) == ["Observation", "Patient"]
    assert manifest["request"].endswith(f"$export?{query}")


# -- POST kick-off ---------------------------------------------------------------------------------


def test_a_post_kick_off_takes_its_parameters_from_a_parameters_body(app, client, world, research, export_worker):
    kick = _post(client, research, EXPORT, [{"name": "_type", "valueString": "Patient"},
                                            {"name": "_type", "valueString": "Observation"}])
    manifest = _completed(app, client, export_worker, research, kick)
    assert _types(manifest) == ["Observation", "Patient"]
    assert manifest["request"] == "http://localhost/research/fhir/$export"  # without the body's parameters
    files = _files(client, manifest, research)
    assert len(files["Patient"].splitlines()) == 3


@pytest.mark.parametrize(("body", "expression"), [
    ({"resourceType": "Bundle"}, "Parameters"),
    ({"resourceType": "Parameters", "parameter": [{"name": "_elements", "valueString": "id"}]}, "_elements"),
    ({"resourceType": "Parameters", "parameter": [{"name": "_type", "valueInteger": 3}]},
     "Parameters.parameter[0]"),
    ({"resourceType": "Parameters", "parameter": [{"name": "patient", "valueString": "Patient/x"}]},
     "Parameters.parameter[0]"),
])
def test_a_malformed_post_kick_off_is_refused_naming_the_parameter(app, client, world, research, export_worker,
                                                                    body, expression):
    response = client.post(EXPORT, json=body, headers={**research, "Prefer": "respond-async"})
    assert response.status_code == 400
    assert issue(response)["expression"] == [expression]


@pytest.mark.parametrize("post", [False, True])
def test_an_unsupported_parameter_is_ignored_when_the_client_asks_for_lenient_handling(
        app, client, world, research, export_worker, post):
    lenient = {"Prefer": "respond-async, handling=lenient"}
    if post:
        kick = _post(client, research, EXPORT, [{"name": "_type", "valueString": "Patient"},
                                                {"name": "includeAssociatedData", "valueCode": "LatestProvenance"}],
                     **lenient)
    else:
        kick = client.get(f"{EXPORT}?_type=Patient&_elements=id", headers={**research, **lenient})
    assert _types(_completed(app, client, export_worker, research, kick)) == ["Patient"]


def test_a_post_kick_off_queues_nothing_when_refused(app, client, world, research, export_worker):
    response = _post(client, research, EXPORT, [{"name": "_outputFormat", "valueString": "text/csv"}])
    assert response.status_code == 400
    with app.app_context(), db.read() as conn:
        assert conn.execute(select(jobs.export_jobs.c.job_id)).first() is None


# -- _typeFilter ----------------------------------------------------------------------------------


def test_type_filter_exports_only_the_matching_resources_of_its_type(app, client, world, research, export_worker):
    marker = world.marker["consented"]
    manifest = _manifest(app, client, export_worker, research,
                         f"{EXPORT}?_type=Observation,Patient&_typeFilter=Observation%3Fvalue-quantity%3D{marker:g}")
    files = _files(client, manifest, research)
    assert _markers(files["Observation"]) == [marker, marker]
    assert len(files["Patient"].splitlines()) == 3  # a type without a filter is exported whole


def test_type_filters_of_one_type_are_alternatives(app, client, world, research, export_worker):
    one, other = world.marker["consented"], world.marker["no_mental_health"]
    kick = _post(client, research, EXPORT, [
        {"name": "_type", "valueString": "Observation"},
        {"name": "_typeFilter", "valueString": f"Observation?value-quantity={one:g}"},
        {"name": "_typeFilter", "valueString": f"Observation?value-quantity={other:g}"}])
    files = _files(client, _completed(app, client, export_worker, research, kick), research)
    assert _markers(files["Observation"]) == sorted([one, one, other, other])


def test_comma_separated_type_filters_split_only_before_a_type(app, client, world, research, export_worker):
    conditions = f"Condition%3Fcode%3D{SNOMED}%7C{HYPERTENSION}%2C{SNOMED}%7C1"
    kick = _kick(client, research, f"{EXPORT}?_type=Condition,Observation&_typeFilter={conditions},"
                                   f"Observation%3Fvalue-quantity%3D{world.marker['consented']:g}")
    files = _files(client, _completed(app, client, export_worker, research, kick), research)
    codes = {c["code"]["coding"][0]["code"] for c in _lines(files["Condition"])}
    assert codes == {HYPERTENSION}
    assert _markers(files["Observation"]) == [world.marker["consented"]] * 2


@pytest.mark.parametrize("query", ["Patient%3Ffamily%3DFamilyconsented", "Patient%3Fidentifier%3Dx",
                                   "Observation%3Fdate%3D2019", "Patient%3F_lastUpdated%3Dgt2020"])
def test_type_filter_with_a_withheld_parameter_is_refused_as_on_research_search(
        app, client, world, research, export_worker, query):
    response = _kick(client, research, f"{EXPORT}?_typeFilter={query}")
    assert response.status_code == 403
    assert issue(response)["code"] == "forbidden"


@pytest.mark.parametrize("query", ["Observation%3F_count%3D1", "Observation%3F_include%3DObservation:subject",
                                   "Observation%3F_elements%3Did", "Observation%3Fnope%3D1", "Observation",
                                   "Organization%3Fname%3Dx"])
def test_a_malformed_type_filter_is_refused_naming_it(app, client, world, research, export_worker, query):
    response = _kick(client, research, f"{EXPORT}?_type=Observation&_typeFilter={query}")
    assert response.status_code == 400
    assert issue(response)["expression"][0] in ("_typeFilter", "nope")


def test_type_filter_by_reference_takes_the_projects_pseudonym(app, client, world, research, export_worker):
    pseudonym = _pseudonym(app, world.project, "Patient", world.patients["recent_only"])
    manifest = _manifest(app, client, export_worker, research,
                         f"{EXPORT}?_type=Observation&_typeFilter=Observation%3Fsubject%3DPatient/{pseudonym}")
    assert _markers(_files(client, manifest, research)["Observation"]) == [world.marker["recent_only"]]


def test_type_filter_by_a_withheld_patients_pseudonym_finds_nothing(app, client, world, research, export_worker):
    pseudonym = _pseudonym(app, world.project, "Patient", world.patients["refused"])
    manifest = _manifest(app, client, export_worker, research,
                         f"{EXPORT}?_type=Observation&_typeFilter=Observation%3Fsubject%3DPatient/{pseudonym}")
    assert manifest["output"] == []


# -- patient ---------------------------------------------------------------------------------------


def _patient_parameters(*references: str) -> list[dict]:
    return [{"name": "patient", "valueReference": {"reference": reference}} for reference in references]


def test_patient_parameter_exports_only_the_named_patients(app, client, world, research, export_worker):
    pseudonym = _pseudonym(app, world.project, "Patient", world.patients["consented"])
    kick = _post(client, research, PATIENT_EXPORT, [{"name": "_type", "valueString": "Patient,Observation"},
                                                    *_patient_parameters(f"Patient/{pseudonym}")])
    files = _files(client, _completed(app, client, export_worker, research, kick), research)
    assert _markers(files["Observation"]) == [world.marker["consented"]] * 2
    assert [p["id"] for p in _lines(files["Patient"])] == [pseudonym]


def test_patient_parameter_in_a_query_string(app, client, world, research, export_worker):
    pseudonym = _pseudonym(app, world.project, "Patient", world.patients["recent_only"])
    manifest = _manifest(app, client, export_worker, research,
                         f"{PATIENT_EXPORT}?_type=Observation&patient=Patient/{pseudonym}")
    assert _markers(_files(client, manifest, research)["Observation"]) == [world.marker["recent_only"]]


def _refusal(client, headers, path: str, reference: str, placeholder: str) -> tuple[int, dict]:
    response = _post(client, headers, path, _patient_parameters(reference))
    body = response.get_json()
    return response.status_code, {**body["issue"][0], "diagnostics": body["issue"][0]["diagnostics"].replace(
        reference, placeholder)}


@pytest.mark.parametrize("role", ["refused", "aggregate_only", "other_project", "silent"])
def test_a_patient_not_released_to_the_project_is_refused_as_an_unknown_one(
        app, client, world, research, export_worker, role):
    withheld = f"Patient/{_pseudonym(app, world.project, 'Patient', world.patients[role])}"
    unknown = withheld[:-2] + ("bb" if withheld.endswith("aa") else "aa")  # no key made it: nobody
    assert _refusal(client, research, PATIENT_EXPORT, withheld, "REF") == \
        _refusal(client, research, PATIENT_EXPORT, unknown, "REF")
    status, outcome = _refusal(client, research, PATIENT_EXPORT, withheld, "REF")
    assert status == 400 and outcome["expression"] == ["patient"]


def test_a_patient_outside_the_group_is_refused_as_an_unknown_one(app, client, world, research, custodian_headers,
                                                                  export_worker):
    group = _group(client, custodian_headers, world, "consented")
    assert _cli(app, "project", "group", "add", "--project", world.project, "--group", group).exit_code == 0
    path = f"/research/fhir/Group/{group}/$export"
    outsider = f"Patient/{_pseudonym(app, world.project, 'Patient', world.patients['recent_only'])}"
    member = f"Patient/{_pseudonym(app, world.project, 'Patient', world.patients['consented'])}"
    assert _refusal(client, research, path, outsider, "REF") == _refusal(client, research, path, "Patient/nobody",
                                                                         "REF")
    kick = _post(client, research, path, [{"name": "_type", "valueString": "Observation"},
                                          *_patient_parameters(member)])
    files = _files(client, _completed(app, client, export_worker, research, kick), research)
    assert _markers(files["Observation"]) == [world.marker["consented"]] * 2


def test_patient_parameter_on_a_system_export_is_refused(app, client, world, research, export_worker):
    pseudonym = _pseudonym(app, world.project, "Patient", world.patients["consented"])
    response = _post(client, research, EXPORT, _patient_parameters(f"Patient/{pseudonym}"))
    assert response.status_code == 400
    assert issue(response)["expression"] == ["patient"]


def test_a_patient_withdrawn_after_the_kick_off_is_not_exported(app, client, world, research, export_worker):
    pseudonym = _pseudonym(app, world.project, "Patient", world.patients["consented"])
    kick = _post(client, research, PATIENT_EXPORT, [{"name": "_type", "valueString": "Observation"},
                                                    *_patient_parameters(f"Patient/{pseudonym}")])
    _consent(app, world, "consented", tier="none")
    assert _completed(app, client, export_worker, research, kick)["output"] == []


# -- X-Progress ------------------------------------------------------------------------------------

PERCENT_FIRST = re.compile(r"^(100|[1-9]?[0-9])%")


def test_progress_of_a_queued_job_starts_with_a_percentage(app, client, world, research, export_worker):
    app.config["EXPORT_POLL_SECONDS"] = 0
    kick = _kick(client, research)
    status = _get(client, kick.headers["Content-Location"], research)
    assert status.status_code == 202
    assert PERCENT_FIRST.match(status.headers["X-Progress"]), status.headers["X-Progress"]


def test_progress_of_a_claimed_job_starts_with_a_percentage(app, client, world, research, export_worker):
    app.config["EXPORT_POLL_SECONDS"] = 0
    kick = _kick(client, research)
    with app.app_context():
        assert jobs.claim(export_worker.worker_id, 60_000_000) is not None
    status = _get(client, kick.headers["Content-Location"], research)
    assert status.headers["X-Progress"] == "0% (starting)"
