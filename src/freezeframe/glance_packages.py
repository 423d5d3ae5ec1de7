"""The proposal's last step: a set's OVF package as a Glance image, and a new instance from one.

``export_to_glance`` writes the OVA into the cache (the same exporter as ``export -o``), creates the image
(``container_format: ova``, the disk format inside, properties naming the set UUID, vCPUs, memory, architecture),
streams the file (``queued`` -> ``saving`` -> ``active``), and records the image id on
the set and every member. ``glance_package`` downloads an ``ova`` image for ``import``. A failed upload deletes the
image; the temp file always goes.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezeframe.adapters.glance import Glance
from freezeframe.adapters.keystone import service_session
from freezeframe.api.projects import PROJECT_KEY
from freezeframe.cloud_settings import CloudSettings
from freezeframe.errors import FreezeframeError, InvalidRequest
from freezeframe.ops.glance_records import record_glance_image
from freezeframe.service import Freezeframe

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def glance_from_env() -> Glance:
    settings = CloudSettings.from_env()
    if settings is None or not settings.glance:
        raise InvalidRequest(
            "no Glance configured: set FREEZEFRAME_KEYSTONE_URL, its service user and FREEZEFRAME_GLANCE_URL "
            "(docs/openstack.md)"
        )
    endpoint = None if settings.glance == "catalog" else settings.glance
    return Glance(service_session(settings), endpoint, settings.region_name)


def looks_like_glance_id(ref: str) -> bool:
    return bool(_UUID.match(ref)) and not Path(ref).exists()


@dataclass(frozen=True)
class GlanceExport:
    image_id: str
    name: str
    set_id: str
    status: str
    size: int
    disk_format: str
    container_format: str
    properties: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def export_to_glance(
    service: Freezeframe, glance: Glance, set_ref: str, *, name: str | None, disk_format: str, ovf_version: int,
    manifest_digest: str | None,
) -> GlanceExport:  # fmt: skip
    snapshot_set = service.catalog.get_set(set_ref)
    hw = snapshot_set.hardware
    properties = {
        "freezeframe_set_uuid": snapshot_set.id, "freezeframe_vcpus": str(hw.vcpus),
        "freezeframe_memory_mib": str(hw.memory_kib // 1024), "architecture": hw.arch,
        "instance_uuid": snapshot_set.instance_uuid,
    }  # fmt: skip
    cache = service.settings.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ff-glance-", dir=cache) as tmp:
        ova = Path(tmp) / "package.ova"
        service.portable.export(snapshot_set.id, ova, disk_format=disk_format, ovf_version=ovf_version,
                                manifest_digest=manifest_digest)  # fmt: skip
        owner = snapshot_set.metadata.get(PROJECT_KEY)
        image = glance.create(name or snapshot_set.name, disk_format, "ova", owner, properties)
        image_id = str(image["id"])
        try:
            with ova.open("rb") as data:
                glance.upload(image_id, data)
            record_glance_image(service.catalog, service.repository, snapshot_set, image_id)
        except BaseException:
            with contextlib.suppress(FreezeframeError):
                glance.delete(image_id)
            raise
    done = glance.get(image_id)
    return GlanceExport(
        image_id=image_id, name=str(done["name"]), set_id=snapshot_set.id, status=str(done["status"]),
        size=int(done.get("size") or 0), disk_format=str(done["disk_format"]),
        container_format=str(done["container_format"]), properties=properties,
    )  # fmt: skip


@contextlib.contextmanager
def glance_package(cache: Path, glance: Glance, image_id: str) -> Iterator[Path]:
    """An ``ova`` Glance image downloaded into the cache for the importer; removed afterwards."""
    image = glance.get(image_id)
    if image.get("container_format") != "ova" or image.get("status") != "active":
        raise InvalidRequest(
            f"Glance image {image_id} is {image.get('status')} with container_format {image.get('container_format')}: "
            "only active 'ova' images (freezeframe export --to-glance) can be imported"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ff-glance-", dir=cache) as tmp:
        path = Path(tmp) / f"{image_id}.ova"
        glance.download(image_id, path)
        yield path
