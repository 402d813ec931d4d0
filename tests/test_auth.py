"""Clients, the OAuth2 token endpoint (client secrets and SMART private_key_jwt) and bearer checks."""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from click.testing import Result
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update
from werkzeug.test import TestResponse

from consent import projects
from service import db
from service.auth import ASSERTION_TYPE, Principal, register_client
from service.errors import InvalidRequest
from service.store.schema import access_tokens, clients

TOKEN_URL = "http://localhost/auth/token"
#: A fresh signing key per algorithm SMART Backend Services allows.
KEY_MAKERS: dict[str, Callable[[], Any]] = {
    "RS384": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES384": lambda: ec.generate_private_key(ec.SECP384R1()),
}

#: A custodian route that needs a token and answers 200 with one.
PROTECTED = "/fhir/Patient"


# -- helpers -----------------------------------------------------------------------------------


def run(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=list(args))


def secret_client(app: Flask, role: str = "custodian", project_id: str | None = None) -> dict[str, Any]:
    with app.app_context(), db.write() as conn:
        return register_client(conn, f"a {role}", role, project_id)


def public_jwk(private_key: Any, alg: str, kid: str = "k1") -> dict[str, Any]:
    jwk = jwt.get_algorithm_by_name(alg).to_jwk(private_key.public_key(), as_dict=True)
    return {**jwk, "kid": kid}


def jwks_client(app: Flask, *keys: dict[str, Any]) -> str:
    with app.app_context(), db.write() as conn:
        return register_client(conn, "a backend service", "custodian", jwks=json.dumps({"keys": list(keys)}))[
            "client_id"]


def assertion(private_key: Any, alg: str, client_id: str, *, kid: str | None = "k1", lifetime: int | None = 240,
              **claims: Any) -> str:
    """A signed client assertion; a claim given as None is left out."""
    exp = int(time.time()) + lifetime if lifetime is not None else None
    body = {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": exp, "jti": str(uuid.uuid4()), **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, private_key, algorithm=alg,
                      headers={"kid": kid} if kid else None)


def post_assertion(client: FlaskClient, signed: str, **form: str) -> TestResponse:
    return client.post("/auth/token", data={"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                                            "client_assertion": signed, **form})


def post_basic(client: FlaskClient, client_id: str, secret: str, **form: str) -> TestResponse:
    return client.post("/auth/token", data={"grant_type": "client_credentials", **form}, auth=(client_id, secret))


def token_for(client: FlaskClient, registered: dict[str, Any]) -> str:
    response = post_basic(client, registered["client_id"], registered["client_secret"])
    assert response.status_code == 200, response.get_json()
    return response.get_json()["access_token"]


def assert_oauth_error(response: TestResponse, status: int, error: str) -> None:
    assert response.status_code == status, response.get_json()
    assert response.mimetype == "application/json"
    assert response.get_json()["error"] == error
    assert response.get_json()["error_description"]


@pytest.fixture
def project_id(app: Flask) -> str:
    with app.app_context(), db.write() as conn:
        return projects.create(conn, name="Cohort", tier="record", epsilon=1.0).project_id


@pytest.fixture(params=sorted(KEY_MAKERS))
def signing(request: pytest.FixtureRequest, app: Flask) -> tuple[Any, str, str]:
    """(private key, algorithm, client_id) of a client registered with that key's public JWK."""
    private_key = KEY_MAKERS[request.param]()
    return private_key, request.param, jwks_client(app, public_jwk(private_key, request.param))


# -- registration ------------------------------------------------------------------------------


def test_cli_create_prints_one_json_object_with_client_id_and_secret(app):
    result = run(app, "client", "create", "--name", "EHR interface", "--role", "custodian")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["client_id"] and len(printed["client_secret"]) >= 43
    assert (printed["name"], printed["role"]) == ("EHR interface", "custodian")
    assert len(result.stdout.strip().splitlines()) == 1


def test_client_secret_is_stored_only_as_its_sha256_hash(app):
    registered = secret_client(app)
    with app.app_context(), db.read() as conn:
        row = conn.execute(select(clients).where(clients.c.client_id == registered["client_id"])).one()
    assert registered["client_secret"] not in json.dumps([str(value) for value in row])
    assert row.secret_hash == hashlib.sha256(registered["client_secret"].encode()).hexdigest()


def test_cli_create_with_a_jwks_file_issues_no_secret(app, tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(KEY_MAKERS["ES384"](), "ES384")]}))
    result = run(app, "client", "create", "--name", "backend", "--role", "custodian", "--jwks", str(path))
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert "client_secret" not in printed
    assert printed["token_endpoint_auth_method"] == "private_key_jwt"


