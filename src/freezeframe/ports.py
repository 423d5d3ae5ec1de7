"""The outside systems every operation talks to, as Protocols (and the plain records they exchange).

The flow and the operations under ``freezeframe.ops`` import only these, the model and the errors; adapters
implement them and ``freezeframe.wiring`` plugs them in, so a scripted stand-in can drive any operation in a test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol

from freezeframe.model import (
    DiskSpec,
    Hardware,
    Instance,
    InstanceState,
    Member,
    NicSpec,
    RestoreRecord,
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


# ---- images on host files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """An image QEMU may open, its format always pinned: a whole file, or a byte range of one (a disk in an OVA)."""

    path: Path
    format: str
    offset: int = 0
    size: int | None = None
    """Bytes of the range from ``offset``; None: to the end of the file."""
    backing: bool = True
    """False: never open a backing file, whatever the image's header names (images from outside)."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    actual_size: int
    backing: str | None
    """The backing file, resolved to an absolute path; None for a standalone image."""
    backing_format: str | None
    extents: int | None = None
    """VMDK: how many extents the image names (None for other formats)."""


@dataclass(frozen=True)
class ImageCheck:
    """What ``qemu-img check`` found: ``ok``, ``leaks`` (harmless), ``corrupt`` or ``unsupported`` (no checker)."""

    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "corrupt"


