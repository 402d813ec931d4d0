"""Stored sensitivity masks: set at write time, inherited through references, kept equal to a
fresh classification of the store, and recomputed by `sensitivity refresh` and `init-db`."""
from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import and_, select, update

from policies.sensitivity import BIT
from service import db
from service.store import masks, repository
from service.store.schema import history, resources, settings
from tests.conftest import Recipe
from tests.fhir_helpers import create, patient

SNOMED = "http://snomed.info/sct"
HIV = {"coding": [{"system": SNOMED, "code": "86406008"}]}
CHECK_UP = {"coding": [{"system": SNOMED, "code": "185349003"}]}
AMBULATORY = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}


def stored_masks(app: Flask) -> dict[tuple[str, str], tuple[int, int]]:
    """(type, id) → (resources mask, current history row's mask) of every undeleted resource."""
    with app.app_context(), db.read() as conn:
        rows = conn.execute(
            select(resources.c.type, resources.c.id, resources.c.sensitive_mask, history.c.sensitive_mask)
            .join(history, and_(history.c.resource_pk == resources.c.pk, history.c.version == resources.c.version))
            .where(resources.c.deleted.is_(False)))
        return {(r[0], r[1]): (r[2], r[3]) for r in rows}


def mask_of(app: Flask, reference: str) -> int:
    current, in_history = stored_masks(app)[tuple(reference.split("/"))]  # type: ignore[index]
    assert current == in_history
    return current


def assert_masks_are_fresh(app: Flask) -> None:
    with app.app_context(), db.read() as conn:
        fresh = masks.fresh(conn).masks
    stored = stored_masks(app)
    assert {key: (mask, mask) for key, mask in fresh.items()} == stored


def put(client: FlaskClient, headers: dict[str, str], resource: dict[str, Any]) -> str:
    response = client.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource, headers=headers)
    assert response.status_code in (200, 201), response.get_json()
    return f"{resource['resourceType']}/{resource['id']}"


def load_ahead(app: Flask, resource: dict[str, Any]) -> dict[str, Any]:
    """Store a resource before what it refers to, as a bulk load may (the API refuses a reference that
    does not resolve yet: service/references.py)."""
    with app.app_context(), db.write() as conn:
        return repository.upsert(conn, [(resource["resourceType"], resource)])[0].resource()


def visit(patient_id: str, visit_id: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Encounter", "id": visit_id, "status": "finished", "class": AMBULATORY,
            "subject": {"reference": f"Patient/{patient_id}"}, **extra}


def pulse(patient_id: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{patient_id}"},
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "valueQuantity": {"value": 70, "unit": "/min"}, **extra}


def test_an_observation_written_before_its_sensitive_encounter_gets_its_category(app, client, custodian_headers):
    p = create(client, custodian_headers, patient())["id"]
    made = load_ahead(app, pulse(p, encounter={"reference": "Encounter/later-visit"}))
    assert mask_of(app, f"Observation/{made['id']}") == 0
    put(client, custodian_headers, visit(p, "later-visit", reasonCode=[HIV]))
    assert mask_of(app, f"Observation/{made['id']}") == BIT["hiv"]
    assert_masks_are_fresh(app)


def test_inheritance_is_transitive_whatever_the_order_of_writes(app, client, custodian_headers):
    p = create(client, custodian_headers, patient())["id"]
    made = load_ahead(app, pulse(p, encounter={"reference": "Encounter/chain-visit"}))
    load_ahead(app, visit(p, "chain-visit", diagnosis=[{"condition": {"reference": "Condition/c1"}}]))
    put(client, custodian_headers, {"resourceType": "Condition", "id": "c1", "code": HIV,
                                    "subject": {"reference": f"Patient/{p}"}})
    assert mask_of(app, f"Observation/{made['id']}") == BIT["hiv"]
    assert mask_of(app, "Encounter/chain-visit") == BIT["hiv"]
    assert_masks_are_fresh(app)


def test_a_corrected_code_releases_what_inherited_from_it(app, client, custodian_headers):
    p = create(client, custodian_headers, patient())["id"]
    put(client, custodian_headers, visit(p, "fixed-visit", reasonCode=[HIV]))
    made = create(client, custodian_headers, pulse(p, encounter={"reference": "Encounter/fixed-visit"}))
    assert mask_of(app, f"Observation/{made['id']}") == BIT["hiv"]
    put(client, custodian_headers, visit(p, "fixed-visit", reasonCode=[CHECK_UP]))
    assert mask_of(app, f"Observation/{made['id']}") == 0
    assert_masks_are_fresh(app)


def test_deleting_the_sensitive_target_recomputes_what_referred_to_it(app, client, custodian_headers):
    p = create(client, custodian_headers, patient())["id"]
    put(client, custodian_headers, visit(p, "gone-visit", reasonCode=[HIV]))
    made = create(client, custodian_headers, pulse(p, encounter={"reference": "Encounter/gone-visit"}))
    assert client.delete("/fhir/Encounter/gone-visit", headers=custodian_headers).status_code in (200, 204)
    assert mask_of(app, f"Observation/{made['id']}") == 0
    assert_masks_are_fresh(app)


