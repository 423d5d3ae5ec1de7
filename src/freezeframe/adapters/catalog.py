"""The catalog of snapshot sets, stored with SQLAlchemy Core (SQLite by default, PostgreSQL-ready).

Opening a catalog brings its schema to the newest Alembic revision, so a database written by an
older freezeframe is migrated in place; a catalog already there costs one query and Alembic is not even
imported. SQLite runs in WAL mode with a busy timeout so the CLI and a long-running service can share one
file. Sets are written and read in the one serialised form of ``freezeframe.serialize``; a row holding a
value that form refuses is a one-line ``CatalogError``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Table, create_engine, delete, event, exc, insert, inspect, select, text, update
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from freezeframe.adapters import catalog_query
from freezeframe.adapters.catalog_schema import (
    MEMBERS,
    METADATA,
    SCHEMA_HEAD,
    SCHEMA_REVISIONS,
    SET_METADATA,
    SETS,
)
from freezeframe.errors import CatalogError, InvalidRequest, RecordInvalid, SetNotFound
from freezeframe.model import SetStatus, SnapshotSet
from freezeframe.serialize import set_from_dict, set_to_dict
from freezeframe.set_query import Cursor, SetFilter, SetPage, check_limit

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIN_PREFIX = 4
"""Shorter id prefixes match too many sets to be a safe way to name one."""
LOAD_BATCH = 500
STREAM_BATCH = 500
"""Sets read per query when streaming a whole listing: memory stays flat, each query is one short index scan."""

__all__ = ["METADATA", "MIGRATIONS_DIR", "MIN_PREFIX", "SqlCatalog", "upsert"]


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
        """Bring the schema to head. At head (every open but the first after an upgrade) this is one cheap query
        and Alembic is never imported; otherwise a file lock keeps processes opening a new file from racing."""
        with self._errors("opening the catalog"):
            if self._sqlite_path is not None:
                self._enable_wal()
            with self._engine.connect() as connection:
                if _revision(connection) == SCHEMA_HEAD:
                    return
        with (
            _file_lock(self._lock_path(), self._busy_timeout_s),
            self._errors("opening the catalog"),
            self._engine.begin() as connection,
        ):
            current = _revision(connection)
            if current is not None and current not in SCHEMA_REVISIONS:
                raise CatalogError(
                    f"catalog {self._display} has schema revision {current[:40]!r}, which this freezeframe does "
                    "not know; it was probably written by a newer freezeframe, so upgrade freezeframe"
                )
            if current != SCHEMA_HEAD:
                _upgrade(connection, self._display)

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
    def connect(self, action: str, *, write: bool) -> Iterator[Connection]:
        """A connection for the adapters that keep rows here (one transaction when ``write``); driver errors
        become a CatalogError naming ``action``."""
        with self._errors(action), self._engine.begin() if write else self._engine.connect() as connection:
            yield connection

    # -- Catalog port ------------------------------------------------------------------------

    def add_set(self, snapshot_set: SnapshotSet) -> None:
        _validate(snapshot_set)
        values, members = _columns(snapshot_set)
        with self.connect(f"adding set {snapshot_set.id}", write=True) as connection:
            if connection.scalar(select(SETS.c.id).where(SETS.c.id == snapshot_set.id)) is not None:
                raise InvalidRequest(f"snapshot set {snapshot_set.id} is already in the catalog")
            connection.execute(insert(SETS).values(**values))
            if members:
                connection.execute(insert(MEMBERS), members)
            self._write_metadata_rows(connection, snapshot_set)

    def update_set(self, snapshot_set: SnapshotSet) -> None:
        _validate(snapshot_set)
        values, members = _columns(snapshot_set)
        with self.connect(f"updating set {snapshot_set.id}", write=True) as connection:
            if connection.scalar(select(SETS.c.id).where(SETS.c.id == snapshot_set.id)) is None:
                raise SetNotFound(f"snapshot set {snapshot_set.id} is not in the catalog; add it first")
            connection.execute(update(SETS).where(SETS.c.id == snapshot_set.id).values(**values))
            # Delete the old members before inserting new ones so (set_id, target) stays unique.
            connection.execute(delete(MEMBERS).where(MEMBERS.c.set_id == snapshot_set.id))
            if members:
                connection.execute(insert(MEMBERS), members)
            connection.execute(delete(SET_METADATA).where(SET_METADATA.c.set_id == snapshot_set.id))
            self._write_metadata_rows(connection, snapshot_set)

    @staticmethod
    def _write_metadata_rows(connection: Connection, snapshot_set: SnapshotSet) -> None:
        rows = catalog_query.metadata_rows(snapshot_set.id, snapshot_set.metadata, snapshot_set.created_at)
        if rows:
            connection.execute(insert(SET_METADATA), rows)

    def get_set(self, ref: str) -> SnapshotSet:
        found = self.load_sets([ref])
        if found:
            return found[0]
        query = catalog_query.lookup_query(ref, MIN_PREFIX)
        with self.connect(f"looking up set {ref!r}", write=False) as connection:
            rows = connection.execute(query).all()
        if not rows:
            raise SetNotFound(
                f"no snapshot set matches {ref!r} (give a full id, an id prefix of at least "
                f"{MIN_PREFIX} characters, or a set name)"
            )
        if len(rows) > 1:
            candidates = ", ".join(f"{r.id} ({r.name})" for r in rows)
            raise InvalidRequest(f"{ref!r} matches several snapshot sets: {candidates}; use the full id")
        return self.load_sets([rows[0].id])[0]

    def list_sets(
        self,
        instance: str | None = None,
        status: SetStatus | None = None,
        backup_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[SnapshotSet]:
        wanted = SetFilter(instance=instance, status=status, backup_type=backup_type, metadata=metadata or {})
        return list(self.iter_sets(wanted))

    def delete_set(self, set_id: str) -> None:
        """Delete by exact id only: a prefix is too easy to get wrong for a destructive call."""
        with self.connect(f"deleting set {set_id}", write=True) as connection:
            if connection.scalar(select(SETS.c.id).where(SETS.c.id == set_id)) is None:
                raise SetNotFound(f"snapshot set {set_id} is not in the catalog")
            # Members go with it through ON DELETE CASCADE.
            connection.execute(delete(SETS).where(SETS.c.id == set_id))

    # -- listings: filtered and paged in the database (catalog_query), then whole sets for one page -----------

    def page_sets(self, wanted: SetFilter, limit: int, cursor: Cursor | None = None) -> SetPage:
        """One page, newest first, starting after ``cursor``; ``next_cursor`` is None on the last page."""
        check_limit(limit)
        with self.connect("listing sets", write=False) as connection:
            rows = connection.execute(catalog_query.page_query(connection, wanted, limit + 1, cursor)).all()
        sets = self.load_sets([r.id for r in rows[:limit]])
        more = len(rows) > limit and sets
        return SetPage(sets, Cursor.after(sets[-1]).encode() if more else None)

    def iter_sets(self, wanted: SetFilter, cursor: Cursor | None = None) -> Iterator[SnapshotSet]:
        """Every matching set, newest first, read a batch at a time (memory stays flat for any catalog size)."""
        while True:
            page = self.page_sets(wanted, STREAM_BATCH, cursor)
            yield from page.sets
            if page.next_cursor is None:
                return
            cursor = Cursor.after(page.sets[-1])

    def count_sets(self, wanted: SetFilter, bound: int | None = None, cursor: Cursor | None = None) -> int:
        """How many sets match (after ``cursor``), counting at most ``bound`` (then "``bound`` or more"); None: an
        exact count, which reads every matching index entry."""
        with self.connect("counting sets", write=False) as connection:
            return int(connection.scalar(catalog_query.count_query(connection, wanted, bound, cursor)) or 0)

    def load_sets(self, ids: Sequence[str]) -> list[SnapshotSet]:
        """The sets with these exact ids, in this order (ids not in the catalog are left out)."""
        set_rows: list[Mapping[str, Any]] = []
        member_rows: list[Mapping[str, Any]] = []
        with self.connect("reading sets", write=False) as connection:
            # In batches: a statement may hold only so many parameters (SQLite: 32766, older builds 999).
            for start in range(0, len(ids), LOAD_BATCH):
                batch = list(ids[start : start + LOAD_BATCH])
                set_rows += [dict(r) for r in connection.execute(select(SETS).where(SETS.c.id.in_(batch))).mappings()]
                query = select(MEMBERS).where(MEMBERS.c.set_id.in_(batch)).order_by(MEMBERS.c.id)
                member_rows += [dict(r) for r in connection.execute(query).mappings()]
        members: dict[str, list[Mapping[str, Any]]] = {}
        for m in member_rows:
            members.setdefault(m["set_id"], []).append(m)
        by_id = {row["id"]: self._from_columns(row, members.get(row["id"], [])) for row in set_rows}
        return [by_id[i] for i in ids if i in by_id]

    def _from_columns(self, row: Mapping[str, Any], members: Sequence[Mapping[str, Any]]) -> SnapshotSet:
        try:
            return set_from_dict(_record(row, members))
        except RecordInvalid as e:
            raise CatalogError(
                f"catalog {self._display}: {e}; the row was changed outside freezeframe or by a newer version"
            ) from None


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
    for field_name in ("name", "instance_name"):
        if "\x00" in getattr(snapshot_set, field_name):
            raise InvalidRequest(f"snapshot set {snapshot_set.id}: {field_name} contains a NUL character")
    seen: set[str] = set()
    for member in snapshot_set.members:
        if member.set_id != snapshot_set.id:
            raise InvalidRequest(f"member {member.target} belongs to set {member.set_id}, not to {snapshot_set.id}")
        if member.target in seen:
            raise InvalidRequest(f"snapshot set {snapshot_set.id} lists disk {member.target} twice")
        seen.add(member.target)


def _columns(snapshot_set: SnapshotSet) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The serialized set (``freezeframe.serialize``) spread over the table's flat columns."""
    record = set_to_dict(snapshot_set)
    consistency, instance = record["consistency"], record["instance"]
    values = {
        "id": record["id"],
        "name": record["name"],
        "instance_name": instance["name"],
        "instance_uuid": instance["uuid"],
        "requested": consistency["requested"],
        "achieved": consistency["achieved"],
        "reason": consistency["reason"],
        "status": record["status"],
        "created_at": snapshot_set.created_at,
        "completed_at": snapshot_set.completed_at,
        "freeze_window_ms": record["freeze_window_ms"],
        "pause_window_ms": record["pause_window_ms"],
        "hardware": record["hardware"],
        "metadata": record["metadata"],
        "backup_type": record["backup_type"],
        "error": record["error"],
        "instance_state": record["instance_state"],
        **catalog_query.derived_columns(record["metadata"], (m["metadata"] for m in record["members"])),
    }
    members = [
        {**{k: m[k] for k in _MEMBER_KEYS}, "set_id": snapshot_set.id, "virtual_size": m["size"]}
        for m in record["members"]
    ]
    return values, members


