"""Groups across hosts (issue 14 with issue 13): the barrier board of a group snapshot, two new tables.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "group_barrier_arrivals",
        sa.Column("group_set_id", sa.String(36), nullable=False),
        sa.Column("host", sa.String(64), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("arrived_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("group_set_id", "host", "phase", name="pk_group_barrier_arrivals"),
    )
    op.create_table(
        "group_barrier_aborts",
        sa.Column("group_set_id", sa.String(36), primary_key=True),
        sa.Column("host", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("aborted_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("group_barrier_aborts")
    op.drop_table("group_barrier_arrivals")
