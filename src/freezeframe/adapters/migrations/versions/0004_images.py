"""Image store records: exported OVA packages kept by an image store (freezeframe.adapters.image_store).

Revision ID: 0004
Revises: 0003
Create Date: 2024-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stored_images",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("store", sa.Text(), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("source_set_id", sa.String(36), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
    )
    op.create_index("ix_stored_images_name", "stored_images", ["name"])
    op.create_index("ix_stored_images_created_at", "stored_images", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_stored_images_created_at", table_name="stored_images")
    op.drop_index("ix_stored_images_name", table_name="stored_images")
    op.drop_table("stored_images")
