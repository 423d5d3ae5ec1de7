"""Listings filtered and paged in the database (keyset cursors), their indexes, and migration 0005 of existing
catalogs, on SQLite and on the PostgreSQL test bed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, Table, create_engine, insert, text, update

from freezeframe.adapters.catalog import MIGRATIONS_DIR, SqlCatalog
from freezeframe.adapters.catalog_query import lookup_query, page_query
from freezeframe.adapters.catalog_schema import SCHEMA_HEAD, SETS
from freezeframe.errors import InvalidRequest
from freezeframe.model import SetStatus, SnapshotSet
from freezeframe.serialize import set_to_dict
from freezeframe.set_query import GROUP_KEY, PROJECT_KEY, Cursor, SetFilter
from pg_helpers import catalog_url, pg_server, pg_url
from test_catalog import T0, make_set, member

__all__ = ["catalog_url", "pg_server", "pg_url"]  # fixtures


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[SqlCatalog]:
    with SqlCatalog(catalog_url) as cat:
        yield cat


def names(sets: list[SnapshotSet]) -> list[str]:
    return [s.name for s in sets]


def add_many(catalog: SqlCatalog, count: int, **kw: Any) -> list[SnapshotSet]:
    made = [make_set(f"s{i:03d}", created_at=T0 + timedelta(minutes=i), **kw) for i in range(count)]
    for s in made:
        catalog.add_set(s)
    return made


def test_keyset_pages_cover_every_set_once_newest_first(catalog: SqlCatalog) -> None:
    made = add_many(catalog, 25)
    # Two sets at the same instant: the id breaks the tie, so no row is lost or repeated at a page edge.
    twin = make_set("twin", created_at=made[14].created_at, set_id="ffffffff-0000-0000-0000-000000000000")
    catalog.add_set(twin)
    seen: list[SnapshotSet] = []
    cursor = None
    pages = 0
    while True:
        page = catalog.page_sets(SetFilter(), 10, cursor)
        pages += 1
        seen += page.sets
        if page.next_cursor is None:
            break
        if pages == 1:  # a newer set added between pages does not shift what follows
            catalog.add_set(make_set("late", created_at=T0 + timedelta(days=1)))
        cursor = Cursor.decode(page.next_cursor)
    assert pages == 3
    expected = sorted([*made, twin], key=lambda s: (s.created_at, s.id), reverse=True)
    assert [s.id for s in seen] == [s.id for s in expected]
    exact = catalog.page_sets(SetFilter(), 27)  # 27 sets now: a full last page says there is no more
    assert len(exact.sets) == 27 and exact.next_cursor is None
    assert catalog.count_sets(SetFilter()) == 27 and catalog.count_sets(SetFilter(), bound=5) == 5


def test_every_filter_runs_in_the_database(catalog: SqlCatalog) -> None:
    web_old = make_set("web-old", created_at=T0, metadata={"env": "prod", PROJECT_KEY: "alpha"})
    web = make_set("web", created_at=T0 + timedelta(hours=1), metadata={"env": "test", "note": "x" * 500})
    recreated = make_set("web-new-uuid", created_at=T0 + timedelta(hours=2), instance_uuid="22222222-0000",
                         status=SetStatus.FAILED, backup_type="weekly", metadata={GROUP_KEY: "shop"})  # fmt: skip
    inc = make_set("db-inc", created_at=T0 + timedelta(hours=3), instance="db", instance_uuid="33333333-0000")
    inc.members = [member(inc.id, "vda", metadata={"freezeframe.kind": "incremental"})]
    for s in (web_old, web, recreated, inc):
        catalog.add_set(s)
    with catalog.connect("placing a set on a host", write=True) as connection:
        connection.execute(update(SETS).where(SETS.c.id == inc.id).values(host="hv1"))

    def listed(**kw: Any) -> list[str]:
        return names(catalog.page_sets(SetFilter(**kw), 50).sets)

    assert listed() == ["db-inc", "web-new-uuid", "web", "web-old"]
    assert listed(instance="web") == ["web-new-uuid", "web", "web-old"]  # the name follows both UUIDs
    assert listed(instance="22222222-0000") == ["web-new-uuid"]
    assert listed(status=SetStatus.FAILED) == ["web-new-uuid"]
    assert listed(backup_type="weekly") == ["web-new-uuid"]
    assert listed(metadata={"env": "prod"}) == ["web-old"]
    assert listed(metadata={"note": "x" * 500}) == ["web"] and listed(metadata={"note": "x" * 499}) == []
    assert listed(metadata={"env": "test", "note": "x" * 500}) == ["web"]
    assert listed(metadata={"env": "test", "note": "y"}) == []
    assert listed(group="shop") == ["web-new-uuid"]
    assert listed(kind="incremental") == ["db-inc"] and "db-inc" not in listed(kind="full")
    assert listed(host="hv1") == ["db-inc"]
    assert listed(since=T0 + timedelta(hours=1), until=T0 + timedelta(hours=3)) == ["web-new-uuid", "web"]
    # Pinned sets belong to their project; unpinned ones to the project their instance is in now.
    assert listed(project="alpha") == ["web-old"]
    assert listed(project="alpha", project_instances=("33333333-0000",)) == ["db-inc", "web-old"]
    assert listed(instance="web", status=SetStatus.AVAILABLE, metadata={"env": "test"}) == ["web"]
    with pytest.raises(InvalidRequest, match="kind"):
        SetFilter(kind="differential")


def test_metadata_rows_follow_updates_and_deletes(catalog: SqlCatalog) -> None:
    s = make_set(metadata={"env": "prod"})
    catalog.add_set(s)
    s.metadata = {"env": "test"}
    catalog.update_set(s)
    assert catalog.page_sets(SetFilter(metadata={"env": "prod"}), 10).sets == []
    assert catalog.page_sets(SetFilter(metadata={"env": "test"}), 10).sets == [s]
    catalog.delete_set(s.id)
    assert catalog.page_sets(SetFilter(metadata={"env": "test"}), 10).sets == []


def test_streaming_reads_a_batch_at_a_time(catalog: SqlCatalog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("freezeframe.adapters.catalog.STREAM_BATCH", 4)
    made = add_many(catalog, 10)
    reads: list[int] = []
    real = catalog.load_sets

    def counting(ids: list[str]) -> list[SnapshotSet]:
        reads.append(len(ids))
        return real(ids)

    monkeypatch.setattr(catalog, "load_sets", counting)
    assert [s.id for s in catalog.iter_sets(SetFilter())] == [s.id for s in reversed(made)]
    assert reads == [4, 4, 2]


@pytest.mark.parametrize("token", ["", "not-a-cursor", "x" * 300, Cursor(T0, "a").encode()[:-3] + "!!!"])
def test_bad_cursors_are_invalid_requests(token: str) -> None:
    with pytest.raises(InvalidRequest, match="cursor"):
        Cursor.decode(token)


def test_cursor_round_trip() -> None:
    cursor = Cursor(T0, "aaaa-bbbb")
    assert Cursor.decode(cursor.encode()) == cursor


FILTERS = {
    "first page": SetFilter(),
    "instance": SetFilter(instance="web"),
    "status": SetFilter(status=SetStatus.FAILED),
    "backup type": SetFilter(backup_type="daily"),
    "project": SetFilter(project="alpha"),
    "kind": SetFilter(kind="incremental"),
    "host": SetFilter(host="hv1"),
    "metadata": SetFilter(metadata={"owner": "ops"}),
    "time range": SetFilter(since=T0, until=T0 + timedelta(days=1)),
}


@pytest.mark.parametrize("label", list(FILTERS))
def test_each_listing_is_an_ordered_index_scan(catalog: SqlCatalog, catalog_url: str, label: str) -> None:
    """The plan of a deep page reads an index in order: no full scan of the sets and no sort of all matches."""
    add_many(catalog, 5)
    cursor = Cursor(T0 + timedelta(minutes=3), "ffffffff")
    with catalog.connect("explaining", write=False) as connection:
        query = page_query(connection, FILTERS[label], 51, cursor)
        sql = str(query.compile(connection, compile_kwargs={"literal_binds": True}))
        if catalog_url.startswith("sqlite"):
            plan = " | ".join(str(r[-1]) for r in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
            assert "TEMP B-TREE" not in plan and "SCAN snapshot_sets" not in plan, plan
        else:
            # Tiny tables: make the planner show the paths it has, not what is cheapest for five rows.
            connection.exec_driver_sql("SET enable_seqscan = off")
            connection.exec_driver_sql("SET enable_sort = off")
            plan = " | ".join(r[0] for r in connection.exec_driver_sql(f"EXPLAIN {sql}"))
            assert "Sort" not in plan and "Seq Scan on snapshot_sets" not in plan, plan


def test_show_by_prefix_or_name_is_an_index_lookup(catalog: SqlCatalog, catalog_url: str) -> None:
    add_many(catalog, 5)
    with catalog.connect("explaining", write=False) as connection:
        sql = str(lookup_query("abcd12", 4).compile(connection, compile_kwargs={"literal_binds": True}))
        if catalog_url.startswith("sqlite"):
            plan = " | ".join(str(r[-1]) for r in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
            assert "SCAN snapshot_sets" not in plan, plan
        else:
            connection.exec_driver_sql("SET enable_seqscan = off")
            plan = " | ".join(r[0] for r in connection.exec_driver_sql(f"EXPLAIN {sql}"))
            assert "Seq Scan" not in plan, plan


# -- migration 0005 on an existing catalog ----------------------------------------------------------------


def _alembic_config(connection: Any) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    return config


def _old_row(s: SnapshotSet) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    record = set_to_dict(s)
    row = {
        "id": s.id, "name": s.name, "instance_name": s.instance_name, "instance_uuid": s.instance_uuid,
        "requested": record["consistency"]["requested"], "achieved": record["consistency"]["achieved"],
        "reason": s.reason, "status": record["status"], "created_at": s.created_at, "completed_at": s.completed_at,
        "freeze_window_ms": s.freeze_window_ms, "pause_window_ms": None, "hardware": record["hardware"],
        "metadata": record["metadata"], "backup_type": s.backup_type, "error": None,
        "instance_state": record["instance_state"],
    }  # fmt: skip
    members = [
        {"set_id": s.id, "target": m["target"], "bus": m["bus"], "boot_order": m["boot_order"],
         "virtual_size": m["size"], "format": m["format"], "path": m["path"], "source_path": m["source_path"],
         "sha256": m["sha256"], "metadata": m["metadata"]}
        for m in record["members"]
    ]  # fmt: skip
    return row, members


def test_a_revision_0004_catalog_is_upgraded_and_back_filled(catalog_url: str) -> None:
    """A catalog written before revision 0005 (its sets in the old tables only) gains the filter columns, the
    metadata rows and the indexes, and every filter finds its old sets."""
    old = make_set("old", metadata={"env": "prod", PROJECT_KEY: "alpha"})
    inc = make_set("old-inc", created_at=T0 + timedelta(hours=1))
    inc.members = [member(inc.id, "vda", metadata={"freezeframe.kind": "incremental"})]
    if catalog_url.startswith("sqlite:///"):
        Path(catalog_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(catalog_url)
    try:
        with engine.begin() as connection:
            command.upgrade(_alembic_config(connection), "0004")
            tables = MetaData()
            sets = Table("snapshot_sets", tables, autoload_with=connection)
            members = Table("members", tables, autoload_with=connection)
            for s in (old, inc):
                row, member_rows = _old_row(s)
                connection.execute(insert(sets).values(**{**row, "created_at": s.created_at, "completed_at": None}))
                connection.execute(insert(members), member_rows)
    finally:
        engine.dispose()
    with SqlCatalog(catalog_url) as cat:
        with cat.connect("reading the revision", write=False) as connection:
            assert connection.scalar(text("SELECT version_num FROM alembic_version")) == SCHEMA_HEAD
        assert names(cat.page_sets(SetFilter(metadata={"env": "prod"}), 10).sets) == ["old"]
        assert names(cat.page_sets(SetFilter(project="alpha"), 10).sets) == ["old"]
        assert names(cat.page_sets(SetFilter(kind="incremental"), 10).sets) == ["old-inc"]
        assert names(cat.page_sets(SetFilter(kind="full"), 10).sets) == ["old"]
        assert cat.get_set(old.id[:8]).name == "old"
