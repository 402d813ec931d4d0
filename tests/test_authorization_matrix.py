"""The authorisation matrix: every route of the app × every kind of caller → the status it answers.

The routes are read from the app's own route table (`app.url_map`): every rule, with each method
it takes (HEAD answers as GET; Flask's automatic OPTIONS is left out), gets a concrete sample URL.
What each caller must get is held in one table, `RULES`, keyed by endpoint: a route whose endpoint
has no rule fails every test here, so a new route cannot ship without saying who may call it.

The callers (`CALLERS`), each with its own bearer token or session:

- `anonymous`: no credentials; `expired`: a custodian token past its expiry; `disabled`: a token of
  project A's research client after `client disable`; `patient`: a signed-in portal session cookie
  and nothing else;
- `custodian`: the full custodian scope; `custodian_narrowed`: a custodian token asking only for
  `system/Patient.rs`;
- `research_a`: project A's record-level client on A's data; `research_a_on_b`: the same token on
  project B's data (B's pseudonyms, B's export job and file, B's Group); `aggregate_only`: the
  client of an aggregate-tier project; `research_narrowed`: project A's client asking only for
  `system/Observation.r`.

Besides the status, every cell is checked for what its refusal looks like: on an API route, a 401
is an OperationOutcome (`login`) with a Bearer challenge and a 403 an OperationOutcome
(`forbidden`); under `/consent/` every answer is the portal's own (HTML, or the patient's
download), never the API's JSON; and nothing a research token receives carries project B's data.

Project A asking for B's pseudonym gets 404, not 403: pseudonyms are keyed per project
(service/release.py `Release.read` resolves the pseudonym with A's key), so B's pseudonym names
nothing A could be refused — and a 403 would tell A that the identifier exists elsewhere. B's
export job, file and Group are likewise unknown to A (404), as an unknown id is.

One world per backend is built once for the module: the mutating cells (create, update, delete,
cancel, sign-out, budget raise, …) each work on a target of their own, so no cell depends on the
order in which the others run.
"""
from __future__ import annotations

import hashlib
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text, update
from sqlalchemy.engine import make_url
from werkzeug.routing import Rule
from werkzeug.test import TestResponse

from consent.web import PREFIX as PORTAL
from consent.web import sessions
from service import db
from service.auth import register_client
from service.export import Worker
from service.store.schema import access_tokens
from tests.backends import admin_url
from tests.fhir_helpers import create
from tests.portal_helpers import PASSPHRASE, accept, invite, patient_with_number
from tests.research_world import World, bearer, build

# -- the callers -------------------------------------------------------------------------------

NO_VALID_TOKEN = ("anonymous", "expired", "disabled", "patient")
CUSTODIANS = ("custodian", "custodian_narrowed")
RESEARCHERS = ("research_a", "research_a_on_b", "aggregate_only", "research_narrowed")
CALLERS = (*NO_VALID_TOKEN, *CUSTODIANS, *RESEARCHERS)

PORTAL_NUMBER = "MATRIX-1"
CUSTODIAN_NARROWED_SCOPE = "system/Patient.rs"
RESEARCH_NARROWED_SCOPE = "system/Observation.r"

# -- the rules: who gets what, per endpoint ----------------------------------------------------

Row = dict[str, int]


def everyone(status: int) -> Row:
    """A route that takes no token and ignores one: every caller gets `status`."""
    return dict.fromkeys(CALLERS, status)


def custodian_api(full: int, narrowed: int) -> Row:
    """A custodian route: 401 without a valid bearer token, 403 for a research token."""
    return {**dict.fromkeys(NO_VALID_TOKEN, 401), **dict.fromkeys(RESEARCHERS, 403),
            "custodian": full, "custodian_narrowed": narrowed}