def test_cli_create_research_client_is_bound_to_its_project(app, project_id):
    result = run(app, "client", "create", "--name", "lab", "--role", "research", "--project", project_id)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["project_id"] == project_id


@pytest.mark.parametrize("args, message", [
    (("--role", "research"), "must be bound to a project"),
    (("--role", "research", "--project", "nope"), "not known"),
    (("--role", "custodian", "--project", "nope"), "not bound to a project"),
])
def test_cli_create_refuses_a_wrong_project_binding_readably(app, args, message):
    result = run(app, "client", "create", "--name", "x", *args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_cli_create_refuses_a_project_that_is_closed(app, project_id):
    with app.app_context(), db.write() as conn:
        projects.close(conn, project_id)
    result = run(app, "client", "create", "--name", "x", "--role", "research", "--project", project_id)
    assert result.exit_code == 1 and "closed" in result.output


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ('{"keys": []}', "non-empty"),
    ('[{"kty": "RSA"}]', "non-empty"),
    ('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "only RSA and EC"),
    ('{"keys": [{"kty": "RSA", "n": "AQAB"}]}', "cannot be used"),
])
def test_cli_create_refuses_an_unusable_jwks_readably(app, tmp_path, content, message):
    path = tmp_path / "jwks.json"
    path.write_text(content)
    result = run(app, "client", "create", "--name", "x", "--role", "custodian", "--jwks", str(path))
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_a_jwks_with_private_key_material_is_refused(app):
    private = jwt.get_algorithm_by_name("ES384").to_jwk(KEY_MAKERS["ES384"](), as_dict=True)
    with pytest.raises(InvalidRequest, match="private key material"), app.app_context(), db.write() as conn:
        register_client(conn, "x", "custodian", jwks=json.dumps({"keys": [private]}))


@pytest.mark.parametrize("make_key, alg", [
    (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), "RS256"),
])
def test_a_key_too_weak_or_on_the_wrong_curve_for_rs384_es384_is_refused(app, make_key, alg):
    jwk = jwt.get_algorithm_by_name(alg).to_jwk(make_key().public_key(), as_dict=True)
    with pytest.raises(InvalidRequest), app.app_context(), db.write() as conn:
        register_client(conn, "x", "custodian", jwks=json.dumps({"keys": [jwk]}))


def test_cli_list_prints_each_client_without_its_secret(app):
    registered = secret_client(app)
    result = run(app, "client", "list")
    assert result.exit_code == 0, result.output
    listed = [json.loads(line) for line in result.stdout.splitlines()]
    assert [c["client_id"] for c in listed] == [registered["client_id"]]
    assert registered["client_secret"] not in result.stdout and "client_secret" not in listed[0]


def test_cli_disable_of_an_unknown_client_is_a_readable_error(app):
    result = run(app, "client", "disable", "nobody")
    assert result.exit_code == 1 and "not known" in result.output


# -- the token endpoint: client secrets ---------------------------------------------------------


def test_basic_auth_issues_an_uncacheable_bearer_token(app, client):
    registered = secret_client(app)
    response = post_basic(client, registered["client_id"], registered["client_secret"])
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "bearer" and len(body["access_token"]) >= 43
    assert body["scope"] == "system/*.cruds"
    assert response.headers["Cache-Control"] == "no-store" and response.headers["Pragma"] == "no-cache"


