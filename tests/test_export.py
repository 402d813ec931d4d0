"""Bulk Data `$export` on the research API: what a project's exports carry, and for how long.

The world is tests/research_world.py: visible to project A are the consented patient's
data, the no-mental-health patient's without the depression Condition, and the
recent-only patient's from 2020 on; everyone else is invisible. Each patient's
Observations carry a value unique to them, so a file shows exactly whose data it holds.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import requests
from sqlalchemy import select, update

from consent import projects, writer
from consent.materialise import refresh
from service import db
from service.audit import patients_named
from service.config import load_config
from service.export import Worker
from service.store.schema import audit, export_workers
from tests.fhir_helpers import create, issue, observation
from tests.research_world import DEPRESSION, HYPERTENSION, World, bearer, token

RECORD_VISIBLE = {"consented": 2, "no_mental_health": 2, "recent_only": 1}
ROOT = Path(__file__).resolve().parent.parent


def _get(client, url: str, headers: dict[str, str]):
    return client.get(url.replace("http://localhost", ""), headers=headers)


def _kick(client, headers: dict[str, str], path: str = "/research/fhir/$export"):
    return client.get(path, headers={**headers, "Prefer": "respond-async"})


def _manifest(app, client, worker: Worker, headers: dict[str, str], path: str = "/research/fhir/$export") -> dict:
    """Kick off an export, let the worker run it, and return the completion manifest."""
    app.config["EXPORT_POLL_SECONDS"] = 0
    kick = _kick(client, headers, path)
    assert kick.status_code == 202, kick.get_json()
    status_url = kick.headers["Content-Location"]
    assert _get(client, status_url, headers).status_code == 202
    worker.work()
    done = _get(client, status_url, headers)
    assert done.status_code == 200, done.get_json()
    manifest = done.get_json()
    assert manifest["requiresAccessToken"] is True
    return {**manifest, "status_url": status_url}


def _files(client, manifest: dict, headers: dict[str, str]) -> dict[str, bytes]:
    files = {}
    for item in manifest["output"]:
        response = _get(client, item["url"], headers)
        assert response.status_code == 200, response.data
        files[item["type"]] = response.data
    return files


def _lines(content: bytes) -> list[dict]:
    return [orjson.loads(line) for line in content.splitlines()]


def _markers(content: bytes) -> list[float]:
    return sorted(o["valueQuantity"]["value"] for o in _lines(content))


def _expected_markers(world: World, *, without: str | None = None) -> list[float]:
    return sorted(world.marker[role] for role, n in RECORD_VISIBLE.items() if role != without for _ in range(n))


def _consent(app, world: World, role: str, tier: str = "record", exclude: tuple[str, ...] = (),
             provisions: list[dict] | None = None, project: str | None = None) -> None:
    """A new consent of `role`'s patient for project A (or `project`)."""
    choice = writer.build(world.patients[role], project or world.project, tier, list(exclude), source="test")
    if provisions:
        choice["provision"]["provision"] = provisions
    with app.app_context(), db.write() as conn:
        writer.record(conn, choice)


def _project(app, world: World, types: tuple[str, ...]) -> str:
    """A record project receiving `types`, to which the consented patient consents."""
    with app.app_context(), db.write() as conn:
        project_id = projects.create(conn, name=f"typed {types}", tier="record", epsilon=5.0,
                                     types=types).project_id
        refresh(conn, project_ids=[project_id])
    _consent(app, world, "consented", project=project_id)
    return project_id


def _cli(app, *args: str):
    return app.test_cli_runner().invoke(args=list(args))


def _organization(client, custodian_headers) -> dict:
    return create(client, custodian_headers, {"resourceType": "Organization", "name": "Clinique des Lilas"})


# -- what an export carries ------------------------------------------------------------------


def test_export_carries_exactly_the_visible_data(app, client, world, research, export_worker):
    files = _files(client, _manifest(app, client, export_worker, research), research)
    assert _markers(files["Observation"]) == _expected_markers(world)
    assert len(files["Patient"].splitlines()) == len(RECORD_VISIBLE)
    for real_id in world.patients.values():
        assert all(real_id.encode() not in content for content in files.values())


