"""Plain domain types: what an instance looks like and what a snapshot set records.

Nothing here knows about libvirt, SQL or files; adapters translate to and from these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class Consistency(enum.StrEnum):
    """Consistency levels, weakest first. Compare with ``is``: as strings they would order alphabetically."""

    CRASH = "crash"
    FILESYSTEM = "filesystem"
    APPLICATION = "application"

    @property
    def freezes_filesystems(self) -> bool:
        return self is not Consistency.CRASH


class SetStatus(enum.StrEnum):
    CREATING = "creating"
    AVAILABLE = "available"
    FAILED = "failed"
    DELETING = "deleting"


class InstanceState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    OTHER = "other"


@dataclass(frozen=True)
class DiskSpec:
    """One disk of an instance as the hypervisor describes it."""

    target: str
    bus: str
    source_path: str | None
    format: str
    virtual_size: int
    source_type: str = "file"
    device: str = "disk"
    boot_order: int | None = None
    readonly: bool = False
    shareable: bool = False
    serial: str | None = None
    address: dict[str, str] = field(default_factory=dict)
    protocol: str | None = None
    """For ``source_type='network'``: ``rbd`` (``source_path`` is then ``POOL/IMAGE``), ``nbd``, ``iscsi``…"""

    @property
    def volume(self) -> str | None:
        """The kind of backend-native volume (``rbd``) whose snapshots the backend itself takes; None for files."""
        return RBD_STORE if self.source_type == "network" and self.protocol == RBD_STORE else None


@dataclass(frozen=True)
class NicSpec:
    mac: str
    model: str | None
    source_type: str
    source: str | None


@dataclass(frozen=True)
class BootSpec:
    firmware: str = "bios"
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    boot_devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hardware:
    """What restore and export need to rebuild the machine elsewhere."""

    vcpus: int
    memory_kib: int
    arch: str
    machine: str | None
    domain_type: str = "qemu"
    os_type: str = "hvm"
    boot: BootSpec = field(default_factory=BootSpec)
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    description: str | None = None
    metadata_xml: str | None = None


@dataclass(frozen=True)
class Instance:
    name: str
    uuid: str
    state: InstanceState
    hardware: Hardware
    clean_shutdown: bool = False
    """For a shut-off instance: it was shut down by its guest (disks at rest), not destroyed or crashed."""


STORE_KEY = "freezeframe.store"
"""Member metadata naming the kind of store that holds the member's data; absent: ``file``."""
FILE_STORE = "file"
RBD_STORE = "rbd"
"""A Ceph RBD snapshot next to its parent image: restore = clone."""


@dataclass
class Member:
    """One captured disk of a set. ``metadata`` always carries the set UUID (the proposal's naming scheme)."""

    set_id: str
    target: str
    bus: str
    boot_order: int | None
    virtual_size: int
    format: str
    path: str
    source_path: str | None = None
    sha256: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def store(self) -> str:
        """Where the data lives (``file``: a qcow2 file in the repository); kept in metadata, so every record of a
        member (catalog, set.json, OVF section) carries it without a schema change."""
        return self.metadata.get(STORE_KEY, FILE_STORE)


@dataclass
class SnapshotSet:
    id: str
    name: str
    instance_name: str
    instance_uuid: str
    requested: Consistency
    status: SetStatus
    created_at: datetime
    hardware: Hardware
    achieved: Consistency | None = None
    reason: str | None = None
    completed_at: datetime | None = None
    freeze_window_ms: float | None = None
    pause_window_ms: float | None = None
    members: list[Member] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    backup_type: str | None = None
    error: str | None = None
    instance_state: InstanceState | None = None


@dataclass(frozen=True)
class RestoreRecord:
    """A restored disk: ``mode`` is ``cow`` (qcow2 overlay whose backing file is the member) or ``full``."""

    set_id: str
    instance_name: str
    target: str
    path: str
    mode: str
    created_at: datetime
    instance_uuid: str | None = None
    id: int | None = None
