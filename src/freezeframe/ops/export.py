"""Export: one available set as an OVA package, to a file or into the image store.

The set is held (``set-ID``) for the whole write, so a delete cannot remove its members under the writer. The
package is written through the ``Packages`` port, which writes atomically: on any failure no partial package
remains, an existing file given with ``force`` is untouched, and the image store records nothing.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from freezeframe.errors import InvalidRequest, PreflightFailed
from freezeframe.model import SetStatus, SnapshotSet
from freezeframe.ops.common import Holds, Stores
from freezeframe.ports import (
    Catalog,
    ImageRef,
    Images,
    ImageStore,
    NewImage,
    Packages,
    PackageSource,
    ProgressCallback,
    StoredImage,
    WrittenPackage,
)
from freezeframe.ports.volumes import RBD_PREFIX

DISK_FORMATS = ("qcow2", "vmdk")
OVF_VERSIONS = (1, 2)
MANIFEST_DIGESTS = ("sha1", "sha256")
DEFAULT_DIGEST = {1: "sha1", 2: "sha256"}
"""OVF 1.x readers (COT, older VMware) assume SHA-1 manifests; OVF 2 (DSP0243 2.x) uses SHA-256."""
_VMDK_ADAPTER = {"ide": "ide", "sata": "ide", "scsi": "lsilogic", "virtio": "lsilogic"}


@dataclass(frozen=True)
class ExportedDisk:
    target: str
    href: str
    format: str
    file_size: int
    capacity: int
    populated_size: int | None


@dataclass(frozen=True)
class ExportResult:
    set_id: str
    set_name: str
    path: str
    """The package file (for ``--to-store``, where the store keeps it)."""
    size: int
    allocated: int
    """Bytes the package takes on disk (holes for zero data make it smaller than ``size``)."""
    disk_format: str
    ovf_version: int
    seconds: float
    disks: list[ExportedDisk]
    image: StoredImage | None = None
    manifest_digest: str = "sha256"

    def to_dict(self) -> dict[str, Any]:
        return {
            "set_id": self.set_id,
            "set_name": self.set_name,
            "path": self.path,
            "size": self.size,
            "allocated": self.allocated,
            "disk_format": self.disk_format,
            "ovf_version": self.ovf_version,
            "manifest_digest": self.manifest_digest,
            "seconds": round(self.seconds, 3),
            "disks": [vars(d) for d in self.disks],
            "image": self.image.to_dict() if self.image is not None else None,
        }


@dataclass(frozen=True)
class CollectionExportResult:
    """A group set's package: the whole file (``package``: path, size, every disk) and each set's part of it."""

    name: str
    package: ExportResult
    sets: list[ExportResult]

    def to_dict(self) -> dict[str, Any]:
        whole = self.package.to_dict()
        for key in ("set_id", "set_name"):
            whole.pop(key)
        return {"name": self.name, **whole, "sets": [s.to_dict() for s in self.sets]}


def package_base(name: str) -> str:
    """A file-name-safe stem for the package's members (instance names may hold any character)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:60]
    return stem or "instance"


def check_export_args(disk_format: str, ovf_version: int, manifest_digest: str | None = None) -> str:
    """Refuse what cannot be written; returns the manifest digest (the OVF version's default when None)."""
    if disk_format not in DISK_FORMATS:
        raise InvalidRequest(f"--disk-format {disk_format!r}: use one of {', '.join(DISK_FORMATS)}")
    if ovf_version not in OVF_VERSIONS:
        raise InvalidRequest(f"--ovf-version {ovf_version}: use 1 or 2 (1 is what most importers read)")
    digest = manifest_digest or DEFAULT_DIGEST[ovf_version]
    if digest not in MANIFEST_DIGESTS:
        raise InvalidRequest(f"--manifest-digest {digest!r}: use one of {', '.join(MANIFEST_DIGESTS)}")
    if ovf_version == 2 and digest == "sha1":
        raise InvalidRequest("--manifest-digest sha1 is for OVF 1.x; an OVF 2 manifest is SHA-256")
    return digest


def check_image_name(name: str | None) -> None:
    if name is not None and (not name.strip() or len(name) > 255 or any(ord(c) < 32 for c in name)):
        raise InvalidRequest(f"image name {name!r} must be 1-255 printable characters")


def check_out_path(out: Path, force: bool) -> None:
    if out.is_dir():
        raise InvalidRequest(f"{out} is a directory; give the package's file name, e.g. {out}/NAME.ova")
    if (out.exists() or out.is_symlink()) and not force:
        raise InvalidRequest(f"{out} already exists; use --force to replace it")
    if not out.parent.is_dir():
        raise InvalidRequest(f"directory {out.parent} does not exist; create it first")


