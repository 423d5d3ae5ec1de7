"""Which disks of an instance a set captures, and why the others are left out; decided before anything is made."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from freezeframe.errors import InvalidRequest, PreflightFailed
from freezeframe.model import DiskSpec, Instance

SUPPORTED_SOURCES = ("file", "block")
SUPPORTED_FORMATS = ("qcow2", "raw")


@dataclass
class Disks:
    """What discovery found: the disks to capture and those left out, each with why."""

    captured: list[DiskSpec]
    skipped: dict[str, str]


def discover_disks(instance: Instance, exclude: Sequence[str] = ()) -> Disks:
    """All ``device='disk'`` disks by default; cdroms/floppies are not state of the machine."""
    known = {d.target for d in instance.hardware.disks if d.device == "disk"}
    unknown = sorted(set(exclude) - known)
    if unknown:
        raise InvalidRequest(
            f"--exclude-disk {', '.join(unknown)}: {instance.name} has no such disk "
            f"(its disks: {', '.join(sorted(known)) or 'none'})"
        )
    captured: list[DiskSpec] = []
    skipped: dict[str, str] = {}
    unsupported: list[str] = []
    for disk in instance.hardware.disks:
        if disk.device != "disk":
            continue
        if disk.target in exclude:
            skipped[disk.target] = "excluded on request"
        elif disk.shareable:
            skipped[disk.target] = "shareable: other instances write it, so no point in time is ours to fix"
        elif disk.readonly:
            skipped[disk.target] = "read-only: the instance cannot change it"
        elif disk.volume is not None:
            captured.append(disk)
        elif disk.source_type not in SUPPORTED_SOURCES or disk.format not in SUPPORTED_FORMATS:
            kind = f"{disk.source_type} {disk.protocol}" if disk.protocol else disk.source_type
            unsupported.append(f"{disk.target} ({kind}/{disk.format})")
        else:
            captured.append(disk)
    if unsupported:
        raise PreflightFailed(
            f"{instance.name} has disks freezeframe cannot capture yet: {', '.join(unsupported)}; "
            "leave them out with --exclude-disk TARGET"
        )
    if not captured:
        raise PreflightFailed(f"{instance.name} has no disk to capture ({skipped or 'no disks'})")
    return Disks(captured, skipped)


def split_volumes(disks: Sequence[DiskSpec]) -> tuple[list[DiskSpec], list[DiskSpec]]:
    """(file disks the backup job copies, backend-native volumes the backend snapshots in place)."""
    return [d for d in disks if d.volume is None], [d for d in disks if d.volume is not None]
