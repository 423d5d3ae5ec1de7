"""How sets go: delete (flattening the instances that still depend on a set), backup with rotation, and the
finishing of deletes a crash interrupted.

A delete marks the set ``deleting`` before removing any data, so a crash in between leaves a row that the next
delete or ``repair`` finishes. Rotation only ever deletes sets the caller may see (``visible``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from freezeframe.errors import (
    FreezeframeError,
    HypervisorError,
    InstanceBusy,
    InvalidRequest,
    SetHasDependants,
)
from freezeframe.flow import SnapshotRequest
from freezeframe.incremental import AUTO, DEFAULT_MAX_CHAIN
from freezeframe.model import Consistency, SetStatus, SnapshotSet
from freezeframe.ops.chains import Chains
from freezeframe.ops.common import Holds, Lazy, Snapshot, Stores, now
from freezeframe.ports import (
    Catalog,
    ChangeTracking,
    Domains,
    Hypervisor,
    ImageRef,
    Images,
    ProgressCallback,
    Repository,
    Restores,
)
from freezeframe.ports.volumes import RBD_PREFIX, ClonedMembers
from freezeframe.signals import deferred_signals
from freezeframe.validation import validate_backup_type

log = logging.getLogger(__name__)
CHILD_FORMAT = "qcow2"

Visible = Callable[[SnapshotSet], bool]
"""Whether the caller may see (and so rotate away) a set."""


@dataclass(frozen=True)
class Dependant:
    """An image whose backing file is a member of the set."""

    instance_name: str
    instance_uuid: str | None
    target: str
    path: str
    member_path: str
    active: bool


@dataclass(frozen=True)
class DeleteResult:
    set_id: str
    set_name: str
    flattened: list[Dependant]


@dataclass(frozen=True)
class BackupResult:
    snapshot_set: SnapshotSet
    rotated_out: list[str]
    """Ids of the older sets of this backup type that were deleted."""
    kept_in_use: dict[str, str]
    """Sets past the rotation that were kept (id -> why), e.g. restored instances depend on them."""


class Retention:
    def __init__(
        self,
        catalog: Catalog,
        repository: Repository,
        stores: Stores,
        images: Images,
        domains: Lazy[Domains],
        restores: Restores,
        hypervisor: Lazy[Hypervisor],
        snapshot: Snapshot,
        holds: Holds,
        child_dirs: Sequence[Path],
        tracking: Lazy[ChangeTracking] | None = None,
    ) -> None:
        self.catalog = catalog
        self.repository = repository
        self.stores = stores
        self.images = images
        self.domains = domains
        """Connected only when a set has dependants to look at (deleting a plain set needs no hypervisor)."""
        self.restores = restores
        self.hypervisor = hypervisor
        self.snapshot = snapshot
        self.holds = holds
        self.child_dirs = tuple(child_dirs)
        """Folders whose ``*/*.qcow2`` may be children of members (restored and verify instances)."""
        self.chains = Chains(catalog, repository, stores, images, hypervisor, tracking)

    # ---- delete ----------------------------------------------------------------------------------------------

    def delete(self, set_ref: str, *, force: bool = False) -> DeleteResult:
        """Remove the set and its data; with dependants only under ``force``, which flattens them first."""
        snapshot_set = self.catalog.get_set(set_ref)
        with self.holds.set(snapshot_set):
            snapshot_set = self.catalog.get_set(snapshot_set.id)
            if snapshot_set.status is SetStatus.CREATING:
                raise InvalidRequest(
                    f"set {snapshot_set.name} is still being created; if no freezeframe process is running "
                    f"for {snapshot_set.instance_name}, run `freezeframe repair {snapshot_set.instance_name}` first"
                )
            dependants = self.dependants(snapshot_set) + self.clones(snapshot_set)
            if dependants and not force:
                names = ", ".join(f"{d.instance_name} ({d.target}: {d.path})" for d in dependants)
                raise SetHasDependants(
                    f"set {snapshot_set.name} ({snapshot_set.id}) is still the copy-on-write base of: {names}; "
                    "`delete --force` copies the data into them first, or discard those instances",
                    dependants,
                )
            for dependant in dependants:
                self._flatten(dependant)
            self._remove_set(snapshot_set)
        return DeleteResult(snapshot_set.id, snapshot_set.name, dependants)

    def _remove_set(self, snapshot_set: SnapshotSet) -> None:
        """Mark deleting, merge into incremental children, remove data, delete the row: a crash in between leaves a
        'deleting' row to finish."""
        if snapshot_set.status is not SetStatus.DELETING:
            snapshot_set.status = SetStatus.DELETING
            self.catalog.update_set(snapshot_set)
        with deferred_signals():
            self.chains.merge_into_children(snapshot_set)
            for member in snapshot_set.members:
                self.stores.of(member).remove(member)
            self.repository.remove(snapshot_set.id)
            if self.repository.exists(snapshot_set.id):
                raise HypervisorError(
                    f"could not remove the data of set {snapshot_set.id}; it stays 'deleting' until a later delete "
                    "or `freezeframe repair` removes it"
                )
            self.catalog.delete_set(snapshot_set.id)
        self.chains.drop_checkpoint(snapshot_set)

    def dependants(self, snapshot_set: SnapshotSet) -> list[Dependant]:
        """Images whose backing file is one of the set's members: restore rows plus our instance folders."""
        members = {self.stores.of(m).base_of(m): m for m in snapshot_set.members}
        if not members:
            return []
        rows = {r.path: r for r in self.restores.for_set(snapshot_set.id)}
        found = [(path, backing) for path, backing in self._children(rows) if backing in members]
        if not found:
            return []
        users = self.domains().users_of([p for p, _ in found])
        result = []
        for path, backing in found:
            row, user = rows.get(path), users.get(path)
            uuid: str | None
            if user is not None:
                name, uuid, target, active = user.instance_name, user.instance_uuid, user.target, user.active
            else:
                name = row.instance_name if row else Path(path).parent.name
                uuid = row.instance_uuid if row else None
                target = row.target if row else Path(path).stem
                active = False
            result.append(Dependant(name, uuid, target, path, members[backing].path, active))
        return result

    def clones(self, snapshot_set: SnapshotSet) -> list[Dependant]:
        """Backend clones of the set's members (RBD images restored from its snapshots)."""
        rows = {r.path: r for r in self.restores.for_set(snapshot_set.id)}
        found = []
        for m in snapshot_set.members:
            store = self.stores.of(m)
            for clone in store.children(m) if isinstance(store, ClonedMembers) else []:
                row = rows.get(RBD_PREFIX + clone)
                name, uuid = (row.instance_name, row.instance_uuid) if row else (clone, None)
                found.append(Dependant(name, uuid, m.target, RBD_PREFIX + clone, m.path, False))
        return found

    def _children(self, rows: Iterable[str]) -> Iterator[tuple[str, str]]:
        """(path, resolved backing file) of every candidate image that has one."""
        candidates = dict.fromkeys(rows)
        for folder in self.child_dirs:
            if folder.is_dir():
                candidates.update(dict.fromkeys(str(p) for p in sorted(folder.glob("*/*.qcow2"))))
        for path in candidates:
            if not Path(path).is_file():
                continue
            try:
                backing = self.images.info(ImageRef(Path(path), CHILD_FORMAT)).backing
            except FreezeframeError:
                log.warning("cannot read %s to see whether it depends on a set", path)
                continue
            if backing is not None:
                yield path, backing

    def _flatten(self, dependant: Dependant) -> None:
        """Copy the member's data into the child so it stands alone (running children: blockpull)."""
        if dependant.path.startswith(RBD_PREFIX):
            for store in self.stores.by_kind.values():
                if isinstance(store, ClonedMembers):
                    store.flatten(dependant.path[len(RBD_PREFIX) :])
                    return
        if dependant.active and dependant.instance_uuid:
            self.domains().block_pull(dependant.instance_uuid, dependant.target)
        else:
            self.images.rebase(Path(dependant.path), CHILD_FORMAT, None)
        if self.images.info(ImageRef(Path(dependant.path), CHILD_FORMAT)).backing is not None:
            raise HypervisorError(
                f"{dependant.path} of {dependant.instance_name} still has a backing file after flattening; "
                "the set was not deleted"
            )

    def repair(self) -> list[str]:
        """Finish deletes a crash interrupted."""
        reports = []
        for snapshot_set in self.catalog.list_sets(status=SetStatus.DELETING):
            try:
                with self.holds.set(snapshot_set):
                    self._remove_set(snapshot_set)
                    reports.append(f"set {snapshot_set.id} ({snapshot_set.name}): finished an interrupted delete")
            except InstanceBusy:
                reports.append(f"set {snapshot_set.id}: being deleted by another process; left alone")
        return reports

    # ---- backup with rotation --------------------------------------------------------------------------------

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
    ) -> BackupResult:
        """Nova's createBackup: a set tagged ``backup_type``, then only the newest ``rotation`` of that type stay.

        ``visible`` limits rotation to the sets the caller may see; a failed backup deletes nothing.
        """
        if rotation < 0:
            raise InvalidRequest(f"--rotation {rotation}: must be 0 or more (how many backups to keep)")
        validate_backup_type(backup_type)
        found = self.hypervisor().lookup(instance)
        snapshot_set = self.snapshot(
            SnapshotRequest(
                instance=found.uuid,
                consistency=consistency,
                require=require,
                name=name or f"{found.name}-{backup_type}-{now():%Y%m%dT%H%M%S%fZ}",
                metadata=dict(metadata or {}),
                backup_type=backup_type,
                set_id=set_id,
                mode=mode,
                max_chain=max_chain,
            ),
            progress,
        )
        rotated, kept = self.rotate(found.uuid, backup_type, rotation, visible=visible)
        return BackupResult(snapshot_set, rotated, kept)

    def rotate(
        self, instance_uuid: str, backup_type: str, rotation: int, *, visible: Visible | None = None
    ) -> tuple[list[str], dict[str, str]]:
        """Delete the available sets of this type for this instance beyond the newest ``rotation``, counting and
        deleting only sets ``visible`` accepts (an instance moved to another project keeps the old one's sets)."""
        if rotation < 0:
            raise InvalidRequest(f"--rotation {rotation}: must be 0 or more (how many backups to keep)")
        sets = self.catalog.list_sets(instance=instance_uuid, status=SetStatus.AVAILABLE, backup_type=backup_type)
        mine = [s for s in sets if s.instance_uuid == instance_uuid and (visible is None or visible(s))]
        rotated: list[str] = []
        kept: dict[str, str] = {}
        for old in mine[rotation:]:
            try:
                self.delete(old.id)
                rotated.append(old.id)
            except (SetHasDependants, InstanceBusy) as exc:
                kept[old.id] = str(exc)
                log.warning("backup rotation kept set %s: %s", old.id, exc)
        return rotated, kept
