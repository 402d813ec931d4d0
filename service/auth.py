"""Clients, the OAuth2 token endpoint and bearer-token checks.

Registered clients get short-lived opaque bearer tokens with the OAuth2
`client_credentials` grant, authenticating either with a secret (`client_secret_basic`,
or `client_secret_post`) or, as SMART Backend Services asks, with a JWT signed by a key
from their registered JWKS (`private_key_jwt`, RS384/ES384). Tokens, used assertion ids
and clients all live in the database, so any node can issue or check any token. Secrets
and tokens are stored only as SHA-256 hashes: both are 256-bit random values, so a slow
password hash would add nothing. A client gets and uses tokens only while it is active
and, for a research client, while its project is open: disabling the client or closing
the project stops its tokens at once.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import jwt
from flask import Blueprint, Response, current_app, g, jsonify, request
from sqlalchemy import ColumnElement, Connection, Join, and_, delete, insert, or_, select
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from consent.projects import ProjectRecord, record_of
from service import db, keyring, limits
from service.api.fhirjson import base_url
from service.errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from service.store.schema import access_tokens, clients, projects, used_jti

bp = Blueprint("auth", __name__)

ROLES = ("custodian", "research")
#: The SMART v2 system scopes each role may hold (or any narrower scope within them).
ALLOWED_SCOPES = {"custodian": ("system/*.cruds",), "research": ("system/*.rs",)}
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: The one signing algorithm SMART Backend Services pairs with each key type.
ALGORITHM_OF_KTY = {"RSA": "RS384", "EC": "ES384"}
ALGORITHMS = tuple(ALGORITHM_OF_KTY.values())
#: SMART caps an assertion's lifetime at five minutes...
MAX_ASSERTION_LIFETIME = 300
#: ...but a client whose clock runs a few seconds ahead must not be locked out.
CLOCK_SKEW = 30

_V2_PERMISSIONS = "cruds"
_V1_PERMISSIONS = {"*": "cruds", "read": "rs", "write": "cud"}
_SCOPE_RESOURCE = re.compile(r"\*|[A-Z][A-Za-z]{0,63}")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the client behind a valid bearer token."""

    client_id: str
    role: str
    project_id: str | None
    scopes: tuple[str, ...]
    #: A research client's project and its current key version as `authenticate` read them, in the
    #: statement that checked the token; None for a custodian.
    project: ProjectRecord | None = field(default=None, compare=False, repr=False)
    key_version: int | None = field(default=None, compare=False)

    def permits(self, resource_type: str, permission: str) -> bool:
        """Whether a granted scope allows `permission` (one of c r u d s) on `resource_type`."""
        for scope in self.scopes:
            parsed = parse_scope(scope)
            if parsed and parsed[0] in ("*", resource_type) and permission in parsed[1]:
                return True
        return False


class OAuthError(Exception):
    """An RFC 6749 §5.2 error, answered as OAuth JSON (this endpoint is OAuth, not FHIR)."""

    def __init__(self, error: str, description: str, status: int = 400):
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


def _client_error(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, 401)


def _no_store(response: Response) -> Response:
    """Token responses carry credentials: no cache may keep them (RFC 6749 §5.1)."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


@bp.errorhandler(OAuthError)
def _oauth_error(exc: OAuthError) -> Response:
    response = jsonify(error=exc.error, error_description=exc.description)
    response.status_code = exc.status
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'Basic realm="passerelle"'
    return _no_store(response)


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# -- scopes ------------------------------------------------------------------------------------


def parse_scope(scope: str) -> tuple[str, str] | None:
    """`system/Observation.rs` → ("Observation", "rs"), v1 `.read`/`.write`/`.*` mapped to v2; None if invalid."""
    context, _, rest = scope.partition("/")
    resource, _, permissions = rest.rpartition(".")
    if context != "system" or not _SCOPE_RESOURCE.fullmatch(resource):
        return None
    permissions = _V1_PERMISSIONS.get(permissions, permissions)
    # SMART v2 permissions are a non-empty subset of c r u d s, written in that order.
    if not permissions or permissions != "".join(p for p in _V2_PERMISSIONS if p in permissions):
        return None
    return resource, permissions


def grant_scope(role: str, requested: str | None) -> str:
    """The scope string to grant: the role's full allowance, or the requested scopes if all fall within it."""
    if not requested or not requested.strip():
        return " ".join(ALLOWED_SCOPES[role])
    allowed = [limit for limit in map(parse_scope, ALLOWED_SCOPES[role]) if limit]
    granted: dict[str, None] = {}
    for scope in requested.split():
        parsed = parse_scope(scope)
        if parsed is None or not any(_within(parsed, limit) for limit in allowed):
            raise OAuthError("invalid_scope", f"scope {scope!r} is not available to a {role} client")
        granted[f"system/{parsed[0]}.{parsed[1]}"] = None
    return " ".join(granted)


