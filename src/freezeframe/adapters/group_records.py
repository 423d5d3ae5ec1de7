"""Consistency groups and group sets over a ``SqlCatalog``'s connections (tables declared in ``catalog_schema``).

Kept apart from the Catalog port so that port stays unchanged, like ``restore_log``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, or_, select, update

from freezeframe.adapters.catalog import MIN_PREFIX, SqlCatalog
from freezeframe.adapters.catalog_schema import GROUP_MEMBERS, GROUP_SETS, GROUPS
from freezeframe.errors import GroupNotFound, InvalidRequest
from freezeframe.group_model import Group, GroupMember, GroupSet
from freezeframe.model import Consistency, SetStatus


class SqlGroups:
    """The Groups port: ``instance_groups``, ``instance_group_members`` and ``group_sets``."""

    def __init__(self, catalog: SqlCatalog) -> None:
        self._catalog = catalog

    # ---- groups -------------------------------------------------------------------------------------------

    def create_group(self, group: Group) -> None:
        with self._catalog.connect(f"creating group {group.name}", write=True) as connection:
            if connection.scalar(select(GROUPS.c.name).where(GROUPS.c.name == group.name)) is not None:
                raise InvalidRequest(f"a group named {group.name!r} exists already; pick another name")
            connection.execute(insert(GROUPS).values(name=group.name, created_at=group.created_at))
            _write_members(connection, group.name, group.members)

    def get_group(self, name: str) -> Group:
        with self._catalog.connect(f"reading group {name}", write=False) as connection:
            row = connection.execute(select(GROUPS).where(GROUPS.c.name == name)).first()
            if row is None:
                raise GroupNotFound(f"no group named {name!r}; `freezeframe group list` shows the groups")
            return _group(connection, row)

    def list_groups(self) -> list[Group]:
        with self._catalog.connect("listing groups", write=False) as connection:
            return [_group(connection, row) for row in connection.execute(select(GROUPS).order_by(GROUPS.c.name))]

    def set_members(self, name: str, members: Sequence[GroupMember]) -> None:
        with self._catalog.connect(f"changing group {name}", write=True) as connection:
            if connection.scalar(select(GROUPS.c.name).where(GROUPS.c.name == name)) is None:
                raise GroupNotFound(f"no group named {name!r}")
            connection.execute(delete(GROUP_MEMBERS).where(GROUP_MEMBERS.c.group_name == name))
            _write_members(connection, name, members)

    def delete_group(self, name: str) -> None:
        with self._catalog.connect(f"deleting group {name}", write=True) as connection:
            connection.execute(delete(GROUP_MEMBERS).where(GROUP_MEMBERS.c.group_name == name))
            if connection.execute(delete(GROUPS).where(GROUPS.c.name == name)).rowcount == 0:
                raise GroupNotFound(f"no group named {name!r}")

    # ---- group sets ---------------------------------------------------------------------------------------

    def add_group_set(self, group_set: GroupSet) -> None:
        with self._catalog.connect(f"adding group set {group_set.id}", write=True) as connection:
            connection.execute(insert(GROUP_SETS).values(id=group_set.id, **_columns(group_set)))

    def update_group_set(self, group_set: GroupSet) -> None:
        with self._catalog.connect(f"updating group set {group_set.id}", write=True) as connection:
            query = update(GROUP_SETS).where(GROUP_SETS.c.id == group_set.id).values(**_columns(group_set))
            if connection.execute(query).rowcount == 0:
                raise GroupNotFound(f"group set {group_set.id} is not in the catalog")

    def get_group_set(self, ref: str) -> GroupSet:
        conditions = [GROUP_SETS.c.id == ref, GROUP_SETS.c.name == ref]
        if len(ref) >= MIN_PREFIX:
            conditions.append(GROUP_SETS.c.id.startswith(ref.lower(), autoescape=True))
        with self._catalog.connect(f"reading group set {ref}", write=False) as connection:
            rows = list(connection.execute(select(GROUP_SETS).where(or_(*conditions))))
        exact = [r for r in rows if r.id == ref]
        if exact or len(rows) == 1:
            return _group_set((exact or rows)[0])
        if rows:
            raise InvalidRequest(f"{ref!r} names {len(rows)} group sets; give more of the id")
        raise GroupNotFound(f"no group set {ref!r}; `freezeframe group sets` lists them")

    def list_group_sets(self, group: str | None = None, status: SetStatus | None = None) -> list[GroupSet]:
        query = select(GROUP_SETS).order_by(GROUP_SETS.c.created_at.desc(), GROUP_SETS.c.id)
        if group is not None:
            query = query.where(GROUP_SETS.c.group_name == group)
        if status is not None:
            query = query.where(GROUP_SETS.c.status == str(status))
        with self._catalog.connect("listing group sets", write=False) as connection:
            return [_group_set(row) for row in connection.execute(query)]

    def delete_group_set(self, group_set_id: str) -> None:
        with self._catalog.connect(f"deleting group set {group_set_id}", write=True) as connection:
            connection.execute(delete(GROUP_SETS).where(GROUP_SETS.c.id == group_set_id))


def _write_members(connection: Connection, name: str, members: Sequence[GroupMember]) -> None:
    rows = [
        {"group_name": name, "position": k, "instance_uuid": m.instance_uuid, "instance_name": m.instance_name}
        for k, m in enumerate(members)
    ]
    if rows:
        connection.execute(insert(GROUP_MEMBERS), rows)


def _group(connection: Connection, row: Row[Any]) -> Group:
    query = select(GROUP_MEMBERS).where(GROUP_MEMBERS.c.group_name == row.name).order_by(GROUP_MEMBERS.c.position)
    members = tuple(GroupMember(m.instance_uuid, m.instance_name) for m in connection.execute(query))
    return Group(row.name, members, row.created_at)


def _columns(group_set: GroupSet) -> dict[str, Any]:
    return {
        "name": group_set.name,
        "group_name": group_set.group_name,
        "requested": str(group_set.requested),
        "achieved": str(group_set.achieved) if group_set.achieved else None,
        "status": str(group_set.status),
        "created_at": group_set.created_at,
        "completed_at": group_set.completed_at,
        "window_ms": group_set.window_ms,
        "error": group_set.error,
        "backup_type": group_set.backup_type,
        "instances": [{"uuid": m.instance_uuid, "name": m.instance_name} for m in group_set.instances],
    }


def _group_set(row: Row[Any]) -> GroupSet:
    return GroupSet(
        id=row.id,
        name=row.name,
        group_name=row.group_name,
        requested=Consistency(row.requested),
        status=SetStatus(row.status),
        created_at=row.created_at,
        instances=[GroupMember(str(m["uuid"]), str(m["name"])) for m in row.instances],
        achieved=Consistency(row.achieved) if row.achieved else None,
        completed_at=row.completed_at,
        window_ms=row.window_ms,
        error=row.error,
        backup_type=row.backup_type,
    )
