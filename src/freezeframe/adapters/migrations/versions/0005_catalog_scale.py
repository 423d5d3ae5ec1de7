"""The catalog at scale: filter columns (project, kind, host), one index per filter ending in (created_at, id),
a name index for lookups, and ``set_metadata`` (one row per metadata entry) for metadata filters. Existing sets
are back-filled in batches.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from freezeframe.adapters.catalog_query import derived_columns, metadata_rows
from freezeframe.adapters.catalog_schema import SET_INDEXES, UtcDateTime

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_INDEXES = {
    "ix_snapshot_sets_instance_uuid": ["instance_uuid"],
    "ix_snapshot_sets_status": ["status"],
    "ix_snapshot_sets_backup_type": ["backup_type"],
}
BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table("snapshot_sets") as batch:
        batch.add_column(sa.Column("project", sa.String(128), nullable=True))
        batch.add_column(sa.Column("kind", sa.String(16), nullable=True))
        batch.add_column(sa.Column("host", sa.String(64), nullable=True))
    op.create_table(
        "set_metadata",
        sa.Column(
            "set_id",
            sa.String(36),
            sa.ForeignKey("snapshot_sets.id", name="fk_set_metadata_set_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("key", sa.String(130), nullable=False),
        sa.Column("value", sa.String(130), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("set_id", "key", name="pk_set_metadata"),
    )
    _backfill(op.get_bind())
    # Indexes after the back-fill: one sorted build each instead of a million random inserts.
    for name in OLD_INDEXES:
        op.drop_index(name, table_name="snapshot_sets")
    for name, columns in SET_INDEXES.items():
        op.create_index(name, "snapshot_sets", list(columns))
    op.create_index(
        "ix_set_metadata_key_value_created_at_set_id", "set_metadata", ["key", "value", "created_at", "set_id"]
    )


def _backfill(connection: sa.Connection) -> None:
    """project/kind and the metadata rows of every existing set, a keyset batch at a time."""
    sets = sa.table(
        "snapshot_sets", sa.column("id", sa.String), sa.column("metadata", sa.JSON),
        sa.column("created_at", UtcDateTime), sa.column("project", sa.String), sa.column("kind", sa.String),
    )  # fmt: skip
    members = sa.table("members", sa.column("set_id", sa.String), sa.column("metadata", sa.JSON))
    rows_table = sa.table(
        "set_metadata", sa.column("set_id", sa.String), sa.column("key", sa.String),
        sa.column("value", sa.String), sa.column("created_at", UtcDateTime),
    )  # fmt: skip
    last = ""
    while True:
        batch = connection.execute(
            sa.select(sets.c.id, sets.c.metadata, sets.c.created_at).where(sets.c.id > last).order_by(sets.c.id)
            .limit(BATCH)
        ).all()  # fmt: skip
        if not batch:
            return
        ids = [r.id for r in batch]
        member_meta: dict[str, list[Any]] = {}
        for m in connection.execute(sa.select(members.c.set_id, members.c.metadata).where(members.c.set_id.in_(ids))):
            member_meta.setdefault(m.set_id, []).append(m.metadata or {})
        new_rows, updates = [], []
        for r in batch:
            metadata = r.metadata or {}
            values = derived_columns(metadata, member_meta.get(r.id, []))
            updates.append({"b_id": r.id, "b_project": values["project"], "b_kind": values["kind"]})
            new_rows += metadata_rows(r.id, metadata, r.created_at)
        set_values = sets.update().where(sets.c.id == sa.bindparam("b_id"))
        connection.execute(set_values.values(project=sa.bindparam("b_project"), kind=sa.bindparam("b_kind")), updates)
        if new_rows:
            connection.execute(sa.insert(rows_table), new_rows)
        last = ids[-1]


def downgrade() -> None:
    op.drop_index("ix_set_metadata_key_value_created_at_set_id", table_name="set_metadata")
    op.drop_table("set_metadata")
    for name in SET_INDEXES:
        op.drop_index(name, table_name="snapshot_sets")
    for name, columns in OLD_INDEXES.items():
        op.create_index(name, "snapshot_sets", columns)
    with op.batch_alter_table("snapshot_sets") as batch:
        batch.drop_column("host")
        batch.drop_column("kind")
        batch.drop_column("project")
