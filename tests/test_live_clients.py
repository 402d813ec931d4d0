"""Real FHIR client libraries against a real server on a loopback port.

`fhirclient` (SMART on FHIR) and `fhirpy` speak HTTP to the application served by
werkzeug in a background thread, on SQLite and on PostgreSQL, with a bearer token
obtained from `POST /auth/token` (client_credentials, client_secret_basic).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import requests
from fhirclient import client as smart_client
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRUnauthorizedException
from fhirpy import SyncFHIRClient
from flask import Flask

SMART_OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
FAMILY = "Passerelle-Live"
PATIENTS = 25
PAGE = 10


@dataclass(frozen=True)
class Live:
    """A running server: its base URL, a custodian's bearer token and the Patients created."""

    base: str
    token: str
    patient_ids: frozenset[str]

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Accept": "application/fhir+json"}


def _custodian_credentials(app: Flask) -> tuple[str, str]:
    result = app.test_cli_runner().invoke(args=["client", "create", "--name", "live-test", "--role", "custodian"])
    assert result.exit_code == 0, result.output
    created = json.loads(result.stdout)
    return created["client_id"], created["client_secret"]


def _token(base: str, client_id: str, secret: str) -> str:
    response = requests.post(f"{base}/auth/token", data={"grant_type": "client_credentials"},
                             auth=(client_id, secret), timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def _patient_bundle(count: int) -> dict:
    entries = [{"resource": {"resourceType": "Patient", "name": [{"family": FAMILY, "given": [f"Given{n:02d}"]}],
                             "birthDate": f"19{50 + n}-01-01"},
                "request": {"method": "POST", "url": "Patient"}} for n in range(count)]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@pytest.fixture
def live(app: Flask, base_url: str) -> Live:
    """A token for a new custodian client, and 25 Patients created over HTTP in one transaction."""
    token = _token(base_url, *_custodian_credentials(app))
    response = requests.post(f"{base_url}/fhir", json=_patient_bundle(PATIENTS), timeout=30,
                             headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"})
    assert response.status_code == 200, response.text
    locations = [entry["response"]["location"] for entry in response.json()["entry"]]
    ids = frozenset(location.split("/")[location.split("/").index("Patient") + 1] for location in locations)
    assert len(ids) == PATIENTS
    return Live(base_url, token, ids)


# --- fhirclient (SMART on FHIR) --------------------------------------------------------------

def _smart(live: Live) -> smart_client.FHIRClient:
    return smart_client.FHIRClient(settings={"app_id": "passerelle-test", "api_base": live.fhir})


def _with_token(smart: smart_client.FHIRClient, live: Live) -> smart_client.FHIRClient:
    """Hand fhirclient a token obtained elsewhere: its OAuth2 auth object signs requests with it."""
    smart.prepare()
    smart.server.auth.access_token = live.token
    assert smart.ready
    return smart


def test_fhirclient_prepares_against_the_capability_statement_and_discovers_oauth2(live: Live):
    smart = _smart(live)
    assert smart.prepare() is False  # parsed, and knows it must authorize before any call
    assert smart.server.auth.auth_type == "oauth2"
    security = smart.server.capabilityStatement.rest[0].security
    oauth = next(e for e in security.extension if e.url == SMART_OAUTH_URIS)
    assert {e.url: e.valueUri for e in oauth.extension}["token"] == f"{live.base}/auth/token"


def test_fhirclient_obtains_its_own_token_with_client_secret_basic(app: Flask, live: Live):
    client_id, secret = _custodian_credentials(app)
    smart = smart_client.FHIRClient(settings={"app_id": client_id, "app_secret": secret, "api_base": live.fhir,
                                              "scope": "system/Patient.rs"})
    smart.wants_patient = False  # no SMART launch context: a backend service
    smart.prepare()
    smart.authorize()
    assert smart.ready
    patient_id = sorted(live.patient_ids)[0]
    assert Patient.read(patient_id, smart.server).id == patient_id


def test_fhirclient_reads_a_patient_with_the_bearer_token(live: Live):
    smart = _with_token(_smart(live), live)
    patient_id = sorted(live.patient_ids)[0]
    read = Patient.read(patient_id, smart.server)
    assert read.id == patient_id
    assert read.name[0].family == FAMILY


def test_fhirclient_search_follows_next_links_and_sees_every_patient_exactly_once(live: Live):
    smart = _with_token(_smart(live), live)
    search = Patient.where(struct={"family": FAMILY, "_count": str(PAGE)})
    pages = list(search.perform_iter(smart.server))
    seen = [entry.resource.id for page in pages for entry in page.entry or []]
    assert len(pages) == math.ceil(PATIENTS / PAGE)
    assert sorted(seen) == sorted(live.patient_ids)


def test_fhirclient_without_a_token_gets_unauthorized(live: Live):
    smart = _smart(live)
    smart.prepare()
    with pytest.raises(FHIRUnauthorizedException):
        Patient.read(sorted(live.patient_ids)[0], smart.server)


# --- fhirpy -------------------------------------------------------------------------------------

def _fhirpy(live: Live) -> SyncFHIRClient:
    return SyncFHIRClient(live.fhir, authorization=f"Bearer {live.token}", requests_config={"timeout": 30})


def test_fhirpy_fetch_all_follows_every_page_and_sees_every_patient_exactly_once(live: Live):
    found = _fhirpy(live).resources("Patient").search(family=FAMILY).limit(PAGE).fetch_all()
    assert sorted(p.id for p in found) == sorted(live.patient_ids)


def test_fhirpy_reads_a_patient_by_id(live: Live):
    patient_id = sorted(live.patient_ids)[0]
    read = _fhirpy(live).reference("Patient", patient_id).to_resource()
    assert read.id == patient_id
    assert read["name"][0]["family"] == FAMILY


def test_fhirpy_creates_a_patient_that_the_server_then_serves(live: Live):
    created = _fhirpy(live).resource("Patient", name=[{"family": "Fhirpy", "given": ["Créé"]}], gender="female")
    created.save()
    assert created.id
    assert created["meta"]["versionId"] == "1"
    served = requests.get(f"{live.fhir}/Patient/{created.id}", headers=live.headers, timeout=10)
    assert served.status_code == 200
    assert served.json()["name"] == [{"family": "Fhirpy", "given": ["Créé"]}]


def test_fhirpy_saving_a_changed_patient_creates_version_2(live: Live):
    fhir = _fhirpy(live)
    created = fhir.resource("Patient", name=[{"family": "Fhirpy"}])
    created.save()
    created["gender"] = "male"
    created.save()
    assert created["meta"]["versionId"] == "2"
    assert fhir.reference("Patient", created.id).to_resource()["gender"] == "male"
