"""A set published to Glance records the image id on the set and on every member (the proposal's naming scheme:
each member names the image it belongs to), in the catalog and in the set's ``set.json``."""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from freezeframe.model import SnapshotSet

GLANCE_KEY = "freezeframe.glance_image_id"


class SetRecords(Protocol):
    def update_set(self, snapshot_set: SnapshotSet) -> None: ...


class Manifests(Protocol):
    def write_manifest(self, snapshot_set: SnapshotSet) -> None: ...


def record_glance_image(
    catalog: SetRecords, repository: Manifests, snapshot_set: SnapshotSet, image_id: str
) -> SnapshotSet:
    """The set and each member with ``freezeframe.glance_image_id``; the catalog first (what every reader uses)."""
    members = [replace(m, metadata={**m.metadata, GLANCE_KEY: image_id}) for m in snapshot_set.members]
    updated = replace(snapshot_set, metadata={**snapshot_set.metadata, GLANCE_KEY: image_id}, members=members)
    catalog.update_set(updated)
    repository.write_manifest(updated)
    return updated