def test_token_is_stored_only_as_its_hash_and_lives_at_most_300_seconds(app, client):
    registered = secret_client(app)
    body = post_basic(client, registered["client_id"], registered["client_secret"]).get_json()
    assert 0 < body["expires_in"] <= 300
    with app.app_context(), db.read() as conn:
        row = conn.execute(select(access_tokens)).one()
    assert row.token_hash == hashlib.sha256(body["access_token"].encode()).hexdigest()
    assert row.expires_at - db.now_us() <= 300 * 1_000_000


def test_client_secret_post_form_fields_are_accepted(app, client):
    registered = secret_client(app)
    response = client.post("/auth/token", data={"grant_type": "client_credentials", **registered})
    assert response.status_code == 200, response.get_json()


def test_wrong_secret_is_invalid_client_with_a_basic_challenge(app, client):
    registered = secret_client(app)
    response = post_basic(client, registered["client_id"], "not-the-secret")
    assert_oauth_error(response, 401, "invalid_client")
    assert response.headers["WWW-Authenticate"].startswith("Basic")


def test_unknown_client_gets_the_same_answer_as_a_wrong_secret(client):
    response = post_basic(client, "no-such-client", "whatever")
    assert_oauth_error(response, 401, "invalid_client")
    assert response.get_json()["error_description"] == "client authentication failed"


def test_no_credentials_at_all_is_invalid_client(client):
    assert_oauth_error(client.post("/auth/token", data={"grant_type": "client_credentials"}), 401, "invalid_client")


def test_unknown_grant_type_is_unsupported_grant_type(app, client):
    registered = secret_client(app)
    response = post_basic(client, registered["client_id"], registered["client_secret"], grant_type="password")
    assert_oauth_error(response, 400, "unsupported_grant_type")


def test_missing_grant_type_is_invalid_request(app, client):
    registered = secret_client(app)
    response = client.post("/auth/token", data={}, auth=(registered["client_id"], registered["client_secret"]))
    assert_oauth_error(response, 400, "invalid_request")


def test_disabled_client_gets_invalid_client(app, client):
    registered = secret_client(app)
    assert run(app, "client", "disable", registered["client_id"]).exit_code == 0
    response = post_basic(client, registered["client_id"], registered["client_secret"])
    assert_oauth_error(response, 401, "invalid_client")


def test_research_client_of_a_closed_project_gets_no_token(app, client, project_id):
    registered = secret_client(app, "research", project_id)
    with app.app_context(), db.write() as conn:
        projects.close(conn, project_id)
    response = post_basic(client, registered["client_id"], registered["client_secret"])
    assert_oauth_error(response, 400, "unauthorized_client")
    assert "closed" in response.get_json()["error_description"]


def test_closed_project_is_not_revealed_to_a_caller_without_the_secret(app, client, project_id):
    registered = secret_client(app, "research", project_id)
    with app.app_context(), db.write() as conn:
        projects.close(conn, project_id)
    response = post_basic(client, registered["client_id"], "not-the-secret")
    assert_oauth_error(response, 401, "invalid_client")
    assert response.get_json()["error_description"] == "client authentication failed"


# -- the token endpoint: SMART private_key_jwt ------------------------------------------------


def test_private_key_jwt_assertion_earns_a_token(client, signing):
    private_key, alg, client_id = signing
    response = post_assertion(client, assertion(private_key, alg, client_id))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["token_type"] == "bearer"


def test_assertion_without_kid_is_verified_against_the_registered_keys(app, client):
    private_key = KEY_MAKERS["ES384"]()
    other = KEY_MAKERS["ES384"]()
    client_id = jwks_client(app, public_jwk(other, "ES384", "k0"), public_jwk(private_key, "ES384", "k1"))
    response = post_assertion(client, assertion(private_key, "ES384", client_id, kid=None))
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize("claims, reason", [
    ({"aud": "https://elsewhere.example/auth/token"}, "audience"),
    ({"lifetime": 600}, "5 minutes"),
    ({"lifetime": -10}, "expired"),
    ({"jti": None}, "jti"),
    ({"lifetime": None}, "exp"),
], ids=["wrong-aud", "exp-too-far", "expired", "no-jti", "no-exp"])
def test_assertion_with_bad_claims_is_invalid_client(client, signing, claims, reason):
    private_key, alg, client_id = signing
    response = post_assertion(client, assertion(private_key, alg, client_id, **claims))
    assert_oauth_error(response, 401, "invalid_client")
    assert reason in response.get_json()["error_description"].lower()


