"""The flow's side of backend-native volumes (Ceph RBD): open before the window, members after, removal on failure.

Kept apart from ``flow`` so the flow stays one screenful per step; pure like it (ports and model only).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager

from freezeframe.errors import FreezeframeError, PreflightFailed
from freezeframe.model import RBD_STORE, STORE_KEY, DiskSpec, Member, SnapshotSet
from freezeframe.ports import JournalEntry
from freezeframe.ports.volumes import VOLUMES_KEY, VolumeCapture, Volumes, VolumeSnapshot

log = logging.getLogger(__name__)
RBD_SNAPSHOT_KEY = "freezeframe.rbd.snapshot"


class _NoVolumes:
    def snapshot(self) -> list[VolumeSnapshot]:
        return []


NO_VOLUMES: VolumeCapture = _NoVolumes()


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


def remove_volumes(volumes: Volumes | None, set_id: str, entry: JournalEntry) -> None:
    """Snapshots a failed or interrupted set made go with it (their names carry the set UUID)."""
    names = _journaled(entry)
    if names and volumes is not None:
        try:
            volumes.remove(set_id, names)
        except FreezeframeError:
            log.exception("could not remove the RBD snapshots of set %s", set_id)


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
