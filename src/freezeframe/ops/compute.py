"""Nova-style snapshot requests (``createImage``, ``createBackup``, ``POST .../snapshots``) turned into service calls.

Pure: the rules for which disks a request covers and whether it rotates, and the dispatch to the service's
snapshot or backup. The HTTP layer parses and authorises; the service captures, records and rotates. Rotation
acts only on the sets ``visible`` admits, so a caller can never delete (or learn the ids of) sets it cannot see.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from freezeframe.errors import InvalidRequest
from freezeframe.flow import SnapshotRequest
from freezeframe.incremental import AUTO, DEFAULT_MAX_CHAIN
from freezeframe.model import Consistency, Instance, SnapshotSet
from freezeframe.ports import ProgressCallback

Visible = Callable[[SnapshotSet], bool]


class BackupOutcome(Protocol):
    """``BackupResult``: the new set, the rotated-out ids and the kept ones (id -> why)."""

    @property
    def snapshot_set(self) -> SnapshotSet: ...
    @property
    def rotated_out(self) -> list[str]: ...
    @property
    def kept_in_use(self) -> dict[str, str]: ...


class Backups(Protocol):
    def backup(
        self,
        instance: str,
        backup_type: str,
        rotation: int,
        *,
        metadata: dict[str, str] | None = None,
        consistency: Consistency = Consistency.FILESYSTEM,
        require: bool = False,
        name: str | None = None,
        set_id: str | None = None,
        visible: Visible | None = None,
        progress: ProgressCallback | None = None,
        mode: str = AUTO,
        max_chain: int = DEFAULT_MAX_CHAIN,
    ) -> BackupOutcome: ...


class Snapshots(Protocol):
    """The part of the ``Freezeframe`` façade a compute request needs."""

    @property
    def lifecycle(self) -> Backups: ...

    def snapshot(self, request: SnapshotRequest, progress: ProgressCallback | None = None) -> SnapshotSet: ...


@dataclass(frozen=True)
class Order:
    """One snapshot request as a client made it (already validated at the edge)."""

    name: str | None = None
    consistency: Consistency = Consistency.FILESYSTEM
    require: bool = False
    exclude_disks: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    backup_type: str | None = None
    rotation: int | None = None
    pause: bool = False
    mode: str = AUTO
    max_chain: int = DEFAULT_MAX_CHAIN


@dataclass(frozen=True)
class Taken:
    snapshot_set: SnapshotSet
    rotated: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


def root_disk(instance: Instance) -> str | None:
    """The boot disk: lowest boot order, else the first disk (Nova's createImage without all_volumes)."""
    disks = [d for d in instance.hardware.disks if d.device == "disk"]
    booted = sorted((d for d in disks if d.boot_order), key=lambda d: d.boot_order or 0)
    chosen = booted or disks
    return chosen[0].target if chosen else None


def image_exclusions(instance: Instance, all_volumes: bool) -> tuple[str, ...]:
    """createImage: every disk, or (``all_volumes`` false) the root disk only."""
    if all_volumes:
        return ()
    root = root_disk(instance)
    return tuple(d.target for d in instance.hardware.disks if d.device == "disk" and d.target != root)


def check_order(instance: Instance, order: Order) -> None:
    """Refuse what cannot be done before a job is queued: unknown disks, rotation without a type or with options
    the backup operation does not take."""
    known = {d.target for d in instance.hardware.disks if d.device == "disk"}
    unknown = sorted(set(order.exclude_disks) - known)
    if unknown:
        raise InvalidRequest(
            f"exclude_disks {', '.join(unknown)}: {instance.name} has no such disk (its disks: "
            f"{', '.join(sorted(known)) or 'none'})"
        )
    if order.rotation is None:
        return
    if order.backup_type is None:
        raise InvalidRequest("rotation needs backup_type: it keeps the newest sets of that type")
    if order.exclude_disks or order.pause:
        raise InvalidRequest("a backup with rotation covers every disk without pausing: drop exclude_disks and pause")


def take(
    service: Snapshots,
    instance: Instance,
    order: Order,
    *,
    set_id: str,
    visible: Visible,
    progress: ProgressCallback | None = None,
) -> Taken:
    """Capture the set under the pre-assigned ``set_id``; with a rotation, rotate among the ``visible`` sets."""
    check_order(instance, order)
    metadata = dict(order.metadata)
    if order.rotation is not None and order.backup_type is not None:
        result = service.lifecycle.backup(
            instance.uuid,
            order.backup_type,
            order.rotation,
            metadata=metadata,
            consistency=order.consistency,
            require=order.require,
            name=order.name,
            set_id=set_id,
            visible=visible,
            progress=progress,
            mode=order.mode,
            max_chain=order.max_chain,
        )
        return Taken(result.snapshot_set, list(result.rotated_out), dict(result.kept_in_use))
    request = SnapshotRequest(
        instance=instance.uuid,
        consistency=order.consistency,
        require=order.require,
        name=order.name,
        exclude_disks=order.exclude_disks,
        metadata=metadata,
        backup_type=order.backup_type,
        pause_vcpus=order.pause,
        set_id=set_id,
        mode=order.mode,
        max_chain=order.max_chain,
    )
    return Taken(service.snapshot(request, progress))