class Images(Protocol):
    """Image operations on host files (one adapter over ``qemu-img``); every call pins the image format.

    Errors: HypervisorError (tool missing, timeout, failure, with the tool's message); InsufficientSpace when the
    target filesystem is full.
    """

    def info(self, image: ImageRef) -> ImageInfo:
        """Works on images a running domain holds (shared read)."""

    def create(
        self,
        path: Path,
        fmt: str,
        size: int | None = None,
        *,
        backing: ImageRef | None = None,
        options: Mapping[str, str] | None = None,
    ) -> None:
        """A new image; with ``backing`` a copy-on-write child (``size`` None: the backing image's size)."""

    def convert(
        self,
        source: ImageRef,
        target: ImageRef,
        *,
        existing: bool = False,
        compress: bool = False,
        options: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> None:
        """Copy guest data; ``existing``: the target exists and reads as zeros (written in place, e.g. at an offset).

        ``options`` are creation options (``subformat=streamOptimized``, ``adapter_type``); progress is reported in
        bytes of the source's virtual size.
        """

    def rebase(self, path: Path, fmt: str, backing: ImageRef | None) -> None:
        """Put ``path`` over another backing image, copying what differs; ``None`` flattens it (copies all data in)."""

    def resize(self, path: Path, fmt: str, size: int) -> None: ...

    def check(self, image: ImageRef, timeout: float | None = None) -> ImageCheck: ...

    def measure(self, source: ImageRef, target_format: str) -> int:
        """Bytes a conversion of ``source`` to ``target_format`` needs at most."""

    def data_bytes(self, image: ImageRef) -> int:
        """Bytes of guest data the image holds (allocated, non-zero extents)."""


# ---- libvirt domains (beyond the snapshot primitives of Hypervisor) ------------------------------------


@dataclass(frozen=True)
class DomainDisk:
    """A disk of a domain to build: the recorded disk, and where its data now lives."""

    spec: DiskSpec
    path: Path
    format: str


@dataclass(frozen=True)
class DomainPlan:
    """A machine to define, in model terms; the adapter writes the hypervisor's own description of it."""

    name: str
    hardware: Hardware
    """vCPUs, memory, architecture, machine, boot method, description and metadata, NICs."""
    disks: tuple[DomainDisk, ...]
    directory: Path
    """The instance's folder (its serial console log goes there)."""
    nics: tuple[NicSpec, ...] | None = None
    """None: the hardware's NICs (with new MACs); ``()``: no network."""
    domain_type: str = "qemu"
    scsi_model: str | None = None
    """SCSI controller model to add when a disk is on the scsi bus (None: the hypervisor's default)."""


@dataclass(frozen=True)
class DiskUser:
    """A defined domain whose disk is a given file."""

    instance_name: str
    instance_uuid: str
    target: str
    active: bool


@dataclass(frozen=True)
class HostCapabilities:
    """What this host offers a guest of one architecture / machine type / domain type."""

    efi: bool
    max_vcpus: int | None
    disk_buses: frozenset[str]
    """Empty: not reported (anything goes)."""


class Domains(Protocol):
    """Defining, starting, inspecting and removing whole domains (restore, verify, import)."""

    def name_taken(self, name: str) -> bool: ...

    def uuid_of(self, name: str) -> str | None:
        """The UUID of the domain called ``name``, None if there is none."""

    def check_nics(self, nics: Sequence[NicSpec]) -> None:
        """Raise InvalidRequest unless every network/bridge the NICs need exists (and a network is active)."""

    def network_state(self, name: str) -> str:
        """``active``, ``inactive`` or ``missing``."""

    def bridge_exists(self, name: str) -> bool: ...

    def capabilities(self, arch: str, machine: str | None, domain_type: str) -> HostCapabilities:
        """Raise PreflightFailed when the host cannot run such a guest at all."""

    def define(self, plan: DomainPlan) -> str:
        """Define (not start) the domain; return its new UUID."""

    def start(self, uuid: str) -> None: ...

    def remove(self, uuid: str) -> bool:
        """Destroy if running, undefine (with its NVRAM); False if there was no such domain. Idempotent."""

    def disk_sources(self, uuid: str) -> dict[str, str]:
        """target -> source file of each file-backed disk of the domain's persistent definition."""

    def users_of(self, paths: Sequence[str]) -> dict[str, DiskUser]:
        """path (as given) -> the defined domain using it as a disk."""

    def block_pull(self, uuid: str, target: str, timeout_s: float = 3600.0) -> None:
        """Copy the backing data into a running domain's top image and wait for it."""

    def shutdown_via_agent(self, uuid: str, timeout_s: float) -> bool:
        """Power off through the guest agent (filesystems unmounted); True if it stopped in time."""

    def guest_mounts(self, uuid: str, targets: Sequence[str]) -> dict[str, list[str]]:
        """target -> mount points the guest agent reports on that disk (``/ (ext4)``); {} if it cannot tell."""

    def forget_log(self, name: str) -> None:
        """Drop the log the hypervisor keeps per domain name (for throw-away domains)."""


# ---- records of restored disks ------------------------------------------------------------------------


class Restores(Protocol):
    """Which restored disks exist and of which set (copy-on-write children depend on the set's members)."""

    def add(self, records: Sequence[RestoreRecord]) -> None: ...

    def bind_uuid(self, instance_name: str, instance_uuid: str) -> None: ...

    def for_set(self, set_id: str) -> list[RestoreRecord]: ...

    def for_instance(self, ref: str) -> list[RestoreRecord]: ...

    def all(self) -> list[RestoreRecord]: ...

    def remove_instance(self, instance_name: str) -> None: ...

    def remove_ids(self, ids: Sequence[int]) -> None: ...


# ---- where a member's data lives -----------------------------------------------------------------------


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


# ---- host-side filesystem checks ---------------------------------------------------------------------------


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
    ) -> WrittenPackage:
        """Write the package at ``out`` atomically (``replace``: over an existing file); nothing partial stays."""

    def open(self, path: Path) -> OpenedPackage:
        """Check layout, manifest and descriptor; raise an Ova*/Ovf* error for anything unsafe or broken."""

    def probe(self, file: PackageFile) -> ProbedDisk:
        """Check the file's image header ourselves, then the image tool's view of it.

        Refuses (OvaDiskError/OvaUnsafeDisk) any image that could reach outside the package; what it returns is the
        only way to read the file, so nothing converts a disk that was not probed.
        """

    def sha256(self, path: Path) -> str: ...
