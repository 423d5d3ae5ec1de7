"""Import: a new instance from an OVA file or a stored image, all checked before anything is made.

Order: the name and ``--network``; the package (layout, manifest digests, descriptor) through the ``Packages``
port; every disk file probed (our own header checks, then the image tool's) before any conversion; the plan
(hardware this host can run, boot files, disk/NIC mapping); free space. Only then, holding the name, is the
instance folder claimed (with a marker ``repair`` understands), each disk converted with its format pinned, and the
domain defined last (and started). Any failure, or Ctrl-C/SIGTERM, removes the domain and the folder.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freezeframe.errors import (
    ImageNotFound,
    InsufficientSpace,
    InvalidRequest,
    OvaDigestMismatch,
    OvfUnsupported,
)
from freezeframe.ops.common import Holds, ensure_name_free
from freezeframe.ops.import_plan import IMPORTED_FORMAT, DiskPlan, ImportPlan, Planner
from freezeframe.ops.instances import InstanceBuilder
from freezeframe.ports import (
    DomainDisk,
    DomainPlan,
    Domains,
    ImageRef,
    Images,
    ImageStore,
    OpenedPackage,
    Packages,
    ProgressCallback,
    StoredImage,
)
from freezeframe.ports.volumes import CLONE_SUFFIX, RBD_PREFIX, VolumeImages
from freezeframe.validation import validate_import_storage, validate_name

BLANK_DISK_NEEDS = 2**20
"""Bytes a new empty qcow2 disk takes (its metadata), for the free-space check."""
DISK_MODE = 0o600
"""A guest's disk is readable by its owner only (the folder is 0700 too)."""


@dataclass(frozen=True)
class ImportedDiskResult:
    target: str
    bus: str
    path: str
    virtual_size: int
    source: str
    """The package member it was converted from, or ``blank`` for a disk the package only declares."""


@dataclass(frozen=True)
class ImportResult:
    name: str
    uuid: str
    started: bool
    source: str
    origin: str
    """``freezeframe`` (our package: the recorded machine) or ``foreign`` (mapped from the OVF hardware)."""
    vcpus: int
    memory_kib: int
    arch: str
    machine: str | None
    firmware: str
    direct_kernel_boot: bool
    disks: list[ImportedDiskResult]
    nics: list[str]
    warnings: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)
    image_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if k != "disks"}
        data["disks"] = [vars(d) for d in self.disks]
        return data