def sources_of(snapshot_set: SnapshotSet, disk_format: str, stores: Stores) -> list[PackageSource]:
    """The members as package files: qcow2 copied as is, or converted to streamOptimized VMDK."""
    base = package_base(snapshot_set.instance_name)
    sources: list[PackageSource] = []
    for m in snapshot_set.members:
        href = f"{base}-{package_base(m.target)}.{disk_format}"
        image = stores.of(m).source(m)
        if disk_format == "qcow2" and image.format != "qcow2" and not str(image.path).startswith(RBD_PREFIX):
            raise InvalidRequest(f"member {m.target} of set {snapshot_set.name} is {image.format}, not qcow2")
        to_vmdk = disk_format == "vmdk"
        adapter = _VMDK_ADAPTER.get(m.bus, "lsilogic")
        sources.append(PackageSource(href, image, m.target, to_vmdk=to_vmdk, adapter_type=adapter))
    return sources


def export_result(
    snapshot_set: SnapshotSet, written: WrittenPackage, disk_format: str, ovf_version: int, digest: str
) -> ExportResult:
    return ExportResult(
        set_id=snapshot_set.id,
        set_name=snapshot_set.name,
        path=str(written.path),
        size=written.size,
        allocated=written.allocated,
        disk_format=disk_format,
        ovf_version=ovf_version,
        seconds=written.seconds,
        disks=[
            ExportedDisk(d.target, d.href, d.format, d.file_size, d.capacity, d.populated_size) for d in written.disks
        ],
        manifest_digest=digest,
    )


def collection_result(
    name: str, sets: Sequence[SnapshotSet], written: WrittenPackage, disk_format: str, ovf_version: int, digest: str
) -> CollectionExportResult:
    """The whole package, and each set's part of it (its disks, in the package's order)."""
    per_set: list[ExportResult] = []
    disks = list(written.disks)
    for snapshot_set in sets:
        count = len(snapshot_set.members)
        mine = replace(written, disks=tuple(disks[:count]))
        disks = disks[count:]
        per_set.append(export_result(snapshot_set, mine, disk_format, ovf_version, digest))
    return CollectionExportResult(name, export_result(sets[0], written, disk_format, ovf_version, digest), per_set)


