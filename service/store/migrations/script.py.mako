"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Online-safe (README.md): nodes of the previous release keep serving on this schema; no downgrade
(roll back the code, never the schema). A revision that breaks older code says which:
`breaks_older_code = True` (the code before it) or an earlier revision's id (the code before that
one) (README.md, "Rolling upgrades").
"""
import sqlalchemy as sa
from alembic import op
${imports if imports else ""}
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}
breaks_older_code = False


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}

