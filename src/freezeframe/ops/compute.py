"""Nova-style snapshot requests (``createImage``, ``createBackup``, ``POST .../snapshots``) turned into service calls.

Pure: the rules for which disks a request covers and whether it rotates, and the dispatch to the service's
snapshot or backup. The HTTP layer parses and authorises; the service captures, records and rotates. Rotation
acts only on the sets ``visible`` admits, so a caller can never delete (or learn the ids of) sets it cannot see.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from freezeframe.errors import InvalidRequest
from freezeframe.flow import SnapshotRequest
from freezeframe.incremental import AUTO, DEFAULT_MAX_CHAIN
from freezeframe.model import Consistency, Instance, SnapshotSet
from freezeframe.ports import ProgressCallback
from freezeframe.validation import RESERVED_META_PREFIX, validate_text

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


# ---- what Nova clients type, kept as they typed it ----------------------------------------------------------------

DISPLAY_NAME_KEY = "freezeframe.display_name"
"""Set metadata: the name a Nova client gave (spaces, any script, up to 255 characters); the set's own name is a
safe slug of it."""
MAX_DISPLAY_NAME = 255
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NOVA_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_:. -]{0,254}$")


def internal_name(display: str, set_id: str) -> str:
    """A safe set name for a typed one: its letters/digits/``._-`` runs, then the set id's first 8 characters (names
    that differ only in what was dropped stay distinct)."""
    slug = _UNSAFE.sub("-", display).strip("-._")[:40]
    return f"{slug}-{set_id[:8]}" if slug else f"image-{set_id[:8]}"


def check_display_name(name: str) -> str:
    """Nova's rule for a name: 1-255 characters, not only spaces; plus no control characters (it goes into OVF/XML)."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_DISPLAY_NAME:
        raise InvalidRequest(f"name must be 1-{MAX_DISPLAY_NAME} characters, not only spaces")
    if any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in name):
        raise InvalidRequest("name must not contain control characters")
    return name


def internal_backup_type(backup_type: str) -> str:
    """Nova takes any string as a backup type (the openstack client sends ``""``); rotation groups sets by it, so
    the mapping is stable: a safe type as is, anything else ``t-`` + a digest of it."""
    if _SAFE_TYPE.fullmatch(backup_type):
        return backup_type
    return "t-" + hashlib.sha256(backup_type.encode()).hexdigest()[:12]


_SAFE_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def encode_meta_key(key: str) -> str:
    """A Nova metadata key in our key alphabet: a space becomes ``/`` (which Nova keys cannot hold, so it reads
    back exactly). Keys must start with a letter or digit and fit 255 characters (Nova's limit); ``freezeframe.`` is
    ours."""
    if not _NOVA_KEY.fullmatch(key):
        raise InvalidRequest(
            f"metadata key {key[:40]!r}: this service keeps keys of 1-255 letters, digits, '_', ':', '.', '-' and "
            "spaces, starting with a letter or digit"
        )
    if key.startswith(RESERVED_META_PREFIX):
        raise InvalidRequest(f"metadata key {key!r}: keys starting with {RESERVED_META_PREFIX!r} are reserved")
    return key.replace(" ", "/")


def decode_meta_key(key: str) -> str:
    return key.replace("/", " ")


def nova_order(
    display_name: str,
    set_id: str,
    metadata: Mapping[str, str],
    *,
    backup_type: str | None = None,
    rotation: int | None = None,
) -> Order:
    """A createImage (no backup type) or createBackup as an ``Order``: every disk (createImage of a volume-backed
    server captures every volume), the typed name kept beside a safe one."""
    check_display_name(display_name)
    meta = {encode_meta_key(k): validate_text(v, f"metadata value of {k!r}", 255) for k, v in metadata.items()}
    meta[DISPLAY_NAME_KEY] = display_name
    return Order(
        name=internal_name(display_name, set_id),
        metadata=meta,
        backup_type=None if backup_type is None else internal_backup_type(backup_type),
        rotation=rotation,
    )  # fmt: skip


def user_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """A set's metadata as the client gave it: reserved keys dropped, encoded keys decoded."""
    return {decode_meta_key(k): v for k, v in metadata.items() if not k.startswith(RESERVED_META_PREFIX)}


def display_name(snapshot_set: SnapshotSet) -> str:
    return snapshot_set.metadata.get(DISPLAY_NAME_KEY) or snapshot_set.name