def test_export_files_need_the_same_projects_token(app, client, world, research, export_worker):
    manifest = _manifest(app, client, export_worker, research, "/research/fhir/Patient/$export")
    other = bearer(token(client, app, "research", world.other_project))
    assert _get(client, manifest["output"][0]["url"], other).status_code == 404
    assert _get(client, manifest["status_url"], other).status_code == 404


# -- 1. only the project's types -------------------------------------------------------------


def test_a_system_export_without_type_carries_exactly_the_projects_declared_types(
        app, client, world, custodian_headers, export_worker):
    _organization(client, custodian_headers)
    project = _project(app, world, ("Observation",))
    headers = bearer(token(client, app, "research", project))
    manifest = _manifest(app, client, export_worker, headers)
    assert [item["type"] for item in manifest["output"]] == ["Observation"]
    assert _markers(_files(client, manifest, headers)["Observation"]) == [world.marker["consented"]] * 2


def test_directory_types_are_exported_only_to_projects_that_declare_them(
        app, client, world, research, custodian_headers, export_worker):
    _organization(client, custodian_headers)
    undeclared = _manifest(app, client, export_worker, research)
    assert "Organization" not in {item["type"] for item in undeclared["output"]}

    project = _project(app, world, ("Observation", "Organization"))
    headers = bearer(token(client, app, "research", project))
    declared = _files(client, _manifest(app, client, export_worker, headers), headers)
    assert [o["resourceType"] for o in _lines(declared["Organization"])] == ["Organization"]


def test_repeated_type_parameters_export_every_named_type(app, client, world, research, export_worker):
    manifest = _manifest(app, client, export_worker, research, "/research/fhir/$export?_type=Patient&_type=Observation")
    assert sorted(item["type"] for item in manifest["output"]) == ["Observation", "Patient"]


@pytest.mark.parametrize("requested", ["Patient", "Organization", "Observation,Organization"])
def test_a_type_the_project_does_not_receive_is_refused(app, client, world, custodian_headers, export_worker,
                                                        requested):
    _organization(client, custodian_headers)
    headers = bearer(token(client, app, "research", _project(app, world, ("Observation",))))
    response = _kick(client, headers, f"/research/fhir/$export?_type={requested}")
    assert response.status_code == 400
    assert issue(response)["expression"] == ["_type"]


def test_a_patient_export_carries_no_directory_type_even_when_declared(
        app, client, world, custodian_headers, export_worker):
    _organization(client, custodian_headers)
    headers = bearer(token(client, app, "research", _project(app, world, ("Observation", "Organization"))))
    manifest = _manifest(app, client, export_worker, headers, "/research/fhir/Patient/$export")
    assert [item["type"] for item in manifest["output"]] == ["Observation"]
    assert _kick(client, headers, "/research/fhir/Patient/$export?_type=Organization").status_code == 400


# -- 2. files never outlive a consent --------------------------------------------------------


def test_a_withdrawal_removes_the_patients_lines_from_files_already_written(
        app, client, world, research, export_worker):
    manifest = _manifest(app, client, export_worker, research)
    _consent(app, world, "consented", tier="none")
    files = _files(client, manifest, research)
    assert _markers(files["Observation"]) == _expected_markers(world, without="consented")
    assert len(files["Patient"].splitlines()) == len(RECORD_VISIBLE) - 1


def test_a_category_excluded_after_the_export_removes_those_lines(app, client, world, research, export_worker):
    manifest = _manifest(app, client, export_worker, research)
    _consent(app, world, "consented", exclude=("mental-health",))
    conditions = _lines(_files(client, manifest, research)["Condition"])
    codes = sorted(c["code"]["coding"][0]["code"] for c in conditions)
    # consented: hypertension only now; no_mental_health: hypertension; recent_only: both (2021).
    assert codes == sorted([HYPERTENSION, HYPERTENSION, HYPERTENSION, DEPRESSION])


