"""worker heartbeat intervals: each export worker declares how often it beats

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 22:50:00.000000

`export_workers.beat_every_us`: the interval the worker beats at (PASSERELLE_EXPORT_HEARTBEAT_SECONDS of
its node); it counts as gone three of its own intervals after its last beat, so nodes configured
differently agree. Additive and online-safe: code before it inserts rows without the column, which
get 5 s, the interval that code beats at; it keeps judging every worker by 5 s, so it takes over the
job of a faster-beating worker later than newer code would, never earlier. No downgrade (roll back the
code, never the schema).
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None
breaks_older_code = False


def upgrade() -> None:
    op.add_column('export_workers', sa.Column('beat_every_us', sa.BigInteger(), nullable=False,
                                              server_default=sa.text('5000000')))

