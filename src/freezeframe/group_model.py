"""Consistency groups: named lists of instances snapshotted at one point in time, and the group sets they make.

A group set is a record holding one ordinary set per instance; each of those sets carries the group set's UUID
in its metadata (``GROUP_SET_KEY``), so every tool that reads sets (list, show, export, restore) sees the link.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from freezeframe.model import Consistency, SetStatus

GROUP_SET_KEY = "freezeframe.group_set"
"""Set metadata: the UUID of the group set the set belongs to."""
GROUP_KEY = "freezeframe.group"
"""Set metadata: the name of the group whose snapshot made the set."""


@dataclass(frozen=True)
class GroupMember:
    instance_uuid: str
    instance_name: str


@dataclass(frozen=True)
class Group:
    name: str
    members: tuple[GroupMember, ...]
    created_at: datetime

    def member_uuids(self) -> list[str]:
        return [m.instance_uuid for m in self.members]


@dataclass
class GroupSet:
    """One point in time across the instances of a group; its sets are found by ``GROUP_SET_KEY``."""

    id: str
    name: str
    group_name: str
    requested: Consistency
    status: SetStatus
    created_at: datetime
    instances: list[GroupMember] = field(default_factory=list)
    achieved: Consistency | None = None
    """The weakest level any member reached (a member may have fallen back, see its set's reason)."""
    completed_at: datetime | None = None
    window_ms: float | None = None
    """From the first freeze/pause of any member to the last release: how long the group's guests were held."""
    error: str | None = None
    backup_type: str | None = None
