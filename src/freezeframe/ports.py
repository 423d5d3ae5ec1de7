"""The outside systems the snapshot flow talks to, as Protocols. Adapters implement them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol

from freezeframe.model import DiskSpec, Hardware, Instance, InstanceState, SetStatus, SnapshotSet

ProgressCallback = Callable[[int, int], None]
"""Called with (bytes done, bytes total) while data is copied."""


@dataclass(frozen=True)
class CaptureTarget:
    """Where one disk's point-in-time data goes."""

    disk: DiskSpec
    path: Path
    format: str


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

    def prepare(self, set_id: str, disks: Sequence[DiskSpec]) -> list[CaptureTarget]:
        """Create empty target images for the disks, ready before any guest-visible step."""

    def free_bytes(self) -> int: ...

    def existing_targets(self, set_id: str, disks: Sequence[DiskSpec]) -> list[CaptureTarget]:
        """The targets ``prepare`` made for the disks, for a process that takes over the copy."""

    def remove(self, set_id: str) -> None: ...

    def checksum(self, path: Path) -> str: ...

    def write_manifest(self, snapshot_set: SnapshotSet) -> None:
        """Store a self-describing record of the set next to its data."""


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


# ---- holds: the named locks every export/import/image operation takes ------------------------------------


class Holds(Protocol):
    def hold(self, key: str, what: str) -> AbstractContextManager[None]:
        """Exclusive, non-blocking lock on ``key``; raise InstanceBusy naming ``what`` when it is taken."""


# ---- the image store: where exported packages are kept ----------------------------------------------------

IMAGE_AVAILABLE = "available"
IMAGE_DELETING = "deleting"


@dataclass(frozen=True)
class ImageDisk:
    """One disk of a stored package, in the descriptor's order."""

    target: str | None
    capacity: int
    format: str | None
    file_size: int | None
    controller: str | None


@dataclass(frozen=True)
class ImageNic:
    network: str | None
    model: str | None


@dataclass(frozen=True)
class ImageSummary:
    """What the package's descriptor says, so a listing needs no package I/O."""

    machine_name: str
    vcpus: int
    memory_bytes: int
    ovf_version: int
    disk_format: str
    disks: tuple[ImageDisk, ...] = ()
    nics: tuple[ImageNic, ...] = ()
    arch: str | None = None
    firmware: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine_name": self.machine_name,
            "vcpus": self.vcpus,
            "memory_bytes": self.memory_bytes,
            "ovf_version": self.ovf_version,
            "disk_format": self.disk_format,
            "arch": self.arch,
            "firmware": self.firmware,
            "disks": [vars(d) for d in self.disks],
            "nics": [vars(n) for n in self.nics],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageSummary:
        return cls(
            machine_name=str(data.get("machine_name", "")),
            vcpus=int(data["vcpus"]),
            memory_bytes=int(data["memory_bytes"]),
            ovf_version=int(data["ovf_version"]),
            disk_format=str(data["disk_format"]),
            arch=data.get("arch"),
            firmware=data.get("firmware"),
            disks=tuple(ImageDisk(**d) for d in data.get("disks", ())),
            nics=tuple(ImageNic(**n) for n in data.get("nics", ())),
        )


@dataclass(frozen=True)
class NewImage:
    """What the caller knows about a package it hands to ``put_file``."""

    name: str
    filename: str
    summary: ImageSummary
    source_set_id: str | None = None


@dataclass(frozen=True)
class StoredImage:
    id: str
    name: str
    filename: str
    store: str
    """The store's URI (``file:///var/lib/freezeframe/images``); a record belongs to exactly one store."""
    size: int
    sha256: str
    created_at: datetime
    summary: ImageSummary
    source_set_id: str | None = None
    status: str = IMAGE_AVAILABLE
    location: str = ""
    """Where the package is, for people (a path for the directory store)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "source_set_id": self.source_set_id,
            "size": self.size,
            "sha256": self.sha256,
            "created_at": self.created_at.isoformat(),
            "filename": self.filename,
            "store": self.store,
            "location": self.location,
            "summary": self.summary.to_dict(),
        }


class ImageStore(Protocol):
    """Where exported packages are kept; every method either completes or leaves the store as it was."""

    uri: str

    def staging(self, filename: str) -> AbstractContextManager[Path]:
        """A fresh local path (not yet existing) to write a package to before ``put_file``; removed on exit.

        The directory store hands out a path on its own filesystem so that ``put_file`` is a rename.
        """

    def put_file(self, path: Path, new: NewImage) -> StoredImage:
        """Store the package at ``path`` (moved when it came from ``staging``, else copied) and record it."""

    def get_stream(self, image_id: str) -> AbstractContextManager[IO[bytes]]:
        """The package's bytes as a readable binary stream."""

    def local_file(self, image_id: str) -> AbstractContextManager[Path]:
        """A seekable local file holding the package for the duration of the block (remote stores download)."""

    def find(self, ref: str) -> StoredImage: ...

    def list_images(self) -> list[StoredImage]:
        """Available images of this store, newest first."""

    def delete(self, image_id: str) -> StoredImage:
        """Mark deleting, remove the data, remove the record; an interruption is finished by ``repair``."""

    def repair(self) -> list[str]:
        """Finish interrupted deletes and remove half-written packages; return what was done."""


# ---- packages: OVA files, written from a set and read (defensively) for an import -------------------------


@dataclass(frozen=True)
class PackageSource:
    """One member of a set to put in a package: copied as is, or converted to streamOptimized VMDK."""

    href: str
    path: Path
    source_format: str
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
    """A disk file inside a package, read in place: ``image`` is the byte range QEMU opens (format pinned)."""

    name: str
    image: ImageRef | None
    """None: a format this host does not import (``probe`` says which)."""
    handle: object = field(default=None, compare=False, repr=False)
    """The ``Packages`` adapter's own reference to the file."""


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
    ) -> WrittenPackage:
        """Write the package at ``out`` atomically (``replace``: over an existing file); nothing partial stays."""

    def open(self, path: Path) -> OpenedPackage:
        """Check layout, manifest and descriptor; raise an Ova*/Ovf* error for anything unsafe or broken."""

    def probe(self, file: PackageFile) -> int:
        """Check the file's image header ourselves, then the image tool's view of it; return its virtual size.

        Must be called before any conversion: it refuses images that could reach outside the package.
        """

    def sha256(self, path: Path) -> str: ...


# ---- instance folders: where an imported (or restored) instance's disks live --------------------------------


class InstanceFolders(Protocol):
    """One folder per new instance, claimed with a marker first so ``repair`` removes a half-made one."""

    def free_bytes(self) -> int: ...

    def claim(self, name: str) -> Path:
        """Create the folder and its marker; InvalidRequest if the folder exists (never reuse someone's files)."""

    def bind(self, name: str, uuid: str) -> None:
        """The marker learns the defined domain's UUID (repair removes exactly that domain)."""

    def release(self, name: str) -> None:
        """The instance is complete: drop the marker, keep the folder."""

    def discard(self, name: str) -> None:
        """Undo: remove the folder with everything in it, then the marker."""
