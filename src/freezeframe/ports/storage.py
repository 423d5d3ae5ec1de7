"""Where a member's data lives (one store per kind), restored disks' records and host-side filesystem checks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from freezeframe.model import (
    Member,
    RestoreRecord,
)
from freezeframe.ports.images import ImageRef
from freezeframe.ports.snapshot import (
    ProgressCallback,
)


class Restores(Protocol):
    """Which restored disks exist and of which set (copy-on-write children depend on the set's members)."""

    def add(self, records: Sequence[RestoreRecord]) -> None: ...

    def bind_uuid(self, instance_name: str, instance_uuid: str) -> None: ...

    def for_set(self, set_id: str) -> list[RestoreRecord]: ...

    def for_instance(self, ref: str) -> list[RestoreRecord]: ...

    def all(self) -> list[RestoreRecord]: ...

    def remove_instance(self, instance_name: str) -> None: ...

    def remove_ids(self, ids: Sequence[int]) -> None: ...


class MemberStore(Protocol):
    """How one kind of member (``Member.store``) is restored, exported, verified and removed.

    The kind ``file`` is a qcow2 file in the directory repository. A backend-native kind (a Ceph RBD snapshot next
    to its parent: restore = clone) or an incremental one (changed blocks over a parent member) implements the same
    calls; operations pick the store per member and never look at where the data is.
    """

    @property
    def kind(self) -> str: ...

    def present(self, member: Member) -> bool:
        """The member's data is there to be read."""

    def source(self, member: Member) -> ImageRef:
        """A readable image of the member's full guest data (export, extract, revert, verify)."""

    def restore(self, member: Member, dst: Path, *, full: bool, progress: ProgressCallback | None = None) -> ImageRef:
        """A new disk at ``dst`` with the member's data: a copy-on-write child, or with ``full`` a standalone copy."""

    def base_of(self, member: Member) -> str:
        """The key children made by ``restore`` name as their base (a resolved path for files)."""

    def checksum(self, member: Member) -> str: ...

    def remove(self, member: Member) -> None:
        """Remove the member's data (idempotent)."""


@dataclass(frozen=True)
class Filesystem:
    type: str
    offset: int
    where: str
    """'whole disk' or 'partition N'."""


class HostFilesystems(Protocol):
    """Read-only checks of the filesystems on a raw disk image, run on the host."""

    def probe(self, raw: Path) -> list[Filesystem]:
        """Filesystems on the whole disk, or in each partition of its partition table."""

    def fsck(self, raw: Path, fs: Filesystem) -> tuple[bool | None, str]:
        """(clean?, detail); None when no read-only checker exists for the type."""