def test_assertion_whose_sub_differs_from_iss_is_invalid_client(client, signing):
    private_key, alg, client_id = signing
    response = post_assertion(client, assertion(private_key, alg, client_id, sub="someone-else"))
    assert_oauth_error(response, 401, "invalid_client")


def test_replayed_assertion_jti_is_refused(client, signing):
    private_key, alg, client_id = signing
    signed = assertion(private_key, alg, client_id)
    assert post_assertion(client, signed).status_code == 200
    replay = post_assertion(client, signed)
    assert_oauth_error(replay, 401, "invalid_client")
    assert "already used" in replay.get_json()["error_description"]


def test_assertion_signed_by_an_unregistered_key_is_refused(client, signing):
    _, alg, client_id = signing
    response = post_assertion(client, assertion(KEY_MAKERS[alg](), alg, client_id))
    assert_oauth_error(response, 401, "invalid_client")


def test_assertion_naming_an_unregistered_kid_is_refused(client, signing):
    private_key, alg, client_id = signing
    response = post_assertion(client, assertion(private_key, alg, client_id, kid="unknown"))
    assert_oauth_error(response, 401, "invalid_client")


def test_hs256_assertion_is_refused(client, signing):
    _, _, client_id = signing
    signed = assertion(b"x" * 64, "HS256", client_id)
    assert_oauth_error(post_assertion(client, signed), 401, "invalid_client")


def test_unsigned_alg_none_assertion_is_refused(client, signing):
    _, _, client_id = signing
    signed = assertion(None, "none", client_id)
    assert_oauth_error(post_assertion(client, signed), 401, "invalid_client")


def test_secret_client_cannot_authenticate_with_an_assertion(app, client):
    registered = secret_client(app)
    signed = assertion(KEY_MAKERS["ES384"](), "ES384", registered["client_id"])
    assert_oauth_error(post_assertion(client, signed), 401, "invalid_client")


def test_wrong_client_assertion_type_is_invalid_request(client, signing):
    private_key, alg, client_id = signing
    response = post_assertion(client, assertion(private_key, alg, client_id), client_assertion_type="saml")
    assert_oauth_error(response, 400, "invalid_request")


# -- scopes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("role, requested, granted", [
    ("custodian", "system/*.rs", "system/*.rs"),
    ("custodian", "system/Patient.cruds system/Observation.r", "system/Patient.cruds system/Observation.r"),
    ("custodian", "system/*.*", "system/*.cruds"),
    ("custodian", "system/*.read system/*.write", "system/*.rs system/*.cud"),
    ("research", "system/Observation.rs", "system/Observation.rs"),
    ("research", "system/*.read", "system/*.rs"),
])
def test_requested_scope_within_the_role_allowance_is_granted(app, client, project_id, role, requested, granted):
    registered = secret_client(app, role, project_id if role == "research" else None)
    response = post_basic(client, registered["client_id"], registered["client_secret"], scope=requested)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["scope"] == granted


@pytest.mark.parametrize("role, requested", [
    ("research", "system/*.cruds"),
    ("research", "system/*.write"),
    ("research", "system/Observation.rs system/Patient.d"),
    ("custodian", "patient/*.rs"),
    ("custodian", "system/*.sr"),
    ("custodian", "openid"),
])
def test_requested_scope_outside_the_role_allowance_is_invalid_scope(app, client, project_id, role, requested):
    registered = secret_client(app, role, project_id if role == "research" else None)
    response = post_basic(client, registered["client_id"], registered["client_secret"], scope=requested)
    assert_oauth_error(response, 400, "invalid_scope")