def _within(scope: tuple[str, str], limit: tuple[str, str]) -> bool:
    return limit[0] in ("*", scope[0]) and set(scope[1]) <= set(limit[1])


# -- registration ------------------------------------------------------------------------------


def parse_jwks(text: str) -> dict[str, Any]:
    """Check a JWKS holds only public keys usable for RS384 (RSA ≥ 2048 bits) or ES384 (P-384)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"the JWKS is not valid JSON: {exc}") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not keys:
        raise InvalidRequest('a JWKS is an object with a non-empty "keys" list')
    for number, key in enumerate(keys):
        problem = _key_problem(key)
        if problem:
            raise InvalidRequest(f"JWKS key {number}: {problem}")
    return {"keys": keys}


def _key_problem(key: Any) -> str | None:
    """Why a JWK cannot be registered as a client's signing key, or None if it can."""
    if not isinstance(key, dict) or key.get("kty") not in ALGORITHM_OF_KTY:
        return "only RSA and EC keys are supported"
    if "d" in key:
        return "it holds private key material: register the public key only"
    algorithm = ALGORITHM_OF_KTY[key["kty"]]
    if key.get("alg", algorithm) != algorithm or key.get("use", "sig") != "sig":
        return f"an {key['kty']} key must be usable to sign with {algorithm}"
    try:
        jwk = jwt.PyJWK(key, algorithm=algorithm)
        jwk.Algorithm.prepare_key(jwk.key)  # refuses a curve other than P-384 for ES384
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError) as exc:
        return f"it cannot be used: {exc}"
    return jwk.Algorithm.check_key_length(jwk.key)


def _check_project(conn: Connection, role: str, project_id: str | None) -> None:
    if role == "custodian":
        if project_id:
            raise InvalidRequest("a custodian client is not bound to a project")
        return
    if not project_id:
        raise InvalidRequest("a research client must be bound to a project (--project)")
    status = conn.scalar(select(projects.c.status).where(projects.c.project_id == project_id))
    if status is None:
        raise NotFound(f"Project {project_id!r} is not known")
    if status != "active":
        raise InvalidRequest(f"Project {project_id!r} is closed")


def auth_method(has_jwks: bool) -> str:
    """How a client authenticates at the token endpoint (RFC 7591 `token_endpoint_auth_method`)."""
    return "private_key_jwt" if has_jwks else "client_secret_basic"


def register_client(conn: Connection, name: str, role: str, project_id: str | None = None,
                    jwks: str | None = None) -> dict[str, Any]:
    """Store a client; returns its description, with a `client_secret` (shown once) when it has no JWKS."""
    if role not in ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(ROLES)}")
    if not name.strip():
        raise InvalidRequest("a client needs a name")
    _check_project(conn, role, project_id)
    keys = json.dumps(parse_jwks(jwks)) if jwks is not None else None
    client_id = str(uuid.uuid4())
    secret = None if keys else secrets.token_urlsafe(32)
    conn.execute(insert(clients).values(client_id=client_id, name=name, role=role, project_id=project_id,
                                        secret_hash=_hash(secret) if secret else None, jwks=keys, active=True,
                                        created=db.now_us()))
    described: dict[str, Any] = {"client_id": client_id, "name": name, "role": role}
    if project_id:
        described["project_id"] = project_id
    described["token_endpoint_auth_method"] = auth_method(keys is not None)
    if secret:
        described["client_secret"] = secret
    return described


# -- who may act -------------------------------------------------------------------------------


def _clients_with_projects() -> Join:
    return clients.outerjoin(projects, projects.c.project_id == clients.c.project_id)


def _may_act() -> ColumnElement[bool]:
    """A client may get and use tokens while it is active and, for a research client, its project is open."""
    return and_(clients.c.active.is_(True), or_(clients.c.project_id.is_(None), projects.c.status == "active"))


