"""Sets leave and enter the host as OVA packages: the façade the CLI and the HTTP API call.

The operations live in ``freezeframe.ops``: ``export`` (a set as a package, to a file or the image store),
``import_plan`` + ``import_checks`` (a package read into the machine to build; makes nothing), ``import_build``
(disks and domain, undone on any failure) and ``images`` (the store's list/show/delete/repair). They reach OVA
files, the image store, QEMU images, libvirt and locks only through ports; ``freezeframe.wiring`` builds them.
See docs/ovf.md ("Export, import and the image store").
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from freezeframe.errors import InvalidRequest
from freezeframe.ops.export import (
    DISK_FORMATS,
    OVF_VERSIONS,
    CollectionExportResult,
    ExportedDisk,
    Exporter,
    ExportResult,
    package_base,
)
from freezeframe.ops.images import StoredImages
from freezeframe.ops.import_build import ImportedDiskResult, Importer, ImportResult
from freezeframe.ops.import_checks import BOOT_DIRS_ENV, DEFAULT_BOOT_DIRS
from freezeframe.ports import ImageStore, ProgressCallback, StoredImage

if TYPE_CHECKING:
    from freezeframe.ops.groups import GroupOps, GroupSetView


class Portable:
    """Export a set as an OVA (to a file or the image store), list/delete stored images, import an OVA."""

    def __init__(
        self,
        exporter: Callable[[], Exporter],
        importer: Callable[[], Importer],
        images: Callable[[], StoredImages],
        groups: Callable[[], GroupOps] | None = None,
    ) -> None:
        """Each part is built on first use: listing or exporting needs no libvirt connection. ``groups``: where
        group sets are found (``export_group_set``)."""
        self._groups = groups
        self._make_exporter = exporter
        self._make_importer = importer
        self._make_images = images

    @cached_property
    def exporter(self) -> Exporter:
        return self._make_exporter()

    @cached_property
    def importer(self) -> Importer:
        return self._make_importer()

    @cached_property
    def stored(self) -> StoredImages:
        return self._make_images()

    @property
    def store(self) -> ImageStore:
        """The image store (the HTTP API streams packages out of it)."""
        return self.stored.store

    def export(
        self,
        set_ref: str,
        out: Path,
        *,
        disk_format: str = "qcow2",
        ovf_version: int = 1,
        force: bool = False,
        progress: ProgressCallback | None = None,
        manifest_digest: str | None = None,
    ) -> ExportResult:
        """One OVA of the set at ``out``; an existing file is replaced only with ``force`` (atomically)."""
        return self.exporter.export(
            set_ref, out, disk_format=disk_format, ovf_version=ovf_version, force=force, progress=progress,
            manifest_digest=manifest_digest,
        )  # fmt: skip

    def export_to_store(
        self,
        set_ref: str,
        *,
        name: str | None = None,
        disk_format: str = "qcow2",
        ovf_version: int = 1,
        progress: ProgressCallback | None = None,
        manifest_digest: str | None = None,
    ) -> ExportResult:
        """One OVA of the set, kept in the image store under a new id."""
        return self.exporter.export_to_store(
            set_ref, name=name, disk_format=disk_format, ovf_version=ovf_version, progress=progress,
            manifest_digest=manifest_digest,
        )  # fmt: skip

    def export_group_set(
        self,
        ref: str,
        out: Path,
        *,
        disk_format: str = "qcow2",
        ovf_version: int = 1,
        force: bool = False,
        progress: ProgressCallback | None = None,
        manifest_digest: str | None = None,
    ) -> CollectionExportResult:
        """One OVA of every set of a group set: an OVF VirtualSystemCollection named after the group set, one
        VirtualSystem per instance (``import_collection`` brings them back)."""
        view = self._group_set(ref)
        return self.exporter.export_collection(
            view.group_set.name, [s.id for s in view.sets], out, disk_format=disk_format, ovf_version=ovf_version,
            force=force, progress=progress, manifest_digest=manifest_digest,
        )  # fmt: skip

    def export_group_set_to_store(
        self,
        ref: str,
        *,
        name: str | None = None,
        disk_format: str = "qcow2",
        ovf_version: int = 1,
        progress: ProgressCallback | None = None,
        manifest_digest: str | None = None,
    ) -> CollectionExportResult:
        """``export_group_set`` into the image store (the REST API's group set export job)."""
        view = self._group_set(ref)
        return self.exporter.export_collection_to_store(
            view.group_set.name, [s.id for s in view.sets], image_name=name, disk_format=disk_format,
            ovf_version=ovf_version, progress=progress, manifest_digest=manifest_digest,
        )  # fmt: skip

    def _group_set(self, ref: str) -> GroupSetView:
        if self._groups is None:
            raise InvalidRequest("this Portable was built without consistency groups")
        return self._groups().usable(ref)

    def images(self) -> list[StoredImage]:
        return self.stored.images()

    def image(self, ref: str) -> StoredImage:
        return self.stored.image(ref)

    def delete_image(self, ref: str) -> StoredImage:
        """Remove a stored image (record and package); refused while an import reads it."""
        return self.stored.delete_image(ref)

    def repair(self) -> list[str]:
        """Finish interrupted image deletes, remove half-written packages (half-made imports: lifecycle repair)."""
        return self.stored.repair()

    def import_package(
        self,
        source: str | Path,
        name: str,
        *,
        start: bool = False,
        network: str | None = None,
        progress: ProgressCallback | None = None,
        storage: str = "file",
        pool: str | None = None,
    ) -> ImportResult:
        """A new instance NAME from an OVA file or a stored image (id, id prefix or name); ``storage="rbd"`` with
        ``pool`` makes its disks RBD images."""
        return self.importer.import_package(
            source, name, start=start, network=network, progress=progress, storage=storage, pool=pool
        )

    def import_collection(
        self,
        source: str | Path,
        prefix: str,
        *,
        start: bool = False,
        network: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[ImportResult]:
        """Every virtual system of a collection package (a group set's export) as ``PREFIX<name>``; all or
        nothing."""
        return self.importer.import_collection(source, prefix, start=start, network=network, progress=progress)


__all__ = [
    "BOOT_DIRS_ENV",
    "DEFAULT_BOOT_DIRS",
    "DISK_FORMATS",
    "OVF_VERSIONS",
    "CollectionExportResult",
    "ExportResult",
    "ExportedDisk",
    "ImportResult",
    "ImportedDiskResult",
    "Portable",
    "package_base",
]
