"""Consistency groups and group sets (issue 14): three new tables, nothing else changes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "instance_groups",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "instance_group_members",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "group_name",
            sa.String(255),
            sa.ForeignKey("instance_groups.name", name="fk_instance_group_members_group_name", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("instance_uuid", sa.String(64), nullable=False),
        sa.Column("instance_name", sa.Text(), nullable=False),
        sa.UniqueConstraint("group_name", "instance_uuid", name="uq_instance_group_members_group_name_instance_uuid"),
    )
    op.create_index("ix_instance_group_members_group_name", "instance_group_members", ["group_name"])
    op.create_table(
        "group_sets",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("group_name", sa.String(255), nullable=False),
        sa.Column("requested", sa.String(16), nullable=False),
        sa.Column("achieved", sa.String(16), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("window_ms", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("backup_type", sa.String(255), nullable=True),
        sa.Column("instances", sa.JSON(), nullable=False),
    )
    op.create_index("ix_group_sets_group_name", "group_sets", ["group_name"])
    op.create_index("ix_group_sets_created_at", "group_sets", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_group_sets_created_at", table_name="group_sets")
    op.drop_index("ix_group_sets_group_name", table_name="group_sets")
    op.drop_table("group_sets")
    op.drop_index("ix_instance_group_members_group_name", table_name="instance_group_members")
    op.drop_table("instance_group_members")
    op.drop_table("instance_groups")
