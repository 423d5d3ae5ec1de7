"""The snapshot flow's outside systems: the hypervisor's guest-visible steps, catalog, repository, journal, locks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from freezeframe.model import (
    DiskSpec,
    Instance,
    InstanceState,
    SetStatus,
    SnapshotSet,
)

ProgressCallback = Callable[[int, int], None]
"""Called with (bytes done, bytes total) while data is copied."""
MANIFEST = "set.json"
"""The self-describing record of a set kept next to its data."""


@dataclass(frozen=True)
class CaptureTarget:
    """Where one disk's point-in-time data goes."""

    disk: DiskSpec
    path: Path
    format: str
    since: str | None = None
    """Copy only what changed since this checkpoint (the target's backing file holds the rest)."""
    checkpoint: str | None = None
    """Start recording changes under this checkpoint, in the same transaction that fixes the point in time."""


class Hypervisor(Protocol):
    """Guest-visible primitives, each its own step so the flow owns the order."""

    def lookup(self, ref: str) -> Instance: ...

    def state(self, instance: Instance) -> InstanceState: ...

    def agent_ping(self, instance: Instance) -> None:
        """Raise AgentUnavailable unless the guest agent answers within its timeout."""

    def freeze(self, instance: Instance) -> int:
        """Freeze all guest filesystems (running the guest's fsfreeze hooks); return how many."""

    def thaw(self, instance: Instance) -> int: ...

    def pause(self, instance: Instance) -> None: ...

    def paused_by_io_error(self, instance: Instance) -> bool:
        """QEMU stopped the vCPUs on a write error (e.g. a full backup target under copy-before-write)."""

    def resume(self, instance: Instance) -> None: ...

    def supports_atomic_capture(self, instance: Instance) -> bool:
        """True when one call fixes a point in time across all disks without pausing the vCPUs."""

    def start_capture(self, instance: Instance, targets: Sequence[CaptureTarget]) -> None:
        """Fix the point in time for all targets; must return quickly (the copy runs afterwards)."""

    def wait_capture(self, instance: Instance, progress: ProgressCallback | None) -> None:
        """Block until the copy started by start_capture completes; raise CaptureFailed on failure."""

    def abort_capture(self, instance: Instance) -> None: ...

    def capture_in_flight(self, instance: Instance) -> bool: ...

    def copy_offline(
        self, instance: Instance, targets: Sequence[CaptureTarget], progress: ProgressCallback | None
    ) -> None:
        """Copy disks of an instance that is not running (already consistent)."""


class Catalog(Protocol):
    """Where snapshot sets and their members are recorded."""

    def add_set(self, snapshot_set: SnapshotSet) -> None: ...

    def update_set(self, snapshot_set: SnapshotSet) -> None:
        """Store every field of the set and replace its members."""

    def get_set(self, ref: str) -> SnapshotSet:
        """By full id, unique id prefix, or unique name; raise SetNotFound otherwise."""

    def list_sets(
        self,
        instance: str | None = None,
        status: SetStatus | None = None,
        backup_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[SnapshotSet]:
        """Newest first. ``instance`` matches name or UUID; ``metadata`` entries must all match."""

    def delete_set(self, set_id: str) -> None: ...


class Repository(Protocol):
    """Where member data lives."""

    def prepare(
        self, set_id: str, disks: Sequence[DiskSpec], parents: Mapping[str, str] | None = None
    ) -> list[CaptureTarget]:
        """Create empty target images for the disks, ready before any guest-visible step.

        ``parents`` (target -> the parent member's path) makes those targets incremental: their backing file is
        the parent member, named relative to the repository, so only changed clusters are written.
        """

    def free_bytes(self) -> int: ...

    def existing_targets(self, set_id: str, disks: Sequence[DiskSpec]) -> list[CaptureTarget]:
        """The targets ``prepare`` made for the disks, for a process that takes over the copy."""

    def remove(self, set_id: str) -> None: ...

    def checksum(self, path: Path) -> str: ...

    def written_bytes(self, path: Path) -> int:
        """Bytes the member's own file takes (its backing files not counted)."""

    def drop_zeros(self, targets: Sequence[CaptureTarget]) -> None:
        """Rewrite, without their zeros, the members a live copy filled with zeros it could not tell from data."""

    def write_manifest(self, snapshot_set: SnapshotSet) -> None:
        """Store a self-describing record of the set next to its data."""

    def exists(self, set_id: str) -> bool:
        """Any data of the set is still there (a removal that failed leaves it)."""

    def manifest_checksums(self, set_id: str) -> dict[str, str | None]:
        """target -> SHA-256 as the set's manifest records it; PreflightFailed if it is missing or unreadable."""


@dataclass
class JournalEntry:
    """An in-flight operation, written before the guest is touched so a crash can be repaired."""

    instance_uuid: str
    instance_name: str
    set_id: str
    pid: int
    phase: str
    froze: bool = False
    paused: bool = False
    capture_started: bool = False
    extra: dict[str, str] = field(default_factory=dict)


class Journal(Protocol):
    def record(self, entry: JournalEntry) -> None: ...

    def clear(self, instance_uuid: str) -> None: ...

    def pending(self) -> list[JournalEntry]: ...


class InstanceLocks(Protocol):
    def hold(self, instance_uuid: str) -> AbstractContextManager[int]:
        """Exclusive, non-blocking; raise InstanceBusy when another operation holds it.

        Yields a file descriptor that a child process can inherit to keep holding the lock.
        """