def _check_may_act(conn: Connection, client_id: str) -> None:
    """After authentication: refuse a client whose project is closed (it proved who it is, so it may know)."""
    if conn.scalar(select(clients.c.client_id).select_from(_clients_with_projects())
                   .where(clients.c.client_id == client_id, _may_act())) is None:
        raise OAuthError("unauthorized_client", "this client's research project is closed: it gets no more tokens")


# -- client authentication at the token endpoint ----------------------------------------------


def token_endpoint_url() -> str:
    return f"{base_url()}/auth/token"


def _active_client(conn: Connection, client_id: str) -> Row[Any]:
    row = conn.execute(select(clients).where(clients.c.client_id == client_id)).first()
    # One answer for unknown, disabled and wrong credentials: no probing for client ids.
    if row is None or not row.active:
        raise _client_error("client authentication failed")
    return row


def _secret_client(conn: Connection) -> Row[Any]:
    """client_secret_basic (form-urlencoded id and secret, RFC 6749 §2.3.1) or client_secret_post."""
    basic = request.authorization
    if basic is not None and basic.type == "basic":
        client_id, secret = unquote(basic.username or ""), unquote(basic.password or "")
    else:
        client_id, secret = request.form.get("client_id", ""), request.form.get("client_secret", "")
    row = _active_client(conn, client_id)
    if not row.secret_hash or not hmac.compare_digest(row.secret_hash, _hash(secret)):
        raise _client_error("client authentication failed")
    return row


def _assertion_client(conn: Connection) -> Row[Any]:
    """private_key_jwt: a one-time JWT signed with a key of the client's registered JWKS."""
    if request.form.get("client_assertion_type") != ASSERTION_TYPE:
        raise OAuthError("invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}")
    assertion = request.form.get("client_assertion", "")
    try:
        header = jwt.get_unverified_header(assertion)
        # Only to learn which client's keys to verify with; nothing is trusted before verification.
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise _client_error("client_assertion is not a JWT") from None
    if header.get("alg") not in ALGORITHMS:
        raise _client_error(f"client_assertion must be signed with {' or '.join(ALGORITHMS)}")
    client_id = unverified.get("iss")
    if not isinstance(client_id, str) or unverified.get("sub") != client_id:
        raise _client_error("client_assertion iss and sub must both be the client_id")
    row = _active_client(conn, client_id)
    if not row.jwks:
        raise _client_error("this client has no registered JWKS")
    claims = _verified_claims(assertion, header, json.loads(row.jwks)["keys"])
    _consume_jti(conn, client_id, claims)
    return row


def _verified_claims(assertion: str, header: dict[str, Any], keys: list[dict[str, Any]]) -> dict[str, Any]:
    """Verify against the key named by `kid` or, without one, each registered key of the right type."""
    algorithm = header["alg"]
    candidates = [k for k in keys if ALGORITHM_OF_KTY[k["kty"]] == algorithm
                  and ("kid" not in header or k.get("kid") == header["kid"])]
    for key in candidates:
        try:
            claims = jwt.decode(assertion, jwt.PyJWK(key, algorithm=algorithm), algorithms=[algorithm],
                                audience=token_endpoint_url(),
                                options={"require": ["exp", "jti", "iss", "sub", "aud"],
                                         "enforce_minimum_key_length": True})
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError as exc:
            raise _client_error(f"client_assertion rejected: {exc}") from None
        if claims["exp"] > db.now_us() // 1_000_000 + MAX_ASSERTION_LIFETIME + CLOCK_SKEW:
            raise _client_error("client_assertion exp is more than 5 minutes ahead")
        return claims
    raise _client_error("client_assertion is not signed by a registered key")


def _consume_jti(conn: Connection, client_id: str, claims: dict[str, Any]) -> None:
    """Record the assertion id until it expires; the primary key refuses a replay, even on another node."""
    jti = claims["jti"]
    if not isinstance(jti, str) or not 0 < len(jti) <= used_jti.c.jti.type.length:
        raise _client_error("client_assertion jti must be a string of at most 255 characters")
    try:
        conn.execute(insert(used_jti).values(client_id=client_id, jti=jti, expires_at=int(claims["exp"]) * 1_000_000))
    except IntegrityError:
        # The failed insert ends the transaction; raising rolls it back.
        raise _client_error("client_assertion jti was already used") from None


