"""``freezeframe copy SET --to REMOTE``: put a set on a remote, sending only what the remote does not hold.

- A set whose manifest is on the remote is there: nothing is sent.
- An incremental member needs its parent set on the remote: the ancestors are copied first (oldest first), then
  the member's own clusters are packed over its parent (``MemberPacker``).
- A member object already on the remote (a run killed after it, before the manifest) is not sent again; an
  upload killed half-way resumes from its parts (the ObjectStore keeps the upload id beside the staged file).
- Each member is packed (zstd qcow2), optionally sealed (AES-GCM), staged under ``staging/<remote>/<set>/`` and
  uploaded; the staged files stay until the set's manifest is written, so a rerun reuses them.
- The manifest goes last; then the copy is recorded in the catalog (``list`` shows it).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from freezeframe.errors import InvalidRequest
from freezeframe.incremental import KIND_KEY, PARENT_KEY
from freezeframe.model import RBD_STORE, Member, SetStatus, SnapshotSet
from freezeframe.ops import remote_layout as layout
from freezeframe.ops.common import Holds, Stores
from freezeframe.ports import Catalog, ImageRef
from freezeframe.ports.remote import (
    ChangePacker,
    CopyRecord,
    MemberPacker,
    ObjectStore,
    PartCallback,
    RemoteRegistry,
    RemoteSpec,
    Sealer,
    SealerFactory,
    StoreFactory,
)
from freezeframe.serialize import set_to_dict

PARENT_META = "ff-parent-set"
"""Object metadata: the set whose object this one's backing file names (empty for a standalone object)."""
PACKED_SHA_KEY = "ff-packed-sha256"
"""Object metadata: SHA-256 of the member's qcow2 before sealing (what a download is checked against)."""


@dataclass
class CopyReport:
    set_id: str
    remote: str
    sets_copied: list[str] = field(default_factory=list)
    """This set and every ancestor that was not on the remote yet, oldest first."""
    members_sent: int = 0
    members_reused: int = 0
    bytes_sent: int = 0
    stored_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "set": self.set_id, "remote": self.remote, "sets_copied": self.sets_copied,
            "members_sent": self.members_sent, "members_reused": self.members_reused,
            "bytes_sent": self.bytes_sent, "stored_bytes": self.stored_bytes,
        }  # fmt: skip


@dataclass(frozen=True)
class RemoteHandle:
    """One remote opened: its spec, its store and (encrypted remotes) its sealer."""

    spec: RemoteSpec
    store: ObjectStore
    sealer: Sealer | None

    @property
    def sealed(self) -> bool:
        return self.sealer is not None


def open_remote(registry: RemoteRegistry, stores: StoreFactory, sealers: SealerFactory, name: str) -> RemoteHandle:
    spec = registry.get(name)
    return RemoteHandle(spec, stores(spec), sealers(spec))


def write_marker(remote: RemoteHandle) -> None:
    """The remote's format and, when encrypted, a sealed check value: ``check_marker`` fails on a wrong key before
    any data is fetched."""
    if remote.store.head(layout.MARKER) is not None:
        check_marker(remote)
        return
    record: dict[str, Any] = {"format": layout.FORMAT_VERSION, "encrypted": remote.sealed}
    if remote.sealer is not None:
        record["check"] = remote.sealer.seal_bytes(layout.CHECK_VALUE, layout.MARKER).hex()
    remote.store.put_bytes(layout.MARKER, json.dumps(record).encode(), {})


def check_marker(remote: RemoteHandle) -> None:
    from freezeframe.errors import RemoteError

    try:
        record = json.loads(remote.store.get_bytes(layout.MARKER))
        encrypted, check = bool(record["encrypted"]), record.get("check")
    except (ValueError, KeyError, TypeError) as exc:
        raise RemoteError(f"remote {remote.spec.name}: {layout.MARKER} is unreadable ({exc})") from exc
    if encrypted != remote.sealed:
        state = "encrypted" if encrypted else "not encrypted"
        raise RemoteError(f"remote {remote.spec.name} holds copies that are {state}; its --key-file setting differs")
    if remote.sealer is not None and isinstance(check, str):
        remote.sealer.open_bytes(bytes.fromhex(check), layout.MARKER)


