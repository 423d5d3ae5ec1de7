"""The flow's side of backend-native volumes (Ceph RBD): open before the window, members after, removal on failure.

Kept apart from ``flow`` so the flow stays one screenful per step; pure like it (ports and model only).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager

from freezeframe.errors import FreezeframeError, PreflightFailed
from freezeframe.model import RBD_STORE, STORE_KEY, DiskSpec, Member, SetStatus, SnapshotSet
from freezeframe.ports import Catalog, JournalEntry
from freezeframe.ports.volumes import VOLUMES_KEY, VolumeCapture, VolumeImages, Volumes, VolumeSnapshot

log = logging.getLogger(__name__)
RBD_SNAPSHOT_KEY = "freezeframe.rbd.snapshot"
LEFTOVER_KEY = "freezeframe.rbd.leftover"
"""Set metadata of a failed set whose RBD snapshots could not be removed (``POOL/IMAGE``, comma-separated):
``repair`` retries the removal, so a cluster unreachable at failure time leaves nothing behind for good."""


class _NoVolumes:
    def snapshot(self) -> list[VolumeSnapshot]:
        return []


NO_VOLUMES: VolumeCapture = _NoVolumes()


def volume_images(stores: Mapping[str, object]) -> VolumeImages:
    """The store that makes whole RBD images (``--to rbd:…``, ``--storage rbd``, revert of RBD disks)."""
    store = stores.get(RBD_STORE)
    if not isinstance(store, VolumeImages):
        raise PreflightFailed("this freezeframe has no RBD store: Ceph's Python bindings and FREEZEFRAME_CEPH_CONF")
    return store


def journal_volumes(entry: JournalEntry, vols: Sequence[DiskSpec]) -> None:
    """Written before the window: the volumes this set may snapshot, so repair can find what it made."""
    entry.extra[VOLUMES_KEY] = ",".join(str(d.source_path) for d in vols)


def _journaled(entry: JournalEntry) -> list[str]:
    return [v for v in entry.extra.get(VOLUMES_KEY, "").split(",") if v]


def open_volumes(
    volumes: Volumes | None, snapshot_set: SnapshotSet, vols: Sequence[DiskSpec]
) -> AbstractContextManager[VolumeCapture]:
    if not vols:
        return contextlib.nullcontext(NO_VOLUMES)
    if volumes is None:
        raise PreflightFailed(
            f"{snapshot_set.instance_name} has RBD disks but no Ceph cluster is configured (FREEZEFRAME_CEPH_CONF)"
        )
    return volumes.open(snapshot_set.id, snapshot_set.name, vols)


def existing_volumes(
    volumes: Volumes | None, set_id: str, disks: Sequence[DiskSpec], entry: JournalEntry
) -> list[VolumeSnapshot]:
    """The snapshots a handed-over set made (the journal names the volumes)."""
    made = set(_journaled(entry))
    chosen = [d for d in disks if d.volume is not None and d.source_path in made]
    return volumes.existing(set_id, chosen) if chosen and volumes is not None else []


def remove_volumes(volumes: Volumes | None, set_id: str, entry: JournalEntry, catalog: Catalog) -> bool:
    """Snapshots a failed or interrupted set made go with it (their names carry the set UUID).

    When the cluster cannot be reached now, the failed set's row keeps the volumes (``LEFTOVER_KEY``) and
    ``repair`` retries: the journal entry is cleared after this, so it must not be the only record.
    """
    names = _journaled(entry)
    if not names:
        return True
    try:
        if volumes is None:
            raise PreflightFailed("no Ceph cluster is configured (FREEZEFRAME_CEPH_CONF)")
        volumes.remove(set_id, names)
        return True
    except FreezeframeError as exc:
        log.error("could not remove the RBD snapshots of set %s (%s); `freezeframe repair` retries", set_id, exc)
    try:
        failed = catalog.get_set(set_id)
        failed.metadata[LEFTOVER_KEY] = ",".join(names)
        catalog.update_set(failed)
    except FreezeframeError:
        log.exception("could not note the RBD snapshots left by set %s", set_id)
    return False


def retry_leftovers(volumes: Volumes | None, catalog: Catalog) -> list[str]:
    """``repair``: remove the RBD snapshots of failed sets whose removal failed earlier (unreachable cluster)."""
    if volumes is None:
        return []
    reports = []
    for failed in catalog.list_sets(status=SetStatus.FAILED):
        names = [v for v in failed.metadata.get(LEFTOVER_KEY, "").split(",") if v]
        if not names:
            continue
        try:
            removed = volumes.remove(failed.id, names)
        except FreezeframeError as exc:
            reports.append(f"set {failed.id}: its RBD snapshots still cannot be removed ({exc}); run repair again")
            continue
        del failed.metadata[LEFTOVER_KEY]
        catalog.update_set(failed)
        reports.append(f"set {failed.id}: removed the RBD snapshots its failure left ({', '.join(removed) or 'none'})")
    return reports


def volume_members(
    snapshot_set: SnapshotSet, snaps: Sequence[VolumeSnapshot], volumes: Volumes, metadata: dict[str, str]
) -> list[Member]:
    """One member per snapshot: ``path`` is ``rbd:POOL/IMAGE@SNAP``, the digest is of the snapshot's content."""
    return [
        Member(
            set_id=snapshot_set.id,
            target=v.disk.target,
            bus=v.disk.bus,
            boot_order=v.disk.boot_order,
            virtual_size=v.disk.virtual_size,
            format="raw",
            path=v.source,
            source_path=v.disk.source_path,
            sha256=volumes.checksum(v),
            metadata={
                **metadata,
                "freezeframe.target": v.disk.target,
                STORE_KEY: RBD_STORE,
                RBD_SNAPSHOT_KEY: v.snapshot,
            },
        )
        for v in snaps
    ]
