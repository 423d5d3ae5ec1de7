"""The one dict form of groups and group sets (``--json``, the HTTP API); a group set lists its sets in full."""

from __future__ import annotations

from typing import Any

from freezeframe.group_model import Group, GroupSet
from freezeframe.ops.groups import GroupSetView
from freezeframe.serialize import set_to_dict


def group_to_dict(group: Group) -> dict[str, Any]:
    return {
        "name": group.name,
        "created_at": group.created_at.isoformat(),
        "instances": [{"name": m.instance_name, "uuid": m.instance_uuid} for m in group.members],
    }


def group_set_summary(g: GroupSet) -> dict[str, Any]:
    return {
        "id": g.id,
        "name": g.name,
        "kind": "group_set",
        "group": g.group_name,
        "status": str(g.status),
        "consistency": {"requested": str(g.requested), "achieved": str(g.achieved) if g.achieved else None},
        "window_ms": g.window_ms,
        "created_at": g.created_at.isoformat(),
        "completed_at": g.completed_at.isoformat() if g.completed_at else None,
        "backup_type": g.backup_type,
        "error": g.error,
        "instances": [{"name": m.instance_name, "uuid": m.instance_uuid} for m in g.instances],
    }


def group_set_to_dict(view: GroupSetView, *, hardware: bool = True) -> dict[str, Any]:
    record = group_set_summary(view.group_set)
    record["sets"] = [set_to_dict(s, hardware=hardware) for s in view.sets]
    record["missing_sets"] = view.missing
    return record
