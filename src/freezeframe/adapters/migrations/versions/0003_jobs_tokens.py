"""HTTP service state: jobs, API tokens (hashed), instance -> project mapping, owners of exported images.

Revision ID: 0003
Revises: 0002
Create Date: 2024-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("project", sa.String(128), nullable=True),
        sa.Column("lock_key", sa.String(128), nullable=False),
        sa.Column("instance_uuid", sa.String(64), nullable=True),
        sa.Column("instance_name", sa.Text(), nullable=True),
        sa.Column("set_id", sa.String(36), nullable=True),
        sa.Column("image_id", sa.String(36), nullable=True),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error_type", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("phase", sa.String(32), nullable=True),
        sa.Column("progress_done", sa.BigInteger(), nullable=False),
        sa.Column("progress_total", sa.BigInteger(), nullable=False),
        sa.Column("token_id", sa.String(32), nullable=True),
        sa.Column("server_pid", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_project", "jobs", ["project"])
    op.create_index("ix_jobs_instance_uuid", "jobs", ["instance_uuid"])
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("project", sa.String(128), nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "instance_projects",
        sa.Column("instance_uuid", sa.String(64), primary_key=True),
        sa.Column("instance_name", sa.Text(), nullable=False),
        sa.Column("project", sa.String(128), nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_instance_projects_project", "instance_projects", ["project"])
    op.create_table(
        "image_owners",
        sa.Column("image_id", sa.String(36), primary_key=True),
        sa.Column("project", sa.String(128), nullable=True),
        sa.Column("set_id", sa.String(36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_image_owners_project", "image_owners", ["project"])


def downgrade() -> None:
    op.drop_index("ix_image_owners_project", table_name="image_owners")
    op.drop_table("image_owners")
    op.drop_index("ix_instance_projects_project", table_name="instance_projects")
    op.drop_table("instance_projects")
    op.drop_table("api_tokens")
    op.drop_index("ix_jobs_created_at", table_name="jobs")
    op.drop_index("ix_jobs_instance_uuid", table_name="jobs")
    op.drop_index("ix_jobs_project", table_name="jobs")
    op.drop_index("ix_jobs_state", table_name="jobs")
    op.drop_table("jobs")
