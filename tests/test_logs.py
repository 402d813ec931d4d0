"""Structured request logs (service/logs.py) and gunicorn's access log carry no PHI.

The whole synthetic corpus is written through the custodian API, then read back by id and
searched by name, phone, identifier and birth date; every line of the JSON request log and every
access-log line gunicorn would write (deploy/gunicorn.conf.py's format, rendered by gunicorn's own
Logger) is scanned for the corpus's names, phones, identifiers, birth dates and resource ids.
"""
from __future__ import annotations

import datetime
import json
import logging
import runpy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gunicorn.config import Config
from gunicorn.glogging import Logger, SafeAtoms

from service.config import ROOT
from tests.fhir_helpers import write_corpus

PATIENTS = 5
SEED = 11
ACCESS_LOG_FORMAT = runpy.run_path(str(Path(ROOT) / "deploy" / "gunicorn.conf.py"))["access_log_format"]


class AccessLog:
    """What gunicorn's access log would print for each request, rendered by gunicorn's Logger."""

    def __init__(self, wsgi_app: Any):
        self.wsgi_app, self.lines = wsgi_app, []
        self.logger = Logger(Config())

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        environ.setdefault("RAW_URI", environ.get("PATH_INFO", "") + "?" + environ.get("QUERY_STRING", ""))

        def recording(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
            response = SimpleNamespace(status=status, headers=headers, sent=0)
            request = SimpleNamespace(headers=[(k[5:].replace("_", "-"), v) for k, v in environ.items()
                                               if k.startswith("HTTP_")])
            atoms = self.logger.atoms(response, request, environ, datetime.timedelta(milliseconds=3))
            self.lines.append(ACCESS_LOG_FORMAT % SafeAtoms(atoms))
            return start_response(status, headers, *args)

        return self.wsgi_app(environ, recording)


def test_no_log_line_carries_a_name_phone_identifier_birth_date_or_resource_id(app, client, custodian_headers,
                                                                                 caplog):
    access = AccessLog(app.wsgi_app)
    app.wsgi_app = access
    caplog.set_level(logging.INFO, logger="passerelle.requests")
    people, secrets = write_corpus(client, custodian_headers, PATIENTS, SEED)
    for person in people:
        assert client.get(f"/fhir/Patient/{person['id']}", headers=custodian_headers).status_code == 200
        searches = [f"family={name['family']}" for name in person.get("name", ())]
        searches += [f"phone={t['value']}" for t in person.get("telecom", ()) if t.get("system") == "phone"]
        searches += [f"identifier={i['value']}" for i in person.get("identifier", ())]
        searches += [f"birthdate={person['birthDate']}"] if person.get("birthDate") else []
        for query in searches:
            assert client.get(f"/fhir/Patient?{query}", headers=custodian_headers).status_code == 200
    assert len(secrets) > 4 * PATIENTS

    lines = [record.getMessage() for record in caplog.records if record.name == "passerelle.requests"]
    assert len(lines) == len(access.lines) > 6 * PATIENTS
    for line in lines + access.lines:
        leaked = [secret for secret in secrets if secret in line]
        assert not leaked, f"{leaked} in {line}"
    reads = [json.loads(line) for line in lines if '"route":"/fhir/<resource_type>/<resource_id>"' in line]
    assert len(reads) == PATIENTS


def test_a_request_line_names_the_route_template_status_timing_and_client(app, client, custodian_headers, caplog):
    caplog.set_level(logging.INFO, logger="passerelle.requests")
    client.get("/fhir/Patient/some-id?_elements=name", headers=custodian_headers)
    line = json.loads(caplog.records[-1].getMessage())
    assert line["method"] == "GET"
    assert line["route"] == "/fhir/<resource_type>/<resource_id>"
    assert line["status"] == 404
    assert line["duration_ms"] >= 0
    assert line["client_id"] is not None
    assert set(line) == {"request_id", "method", "route", "status", "duration_ms", "client_id"}


def test_an_unrouted_request_logs_no_path(client, caplog):
    caplog.set_level(logging.INFO, logger="passerelle.requests")
    client.get("/no/such/Patient-123")
    line = json.loads(caplog.records[-1].getMessage())
    assert line["route"] is None and line["status"] == 404
    assert "Patient-123" not in caplog.records[-1].getMessage()
