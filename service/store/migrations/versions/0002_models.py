"""models: the predictive models imported for `$score`

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 15:37:25.804806

No downgrade (roll back the code, never the schema). Not online-safe: the table is additive,
but the release that brings it changes what stored masks mean: the `custodian-only` bit
(policies/sensitivity.py `CUSTODIAN_ONLY`) that `init-db` gives labelled resources, and every
RiskAssessment `$score` writes, is one the code before it does not know, so its research
filter would release them. Older code must therefore stop serving
(`breaks_older_code`; deploy/README.md, "Schema migrations").
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None
breaks_older_code = True


def upgrade() -> None:
    op.create_table(
        'models',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('document', sa.Text(), nullable=False),
        sa.Column('digest', sa.String(length=64), nullable=False),
        sa.Column('imported_at', sa.BigInteger(), nullable=False),
        sa.Column('imported_by', sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )
