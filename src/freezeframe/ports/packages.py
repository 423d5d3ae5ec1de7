"""OVA packages: written from a set, and read defensively for an import."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from freezeframe.model import (
    Hardware,
    SnapshotSet,
)
from freezeframe.ports.image_store import (
    ImageSummary,
)
from freezeframe.ports.images import ImageRef
from freezeframe.ports.snapshot import (
    ProgressCallback,
)


@dataclass(frozen=True)
class PackageSource:
    """One member of a set to put in a package: copied as is, or converted to streamOptimized VMDK."""

    href: str
    image: ImageRef
    """The member's data as its ``MemberStore`` gives it (a whole image file, format pinned)."""
    target: str
    to_vmdk: bool = False
    adapter_type: str = "lsilogic"


@dataclass(frozen=True)
class WrittenDisk:
    target: str
    href: str
    format: str
    file_size: int
    capacity: int
    populated_size: int | None


@dataclass(frozen=True)
class WrittenPackage:
    path: Path
    size: int
    allocated: int
    """Bytes the package takes on disk (holes for zero data make it smaller than ``size``)."""
    seconds: float
    disks: tuple[WrittenDisk, ...]
    summary: ImageSummary
    """What its descriptor says, as the image store keeps it."""


@dataclass(frozen=True)
class PackageFile:
    """A disk file inside a package, not yet looked at: only ``Packages.probe`` turns it into something to read."""

    name: str
    handle: object = field(default=None, compare=False, repr=False)
    """The ``Packages`` adapter's own reference to the file."""


@dataclass(frozen=True)
class ProbedDisk:
    """A disk file the probe accepted: ``image`` is its byte range in the package, with the verified format pinned
    and no backing file, the only form in which package data reaches the image tool."""

    name: str
    virtual_size: int
    image: ImageRef


@dataclass(frozen=True)
class DeclaredDisk:
    """A hard disk of the package's machine; ``href`` None: a blank disk the importer creates."""

    disk_id: str
    href: str | None
    capacity: int
    controller: str | None = None
    controller_address: str | None = None
    address: str | None = None


@dataclass(frozen=True)
class DeclaredNic:
    network: str | None
    model: str | None


@dataclass(frozen=True)
class RecordedMember:
    """What a freezeframe package recorded about one member of its set."""

    href: str | None
    target: str
    bus: str | None
    virtual_size: int | None
    boot_order: int | None


@dataclass(frozen=True)
class RecordedSet:
    """A freezeframe package's own section: the machine as the set recorded it (None: section without it)."""

    hardware: Hardware | None
    members: tuple[RecordedMember, ...]


@dataclass(frozen=True)
class OpenedPackage:
    """A package whose layout, manifest digests and descriptor were checked; nothing in it is trusted yet."""

    file_name: str
    machine_name: str
    vcpus: int
    memory_bytes: int
    arch: str | None
    firmware: str | None
    os_description: str | None
    disks: tuple[DeclaredDisk, ...]
    nics: tuple[DeclaredNic, ...]
    files: Mapping[str, PackageFile]
    """The disk files by href."""
    recorded: RecordedSet | None
    warnings: tuple[str, ...] = ()


class Packages(Protocol):
    """OVA packages: written from a set's members, opened and probed before anything is imported."""

    def write(
        self,
        out: Path,
        snapshot_set: SnapshotSet,
        descriptor_name: str,
        sources: Sequence[PackageSource],
        ovf_version: int,
        progress: ProgressCallback | None,
        *,
        replace: bool = False,
        manifest_digest: str = "sha256",
    ) -> WrittenPackage:
        """Write the package at ``out`` atomically (``replace``: over an existing file); nothing partial stays.
        ``manifest_digest``: the manifest's algorithm, ``sha1`` or ``sha256``."""

    def write_collection(
        self,
        out: Path,
        name: str,
        systems: Sequence[tuple[SnapshotSet, Sequence[PackageSource]]],
        descriptor_name: str,
        ovf_version: int,
        progress: ProgressCallback | None,
        *,
        replace: bool = False,
        manifest_digest: str = "sha256",
    ) -> WrittenPackage:
        """Like ``write``, for several sets (a group set): one VirtualSystemCollection named ``name``, one
        VirtualSystem per set with its own disks, in the order given."""

    def open(self, path: Path) -> OpenedPackage:
        """Check layout, manifest and descriptor; raise an Ova*/Ovf* error for anything unsafe or broken."""

    def open_collection(self, path: Path) -> tuple[OpenedPackage, ...]:
        """Like ``open`` for a package holding a VirtualSystemCollection: one ``OpenedPackage`` per virtual system
        (each with only its own disk files); a malformed system is refused, named."""

    def probe(self, file: PackageFile) -> ProbedDisk:
        """Check the file's image header ourselves, then the image tool's view of it.

        Refuses (OvaDiskError/OvaUnsafeDisk) any image that could reach outside the package; what it returns is the
        only way to read the file, so nothing converts a disk that was not probed.
        """

    def sha256(self, path: Path) -> str: ...
