"""A RiskAssessment labelled custodian-only never reaches research, by any path.

`$score` writes the label (policies/sensitivity.py `CUSTODIAN_ONLY_LABEL`) on every
RiskAssessment; a custodian may write it on anything. Here a custodian writes one labelled
and one unlabelled RiskAssessment for a patient who consents to everything, and a
record-level project tries every way to reach the labelled one: search, read, version
read, `_include`, `_revinclude`, `_has`, chains, every kind of `$export`, `$aggregate`
cohorts, `$train` cohorts and features. The unlabelled one flows as any resource does. (The
research API has no `_history` interaction and no `$everything`.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import delete, insert, select, text, update

from consent import engine, projects
from policies.sensitivity import CUSTODIAN_ONLY, CUSTODIAN_ONLY_LABEL, MODEL_SYSTEM
from service import aggregate, db, training
from service.export import Worker
from service.release import Judged, _open, release_for
from service.store import masks
from service.store.schema import history, resources, settings
from tests.fhir_helpers import create, observation, patient
from tests.gate_world import consent_to, pseudonym
from tests.research_world import bearer, token

#: The methods of the labelled and the unlabelled one (SNOMED CT: a known system, as an `$aggregate` cohort needs).
MODELS = "http://snomed.info/sct"
HIDDEN, OPEN = "225338004", "713404003"


def risk(patient_id: str, model: str, probability: float, *, labelled: bool) -> dict[str, Any]:
    return {"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": f"Patient/{patient_id}"},
            "method": {"coding": [{"system": MODELS, "code": model}]},
            "prediction": [{"probabilityDecimal": probability}],
            **({"meta": {"security": [CUSTODIAN_ONLY_LABEL]}} if labelled else {})}


@dataclass
class Scores:
    project: str
    headers: dict[str, str]
    patient: str
    neighbour: str
    labelled: str
    unlabelled: str

    def pseudonym(self, app: Flask, reference: str) -> str:
        return pseudonym(app, self.project, reference)


@pytest.fixture
def scores(app: Flask, client: FlaskClient, custodian_headers: dict[str, str]) -> Scores:
    with app.app_context(), db.write() as conn:
        project = projects.create(conn, name="scores", tier="record", epsilon=5.0).project_id
    made = [create(client, custodian_headers, patient(family=name))["id"] for name in ("Scored", "Neighbour")]
    for patient_id in made:
        consent_to(app, patient_id, project, "record")
    labelled = create(client, custodian_headers, risk(made[0], HIDDEN, 0.93, labelled=True))["id"]
    unlabelled = create(client, custodian_headers, risk(made[0], OPEN, 0.21, labelled=False))["id"]
    return Scores(project, bearer(token(client, app, "research", project)), made[0], made[1], labelled, unlabelled)


def found(client: FlaskClient, scores: Scores, query: str) -> list[tuple[str, str, str]]:
    """(mode, type, pseudonym) of every entry a research search answers."""
    response = client.get(f"/research/fhir/{query}", headers=scores.headers)
    assert response.status_code == 200, response.get_json()
    return [(e["search"]["mode"], e["resource"]["resourceType"], e["resource"]["id"])
            for e in response.get_json().get("entry", [])]


def test_a_research_search_finds_only_the_unlabelled_risk_assessment(app, client, scores):
    assert found(client, scores, "RiskAssessment?_count=100") == [
        ("match", "RiskAssessment", scores.pseudonym(app, f"RiskAssessment/{scores.unlabelled}"))]


def test_searching_by_the_labelled_ones_pseudonym_or_method_finds_nothing(app, client, scores):
    hidden = scores.pseudonym(app, f"RiskAssessment/{scores.labelled}")
    assert found(client, scores, f"RiskAssessment?_id={hidden}") == []
    assert found(client, scores, f"RiskAssessment?method={MODELS}|{HIDDEN}") == []


def test_reading_the_labelled_risk_assessment_is_not_found(app, client, scores):
    hidden = scores.pseudonym(app, f"RiskAssessment/{scores.labelled}")
    assert client.get(f"/research/fhir/RiskAssessment/{hidden}", headers=scores.headers).status_code == 404


def test_the_unlabelled_risk_assessment_is_read_as_any_resource(app, client, scores):
    shown = scores.pseudonym(app, f"RiskAssessment/{scores.unlabelled}")
    response = client.get(f"/research/fhir/RiskAssessment/{shown}", headers=scores.headers)
    assert response.status_code == 200
    assert response.get_json()["prediction"] == [{"probabilityDecimal": 0.21}]


def test_no_version_of_a_rescored_risk_assessment_is_read(app, client, custodian_headers, scores):
    again = {**risk(scores.patient, HIDDEN, 0.95, labelled=True), "id": scores.labelled}
    assert client.put(f"/fhir/RiskAssessment/{scores.labelled}", json=again,
                      headers=custodian_headers).status_code == 200
    hidden = scores.pseudonym(app, f"RiskAssessment/{scores.labelled}")
    for version in (1, 2):
        assert client.get(f"/research/fhir/RiskAssessment/{hidden}/_history/{version}",
                          headers=scores.headers).status_code == 404


def test_a_labelled_version_stays_withheld_after_the_custodian_removes_the_label(app, client, custodian_headers,
                                                                                 scores):
    opened = {**risk(scores.patient, HIDDEN, 0.93, labelled=False), "id": scores.labelled}
    assert client.put(f"/fhir/RiskAssessment/{scores.labelled}", json=opened,
                      headers=custodian_headers).status_code == 200
    hidden = scores.pseudonym(app, f"RiskAssessment/{scores.labelled}")
    url = f"/research/fhir/RiskAssessment/{hidden}/_history"
    assert client.get(f"{url}/1", headers=scores.headers).status_code == 404
    assert client.get(f"{url}/2", headers=scores.headers).status_code == 200


def test_a_passerelle_models_score_is_withheld_even_when_an_edit_drops_its_label(app, client, custodian_headers,
                                                                                scores):
    edited = {**risk(scores.patient, "diabetes", 0.9, labelled=False),
              "method": {"coding": [{"system": MODEL_SYSTEM, "code": "diabetes"}]}}
    made = create(client, custodian_headers, edited)["id"]
    hidden = scores.pseudonym(app, f"RiskAssessment/{made}")
    assert client.get(f"/research/fhir/RiskAssessment/{hidden}", headers=scores.headers).status_code == 404
    assert found(client, scores, f"RiskAssessment?_id={hidden}") == []


def test_revinclude_from_the_patient_brings_only_the_unlabelled_risk_assessment(app, client, scores):
    person = scores.pseudonym(app, f"Patient/{scores.patient}")
    included = [entry for entry in found(client, scores, f"Patient?_id={person}&_revinclude=RiskAssessment:subject")
                if entry[0] == "include"]
    assert included == [("include", "RiskAssessment", scores.pseudonym(app, f"RiskAssessment/{scores.unlabelled}"))]


def test_include_from_another_patients_resource_does_not_bring_the_labelled_one(app, client, custodian_headers,
                                                                                 scores):
    create(client, custodian_headers, observation(scores.neighbour, value=77.0,
                                                  basedOn=[{"reference": f"RiskAssessment/{scores.labelled}"}]))
    entries = found(client, scores, "Observation?_include=Observation:based-on")
    assert [entry[1] for entry in entries] == ["Observation"]


def test_has_cannot_find_the_patient_by_the_labelled_risk_assessment(app, client, scores):
    assert found(client, scores, f"Patient?_has:RiskAssessment:subject:method={MODELS}|{HIDDEN}") == []
    assert [entry[1] for entry in found(client, scores, f"Patient?_has:RiskAssessment:subject:method={MODELS}|{OPEN}")
            ] == ["Patient"]


def test_a_chain_cannot_reach_the_labelled_risk_assessment(app, client, custodian_headers, scores):
    create(client, custodian_headers, observation(scores.neighbour, value=77.0,
                                                  basedOn=[{"reference": f"RiskAssessment/{scores.labelled}"}]))
    assert found(client, scores, f"Observation?based-on:RiskAssessment.method={MODELS}|{HIDDEN}") == []


def test_a_resource_of_the_patient_referring_to_the_labelled_one_is_withheld_too(app, client, custodian_headers,
                                                                                 scores):
    follow_up = create(client, custodian_headers, observation(
        scores.patient, value=66.0, basedOn=[{"reference": f"RiskAssessment/{scores.labelled}"}]))["id"]
    hidden = scores.pseudonym(app, f"Observation/{follow_up}")
    assert client.get(f"/research/fhir/Observation/{hidden}", headers=scores.headers).status_code == 404


def test_another_patients_resource_referring_to_the_labelled_one_leaves_without_the_reference(
        app, client, custodian_headers, scores):
    referring = create(client, custodian_headers, observation(
        scores.neighbour, value=77.0, basedOn=[{"reference": f"RiskAssessment/{scores.labelled}"}]))["id"]
    shown = scores.pseudonym(app, f"Observation/{referring}")
    response = client.get(f"/research/fhir/Observation/{shown}", headers=scores.headers)
    assert response.status_code == 200
    assert "basedOn" not in response.get_json()


def _group(app: Flask, client: FlaskClient, custodian_headers: dict[str, str], scores: Scores) -> str:
    group = create(client, custodian_headers, {"resourceType": "Group", "type": "person", "actual": True,
                                               "member": [{"entity": {"reference": f"Patient/{scores.patient}"}}]})
    result = app.test_cli_runner().invoke(args=["project", "group", "add", "--project", scores.project,
                                                "--group", group["id"]])
    assert result.exit_code == 0, result.output
    return group["id"]


@pytest.mark.parametrize("kind", ["system", "patient", "group"])
def test_no_export_carries_the_labelled_risk_assessment(app, client, custodian_headers, scores, kind):
    worker = Worker(app)
    worker.beat()
    app.config["EXPORT_POLL_SECONDS"] = 0
    path = {"system": "/research/fhir/$export", "patient": "/research/fhir/Patient/$export",
            "group": f"/research/fhir/Group/{_group(app, client, custodian_headers, scores)}/$export"}[kind]
    kick = client.get(f"{path}?_type=RiskAssessment", headers={**scores.headers, "Prefer": "respond-async"})
    assert kick.status_code == 202, kick.get_json()
    worker.work()
    manifest = client.get(kick.headers["Content-Location"].replace("http://localhost", ""), headers=scores.headers)
    assert manifest.status_code == 200, manifest.get_json()
    lines = []
    for item in manifest.get_json()["output"]:
        content = client.get(item["url"].replace("http://localhost", ""), headers=scores.headers)
        assert content.status_code == 200
        lines += [orjson.loads(line) for line in content.data.splitlines()]
    assert [line["id"] for line in lines] == [scores.pseudonym(app, f"RiskAssessment/{scores.unlabelled}")]


def _cohort_size(app: Flask, project_id: str, expression: str) -> int:
    """The exact (pre-noise) size of an `$aggregate` cohort, computed through the gate as `$aggregate` does."""
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "measure", "valueString": "count"}, {"name": "cohort", "valueString": expression},
        {"name": "epsilon", "valueDecimal": 0.5}]}
    with app.app_context():
        with db.read() as conn:
            question = aggregate.parse(body, projects.get(conn, project_id), app.config["MIN_EPSILON"]).question
        return release_for("test", project_id, engine.AGGREGATE).aggregate_rows(question)[0].count


def test_an_aggregate_cohort_over_the_labelled_risk_assessment_counts_no_one(app, scores):
    assert _cohort_size(app, scores.project, f"RiskAssessment?method={MODELS}|{HIDDEN}") == 0
    assert _cohort_size(app, scores.project, f"RiskAssessment?method={MODELS}|{OPEN}") == 1


def _training_rows(app: Flask, project_id: str, feature: str, cohort: str | None = None) -> list[list[float]]:
    """The exact rows `$train` would train on (through the gate, as `$train` reads them): one `has`
    feature over `feature`, the patients matching `cohort` (default: every consenting one)."""
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "model", "valueCode": "logistic-regression"},
        *([{"name": "cohort", "valueString": cohort}] if cohort else []),
        {"name": "feature", "part": [{"name": "name", "valueString": "scored"},
                                     {"name": "has", "valueString": feature}]},
        {"name": "label", "part": [{"name": "has", "valueString": "Condition?code=http://snomed.info/sct|44054006"}]},
        {"name": "epsilon", "valueDecimal": 0.5}]}
    with app.app_context():
        release = release_for("test", project_id, engine.AGGREGATE)
        request = training.parse(body, release.project, app.config["MIN_EPSILON"])
        return release.training_rows(request.design(db.now_us()), request.types)[0].values


def test_a_train_cohort_over_the_labelled_risk_assessment_holds_no_one(app, scores):
    hidden, shown = (f"RiskAssessment?method={MODELS}|{code}" for code in (HIDDEN, OPEN))
    assert _training_rows(app, scores.project, shown, cohort=hidden) == []
    assert _training_rows(app, scores.project, shown, cohort=shown) == [[1.0]]


def test_a_train_feature_over_the_labelled_risk_assessment_is_0_for_everyone(app, scores):
    hidden, shown = (f"RiskAssessment?method={MODELS}|{code}" for code in (HIDDEN, OPEN))
    assert _training_rows(app, scores.project, hidden) == [[0.0], [0.0]]
    assert sorted(_training_rows(app, scores.project, shown)) == [[0.0], [1.0]]


def test_a_custodian_labelled_directory_resource_is_withheld_from_a_project_declaring_its_type(
        app, client, custodian_headers):
    with app.app_context(), db.write() as conn:
        project = projects.create(conn, name="directory", tier="record", epsilon=5.0,
                                  types=("Patient", "Practitioner")).project_id
    doctors = {labelled: create(client, custodian_headers, {
        "resourceType": "Practitioner", "name": [{"family": "Labelled" if labelled else "Open"}],
        **({"meta": {"security": [CUSTODIAN_ONLY_LABEL]}} if labelled else {})})["id"] for labelled in (True, False)}
    headers = bearer(token(client, app, "research", project))
    body = client.get("/research/fhir/Practitioner", headers=headers).get_json()
    assert [e["resource"]["id"] for e in body.get("entry", [])] == [
        pseudonym(app, project, f"Practitioner/{doctors[False]}")]


def test_a_medication_named_only_by_a_labelled_prescription_is_withheld(app, client, custodian_headers):
    with app.app_context(), db.write() as conn:
        project = projects.create(conn, name="drugs", tier="record", epsilon=5.0,
                                  types=("Patient", "MedicationRequest", "Medication")).project_id
    patient_id = create(client, custodian_headers, patient(family="Treated"))["id"]
    consent_to(app, patient_id, project, "record")
    medication = create(client, custodian_headers, {"resourceType": "Medication", "code": {"coding": [
        {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361"}]}})["id"]
    create(client, custodian_headers, {
        "resourceType": "MedicationRequest", "status": "active", "intent": "order",
        "subject": {"reference": f"Patient/{patient_id}"},
        "medicationReference": {"reference": f"Medication/{medication}"}, "meta": {"security": [CUSTODIAN_ONLY_LABEL]}})
    body = client.get("/research/fhir/Medication", headers=bearer(token(client, app, "research", project))).get_json()
    assert body.get("entry", []) == []


def test_a_labelled_row_stored_before_the_rule_is_withheld_once_init_db_classifies_again(app, client, scores):
    """A store classified by an older classifier (the row's mask without the bit) is classified again by
    `init-db`, as for any change of the sensitivity rules."""
    with app.app_context(), db.write() as conn:
        pk = conn.execute(select(resources.c.pk).where(resources.c.type == "RiskAssessment",
                                                       resources.c.id == scores.labelled)).scalar_one()
        conn.execute(update(resources).where(resources.c.pk == pk).values(sensitive_mask=0))
        conn.execute(update(history).where(history.c.resource_pk == pk).values(sensitive_mask=0))
        conn.execute(delete(settings).where(settings.c.name == masks.SETTING))
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    hidden = scores.pseudonym(app, f"RiskAssessment/{scores.labelled}")
    assert client.get(f"/research/fhir/RiskAssessment/{hidden}", headers=scores.headers).status_code == 404


def test_the_custodian_reads_the_labelled_risk_assessment(client, custodian_headers, scores):
    response = client.get(f"/fhir/RiskAssessment/{scores.labelled}", headers=custodian_headers)
    assert response.status_code == 200
    assert response.get_json()["meta"]["security"] == [CUSTODIAN_ONLY_LABEL]


def corrupt_mask(app: Flask, resource_id: str) -> None:
    """Set the top bit of a stored RiskAssessment's mask (no code writes one)."""
    with app.app_context(), db.write() as conn:
        conn.execute(update(resources).where(resources.c.type == "RiskAssessment", resources.c.id == resource_id)
                     .values(sensitive_mask=-(2**63)))


def test_a_row_whose_mask_is_negative_is_withheld_from_searches(app, client, scores):
    # Were the top bit ever set, the row fails closed rather than reading as open.
    corrupt_mask(app, scores.unlabelled)
    assert found(client, scores, "RiskAssessment?_count=100") == []


def test_a_row_whose_mask_is_negative_is_not_read(app, client, scores):
    corrupt_mask(app, scores.unlabelled)
    hidden = scores.pseudonym(app, f"RiskAssessment/{scores.unlabelled}")
    assert client.get(f"/research/fhir/RiskAssessment/{hidden}", headers=scores.headers).status_code == 404


def test_postgresql_expects_the_rows_the_custodian_only_test_lets_through(pg_engine):
    # With `mask & bit = 0` it expected 0.5 % of them: at 100,000 consented patients the aggregate
    # cohort was planned as a few dozen rows (nested loops, no parallel workers), 2-3x plain SQL.
    with pg_engine.connect() as conn, conn.begin() as transaction:
        conn.execute(insert(resources), [
            {"type": "Patient", "id": f"estimate-{n}", "version": 1, "last_updated": 0, "deleted": False,
             "sensitive_mask": CUSTODIAN_ONLY if n % 100 == 0 else n % 3, "json": b"{}"} for n in range(1_000)])
        conn.execute(text("ANALYZE resources"))

        def expected(query: Any) -> int:
            sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
            return conn.execute(text(f"EXPLAIN (FORMAT JSON) {sql}")).scalar_one()[0]["Plan"]["Plan Rows"]

        passing = expected(select(resources.c.pk).where(_open(Judged.current(resources))))
        stored = expected(select(resources.c.pk))  # also any row an earlier test of this process left
        transaction.rollback()
    assert 0.9 <= passing / stored <= 1
