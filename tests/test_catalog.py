"""SqlCatalog against real SQLite files and the PostgreSQL test bed: round trips, lookups, filters, migrations,
concurrency. Tests taking ``catalog``/``catalog_url`` run on both backends."""

from __future__ import annotations

import multiprocessing
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text

from freezeframe.adapters.catalog import METADATA, MIGRATIONS_DIR, SqlCatalog
from freezeframe.adapters.catalog_schema import MEMBERS, SCHEMA_HEAD, SCHEMA_REVISIONS
from freezeframe.errors import CatalogError, InvalidRequest, SetNotFound
from freezeframe.model import (
    BootSpec,
    Consistency,
    DiskSpec,
    Hardware,
    InstanceState,
    Member,
    NicSpec,
    SetStatus,
    SnapshotSet,
)
from pg_helpers import catalog_url, pg_server, pg_url

T0 = datetime(2024, 11, 27, 12, 0, 0, 123456, tzinfo=UTC)


def hardware() -> Hardware:
    return Hardware(
        vcpus=2,
        memory_kib=2 * 1024 * 1024,
        arch="x86_64",
        machine="pc-q35-7.2",
        boot=BootSpec(firmware="uefi", cmdline="console=ttyS0", boot_devices=("hd", "network")),
        disks=(
            DiskSpec(
                target="vda",
                bus="virtio",
                source_path="/var/lib/libvirt/images/web.qcow2",
                format="qcow2",
                virtual_size=20 * 2**30,
                boot_order=1,
                serial="ROOT",
                address={"type": "pci", "slot": "0x04"},
            ),
            DiskSpec(target="sdb", bus="scsi", source_path=None, format="raw", virtual_size=2**40),
        ),
        nics=(NicSpec(mac="52:54:00:12:34:56", model="virtio", source_type="network", source="default"),),
        description="web server",
        metadata_xml="<app:tier xmlns:app='urn:x'>front</app:tier>",
    )


def member(set_id: str, target: str, **kw: Any) -> Member:
    defaults: dict[str, Any] = {
        "bus": "virtio",
        "boot_order": None,
        "virtual_size": 5 * 2**40,  # past 32 bits: needs BIGINT
        "format": "qcow2",
        "path": f"/repo/{set_id}/{target}.qcow2",
        "source_path": f"/images/{target}.qcow2",
        "sha256": "ab" * 32,
        "metadata": {"freezeframe.set": set_id},
    }
    return Member(set_id=set_id, target=target, **{**defaults, **kw})


def make_set(
    name: str = "nightly",
    *,
    created_at: datetime = T0,
    instance: str = "web",
    instance_uuid: str = "11111111-2222-3333-4444-555555555555",
    set_id: str | None = None,
    **kw: Any,
) -> SnapshotSet:
    sid = set_id or str(uuid.uuid4())
    defaults: dict[str, Any] = {
        "requested": Consistency.APPLICATION,
        "status": SetStatus.AVAILABLE,
        "achieved": Consistency.FILESYSTEM,
        "reason": "no application hooks answered",
        "completed_at": created_at + timedelta(seconds=42),
        "freeze_window_ms": 12.5,
        "pause_window_ms": None,
        "members": [member(sid, "vda", boot_order=1), member(sid, "sdb", bus="scsi", format="raw")],
        "metadata": {"owner": "ops", "ticket": "OPS-1"},
        "backup_type": "daily",
        "error": None,
        "instance_state": InstanceState.RUNNING,
    }
    return SnapshotSet(
        id=sid,
        name=name,
        instance_name=instance,
        instance_uuid=instance_uuid,
        created_at=created_at,
        hardware=hardware(),
        **{**defaults, **kw},
    )


