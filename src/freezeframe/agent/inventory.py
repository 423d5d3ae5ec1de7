"""What an agent reports about its host on every heartbeat, and how the API reads it back.

The API of a multi-host deployment holds no libvirt connection: it finds instances (and checks a snapshot
request against their disks) from these records, which carry the full recorded hardware.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from freezeframe.errors import RecordInvalid
from freezeframe.model import Instance, InstanceState
from freezeframe.serialize import hardware_from_dict, hardware_to_dict


def instance_record(instance: Instance) -> dict[str, Any]:
    return {
        "name": instance.name,
        "uuid": instance.uuid,
        "state": str(instance.state),
        "clean_shutdown": instance.clean_shutdown,
        "hardware": hardware_to_dict(instance.hardware),
    }


def instance_from_record(record: Mapping[str, Any]) -> Instance:
    try:
        state = InstanceState(record["state"])
        name, uuid = str(record["name"]), str(record["uuid"])
    except (KeyError, ValueError) as exc:
        raise RecordInvalid(f"a host reported an unreadable instance record ({exc})") from None
    hardware = hardware_from_dict(record.get("hardware"), f"instance {name}")
    return Instance(name, uuid, state, hardware, bool(record.get("clean_shutdown")))


def free_bytes(directory: Path) -> int | None:
    """Free space where the repository lives (its nearest existing parent); None if nothing is there."""
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None
