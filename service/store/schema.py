"""The database schema (SQLAlchemy Core), identical on SQLite and PostgreSQL.

Every table that holds patient data carries `patient_id` (the patient compartment,
computed once at ingest): consent joins on it, and a distributed PostgreSQL would
shard on it. Instants are stored as integer microseconds since the Unix epoch (UTC)
so that range comparisons are exact and collation-free on both databases.
"""
from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
PK = BigInteger().with_variant(Integer(), "sqlite")
# Byte-wise ordering for index lookups (prefix ranges) regardless of the server locale.
NormalisedString = String(255).with_variant(String(255, collation="C"), "postgresql")
ID = String(64)

resources = Table(
    "resources",
    metadata,
    Column("pk", PK, primary_key=True, autoincrement=True),
    Column("type", String(64), nullable=False),
    Column("id", ID, nullable=False),
    Column("patient_id", ID),
    Column("version", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("sensitive_mask", BigInteger, nullable=False, default=0),
    Column("json", LargeBinary),
    UniqueConstraint("type", "id", name="uq_resources_type_id"),
    Index("ix_resources_type_pk", "type", "pk"),
    Index("ix_resources_patient", "patient_id", "type"),
)

history = Table(
    "history",
    metadata,
    Column("resource_pk", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
    Column("patient_id", ID),
    Column("last_updated", BigInteger, nullable=False),
    Column("method", String(8), nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("json", LargeBinary),
    PrimaryKeyConstraint("resource_pk", "version", name="pk_history"),
)

idx_token = Table(
    "idx_token",
    metadata,
    Column("resource_pk", BigInteger, nullable=False),
    Column("patient_id", ID),
    Column("param", String(64), nullable=False),
    Column("system", String(255)),
    Column("code", NormalisedString),
    Index("ix_token_lookup", "param", "code", "system", "resource_pk"),
    Index("ix_token_resource", "resource_pk", "param"),
)

idx_string = Table(
    "idx_string",
    metadata,
    Column("resource_pk", BigInteger, nullable=False),
    Column("patient_id", ID),
    Column("param", String(64), nullable=False),
    Column("value", NormalisedString, nullable=False),
    Column("exact", String(255), nullable=False),
    Index("ix_string_lookup", "param", "value", "resource_pk"),
    Index("ix_string_resource", "resource_pk", "param"),
)

idx_date = Table(
    "idx_date",
    metadata,
    Column("resource_pk", BigInteger, nullable=False),
    Column("patient_id", ID),
    Column("param", String(64), nullable=False),
    Column("low", BigInteger, nullable=False),
    Column("high", BigInteger, nullable=False),
    Index("ix_date_low", "param", "low", "resource_pk"),
    Index("ix_date_high", "param", "high", "resource_pk"),
    Index("ix_date_resource", "resource_pk", "param"),
)

idx_quantity = Table(
    "idx_quantity",
    metadata,
    Column("resource_pk", BigInteger, nullable=False),
    Column("patient_id", ID),
    Column("param", String(64), nullable=False),
    Column("value", Float, nullable=False),
    Column("system", String(255)),
    Column("code", String(64)),
    Index("ix_quantity_lookup", "param", "code", "value", "resource_pk"),
    Index("ix_quantity_resource", "resource_pk", "param"),
)

idx_reference = Table(
    "idx_reference",
    metadata,
    Column("resource_pk", BigInteger, nullable=False),
    Column("patient_id", ID),
    Column("param", String(64), nullable=False),
    Column("target_type", String(64)),
    Column("target_id", String(255), nullable=False),
    Index("ix_reference_lookup", "param", "target_id", "target_type", "resource_pk"),
    Index("ix_reference_resource", "resource_pk", "param"),
)

INDEX_TABLES = (idx_token, idx_string, idx_date, idx_quantity, idx_reference)

clients = Table(
    "clients",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("role", String(32), nullable=False),
    Column("project_id", String(64)),
    # SHA-256 of a 256-bit random secret: high entropy makes a slow KDF unnecessary.
    Column("secret_hash", String(64)),
    Column("jwks", Text),
    Column("active", Boolean, nullable=False, default=True),
    Column("created", BigInteger, nullable=False),
)

access_tokens = Table(
    "access_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("client_id", String(64), nullable=False),
    Column("scope", Text, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Index("ix_access_tokens_expiry", "expires_at"),
)

used_jti = Table(
    "used_jti",
    metadata,
    Column("client_id", String(64), nullable=False),
    Column("jti", String(255), nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("client_id", "jti", name="pk_used_jti"),
    Index("ix_used_jti_expiry", "expires_at"),
)

schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied", BigInteger, nullable=False),
)