def test_another_patients_sensitive_resource_passes_nothing(app, client, custodian_headers):
    p = create(client, custodian_headers, patient(family="One"))["id"]
    q = create(client, custodian_headers, patient(family="Two"))["id"]
    put(client, custodian_headers, visit(q, "their-visit", reasonCode=[HIV]))
    made = create(client, custodian_headers, pulse(p, encounter={"reference": "Encounter/their-visit"}))
    assert mask_of(app, f"Observation/{made['id']}") == 0


def test_a_medication_changed_to_an_hiv_drug_marks_its_prescriptions(app, client, custodian_headers):
    p = create(client, custodian_headers, patient())["id"]
    rxnorm = "http://www.nlm.nih.gov/research/umls/rxnorm"
    put(client, custodian_headers, {"resourceType": "Medication", "id": "med-1",
                                    "code": {"coding": [{"system": rxnorm, "code": "313782"}]}})
    made = create(client, custodian_headers, {
        "resourceType": "MedicationRequest", "status": "active", "intent": "order",
        "subject": {"reference": f"Patient/{p}"}, "medicationReference": {"reference": "Medication/med-1"}})
    assert mask_of(app, f"MedicationRequest/{made['id']}") == 0
    put(client, custodian_headers, {"resourceType": "Medication", "id": "med-1",
                                    "code": {"coding": [{"system": rxnorm, "code": "1433873"}]}})
    assert mask_of(app, f"MedicationRequest/{made['id']}") == BIT["hiv"]
    assert_masks_are_fresh(app)


def test_after_a_demo_ingest_every_stored_mask_equals_a_fresh_classification(app):
    result = app.test_cli_runner().invoke(args=["demo-data", "--patients", "25", "--seed", "7"])
    assert result.exit_code == 0, result.output
    assert any(mask for mask, _ in stored_masks(app).values())
    assert_masks_are_fresh(app)


def _demo_patients(app: Flask, client: FlaskClient, headers: dict[str, str]) -> None:
    """The world of the tests below: ten demo patients (seed 3), loaded by the CLI."""
    result = app.test_cli_runner().invoke(args=["demo-data", "--patients", "10", "--seed", "3"])
    assert result.exit_code == 0, result.output


@pytest.fixture
def world_recipe() -> Recipe:
    return _demo_patients


def _spoil_every_mask(app: Flask) -> None:
    with app.app_context(), db.write() as conn:
        conn.execute(update(resources).values(sensitive_mask=0))
        conn.execute(update(history).values(sensitive_mask=31))


def test_sensitivity_refresh_restores_every_mask_and_prints_a_json_summary(app, world):
    _spoil_every_mask(app)
    result = app.test_cli_runner().invoke(args=["sensitivity", "refresh"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["resources"] == len(stored_masks(app)) and summary["changed"] > 0
    assert "Classifying" in result.stderr
    assert_masks_are_fresh(app)


def test_init_db_reclassifies_when_the_classifier_version_changed(app, world):
    _spoil_every_mask(app)
    with app.app_context(), db.write() as conn:
        conn.execute(update(settings).where(settings.c.name == masks.SETTING).values(value="an older classifier"))
    assert app.test_cli_runner().invoke(args=["init-db"]).exit_code == 0
    assert_masks_are_fresh(app)


def test_init_db_leaves_masks_alone_when_the_classifier_is_unchanged(app, world):
    assert app.test_cli_runner().invoke(args=["init-db"]).exit_code == 0
    with app.app_context(), db.write() as conn:
        conn.execute(update(resources).values(sensitive_mask=0))
    assert app.test_cli_runner().invoke(args=["init-db"]).exit_code == 0
    assert all(current == 0 for current, _ in stored_masks(app).values())


def test_sensitivity_refresh_classifies_older_versions_on_their_own_content(app, client, custodian_headers):
    p = create(client, custodian_headers, patient())["id"]
    put(client, custodian_headers, visit(p, "twice", reasonCode=[CHECK_UP]))
    put(client, custodian_headers, visit(p, "twice", reasonCode=[HIV]))
    with app.app_context(), db.write() as conn:
        conn.execute(update(history).values(sensitive_mask=31))
    result = app.test_cli_runner().invoke(args=["sensitivity", "refresh"])
    assert result.exit_code == 0, result.output
    with app.app_context(), db.read() as conn:
        by_version = dict(conn.execute(
            select(history.c.version, history.c.sensitive_mask).join(resources, resources.c.pk == history.c.resource_pk)
            .where(resources.c.type == "Encounter", resources.c.id == "twice")).all())
    assert by_version == {1: 0, 2: BIT["hiv"]}
