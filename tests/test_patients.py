"""Naming a patient: by resource id or by medical record number (consent/patients.py)."""
from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from consent import patients
from service import db
from service.errors import InvalidRequest, NotFound

MR = {"coding": [{"system": patients.IDENTIFIER_TYPES, "code": "MR"}]}
SSN = {"coding": [{"system": patients.IDENTIFIER_TYPES, "code": "SS"}]}


def _patient(client: FlaskClient, headers: dict[str, str], pid: str, *identifiers: dict[str, Any]) -> None:
    response = client.put(f"/fhir/Patient/{pid}", headers=headers,
                          json={"resourceType": "Patient", "id": pid, "identifier": list(identifiers)})
    assert response.status_code in (200, 201), response.get_json()


def _resolve(app: Flask, text: str) -> str:
    with app.app_context(), db.read() as conn:
        return patients.resolve(conn, text)


@pytest.fixture
def named(client: FlaskClient, custodian_headers: dict[str, str]) -> None:
    _patient(client, custodian_headers, "pat-a", {"type": MR, "system": "urn:mrn", "value": "000123"})
    _patient(client, custodian_headers, "pat-b", {"type": SSN, "system": "urn:ssn", "value": "000123"},
             {"type": MR, "system": "urn:mrn", "value": "000456"})
    _patient(client, custodian_headers, "000456", {"type": MR, "system": "urn:mrn", "value": "999"})


def test_a_patient_is_found_by_id(app: Flask, named: None) -> None:
    assert _resolve(app, "pat-a") == "pat-a"


def test_a_patient_is_found_by_medical_record_number(app: Flask, named: None) -> None:
    assert _resolve(app, " 000123 ") == "pat-a"


def test_an_id_wins_over_a_number_that_reads_the_same(app: Flask, named: None) -> None:
    assert _resolve(app, "000456") == "000456"


def test_an_identifier_of_another_type_is_not_a_patient_number(app: Flask, client: FlaskClient,
                                                                  custodian_headers: dict[str, str]) -> None:
    _patient(client, custodian_headers, "pat-c", {"type": SSN, "system": "urn:ssn", "value": "777"})
    with pytest.raises(NotFound):
        _resolve(app, "777")


def test_a_deleted_patient_is_not_found(app: Flask, client: FlaskClient, custodian_headers: dict[str, str],
                                        named: None) -> None:
    assert client.delete("/fhir/Patient/pat-a", headers=custodian_headers).status_code in (200, 204)
    with pytest.raises(NotFound):
        _resolve(app, "000123")
    with pytest.raises(NotFound):
        _resolve(app, "pat-a")


def test_a_number_shared_by_two_patients_is_refused(app: Flask, client: FlaskClient,
                                                    custodian_headers: dict[str, str]) -> None:
    _patient(client, custodian_headers, "twin-1", {"type": MR, "system": "urn:mrn", "value": "42"})
    _patient(client, custodian_headers, "twin-2", {"type": MR, "system": "urn:other-site", "value": "42"})
    with pytest.raises(InvalidRequest, match="2 patients"):
        _resolve(app, "42")


def test_the_patient_number_is_the_first_medical_record_number(app: Flask, named: None) -> None:
    with app.app_context(), db.read() as conn:
        assert patients.patient_number(conn, "pat-b") == "000456"


def test_a_patient_without_a_medical_record_number_has_no_patient_number(
        app: Flask, client: FlaskClient, custodian_headers: dict[str, str]) -> None:
    _patient(client, custodian_headers, "pat-d", {"type": SSN, "system": "urn:ssn", "value": "5"})
    with app.app_context(), db.read() as conn, pytest.raises(InvalidRequest, match="no medical record number"):
        patients.patient_number(conn, "pat-d")
