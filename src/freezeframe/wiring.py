"""The one place that builds objects: adapters plugged into the operations.

(Placeholder until the ops branch's wiring lands: only the export/import section lives here for now.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from freezeframe.adapters.image_store import open_image_store
from freezeframe.adapters.instance_folders import DirectoryInstanceFolders
from freezeframe.adapters.libvirt_domains import LibvirtDomains
from freezeframe.adapters.packages import OvaPackages
from freezeframe.adapters.repository import FileMembers
from freezeframe.model import FILE_STORE
from freezeframe.ops.export import Exporter
from freezeframe.ops.holds import NamedHolds
from freezeframe.ops.images import StoredImages
from freezeframe.ops.import_build import Importer
from freezeframe.ops.import_checks import BOOT_DIRS_ENV, DEFAULT_BOOT_DIRS
from freezeframe.portable import Portable

if TYPE_CHECKING:
    from freezeframe.service import Freezeframe


# ---- export / import / image store (freezeframe.portable) ------------------------------------------------


def boot_dirs_from_env(home: Path) -> list[Path]:
    """``FREEZEFRAME_BOOT_DIRS`` (os.pathsep-separated), else the usual boot directories and the home."""
    env = os.environ.get(BOOT_DIRS_ENV)
    listed = env.split(os.pathsep) if env else [*DEFAULT_BOOT_DIRS, str(home)]
    return [Path(p) for p in listed if p.strip()]


def portable(service: Freezeframe, *, domain_type: str = "qemu", boot_dirs: Sequence[Path] | None = None) -> Portable:
    """Export, import and the image store over the service's catalog, locks, images and libvirt connection."""
    settings = service.settings
    holds = NamedHolds(service.locks)
    packages = OvaPackages()
    stored: list[StoredImages] = []

    def images() -> StoredImages:
        if not stored:
            stored.append(StoredImages(open_image_store(settings.home, service.catalog), holds))
        return stored[0]

    def exporter() -> Exporter:
        stores = {FILE_STORE: FileMembers(service.images)}
        return Exporter(service.catalog, stores, packages, images().store, holds)

    def importer() -> Importer:
        return Importer(
            packages,
            images().store,
            service.images,
            LibvirtDomains(service.hypervisor.conn, settings.libvirt_uri),
            DirectoryInstanceFolders(settings.home / "instances", settings.home / "lifecycle"),
            holds,
            domain_type=domain_type,
            boot_dirs=boot_dirs if boot_dirs is not None else boot_dirs_from_env(settings.home),
        )

    return Portable(exporter, importer, images)
