"""The catalog's tables, one ``MetaData`` for all of them, and the schema revision they make up.

Every adapter that keeps rows in the catalog (sets, restores, jobs, tokens, project mappings, image owners,
stored images) declares its table here, so ``METADATA`` (what Alembic's environment and the model/migration test
read) holds every table without the adapters importing one another. Plain SQLAlchemy Core tables, no ORM: the
adapters read and write rows with Core statements, and ``freezeframe list`` does not pay for the ORM's import.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

SCHEMA_REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008", "0009")
"""Every Alembic revision in ``migrations/versions``, oldest first; the last is what these tables describe.
Opening a catalog at the last one needs no Alembic at all (tests check this list against the scripts)."""
SCHEMA_HEAD = SCHEMA_REVISIONS[-1]


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, whatever the backend keeps (SQLite drops the offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} cannot be stored; use an aware UTC datetime")
        value = value.astimezone(UTC)
        # Naive UTC text on SQLite sorts correctly, which list_sets' ORDER BY relies on.
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


METADATA = MetaData()
"""Every table of the catalog (what Alembic's environment and the model/migration test compare)."""


def _req(name: str, kind: Any, *args: Any, **kw: Any) -> Column[Any]:
    return Column(name, kind, *args, nullable=False, **kw)


def _opt(name: str, kind: Any, *args: Any, **kw: Any) -> Column[Any]:
    return Column(name, kind, *args, nullable=True, **kw)


SETS = Table(
    "snapshot_sets",
    METADATA,
    Column("id", String(36), primary_key=True),
    _req("name", Text),
    _req("instance_name", Text),
    _req("instance_uuid", String(64)),
    _req("requested", String(16)),
    _opt("achieved", String(16)),
    _opt("reason", Text),
    _req("status", String(16)),
    _req("created_at", UtcDateTime),
    _opt("completed_at", UtcDateTime),
    _opt("freeze_window_ms", Float),
    _opt("pause_window_ms", Float),
    _req("hardware", JSON),
    _req("metadata", JSON),
    _opt("backup_type", String(255)),
    _opt("error", Text),
    _opt("instance_state", String(16)),
    # revision 0005: filter columns derived from the set on every write (listings filter them in the database)
    _opt("project", String(128)),
    _opt("kind", String(16)),
    _opt("host", String(64)),
)
"""Every listing reads newest first by (created_at, id): each filter has an index ending in those two columns, so a
page is one index range scan whatever the catalog's size (revision 0005)."""

SET_INDEXES = {
    "ix_snapshot_sets_created_at_id": ("created_at", "id"),
    "ix_snapshot_sets_instance_uuid_created_at_id": ("instance_uuid", "created_at", "id"),
    "ix_snapshot_sets_instance_name_instance_uuid": ("instance_name", "instance_uuid"),
    "ix_snapshot_sets_name_created_at_id": ("name", "created_at", "id"),
    "ix_snapshot_sets_status_created_at_id": ("status", "created_at", "id"),
    "ix_snapshot_sets_backup_type_created_at_id": ("backup_type", "created_at", "id"),
    "ix_snapshot_sets_project_created_at_id": ("project", "created_at", "id"),
    "ix_snapshot_sets_kind_created_at_id": ("kind", "created_at", "id"),
    "ix_snapshot_sets_host_created_at_id": ("host", "created_at", "id"),
}
for _name, _columns in SET_INDEXES.items():
    Index(_name, *(SETS.c[c] for c in _columns))

MEMBERS = Table(
    "members",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _req("set_id", String(36), ForeignKey("snapshot_sets.id", name="fk_members_set_id", ondelete="CASCADE")),
    _req("target", String(64)),
    _req("bus", String(32)),
    _opt("boot_order", Integer),
    _req("virtual_size", BigInteger),
    _req("format", String(32)),
    _req("path", Text),
    _opt("source_path", Text),
    _opt("sha256", String(64)),
    _req("metadata", JSON),
    UniqueConstraint("set_id", "target", name="uq_members_set_id_target"),
)

SET_METADATA = Table(
    "set_metadata",
    METADATA,
    _req("set_id", String(36), ForeignKey("snapshot_sets.id", name="fk_set_metadata_set_id", ondelete="CASCADE")),
    _req("key", String(130)),
    _req("value", String(130)),
    _req("created_at", UtcDateTime),
    PrimaryKeyConstraint("set_id", "key", name="pk_set_metadata"),
    Index("ix_set_metadata_key_value_created_at_set_id", "key", "value", "created_at", "set_id"),
)
"""Each metadata entry of each set, for ``--meta KEY=VALUE`` (revision 0005): the set's JSON column stays what is
read; this table is its index. ``key`` and ``value`` are encoded (``catalog_query.encoded``: the text prefixed ``=``, or
``#`` and its SHA-256 past 120 characters) so index entries stay small on both databases; ``created_at`` is the
set's, so a metadata page is one ordered range scan."""

RESTORES = Table(
    "restores",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _req(
        "set_id",
        String(36),
        ForeignKey("snapshot_sets.id", name="fk_restores_set_id", ondelete="CASCADE"),
        index=True,
    ),
    _req("instance_name", Text),
    _opt("instance_uuid", String(64)),
    _req("target", String(64)),
    _req("path", Text),
    _req("mode", String(16)),
    _req("created_at", UtcDateTime),
)
"""One disk of an instance restored from a set member; copy-on-write rows make the member a dependency."""

# ---- the HTTP service (revision 0003) ----------------------------------------------------------------

JOBS = Table(
    "jobs",
    METADATA,
    Column("id", String(36), primary_key=True),
    _req("kind", String(32)),
    _req("state", String(16), index=True),
    _opt("project", String(128), index=True),
    _req("lock_key", String(128)),
    _opt("instance_uuid", String(64), index=True),
    _opt("instance_name", Text),
    _opt("set_id", String(36)),
    _opt("image_id", String(36)),
    _req("request", JSON),
    _opt("result", JSON),
    _opt("error_type", String(64)),
    _opt("error", Text),
    _opt("phase", String(32)),
    _req("progress_done", BigInteger),
    _req("progress_total", BigInteger),
    _opt("token_id", String(32)),
    _opt("server_pid", Integer),
    _req("created_at", UtcDateTime, index=True),
    _opt("started_at", UtcDateTime),
    _opt("finished_at", UtcDateTime),
)
"""Background operations of the service; finished rows are kept so clients can read the outcome later."""

TOKENS = Table(
    "api_tokens",
    METADATA,
    Column("id", String(32), primary_key=True),
    _req("secret_sha256", String(64)),
    _opt("project", String(128)),
    _req("role", String(16)),
    _opt("description", Text),
    _req("created_at", UtcDateTime),
    _opt("revoked_at", UtcDateTime),
)
"""Bearer tokens: only the SHA-256 of each secret is stored, so a leaked catalog grants nothing."""

INSTANCE_PROJECTS = Table(
    "instance_projects",
    METADATA,
    Column("instance_uuid", String(64), primary_key=True),
    _req("instance_name", Text),
    _req("project", String(128), index=True),
    _req("assigned_at", UtcDateTime),
)
"""The admin's instance -> project mapping; it wins over the project in the domain's <metadata>."""

IMAGE_OWNERS = Table(
    "image_owners",
    METADATA,
    Column("image_id", String(36), primary_key=True),
    _opt("project", String(128), index=True),
    _opt("set_id", String(36)),
    _req("created_at", UtcDateTime),
)
"""Which project an image in the image store belongs to; images outlive their sets."""

# ---- the image store (revision 0004) --------------------------------------------------------------------

STORED_IMAGES = Table(
    "stored_images",
    METADATA,
    Column("id", String(36), primary_key=True),
    _req("name", Text, index=True),
    _req("status", String(16)),
    _req("store", Text),
    _req("filename", Text),
    _opt("source_set_id", String(36)),
    _req("size", BigInteger),
    _req("sha256", String(64)),
    _req("created_at", UtcDateTime, index=True),
    _req("summary", JSON),
)
"""One package in an image store."""

REMOTES = Table(
    "remotes",
    METADATA,
    Column("name", String(64), primary_key=True),
    Column("bucket", String(63), nullable=False),
    Column("prefix", Text(), nullable=False),
    Column("endpoint", Text(), nullable=True),
    Column("region", String(64), nullable=True),
    Column("key_file", Text(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
)

SET_COPIES = Table(
    "set_copies",
    METADATA,
    Column("set_id", String(36), primary_key=True),
    Column("remote", String(64), primary_key=True),
    Column("copied_at", UtcDateTime(), nullable=False),
    Column("bytes_sent", BigInteger(), nullable=False),
    Column("stored_bytes", BigInteger(), nullable=False),
)

POLICIES = Table(
    "policies",
    METADATA,
    Column("name", String(64), primary_key=True),
    Column("record", JSON(), nullable=False),
    Column("paused", Integer(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("last_tick", UtcDateTime(), nullable=True),
    Column("last_job_id", String(36), nullable=True),
    Column("last_outcome", String(16), nullable=True),
    Column("last_error", Text(), nullable=True),
)
# ---- consistency groups (revision 0007) -----------------------------------------------------------------

GROUPS = Table(
    "instance_groups",
    METADATA,
    Column("name", String(255), primary_key=True),
    _req("created_at", UtcDateTime),
)
"""A consistency group: instances snapshotted at one point in time."""

GROUP_MEMBERS = Table(
    "instance_group_members",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _req(
        "group_name",
        String(255),
        ForeignKey("instance_groups.name", name="fk_instance_group_members_group_name", ondelete="CASCADE"),
        index=True,
    ),
    _req("position", Integer),
    _req("instance_uuid", String(64)),
    _req("instance_name", Text),
    UniqueConstraint("group_name", "instance_uuid", name="uq_instance_group_members_group_name_instance_uuid"),
)
"""The instances of a group, in the order they were added."""

GROUP_SETS = Table(
    "group_sets",
    METADATA,
    Column("id", String(36), primary_key=True),
    _req("name", Text),
    _req("group_name", String(255), index=True),
    _req("requested", String(16)),
    _opt("achieved", String(16)),
    _req("status", String(16)),
    _req("created_at", UtcDateTime, index=True),
    _opt("completed_at", UtcDateTime),
    _opt("window_ms", Float),
    _opt("error", Text),
    _opt("backup_type", String(255)),
    _req("instances", JSON),
)
"""One point in time across a group's instances; its sets carry its id in their metadata. No foreign key to
the group: a group set stays restorable after its group is deleted."""
# ---- many hosts: agents, where jobs run and where sets live (revision 0006) ---------------------------

HOSTS = Table(
    "hosts",
    METADATA,
    Column("name", String(64), primary_key=True),
    _opt("key_sha256", String(64)),
    _opt("uri", Text),
    _req("state", String(16)),
    _opt("repository", Text),
    _opt("free_bytes", BigInteger),
    _req("instance_count", Integer),
    _req("instances", JSON),
    _opt("agent_pid", Integer),
    _req("enrolled_at", UtcDateTime),
    _opt("last_heartbeat", UtcDateTime),
)
"""One hypervisor host: its agent's key (hash only), URI, heartbeat and the instances it last reported."""

JOB_ROUTES = Table(
    "job_routes",
    METADATA,
    Column("job_id", String(36), primary_key=True),
    _req("host", String(64), index=True),
    _opt("queue_job_id", BigInteger),
)
"""Which host's agent a job was routed to (and its id in the job queue)."""

SET_HOSTS = Table(
    "set_hosts",
    METADATA,
    Column("set_id", String(36), primary_key=True),
    _req("host", String(64), index=True),
)
"""The host whose repository holds a set's file members."""
# ---- groups across hosts: the barrier of a group snapshot (revision 0009) --------------------------------

GROUP_BARRIER_ARRIVALS = Table(
    "group_barrier_arrivals",
    METADATA,
    _req("group_set_id", String(36)),
    _req("host", String(64)),
    _req("phase", String(16)),
    _req("arrived_at", UtcDateTime),
    PrimaryKeyConstraint("group_set_id", "host", "phase", name="pk_group_barrier_arrivals"),
)
"""Which host's share of a group set reached which point of the barrier (``group_barrier``)."""

GROUP_BARRIER_ABORTS = Table(
    "group_barrier_aborts",
    METADATA,
    Column("group_set_id", String(36), primary_key=True),
    _req("host", String(64)),
    _req("reason", Text),
    _req("aborted_at", UtcDateTime),
)
"""The first abort of a group set's barrier: every share stops at its next wait."""
