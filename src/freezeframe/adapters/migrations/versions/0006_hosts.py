"""Many hosts: the agents' registry, the host each job is routed to, the host holding each set's members.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("key_sha256", sa.String(64), nullable=True),
        sa.Column("uri", sa.Text(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("repository", sa.Text(), nullable=True),
        sa.Column("free_bytes", sa.BigInteger(), nullable=True),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("instances", sa.JSON(), nullable=False),
        sa.Column("agent_pid", sa.Integer(), nullable=True),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_heartbeat", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "job_routes",
        sa.Column("job_id", sa.String(36), primary_key=True),
        sa.Column("host", sa.String(64), nullable=False),
        sa.Column("queue_job_id", sa.BigInteger(), nullable=True),
    )
    op.create_index("ix_job_routes_host", "job_routes", ["host"])
    op.create_table(
        "set_hosts",
        sa.Column("set_id", sa.String(36), primary_key=True),
        sa.Column("host", sa.String(64), nullable=False),
    )
    op.create_index("ix_set_hosts_host", "set_hosts", ["host"])


def downgrade() -> None:
    op.drop_index("ix_set_hosts_host", table_name="set_hosts")
    op.drop_table("set_hosts")
    op.drop_index("ix_job_routes_host", table_name="job_routes")
    op.drop_table("job_routes")
    op.drop_table("hosts")
