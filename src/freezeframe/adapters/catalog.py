"""The catalog of snapshot sets, stored with SQLAlchemy (SQLite by default, PostgreSQL-ready).

Opening a catalog brings its schema to the newest Alembic revision, so a database written by an
older freezeframe is migrated in place. SQLite runs in WAL mode with a busy timeout so the CLI and
a long-running service can share one file.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    exc,
    or_,
    select,
    update,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from freezeframe.errors import CatalogError, InvalidRequest, SetNotFound
from freezeframe.model import (
    Consistency,
    Hardware,
    InstanceState,
    Member,
    RestoreRecord,
    SetStatus,
    SnapshotSet,
)

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIN_PREFIX = 4
"""Shorter id prefixes match too many sets to be a safe way to name one."""


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


class SqlCatalog:
    """Catalog port over SQLAlchemy; one instance per process, safe to share between threads."""

    def __init__(self, url: str, *, busy_timeout_s: float = 30.0) -> None:
        try:
            self._url: URL = make_url(url)
        except exc.ArgumentError as e:
            raise CatalogError(
                f"catalog URL {url!r} is not valid ({e}); use e.g. sqlite:////var/lib/freezeframe/catalog.sqlite"
            ) from e
        self._display = self._url.render_as_string(hide_password=True)
        self._busy_timeout_s = busy_timeout_s
        self._sqlite = self._url.get_backend_name() == "sqlite"
        self._sqlite_path = _sqlite_file(self._url) if self._sqlite else None
        if self._sqlite_path is not None:
            try:
                self._sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CatalogError(
                    f"cannot create the directory for catalog {self._sqlite_path}: {e}; "
                    "fix the path or its permissions, or set FREEZEFRAME_CATALOG_URL / FREEZEFRAME_HOME"
                ) from e
        self._engine = self._create_engine()
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        try:
            self._migrate()
        except BaseException:
            self._engine.dispose()
            raise

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release pooled connections so the file can be removed or the process can exit cleanly."""
        self._engine.dispose()

    def __enter__(self) -> SqlCatalog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _create_engine(self) -> Engine:
        if not self._sqlite:
            return create_engine(self._url, pool_pre_ping=True)
        if self._sqlite_path is None:
            # One shared connection, otherwise every pooled connection sees its own empty memory DB.
            engine = create_engine(self._url, poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            engine = create_engine(self._url, connect_args={"timeout": self._busy_timeout_s})
        busy_ms = int(self._busy_timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
                cursor.execute("PRAGMA foreign_keys = ON")
            finally:
                cursor.close()

        return engine

    def _migrate(self) -> None:
        """Bring the schema to head; a file lock keeps processes opening a new file from racing."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
        config.set_main_option("path_separator", "os")
        with _file_lock(self._lock_path(), self._busy_timeout_s), self._errors("opening the catalog"):
            if self._sqlite_path is not None:
                self._enable_wal()
            with self._engine.begin() as connection:
                config.attributes["connection"] = connection
                try:
                    command.upgrade(config, "head")
                except (CommandError, RevisionError) as e:
                    raise CatalogError(
                        f"catalog {self._display} has a schema this freezeframe does not know ({e}); "
                        "it was probably written by a newer freezeframe, so upgrade freezeframe"
                    ) from e

    def _enable_wal(self) -> None:
        with self._engine.connect() as connection:
            mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
            if str(mode).lower() != "wal":
                mode = connection.exec_driver_sql("PRAGMA journal_mode = WAL").scalar()
            if str(mode).lower() != "wal":
                log.warning("catalog %s stays in %s journal mode; concurrent use may block", self._display, mode)

    def _lock_path(self) -> Path | None:
        if self._sqlite_path is None:
            return None
        return self._sqlite_path.with_name(self._sqlite_path.name + ".lock")

    # -- error handling ----------------------------------------------------------------------

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn driver errors into CatalogError naming the catalog and what to do."""
        try:
            yield
        except exc.IntegrityError as e:
            raise CatalogError(f"catalog {self._display} refused {action}: {e.orig}") from e
        except exc.DBAPIError as e:
            raise CatalogError(self._driver_message(action, e)) from e
        except exc.SQLAlchemyError as e:
            raise CatalogError(f"catalog {self._display} failed while {action}: {e}") from e

    def _driver_message(self, action: str, error: exc.DBAPIError) -> str:
        detail = str(error.orig)
        lowered = detail.lower()
        if "locked" in lowered or "busy" in lowered:
            return (
                f"catalog {self._display} stayed locked by another process for over "
                f"{self._busy_timeout_s:g}s while {action}; retry, or look for a stuck freezeframe process"
            )
        if self._sqlite and any(
            s in lowered for s in ("unable to open", "readonly", "not a database", "disk i/o", "malformed")
        ):
            return (
                f"cannot use catalog {self._display} while {action}: {detail}; check that the path is a "
                "SQLite file readable and writable by this user (with its directory), "
                "or point FREEZEFRAME_CATALOG_URL elsewhere"
            )
        return f"catalog {self._display} failed while {action}: {detail}"

    @contextmanager
    def _session(self, action: str, *, write: bool) -> Iterator[Session]:
        with self._errors(action), self._sessions() as session:
            if write:
                with session.begin():
                    yield session
            else:
                yield session

    # -- Catalog port ------------------------------------------------------------------------

    def add_set(self, snapshot_set: SnapshotSet) -> None:
        _validate(snapshot_set)
        with self._session(f"adding set {snapshot_set.id}", write=True) as session:
            if session.get(SetRow, snapshot_set.id) is not None:
                raise InvalidRequest(f"snapshot set {snapshot_set.id} is already in the catalog")
            row = SetRow(id=snapshot_set.id)
            _fill_row(row, snapshot_set)
            row.members = [_member_row(m) for m in snapshot_set.members]
            session.add(row)

    def update_set(self, snapshot_set: SnapshotSet) -> None:
        _validate(snapshot_set)
        with self._session(f"updating set {snapshot_set.id}", write=True) as session:
            row = session.get(SetRow, snapshot_set.id, options=[selectinload(SetRow.members)])
            if row is None:
                raise SetNotFound(f"snapshot set {snapshot_set.id} is not in the catalog; add it first")
            _fill_row(row, snapshot_set)
            row.members.clear()
            # Delete the old members before inserting new ones so (set_id, target) stays unique.
            session.flush()
            row.members.extend(_member_row(m) for m in snapshot_set.members)

    def get_set(self, ref: str) -> SnapshotSet:
        with self._session(f"looking up set {ref!r}", write=False) as session:
            row = session.get(SetRow, ref, options=[selectinload(SetRow.members)])
            if row is not None:
                return _from_row(row)
            conditions = [SetRow.name == ref]
            if len(ref) >= MIN_PREFIX:
                conditions += [SetRow.id.startswith(p, autoescape=True) for p in {ref, ref.lower()}]
            query = (
                select(SetRow)
                .where(or_(*conditions))
                .options(selectinload(SetRow.members))
                .order_by(SetRow.created_at.desc(), SetRow.id)
            )
            rows = list(session.scalars(query))
        if not rows:
            raise SetNotFound(
                f"no snapshot set matches {ref!r} (give a full id, an id prefix of at least "
                f"{MIN_PREFIX} characters, or a set name)"
            )
        if len(rows) > 1:
            candidates = ", ".join(f"{r.id} ({r.name})" for r in rows)
            raise InvalidRequest(f"{ref!r} matches several snapshot sets: {candidates}; use the full id")
        return _from_row(rows[0])

    def list_sets(
        self,
        instance: str | None = None,
        status: SetStatus | None = None,
        backup_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[SnapshotSet]:
        query = select(SetRow).options(selectinload(SetRow.members))
        if instance is not None:
            query = query.where(or_(SetRow.instance_name == instance, SetRow.instance_uuid == instance))
        if status is not None:
            query = query.where(SetRow.status == status.value)
        if backup_type is not None:
            query = query.where(SetRow.backup_type == backup_type)
        query = query.order_by(SetRow.created_at.desc(), SetRow.id)
        with self._session("listing sets", write=False) as session:
            sets = [_from_row(row) for row in session.scalars(query)]
        if metadata:
            # JSON path queries differ between SQLite and PostgreSQL; the catalog is small.
            sets = [s for s in sets if all(s.metadata.get(k) == v for k, v in metadata.items())]
        return sets

    def delete_set(self, set_id: str) -> None:
        """Delete by exact id only: a prefix is too easy to get wrong for a destructive call."""
        with self._session(f"deleting set {set_id}", write=True) as session:
            if session.scalar(select(SetRow.id).where(SetRow.id == set_id)) is None:
                raise SetNotFound(f"snapshot set {set_id} is not in the catalog")
            # Members go with it through ON DELETE CASCADE.
            session.execute(delete(SetRow).where(SetRow.id == set_id).execution_options(synchronize_session=False))


# -- helpers -------------------------------------------------------------------------------------


def _sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL, or None for an in-memory database."""
    database = url.database or ""
    if url.query.get("uri") == "true" and database.startswith("file:"):
        path, _, query = database.removeprefix("file:").partition("?")
        if "mode=memory" in query or path in ("", ":memory:"):
            return None
        return Path(path)
    if database in ("", ":memory:"):
        return None
    return Path(database)


@contextmanager
def _file_lock(path: Path | None, timeout_s: float) -> Iterator[None]:
    """Exclusive flock on a side file (never the DB itself: closing it would drop SQLite's locks)."""
    if path is None:
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CatalogError(
            f"cannot open the catalog lock file {path}: {e}; check the directory is writable by this user"
        ) from e
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CatalogError(
                        f"another process has held the catalog migration lock {path} for over "
                        f"{timeout_s:g}s; retry, or look for a stuck freezeframe process"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _validate(snapshot_set: SnapshotSet) -> None:
    """Reject what the schema would silently mangle or refuse with an obscure driver error."""
    for field_name in ("created_at", "completed_at"):
        value: datetime | None = getattr(snapshot_set, field_name)
        if value is not None and value.utcoffset() is None:
            raise InvalidRequest(
                f"snapshot set {snapshot_set.id}: {field_name} is a naive datetime; use datetime.now(UTC)"
            )
    seen: set[str] = set()
    for member in snapshot_set.members:
        if member.set_id != snapshot_set.id:
            raise InvalidRequest(f"member {member.target} belongs to set {member.set_id}, not to {snapshot_set.id}")
        if member.target in seen:
            raise InvalidRequest(f"snapshot set {snapshot_set.id} lists disk {member.target} twice")
        seen.add(member.target)


def _fill_row(row: SetRow, s: SnapshotSet) -> None:
    row.name = s.name
    row.instance_name = s.instance_name
    row.instance_uuid = s.instance_uuid
    row.requested = s.requested.value
    row.achieved = s.achieved.value if s.achieved is not None else None
    row.reason = s.reason
    row.status = s.status.value
    row.created_at = s.created_at
    row.completed_at = s.completed_at
    row.freeze_window_ms = s.freeze_window_ms
    row.pause_window_ms = s.pause_window_ms
    row.hardware = s.hardware.to_dict()
    row.meta = dict(s.metadata)
    row.backup_type = s.backup_type
    row.error = s.error
    row.instance_state = s.instance_state.value if s.instance_state is not None else None


def _member_row(m: Member) -> MemberRow:
    return MemberRow(
        set_id=m.set_id,
        target=m.target,
        bus=m.bus,
        boot_order=m.boot_order,
        virtual_size=m.virtual_size,
        format=m.format,
        path=m.path,
        source_path=m.source_path,
        sha256=m.sha256,
        meta=dict(m.metadata),
    )


def _from_row(row: SetRow) -> SnapshotSet:
    return SnapshotSet(
        id=row.id,
        name=row.name,
        instance_name=row.instance_name,
        instance_uuid=row.instance_uuid,
        requested=Consistency(row.requested),
        status=SetStatus(row.status),
        created_at=row.created_at,
        hardware=Hardware.from_dict(row.hardware),
        achieved=Consistency(row.achieved) if row.achieved is not None else None,
        reason=row.reason,
        completed_at=row.completed_at,
        freeze_window_ms=row.freeze_window_ms,
        pause_window_ms=row.pause_window_ms,
        members=[
            Member(
                set_id=m.set_id,
                target=m.target,
                bus=m.bus,
                boot_order=m.boot_order,
                virtual_size=m.virtual_size,
                format=m.format,
                path=m.path,
                source_path=m.source_path,
                sha256=m.sha256,
                metadata=dict(m.meta),
            )
            for m in row.members
        ],
        metadata=dict(row.meta),
        backup_type=row.backup_type,
        error=row.error,
        instance_state=InstanceState(row.instance_state) if row.instance_state is not None else None,
    )


# -- restores: which instances were built from which set members (lifecycle) ----------------------


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


class RestoreLog:
    """The ``restores`` table over a SqlCatalog's engine; kept apart so the Catalog port stays unchanged."""

    def __init__(self, catalog: SqlCatalog) -> None:
        self._catalog = catalog

    def add(self, records: Sequence[RestoreRecord]) -> None:
        with self._catalog._session("recording restored disks", write=True) as session:
            session.add_all(
                RestoreRow(
                    set_id=r.set_id,
                    instance_name=r.instance_name,
                    instance_uuid=r.instance_uuid,
                    target=r.target,
                    path=r.path,
                    mode=r.mode,
                    created_at=r.created_at,
                )
                for r in records
            )

    def bind_uuid(self, instance_name: str, instance_uuid: str) -> None:
        """Known only once libvirt has defined the instance, after the rows were written."""
        with self._catalog._session(f"recording the UUID of {instance_name}", write=True) as session:
            session.execute(
                update(RestoreRow)
                .where(RestoreRow.instance_name == instance_name, RestoreRow.instance_uuid.is_(None))
                .values(instance_uuid=instance_uuid)
            )

    def for_set(self, set_id: str) -> list[RestoreRecord]:
        query = select(RestoreRow).where(RestoreRow.set_id == set_id).order_by(RestoreRow.id)
        with self._catalog._session(f"listing restores of set {set_id}", write=False) as session:
            return [_restore_record(row) for row in session.scalars(query)]

    def for_instance(self, ref: str) -> list[RestoreRecord]:
        """By instance name or UUID."""
        query = (
            select(RestoreRow)
            .where(or_(RestoreRow.instance_name == ref, RestoreRow.instance_uuid == ref))
            .order_by(RestoreRow.id)
        )
        with self._catalog._session(f"listing restores of {ref}", write=False) as session:
            return [_restore_record(row) for row in session.scalars(query)]

    def all(self) -> list[RestoreRecord]:
        with self._catalog._session("listing restores", write=False) as session:
            return [_restore_record(row) for row in session.scalars(select(RestoreRow).order_by(RestoreRow.id))]

    def remove_instance(self, instance_name: str) -> None:
        with self._catalog._session(f"forgetting restores of {instance_name}", write=True) as session:
            session.execute(delete(RestoreRow).where(RestoreRow.instance_name == instance_name))

    def remove_ids(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self._catalog._session("forgetting restored disks", write=True) as session:
            session.execute(delete(RestoreRow).where(RestoreRow.id.in_(list(ids))))


def _restore_record(row: RestoreRow) -> RestoreRecord:
    return RestoreRecord(
        set_id=row.set_id,
        instance_name=row.instance_name,
        target=row.target,
        path=row.path,
        mode=row.mode,
        created_at=row.created_at,
        instance_uuid=row.instance_uuid,
        id=row.id,
    )


# The HTTP service's rows (jobs, tokens, projects) and the image store's share Base: registered here so that
# Base.metadata, which Alembic's env and the model/migration comparison read, always holds every table.
import freezeframe.adapters.image_store  # noqa: E402
import freezeframe.adapters.service_store  # noqa: E402, F401
