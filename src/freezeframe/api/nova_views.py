"""Our instances and sets in the shapes Nova and Glance clients parse (servers; images of the v2 Image API).

A server is a libvirt instance (its disks are its volumes, so ``image`` is empty, as for a volume-backed server);
an image is a snapshot set, with the properties Nova gives a volume-backed snapshot (``block_device_mapping``
listing every member) plus the set's own. No host paths: members are named by target.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from freezeframe.api.nova import EMBEDDED_FLAVOR, NOVA_PREFIX
from freezeframe.model import Instance, InstanceState, Member, SetStatus, SnapshotSet
from freezeframe.ops.compute import display_name, user_metadata

_STATUS = {
    InstanceState.RUNNING: ("ACTIVE", "active", 1),
    InstanceState.PAUSED: ("PAUSED", "paused", 3),
    InstanceState.SHUTOFF: ("SHUTOFF", "stopped", 4),
}
_EPOCH = "1970-01-01T00:00:00Z"
IMAGE_STATUS = {
    SetStatus.CREATING: "saving",
    SetStatus.AVAILABLE: "active",
    SetStatus.FAILED: "killed",
    SetStatus.DELETING: "pending_delete",
}


def _links(base: str, kind: str, ident: str) -> list[dict[str, str]]:
    return [
        {"rel": "self", "href": f"{base}{NOVA_PREFIX}/{kind}/{ident}"},
        {"rel": "bookmark", "href": f"{base}/{kind}/{ident}"},
    ]


def server_summary(instance: Instance, base: str) -> dict[str, Any]:
    return {"id": instance.uuid, "name": instance.name, "links": _links(base, "servers", instance.uuid)}


def _flavor(instance: Instance, base: str, version: tuple[int, int]) -> dict[str, Any]:
    hw = instance.hardware
    memory_mib = -(-hw.memory_kib // 1024)
    if version >= EMBEDDED_FLAVOR:
        return {
            "vcpus": hw.vcpus, "ram": memory_mib, "disk": 0, "ephemeral": 0, "swap": 0,
            "original_name": f"libvirt-{hw.vcpus}cpu-{memory_mib}mb", "extra_specs": {},
        }  # fmt: skip
    flavor_id = f"libvirt-{hw.vcpus}cpu-{memory_mib}mb"
    return {"id": flavor_id, "links": [{"rel": "bookmark", "href": f"{base}/flavors/{flavor_id}"}]}


def server_detail(instance: Instance, project: str | None, base: str, version: tuple[int, int]) -> dict[str, Any]:
    status, vm_state, power = _STATUS.get(instance.state, ("UNKNOWN", "error", 0))
    disks = [d for d in instance.hardware.disks if d.device == "disk"]
    return {
        **server_summary(instance, base),
        "status": status,
        "tenant_id": project or "",
        "user_id": "",
        "metadata": {},
        "hostId": "",
        "image": "",
        "flavor": _flavor(instance, base, version),
        "created": _EPOCH,
        "updated": _EPOCH,
        "addresses": {},
        "accessIPv4": "",
        "accessIPv6": "",
        "key_name": None,
        "config_drive": "",
        "progress": 0,
        "OS-DCF:diskConfig": "MANUAL",
        "OS-EXT-AZ:availability_zone": "nova",
        "OS-EXT-STS:task_state": None,
        "OS-EXT-STS:vm_state": vm_state,
        "OS-EXT-STS:power_state": power,
        "OS-SRV-USG:launched_at": None,
        "OS-SRV-USG:terminated_at": None,
        "os-extended-volumes:volumes_attached": [{"id": d.target, "delete_on_termination": False} for d in disks],
        "security_groups": [],
        "locked": False,
        "description": None,
        "tags": [],
        "trusted_image_certificates": None,
        "server_groups": [],
    }


def _time(value: datetime | None) -> str:
    if value is None:
        return _EPOCH
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def block_device_mapping(snapshot_set: SnapshotSet) -> tuple[Member | None, list[dict[str, Any]]]:
    """The root member and, like Nova's volume-backed snapshots, one mapping per member (each a volume snapshot)."""
    members = snapshot_set.members
    root = next((m for m in members if m.boot_order == 1), members[0] if members else None)
    bdm = [
        {
            "device_name": f"/dev/{m.target}", "source_type": "snapshot", "destination_type": "volume",
            "boot_index": 0 if m is root else -1, "volume_size": -(-m.virtual_size // 2**30), "disk_bus": m.bus,
            "snapshot_id": f"{snapshot_set.id}/{m.target}", "delete_on_termination": False,
        }
        for m in members
    ]  # fmt: skip
    return root, bdm


def image_view(snapshot_set: SnapshotSet, project: str | None, base: str) -> dict[str, Any]:
    """A set as a Glance v2 image: flat properties, the status clients wait on, every member in the BDM."""
    root, bdm = block_device_mapping(snapshot_set)
    view: dict[str, Any] = {
        **user_metadata(snapshot_set.metadata),
        "id": snapshot_set.id,
        "name": display_name(snapshot_set),
        "status": IMAGE_STATUS.get(snapshot_set.status, "queued"),
        "visibility": "private",
        "protected": False,
        "owner": project,
        "container_format": "bare",
        "disk_format": "qcow2",
        "size": 0,
        "virtual_size": root.virtual_size if root is not None else None,
        "min_disk": 0,
        "min_ram": 0,
        "checksum": None,
        "os_hash_algo": None,
        "os_hash_value": None,
        "tags": [],
        "created_at": _time(snapshot_set.created_at),
        "updated_at": _time(snapshot_set.completed_at or snapshot_set.created_at),
        "self": f"/v2/images/{snapshot_set.id}",
        "file": f"/v2/images/{snapshot_set.id}/file",
        "schema": "/v2/schemas/image",
        "image_type": "backup" if snapshot_set.backup_type else "snapshot",
        "instance_uuid": snapshot_set.instance_uuid,
        "bdm_v2": "True",
        "root_device_name": f"/dev/{root.target}" if root is not None else None,
        "block_device_mapping": json.dumps(bdm),
        "freezeframe_set_uuid": snapshot_set.id,
        "freezeframe_consistency": str(snapshot_set.achieved) if snapshot_set.achieved else None,
    }
    if snapshot_set.backup_type:
        view["backup_type"] = snapshot_set.backup_type
    return view


def queued_image(set_id: str, name: str, project: str | None, created: datetime, failed: bool) -> dict[str, Any]:
    """An image whose set is not recorded yet (its job is queued), or whose job failed before recording it."""
    return {
        "id": set_id, "name": name, "status": "killed" if failed else "queued", "visibility": "private",
        "protected": False, "owner": project, "container_format": None, "disk_format": None, "size": None,
        "virtual_size": None, "min_disk": 0, "min_ram": 0, "checksum": None, "tags": [],
        "created_at": _time(created), "updated_at": _time(created), "self": f"/v2/images/{set_id}",
        "file": f"/v2/images/{set_id}/file", "schema": "/v2/schemas/image",
    }  # fmt: skip
