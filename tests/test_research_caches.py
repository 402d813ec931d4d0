"""What the research path remembers between requests, and what it still reads every time:
pseudonyms are remembered per key, released forms while nothing they depend on changes; the
project and its key version are read for every request, and consent is judged at each
request's own instant."""
from __future__ import annotations

import time
from collections import namedtuple
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from sqlalchemy import select

from consent import engine, writer
from policies.deid import Deidentifier, Profile, load_profile, parse_profile
from policies.pseudonym import PseudonymError, PseudonymKey
from service import db, keyring
from service.app import create_app
from service.errors import NotFound
from service.release import release_for
from service.released_forms import ReleasedForms
from service.store.schema import resources
from tests.deid_helpers import DEFAULT_PROFILE, MASTER
from tests.fhir_helpers import create, observation, patient
from tests.research_world import bearer, build, token


def _first_subject(client, headers) -> str:
    body = client.get("/research/fhir/Observation?_count=1", headers=headers).get_json()
    return body["entry"][0]["resource"]["subject"]["reference"]


def test_a_remembered_pseudonym_is_the_computed_one() -> None:
    remembering = PseudonymKey(MASTER, "project-a", 1)
    first = remembering.pseudonym("Patient", 42)
    assert remembering.pseudonym("Patient", 42) == first == PseudonymKey(MASTER, "project-a", 1).pseudonym(
        "Patient", 42)
    assert remembering.resolve("Patient", first) == 42


def test_a_remembered_row_number_does_not_let_true_through() -> None:
    key = PseudonymKey(MASTER, "project-a", 1)
    key.pseudonym("Patient", 1)
    with pytest.raises(PseudonymError):
        key.pseudonym("Patient", True)


def test_a_remembered_pseudonym_is_never_given_for_another_type() -> None:
    key = PseudonymKey(MASTER, "project-a", 1)
    assert key.pseudonym("Patient", 7) != key.pseudonym("Observation", 7)


def _other_node(app):
    """A second node on the same database and master key: its own process state, shared tables."""
    return create_app({key: app.config[key] for key in ("TESTING", "DATABASE_URL", "INSTANCE_DIR",
                                                        "MASTER_KEY_FILE")})


