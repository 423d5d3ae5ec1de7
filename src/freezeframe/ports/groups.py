"""Where consistency groups and group sets are recorded (the catalog, in its own tables)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from freezeframe.group_model import Group, GroupMember, GroupSet
from freezeframe.model import SetStatus


class Groups(Protocol):
    def create_group(self, group: Group) -> None:
        """Raise InvalidRequest when a group of that name exists."""

    def get_group(self, name: str) -> Group:
        """Raise GroupNotFound."""

    def list_groups(self) -> list[Group]: ...

    def set_members(self, name: str, members: Sequence[GroupMember]) -> None: ...

    def delete_group(self, name: str) -> None: ...

    def add_group_set(self, group_set: GroupSet) -> None: ...

    def update_group_set(self, group_set: GroupSet) -> None: ...

    def get_group_set(self, ref: str) -> GroupSet:
        """By full id, unique id prefix or unique name; raise GroupNotFound otherwise."""

    def list_group_sets(self, group: str | None = None, status: SetStatus | None = None) -> list[GroupSet]:
        """Newest first; only those of ``group`` and in ``status`` when given."""

    def delete_group_set(self, group_set_id: str) -> None: ...
