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
    text,
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
    # The clinical date range (e.g. Observation.effective[x]) a consent's data period is checked against.
    Column("clinical_low", BigInteger),
    Column("clinical_high", BigInteger),
    Column("json", LargeBinary),
    UniqueConstraint("type", "id", name="uq_resources_type_id"),
    Index("ix_resources_type_pk", "type", "pk"),
    Index("ix_resources_patient", "patient_id", "type"),
    Index("ix_resources_last_updated", "last_updated"),
    # MAX(last_updated) per type versions recorded $aggregate answers (service/store/cohort.py).
    Index("ix_resources_type_last_updated", "type", "last_updated"),
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
    # What consent judges a version on, kept per version: an old version is released (or
    # not) on its own patient, sensitivity and clinical dates, never on the current one's.
    Column("sensitive_mask", BigInteger, nullable=False, default=0),
    Column("clinical_low", BigInteger),
    Column("clinical_high", BigInteger),
    Column("json", LargeBinary),
    PrimaryKeyConstraint("resource_pk", "version", name="pk_history"),
    # Type and system history read versions newest first: a page walks this index, never sorts.
    Index("ix_history_last_updated", "last_updated", "resource_pk", "version"),
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

projects = Table(
    "projects",
    metadata,
    # The id of the project's ResearchStudy resource.
    Column("project_id", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("max_tier", Integer, nullable=False),
    Column("epsilon", Float, nullable=False),
    Column("delta", Float, nullable=False, default=0.0),
    # The most ε one $aggregate query may spend, and the noisy count below which cells are suppressed.
    Column("epsilon_cap", Float, nullable=False, default=1.0),
    Column("suppression", Integer, nullable=False, default=11),
    # JSON list of resource types the project may receive; NULL means every patient-data type.
    Column("types", Text),
    Column("organization_id", ID),
    # The project's own de-identification profile (JSON text); NULL means the shipped default.
    Column("profile", Text),
    Column("status", String(16), nullable=False, default="active"),
    Column("created", BigInteger, nullable=False),
    # What patients read in the consent portal, per language: JSON {"en": {"title", "purpose",
    # "sponsor"}, "fr": {…}}; NULL shows the project's name.
    Column("plain_language", Text),
    # The last day (ISO date) the project runs, as patients are told; NULL when not set.
    Column("ends", String(10)),
)

decisions = Table(
    "decisions",
    metadata,
    Column("patient_id", ID, nullable=False),
    Column("project_id", String(64), nullable=False),
    Column("tier", Integer, nullable=False),
    Column("excluded_mask", BigInteger, nullable=False, default=0),
    Column("excluded_classes", Text, nullable=False, default=""),
    Column("period_start", BigInteger),
    Column("period_end", BigInteger),
    Column("valid_from", BigInteger),
    Column("valid_until", BigInteger),
    Column("consent", String(160)),
    Column("basis", Text, nullable=False),
    Column("updated", BigInteger, nullable=False),
    PrimaryKeyConstraint("patient_id", "project_id", name="pk_decisions"),
    Index("ix_decisions_project", "project_id", "tier", "patient_id"),
    Index("ix_decisions_updated", "updated"),
    # MAX(updated) per project versions its recorded $aggregate answers.
    Index("ix_decisions_project_updated", "project_id", "updated"),
)

#: One row per resource class a decision excludes, so research queries can filter in SQL.
decision_classes = Table(
    "decision_classes",
    metadata,
    Column("patient_id", ID, nullable=False),
    Column("project_id", String(64), nullable=False),
    Column("resource_type", String(64), nullable=False),
    PrimaryKeyConstraint("patient_id", "project_id", "resource_type", name="pk_decision_classes"),
)

project_keys = Table(
    "project_keys",
    metadata,
    Column("project_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("created", BigInteger, nullable=False),
    PrimaryKeyConstraint("project_id", "version", name="pk_project_keys"),
)

#: Append-only, hash-chained record of every release and every custodian override.
audit = Table(
    "audit",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("ts", BigInteger, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(32), nullable=False),
    Column("project_id", String(64)),
    Column("detail", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    # The set of patients the entry names (`patient_sets.set_id`), NULL when it names none. Not
    # covered by the hash chain: `hash` covers seq, ts, actor, action, project_id, detail and
    # prev_hash (service/audit.py `_digest`), not this column.
    Column("patients", String(32)),
    Index("ix_audit_project", "project_id", "seq"),
    Index("ix_audit_patients", "patients"),
)

#: The chain's head, one row: writers lock it so the chain stays linear across nodes.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

#: Which patients' data each audited release carried (what the patient form shows them), as sets:
#: each distinct set of patients stored once, under the id service/audit.py `set_id` gives it, and
#: named by every entry whose `audit.patients` is that id (research partners ask many questions of
#: one cohort). The patients an entry names are not covered by the audit's hash chain (neither the
#: set id on the entry nor these rows enter an entry's digest): whoever can write the database can
#: change them undetected, as with the per-entry rows before.
patient_sets = Table(
    "patient_sets",
    metadata,
    Column("set_id", String(32), nullable=False),
    Column("patient_id", ID, nullable=False),
    PrimaryKeyConstraint("patient_id", "set_id", name="pk_patient_sets"),
    Index("ix_patient_sets_set", "set_id"),
    sqlite_with_rowid=False,  # SQLite keeps the rows in the primary key's B-tree: one fewer to write per row
)

#: Seals of the audit chain: an HMAC, under a key derived from the master key, over the chain's
#: head at `seq` (service/audit.py). Without the key a rewritten chain cannot be sealed again.
audit_seals = Table(
    "audit_seals",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("ts", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("mac", String(64), nullable=False),
)

#: The canonical question behind each query hash of the budget history (policies/budget.py).
budget_questions = Table(
    "budget_questions",
    metadata,
    Column("project_id", String(64), nullable=False),
    Column("query_hash", String(64), nullable=False),
    Column("question", Text, nullable=False),
    PrimaryKeyConstraint("project_id", "query_hash", name="pk_budget_questions"),
)

#: Each project's privacy budget, the only truth about what it may still spend
#: (policies/budget.py). Integers avoid float drift: ε in micro-units (1e-6), δ in pico-units (1e-12).
budgets = Table(
    "budgets",
    metadata,
    Column("project_id", String(64), primary_key=True),
    Column("total_micro", BigInteger, nullable=False),
    Column("spent_micro", BigInteger, nullable=False, default=0),
    Column("delta_total_pico", BigInteger, nullable=False, default=0),
    Column("delta_spent_pico", BigInteger, nullable=False, default=0),
    Column("updated", BigInteger, nullable=False),
)

#: Append-only history of every reservation ('query') and every increase of a total ('raise').
budget_spends = Table(
    "budget_spends",
    metadata,
    Column("seq", PK, primary_key=True, autoincrement=True),
    Column("project_id", String(64), nullable=False),
    Column("ts", BigInteger, nullable=False),
    Column("kind", String(8), nullable=False),
    Column("epsilon_micro", BigInteger, nullable=False),
    Column("delta_pico", BigInteger, nullable=False, default=0),
    Column("query_hash", String(64)),
    Column("idempotency_key", String(255)),
    Column("actor", String(64)),
    Index("ix_budget_spends_project", "project_id", "seq"),
)

#: Released noisy answers: an identical query (same canonical hash, same data version)
#: gets the recorded answer and never fresh noise.
answers = Table(
    "answers",
    metadata,
    Column("project_id", String(64), nullable=False),
    Column("query_hash", String(64), nullable=False),
    Column("data_version", String(64), nullable=False),
    Column("response", Text, nullable=False),
    Column("created", BigInteger, nullable=False),
    PrimaryKeyConstraint("project_id", "query_hash", "data_version", name="pk_answers"),
)

#: Every Idempotency-Key a project used, bound to the answer it received: a retry gets it
#: again whatever changed since, whether that answer was computed or recorded earlier.
answer_keys = Table(
    "answer_keys",
    metadata,
    Column("project_id", String(64), nullable=False),
    Column("idempotency_key", String(255), nullable=False),
    Column("query_hash", String(64), nullable=False),
    Column("response", Text, nullable=False),
    Column("created", BigInteger, nullable=False),
    PrimaryKeyConstraint("project_id", "idempotency_key", name="pk_answer_keys"),
)

#: Bulk Data export jobs: every node sees every job; a worker holds a job by a lease.
export_jobs = Table(
    "export_jobs",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("project_id", String(64), nullable=False),
    Column("client_id", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("group_id", ID),
    Column("types", Text, nullable=False),
    Column("since", BigInteger),
    Column("request", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("transaction_time", BigInteger, nullable=False),
    Column("progress", String(255), nullable=False, default=""),
    Column("error", Text),
    Column("owner", String(64)),
    Column("lease_until", BigInteger),
    Column("last_poll", BigInteger),
    Column("created", BigInteger, nullable=False),
    Column("expires", BigInteger),
    Index("ix_export_jobs_state", "state", "lease_until"),
)

export_files = Table(
    "export_files",
    metadata,
    Column("job_id", String(64), nullable=False),
    Column("file_no", Integer, nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("count", Integer, nullable=False),
    PrimaryKeyConstraint("job_id", "file_no", name="pk_export_files"),
)

#: NDJSON content in parts of about a megabyte, so nodes share files through the database.
export_parts = Table(
    "export_parts",
    metadata,
    Column("job_id", String(64), nullable=False),
    Column("file_no", Integer, nullable=False),
    Column("part", Integer, nullable=False),
    Column("content", LargeBinary, nullable=False),
    # JSON [[resource pk, version, patient id], …], one per NDJSON line of `content`: what a
    # download re-judges against consent (parts written before this column are dropped on migration).
    Column("lines", Text),
    PrimaryKeyConstraint("job_id", "file_no", "part", name="pk_export_parts"),
)

#: Export workers' heartbeats: a kick-off or poll with no recent beat is told no worker runs. Each worker
#: declares how often it beats (`beat_every_us`; 5 s for rows of code that did not declare it), and counts as
#: gone three of its own intervals after its last beat, so nodes configured differently agree on it.
export_workers = Table(
    "export_workers",
    metadata,
    Column("worker_id", String(128), primary_key=True),
    Column("last_beat", BigInteger, nullable=False),
    Column("beat_every_us", BigInteger, nullable=False, server_default=text("5000000")),
)

#: The custodian's Groups a project may export (`project group add`); no other Group exists for it.
project_groups = Table(
    "project_groups",
    metadata,
    Column("project_id", String(64), nullable=False),
    Column("group_id", ID, nullable=False),
    Column("attached", BigInteger, nullable=False),
    PrimaryKeyConstraint("project_id", "group_id", name="pk_project_groups"),
)

#: A patient's sign-in to the consent portal (consent/web/accounts.py): the patient number they
#: sign in with (their medical record number when invited), the scrypt hash of their passphrase
#: (NULL until an invitation is accepted), and the lockout state.
patient_accounts = Table(
    "patient_accounts",
    metadata,
    Column("patient_id", ID, primary_key=True),
    Column("number", String(64), nullable=False),
    Column("passphrase", String(255)),
    Column("failed", Integer, nullable=False, default=0),
    Column("locked_until", BigInteger),
    Column("updated", BigInteger, nullable=False),
    UniqueConstraint("number", name="uq_patient_accounts_number"),
)

#: One-time invitation links; only the SHA-256 of the token is stored.
invitations = Table(
    "invitations",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("patient_id", ID, nullable=False),
    Column("lang", String(8), nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("expires", BigInteger, nullable=False),
    Column("used", BigInteger),
    Index("ix_invitations_patient", "patient_id"),
)

#: Server-side portal sessions, shared by every worker and node; the cookie holds a random id,
#: only its SHA-256 is stored.
web_sessions = Table(
    "web_sessions",
    metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("patient_id", ID, nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("lang", String(8)),
    Column("created", BigInteger, nullable=False),
    Column("last_seen", BigInteger, nullable=False),
    Index("ix_web_sessions_patient", "patient_id"),
)

#: Fixed-window request counters by key (service/ratelimit.py), shared by every node.
rate_limits = Table(
    "rate_limits",
    metadata,
    Column("bucket", String(160), primary_key=True),
    Column("window_start", BigInteger, nullable=False),
    Column("count", Integer, nullable=False),
)

#: Predictive models imported for `$score` (service/scoring.py): the document as released by `$train`
#: (policies/learning.py), its SHA-256, when and by whom it was imported.
models = Table(
    "models",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("document", Text, nullable=False),
    Column("digest", String(64), nullable=False),
    Column("imported_at", BigInteger, nullable=False),
    Column("imported_by", String(255), nullable=False),
)

#: Small facts about the database itself, by name (e.g. the classifier version its masks are from).
settings = Table(
    "settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

#: The schema versions of releases up to 7be16ab, which read it: frozen at version 5 (the baseline
#: revision). Alembic's `alembic_version` is the record now (service/store/migrations).
schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied", BigInteger, nullable=False),
)