class Importer:
    """Imports packages as new instances; ``domain_type`` is the libvirt domain type of what it defines."""

    def __init__(
        self,
        packages: Packages,
        store: ImageStore,
        images: Images,
        domains: Domains,
        builder: InstanceBuilder,
        holds: Holds,
        instances_dir: Path,
        *,
        domain_type: str = "qemu",
        boot_dirs: Sequence[Path] = (),
        volume_images: Callable[[], VolumeImages] | None = None,
    ) -> None:
        self.packages = packages
        self.store = store
        self.images = images
        self.domains = domains
        self.builder = builder
        self.holds = holds
        self.instances_dir = instances_dir
        self.domain_type = domain_type
        self.boot_dirs = [Path(p).absolute() for p in boot_dirs]
        self.volume_images = volume_images
        """``--storage rbd``: the store that makes RBD images (built on first use: file imports need no cluster)."""

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
        """A new instance NAME from an OVA file or a stored image (id, id prefix or name); with ``storage="rbd"``
        its disks are new RBD images ``POOL/<NAME>-<target>`` instead of qcow2 files in its folder."""
        validate_name(name, "instance name")
        pool = validate_import_storage(storage, pool)
        rbd = self._rbd() if pool is not None else None
        ensure_name_free(self.domains, name)
        planner = Planner(self.domains, self.domain_type, self.boot_dirs, network)
        planner.require_network()
        with self._open_source(source) as (path, image):
            plan = self._plan(planner, self.packages.open(path), path)
            if rbd is None:
                self._check_space([plan])
            with self.holds.name(name):
                ensure_name_free(self.domains, name)
                uuid, disks = self._build(name, plan, start, progress, (rbd, pool) if rbd and pool else None)
        return _result(name, uuid, start, plan, disks, str(path) if image is None else image)

    def _rbd(self) -> VolumeImages:
        if self.volume_images is None:
            raise InvalidRequest("--storage rbd: no Ceph cluster is configured (FREEZEFRAME_CEPH_CONF)")
        return self.volume_images()

    def import_collection(
        self,
        source: str | Path,
        prefix: str,
        *,
        start: bool = False,
        network: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[ImportResult]:
        """One new instance ``PREFIX<system name>`` per virtual system of a collection package (a group set's
        export); every system is opened, probed, planned and its name checked before anything is made, and a
        failure removes every instance this import made (all or nothing)."""
        planner = Planner(self.domains, self.domain_type, self.boot_dirs, network)
        planner.require_network()
        with self._open_source(source) as (path, image):
            systems = self.packages.open_collection(path)
            names = [validate_name(f"{prefix}{p.machine_name}", "instance name (--as-prefix + name)") for p in systems]
            if len(set(names)) != len(names):
                raise InvalidRequest(f"two virtual systems of {path.name} would both be named {sorted(names)}")
            for name in names:
                ensure_name_free(self.domains, name)
            plans = [self._plan(planner, package, path) for package in systems]
            self._check_space(plans)
            with contextlib.ExitStack() as held:
                for name in sorted(names):  # one order: two imports over the same names cannot hold half each
                    held.enter_context(self.holds.name(name))
                    ensure_name_free(self.domains, name)
                built = self._build_all(names, plans, start, progress)
        where = str(path) if image is None else image
        return [_result(name, uuid, start, plan, disks, where) for name, plan, (uuid, disks) in built]

    def _build_all(
        self, names: Sequence[str], plans: Sequence[ImportPlan], start: bool, progress: ProgressCallback | None
    ) -> list[tuple[str, ImportPlan, tuple[str, list[ImportedDiskResult]]]]:
        built: list[tuple[str, ImportPlan, tuple[str, list[ImportedDiskResult]]]] = []
        try:
            for name, plan in zip(names, plans, strict=True):
                built.append((name, plan, self._build(name, plan, start, progress, None)))
        except BaseException:
            for name, _, (uuid, _) in built:
                self.builder.undo(name, self.instances_dir / name, uuid, forget_restores=False)
            raise
        return built

    def _plan(self, planner: Planner, package: OpenedPackage, path: Path) -> ImportPlan:
        """Every disk file probed (the hostile-image checks) before the plan (the hardware checks) reads it."""
        if not package.disks:
            raise OvfUnsupported(
                f"{path.name}: {package.machine_name} is a machine without disks; there is nothing to import"
            )
        probed = {href: self.packages.probe(file) for href, file in package.files.items()}
        return planner.plan(package, probed)

    @contextlib.contextmanager
    def _open_source(self, source: str | Path) -> Iterator[tuple[Path, StoredImage | None]]:
        """A package file as given, or a stored image (held against delete, its whole-file SHA-256 checked)."""
        text = str(source)
        path = Path(source)
        if isinstance(source, Path) or "/" in text or text.lower().endswith(".ova") or path.is_file():
            if not path.is_file():
                raise InvalidRequest(f"{path} is not a file (give an OVA file or a stored image id)")
            yield path.absolute(), None
            return
        try:
            image = self.store.find(text)
        except ImageNotFound as exc:
            raise ImageNotFound(f"{exc}; no file of that name either") from None
        with (
            self.holds.hold(f"image-{image.id}", f"image {image.name}"),
            self.store.local_file(image.id) as local,
        ):
            actual = self.packages.sha256(local)
            if actual != image.sha256:
                raise OvaDigestMismatch(
                    f"stored image {image.id} ({image.name}) has SHA-256 {actual}, its record says {image.sha256}: "
                    "the package was changed or damaged in the store; delete it and export again"
                )
            yield local, image

    def _check_space(self, plans: Sequence[ImportPlan]) -> None:
        need = 0
        for disk in (d for plan in plans for d in plan.disks):
            need += BLANK_DISK_NEEDS if disk.source is None else self.images.measure(disk.source.image, IMPORTED_FORMAT)
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.instances_dir).free
        if need > free:
            raise InsufficientSpace(
                f"importing needs about {need >> 20} MiB for the instances' disks, only {free >> 20} MiB are free; "
                "free space and retry"
            )

    # -- building ---------------------------------------------------------------------------------------------

    def _build(
        self,
        name: str,
        plan: ImportPlan,
        start: bool,
        progress: ProgressCallback | None,
        rbd: tuple[VolumeImages, str] | None,
    ) -> tuple[str, list[ImportedDiskResult]]:
        """Make the disks, define (and start) the domain; any failure removes all of it (the builder's undo, which
        also removes the RBD images noted in the folder)."""
        with self.builder.building(name, self.instances_dir / name, forget_restores=False) as build:
            if rbd is None:
                made = self._make_disks(build.directory, plan.disks, progress)
            else:
                made = self._make_rbd_disks(build.directory, plan.disks, progress, *rbd)
            domain = DomainPlan(
                name=name,
                hardware=plan.hardware,
                disks=tuple(disk for disk, _ in made),
                directory=build.directory,
                domain_type=self.domain_type,
                scsi_model="virtio-scsi",  # libvirt's default LSI HBA has no drivers in today's guests
            )
            uuid = self.builder.define(build, domain, start=start)
        return uuid, [result for _, result in made]

    def _make_disks(
        self, directory: Path, disks: Sequence[DiskPlan], progress: ProgressCallback | None
    ) -> list[tuple[DomainDisk, ImportedDiskResult]]:
        total = sum(d.virtual_size for d in disks if d.source is not None)
        done = 0
        made: list[tuple[DomainDisk, ImportedDiskResult]] = []
        for disk in disks:
            dst = directory / f"{disk.spec.target}.{IMPORTED_FORMAT}"
            if disk.source is None:
                self.images.create(dst, IMPORTED_FORMAT, disk.capacity)
                source = "blank"
            else:
                report = _offset_progress(progress, done, total)
                self.images.convert(disk.source.image, ImageRef(dst, IMPORTED_FORMAT), progress=report)
                if disk.capacity > disk.virtual_size and disk.capacity % 512 == 0:
                    self.images.resize(dst, IMPORTED_FORMAT, disk.capacity)
                done += disk.virtual_size
                source = disk.source.name
            dst.chmod(DISK_MODE)
            result = ImportedDiskResult(disk.spec.target, disk.spec.bus, str(dst), max(disk.capacity, 0), source)
            made.append((DomainDisk(disk.spec, dst, IMPORTED_FORMAT), result))
        return made

    def _make_rbd_disks(
        self,
        directory: Path,
        disks: Sequence[DiskPlan],
        progress: ProgressCallback | None,
        images: VolumeImages,
        pool: str,
    ) -> list[tuple[DomainDisk, ImportedDiskResult]]:
        """Each disk a new RBD image named after the instance and the target, noted in the folder (``<target>.rbd``)
        as soon as it exists, so the undo and ``discard`` remove it."""
        total = sum(d.virtual_size for d in disks if d.source is not None)
        done = 0
        made: list[tuple[DomainDisk, ImportedDiskResult]] = []
        for disk in disks:
            volume = f"{pool}/{directory.name}-{disk.spec.target}"
            size = max(disk.capacity, disk.virtual_size if disk.source is not None else 0)
            ref = images.new_image(volume, size)
            (directory / f"{disk.spec.target}{CLONE_SUFFIX}").write_text(f"{volume}\n")
            source = "blank"
            if disk.source is not None:
                report = _offset_progress(progress, done, total)
                self.images.convert(disk.source.image, ref, existing=True, progress=report)
                done += disk.virtual_size
                source = disk.source.name
            path = f"{RBD_PREFIX}{volume}"
            result = ImportedDiskResult(disk.spec.target, disk.spec.bus, path, size, source)
            made.append((DomainDisk(disk.spec, Path(path), "raw"), result))
        return made


def _offset_progress(progress: ProgressCallback | None, offset: int, total: int) -> ProgressCallback | None:
    """One disk's (done, size) as part of the whole import's bytes."""
    if progress is None:
        return None

    def report(done: int, _size: int) -> None:
        progress(offset + done, total)

    return report


def _result(
    name: str, uuid: str, start: bool, plan: ImportPlan, disks: list[ImportedDiskResult], source: str | StoredImage
) -> ImportResult:
    hw = plan.hardware
    image = source if isinstance(source, StoredImage) else None
    return ImportResult(
        name=name,
        uuid=uuid,
        started=start,
        source=source if isinstance(source, str) else f"image {source.id} ({source.name})",
        origin=plan.origin,
        vcpus=hw.vcpus,
        memory_kib=hw.memory_kib,
        arch=hw.arch,
        machine=hw.machine,
        firmware=hw.boot.firmware,
        direct_kernel_boot=hw.boot.kernel is not None,
        disks=disks,
        nics=[f"{n.source_type}:{n.source}" if n.source else n.source_type for n in hw.nics],
        warnings=plan.warnings,
        left_out=plan.left_out,
        image_id=image.id if image is not None else None,
    )