def research_api(own: int, *, on_b: int | None = None, aggregate_only: int = 403, narrowed: int = 403) -> Row:
    """A research route: 401 without a valid bearer token, 403 for a custodian token; `own` for
    project A on its data, `on_b` (default `own`) for A on B's, 403 for an aggregate-only project
    and for a scope without the permission unless said otherwise."""
    return {**dict.fromkeys(NO_VALID_TOKEN, 401), **dict.fromkeys(CUSTODIANS, 403), "research_a": own,
            "research_a_on_b": own if on_b is None else on_b, "aggregate_only": aggregate_only,
            "research_narrowed": narrowed}


def portal(signed_out: int, patient: int) -> Row:
    """A portal page: a bearer token is ignored (every caller without a session is `signed_out`)."""
    return {**dict.fromkeys(CALLERS, signed_out), "patient": patient}


#: A portal page for signed-in patients: without a session a GET is sent to the sign-in page.
SIGNED_IN_PAGE = portal(302, 200)
#: A portal form for signed-in patients: without a session nothing is changed (401 page).
SIGNED_IN_FORM = portal(401, 303)

RULES: dict[str, Row | dict[str, Row]] = {
    # Public: discovery, liveness, the token endpoint (it authenticates the client itself: a
    # request without client credentials is a 400 OAuth error whatever bearer token it carries).
    "health.healthz": everyone(200),
    # Relayed by the proxy (as every cell's request is for it): only the metrics token opens it, no
    # API token or session does (a direct connection from the host is tests/test_metrics.py's).
    "metrics.scrape": everyone(401),
    "auth.token": everyone(400),
    "auth.smart_configuration": everyone(200),
    "custodian.metadata": everyone(200),
    "research.metadata": everyone(200),
    "operation_definitions.operation_definition_view": everyone(200),
    "openapi.spec": everyone(200),
    "openapi.docs": everyone(200),
    "openapi.docs_initializer": everyone(200),
    "openapi.docs_static": everyone(200),
    # The custodian API: the narrowed token may read and search Patients, nothing else.
    "custodian.search_type": custodian_api(200, 200),
    "custodian.read": custodian_api(200, 200),
    "custodian.vread": custodian_api(200, 200),
    "custodian.history": custodian_api(200, 200),
    "custodian.create": custodian_api(201, 403),
    "custodian.update": custodian_api(200, 403),
    "custodian.delete": custodian_api(204, 403),
    "custodian.conditional_update": custodian_api(400, 403),  # no search on the URL: refused, changes nothing
    "custodian.conditional_delete": custodian_api(400, 403),  # likewise
    "custodian.patch_instance": custodian_api(200, 403),  # a JSON Patch `test` of the id
    "custodian.conditional_patch": custodian_api(400, 403),  # no search on the URL
    "custodian.history_type": custodian_api(200, 200),
    "custodian.history_system": custodian_api(200, 403),  # every type: the narrowed token has Patient only
    "custodian.patient_everything": custodian_api(200, 403),
    "custodian.bundle": custodian_api(200, 200),  # a batch reading one Patient
    "custodian.audit_event_search": custodian_api(200, 403),  # the narrowed token has no AuditEvent scope
    "custodian.audit_event_read": custodian_api(200, 403),
    "custodian.audit_event_write": custodian_api(405, 405),  # the audit trail is read-only: reaches nothing
    "custodian_operations.budget_status": custodian_api(200, 403),
    "custodian_operations.budget_raise": custodian_api(200, 403),
    "custodian_operations.consent_explain": custodian_api(200, 403),
    "custodian_operations.score": custodian_api(400, 403),  # a model never imported: refused, writes nothing
    # The research API. A's search on B's data asks for B's pseudonym by _id and finds nothing.
    "research.search_type": research_api(200),
    "research.read": research_api(200, on_b=404, narrowed=200),
    "research.vread": research_api(200, on_b=404, narrowed=200),
    "research.read_only": research_api(405, aggregate_only=405, narrowed=405),  # reaches nothing
    "research.aggregate_operation": research_api(200, aggregate_only=200),
    "research.train_operation": research_api(200, aggregate_only=200),
    # A client's own project's budget (no project in the URL: B's is out of reach); any scope.
    "research.budget_operation": research_api(200, aggregate_only=200, narrowed=200),
    "research.export_system": research_api(202),
    "research.export_patients": research_api(202),
    "research.export_group": research_api(202, on_b=404),
    "research.export_status": research_api(200, on_b=404),
    "research.export_cancel": research_api(202, on_b=404),
    "research.export_file": research_api(200, on_b=404),
    # The patient portal: sessions, never bearer tokens. A form posted without a session or
    # form cookie carries no valid CSRF token (400); the patient's own sign-in and invitation
    # forms are refused for the empty passphrase they carry (400).
    "consent_web.home": SIGNED_IN_PAGE,
    "consent_web.project": SIGNED_IN_PAGE,
    "consent_web.research_wide": SIGNED_IN_PAGE,
    "consent_web.sensitive": SIGNED_IN_PAGE,
    "consent_web.receipt": SIGNED_IN_PAGE,
    "consent_web.history": SIGNED_IN_PAGE,
    "consent_web.download": SIGNED_IN_PAGE,
    "consent_web.received": SIGNED_IN_PAGE,
    "consent_web.confirm": portal(401, 200),
    "consent_web.save": SIGNED_IN_FORM,
    "consent_web.signout": SIGNED_IN_FORM,
    "consent_web.signout_everywhere": SIGNED_IN_FORM,
    "consent_web.signin": {"GET": portal(200, 302), "POST": portal(400, 400)},
    "consent_web.invite": {"GET": everyone(200), "POST": portal(400, 400)},
    "consent_web.signed_out": everyone(200),
    "consent_web.static": everyone(200),
}


