"""Clients, the OAuth2 token endpoint and bearer-token checks.

Registered clients get short-lived opaque bearer tokens with the OAuth2
`client_credentials` grant, authenticating either with a secret (`client_secret_basic`)
or, as SMART Backend Services asks, with a JWT signed by a key from their registered
JWKS (`private_key_jwt`, RS384/ES384). Tokens, used assertion ids and clients all live
in the database, so any node can issue or check any token. Secrets and tokens are
stored only as SHA-256 hashes: both are 256-bit random values, so a slow password hash
would add nothing.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import jwt
from flask import Blueprint, Response, current_app, g, jsonify, request
from sqlalchemy import Connection, delete, insert, select
from sqlalchemy.exc import IntegrityError

from service import db
from service.api.fhirjson import base_url
from service.errors import Forbidden, InvalidRequest, Unauthorized
from service.store.schema import access_tokens, clients, used_jti

bp = Blueprint("auth", __name__)

ROLES = ("custodian", "research")
#: SMART v2 system scopes each role may hold; v1 spellings are accepted and mapped.
ALLOWED_SCOPES = {"custodian": ("system/*.cruds",), "research": ("system/*.rs",)}
_V1_SCOPES = {"system/*.*": "system/*.cruds", "system/*.read": "system/*.rs", "system/*.write": "system/*.cud"}
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS = ("RS384", "ES384")
MAX_ASSERTION_LIFETIME = 300


@dataclass(frozen=True)
class Principal:
    """Who is calling: the client behind a valid bearer token."""

    client_id: str
    role: str
    project_id: str | None
    scopes: tuple[str, ...]


class OAuthError(Exception):
    """An RFC 6749 §5.2 error, answered as OAuth JSON (this endpoint is OAuth, not FHIR)."""

    def __init__(self, error: str, description: str, status: int = 400):
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


@bp.errorhandler(OAuthError)
def _oauth_error(exc: OAuthError) -> Response:
    response = jsonify(error=exc.error, error_description=exc.description)
    response.status_code = exc.status
    response.headers["Cache-Control"] = "no-store"
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'Basic realm="passerelle"'
    return response


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# -- registration ------------------------------------------------------------------------------


def parse_jwks(text: str) -> dict[str, Any]:
    """Check a JWKS holds public RS384/ES384-capable keys and no private key material."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"the JWKS is not valid JSON: {exc}") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not keys:
        raise InvalidRequest('a JWKS is an object with a non-empty "keys" list')
    for i, key in enumerate(keys):
        if not isinstance(key, dict) or key.get("kty") not in ("RSA", "EC"):
            raise InvalidRequest(f"JWKS key {i}: only RSA and EC keys are supported")
        if "d" in key:
            raise InvalidRequest(f"JWKS key {i} holds private key material: register the public key only")
        try:
            jwt.PyJWK(key, algorithm="RS384" if key["kty"] == "RSA" else "ES384")
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError) as exc:
            raise InvalidRequest(f"JWKS key {i} cannot be used: {exc}") from None
    return data


def register_client(conn: Connection, name: str, role: str, project_id: str | None = None,
                    jwks: str | None = None) -> dict[str, Any]:
    """Store a client; returns its description, with a `client_secret` (shown once) when it has no JWKS."""
    if role not in ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(ROLES)}")
    if role == "research" and not project_id:
        raise InvalidRequest("a research client must be bound to a project (--project)")
    if role == "custodian" and project_id:
        raise InvalidRequest("a custodian client is not bound to a project")
    if not name.strip():
        raise InvalidRequest("a client needs a name")
    keys = json.dumps(parse_jwks(jwks)) if jwks is not None else None
    client_id = str(uuid.uuid4())
    secret = None if keys else secrets.token_urlsafe(32)
    conn.execute(insert(clients).values(client_id=client_id, name=name, role=role, project_id=project_id,
                                        secret_hash=_hash(secret) if secret else None, jwks=keys, active=True,
                                        created=db.now_us()))
    described: dict[str, Any] = {"client_id": client_id, "name": name, "role": role}
    if project_id:
        described["project_id"] = project_id
    if secret:
        described["client_secret"] = secret
    else:
        described["token_endpoint_auth_method"] = "private_key_jwt"
    return described


# -- the token endpoint ----------------------------------------------------------------------


def token_endpoint_url() -> str:
    return f"{base_url()}/auth/token"


def _client(conn: Connection, client_id: str) -> Any:
    row = conn.execute(select(clients).where(clients.c.client_id == client_id)).first()
    if row is None or not row.active:
        raise OAuthError("invalid_client", "unknown or disabled client", 401)
    return row


