"""Backend-native volumes (Ceph RBD): snapshots the storage backend takes in place, next to their parent image.

The flow opens every volume before the guest-visible window (so an unreachable cluster or a name collision is
found before the guest is touched), takes the snapshots inside it with nothing but the backend's own calls, and
removes whatever a failed or interrupted set made.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from freezeframe.model import DiskSpec, Member
from freezeframe.ports.images import ImageRef

RBD_PREFIX = "rbd:"
"""Where a member or a restored disk is an RBD image: ``rbd:POOL/IMAGE[@SNAPSHOT]``."""
CLONE_SUFFIX = ".rbd"
"""A restored instance's folder holds ``<target>.rbd`` naming each RBD clone made for it (``POOL/IMAGE``)."""
VOLUMES_KEY = "volumes"
"""Journal ``extra`` key: the volumes (``POOL/IMAGE``, comma-separated) a set may have snapshotted."""


@dataclass(frozen=True)
class VolumeSnapshot:
    """One snapshot made for a set: ``source`` is ``rbd:POOL/IMAGE@SNAPSHOT`` (as qemu-img reads it)."""

    disk: DiskSpec
    snapshot: str
    source: str


class VolumeCapture(Protocol):
    def snapshot(self) -> list[VolumeSnapshot]:
        """Inside the window: one native snapshot per volume and nothing else; CaptureFailed on any failure."""


class Volumes(Protocol):
    def open(self, set_id: str, set_name: str, disks: Sequence[DiskSpec]) -> AbstractContextManager[VolumeCapture]:
        """Connect, open and tag every volume; PreflightFailed when the cluster or an image cannot be reached or a
        snapshot of that name exists already. Closed after the window."""

    def existing(self, set_id: str, disks: Sequence[DiskSpec]) -> list[VolumeSnapshot]:
        """The snapshots a set made, for a process that takes over the copy."""

    def checksum(self, snapshot: VolumeSnapshot) -> str:
        """SHA-256 of the snapshot's content (the raw guest data)."""

    def remove(self, set_id: str, volumes: Sequence[str]) -> list[str]:
        """Remove the set's snapshots and tags from the volumes (``POOL/IMAGE``); idempotent; what was removed."""


@runtime_checkable
class ClonedMembers(Protocol):
    """A member store whose restores are backend clones of the member (RBD): delete asks it for dependants."""

    def children(self, member: Member) -> list[str]:
        """``POOL/IMAGE`` of every clone that still depends on the member."""

    def flatten(self, clone: str) -> None:
        """Copy the member's data into the clone so it stands alone."""

    def remove_clone(self, clone: str) -> None:
        """Remove a restored clone (``POOL/IMAGE``) whose instance is discarded; idempotent."""


@dataclass(frozen=True)
class Extent:
    """``length`` bytes at ``offset`` of a volume's guest data; ``zero``: discarded since, reads as zeros."""

    offset: int
    length: int
    zero: bool = False


@runtime_checkable
class DiffableMembers(Protocol):
    """A member store whose members are backend snapshots of one image: the backend knows what changed between two.

    Incremental sets (and incremental off-site uploads) of RBD members need no copy of their own: the RBD snapshots
    are the increments, and this gives the extents to read from the newer one.
    """

    def changed_extents(self, member: Member, since: Member | None) -> list[Extent]:
        """Extents of ``member`` written after ``since`` (a member of the same image, older), merged and sorted;
        every allocated extent when ``since`` is None. ``InvalidRequest`` when they are not of one image."""


@runtime_checkable
class VolumeImages(Protocol):
    """A member store that makes and rolls back whole images in its backend: ``restore --disk T --to rbd:POOL/IMAGE``,
    ``import --storage rbd`` and revert of RBD disks."""

    def new_image(self, volume: str, size: int) -> ImageRef:
        """A new, empty image ``POOL/IMAGE`` of ``size`` bytes that qemu-img can write into (``existing=True``);
        ``InvalidRequest`` when one of that name exists (never overwritten)."""

    def remove_image(self, volume: str) -> None:
        """Remove an image this store made (undo); idempotent."""

    def readable(self, volume: str) -> ImageRef:
        """The image ``POOL/IMAGE`` as qemu-img opens it (cluster options included)."""

    def rollback(self, source: str) -> None:
        """Roll the image of ``rbd:POOL/IMAGE@SNAPSHOT`` back to that snapshot, in place (no client may have it
        open: the instance is shut off)."""