def test_without_a_scope_request_the_role_full_scope_is_granted(app, client, project_id):
    registered = secret_client(app, "research", project_id)
    response = post_basic(client, registered["client_id"], registered["client_secret"])
    assert response.get_json()["scope"] == "system/*.rs"


def test_principal_permits_only_what_its_scopes_grant():
    principal = Principal("c", "research", "p", ("system/Observation.rs", "system/*.s"))
    assert principal.permits("Observation", "r") and principal.permits("Patient", "s")
    assert not principal.permits("Patient", "r") and not principal.permits("Observation", "c")


# -- discovery ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration",
                                  "/research/fhir/.well-known/smart-configuration"])
def test_smart_configuration_advertises_backend_services_without_auth(client, path):
    response = client.get(path)
    assert response.status_code == 200
    config = response.get_json()
    assert config["token_endpoint"] == TOKEN_URL
    assert config["grant_types_supported"] == ["client_credentials"]
    assert config["token_endpoint_auth_methods_supported"] == ["private_key_jwt", "client_secret_basic"]
    assert config["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert {"system/*.cruds", "system/*.rs"} <= set(config["scopes_supported"])
    assert {"client-confidential-asymmetric", "client-confidential-symmetric", "permission-v2"} <= set(
        config["capabilities"])


# -- bearer tokens on the API ------------------------------------------------------------------


def test_request_without_a_token_is_401_operation_outcome(client):
    response = client.get(PROTECTED)
    assert response.status_code == 401
    assert response.get_json()["resourceType"] == "OperationOutcome"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", ["Bearer not-a-real-token", "Basic dXNlcjpwYXNz", "Bearer "])
def test_request_with_a_garbage_or_non_bearer_token_is_401(client, header):
    response = client.get(PROTECTED, headers={"Authorization": header})
    assert response.status_code == 401
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_research_token_on_a_custodian_route_is_403(app, client, project_id):
    value = token_for(client, secret_client(app, "research", project_id))
    response = client.get(PROTECTED, headers={"Authorization": f"Bearer {value}"})
    assert response.status_code == 403
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_custodian_token_is_accepted_on_the_custodian_api(app, client):
    value = token_for(client, secret_client(app))
    assert client.get(PROTECTED, headers={"Authorization": f"Bearer {value}"}).status_code == 200


def test_expired_token_is_401(app, client):
    value = token_for(client, secret_client(app))
    with app.app_context(), db.write() as conn:
        conn.execute(update(access_tokens).values(expires_at=db.now_us() - 1))
    assert client.get(PROTECTED, headers={"Authorization": f"Bearer {value}"}).status_code == 401


def test_token_of_a_client_disabled_since_is_401(app, client):
    registered = secret_client(app)
    value = token_for(client, registered)
    assert run(app, "client", "disable", registered["client_id"]).exit_code == 0
    response = client.get(PROTECTED, headers={"Authorization": f"Bearer {value}"})
    assert response.status_code == 401
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_token_of_a_research_client_whose_project_was_closed_since_is_401(app, client, project_id):
    value = token_for(client, secret_client(app, "research", project_id))
    with app.app_context(), db.write() as conn:
        projects.close(conn, project_id)
    response = client.get("/research/fhir/Observation", headers={"Authorization": f"Bearer {value}"})
    assert response.status_code == 401
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_conftest_custodian_headers_carry_a_working_token(client, custodian_headers):
    assert client.get(PROTECTED, headers=custodian_headers).status_code == 200


def test_issuing_a_token_purges_expired_tokens(app, client):
    registered = secret_client(app)
    token_for(client, registered)
    with app.app_context(), db.write() as conn:
        conn.execute(update(access_tokens).values(expires_at=db.now_us() - 1))
    token_for(client, registered)
    with app.app_context(), db.read() as conn:
        assert len(conn.execute(select(access_tokens)).all()) == 1
