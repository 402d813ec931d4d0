"""Baseline: the schema of release 7be16ab (legacy `schema_migrations` version 5), frozen.

Written once from that release's service/store/schema.py; never edited again (a change to the
schema is a new revision). tests/test_migrations.py proves the schema it builds, with the
revisions after it, equal to the live table definitions on SQLite and PostgreSQL.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""
import time

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the types service/store/schema.py names, as they were in this release.
PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
NORMALISED = sa.String(length=255).with_variant(sa.String(length=255, collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table("access_tokens",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("token_hash")
    )
    op.create_index("ix_access_tokens_expiry", "access_tokens", ["expires_at"], unique=False)
    op.create_table("answer_keys",
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("query_hash", sa.String(length=64), nullable=False),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "idempotency_key", name="pk_answer_keys")
    )
    op.create_table("answers",
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("query_hash", sa.String(length=64), nullable=False),
        sa.Column("data_version", sa.String(length=64), nullable=False),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "query_hash", "data_version", name="pk_answers")
    )
    op.create_table("audit",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq")
    )
    op.create_index("ix_audit_project", "audit", ["project_id", "seq"], unique=False)
    op.create_table("audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_table("audit_patients",
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("patient_id", "seq", name="pk_audit_patients")
    )
    op.create_table("audit_seals",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("mac", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq")
    )
    op.create_table("budget_questions",
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("query_hash", sa.String(length=64), nullable=False),
        sa.Column("question", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "query_hash", name="pk_budget_questions")
    )
    op.create_table("budget_spends",
        sa.Column("seq", PK, autoincrement=True, nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("epsilon_micro", sa.BigInteger(), nullable=False),
        sa.Column("delta_pico", sa.BigInteger(), nullable=False),
        sa.Column("query_hash", sa.String(length=64), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("actor", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("seq")
    )
    op.create_index("ix_budget_spends_project", "budget_spends", ["project_id", "seq"], unique=False)
    op.create_table("budgets",
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("total_micro", sa.BigInteger(), nullable=False),
        sa.Column("spent_micro", sa.BigInteger(), nullable=False),
        sa.Column("delta_total_pico", sa.BigInteger(), nullable=False),
        sa.Column("delta_spent_pico", sa.BigInteger(), nullable=False),
        sa.Column("updated", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("project_id")
    )
    op.create_table("clients",
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=True),
        sa.Column("secret_hash", sa.String(length=64), nullable=True),
        sa.Column("jwks", sa.Text(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("client_id")
    )
    op.create_table("decision_classes",
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("resource_type", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("patient_id", "project_id", "resource_type", name="pk_decision_classes")
    )
    op.create_table("decisions",
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("tier", sa.Integer(), nullable=False),
        sa.Column("excluded_mask", sa.BigInteger(), nullable=False),
        sa.Column("excluded_classes", sa.Text(), nullable=False),
        sa.Column("period_start", sa.BigInteger(), nullable=True),
        sa.Column("period_end", sa.BigInteger(), nullable=True),
        sa.Column("valid_from", sa.BigInteger(), nullable=True),
        sa.Column("valid_until", sa.BigInteger(), nullable=True),
        sa.Column("consent", sa.String(length=160), nullable=True),
        sa.Column("basis", sa.Text(), nullable=False),
        sa.Column("updated", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("patient_id", "project_id", name="pk_decisions")
    )
    op.create_index("ix_decisions_project", "decisions", ["project_id", "tier", "patient_id"], unique=False)
    op.create_index("ix_decisions_project_updated", "decisions", ["project_id", "updated"], unique=False)
    op.create_index("ix_decisions_updated", "decisions", ["updated"], unique=False)
    op.create_table("export_files",
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("file_no", sa.Integer(), nullable=False),
        sa.Column("resource_type", sa.String(length=64), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "file_no", name="pk_export_files")
    )
    op.create_table("export_jobs",
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("group_id", sa.String(length=64), nullable=True),
        sa.Column("types", sa.Text(), nullable=False),
        sa.Column("since", sa.BigInteger(), nullable=True),
        sa.Column("request", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("transaction_time", sa.BigInteger(), nullable=False),
        sa.Column("progress", sa.String(length=255), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.BigInteger(), nullable=True),
        sa.Column("last_poll", sa.BigInteger(), nullable=True),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("expires", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("job_id")
    )
    op.create_index("ix_export_jobs_state", "export_jobs", ["state", "lease_until"], unique=False)
    op.create_table("export_parts",
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("file_no", sa.Integer(), nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("lines", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("job_id", "file_no", "part", name="pk_export_parts")
    )
    op.create_table("export_workers",
        sa.Column("worker_id", sa.String(length=128), nullable=False),
        sa.Column("last_beat", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("worker_id")
    )
    op.create_table("history",
        sa.Column("resource_pk", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("last_updated", sa.BigInteger(), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("sensitive_mask", sa.BigInteger(), nullable=False),
        sa.Column("clinical_low", sa.BigInteger(), nullable=True),
        sa.Column("clinical_high", sa.BigInteger(), nullable=True),
        sa.Column("json", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("resource_pk", "version", name="pk_history")
    )
    op.create_index("ix_history_last_updated", "history", ["last_updated", "resource_pk", "version"], unique=False)
    op.create_table("idx_date",
        sa.Column("resource_pk", sa.BigInteger(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("low", sa.BigInteger(), nullable=False),
        sa.Column("high", sa.BigInteger(), nullable=False)
    )
    op.create_index("ix_date_high", "idx_date", ["param", "high", "resource_pk"], unique=False)
    op.create_index("ix_date_low", "idx_date", ["param", "low", "resource_pk"], unique=False)
    op.create_index("ix_date_resource", "idx_date", ["resource_pk", "param"], unique=False)
    op.create_table("idx_quantity",
        sa.Column("resource_pk", sa.BigInteger(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("system", sa.String(length=255), nullable=True),
        sa.Column("code", sa.String(length=64), nullable=True)
    )
    op.create_index("ix_quantity_lookup", "idx_quantity", ["param", "code", "value", "resource_pk"], unique=False)
    op.create_index("ix_quantity_resource", "idx_quantity", ["resource_pk", "param"], unique=False)
    op.create_table("idx_reference",
        sa.Column("resource_pk", sa.BigInteger(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=64), nullable=True),
        sa.Column("target_id", sa.String(length=255), nullable=False)
    )
    op.create_index("ix_reference_lookup", "idx_reference", ["param", "target_id", "target_type", "resource_pk"],
                    unique=False)
    op.create_index("ix_reference_resource", "idx_reference", ["resource_pk", "param"], unique=False)
    op.create_table("idx_string",
        sa.Column("resource_pk", sa.BigInteger(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("value", NORMALISED, nullable=False),
        sa.Column("exact", sa.String(length=255), nullable=False)
    )
    op.create_index("ix_string_lookup", "idx_string", ["param", "value", "resource_pk"], unique=False)
    op.create_index("ix_string_resource", "idx_string", ["resource_pk", "param"], unique=False)
    op.create_table("idx_token",
        sa.Column("resource_pk", sa.BigInteger(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("system", sa.String(length=255), nullable=True),
        sa.Column("code", NORMALISED, nullable=True)
    )
    op.create_index("ix_token_lookup", "idx_token", ["param", "code", "system", "resource_pk"], unique=False)
    op.create_index("ix_token_resource", "idx_token", ["resource_pk", "param"], unique=False)
    op.create_table("invitations",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("lang", sa.String(length=8), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("expires", sa.BigInteger(), nullable=False),
        sa.Column("used", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("token_hash")
    )
    op.create_index("ix_invitations_patient", "invitations", ["patient_id"], unique=False)
    op.create_table("patient_accounts",
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("number", sa.String(length=64), nullable=False),
        sa.Column("passphrase", sa.String(length=255), nullable=True),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.BigInteger(), nullable=True),
        sa.Column("updated", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("patient_id"),
        sa.UniqueConstraint("number", name="uq_patient_accounts_number")
    )
    op.create_table("project_groups",
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("attached", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "group_id", name="pk_project_groups")
    )
    op.create_table("project_keys",
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "version", name="pk_project_keys")
    )
    op.create_table("projects",
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("max_tier", sa.Integer(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("epsilon_cap", sa.Float(), nullable=False),
        sa.Column("suppression", sa.Integer(), nullable=False),
        sa.Column("types", sa.Text(), nullable=True),
        sa.Column("organization_id", sa.String(length=64), nullable=True),
        sa.Column("profile", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("plain_language", sa.Text(), nullable=True),
        sa.Column("ends", sa.String(length=10), nullable=True),
        sa.PrimaryKeyConstraint("project_id")
    )
    op.create_table("rate_limits",
        sa.Column("bucket", sa.String(length=160), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("bucket")
    )
    op.create_table("resources",
        sa.Column("pk", PK, autoincrement=True, nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("last_updated", sa.BigInteger(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("sensitive_mask", sa.BigInteger(), nullable=False),
        sa.Column("clinical_low", sa.BigInteger(), nullable=True),
        sa.Column("clinical_high", sa.BigInteger(), nullable=True),
        sa.Column("json", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("type", "id", name="uq_resources_type_id")
    )
    op.create_index("ix_resources_last_updated", "resources", ["last_updated"], unique=False)
    op.create_index("ix_resources_patient", "resources", ["patient_id", "type"], unique=False)
    op.create_index("ix_resources_type_last_updated", "resources", ["type", "last_updated"], unique=False)
    op.create_index("ix_resources_type_pk", "resources", ["type", "pk"], unique=False)
    op.create_table("schema_migrations",
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("applied", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("version")
    )
    op.create_table("settings",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name")
    )
    op.create_table("used_jti",
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("jti", sa.String(length=255), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("client_id", "jti", name="pk_used_jti")
    )
    op.create_index("ix_used_jti_expiry", "used_jti", ["expires_at"], unique=False)
    op.create_table("web_sessions",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("lang", sa.String(length=8), nullable=True),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("last_seen", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id_hash")
    )
    op.create_index("ix_web_sessions_patient", "web_sessions", ["patient_id"], unique=False)
    # The legacy record, frozen at the version this schema is, for nodes of release 7be16ab (which read it).
    op.bulk_insert(sa.table("schema_migrations", sa.column("version", sa.Integer), sa.column("applied", sa.BigInteger)),
                   [{"version": version, "applied": time.time_ns() // 1000} for version in range(1, 6)])