def test_a_data_period_narrowed_after_the_export_removes_the_lines_outside_it(
        app, client, world, research, export_worker):
    manifest = _manifest(app, client, export_worker, research)
    _consent(app, world, "consented", provisions=[{"type": "deny", "dataPeriod": {"end": "2019-12-31"}}])
    markers = _markers(_files(client, manifest, research)["Observation"])
    assert markers == sorted([*_expected_markers(world, without="consented"), world.marker["consented"]])


def test_a_class_excluded_after_the_export_removes_that_class_only(app, client, world, research, export_worker):
    manifest = _manifest(app, client, export_worker, research)
    _consent(app, world, "consented", provisions=[
        {"type": "deny", "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}]}])
    files = _files(client, manifest, research)
    assert _markers(files["Observation"]) == _expected_markers(world, without="consented")
    assert len(files["Patient"].splitlines()) == len(RECORD_VISIBLE)


def test_a_line_is_judged_on_the_version_it_holds_not_on_the_current_one(
        app, client, world, research, custodian_headers, export_worker):
    """Version 1, a depression diagnosis, is exported; the Condition is then recoded as hypertension
    and the patient excludes mental health: the line still holds version 1 and must go."""
    manifest = _manifest(app, client, export_worker, research, "/research/fhir/$export?_type=Condition")
    depression = world.conditions["consented"]["depression"]
    stored = client.get(f"/fhir/Condition/{depression}", headers=custodian_headers).get_json()
    stored["code"] = {"coding": [{"system": "http://snomed.info/sct", "code": HYPERTENSION}]}
    assert client.put(f"/fhir/Condition/{depression}", json=stored, headers=custodian_headers).status_code == 200
    _consent(app, world, "consented", exclude=("mental-health",))
    codes = [c["code"]["coding"][0]["code"] for c in _lines(_files(client, manifest, research)["Condition"])]
    assert codes.count(DEPRESSION) == 1  # the recent-only patient's, not the consented patient's version 1


# -- 3. a closed project receives nothing more -----------------------------------------------


def _refused(response) -> None:
    assert response.status_code in (401, 403), response.data
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_after_project_close_manifests_and_files_no_longer_download(app, client, world, research, export_worker):
    manifest = _manifest(app, client, export_worker, research)
    assert _cli(app, "project", "close", world.project).exit_code == 0
    _refused(_get(client, manifest["status_url"], research))
    for item in manifest["output"]:
        _refused(_get(client, item["url"], research))


def test_after_project_close_kick_offs_and_polls_are_refused(app, client, world, research, export_worker):
    app.config["EXPORT_POLL_SECONDS"] = 0
    running = _kick(client, research)
    assert running.status_code == 202
    assert _cli(app, "project", "close", world.project).exit_code == 0
    _refused(_kick(client, research))
    _refused(_get(client, running.headers["Content-Location"], research))


# -- 4. every download is audited ------------------------------------------------------------


def _download_audits(app) -> list[set[str]]:
    with app.app_context(), db.read() as conn:
        seqs = conn.execute(select(audit.c.seq).where(audit.c.action == "export-download")
                            .order_by(audit.c.seq)).scalars().all()
        named = patients_named(conn, seqs)
        return [set(named[seq]) for seq in seqs]


def test_every_download_is_audited_with_the_patients_its_lines_carried(app, client, world, research, export_worker):
    manifest = _manifest(app, client, export_worker, research, "/research/fhir/$export?_type=Patient")
    assert _download_audits(app) == []
    _files(client, manifest, research)
    _consent(app, world, "consented", tier="none")
    _files(client, manifest, research)
    visible = {world.patients[role] for role in RECORD_VISIBLE}
    assert _download_audits(app) == [visible, visible - {world.patients["consented"]}]


# -- 5. Group exports: only Groups the custodian attached ------------------------------------


def _group(client, custodian_headers, world: World, *roles: str) -> str:
    return create(client, custodian_headers, {
        "resourceType": "Group", "type": "person", "actual": True, "name": "HIV clinic cohort",
        "member": [{"entity": {"reference": f"Patient/{world.patients[role]}"}} for role in roles]})["id"]


def _unknown_group_text(client, headers: dict[str, str], group_id: str) -> str:
    response = _kick(client, headers, f"/research/fhir/Group/{group_id}/$export")
    assert response.status_code == 404
    return issue(response)["diagnostics"].replace(group_id, "ID")


def test_a_group_the_custodian_did_not_attach_is_as_unknown_as_a_missing_id(
        app, client, world, research, custodian_headers, export_worker):
    group = _group(client, custodian_headers, world, "consented", "refused")
    assert _unknown_group_text(client, research, group) == _unknown_group_text(client, research, "no-such-group")


def test_an_attached_group_exports_exactly_its_consenting_members(
        app, client, world, research, custodian_headers, export_worker):
    group = _group(client, custodian_headers, world, "consented", "refused", "recent_only")
    assert _cli(app, "project", "group", "add", "--project", world.project, "--group", group).exit_code == 0
    files = _files(client, _manifest(app, client, export_worker, research, f"/research/fhir/Group/{group}/$export"),
                   research)
    assert _markers(files["Observation"]) == sorted([world.marker["consented"]] * 2 + [world.marker["recent_only"]])
    assert len(files["Patient"].splitlines()) == 2


def test_a_group_attached_to_another_project_is_unknown_to_this_one(
        app, client, world, research, custodian_headers, export_worker):
    group = _group(client, custodian_headers, world, "consented")
    assert _cli(app, "project", "group", "add", "--project", world.other_project, "--group", group).exit_code == 0
    assert _unknown_group_text(client, research, group) == _unknown_group_text(client, research, "no-such-group")


def test_a_deleted_group_is_unknown_even_while_attached(app, client, world, research, custodian_headers,
                                                        export_worker):
    group = _group(client, custodian_headers, world, "consented")
    assert _cli(app, "project", "group", "add", "--project", world.project, "--group", group).exit_code == 0
    assert client.delete(f"/fhir/Group/{group}", headers=custodian_headers).status_code in (200, 204)
    assert _unknown_group_text(client, research, group) == _unknown_group_text(client, research, "no-such-group")


def test_detaching_a_group_ends_its_exports_and_deletes_their_files(
        app, client, world, research, custodian_headers, export_worker):
    group = _group(client, custodian_headers, world, "consented")
    assert _cli(app, "project", "group", "add", "--project", world.project, "--group", group).exit_code == 0
    manifest = _manifest(app, client, export_worker, research, f"/research/fhir/Group/{group}/$export")
    assert _cli(app, "project", "group", "remove", "--project", world.project, "--group", group).exit_code == 0
    assert _get(client, manifest["status_url"], research).status_code == 410
    assert all(_get(client, item["url"], research).status_code == 404 for item in manifest["output"])


# -- 6. _since names an earlier manifest, never an arbitrary instant ---------------------------


@pytest.mark.parametrize("since", ["2020-01-01", "2026-03-01T10:00:00.123Z", "not-a-date"])
def test_since_must_be_the_transaction_time_of_an_earlier_manifest(client, world, research, export_worker, since):
    response = _kick(client, research, f"/research/fhir/$export?_since={since}")
    assert response.status_code == 400
    assert issue(response)["expression"] == ["_since"]


def test_since_an_earlier_transaction_time_exports_only_what_was_written_after_it(
        app, client, world, research, custodian_headers, export_worker):
    first = _manifest(app, client, export_worker, research, "/research/fhir/$export?_type=Observation")
    create(client, custodian_headers, observation(world.patients["consented"], value=999.0, when="2021-07-01"))
    since = first["transactionTime"]
    later = _manifest(app, client, export_worker, research, f"/research/fhir/$export?_type=Observation&_since={since}")
    assert _markers(_files(client, later, research)["Observation"]) == [999.0]


def test_since_one_millisecond_off_an_earlier_transaction_time_is_refused(
        app, client, world, research, export_worker):
    moment = _manifest(app, client, export_worker, research, "/research/fhir/$export?_type=Patient")["transactionTime"]
    off = moment[:-2] + str((int(moment[-2]) + 1) % 10) + "Z"
    assert _kick(client, research, f"/research/fhir/$export?_since={off}").status_code == 400


def test_since_another_projects_transaction_time_is_refused(app, client, world, research, export_worker):
    other = bearer(token(client, app, "research", world.other_project))
    moment = _manifest(app, client, export_worker, other, "/research/fhir/$export?_type=Patient")["transactionTime"]
    assert _kick(client, research, f"/research/fhir/$export?_since={moment}").status_code == 400


# -- 7. workers: wherever the app is served, and said when there is none ----------------------


def test_a_kick_off_with_no_live_export_worker_is_503(client, world, research):
    response = _kick(client, research)
    assert response.status_code == 503
    assert issue(response)["code"] == "transient"
    assert "export worker" in issue(response)["diagnostics"]


def test_a_poll_of_an_unfinished_job_once_workers_fell_silent_is_503(app, client, world, research, export_worker):
    app.config["EXPORT_POLL_SECONDS"] = 0
    kick = _kick(client, research)
    with app.app_context(), db.write() as conn:  # sixteen seconds pass without a heartbeat
        conn.execute(update(export_workers).values(last_beat=export_workers.c.last_beat - 16_000_000))
    response = _get(client, kick.headers["Content-Location"], research)
    assert response.status_code == 503
    assert issue(response)["code"] == "transient"


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_a_heartbeat_interval_that_is_not_a_positive_number_of_seconds_is_refused(value):
    with pytest.raises(ValueError, match="PASSERELLE_EXPORT_HEARTBEAT_SECONDS must be a positive number of seconds"):
        load_config({"PASSERELLE_EXPORT_HEARTBEAT_SECONDS": value})


def test_an_unknown_export_worker_setting_is_refused():
    with pytest.raises(ValueError, match="PASSERELLE_EXPORT_WORKER"):
        load_config({"PASSERELLE_EXPORT_WORKER": "sometimes"})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_serving(base: str) -> None:
    """Until the server answers its health check (its worker process imports the app first)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{base}/healthz", timeout=max(1.0, deadline - time.monotonic())).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.2)
        assert time.monotonic() < deadline, "gunicorn did not start"


def test_served_by_plain_gunicorn_an_export_completes(app, client, world, research):
    """`gunicorn wsgi:app`, no configuration file: the app runs its own export worker."""
    port = _free_port()
    env = {**os.environ, "PASSERELLE_DATABASE_URL": app.config["DATABASE_URL"],
           "PASSERELLE_MASTER_KEY_FILE": app.config["MASTER_KEY_FILE"],
           "PASSERELLE_INSTANCE_DIR": app.config["INSTANCE_DIR"], "PASSERELLE_EXPORT_WORKER": "thread",
           "PASSERELLE_EXPORT_POLL_SECONDS": "0"}
    gunicorn = Path(sys.executable).parent / "gunicorn"
    server = subprocess.Popen([str(gunicorn), "--bind", f"127.0.0.1:{port}", "--workers", "1", "wsgi:app"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(base)
        deadline = time.monotonic() + 15
        kick = requests.get(f"{base}/research/fhir/$export?_type=Observation", timeout=5,
                            headers={**research, "Prefer": "respond-async"})
        assert kick.status_code == 202, kick.text
        status = requests.get(kick.headers["Content-Location"], headers=research, timeout=5)
        while status.status_code == 202:
            assert time.monotonic() < deadline, "the export never completed"
            time.sleep(0.3)
            status = requests.get(kick.headers["Content-Location"], headers=research, timeout=5)
        assert status.status_code == 200, status.text
        url = status.json()["output"][0]["url"]
        content = requests.get(url, headers=research, timeout=5).content
        assert _markers(content) == _expected_markers(world)
    finally:
        server.terminate()
        server.wait(timeout=30)
