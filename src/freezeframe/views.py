"""Old names of ``freezeframe.serialize`` for the CLI until it imports that module directly; remove after merge."""

from __future__ import annotations

from typing import Any

from freezeframe.model import SnapshotSet
from freezeframe.serialize import instance_to_dict as instance_view
from freezeframe.serialize import member_to_dict as member_view
from freezeframe.serialize import set_to_dict


def set_view(snapshot_set: SnapshotSet, with_hardware: bool = True) -> dict[str, Any]:
    return set_to_dict(snapshot_set, hardware=with_hardware)


__all__ = ["instance_view", "member_view", "set_view"]
