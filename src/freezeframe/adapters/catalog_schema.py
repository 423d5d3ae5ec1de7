"""The catalog's tables, one declarative ``Base`` for all of them, and the schema revision they make up.

Every adapter that keeps rows in the catalog (sets, restores, jobs, tokens, project mappings, image owners,
stored images) declares them here, so ``Base.metadata`` (what Alembic's environment and the model/migration test
read) holds every table without the adapters importing one another.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

SCHEMA_REVISIONS = ("0001", "0002", "0003", "0004")
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


class Base(DeclarativeBase):
    pass


class SetRow(Base):
    __tablename__ = "snapshot_sets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    instance_name: Mapped[str] = mapped_column(Text)
    instance_uuid: Mapped[str] = mapped_column(String(64), index=True)
    requested: Mapped[str] = mapped_column(String(16))
    achieved: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    freeze_window_ms: Mapped[float | None] = mapped_column(Float)
    pause_window_ms: Mapped[float | None] = mapped_column(Float)
    hardware: Mapped[dict[str, Any]] = mapped_column(JSON)
    # ``metadata`` is reserved on declarative classes, hence the attribute name.
    meta: Mapped[dict[str, str]] = mapped_column("metadata", JSON)
    backup_type: Mapped[str | None] = mapped_column(String(255), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    instance_state: Mapped[str | None] = mapped_column(String(16))

    members: Mapped[list[MemberRow]] = relationship(
        back_populates="snapshot_set",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="MemberRow.id",
    )


class MemberRow(Base):
    __tablename__ = "members"
    __table_args__ = (UniqueConstraint("set_id", "target", name="uq_members_set_id_target"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    set_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("snapshot_sets.id", name="fk_members_set_id", ondelete="CASCADE")
    )
    target: Mapped[str] = mapped_column(String(64))
    bus: Mapped[str] = mapped_column(String(32))
    boot_order: Mapped[int | None] = mapped_column(Integer)
    virtual_size: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    source_path: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    meta: Mapped[dict[str, str]] = mapped_column("metadata", JSON)

    snapshot_set: Mapped[SetRow] = relationship(back_populates="members")


class RestoreRow(Base):
    """One disk of an instance restored from a set member; copy-on-write rows make the member a dependency."""

    __tablename__ = "restores"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    set_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("snapshot_sets.id", name="fk_restores_set_id", ondelete="CASCADE"), index=True
    )
    instance_name: Mapped[str] = mapped_column(Text)
    instance_uuid: Mapped[str | None] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    mode: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


# ---- the HTTP service (revision 0003) ----------------------------------------------------------------


class JobRow(Base):
    """A background operation of the service; finished rows are kept so clients can read the outcome later."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    project: Mapped[str | None] = mapped_column(String(128), index=True)
    lock_key: Mapped[str] = mapped_column(String(128))
    instance_uuid: Mapped[str | None] = mapped_column(String(64), index=True)
    instance_name: Mapped[str | None] = mapped_column(Text)
    set_id: Mapped[str | None] = mapped_column(String(36))
    image_id: Mapped[str | None] = mapped_column(String(36))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_type: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    phase: Mapped[str | None] = mapped_column(String(32))
    progress_done: Mapped[int] = mapped_column(BigInteger)
    progress_total: Mapped[int] = mapped_column(BigInteger)
    token_id: Mapped[str | None] = mapped_column(String(32))
    server_pid: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class TokenRow(Base):
    """A bearer token: only the SHA-256 of its secret is stored, so a leaked catalog grants nothing."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    project: Mapped[str | None] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class InstanceProjectRow(Base):
    """The admin's instance -> project mapping; it wins over the project in the domain's <metadata>."""

    __tablename__ = "instance_projects"

    instance_uuid: Mapped[str] = mapped_column(String(64), primary_key=True)
    instance_name: Mapped[str] = mapped_column(Text)
    project: Mapped[str] = mapped_column(String(128), index=True)
    assigned_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ImageOwnerRow(Base):
    """Which project an image in the image store (``stored_images``) belongs to; images outlive their sets."""

    __tablename__ = "image_owners"

    image_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project: Mapped[str | None] = mapped_column(String(128), index=True)
    set_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


# ---- the image store (revision 0004) --------------------------------------------------------------------


class StoredImageRow(Base):
    """One package in an image store (revision 0004)."""

    __tablename__ = "stored_images"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(Text, index=True)
    status: Mapped[str] = mapped_column(String(16))
    store: Mapped[str] = mapped_column(Text)
    filename: Mapped[str] = mapped_column(Text)
    source_set_id: Mapped[str | None] = mapped_column(String(36))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)