_MEMBER_KEYS = ("target", "bus", "boot_order", "format", "path", "source_path", "sha256", "metadata")


def _record(row: Mapping[str, Any], members: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The inverse of ``_columns``: flat columns back into the serialized form ``set_from_dict`` reads."""
    return {
        "id": row["id"],
        "name": row["name"],
        "status": row["status"],
        "instance": {"name": row["instance_name"], "uuid": row["instance_uuid"]},
        "instance_state": row["instance_state"],
        "consistency": {"requested": row["requested"], "achieved": row["achieved"], "reason": row["reason"]},
        "freeze_window_ms": row["freeze_window_ms"],
        "pause_window_ms": row["pause_window_ms"],
        "created_at": row["created_at"],
        "completed_at": row["completed_at"],
        "backup_type": row["backup_type"],
        "metadata": row["metadata"],
        "error": row["error"],
        "hardware": row["hardware"],
        "members": [{**{k: m[k] for k in _MEMBER_KEYS}, "size": m["virtual_size"]} for m in members],
    }


def upsert(connection: Connection, table: Table, keys: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """Insert the row or update it in ONE statement (``INSERT .. ON CONFLICT DO UPDATE`` on both backends): an
    update-then-insert pair lets two concurrent writers both insert, and one of them fails."""
    from sqlalchemy.dialects import postgresql, sqlite

    if connection.dialect.name == "postgresql":
        pg_statement = postgresql.insert(table).values(**keys, **values)
        connection.execute(pg_statement.on_conflict_do_update(index_elements=list(keys), set_=dict(values)))
    else:
        lite_statement = sqlite.insert(table).values(**keys, **values)
        connection.execute(lite_statement.on_conflict_do_update(index_elements=list(keys), set_=dict(values)))


def _revision(connection: Connection) -> str | None:
    """The catalog's Alembic revision without Alembic: None for a database with no schema yet."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    found: list[Any] = list(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())
    return str(found[0]) if len(found) == 1 else None


def _upgrade(connection: Connection, display: str) -> None:
    """Run the migrations: the one place that imports Alembic (about 0.3 s), and only when there is work."""
    from alembic import command
    from alembic.config import Config
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    try:
        command.upgrade(config, "head")
    except (CommandError, RevisionError) as e:
        raise CatalogError(
            f"catalog {display} has a schema this freezeframe does not know ({e}); "
            "it was probably written by a newer freezeframe, so upgrade freezeframe"
        ) from e