def test_a_rotation_on_another_node_takes_effect_on_the_next_search_and_read(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    research = bearer(token(client, app, "research", world.project))
    before = _first_subject(client, research)
    assert client.get(f"/research/fhir/{before}", headers=research).status_code == 200
    other_node = _other_node(app)
    try:
        result = other_node.test_cli_runner().invoke(args=["keys", "rotate", "--project", world.project])
        assert result.exit_code == 0, result.output
    finally:
        other_node.extensions["passerelle.engine"].dispose()
    assert client.get(f"/research/fhir/{before}", headers=research).status_code == 404
    assert _first_subject(client, research) != before


def test_a_project_closed_on_another_node_receives_nothing_on_the_next_request(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    research = bearer(token(client, app, "research", world.project))
    subject = _first_subject(client, research)
    other_node = _other_node(app)
    try:
        result = other_node.test_cli_runner().invoke(args=["project", "close", world.project])
        assert result.exit_code == 0, result.output
    finally:
        other_node.extensions["passerelle.engine"].dispose()
    assert client.get("/research/fhir/Observation", headers=research).status_code == 401
    assert client.get(f"/research/fhir/{subject}", headers=research).status_code == 401


def test_a_release_made_after_a_rotation_on_another_node_uses_the_new_key(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    with app.app_context():
        assert release_for("exporter", world.project, engine.RECORD).key.version == 1
        other_node = _other_node(app)
        try:
            with other_node.app_context(), db.write() as conn:
                assert keyring.rotate(conn, world.project) == 2
        finally:
            other_node.extensions["passerelle.engine"].dispose()
        assert release_for("exporter", world.project, engine.RECORD).key.version == 2


def test_consent_is_judged_at_each_instant_asked(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    later = create(client, custodian_headers, patient(family="Later"))["id"]
    with app.app_context(), db.write() as conn:
        consent = writer.build(later, world.project, "record", [], source="test")
        consent["provision"]["period"] = {"start": "2030-01-01"}
        writer.record(conn, consent)
    in_2031 = 1_924_992_000_000_000  # 2031-01-01 in microseconds
    rows = select(resources.c.id).where(resources.c.type == "Patient", resources.c.id == later)
    with app.app_context():
        release = release_for("a-client", world.project, engine.RECORD)
        with db.read() as conn:
            seen = [conn.execute(release.rows_filter(now=instant)(rows)).scalars().all()
                    for instant in (in_2031, None, in_2031)]
    assert seen == [[later], [], [later]]


def _pseudonym_of(app, project_id: str, patient_id: str) -> str:
    with app.app_context(), db.read() as conn:
        pk = conn.execute(select(resources.c.pk).where(resources.c.type == "Patient",
                                                       resources.c.id == patient_id)).scalar_one()
        return keyring.project_key(conn, project_id).pseudonym("Patient", pk)


def test_the_standing_consent_filter_judges_each_statement_at_the_instant_it_runs(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    brief = create(client, custodian_headers, patient(family="Brief"))["id"]
    ends = datetime.now(UTC) + timedelta(seconds=2)
    with app.app_context(), db.write() as conn:
        writer.record(conn, writer.build(brief, world.project, "record", [], source="test",
                                         period=(None, ends.isoformat(timespec="seconds"))))
    pseudonym = _pseudonym_of(app, world.project, brief)
    with app.app_context():
        release = release_for("a-client", world.project, engine.RECORD)
        assert orjson.loads(release.read("Patient", pseudonym))["id"] == pseudonym
        time.sleep(max(0.0, (ends - datetime.now(UTC)).total_seconds()) + 1.1)
        with pytest.raises(NotFound):
            release.read("Patient", pseudonym)


def _markers(client, headers, path: str) -> set[float]:
    body = client.get(path, headers=headers).get_json()
    return {entry["resource"]["valueQuantity"]["value"] for entry in body.get("entry", [])}


def test_a_search_compiled_for_one_project_never_answers_for_another(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    first, second = (bearer(token(client, app, "research", project)) for project in (world.project,
                                                                                     world.other_project))
    path = "/research/fhir/Observation"
    mine = {world.marker[role] for role in ("consented", "no_mental_health", "recent_only")}
    theirs = {world.marker["other_project"]}
    for _ in range(2):  # each project's statement found in the statement cache the second time round
        assert _markers(client, first, path) == mine
        assert _markers(client, second, path) == theirs


def test_a_version_read_compiled_for_one_patient_and_project_never_answers_for_another(app, client,
                                                                                      custodian_headers):
    world = build(app, client, custodian_headers)
    readers = {project: bearer(token(client, app, "research", project))
               for project in (world.project, world.other_project)}
    for _ in range(2):  # the second time round, every statement comes from the statement cache
        for project, role in ((world.project, "consented"), (world.project, "refused"),
                              (world.other_project, "other_project"), (world.other_project, "consented")):
            allowed = (project, role) in ((world.project, "consented"), (world.other_project, "other_project"))
            path = f"/research/fhir/Patient/{_pseudonym_of(app, project, world.patients[role])}/_history/1"
            assert client.get(path, headers=readers[project]).status_code == (200 if allowed else 404)


def test_the_standing_consent_filter_sees_a_withdrawal_at_once(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    consented = world.patients["consented"]
    pseudonym = _pseudonym_of(app, world.project, consented)
    research = bearer(token(client, app, "research", world.project))
    found = client.get(f"/research/fhir/Observation?patient=Patient/{pseudonym}", headers=research).get_json()
    assert client.get(f"/research/fhir/Patient/{pseudonym}", headers=research).status_code == 200
    assert found["entry"]
    with app.app_context(), db.write() as conn:
        writer.record(conn, writer.build(consented, world.project, "none", [], source="test"))
    assert client.get(f"/research/fhir/Patient/{pseudonym}", headers=research).status_code == 404
    after = client.get(f"/research/fhir/Observation?patient=Patient/{pseudonym}", headers=research).get_json()
    assert "entry" not in after


# -- released forms (service/released_forms.py): remembered, and given again only when nothing they
#    depend on has changed ---------------------------------------------------------------------------

Row = namedtuple("Row", "pk json patient_id")
#: Row numbers of the resources the released row references, as a request found them released.
RELEASED = {("Patient", "p1"): 101, ("Patient", "p2"): 102}


def _stored(value: float = 120.0) -> Row:
    return Row(7, orjson.dumps({
        "resourceType": "Observation", "id": "o1", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/p1"}, "performer": [{"reference": "Patient/p2"}],
        "effectiveDateTime": "2021-06-01T10:00:00Z",
        "valueQuantity": {"value": value, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}),
        "p1")


def _engine(key: PseudonymKey, profile: Profile | None = None) -> Deidentifier:
    return Deidentifier(profile or load_profile(DEFAULT_PROFILE), key, reference_year=2025)


def _afresh(deid: Deidentifier, row: Row, targets: dict) -> dict:
    """What the engine releases for the row with nothing remembered."""
    return Deidentifier(deid.profile, deid.key, reference_year=deid.reference_year).apply(
        orjson.loads(row.json), row.pk, row.patient_id, targets)


def _release(forms: ReleasedForms, deid: Deidentifier, row: Row, targets: dict) -> dict:
    """The released form `forms` gives, as a resource; its type and id are given as the resource has them."""
    form = forms.release(deid, row, targets)
    released = orjson.loads(form.json)
    assert (form.resource_type, form.id) == (released["resourceType"], released["id"])
    return released


def test_a_remembered_form_is_the_form_computed_afresh() -> None:
    forms, deid, row = ReleasedForms(), _engine(PseudonymKey(MASTER, "project-a", 1)), _stored()
    first, again = _release(forms, deid, row, RELEASED), _release(forms, deid, row, RELEASED)
    assert first == again == _afresh(deid, row, RELEASED)
    assert len(forms) == 1


def test_a_remembered_form_is_not_given_once_a_resource_it_references_is_withheld() -> None:
    forms, deid, row = ReleasedForms(), _engine(PseudonymKey(MASTER, "project-a", 1)), _stored()
    assert _release(forms, deid, row, RELEASED)["performer"]
    withheld = {("Patient", "p1"): 101}
    released = _release(forms, deid, row, withheld)
    assert released == _afresh(deid, row, withheld)
    assert "performer" not in released


def test_a_remembered_form_is_not_given_under_a_rotated_key() -> None:
    forms, row = ReleasedForms(), _stored()
    before = _release(forms, _engine(PseudonymKey(MASTER, "project-a", 1)), row, RELEASED)
    rotated = _engine(PseudonymKey(MASTER, "project-a", 2))
    after = _release(forms, rotated, row, RELEASED)
    assert after == _afresh(rotated, row, RELEASED)
    assert after["id"] != before["id"]
    assert after["subject"] != before["subject"]


def test_a_remembered_form_is_never_given_to_another_project() -> None:
    forms, row = ReleasedForms(), _stored()
    mine = _release(forms, _engine(PseudonymKey(MASTER, "project-a", 1)), row, RELEASED)
    other = _engine(PseudonymKey(MASTER, "project-b", 1))
    theirs = _release(forms, other, row, RELEASED)
    assert theirs == _afresh(other, row, RELEASED)
    assert theirs["id"] != mine["id"]


def test_a_remembered_form_is_not_given_under_another_profile() -> None:
    forms, row, key = ReleasedForms(), _stored(), PseudonymKey(MASTER, "project-a", 1)
    assert "valueQuantity" in _release(forms, _engine(key), row, RELEASED)
    without_values = _engine(key, parse_profile({"rules": [{"path": "Observation.value[x]", "method": "redact"}]}))
    released = _release(forms, without_values, row, RELEASED)
    assert released == _afresh(without_values, row, RELEASED)
    assert "valueQuantity" not in released


def test_a_remembered_form_is_not_given_once_the_resource_changed() -> None:
    forms, deid = ReleasedForms(), _engine(PseudonymKey(MASTER, "project-a", 1))
    _release(forms, deid, _stored(120.0), RELEASED)
    assert _release(forms, deid, _stored(95.0), RELEASED)["valueQuantity"]["value"] == 95.0


def test_a_profile_that_encrypts_is_never_remembered() -> None:
    forms = ReleasedForms()
    deid = _engine(PseudonymKey(MASTER, "project-a", 1),
                   parse_profile({"rules": [{"path": "Observation.code.text", "method": "encrypt"}]}))
    row = Row(7, orjson.dumps({"resourceType": "Observation", "id": "o1", "status": "final",
                               "code": {"text": "pulse"}}), None)
    first, again = _release(forms, deid, row, {}), _release(forms, deid, row, {})
    assert first["code"]["text"] != again["code"]["text"]
    assert len(forms) == 0


def test_the_remembered_forms_stay_within_their_byte_budget() -> None:
    deid = _engine(PseudonymKey(MASTER, "project-a", 1))
    one = len(orjson.dumps(_afresh(deid, _stored(), RELEASED)))
    forms = ReleasedForms(max_bytes=one * 2 + one // 2)
    for value in (1.0, 2.0, 3.0, 4.0):
        _release(forms, deid, _stored(value), RELEASED)
    assert forms.size <= forms.max_bytes
    assert len(forms) == 2


def test_a_reference_to_a_patient_who_withdrew_leaves_a_form_released_before(app, client, custodian_headers):
    world = build(app, client, custodian_headers)
    consented, performer = world.patients["consented"], world.patients["no_mental_health"]
    create(client, custodian_headers, observation(consented, value=77.0, performer=[
        {"reference": f"Patient/{performer}"}]))
    research = bearer(token(client, app, "research", world.project))
    query = f"/research/fhir/Observation?patient=Patient/{_pseudonym_of(app, world.project, consented)}&_count=50"

    def performers() -> list:
        found = client.get(query, headers=research).get_json()
        return [entry["resource"].get("performer") for entry in found["entry"]
                if entry["resource"]["valueQuantity"]["value"] == 77.0]

    assert performers() == [[{"reference": f"Patient/{_pseudonym_of(app, world.project, performer)}"}]]
    with app.app_context(), db.write() as conn:
        writer.record(conn, writer.build(performer, world.project, "none", [], source="test"))
    assert performers() == [None]