def url_for(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "home" / "catalog.sqlite"


__all__ = ["catalog_url", "pg_server", "pg_url"]  # fixtures


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[SqlCatalog]:
    with SqlCatalog(catalog_url) as cat:
        yield cat


def member_count(catalog: SqlCatalog) -> int:
    with catalog.connect("counting members", write=False) as connection:
        count: int = connection.scalar(select(func.count()).select_from(MEMBERS)) or 0
    return count


# -- round trips -----------------------------------------------------------------------------


def test_round_trip_full_set(catalog: SqlCatalog) -> None:
    original = make_set()
    catalog.add_set(original)
    loaded = catalog.get_set(original.id)
    assert loaded == original
    assert loaded.created_at.tzinfo is not None and loaded.created_at.utcoffset() == timedelta(0)
    assert isinstance(loaded.hardware.disks, tuple) and loaded.hardware.disks[0].address == {
        "type": "pci",
        "slot": "0x04",
    }
    assert [m.target for m in loaded.members] == ["vda", "sdb"]  # order preserved


def test_round_trip_minimal_set_and_other_offsets(catalog: SqlCatalog) -> None:
    plus_two = timezone(timedelta(hours=2))
    original = make_set(
        created_at=datetime(2024, 6, 1, 14, 0, tzinfo=plus_two),
        achieved=None,
        reason=None,
        completed_at=None,
        freeze_window_ms=None,
        members=[],
        metadata={},
        backup_type=None,
        instance_state=None,
        status=SetStatus.CREATING,
    )
    catalog.add_set(original)
    loaded = catalog.get_set(original.id)
    assert loaded == original  # same instant
    assert loaded.created_at.tzinfo == UTC
    assert loaded.created_at.hour == 12


def test_update_replaces_every_field_and_members(catalog: SqlCatalog) -> None:
    s = make_set(status=SetStatus.CREATING, completed_at=None, achieved=None)
    catalog.add_set(s)
    s.status = SetStatus.FAILED
    s.error = "capture failed: disk full"
    s.achieved = Consistency.CRASH
    s.completed_at = T0 + timedelta(minutes=3)
    s.pause_window_ms = 3.25
    s.metadata = {"owner": "dev"}
    s.backup_type = "weekly"
    s.name = "renamed"
    s.instance_state = InstanceState.PAUSED
    # Same target as before plus a new one: exercises the (set_id, target) unique constraint.
    s.members = [member(s.id, "vda", sha256="cd" * 32, virtual_size=1), member(s.id, "vdc")]
    catalog.update_set(s)
    assert catalog.get_set(s.id) == s
    assert member_count(catalog) == 2


def test_update_unknown_set(catalog: SqlCatalog) -> None:
    with pytest.raises(SetNotFound):
        catalog.update_set(make_set())


def test_add_twice_is_refused(catalog: SqlCatalog) -> None:
    s = make_set()
    catalog.add_set(s)
    with pytest.raises(InvalidRequest, match="already"):
        catalog.add_set(s)


def test_invalid_sets_are_refused(catalog: SqlCatalog) -> None:
    with pytest.raises(InvalidRequest, match="naive"):
        catalog.add_set(make_set(created_at=datetime(2024, 1, 1)))
    s = make_set()
    s.members.append(member(s.id, "vda"))
    with pytest.raises(InvalidRequest, match="twice"):
        catalog.add_set(s)
    s = make_set()
    s.members[0].set_id = "someone-else"
    with pytest.raises(InvalidRequest, match="belongs to"):
        catalog.add_set(s)
    with pytest.raises(InvalidRequest, match="NUL"):
        catalog.add_set(make_set("nul\x00name"))  # PostgreSQL cannot store it: refused on both
    assert catalog.list_sets() == []


# -- lookups -----------------------------------------------------------------------------------


def test_get_by_full_id_prefix_and_name(catalog: SqlCatalog) -> None:
    a = make_set("alpha", set_id="aaaa1111-0000-0000-0000-000000000000")
    b = make_set("beta", set_id="aaaa2222-0000-0000-0000-000000000000")
    catalog.add_set(a)
    catalog.add_set(b)
    assert catalog.get_set(a.id) == a
    assert catalog.get_set("aaaa1") == a
    assert catalog.get_set("AAAA2") == b  # ids are lowercase UUIDs; accept what a user pastes
    assert catalog.get_set("beta") == b


def test_get_ambiguous_names_the_candidates(catalog: SqlCatalog) -> None:
    a = make_set("alpha", set_id="aaaa1111-0000-0000-0000-000000000000")
    b = make_set("beta", set_id="aaaa2222-0000-0000-0000-000000000000")
    c = make_set("beta")
    for s in (a, b, c):
        catalog.add_set(s)
    with pytest.raises(InvalidRequest) as by_prefix:
        catalog.get_set("aaaa")
    assert a.id in str(by_prefix.value) and b.id in str(by_prefix.value)
    with pytest.raises(InvalidRequest) as by_name:
        catalog.get_set("beta")
    assert b.id in str(by_name.value) and c.id in str(by_name.value)


def test_get_not_found(catalog: SqlCatalog) -> None:
    catalog.add_set(make_set("alpha", set_id="aaaa1111-0000-0000-0000-000000000000"))
    with pytest.raises(SetNotFound, match="'zzzz'"):
        catalog.get_set("zzzz")
    with pytest.raises(SetNotFound, match="'aaa'"):
        catalog.get_set("aaa")  # too short to be a prefix
    with pytest.raises(SetNotFound):
        catalog.get_set("aa%")  # LIKE wildcards are literal
    with pytest.raises(SetNotFound):
        catalog.get_set("aa__")


# -- listing -----------------------------------------------------------------------------------


def test_list_filters_and_order(catalog: SqlCatalog) -> None:
    old = make_set("old", created_at=T0 - timedelta(days=2), metadata={"owner": "ops", "env": "prod"})
    mid = make_set(
        "mid",
        created_at=T0 - timedelta(days=1),
        status=SetStatus.FAILED,
        backup_type="weekly",
        metadata={"owner": "dev"},
    )
    new = make_set("new", created_at=T0, metadata={"owner": "ops", "env": "test"})
    other = make_set(
        "other",
        created_at=T0 - timedelta(hours=1),
        instance="db",
        instance_uuid="99999999-2222-3333-4444-555555555555",
        metadata={},
    )
    for s in (mid, other, old, new):
        catalog.add_set(s)

    def names(sets: list[SnapshotSet]) -> list[str]:
        return [s.name for s in sets]

    assert names(catalog.list_sets()) == ["new", "other", "mid", "old"]
    assert names(catalog.list_sets(instance="web")) == ["new", "mid", "old"]
    assert names(catalog.list_sets(instance="99999999-2222-3333-4444-555555555555")) == ["other"]
    assert names(catalog.list_sets(status=SetStatus.FAILED)) == ["mid"]
    assert names(catalog.list_sets(backup_type="daily")) == ["new", "other", "old"]
    assert names(catalog.list_sets(metadata={"owner": "ops"})) == ["new", "old"]
    assert names(catalog.list_sets(metadata={"owner": "ops", "env": "prod"})) == ["old"]
    assert names(catalog.list_sets(instance="web", status=SetStatus.AVAILABLE, metadata={"env": "test"})) == ["new"]
    assert catalog.list_sets(instance="nope") == []
    assert catalog.list_sets()[0] == new


# -- delete ------------------------------------------------------------------------------------


def test_delete_cascades_members(catalog: SqlCatalog) -> None:
    keep, drop = make_set("keep"), make_set("drop")
    catalog.add_set(keep)
    catalog.add_set(drop)
    assert member_count(catalog) == 4
    catalog.delete_set(drop.id)
    assert member_count(catalog) == 2
    assert catalog.list_sets() == [keep]
    with pytest.raises(SetNotFound):
        catalog.get_set(drop.id)
    with pytest.raises(SetNotFound):
        catalog.delete_set(drop.id)


# -- schema, migrations, SQLite settings -------------------------------------------------------


def head_revision() -> str:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def test_migrates_an_existing_empty_database_and_reopens(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as con:  # a file some other tool left behind, no schema yet
        con.execute("CREATE TABLE unrelated (x INTEGER)")
    s = make_set()
    with SqlCatalog(url_for(db_path)) as cat:
        cat.add_set(s)
    with SqlCatalog(url_for(db_path)) as cat:  # second open is a no-op upgrade
        assert cat.get_set(s.id) == s
    with sqlite3.connect(db_path) as con:
        assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"snapshot_sets", "members", "unrelated", "alembic_version"} <= tables


def test_models_match_migrations(catalog: SqlCatalog) -> None:
    """A schema change without a migration (or the reverse) shows up here, on each backend."""
    with catalog.connect("comparing the schema", write=False) as con:
        diff = compare_metadata(MigrationContext.configure(con, opts={"compare_type": True}), METADATA)
    assert diff == []


def test_schema_revisions_list_every_migration() -> None:
    """Opening a catalog at SCHEMA_HEAD skips Alembic, so the list must match the scripts exactly."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    scripts = ScriptDirectory.from_config(config)
    assert [r.revision for r in reversed(list(scripts.walk_revisions()))] == list(SCHEMA_REVISIONS)
    assert scripts.get_current_head() == SCHEMA_HEAD


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("status", "bogus", "status"),
        ("requested", "perfect", "requested consistency"),
        ("achieved", "total", "achieved consistency"),
        ("instance_state", "levitating", "instance state"),
        ("hardware", '{"vcpus": "two"}', "hardware"),
    ],
)
def test_rows_with_bad_values_are_one_line_catalog_errors(
    catalog: SqlCatalog, column: str, value: str, message: str
) -> None:
    s = make_set()
    catalog.add_set(s)
    cast = "CAST(:value AS JSON)" if column == "hardware" else ":value"
    with catalog.connect("corrupting a row", write=True) as con:
        con.execute(text(f"UPDATE snapshot_sets SET {column} = {cast} WHERE id = :id"), {"value": value, "id": s.id})
    for read in (lambda: catalog.get_set(s.id), catalog.list_sets, lambda: catalog.load_sets([s.id])):
        with pytest.raises(CatalogError, match=message) as caught:
            read()
        assert "\n" not in str(caught.value) and s.id in str(caught.value)
        assert caught.value.__cause__ is None


def test_newer_schema_is_reported(catalog_url: str) -> None:
    with SqlCatalog(catalog_url) as cat, cat.connect("faking a newer schema", write=True) as con:
        con.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(CatalogError, match="newer freezeframe"):
        SqlCatalog(catalog_url)


def test_unusable_paths_raise_catalog_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CatalogError, match="directory"):
        SqlCatalog(url_for(blocker / "catalog.sqlite"))
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a SQLite database at all" * 100)
    with pytest.raises(CatalogError, match="SQLite file"):
        SqlCatalog(url_for(garbage))
    with pytest.raises(CatalogError, match="not valid"):
        SqlCatalog("not a url")


def test_locked_database_raises_catalog_error(db_path: Path) -> None:
    with SqlCatalog(url_for(db_path), busy_timeout_s=0.2) as cat:
        holder = sqlite3.connect(db_path, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            with pytest.raises(CatalogError, match="locked"):
                cat.add_set(make_set())
        finally:
            holder.close()
        cat.add_set(make_set())  # usable again once the other writer is gone


def test_reader_is_not_blocked_by_a_writer(db_path: Path) -> None:
    """WAL: a CLI can list while a service holds a write transaction."""
    catalog = SqlCatalog(url_for(db_path))
    s = make_set()
    catalog.add_set(s)
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("UPDATE snapshot_sets SET name = 'uncommitted'")
        assert [x.name for x in catalog.list_sets()] == [s.name]
    finally:
        holder.close()
        catalog.close()


def test_in_memory_catalog(tmp_path: Path) -> None:
    with SqlCatalog("sqlite://") as cat:
        s = make_set()
        cat.add_set(s)
        assert cat.list_sets() == [s]


# -- concurrency -------------------------------------------------------------------------------


def _open_and_add(url: str, barrier: Any, name: str) -> None:
    barrier.wait(timeout=60)
    with SqlCatalog(url) as cat:
        cat.add_set(make_set(name))


def test_processes_opening_a_fresh_database_concurrently(catalog_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    workers = 4
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_open_and_add, args=(catalog_url, barrier, f"p{i}")) for i in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers
    with SqlCatalog(catalog_url) as cat:
        assert sorted(s.name for s in cat.list_sets()) == [f"p{i}" for i in range(workers)]


# -- property ----------------------------------------------------------------------------------

texts = st.text(max_size=40)
offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: timezone(timedelta(minutes=m)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=80),
    metadata=st.dictionaries(texts, texts, max_size=6),
    member_metadata=st.dictionaries(texts, texts, max_size=3),
    created_at=st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(9000, 1, 1),
        timezones=offsets,
    ),
    freeze_ms=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    size=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_round_trip_property(
    catalog: SqlCatalog,
    name: str,
    metadata: dict[str, str],
    member_metadata: dict[str, str],
    created_at: datetime,
    freeze_ms: float | None,
    size: int,
) -> None:
    s = make_set(name, created_at=created_at, metadata=metadata, freeze_window_ms=freeze_ms)
    s.members = [member(s.id, "vda", metadata=member_metadata, virtual_size=size)]
    catalog.add_set(s)
    assert catalog.get_set(s.id) == s
    assert s in catalog.list_sets(metadata=metadata)


def test_listings_read_in_batches_and_keep_their_order(catalog: SqlCatalog, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large catalogs are read a batch of ids at a time (a statement holds only so many parameters)."""
    monkeypatch.setattr("freezeframe.adapters.catalog.LOAD_BATCH", 3)
    made = [make_set(f"s{i}", created_at=T0 + timedelta(minutes=i)) for i in range(7)]
    for s in made:
        catalog.add_set(s)
    assert catalog.list_sets() == made[::-1]
    assert catalog.load_sets([made[5].id, "nope", made[0].id]) == [made[5], made[0]]
