"""createImage / createBackup results as real Glance images, the way Nova makes them.

Nova creates the image record first (``queued``) and answers with its id, then uploads; clients poll Glance until
``active``. Here: ``reserve`` creates the record (owned by the caller's project, private, properties naming the
set UUID and the instance) before the job is queued; the job captures the set, then ``publish`` adds
``block_device_mapping`` (every member, as for Nova's volume-backed snapshots) and streams the root disk's data
(Glance: ``saving`` while it arrives, ``active`` once stored). A failed job deletes its image (Nova does the
same), and a rotation deletes the Glance images of the sets it removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from freezeframe.adapters.glance import Glance
from freezeframe.errors import FreezeframeError
from freezeframe.model import Instance, SnapshotSet
from freezeframe.ops.compute import Taken, root_disk
from freezeframe.ops.glance_records import GLANCE_KEY, record_glance_image
from freezeframe.ports import ImageRef
from freezeframe.service import Freezeframe

log = logging.getLogger("freezeframe.api")

DISK_FORMAT = "qcow2"


def glance_properties(
    instance: Instance, set_id: str, kind: str, backup_type: str | None, metadata: Mapping[str, str]
) -> dict[str, str]:
    """What Nova puts on a snapshot image, the user's metadata, and the set UUID."""
    root = root_disk(instance)
    props = {
        **metadata,
        "image_type": kind,
        "instance_uuid": instance.uuid,
        "freezeframe_set_uuid": set_id,
        "bdm_v2": "True",
    }
    if root is not None:
        props["root_device_name"] = f"/dev/{root}"
    if backup_type is not None:
        props["backup_type"] = backup_type
    return props


@dataclass
class GlancePublisher:
    """One request's Glance image: reserved before the job, published (or deleted) by it."""

    glance: Glance
    service: Freezeframe
    image_id: str
    instance_uuid: str
    earlier: dict[str, str] = field(default_factory=dict)
    """set id -> Glance image id of the instance's sets before this job (to delete the rotated ones)."""

    @classmethod
    def reserve(
        cls, glance: Glance, service: Freezeframe, name: str, owner: str | None, instance: Instance,
        properties: Mapping[str, str],
    ) -> GlancePublisher:  # fmt: skip
        image = glance.create(name, DISK_FORMAT, "bare", owner, properties)
        return cls(glance, service, str(image["id"]), instance.uuid)

    def prepare(self) -> None:
        """Before the capture: the Glance images of this instance's sets, which a rotation may remove."""
        for s in self.service.catalog.list_sets():
            if s.instance_uuid == self.instance_uuid and s.metadata.get(GLANCE_KEY):
                self.earlier[s.id] = s.metadata[GLANCE_KEY]

    def publish(self, taken: Taken) -> dict[str, object]:
        """Record the image on the set, delete the images of rotated-out sets, describe every member, upload."""
        from freezeframe.api.nova_views import block_device_mapping

        snapshot_set = record_glance_image(
            self.service.catalog, self.service.repository, taken.snapshot_set, self.image_id
        )
        # The rotation already removed its sets: their images go first, whatever the upload does.
        deleted = [self.earlier[s] for s in taken.rotated if s in self.earlier and self.glance.delete(self.earlier[s])]
        root, bdm = block_device_mapping(snapshot_set)
        self.glance.set_properties(self.image_id, {"block_device_mapping": json.dumps(bdm)})
        if root is not None:
            with self._root_data(snapshot_set, root.target) as path, path.open("rb") as data:
                self.glance.upload(self.image_id, data)
        return {"glance_image_id": self.image_id, "glance_rotated_out": deleted}

    def discard(self) -> None:
        """The request failed: its image must not stay ``queued`` forever."""
        try:
            self.glance.delete(self.image_id)
        except FreezeframeError as exc:
            log.warning("could not delete Glance image %s of a failed request: %s", self.image_id, exc)

    @contextlib.contextmanager
    def _root_data(self, snapshot_set: SnapshotSet, target: str) -> Iterator[Path]:
        """The root member as one standalone qcow2 file: as stored when it is one, else flattened into a temp file."""
        member = next(m for m in snapshot_set.members if m.target == target)
        source = self.service.parts.stores.of(member).source(member)
        if source.format == DISK_FORMAT and source.path.is_file() and self.service.images.info(source).backing is None:
            yield source.path
            return
        cache = self.service.settings.cache_dir
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".ff-glance-", dir=cache) as tmp:
            flat = ImageRef(Path(tmp) / f"{target}.qcow2", DISK_FORMAT)
            self.service.images.convert(source, flat)
            yield flat.path
