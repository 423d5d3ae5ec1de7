"""Plain-dict views of domain objects, shared by `--json` output and the HTTP API."""

from __future__ import annotations

from typing import Any

from freezeframe.model import Instance, Member, SnapshotSet


def member_view(member: Member) -> dict[str, Any]:
    return {
        "target": member.target,
        "bus": member.bus,
        "boot_order": member.boot_order,
        "size": member.virtual_size,
        "format": member.format,
        "path": member.path,
        "source_path": member.source_path,
        "sha256": member.sha256,
        "metadata": dict(member.metadata),
    }


def set_view(snapshot_set: SnapshotSet, with_hardware: bool = True) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": snapshot_set.id,
        "name": snapshot_set.name,
        "status": str(snapshot_set.status),
        "instance": {"name": snapshot_set.instance_name, "uuid": snapshot_set.instance_uuid},
        "instance_state": str(snapshot_set.instance_state) if snapshot_set.instance_state else None,
        "consistency": {
            "requested": str(snapshot_set.requested),
            "achieved": str(snapshot_set.achieved) if snapshot_set.achieved else None,
            "reason": snapshot_set.reason,
        },
        "freeze_window_ms": snapshot_set.freeze_window_ms,
        "pause_window_ms": snapshot_set.pause_window_ms,
        "created_at": snapshot_set.created_at.isoformat(),
        "completed_at": snapshot_set.completed_at.isoformat() if snapshot_set.completed_at else None,
        "backup_type": snapshot_set.backup_type,
        "metadata": dict(snapshot_set.metadata),
        "error": snapshot_set.error,
        "members": [member_view(m) for m in snapshot_set.members],
    }
    if with_hardware:
        view["hardware"] = snapshot_set.hardware.to_dict()
    return view


def instance_view(instance: Instance) -> dict[str, Any]:
    return {
        "name": instance.name,
        "uuid": instance.uuid,
        "state": str(instance.state),
        "vcpus": instance.hardware.vcpus,
        "memory_kib": instance.hardware.memory_kib,
        "disks": [
            {
                "target": d.target,
                "device": d.device,
                "bus": d.bus,
                "format": d.format,
                "source": d.source_path,
                "size": d.virtual_size,
                "readonly": d.readonly,
                "shareable": d.shareable,
            }
            for d in instance.hardware.disks
        ],
    }