def expected(endpoint: str, method: str) -> Row | None:
    """The row of `RULES` for one route and method (HEAD as GET); None when there is none."""
    rule = RULES.get(endpoint)
    if rule is None or all(caller in rule for caller in CALLERS):
        return rule  # type: ignore[return-value]
    return rule.get("GET" if method == "HEAD" else method)  # type: ignore[return-value]


# -- the routes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    rule: Rule
    method: str

    @property
    def endpoint(self) -> str:
        return self.rule.endpoint

    @property
    def in_portal(self) -> bool:
        return self.rule.rule == PORTAL or self.rule.rule.startswith(PORTAL + "/")

    def __str__(self) -> str:
        return f"{self.method} {self.rule.rule} ({self.endpoint})"


def routes(app: Flask) -> list[Route]:
    """Every rule of the app with each method it takes (OPTIONS, Flask's own, left out)."""
    return [Route(rule, method) for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule)
            for method in sorted(rule.methods - {"OPTIONS"})]


#: A URL variable: `<name>`, `<converter:name>` or `<any('a', 'b'):name>` (whose sample is its first choice).
_VARIABLE = re.compile(r"<(?:(\w+)(?:\(([^)]*)\))?:)?(\w+)>")


# -- the world ---------------------------------------------------------------------------------


@dataclass
class Stage:
    """The app on one backend, its world, the callers' credentials and the samples their URLs name."""

    app: Flask
    client: FlaskClient
    world: World
    worker: Worker
    headers: dict[str, dict[str, str]]
    portal_patient: str
    #: URL variables and query by data view ("own": project A's, and real ids; "b": project B's).
    samples: dict[str, dict[str, str]]
    #: B's data and B's project id: neither may appear in an answer to a research token.
    b_only: tuple[bytes, ...]


def _client(stage_app: Flask, client: FlaskClient, role: str, project_id: str | None = None,
            scope: str | None = None) -> tuple[str, str]:
    """Register a client and get a token from the real token endpoint: (client id, token)."""
    with stage_app.app_context(), db.write() as conn:
        registered = register_client(conn, f"matrix {role}", role, project_id)
    form = {"grant_type": "client_credentials", **({"scope": scope} if scope else {})}
    response = client.post("/auth/token", data=form, auth=(registered["client_id"], registered["client_secret"]))
    assert response.status_code == 200, response.get_json()
    assert scope is None or response.get_json()["scope"] == scope
    return registered["client_id"], response.get_json()["access_token"]