def _claimed_client_id() -> str | None:
    """The client id a token request names (Basic user, `client_id`, or its assertion's unverified
    `iss`), for rate limiting only: nothing is trusted before authentication."""
    basic = request.authorization
    if basic is not None and basic.type == "basic":
        return unquote(basic.username or "") or None
    if "client_assertion" in request.form:
        try:
            issuer = jwt.decode(request.form["client_assertion"], options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError:
            return None
        return issuer if isinstance(issuer, str) else None
    return request.form.get("client_id") or None


def _authenticated_client(conn: Connection) -> Row[Any]:
    with_secret = request.authorization is not None or "client_secret" in request.form
    if "client_assertion" in request.form:
        if with_secret:
            raise OAuthError("invalid_request", "use one client authentication method, not several")
        return _assertion_client(conn)
    return _secret_client(conn)


# -- the endpoints -----------------------------------------------------------------------------


@bp.post("/auth/token")
def token() -> Response:
    """OAuth2 client_credentials: a bearer token for at most TOKEN_LIFETIME seconds."""
    grant_type = request.form.get("grant_type")
    if not grant_type:
        raise OAuthError("invalid_request", "grant_type is required (form-encoded body)")
    if grant_type != "client_credentials":
        raise OAuthError("unsupported_grant_type", "only grant_type=client_credentials is supported")
    limits.throttle_token(_claimed_client_id())
    lifetime = current_app.config["TOKEN_LIFETIME"]
    value = secrets.token_urlsafe(32)
    with db.write() as conn:
        row = _authenticated_client(conn)
        _check_may_act(conn, row.client_id)
        scope = grant_scope(row.role, request.form.get("scope"))
        now = db.now_us()
        # Expired rows are useless (an expired assertion is refused before its jti is looked at).
        conn.execute(delete(access_tokens).where(access_tokens.c.expires_at < now))
        conn.execute(delete(used_jti).where(used_jti.c.expires_at < now))
        conn.execute(insert(access_tokens).values(token_hash=_hash(value), client_id=row.client_id, scope=scope,
                                                  expires_at=now + lifetime * 1_000_000))
    return _no_store(jsonify(access_token=value, token_type="bearer", expires_in=lifetime, scope=scope))


@bp.get("/.well-known/smart-configuration")
@bp.get("/fhir/.well-known/smart-configuration")
@bp.get("/research/fhir/.well-known/smart-configuration")
def smart_configuration() -> Response:
    """SMART App Launch discovery (clients look for it relative to the FHIR base)."""
    return jsonify({
        "token_endpoint": token_endpoint_url(),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
        "token_endpoint_auth_signing_alg_values_supported": list(ALGORITHMS),
        "scopes_supported": [scope for scopes in ALLOWED_SCOPES.values() for scope in scopes],
        "capabilities": ["client-confidential-asymmetric", "client-confidential-symmetric", "permission-v2"],
    })


# -- bearer tokens on the API ------------------------------------------------------------------


def authenticate(role: str) -> Principal:
    """The caller behind the request's bearer token; 401 without a valid one (unknown, expired, or
    of a client that may no longer act: see `_may_act`), 403 for another role. A research caller's
    request is counted in the same transaction (`limits.count_research`), and refused (429) past
    its limit."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("A bearer token is required (POST /auth/token)")
    counted = None
    with db.write() if role == "research" else db.read() as conn:
        # The project's columns and key version come with the token (the outer join matches a
        # research client's project, and nothing for a custodian's).
        row = conn.execute(
            select(clients.c.client_id, clients.c.role, access_tokens.c.scope, *projects.c,
                   keyring.current_version_of(clients.c.project_id).label("key_version"))
            .select_from(_clients_with_projects().join(access_tokens,
                                                       access_tokens.c.client_id == clients.c.client_id))
            .where(access_tokens.c.token_hash == _hash(value.strip()), access_tokens.c.expires_at > db.now_us(),
                   _may_act())).first()
        if row is not None and row.role == role == "research":
            counted = limits.count_research(conn, row.client_id)
    if row is None:
        raise Unauthorized("The bearer token is unknown, expired or revoked (client disabled or project closed)")
    if row.role != role:
        raise Forbidden(f"A {row.role} token cannot use this API")
    principal = Principal(row.client_id, row.role, row.project_id, tuple(row.scope.split()),
                          record_of(row) if row.project_id else None, row.key_version)
    if counted is not None:
        g.principal = principal  # a refusal is then logged and audited as this caller's (service/audit.py)
        limits.refuse_past(counted, current_app.config["RESEARCH_RATE_LIMIT"])
    return principal
