"""Listings of snapshot sets in SQL: a ``SetFilter`` becomes indexed conditions, a page is one keyset range scan.

Every filter has an index ending in ``(created_at, id)`` (``catalog_schema.SET_INDEXES``), and pages are read
newest first by exactly that key, so the database walks one index from the cursor and stops after ``limit`` rows:
page 1 and page 20,000 cost the same on SQLite and PostgreSQL. Metadata filters drive the scan from
``set_metadata`` (key, value, created_at, set_id). What the filters need of a set (project, kind, metadata rows) is
derived here on every write, and by migration 0005 for sets written before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, exists, func, literal, or_, select, tuple_
from sqlalchemy.engine import Connection

from freezeframe.adapters.catalog_schema import SET_METADATA, SETS
from freezeframe.incremental import FULL, INCREMENTAL, KIND_KEY
from freezeframe.set_query import GROUP_KEY, PROJECT_KEY, Cursor, SetFilter

SHORT_VALUE = 120


def encoded(text: str) -> str:
    """What ``set_metadata`` holds for a key or value: ``=`` and the text itself, or ``#`` and its SHA-256 when it
    is long or holds a NUL (PostgreSQL text cannot): index entries stay small and exact on both databases."""
    if len(text) <= SHORT_VALUE and "\x00" not in text:
        return "=" + text
    return "#" + hashlib.sha256(text.encode()).hexdigest()


def derived_columns(metadata: Mapping[str, Any], member_metadata: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The filter columns of a set row that come from its metadata and members."""
    project = metadata.get(PROJECT_KEY)
    incremental = any(m.get(KIND_KEY) == INCREMENTAL for m in member_metadata)
    return {"project": project or None, "kind": INCREMENTAL if incremental else FULL}


def metadata_rows(set_id: str, metadata: Mapping[str, Any], created_at: datetime) -> list[dict[str, Any]]:
    return [
        {"set_id": set_id, "key": encoded(key), "value": encoded(str(value)), "created_at": created_at}
        for key, value in metadata.items()
    ]


def instance_uuids(connection: Connection, ref: str) -> list[str]:
    """The UUIDs ``ref`` names: itself if sets of that UUID exist, and the UUIDs of instances named ``ref``, each
    found by one index seek (a skip scan over ``(instance_name, instance_uuid)``: an instance has thousands of
    sets, but few UUIDs share a name). ``[ref]`` when nothing matches."""
    has_uuid = connection.scalar(select(SETS.c.id).where(SETS.c.instance_uuid == ref).limit(1)) is not None
    found = [ref] if has_uuid else []
    last = ""
    while len(found) < 64:
        query = select(func.min(SETS.c.instance_uuid)).where(SETS.c.instance_name == ref, SETS.c.instance_uuid > last)
        uuid: str | None = connection.scalar(query)
        if uuid is None:
            break
        if uuid != ref:
            found.append(uuid)
        last = uuid
    return found or [ref]


def lookup_query(ref: str, min_prefix: int) -> Select[Any]:
    """Sets named ``ref`` or whose id starts with it: index seeks on the name index and the primary key (a range
    ``id >= p AND id < p || '~'``, as a bare LIKE is no index seek under either database's default collation;
    LIKE then keeps the range exact)."""
    found = [SETS.c.name == ref]
    if len(ref) >= min_prefix:
        found += [
            and_(SETS.c.id >= p, SETS.c.id < p + "~", SETS.c.id.startswith(p, autoescape=True))
            for p in {ref, ref.lower()}
        ]
    return select(SETS.c.id, SETS.c.name).where(or_(*found)).order_by(SETS.c.created_at.desc(), SETS.c.id)


def conditions(connection: Connection, wanted: SetFilter) -> list[ColumnElement[bool]]:
    """The WHERE clause of a filter, each term served by an index (metadata is joined, see ``page_query``)."""
    where: list[ColumnElement[bool]] = []
    if wanted.instance is not None:
        uuids = instance_uuids(connection, wanted.instance)
        where.append(SETS.c.instance_uuid == uuids[0] if len(uuids) == 1 else SETS.c.instance_uuid.in_(uuids))
    if wanted.status is not None:
        where.append(SETS.c.status == wanted.status.value)
    if wanted.backup_type is not None:
        where.append(SETS.c.backup_type == wanted.backup_type)
    if wanted.kind is not None:
        where.append(SETS.c.kind == wanted.kind)
    if wanted.host is not None:
        where.append(SETS.c.host == wanted.host)
    if wanted.project is not None:
        pinned = SETS.c.project == wanted.project
        if wanted.project_instances:
            unpinned = and_(SETS.c.project.is_(None), SETS.c.instance_uuid.in_(list(wanted.project_instances)))
            where.append(or_(pinned, unpinned))
        else:
            where.append(pinned)
    if wanted.since is not None:
        where.append(SETS.c.created_at >= wanted.since)
    if wanted.until is not None:
        where.append(SETS.c.created_at < wanted.until)
    return where


def _metadata_wanted(wanted: SetFilter) -> dict[str, str]:
    pairs = dict(wanted.metadata)
    if wanted.group is not None:
        pairs[GROUP_KEY] = wanted.group
    return pairs


def page_query(connection: Connection, wanted: SetFilter, limit: int, cursor: Cursor | None) -> Select[Any]:
    """Ids (and keys) of one page, newest first. With a metadata filter the first pair drives the scan through
    ``set_metadata``'s ordered index and the others are EXISTS probes; otherwise the planner picks the filter's
    ``(column, created_at, id)`` index."""
    pairs = list(_metadata_wanted(wanted).items())
    where = conditions(connection, wanted)
    if pairs:
        first_key, first_value = pairs[0]
        driver = SET_METADATA.alias("m")
        created, set_id = driver.c.created_at, driver.c.set_id
        query = select(SETS.c.id, SETS.c.created_at).select_from(driver.join(SETS, SETS.c.id == driver.c.set_id))
        where += [driver.c.key == encoded(first_key), driver.c.value == encoded(first_value)]
        for key, value in pairs[1:]:
            probe = SET_METADATA.alias()
            where.append(
                exists().where(
                    probe.c.set_id == SETS.c.id, probe.c.key == encoded(key), probe.c.value == encoded(value)
                )
            )
    else:
        created, set_id = SETS.c.created_at, SETS.c.id
        query = select(SETS.c.id, SETS.c.created_at)
    if cursor is not None:
        after = tuple_(literal(cursor.created_at, SETS.c.created_at.type), literal(cursor.set_id, SETS.c.id.type))
        where.append(tuple_(created, set_id) < after)
    return query.where(*where).order_by(created.desc(), set_id.desc()).limit(limit)


def count_query(
    connection: Connection, wanted: SetFilter, bound: int | None, cursor: Cursor | None = None
) -> Select[Any]:
    """How many sets match (after ``cursor``), reading at most ``bound`` index entries (None: exact, a full scan)."""
    inner = page_query(connection, wanted, bound or 1, cursor).order_by(None).limit(bound)
    return select(func.count()).select_from(inner.subquery())