def _first_id(client: FlaskClient, headers: dict[str, str], query: str) -> str:
    response = client.get(f"/research/fhir/{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["entry"][0]["resource"]["id"]


def _group(client: FlaskClient, headers: dict[str, str], app: Flask, project_id: str, member: str) -> str:
    group = create(client, headers, {"resourceType": "Group", "type": "person", "actual": True,
                                     "member": [{"entity": {"reference": f"Patient/{member}"}}]})["id"]
    result = app.test_cli_runner().invoke(args=["project", "group", "add", "--project", project_id,
                                                "--group", group])
    assert result.exit_code == 0, result.output
    return group


def _kick_off(client: FlaskClient, headers: dict[str, str]) -> str:
    response = client.get("/research/fhir/$export", headers={**headers, "Prefer": "respond-async"})
    assert response.status_code == 202, response.get_json()
    return response.headers["Content-Location"].rsplit("/", 1)[1]


def _first_file(client: FlaskClient, headers: dict[str, str], job_id: str) -> str:
    response = client.get(f"/research/fhir/_export/{job_id}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["output"][0]["url"].rsplit("/", 1)[1]


def stage_world(app: Flask) -> Stage:
    """The research world (tests/research_world.py) with completed and queued exports and a Group for
    projects A and B, a portal account, a pending invitation, and a token or session per caller."""
    client = app.test_client()
    _, custodian = _client(app, client, "custodian")
    custodian_headers = bearer(custodian)
    world = build(app, client, custodian_headers)
    worker = Worker(app)
    worker.beat()

    _, research_a = _client(app, client, "research", world.project)
    _, research_b = _client(app, client, "research", world.other_project)
    a, b = bearer(research_a), bearer(research_b)
    a_job, b_job = _kick_off(client, a), _kick_off(client, b)
    worker.work()
    samples = {
        "own": {
            "patient": world.patients["consented"], "project_id": world.project,
            "scratch": create(client, custodian_headers, {"resourceType": "Patient", "gender": "other"})["id"],
            "doomed": create(client, custodian_headers, {"resourceType": "Patient", "gender": "other"})["id"],
            "pseudonym": _first_id(client, a, "Observation?_count=1"),
            "job_id": a_job, "file_no": _first_file(client, a, a_job), "victim_job": _kick_off(client, a),
            "group_id": _group(client, custodian_headers, app, world.project, world.patients["consented"]),
        },
        "b": {
            "pseudonym": _first_id(client, b, "Observation?_count=1"),
            "job_id": b_job, "file_no": _first_file(client, b, b_job), "victim_job": _kick_off(client, b),
            "group_id": _group(client, custodian_headers, app, world.other_project,
                               world.patients["other_project"]),
        },
    }
    audit = client.get("/fhir/AuditEvent?_count=1", headers=custodian_headers)
    assert audit.status_code == 200, audit.get_json()
    samples["own"]["audit_event"] = audit.get_json()["entry"][0]["resource"]["id"]
    # The portal: a patient with a number, and an invitation waiting for another one.
    portal_patient = "matrix-portal-patient"
    patient_with_number(client, custodian_headers, portal_patient, PORTAL_NUMBER)
    assert accept(app.test_client(), invite(app, PORTAL_NUMBER)).status_code == 303  # an account, PASSPHRASE
    patient_with_number(client, custodian_headers, "matrix-invited", "MATRIX-2")
    samples["own"]["invitation"] = invite(app, "MATRIX-2").split("/consent/invite/")[1].split("?")[0]

    _, expired = _client(app, client, "custodian")
    with app.app_context(), db.write() as conn:
        conn.execute(update(access_tokens).where(access_tokens.c.token_hash == _sha256(expired))
                     .values(expires_at=db.now_us() - 1))
    disabled_id, disabled = _client(app, client, "research", world.project)
    result = app.test_cli_runner().invoke(args=["client", "disable", disabled_id])
    assert result.exit_code == 0, result.output
    headers = {
        "anonymous": {}, "patient": {}, "expired": bearer(expired), "disabled": bearer(disabled),
        "custodian": custodian_headers,
        "custodian_narrowed": bearer(_client(app, client, "custodian", scope=CUSTODIAN_NARROWED_SCOPE)[1]),
        "research_a": a, "research_a_on_b": a,
        "aggregate_only": bearer(_client(app, client, "research", world.aggregate_project)[1]),
        "research_narrowed": bearer(_client(app, client, "research", world.project,
                                            scope=RESEARCH_NARROWED_SCOPE)[1]),
    }
    b_only = (orjson.dumps(world.marker["other_project"]), world.other_project.encode())
    return Stage(app, app.test_client(use_cookies=False), world, worker, headers, portal_patient, samples, b_only)


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# -- one cell ----------------------------------------------------------------------------------


def _view(caller: str) -> str:
    return "b" if caller == "research_a_on_b" else "own"


def _variables(stage: Stage, route: Route, view: str) -> dict[str, str]:
    """The values of the route's URL variables: A's (or real) ids, or B's for `research_a_on_b`."""
    own, chosen = stage.samples["own"], stage.samples[view]
    research = route.endpoint.startswith("research.")
    resource_id = {"custodian.update": own["scratch"], "custodian.delete": own["doomed"]}.get(
        route.endpoint, own["patient"])
    return {
        "resource_type": "Observation" if research else "Patient",
        "resource_id": resource_id,
        "pseudonym": chosen["pseudonym"],
        "version": "1",
        "project_id": own["project_id"],
        "job_id": chosen["victim_job" if route.endpoint == "research.export_cancel" else "job_id"],
        "file_no": chosen["file_no"],
        "group_id": chosen["group_id"],
        "token": own["invitation"],
        "filename": "swagger-ui.css" if route.endpoint.startswith("openapi.") else "portal.css",
        "_rest": "any/path",
        "event_id": own["audit_event"],
        "patient_id": own["patient"],
    }


def _url(stage: Stage, route: Route, view: str) -> str:
    values = _variables(stage, route, view)

    def sample(match: re.Match[str]) -> str:
        converter, arguments, name = match.groups()
        return arguments.split(",")[0].strip(" '\"") if converter == "any" else values[name]
    return _VARIABLE.sub(sample, route.rule.rule)


def _request(stage: Stage, route: Route, caller: str) -> dict[str, Any]:
    """The keyword arguments of the test client's request for this cell."""
    view = _view(caller)
    own = stage.samples["own"]
    headers = dict(stage.headers[caller])
    kwargs: dict[str, Any] = {"method": route.method, "headers": headers}
    form: dict[str, str] | None = None
    if caller == "patient":
        with stage.app.app_context(), db.write() as conn:  # a session of its own: sign-out ends only it
            secret = sessions.start(conn, stage.portal_patient, None, db.now_us())
            csrf = sessions.resume(conn, secret, db.now_us())
        headers["Cookie"] = f"{sessions.COOKIE}={secret}"
        form = {sessions.CSRF_FIELD: csrf.csrf if csrf else ""}
    endpoint, method = route.endpoint, route.method
    if route.in_portal and method == "POST":
        if endpoint in ("consent_web.confirm", "consent_web.save"):
            form = {**(form or {}), "kind": "project", "project": own["project_id"], "tier": "aggregate"}
        kwargs["data"] = form or {}
    elif endpoint == "custodian.create":
        kwargs["json"] = {"resourceType": "Patient", "gender": "unknown"}
    elif endpoint == "custodian.update":
        kwargs["json"] = {"resourceType": "Patient", "id": own["scratch"], "gender": "other"}
    elif endpoint == "custodian.patch_instance":
        kwargs["json"] = [{"op": "test", "path": "/id", "value": own["patient"]}]
    elif endpoint == "custodian.bundle":
        kwargs["json"] = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": f"Patient/{own['patient']}"}}]}
    elif endpoint == "custodian_operations.budget_raise":
        kwargs["json"] = {"resourceType": "Parameters", "parameter": [{"name": "total", "valueDecimal": 50.0}]}
    elif endpoint == "custodian_operations.score":
        kwargs["json"] = {"resourceType": "Parameters", "parameter": [{"name": "model", "valueString": "none"}]}
    elif endpoint == "custodian_operations.consent_explain":
        kwargs["query_string"] = {"patient": own["patient"], "project": own["project_id"]}
    elif endpoint == "research.aggregate_operation":
        kwargs["json"] = {"resourceType": "Parameters", "parameter": [
            {"name": "measure", "valueString": "count"}, {"name": "epsilon", "valueDecimal": 0.1}]}
    elif endpoint == "research.train_operation":
        kwargs["json"] = {"resourceType": "Parameters", "parameter": [
            {"name": "model", "valueCode": "logistic-regression"}, {"name": "epsilon", "valueDecimal": 0.1},
            {"name": "feature", "part": [
                {"name": "name", "valueString": "age"}, {"name": "builtin", "valueCode": "age"},
                {"name": "lower", "valueDecimal": 0}, {"name": "upper", "valueDecimal": 100}]},
            {"name": "label", "part": [{"name": "has", "valueString": "Condition?code=http://snomed.info/sct|44054006"}]}]}
    elif endpoint.endswith(("search_type", "_search")):
        query = {"_id": stage.samples["b"]["pseudonym"]} if view == "b" else {}
        if method == "POST":
            kwargs.update(data=urlencode(query), content_type="application/x-www-form-urlencoded")
        else:
            kwargs["query_string"] = query
    elif endpoint in KICK_OFFS:
        headers["Prefer"] = "respond-async"
        stage.worker.beat()  # a kick-off needs a worker that beat lately
        if method == "POST":
            kwargs["json"] = {"resourceType": "Parameters", "parameter": [{"name": "_type",
                                                                           "valueString": "Observation"}]}
    elif endpoint == "metrics.scrape":
        headers["X-Forwarded-For"] = "203.0.113.7"
    elif method == "POST":
        kwargs["data"] = {}
    kwargs["path"] = _url(stage, route, view)
    return kwargs


KICK_OFFS = ("research.export_system", "research.export_patients", "research.export_group")


def _outcome_code(response: TestResponse) -> str | None:
    body = response.get_json(silent=True)
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return None
    return body["issue"][0]["code"]


def _problems(stage: Stage, route: Route, caller: str, response: TestResponse, status: int) -> list[str]:
    """What is wrong with one cell's answer; empty when it is right."""
    problems = []
    if response.status_code != status:
        problems.append(f"status {response.status_code}, expected {status}")
    if route.method == "HEAD":
        return problems  # no body to look at
    if route.in_portal:
        if response.mimetype not in ("text/html", "text/css", "application/fhir+json") or (
                response.mimetype == "application/fhir+json" and route.endpoint != "consent_web.download"):
            problems.append(f"a portal answer of type {response.mimetype}")
    elif route.endpoint != "auth.token" and response.status_code in (401, 403):
        code = _outcome_code(response)
        wanted = "login" if response.status_code == 401 else "forbidden"
        if code != wanted:
            problems.append(f"not an OperationOutcome '{wanted}' (code {code})")
        if response.status_code == 401 and not response.headers.get("WWW-Authenticate", "").startswith("Bearer"):
            problems.append("401 without a Bearer challenge")
    if caller in RESEARCHERS and any(value in response.data for value in stage.b_only):
        problems.append("carries project B's data")
    return problems


# -- the fixtures ------------------------------------------------------------------------------


@contextmanager
def _own_postgres_schema(pg_url: str) -> Iterator[str]:
    """A private, migrated PostgreSQL schema for this module (tests elsewhere empty the shared one)."""
    schema = f"m_{secrets.token_hex(6)}"
    admin = create_engine(admin_url(pg_url))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(admin_url(pg_url)).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stage(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    """The real app on a database of its own, and its world, built once per backend for the module."""
    from tests.conftest import PG_URL

    directory = tmp_path_factory.mktemp("matrix")
    with ExitStack() as stack:
        if request.param == "sqlite":
            target = directory / "passerelle.db"
            shutil.copyfile(request.getfixturevalue("sqlite_template"), target)
            url = f"sqlite:///{target}"
        else:
            request.getfixturevalue("pg_schema")  # skips (or fails in CI) as every PostgreSQL variant does
            url = stack.enter_context(_own_postgres_schema(PG_URL))
        app = create_stage_app(url, directory)
        stack.callback(app.extensions["passerelle.engine"].dispose)
        yield stage_world(app)


def create_stage_app(url: str, directory: Path) -> Flask:
    from service.app import create_app

    app = create_app({"TESTING": True, "DATABASE_URL": url, "INSTANCE_DIR": str(directory),
                      "MASTER_KEY_FILE": str(directory / "master.key"), "EXPORT_POLL_SECONDS": 0})
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    return app


# -- the tests ---------------------------------------------------------------------------------


def test_every_route_has_a_rule_and_every_rule_a_route(stage):
    endpoints = {route.endpoint for route in routes(stage.app)}
    assert sorted(endpoints - set(RULES)) == [], "add a rule for these endpoints to RULES"
    assert sorted(set(RULES) - endpoints) == [], "these rules name no route of the app"
    for rule in RULES.values():
        rows = [rule] if all(caller in rule for caller in CALLERS) else list(rule.values())
        assert all(set(row) == set(CALLERS) for row in rows)  # type: ignore[arg-type]


@pytest.mark.parametrize("caller", CALLERS)
def test_each_route_answers_the_caller_as_its_rule_says(stage, caller):
    wrong = []
    for route in routes(stage.app):
        row = expected(route.endpoint, route.method)
        if row is None:
            wrong.append(f"{route}: no rule in RULES")
            continue
        response = stage.client.open(**_request(stage, route, caller))
        problems = _problems(stage, route, caller, response, row[caller])
        if problems:
            wrong.append(f"{route} as {caller}: {'; '.join(problems)}: {response.get_data(as_text=True)[:200]!r}")
    assert wrong == [], "\n".join(wrong)


def test_a_head_request_with_a_sign_in_form_signs_no_one_in(stage):
    """HEAD is answered as GET: it neither bypasses the CSRF check of a POST nor counts as an attempt."""
    response = stage.client.open("/consent/signin", method="HEAD",
                                 data={"number": PORTAL_NUMBER, "passphrase": PASSPHRASE})
    assert response.status_code == 200
    assert not [c for c in response.headers.getlist("Set-Cookie") if c.startswith(f"{sessions.COOKIE}=")]


@pytest.mark.parametrize("encoding", ["application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_search_body_is_checked_for_scope_however_it_is_encoded(stage, encoding):
    """A view reads a POST `_search` form in either encoding, so the scope check reads both."""
    _, observations_only = _client(stage.app, stage.app.test_client(), "research", stage.world.project,
                                   scope="system/Observation.rs")
    response = stage.client.post("/research/fhir/Observation/_search", data={"_include": "Observation:patient"},
                                 content_type=encoding, headers=bearer(observations_only))
    assert response.status_code == 403, response.get_json()
    assert _outcome_code(response) == "forbidden"
