"""Restored disks: which instance disks were built from which set member (delete must see dependants).

Revision ID: 0002
Revises: 0001
Create Date: 2024-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "restores",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "set_id",
            sa.String(36),
            sa.ForeignKey("snapshot_sets.id", name="fk_restores_set_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("instance_name", sa.Text(), nullable=False),
        sa.Column("instance_uuid", sa.String(64), nullable=True),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_restores_set_id", "restores", ["set_id"])


def downgrade() -> None:
    op.drop_index("ix_restores_set_id", table_name="restores")
    op.drop_table("restores")
