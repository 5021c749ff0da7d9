"""audit export cursors: the last audit row sent to each audit repository

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 14:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_export_cursors",
        sa.Column("repository", sa.String(length=300), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("repository"),
    )


def downgrade() -> None:
    op.drop_table("audit_export_cursors")
