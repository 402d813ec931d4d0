"""audit patient sets: each distinct set of patients the audit names is stored once

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 22:00:04.649768

`audit_patients` (one row per entry and patient) becomes `patient_sets` (one row per distinct set
and patient) and the column `audit.patients`, the id of the set an entry names (NULL: none). The
existing rows are converted here, each entry naming the set of the patients it named, and
`audit_patients` is dropped. No downgrade (roll back the code, never the schema). Not online-safe:
the code before it writes and reads `audit_patients`, which is gone, so older code must stop
serving (`breaks_older_code`; deploy/README.md, "Schema migrations").
"""
import hashlib
from collections.abc import Iterator

import orjson
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None
breaks_older_code = True

#: Entries converted per batch of writes.
_BATCH = 1000


def _set_id(patients: list[str]) -> str:
    """Frozen copy of service/audit.py `set_id` as it is in this revision."""
    return hashlib.sha256(orjson.dumps(sorted(set(patients)))).hexdigest()[:32]


def _entries(conn: sa.Connection) -> Iterator[tuple[int, list[str]]]:
    """(seq, the patients it names) of every entry `audit_patients` names, streamed in seq order."""
    rows = conn.execute(sa.text("SELECT seq, patient_id FROM audit_patients ORDER BY seq, patient_id")
                        .execution_options(stream_results=True, yield_per=10_000))
    seq, patients = None, []
    for row in rows:
        if row.seq != seq and patients:
            yield seq, patients
            patients = []
        seq = row.seq
        patients.append(row.patient_id)
    if patients:
        yield seq, patients


def upgrade() -> None:
    op.create_table('patient_sets',
        sa.Column('set_id', sa.String(length=32), nullable=False),
        sa.Column('patient_id', sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint('patient_id', 'set_id', name='pk_patient_sets'),
        sqlite_with_rowid=False,
    )
    op.create_index('ix_patient_sets_set', 'patient_sets', ['set_id'], unique=False)
    op.add_column('audit', sa.Column('patients', sa.String(length=32), nullable=True))
    op.create_index('ix_audit_patients', 'audit', ['patients'], unique=False)
    conn = op.get_bind()
    store = sa.text("INSERT INTO patient_sets (set_id, patient_id) VALUES (:set_id, :patient_id)")
    name = sa.text("UPDATE audit SET patients = :set_id WHERE seq = :seq")
    stored: set[str] = set()
    members: list[dict[str, str]] = []
    entries: list[dict[str, object]] = []

    def flush() -> None:
        if members:
            conn.execute(store, members)
        if entries:
            conn.execute(name, entries)
        members.clear()
        entries.clear()

    for seq, patients in _entries(conn):
        group = _set_id(patients)
        if group not in stored:
            stored.add(group)
            members.extend({"set_id": group, "patient_id": patient} for patient in patients)
        entries.append({"set_id": group, "seq": seq})
        if len(entries) >= _BATCH:
            flush()
    flush()
    op.drop_table('audit_patients')