class Copier:
    def __init__(
        self,
        catalog: Catalog,
        stores: Stores,
        packer: MemberPacker,
        registry: RemoteRegistry,
        open_store: Callable[[str], RemoteHandle],
        holds: Holds,
        staging: Path,
        changes: ChangePacker | None = None,
    ) -> None:
        self.catalog = catalog
        self.stores = stores
        self.packer = packer
        self.registry = registry
        self.open_store = open_store
        self.holds = holds
        self.staging = staging
        self.changes = changes

    def copy(self, set_ref: str, remote_name: str, progress: PartCallback | None = None) -> CopyReport:
        snapshot_set = self.catalog.get_set(set_ref)
        if snapshot_set.status is not SetStatus.AVAILABLE:
            raise InvalidRequest(f"set {snapshot_set.name} is {snapshot_set.status}; only available sets are copied")
        remote = self.open_store(remote_name)
        remote.store.ensure_bucket()
        write_marker(remote)
        report = CopyReport(snapshot_set.id, remote.spec.name)
        for one in self._chain(snapshot_set):
            if remote.store.head(layout.manifest_key(one.id, remote.sealed)) is None:
                with self.holds.set(one):
                    self._copy_set(one, remote, report, progress)
                report.sets_copied.append(one.id)
        return report

    def _chain(self, snapshot_set: SnapshotSet) -> list[SnapshotSet]:
        """The set and the sets its incremental members build on, oldest first."""
        chain = [snapshot_set]
        pending = [m.metadata[PARENT_KEY] for m in snapshot_set.members if PARENT_KEY in m.metadata]
        while pending:
            parent = self.catalog.get_set(pending.pop())
            if all(parent.id != s.id for s in chain):
                chain.append(parent)
                pending += [m.metadata[PARENT_KEY] for m in parent.members if PARENT_KEY in m.metadata]
        return sorted(chain, key=lambda s: s.created_at)

    def _copy_set(
        self, snapshot_set: SnapshotSet, remote: RemoteHandle, report: CopyReport, progress: PartCallback | None
    ) -> None:
        folder = self.staging / remote.spec.name / snapshot_set.id
        folder.mkdir(parents=True, exist_ok=True)
        entries: dict[str, layout.RemoteMember] = {}
        sent_here = 0
        for member in snapshot_set.members:
            entry, sent = self._copy_member(member, remote, folder, progress)
            entries[member.target] = entry
            sent_here += sent
            report.members_sent += 1 if sent else 0
            report.members_reused += 0 if sent else 1
        manifest = set_to_dict(snapshot_set)
        manifest["remote"] = {
            "members": {t: e.to_dict() for t, e in entries.items()},
            "encrypted": remote.sealed,
            "copied_at": datetime.now(UTC).isoformat(),
        }
        key = layout.manifest_key(snapshot_set.id, remote.sealed)
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
        remote.store.put_bytes(key, remote.sealer.seal_bytes(data, key) if remote.sealer else data, {})
        stored = sum(e.size for e in entries.values())
        report.bytes_sent += sent_here
        report.stored_bytes += stored
        self.registry.record_copy(CopyRecord(snapshot_set.id, remote.spec.name, datetime.now(UTC), sent_here, stored))
        shutil.rmtree(folder, ignore_errors=True)

    def _copy_member(
        self, member: Member, remote: RemoteHandle, folder: Path, progress: PartCallback | None
    ) -> tuple[layout.RemoteMember, int]:
        """The member's object on the remote (uploaded unless already there) and the bytes this call sent."""
        key = layout.member_key(member.set_id, member.target, remote.sealed)
        parent_set = member.metadata.get(PARENT_KEY) if member.metadata.get(KIND_KEY) == "incremental" else None
        there = remote.store.head(key)
        if there is not None and PACKED_SHA_KEY in there.metadata:
            parent_there = there.metadata.get(PARENT_META) or None  # what the object's backing file names
            return layout.RemoteMember(member.target, key, there.metadata[PACKED_SHA_KEY], there.size, parent_there), 0
        packed = folder / f"{member.target}.qcow2"
        previous = self._previous_volume_copy(member, remote)
        if not packed.exists():
            if previous is not None and self.changes is not None:
                parent_set = previous.set_id
                self.changes.pack_changes(member, previous, packed, layout.parent_name(parent_set, member.target))
            else:
                over, backing = self._parent_image(member, parent_set)
                self.packer.pack(self.stores.of(member).source(member), packed, over, backing)
        packed_sha = self.packer.sha256(packed)
        upload = packed
        if remote.sealer is not None:
            upload = folder / f"{member.target}.qcow2{layout.SEALED}"
            if not upload.exists():
                partial = upload.with_name(upload.name + ".part")
                remote.sealer.seal(packed, partial, key)
                partial.rename(upload)
        if previous is not None:
            parent_set = previous.set_id
        metadata = {PACKED_SHA_KEY: packed_sha, "ff-set": member.set_id, "ff-target": member.target,
                    PARENT_META: parent_set or ""}  # fmt: skip
        known = packed_sha if upload == packed else None  # the packed file was just hashed: not a second pass
        sent = remote.store.upload(key, upload, metadata, progress, known)
        return layout.RemoteMember(member.target, key, packed_sha, sent.size, parent_set), sent.bytes_sent

    def _previous_volume_copy(self, member: Member, remote: RemoteHandle) -> Member | None:
        """For an RBD member: the same volume's member in the newest earlier set of the instance that is on this
        remote and whose snapshot still exists; its copy is the base the changes since it go over."""
        if member.store != RBD_STORE or self.changes is None:
            return None
        snapshot_set = self.catalog.get_set(member.set_id)
        copied = {c.set_id for c in self.registry.copies() if c.remote == remote.spec.name}
        earlier = [
            s for s in self.catalog.list_sets(instance=snapshot_set.instance_uuid, status=SetStatus.AVAILABLE)
            if s.id in copied and s.created_at < snapshot_set.created_at
        ]  # fmt: skip
        for candidate in sorted(earlier, key=lambda s: s.created_at, reverse=True):
            same = [m for m in candidate.members if m.target == member.target and m.store == RBD_STORE]
            if not same or same[0].source_path != member.source_path:
                continue
            there = remote.store.head(layout.manifest_key(candidate.id, remote.sealed)) is not None
            return same[0] if there and self.stores.of(same[0]).present(same[0]) else None
        return None

    def _parent_image(self, member: Member, parent_set: str | None) -> tuple[ImageRef | None, str | None]:
        if parent_set is None:
            return None, None
        parent = self.catalog.get_set(parent_set)
        parent_member = next(m for m in parent.members if m.target == member.target)
        return self.stores.of(parent_member).source(parent_member), layout.parent_name(parent_set, member.target)