def _basic_client(conn: Connection) -> Any:
    header = request.headers.get("Authorization", "")
    if header.startswith("Basic "):
        try:
            decoded = base64.b64decode(header[6:], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise OAuthError("invalid_client", "malformed Basic credentials", 401) from None
        client_id, sep, secret = decoded.partition(":")
        client_id, secret = unquote(client_id), unquote(secret)
        if not sep:
            raise OAuthError("invalid_client", "malformed Basic credentials", 401)
    else:
        client_id, secret = request.form.get("client_id", ""), request.form.get("client_secret", "")
    row = _client(conn, client_id)
    if not row.secret_hash or not hmac.compare_digest(row.secret_hash, _hash(secret)):
        raise OAuthError("invalid_client", "client authentication failed", 401)
    return row


def _assertion_client(conn: Connection) -> Any:
    if request.form.get("client_assertion_type") != ASSERTION_TYPE:
        raise OAuthError("invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}")
    assertion = request.form.get("client_assertion", "")
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise OAuthError("invalid_client", "client_assertion is not a JWT", 401) from None
    client_id = claims.get("iss")
    if not isinstance(client_id, str) or claims.get("sub") != client_id:
        raise OAuthError("invalid_client", "iss and sub must both be the client_id", 401)
    row = _client(conn, client_id)
    if not row.jwks:
        raise OAuthError("invalid_client", "this client has no registered JWKS", 401)
    if header.get("alg") not in ALGORITHMS:
        raise OAuthError("invalid_client", f"assertions must be signed with {' or '.join(ALGORITHMS)}", 401)
    key = _signing_key(json.loads(row.jwks), header)
    try:
        verified = jwt.decode(assertion, key, algorithms=list(ALGORITHMS), audience=token_endpoint_url(),
                              options={"require": ["exp", "jti", "iss", "sub", "aud"]})
    except jwt.PyJWTError as exc:
        raise OAuthError("invalid_client", f"client_assertion rejected: {exc}", 401) from None
    now = db.now_us() // 1_000_000
    if verified["exp"] > now + MAX_ASSERTION_LIFETIME:
        raise OAuthError("invalid_client", "client_assertion exp is more than 5 minutes ahead", 401)
    try:
        with conn.begin_nested():
            conn.execute(insert(used_jti).values(client_id=client_id, jti=str(verified["jti"])[:255],
                                                 expires_at=verified["exp"] * 1_000_000))
    except IntegrityError:
        raise OAuthError("invalid_client", "client_assertion jti was already used", 401) from None
    return row


def _signing_key(jwks: dict[str, Any], header: dict[str, Any]) -> Any:
    candidates = [k for k in jwks["keys"] if header.get("kid") in (None, k.get("kid"))]
    for key in candidates:
        try:
            return jwt.PyJWK(key, algorithm=header["alg"]).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError):
            continue
    raise OAuthError("invalid_client", "no registered key matches the assertion's kid and alg", 401)


def _granted(role: str, requested: str | None) -> str:
    allowed = ALLOWED_SCOPES[role]
    if not requested:
        return " ".join(allowed)
    granted = []
    for scope in requested.split():
        scope = _V1_SCOPES.get(scope, scope)
        if not any(_within(scope, a) for a in allowed):
            raise OAuthError("invalid_scope", f"scope {scope!r} is not available to a {role} client")
        granted.append(scope)
    return " ".join(granted)


def _within(scope: str, allowed: str) -> bool:
    """`system/Observation.rs` is within `system/*.rs`; permissions must be a subset."""
    if not scope.startswith("system/") or "." not in scope:
        return False
    resource, _, perms = scope[7:].rpartition(".")
    allowed_resource, _, allowed_perms = allowed[7:].rpartition(".")
    return (allowed_resource in ("*", resource)) and bool(perms) and set(perms) <= set(allowed_perms)


@bp.post("/auth/token")
def token() -> Response:
    """OAuth2 client_credentials: a bearer token for at most TOKEN_LIFETIME seconds."""
    if request.form.get("grant_type") != "client_credentials":
        raise OAuthError("unsupported_grant_type", "only grant_type=client_credentials is supported")
    lifetime = current_app.config["TOKEN_LIFETIME"]
    with db.write() as conn:
        row = _assertion_client(conn) if "client_assertion" in request.form else _basic_client(conn)
        scope = _granted(row.role, request.form.get("scope"))
        value = secrets.token_urlsafe(32)
        now = db.now_us()
        conn.execute(delete(access_tokens).where(access_tokens.c.expires_at < now))
        conn.execute(delete(used_jti).where(used_jti.c.expires_at < now))
        conn.execute(insert(access_tokens).values(token_hash=_hash(value), client_id=row.client_id, scope=scope,
                                                  expires_at=now + lifetime * 1_000_000))
    response = jsonify(access_token=value, token_type="bearer", expires_in=lifetime, scope=scope)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


@bp.get("/.well-known/smart-configuration")
@bp.get("/fhir/.well-known/smart-configuration")
@bp.get("/research/fhir/.well-known/smart-configuration")
def smart_configuration() -> Response:
    return jsonify({
        "token_endpoint": token_endpoint_url(),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
        "token_endpoint_auth_signing_alg_values_supported": list(ALGORITHMS),
        "scopes_supported": sorted({s for scopes in ALLOWED_SCOPES.values() for s in scopes}),
        "capabilities": ["client-confidential-asymmetric", "client-confidential-symmetric", "permission-v2"],
    })


# -- bearer tokens on the API ------------------------------------------------------------------


def authenticate(role: str) -> Principal:
    """The caller behind the request's bearer token; 401 without a valid one, 403 for another role."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("A bearer token is required (POST /auth/token)")
    with db.read() as conn:
        row = conn.execute(
            select(clients.c.client_id, clients.c.role, clients.c.project_id, access_tokens.c.scope,
                   access_tokens.c.expires_at)
            .join(clients, clients.c.client_id == access_tokens.c.client_id)
            .where(access_tokens.c.token_hash == _hash(value.strip()), clients.c.active.is_(True))).first()
    if row is None or row.expires_at < db.now_us():
        raise Unauthorized("The bearer token is unknown or expired")
    if row.role != role:
        raise Forbidden(f"A {row.role} token cannot use this API")
    return Principal(row.client_id, row.role, row.project_id, tuple(row.scope.split()))


def require(role: str) -> None:
    """For a blueprint's before_request: authenticate and keep the caller on `g.principal`."""
    g.principal = authenticate(role)
