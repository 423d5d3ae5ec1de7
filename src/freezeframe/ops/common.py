"""What every set operation shares: named holds, repair markers, the store of each member, set lookups.

Every operation either completes or leaves catalog, repository, instance disks and domains as they were: it checks
what it can before making anything, undoes what it made when it fails, and writes a small marker before steps a
SIGKILL could cut in half, so that ``repair`` (or the next operation) can finish or undo them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from freezeframe.durable import write_atomically
from freezeframe.errors import InstanceBusy, InvalidRequest, PreflightFailed
from freezeframe.flow import SnapshotRequest
from freezeframe.model import DiskSpec, Member, SetStatus, SnapshotSet
from freezeframe.ports import Catalog, Domains, InstanceLocks, MemberStore, ProgressCallback

SKIPPED_KEY = "freezeframe.skipped_disks"
T = TypeVar("T")
Lazy = Callable[[], T]
"""A port connected on first use (libvirt), so operations that do not need it never open it."""


class Snapshot(Protocol):
    """Takes a set, as ``Freezeframe.snapshot`` does (the safety set of a revert, a backup)."""

    def __call__(self, request: SnapshotRequest, progress: ProgressCallback | None = None) -> SnapshotSet: ...


def now() -> datetime:
    return datetime.now(UTC)


class Holds:
    """The per-set / per-name / per-instance locks every operation takes, refused with a message naming the thing."""

    def __init__(self, locks: InstanceLocks) -> None:
        self.locks = locks

    @contextlib.contextmanager
    def hold(self, key: str, what: str) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.locks.hold(key))
            except InstanceBusy:
                raise InstanceBusy(
                    f"{what} is in use by another freezeframe operation; wait for it to finish"
                ) from None
            yield

    def set(self, snapshot_set: SnapshotSet) -> contextlib.AbstractContextManager[None]:
        return self.hold(f"set-{snapshot_set.id}", f"set {snapshot_set.name}")

    def name(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self.hold(f"name-{name}", f"instance name {name}")

    def instance(self, uuid: str, name: str) -> contextlib.AbstractContextManager[None]:
        return self.hold(uuid, f"instance {name}")


class Markers:
    """Small JSON files written before a step a SIGKILL could cut in half; ``repair`` reads them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, kind: str, key: str) -> Path:
        return self.directory / f"{kind}-{key}.json"

    def write(self, kind: str, key: str, data: Mapping[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(kind, key)
        write_atomically(path, json.dumps({"kind": kind, "pid": os.getpid(), **data}).encode())
        return path

    def read(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def all(self) -> list[Path]:
        return sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []


@dataclass(frozen=True)
class Stores:
    """The MemberStore for each kind of member; an unknown kind is refused before anything is made."""

    by_kind: Mapping[str, MemberStore]

    def of(self, member: Member) -> MemberStore:
        store = self.by_kind.get(member.store)
        if store is None:
            raise PreflightFailed(
                f"member {member.target} of set {member.set_id} lives in a {member.store!r} store, which this "
                f"freezeframe does not have (it has: {', '.join(sorted(self.by_kind))})"
            )
        return store


def available(catalog: Catalog, set_ref: str) -> SnapshotSet:
    snapshot_set = catalog.get_set(set_ref)
    if snapshot_set.status is not SetStatus.AVAILABLE:
        raise InvalidRequest(
            f"set {snapshot_set.name} ({snapshot_set.id}) is {snapshot_set.status}; only available sets "
            "can be restored, reverted to or extracted"
        )
    return snapshot_set


def member_disks(snapshot_set: SnapshotSet, stores: Stores) -> list[tuple[DiskSpec, Member]]:
    """Each member with the disk the set recorded for it; every member's data must be there."""
    if not snapshot_set.members:
        raise PreflightFailed(f"set {snapshot_set.id} ({snapshot_set.name}) has no members to restore")
    missing = [f"{m.target} ({m.path})" for m in snapshot_set.members if not stores.of(m).present(m)]
    if missing:
        raise PreflightFailed(
            f"set {snapshot_set.id} ({snapshot_set.name}) is missing member data: {', '.join(missing)}; "
            f"nothing was changed. Check it with `freezeframe verify {snapshot_set.id}` or delete it"
        )
    specs = {d.target: d for d in snapshot_set.hardware.disks}
    result = []
    for m in snapshot_set.members:
        spec = specs.get(m.target) or DiskSpec(
            target=m.target, bus=m.bus, source_path=m.source_path, format=m.format,
            virtual_size=m.virtual_size, boot_order=m.boot_order,
        )  # fmt: skip
        result.append((spec, m))
    return result


def left_out(snapshot_set: SnapshotSet) -> dict[str, str]:
    """Disks of the original instance that are not in the set (target -> why)."""
    captured = {m.target for m in snapshot_set.members}
    skipped = {}
    for item in snapshot_set.metadata.get(SKIPPED_KEY, "").split("; "):
        target, sep, why = item.partition(": ")
        if sep:
            skipped[target] = why
    left = {}
    for disk in snapshot_set.hardware.disks:
        if disk.target in captured:
            continue
        if disk.device != "disk":
            left[disk.target] = f"{disk.device}: not part of a snapshot set"
        else:
            left[disk.target] = skipped.get(disk.target, "not captured in the set")
    return left


def ensure_name_free(domains: Domains, name: str) -> None:
    """Only that the name is taken: never whose instance holds it (it may be another project's)."""
    if domains.name_taken(name):
        raise InvalidRequest(f"an instance named {name!r} already exists; choose another name with --as")
