"""Deleting a set of a chain: its incremental children first take in what they read from it.

A child member over the deleted member is rebased onto the deleted member's own parent (``qemu-img rebase`` in
safe mode copies exactly the clusters that would read differently), or made standalone when the deleted member
was full; so every remaining set reads bit for bit what it read before. The set is marked ``deleting`` before
any of this, and a child image whose backing file already moved is not rebased again: a crash at any point leaves
a ``deleting`` row that the next delete or ``repair`` finishes from where it stopped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from freezeframe.errors import FreezeframeError, HypervisorError, InstanceNotFound
from freezeframe.incremental import (
    DEPTH_KEY,
    FULL,
    INCREMENTAL,
    KIND_KEY,
    PARENT_KEY,
    WRITTEN_KEY,
    depth_of,
    set_checkpoint,
)
from freezeframe.model import Member, SetStatus, SnapshotSet
from freezeframe.ops.common import Lazy, Stores
from freezeframe.ports import Catalog, ChangeTracking, Hypervisor, ImageRef, Images, Repository

log = logging.getLogger(__name__)
CHAIN_FORMAT = "qcow2"


class Chains:
    def __init__(
        self,
        catalog: Catalog,
        repository: Repository,
        stores: Stores,
        images: Images,
        hypervisor: Lazy[Hypervisor],
        tracking: Lazy[ChangeTracking] | None,
    ) -> None:
        self.catalog = catalog
        self.repository = repository
        self.stores = stores
        self.images = images
        self.hypervisor = hypervisor
        self.tracking = tracking

    def children(self, snapshot_set: SnapshotSet) -> list[SnapshotSet]:
        """Sets with a member whose parent is a member of this set."""
        found = []
        for other in self.catalog.list_sets(instance=snapshot_set.instance_uuid):
            if other.status is not SetStatus.FAILED and any(
                m.metadata.get(PARENT_KEY) == snapshot_set.id for m in other.members
            ):
                found.append(other)
        return found

    def merge_into_children(self, snapshot_set: SnapshotSet) -> list[str]:
        """Make every child stand without this set; returns the ids of the children changed."""
        merged = []
        for child in self.children(snapshot_set):
            for member in child.members:
                if member.metadata.get(PARENT_KEY) == snapshot_set.id:
                    self._merge(snapshot_set, member)
            self.repository.write_manifest(child)
            self.catalog.update_set(child)
            self.renumber_descendants(child)
            merged.append(child.id)
        return merged

    def renumber_descendants(self, snapshot_set: SnapshotSet) -> None:
        """Every member building on this set's members, at any level, gets its chain depth recounted from its
        parent's: one incremental fewer under a deleted set means one fewer for ``--max-chain`` all the way down.
        Recounted, not decremented, so running it again (repair) changes nothing."""
        pending = [snapshot_set]
        while pending:
            parent = pending.pop()
            depths = {m.target: depth_of(m) for m in parent.members}
            for child in self.children(parent):
                changed = False
                for member in child.members:
                    if member.metadata.get(PARENT_KEY) != parent.id or member.target not in depths:
                        continue
                    depth = str(depths[member.target] + 1)
                    if member.metadata.get(DEPTH_KEY) != depth:
                        member.metadata[DEPTH_KEY] = depth
                        changed = True
                if changed:
                    self.repository.write_manifest(child)
                    self.catalog.update_set(child)
                pending.append(child)

    def _merge(self, snapshot_set: SnapshotSet, member: Member) -> None:
        mine = next((m for m in snapshot_set.members if m.target == member.target), None)
        if mine is None:
            raise HypervisorError(
                f"set {snapshot_set.id} has no member {member.target}, yet {member.path} builds on it"
            )
        grandparent = self._parent_member(mine)
        path = Path(member.path)
        current = self.images.info(ImageRef(path, CHAIN_FORMAT)).backing
        if current is not None and Path(current).resolve() == Path(mine.path).resolve():
            backing = None
            if grandparent is not None:
                relative = os.path.relpath(Path(grandparent.path).resolve(), path.parent.resolve())
                backing = ImageRef(Path(relative), CHAIN_FORMAT)
            self.images.rebase(path, CHAIN_FORMAT, backing)
        meta = member.metadata
        if grandparent is None:
            meta[KIND_KEY] = FULL
            for key in (PARENT_KEY, DEPTH_KEY):
                meta.pop(key, None)
        else:
            meta[KIND_KEY] = INCREMENTAL
            meta[PARENT_KEY] = grandparent.set_id
            meta[DEPTH_KEY] = str(depth_of(grandparent) + 1)
        meta[WRITTEN_KEY] = str(self.repository.written_bytes(path))
        member.sha256 = self.stores.of(member).checksum(member)

    def _parent_member(self, member: Member) -> Member | None:
        parent_id = member.metadata.get(PARENT_KEY)
        if parent_id is None:
            return None
        parent = self.catalog.get_set(parent_id)
        return next(m for m in parent.members if m.target == member.target)

    def drop_checkpoint(self, snapshot_set: SnapshotSet) -> None:
        """The set's checkpoint goes with it (each live bitmap slows guest writes); best effort."""
        name = set_checkpoint(snapshot_set)
        if name is None or self.tracking is None:
            return
        try:
            instance = self.hypervisor().lookup(snapshot_set.instance_uuid)
            self.tracking().remove(instance, name)
        except InstanceNotFound:
            return
        except FreezeframeError as exc:
            log.warning("could not delete checkpoint %s of set %s: %s", name, snapshot_set.id, exc)
