"""Initial catalog schema: snapshot sets and their member disks.

Revision ID: 0001
Revises:
Create Date: 2024-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "snapshot_sets",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("instance_name", sa.Text(), nullable=False),
        sa.Column("instance_uuid", sa.String(64), nullable=False),
        sa.Column("requested", sa.String(16), nullable=False),
        sa.Column("achieved", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("freeze_window_ms", sa.Float(), nullable=True),
        sa.Column("pause_window_ms", sa.Float(), nullable=True),
        sa.Column("hardware", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("backup_type", sa.String(255), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("instance_state", sa.String(16), nullable=True),
    )
    op.create_index("ix_snapshot_sets_instance_uuid", "snapshot_sets", ["instance_uuid"])
    op.create_index("ix_snapshot_sets_status", "snapshot_sets", ["status"])
    op.create_index("ix_snapshot_sets_backup_type", "snapshot_sets", ["backup_type"])
    op.create_table(
        "members",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "set_id",
            sa.String(36),
            sa.ForeignKey("snapshot_sets.id", name="fk_members_set_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("bus", sa.String(32), nullable=False),
        sa.Column("boot_order", sa.Integer(), nullable=True),
        sa.Column("virtual_size", sa.BigInteger(), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("source_path", sa.Text(), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        # Its leading set_id column also serves as the index for loading a set's members.
        sa.UniqueConstraint("set_id", "target", name="uq_members_set_id_target"),
    )


def downgrade() -> None:
    op.drop_table("members")
    op.drop_index("ix_snapshot_sets_backup_type", table_name="snapshot_sets")
    op.drop_index("ix_snapshot_sets_status", table_name="snapshot_sets")
    op.drop_index("ix_snapshot_sets_instance_uuid", table_name="snapshot_sets")
    op.drop_table("snapshot_sets")