class Exporter:
    """Writes sets as packages; every write holds the set and leaves nothing partial behind."""

    def __init__(
        self,
        catalog: Catalog,
        stores: Stores,
        packages: Packages,
        store: ImageStore,
        holds: Holds,
        images: Images | None = None,
    ) -> None:
        self.images = images
        """Reads members that are not plain files: RBD snapshots are staged as qcow2, incremental members
        (over a backing chain) flattened, next to the package (temporary files, always removed)."""
        self.catalog = catalog
        self.stores = stores
        """Where each member's data lives decides how it is read (a file today; RBD or incremental members later)."""
        self.packages = packages
        self.store = store
        self.holds = holds

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
        digest = check_export_args(disk_format, ovf_version, manifest_digest)
        out = Path(out).absolute()
        check_out_path(out, force)
        snapshot_set = self.available(set_ref)
        with self.holds.set(snapshot_set):
            snapshot_set = self.available(snapshot_set.id)
            written = self._write(snapshot_set, out, disk_format, ovf_version, digest, progress, replace=force)
        return export_result(snapshot_set, written, disk_format, ovf_version, digest)

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
        """One OVA of the set, kept in the image store under a new id (written in place, not copied)."""
        digest = check_export_args(disk_format, ovf_version, manifest_digest)
        check_image_name(name)
        snapshot_set = self.available(set_ref)
        filename = f"{package_base(snapshot_set.instance_name)}-{snapshot_set.id[:8]}.ova"
        with (
            self.holds.set(snapshot_set),
            self.store.staging(filename) as staged,
        ):
            snapshot_set = self.available(snapshot_set.id)
            written = self._write(snapshot_set, staged, disk_format, ovf_version, digest, progress)
            new = NewImage(name or snapshot_set.name, filename, written.summary, snapshot_set.id)
            image = self.store.put_file(staged, new)
        exported = export_result(snapshot_set, written, disk_format, ovf_version, digest)
        return replace(exported, path=image.location or filename, image=image)

    def _write(
        self,
        snapshot_set: SnapshotSet,
        out: Path,
        disk_format: str,
        ovf_version: int,
        digest: str,
        progress: ProgressCallback | None,
        *,
        replace: bool = False,
    ) -> WrittenPackage:
        descriptor_name = f"{package_base(snapshot_set.instance_name)}.ovf"
        with tempfile.TemporaryDirectory(prefix=".ff-export-", dir=out.parent) as tmp:
            ready = self._sources(snapshot_set, disk_format, Path(tmp))
            return self.packages.write(
                out, snapshot_set, descriptor_name, ready, ovf_version, progress, replace=replace,
                manifest_digest=digest,
            )  # fmt: skip

    def export_collection(
        self,
        name: str,
        set_refs: Sequence[str],
        out: Path,
        *,
        disk_format: str = "qcow2",
        ovf_version: int = 1,
        force: bool = False,
        progress: ProgressCallback | None = None,
        manifest_digest: str | None = None,
    ) -> CollectionExportResult:
        """One OVA at ``out`` holding several sets (a group set) as one VirtualSystemCollection named ``name``:
        each set written as ``export`` writes one, every set held for the whole write."""
        digest = check_export_args(disk_format, ovf_version, manifest_digest)
        out = Path(out).absolute()
        check_out_path(out, force)
        sets = [self.available(ref) for ref in set_refs]
        written, sets = self._write_collection(name, sets, out, disk_format, ovf_version, digest, progress, force)
        return collection_result(name, sets, written, disk_format, ovf_version, digest)

    def export_collection_to_store(
        self,
        name: str,
        set_refs: Sequence[str],
        *,
        image_name: str | None = None,
        disk_format: str = "qcow2",
        ovf_version: int = 1,
        progress: ProgressCallback | None = None,
        manifest_digest: str | None = None,
    ) -> CollectionExportResult:
        """``export_collection`` into the image store under a new id (the image names no single source set)."""
        digest = check_export_args(disk_format, ovf_version, manifest_digest)
        check_image_name(image_name)
        sets = [self.available(ref) for ref in set_refs]
        filename = f"{package_base(name)}.ova"
        with self.store.staging(filename) as staged:
            written, sets = self._write_collection(name, sets, staged, disk_format, ovf_version, digest, progress)
            image = self.store.put_file(staged, NewImage(image_name or name, filename, written.summary, None))
        result = collection_result(name, sets, written, disk_format, ovf_version, digest)
        whole = replace(result.package, path=image.location or filename, image=image)
        return replace(result, package=whole)

    def _write_collection(
        self,
        name: str,
        sets: list[SnapshotSet],
        out: Path,
        disk_format: str,
        ovf_version: int,
        digest: str,
        progress: ProgressCallback | None,
        force: bool = False,
    ) -> tuple[WrittenPackage, list[SnapshotSet]]:
        """Every set held for the whole write, each written as ``export`` writes one; returns the sets as re-read
        under the holds."""
        with contextlib.ExitStack() as held, tempfile.TemporaryDirectory(prefix=".ff-export-", dir=out.parent) as tmp:
            for snapshot_set in sets:
                held.enter_context(self.holds.set(snapshot_set))
            sets = [self.available(s.id) for s in sets]
            systems = [(s, self._sources(s, disk_format, Path(tmp))) for s in sets]
            written = self.packages.write_collection(
                out, name, systems, f"{package_base(name)}.ovf", ovf_version, progress, replace=force,
                manifest_digest=digest,
            )  # fmt: skip
        return written, sets

    def _sources(self, snapshot_set: SnapshotSet, disk_format: str, tmp: Path) -> list[PackageSource]:
        """One set's members as files the package writer can copy or convert as they are."""
        return [self._standalone(s, tmp) for s in sources_of(snapshot_set, disk_format, self.stores)]

    def _standalone(self, source: PackageSource, tmp: Path) -> PackageSource:
        """A member the package writer can copy as is: an RBD snapshot is read once into a qcow2 file, and a
        qcow2 copied as is must stand alone, so a member over a backing chain is flattened first."""
        rbd = str(source.image.path).startswith(RBD_PREFIX)
        if not rbd and (source.to_vmdk or self.images is None or self.images.info(source.image).backing is None):
            return source
        if self.images is None:
            raise PreflightFailed(f"member {source.target} is an RBD snapshot and this exporter cannot read it")
        staged = ImageRef(tmp / f"{source.target}.qcow2", "qcow2")
        self.images.convert(source.image, staged)
        return replace(source, image=staged)

    def available(self, set_ref: str) -> SnapshotSet:
        """The set, if it is available and every member's data is there."""
        snapshot_set = self.catalog.get_set(set_ref)
        if snapshot_set.status is not SetStatus.AVAILABLE:
            raise InvalidRequest(
                f"set {snapshot_set.name} ({snapshot_set.id}) is {snapshot_set.status}; only available sets can be "
                "exported"
            )
        missing = [f"{m.target} ({m.path})" for m in snapshot_set.members if not self.stores.of(m).present(m)]
        if missing or not snapshot_set.members:
            raise PreflightFailed(
                f"set {snapshot_set.name} ({snapshot_set.id}) is missing member data: "
                f"{', '.join(missing) or 'no members'}; check it with `freezeframe verify {snapshot_set.id}`"
            )
        return snapshot_set
