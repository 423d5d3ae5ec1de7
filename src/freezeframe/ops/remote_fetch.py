"""Disaster recovery from a remote: ``remote scan`` rebuilds catalog records, ``restore --from`` fetches the data.

- ``scan``: every complete copy on the remote (a manifest under ``sets/``) becomes a catalog record, unless the
  catalog has the set already; the copy is recorded either way. Members point at where ``fetch`` will put them
  in the repository; until then they are absent (restore says so).
- ``fetch``: the set's member objects and those of every set they build on are downloaded side by side into the
  repository (``<set>/<target>.qcow2``: the relative backing names join them into chains), unsealed, checked
  against the SHA-256 recorded at copy time, and the catalog's members are updated to describe the fetched images
  (file store, zstd qcow2, the remote's parent sets). The data is then a local set like any other: restore,
  verify, export work unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from freezeframe.errors import RemoteError, SetNotFound
from freezeframe.incremental import KIND_KEY, PARENT_KEY
from freezeframe.model import STORE_KEY, SnapshotSet
from freezeframe.ops import remote_layout as layout
from freezeframe.ops.copy import RemoteHandle, check_marker
from freezeframe.ports import Catalog, Repository
from freezeframe.ports.remote import CopyRecord, MemberPacker, PartCallback, RemoteRegistry
from freezeframe.serialize import set_from_dict

REMOTE_KEY = "freezeframe.remote"
"""Member metadata: the remote a fetched member came from."""
_BACKEND_KEYS = ("freezeframe.rbd.snapshot",)


class RemoteSets:
    def __init__(
        self,
        catalog: Catalog,
        repository: Repository,
        member_path: Callable[[str, str], Path],
        packer: MemberPacker,
        registry: RemoteRegistry,
        open_store: Callable[[str], RemoteHandle],
    ) -> None:
        self.catalog = catalog
        self.repository = repository
        self.member_path = member_path
        self.packer = packer
        self.registry = registry
        self.open_store = open_store

    # ---- scan ----------------------------------------------------------------------------------------------

    def scan(self, remote_name: str) -> list[SnapshotSet]:
        """The sets the remote holds, each recorded in the catalog (added when missing)."""
        remote = self.open_store(remote_name)
        check_marker(remote)
        found = []
        keys = remote.store.keys(layout.SETS)
        for set_id in layout.set_ids_in(keys, remote.sealed):
            if f"{layout.set_prefix(set_id)}deleted" not in keys:  # kept only for the copies building on it
                found.append(self._record(remote, set_id))
        return found

    def manifest(self, remote: RemoteHandle, set_id: str) -> dict[str, Any]:
        key = layout.manifest_key(set_id, remote.sealed)
        if remote.store.head(key) is None:
            raise SetNotFound(f"set {set_id} has no complete copy on remote {remote.spec.name}")
        data = remote.store.get_bytes(key)
        if remote.sealer is not None:
            data = remote.sealer.open_bytes(data, key)
        try:
            record = json.loads(data)
        except ValueError as exc:
            raise RemoteError(f"remote {remote.spec.name}: the manifest of set {set_id} is not JSON ({exc})") from exc
        if not isinstance(record, dict) or record.get("id") != set_id:
            raise RemoteError(f"remote {remote.spec.name}: the manifest under {key} is not the record of set {set_id}")
        return record

    def _record(self, remote: RemoteHandle, set_id: str) -> SnapshotSet:
        manifest = self.manifest(remote, set_id)
        try:
            snapshot_set = self.catalog.get_set(set_id)
        except SetNotFound:
            snapshot_set = self._as_fetched(set_from_dict(manifest), remote.spec.name, manifest)
            self.catalog.add_set(snapshot_set)
        members = layout.remote_members(manifest, f"remote {remote.spec.name} set {set_id}")
        stored = sum(m.size for m in members.values())
        self.registry.record_copy(CopyRecord(set_id, remote.spec.name, datetime.now(UTC), 0, stored))
        return snapshot_set

    def _as_fetched(self, snapshot_set: SnapshotSet, remote_name: str, manifest: dict[str, Any]) -> SnapshotSet:
        """The record of a set whose members are (or will be) the fetched objects in the repository."""
        objects = layout.remote_members(manifest, f"remote {remote_name} set {snapshot_set.id}")
        for member in snapshot_set.members:
            entry = objects.get(member.target)
            if entry is None:
                raise RemoteError(f"remote {remote_name}: set {snapshot_set.id} has no object for {member.target}")
            member.path = str(self.member_path(snapshot_set.id, member.target))
            member.format = "qcow2"
            member.sha256 = entry.sha256
            for key in (STORE_KEY, *_BACKEND_KEYS):
                member.metadata.pop(key, None)
            member.metadata[REMOTE_KEY] = remote_name
            if entry.parent_set is None:
                member.metadata.pop(PARENT_KEY, None)
                member.metadata[KIND_KEY] = "full"
            else:
                member.metadata[PARENT_KEY] = entry.parent_set
                member.metadata[KIND_KEY] = "incremental"
        return snapshot_set

    # ---- fetch ---------------------------------------------------------------------------------------------

    def fetch(self, set_ref: str, remote_name: str, progress: PartCallback | None = None) -> SnapshotSet:
        """The set's data (and its parents') in the repository, its catalog record describing it."""
        remote = self.open_store(remote_name)
        check_marker(remote)
        try:
            set_id = self.catalog.get_set(set_ref).id
        except SetNotFound:
            set_id = set_ref  # a set id known only to the remote
        fetched: SnapshotSet | None = None
        pending, done = [set_id], set()
        while pending:
            current = pending.pop()
            if current in done:
                continue
            done.add(current)
            one = self._fetch_set(remote, current, progress)
            fetched = fetched or one
            pending += [m.metadata[PARENT_KEY] for m in one.members if PARENT_KEY in m.metadata]
        assert fetched is not None
        return fetched

    def _fetch_set(self, remote: RemoteHandle, set_id: str, progress: PartCallback | None) -> SnapshotSet:
        manifest = self.manifest(remote, set_id)
        objects = layout.remote_members(manifest, f"remote {remote.spec.name} set {set_id}")
        snapshot_set = self._as_fetched(set_from_dict(manifest), remote.spec.name, manifest)
        for member in snapshot_set.members:
            path = Path(member.path)
            if path.is_file() and self.packer.sha256(path) == member.sha256:
                continue
            self._download(remote, objects[member.target], path, progress)
        try:
            local = self.catalog.get_set(set_id)
        except SetNotFound:
            self.catalog.add_set(snapshot_set)
        else:
            local.members = snapshot_set.members
            self.catalog.update_set(local)
            snapshot_set = local
        self.repository.write_manifest(snapshot_set)
        return snapshot_set

    def _download(
        self, remote: RemoteHandle, entry: layout.RemoteMember, path: Path, progress: PartCallback | None
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = path.with_name(path.name + ".part")
        sealed = path.with_name(path.name + layout.SEALED)
        try:
            if remote.sealer is None:
                remote.store.download(entry.key, partial, progress)
            else:
                remote.store.download(entry.key, sealed, progress)
                remote.sealer.open(sealed, partial, entry.key)
            digest = self.packer.sha256(partial)
            if digest != entry.sha256:
                raise RemoteError(
                    f"{entry.key} on remote {remote.spec.name} has SHA-256 {digest}, not {entry.sha256} as recorded"
                )
            partial.rename(path)
        finally:
            partial.unlink(missing_ok=True)
            sealed.unlink(missing_ok=True)
