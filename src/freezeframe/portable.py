"""Sets leave and enter the host as OVA packages: export, the image store, import as a new instance.

Built on the pure adapters (``adapters/ovf.py`` describes, ``adapters/ova.py`` packs and reads defensively,
``adapters/image_store.py`` keeps packages) and on ``adapters/libvirt_define.py`` for the domain. Import
trusts nothing in a package until ``open_ova`` has checked its layout and manifest digests and
``probe_disk`` has had qemu check every disk; only then is anything made, and the domain is defined last.
Any failure (or Ctrl-C/SIGTERM) removes what was made: the domain, the instance folder. A marker written
first lets ``freezeframe repair`` (``Lifecycle.repair``) remove a half-made import after a SIGKILL.
See docs/ovf.md ("Export, import and the image store").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt
from lxml import etree

from freezeframe.adapters import libvirt_define as ld
from freezeframe.adapters.image_store import (
    ImageDisk,
    ImageNic,
    ImageStore,
    ImageSummary,
    NewImage,
    StoredImage,
    open_image_store,
)
from freezeframe.adapters.ova import (
    DiskProbe,
    OvaDiskMember,
    OvaDiskSource,
    OvaPackage,
    OvaResult,
    open_ova,
    probe_disk,
    qemu_json_for,
    write_ova,
)
from freezeframe.adapters.ovf import ImportedDisk, ImportedMachine, OvfDisk, build_descriptor, parse_descriptor
from freezeframe.durable import fsync_path, sha256_file
from freezeframe.errors import (
    HypervisorError,
    ImageNotFound,
    InsufficientSpace,
    InvalidRequest,
    OvaDigestMismatch,
    OvfInvalidValue,
    OvfMissingReference,
    OvfUnsupported,
    PreflightFailed,
)
from freezeframe.model import BootSpec, DiskSpec, Hardware, NicSpec, SetStatus, SnapshotSet
from freezeframe.ports import ProgressCallback
from freezeframe.validation import validate_name

if TYPE_CHECKING:
    from freezeframe.service import Freezeframe

log = logging.getLogger(__name__)

DISK_FORMATS = ("qcow2", "vmdk")
OVF_VERSIONS = (1, 2)
IMPORTED_FORMAT = "qcow2"
BOOT_DIRS_ENV = "FREEZEFRAME_BOOT_DIRS"
DEFAULT_BOOT_DIRS = ("/boot", "/var/lib/libvirt/boot", "/var/lib/libvirt/images")
"""Where an imported package's direct kernel boot may take its kernel/initrd from (plus FREEZEFRAME_HOME)."""
FOREIGN_MACHINES = {"x86_64": "pc", "i686": "pc"}
"""i440fx: it has IDE (q35 does not) and every guest OS knows it; libvirt adds AHCI/SCSI controllers as needed."""

_VMDK_ADAPTER = {"ide": "ide", "sata": "ide", "scsi": "lsilogic", "virtio": "lsilogic"}
_BUSES = ("virtio", "scsi", "sata", "ide", "usb")
_FOREIGN_BUS = {"virtio": "virtio", "scsi": "scsi", "virtio-scsi": "scsi", "sata": "sata", "ide": "ide"}
_TARGET_PREFIX = {"virtio": "vd", "scsi": "sd", "sata": "sd", "usb": "sd", "ide": "hd"}
_NIC_MODELS = {
    "e1000": "e1000",
    "e1000e": "e1000e",
    "vmxnet3": "vmxnet3",
    "pcnet32": "pcnet",
    "pcnet": "pcnet",
    "virtio": "virtio",
    "virtio-net": "virtio",
    "rtl8139": "rtl8139",
}
_TARGET_RE = re.compile(r"^(vd|sd|hd)[a-z]{1,3}$")
_MACHINE_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ARCH_RE = re.compile(r"^[a-z0-9_]{1,16}$")
_NET_RE = re.compile(r"^[^/\x00-\x1f]{1,64}$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
_BRIDGE_RE = re.compile(r"^[A-Za-z0-9._-]{1,15}$")
_SERIAL_RE = re.compile(r"^[A-Za-z0-9_ .+-]{1,64}$")
_BOOT_DEVS = ("hd", "cdrom", "network", "fd")
_PROGRESS_RE = re.compile(rb"\((\d{1,3}(?:\.\d+)?)/100%\)")
_INITRD_MAGICS = (
    b"070701",  # newc cpio
    b"070702",
    b"070707",
    b"\x1f\x8b",  # gzip
    b"\xfd7zXZ\x00",  # xz
    b"\x28\xb5\x2f\xfd",  # zstd
    b"\x02\x21\x4c\x18",  # lz4 legacy
    b"\x04\x22\x4d\x18",  # lz4
    b"BZh",  # bzip2
    b"\x5d\x00\x00",  # lzma
    b"\x89LZO",  # lzop
)


# ---- results ------------------------------------------------------------------------------------------


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "set_id": self.set_id,
            "set_name": self.set_name,
            "path": self.path,
            "size": self.size,
            "allocated": self.allocated,
            "disk_format": self.disk_format,
            "ovf_version": self.ovf_version,
            "seconds": round(self.seconds, 3),
            "disks": [vars(d) for d in self.disks],
            "image": self.image.to_dict() if self.image is not None else None,
        }


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


# ---- plan of an import -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DiskPlan:
    spec: DiskSpec
    member: OvaDiskMember | None
    """None: a blank disk of ``capacity`` bytes."""
    capacity: int
    virtual_size: int


@dataclass
class _Plan:
    origin: str
    hardware: Hardware
    disks: list[_DiskPlan]
    warnings: list[str]
    left_out: dict[str, str] = field(default_factory=dict)


def _letters(n: int) -> str:
    """0 -> a, 25 -> z, 26 -> aa: libvirt's disk target suffixes."""
    return (_letters(n // 26 - 1) if n >= 26 else "") + chr(ord("a") + n % 26)


def _num(value: str | None) -> int:
    return int(value) if value is not None and value.strip().isdigit() and len(value.strip()) <= 6 else 0


def package_base(name: str) -> str:
    """A file-name-safe stem for the package's members (instance names may hold any character)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:60]
    return stem or "instance"


def summarize(machine: ImportedMachine, disk_format: str) -> ImageSummary:
    """The descriptor summary a stored image keeps (what `images show` prints without reading the package)."""
    targets = {m.href: m.target for m in machine.freezeframe.members} if machine.freezeframe else {}
    return ImageSummary(
        machine_name=machine.name,
        vcpus=machine.vcpus,
        memory_bytes=machine.memory_bytes,
        ovf_version=machine.ovf_version,
        disk_format=disk_format,
        arch=machine.arch,
        firmware=machine.firmware,
        disks=tuple(
            ImageDisk(
                target=targets.get(d.href or "") or d.disk_id,
                capacity=d.capacity,
                format=d.format,
                file_size=d.file_size,
                controller=d.controller,
            )
            for d in machine.disks
        ),
        nics=tuple(ImageNic(network=n.network, model=n.model) for n in machine.nics),
    )


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines[-3:])


def _qemu_img(argv: Sequence[str], what: str, timeout: float | None = 600) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(["qemu-img", *argv], capture_output=True, text=True, check=False, timeout=timeout)
    except FileNotFoundError as exc:
        raise HypervisorError("qemu-img is not installed (package qemu-utils); run scripts/setup-host.sh") from exc
    except subprocess.TimeoutExpired as exc:
        raise HypervisorError(f"{what}: qemu-img did not finish within {timeout} s") from exc
    if result.returncode != 0:
        detail = _one_line(result.stderr or result.stdout)
        if "No space left" in detail:
            raise InsufficientSpace(f"{what}: no space left ({detail}); free space and retry")
        raise HypervisorError(f"{what} failed: {detail}")
    return result


def _convert(source: str, dst: Path, what: str, report: Callable[[float], None] | None) -> None:
    """qemu-img convert to qcow2 (zero clusters stay unallocated), reporting its -p progress as 0..1."""
    argv = ["qemu-img", "convert", "-p", "-O", IMPORTED_FORMAT, source, str(dst)]
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise HypervisorError("qemu-img is not installed (package qemu-utils); run scripts/setup-host.sh") from exc
        try:
            stdout = proc.stdout
            if stdout is None:
                raise HypervisorError("qemu-img convert has no stdout pipe")
            tail = b""
            while chunk := os.read(stdout.fileno(), 4096):
                tail = (tail + chunk)[-64:]
                found = _PROGRESS_RE.findall(tail)
                if found and report is not None:
                    report(min(1.0, float(found[-1]) / 100))
            returncode = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if returncode != 0:
            errors.seek(0)
            detail = _one_line(errors.read().decode(errors="replace")) or f"exit status {returncode}"
            if "No space left" in detail:
                raise InsufficientSpace(f"{what}: no space left on the device holding {dst}; free space and retry")
            raise HypervisorError(f"{what} failed: {detail}")


def _looks_like_kernel(head: bytes) -> bool:
    return (
        head[0x202:0x206] == b"HdrS"  # x86 bzImage
        or head.startswith(b"\x7fELF")
        or head[0x38:0x3C] in (b"ARM\x64", b"RSC\x05")  # arm64 / riscv Image
        or head.startswith(b"MZ")  # EFI stub / PE kernels
    )


# ---- the operations -------------------------------------------------------------------------------------------


class Portable:
    """Export a set as an OVA (to a file or the image store), list/delete stored images, import an OVA.

    ``Portable(service)`` uses the service's catalog, repository, hypervisor and locks; ``domain_type`` is the
    libvirt domain type of imported instances (``qemu``: TCG, the default; ``kvm`` where it works).
    """

    def __init__(
        self,
        service: Freezeframe,
        *,
        domain_type: str = "qemu",
        store: ImageStore | None = None,
        boot_dirs: Sequence[Path] | None = None,
    ) -> None:
        self.service = service
        self.domain_type = domain_type
        self._store = store
        home = service.settings.home
        self.instances_dir = home / "instances"
        if boot_dirs is None:
            env = os.environ.get(BOOT_DIRS_ENV)
            listed = env.split(os.pathsep) if env else [*DEFAULT_BOOT_DIRS, str(home)]
            boot_dirs = [Path(p) for p in listed if p.strip()]
        self.boot_dirs = [Path(p).absolute() for p in boot_dirs]

    @property
    def store(self) -> ImageStore:
        """Opened on first use (``FREEZEFRAME_IMAGE_STORE``, default ``$FREEZEFRAME_HOME/images``)."""
        if self._store is None:
            self._store = open_image_store(self.service.settings.home, self.service.catalog)
        return self._store

    # ---- export ------------------------------------------------------------------------------------------

    def export(
        self,
        set_ref: str,
        out: Path,
        *,
        disk_format: str = "qcow2",
        ovf_version: int = 1,
        force: bool = False,
        progress: ProgressCallback | None = None,
    ) -> ExportResult:
        """One OVA of the set at ``out``; an existing file is replaced only with ``force`` (atomically)."""
        _check_export_args(disk_format, ovf_version)
        out = Path(out).absolute()
        if out.is_dir():
            raise InvalidRequest(f"{out} is a directory; give the package's file name, e.g. {out}/NAME.ova")
        if (out.exists() or out.is_symlink()) and not force:
            raise InvalidRequest(f"{out} already exists; use --force to replace it")
        if not out.parent.is_dir():
            raise InvalidRequest(f"directory {out.parent} does not exist; create it first")
        snapshot_set = self._available(set_ref)
        with self.service.parts.holds.hold(f"set-{snapshot_set.id}", f"set {snapshot_set.name}"):
            snapshot_set = self._available(snapshot_set.id)
            replacing = out.exists() or out.is_symlink()
            target = out.with_name(f".{out.name}.ff-{uuidlib.uuid4().hex[:8]}.tmp") if replacing else out
            result = self._write(snapshot_set, target, disk_format, ovf_version, progress)
            if replacing:
                try:
                    target.replace(out)
                    fsync_path(out.parent)
                except BaseException:
                    target.unlink(missing_ok=True)
                    raise
        return self._export_result(snapshot_set, result, out, disk_format, ovf_version)

    def export_to_store(
        self,
        set_ref: str,
        *,
        name: str | None = None,
        disk_format: str = "qcow2",
        ovf_version: int = 1,
        progress: ProgressCallback | None = None,
    ) -> ExportResult:
        """One OVA of the set, kept in the image store under a new id (written in place, not copied)."""
        _check_export_args(disk_format, ovf_version)
        if name is not None and (not name.strip() or len(name) > 255 or any(ord(c) < 32 for c in name)):
            raise InvalidRequest(f"image name {name!r} must be 1-255 printable characters")
        snapshot_set = self._available(set_ref)
        filename = f"{package_base(snapshot_set.instance_name)}-{snapshot_set.id[:8]}.ova"
        with (
            self.service.parts.holds.hold(f"set-{snapshot_set.id}", f"set {snapshot_set.name}"),
            self.store.staging(filename) as staged,
        ):
            snapshot_set = self._available(snapshot_set.id)
            result = self._write(snapshot_set, staged, disk_format, ovf_version, progress)
            summary = summarize(parse_descriptor(result.descriptor), disk_format)
            allocated = staged.stat().st_blocks * 512
            image = self.store.put_file(staged, NewImage(name or snapshot_set.name, filename, summary, snapshot_set.id))
        exported = self._export_result(snapshot_set, result, Path(image.location or filename), disk_format, ovf_version)
        return replace(exported, allocated=allocated, image=image)

    def _write(
        self,
        snapshot_set: SnapshotSet,
        out: Path,
        disk_format: str,
        ovf_version: int,
        progress: ProgressCallback | None,
    ) -> OvaResult:
        base = package_base(snapshot_set.instance_name)
        sources: list[OvaDiskSource] = []
        for m in snapshot_set.members:
            href = f"{base}-{package_base(m.target)}.{disk_format}"
            if disk_format == "qcow2":
                if m.format != "qcow2":
                    raise InvalidRequest(f"member {m.target} of set {snapshot_set.name} is {m.format}, not qcow2")
                sources.append(OvaDiskSource.copy(href, Path(m.path), "qcow2", m.target))
            else:
                adapter = _VMDK_ADAPTER.get(m.bus, "lsilogic")
                sources.append(OvaDiskSource.to_vmdk(href, Path(m.path), m.format, m.target, adapter_type=adapter))

        def descriptor(disks: Sequence[OvfDisk]) -> bytes:
            return build_descriptor(snapshot_set, disks, ovf_version)

        return write_ova(out, f"{base}.ovf", descriptor, sources, progress)

    @staticmethod
    def _export_result(
        snapshot_set: SnapshotSet, result: OvaResult, path: Path, disk_format: str, ovf_version: int
    ) -> ExportResult:
        try:
            allocated = path.stat().st_blocks * 512
        except OSError:
            allocated = result.size
        return ExportResult(
            set_id=snapshot_set.id,
            set_name=snapshot_set.name,
            path=str(path),
            size=result.size,
            allocated=allocated,
            disk_format=disk_format,
            ovf_version=ovf_version,
            seconds=result.seconds,
            disks=[
                ExportedDisk(d.target, d.href, d.format, d.file_size, d.capacity, d.populated_size)
                for d in result.disks
            ],
        )

    # ---- the image store -----------------------------------------------------------------------------------

    def images(self) -> list[StoredImage]:
        return self.store.list_images()

    def image(self, ref: str) -> StoredImage:
        return self.store.find(ref)

    def delete_image(self, ref: str) -> StoredImage:
        """Remove a stored image (record and package); refused while an import reads it."""
        image = self.store.find(ref)
        with self.service.parts.holds.hold(f"image-{image.id}", f"image {image.name}"):
            return self.store.delete(image.id)

    def repair(self) -> list[str]:
        """Finish interrupted image deletes and remove half-written packages (half-made imports: Lifecycle)."""
        return self.store.repair()

    # ---- import --------------------------------------------------------------------------------------------

    def import_package(
        self,
        source: str | Path,
        name: str,
        *,
        start: bool = False,
        network: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> ImportResult:
        """A new instance NAME from an OVA file or a stored image (id, id prefix or name).

        Everything is checked before anything is made: the package (layout, manifest digests, descriptor),
        every disk (qemu-img info/check), the hardware (machine type, firmware, boot files on this host),
        the name, the network given with ``network`` and free space. Then the disks are converted into
        ``$FREEZEFRAME_HOME/instances/NAME/`` and the domain is defined last (and started).
        """
        validate_name(name, "instance name")
        conn = self.service.hypervisor.conn
        self._check_name_free(conn, name)
        if network is not None:
            self._require_network(conn, network)
        with self._open_source(source) as (path, image):
            package = open_ova(path)
            if not package.machine.disks:
                raise OvfUnsupported(f"{path.name} describes a machine without disks; there is nothing to import")
            probes = {d.name: probe_disk(d) for d in package.disks}
            plan = self._plan(conn, package, probes, network)
            self._check_space(plan)
            with self.service.parts.holds.hold(f"name-{name}", f"instance name {name}"):
                self._check_name_free(conn, name)
                uuid, disks = self._build(conn, name, plan, start, progress)
        hw = plan.hardware
        return ImportResult(
            name=name,
            uuid=uuid,
            started=start,
            source=str(path) if image is None else f"image {image.id} ({image.name})",
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
            self.service.parts.holds.hold(f"image-{image.id}", f"image {image.name}"),
            self.store.local_file(image.id) as local,
        ):
            actual = sha256_file(local)
            if actual != image.sha256:
                raise OvaDigestMismatch(
                    f"stored image {image.id} ({image.name}) has SHA-256 {actual}, its record says {image.sha256}: "
                    "the package was changed or damaged in the store; delete it and export again"
                )
            yield local, image

    # -- planning ---------------------------------------------------------------------------------------------

    def _plan(self, conn: Any, package: OvaPackage, probes: dict[str, DiskProbe], network: str | None) -> _Plan:
        info = package.machine.freezeframe
        if info is not None and info.hardware is not None:
            return self._plan_own(conn, package, probes, network)
        plan = self._plan_foreign(conn, package, probes, network)
        if info is not None:
            plan.warnings.insert(0, "the package has a freezeframe section without hardware; mapped from its OVF")
        return plan

    def _plan_own(self, conn: Any, package: OvaPackage, probes: dict[str, DiskProbe], network: str | None) -> _Plan:
        """Our package: the machine exactly as the set recorded it (boot method, machine type, buses, targets)."""
        info = package.machine.freezeframe
        assert info is not None and info.hardware is not None
        hw = info.hardware
        warnings = list(package.warnings)
        _check_hardware(hw)
        caps = self._domain_caps(conn, hw.arch, hw.machine)
        if hw.boot.firmware == "efi" and not _efi_available(caps):
            raise PreflightFailed(
                f"the package's machine boots with UEFI firmware, which this host's libvirt cannot provide for "
                f"{hw.arch}/{hw.machine}; install OVMF (package ovmf) and import again"
            )
        for path, kind in ((hw.boot.kernel, "kernel"), (hw.boot.initrd, "initrd")):
            if path is not None:
                self._check_boot_file(path, kind)
        _check_vcpus(caps, hw.vcpus)
        members = {m.href: m for m in info.members if m.href}
        specs = {d.target: d for d in hw.disks}
        by_name = {d.name: d for d in package.disks}
        plans: list[_DiskPlan] = []
        for disk in package.machine.disks:
            if disk.href is None:
                raise OvfInvalidValue(f"disk {disk.disk_id!r} has no file; a freezeframe package always carries data")
            member = members.get(disk.href)
            if member is None or not member.target:
                raise OvfMissingReference(f"disk file {disk.href!r} has no member entry in the freezeframe section")
            spec = specs.get(member.target) or DiskSpec(
                target=member.target, bus=member.bus or "virtio", source_path=None, format=IMPORTED_FORMAT,
                virtual_size=member.virtual_size or disk.capacity, boot_order=member.boot_order,
            )  # fmt: skip
            spec = replace(spec, format=IMPORTED_FORMAT, device="disk", readonly=False, shareable=False)
            _check_disk_spec(spec)
            plans.append(_DiskPlan(spec, by_name[disk.href], disk.capacity, probes[disk.href].virtual_size))
        _check_unique_targets(plans)
        _check_buses(caps, plans)
        captured = {p.spec.target for p in plans}
        left_out = {
            d.target: (f"{d.device}: not part of a snapshot set" if d.device != "disk" else "not in the package")
            for d in hw.disks
            if d.target not in captured
        }
        nics = [self._map_nic(conn, n.source_type, n.source, n.model, network, warnings) for n in hw.nics]
        if package.machine.vcpus != hw.vcpus:
            warnings.append(
                f"the OVF hardware says {package.machine.vcpus} vCPUs, the freezeframe section {hw.vcpus}; "
                "the section's machine is restored"
            )
        hardware = replace(hw, domain_type=self.domain_type, disks=tuple(p.spec for p in plans), nics=tuple(nics))
        return _Plan("freezeframe", hardware, plans, warnings, left_out)

    def _plan_foreign(self, conn: Any, package: OvaPackage, probes: dict[str, DiskProbe], network: str | None) -> _Plan:
        """Another tool's package: hardware mapped from the OVF, BIOS boot (UEFI if it asks and we can)."""
        m = package.machine
        warnings = list(package.warnings)
        arch = m.arch or "x86_64"
        if not _ARCH_RE.match(arch):
            raise OvfInvalidValue(f"architecture {arch!r} is not one libvirt knows")
        machine = FOREIGN_MACHINES.get(arch)
        caps = self._domain_caps(conn, arch, machine)
        firmware = "bios"
        if (m.firmware or "").lower() in ("efi", "uefi"):
            if _efi_available(caps):
                firmware = "efi"
            else:
                warnings.append("the package asks for UEFI firmware, which this host lacks (install ovmf); BIOS used")
        _check_vcpus(caps, m.vcpus)
        by_name = {d.name: d for d in package.disks}
        buses, targets = _foreign_targets(m.disks, warnings)
        first_data = next((i for i, d in enumerate(m.disks) if d.href is not None), None)
        plans: list[_DiskPlan] = []
        for i, disk in enumerate(m.disks):
            spec = DiskSpec(
                target=targets[i], bus=buses[i], source_path=None, format=IMPORTED_FORMAT,
                virtual_size=disk.capacity, boot_order=1 if i == first_data else None,
            )  # fmt: skip
            if disk.href is None:
                plans.append(_DiskPlan(spec, None, disk.capacity, disk.capacity))
            else:
                plans.append(_DiskPlan(spec, by_name[disk.href], disk.capacity, probes[disk.href].virtual_size))
        _check_buses(caps, plans)
        nics = []
        for nic in m.nics:
            model_key = (nic.model or "").lower().split()[0] if (nic.model or "").strip() else ""
            model = _NIC_MODELS.get(model_key)
            if model is None:
                model = "e1000"
                if model_key:
                    warnings.append(f"NIC model {nic.model!r} has no QEMU equivalent; an e1000 is attached instead")
            nics.append(self._map_nic(conn, "network", nic.network, model, network, warnings))
        description = f"imported by freezeframe from {package.path.name}: {m.name}"
        if m.os_description:
            description += f" ({m.os_description})"
        hardware = Hardware(
            vcpus=m.vcpus,
            memory_kib=-(-m.memory_bytes // 1024),
            arch=arch,
            machine=machine,
            domain_type=self.domain_type,
            boot=BootSpec(firmware=firmware),
            disks=tuple(p.spec for p in plans),
            nics=tuple(nics),
            description=description,
        )
        return _Plan("foreign", hardware, plans, warnings)

    def _map_nic(
        self, conn: Any, kind: str, source: str | None, model: str | None, network: str | None, warnings: list[str]
    ) -> NicSpec:
        """A libvirt network of the same name if one is active here, else user-mode networking (with a warning)."""
        if network is not None:
            return NicSpec("", model, "network", network)
        if kind == "user":
            return NicSpec("", model, "user", None)
        label = f"NIC on {source!r}" if source else "NIC without a network"
        if kind == "bridge":
            if source and _BRIDGE_RE.match(source) and Path("/sys/class/net", source, "bridge").is_dir():
                return NicSpec("", model, "bridge", source)
            warnings.append(f"{label}: no such host bridge here; it uses user-mode networking instead")
            return NicSpec("", model, "user", None)
        if kind != "network":
            warnings.append(f"{label}: interfaces of type {kind!r} are not rebuilt; it uses user-mode networking")
            return NicSpec("", model, "user", None)
        if source and _NET_RE.match(source):
            state = _network_state(conn, source)
            if state == "active":
                return NicSpec("", model, "network", source)
            why = "is not active (`virsh net-start`)" if state == "inactive" else "does not exist here"
            warnings.append(
                f"{label}: libvirt network {source!r} {why}; it uses user-mode networking instead "
                "(or import with --network NAME)"
            )
        else:
            warnings.append(f"{label}: no usable libvirt network name; it uses user-mode networking instead")
        return NicSpec("", model, "user", None)

    def _check_boot_file(self, path: str, kind: str) -> None:
        """The package names a file of this host to boot: it must exist, be one, and sit where boot files live."""
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise OvfInvalidValue(f"the package's {kind} path {path!r} is not an absolute path")
        file = Path(path)
        if not file.exists():
            raise PreflightFailed(
                f"the package boots the {kind} {path} directly, as its source host did, but this host has no such "
                f"file; put the same {kind} there (or restore the set on its own host) and import again"
            )
        real = file.resolve()
        if not real.is_file():
            raise InvalidRequest(f"the package's {kind} {path} is not a regular file on this host")
        allowed = [d.resolve() for d in self.boot_dirs]
        if not any(real.is_relative_to(d) for d in allowed):
            raise InvalidRequest(
                f"the package's {kind} {path} ({real}) is outside the directories an import may boot from "
                f"({', '.join(map(str, allowed))}); add its directory to {BOOT_DIRS_ENV} if it is a real {kind}"
            )
        with real.open("rb") as f:
            head = f.read(0x240)
        ok = _looks_like_kernel(head) if kind == "kernel" else head.startswith(_INITRD_MAGICS)
        if not ok:
            raise InvalidRequest(f"the package's {kind} {path} does not look like a {kind}; refused")

    def _domain_caps(self, conn: Any, arch: str, machine: str | None) -> etree._Element:
        try:
            xml = conn.getDomainCapabilities(None, arch, machine, self.domain_type)
        except libvirt.libvirtError as exc:
            raise PreflightFailed(
                f"this host cannot run a {arch} guest with machine type {machine or '(default)'} under "
                f"{self.domain_type}: {exc.get_error_message()}"
            ) from exc
        root: etree._Element = etree.fromstring(xml.encode())
        return root

    def _check_space(self, plan: _Plan) -> None:
        need = 0
        for disk in plan.disks:
            if disk.member is None:
                need += 2**20
                continue
            out = _qemu_img(
                ["measure", "--output=json", "-O", IMPORTED_FORMAT, qemu_json_for(disk.member)],
                f"measuring {disk.member.name}",
                timeout=120,
            ).stdout
            try:
                need += int(json.loads(out)["required"])
            except (ValueError, KeyError, TypeError) as exc:
                raise HypervisorError(f"qemu-img measure gave no size for {disk.member.name}: {out[:200]!r}") from exc
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.instances_dir).free
        if need > free:
            raise InsufficientSpace(
                f"importing needs about {need >> 20} MiB in {self.instances_dir}, only {free >> 20} MiB are free; "
                "free space and retry"
            )

    # -- building ---------------------------------------------------------------------------------------------

    def _build(
        self, conn: Any, name: str, plan: _Plan, start: bool, progress: ProgressCallback | None
    ) -> tuple[str, list[ImportedDiskResult]]:
        """Make the disks, define (and start) the domain; any failure removes all of it."""
        builder = self.service.parts.builder
        directory = self.instances_dir / name
        results: list[ImportedDiskResult] = []
        with builder.building(name, directory, forget_restores=False) as build:
            total = sum(d.virtual_size for d in plan.disks if d.member is not None)
            done = 0
            defined: list[ld.DefinedDisk] = []
            for disk in plan.disks:
                dst = directory / f"{disk.spec.target}.{IMPORTED_FORMAT}"
                if disk.member is None:
                    _qemu_img(
                        ["create", "-q", "-f", IMPORTED_FORMAT, str(dst), str(disk.capacity)],
                        f"creating the blank disk {disk.spec.target}",
                    )
                    source = "blank"
                else:
                    member = disk.member
                    offset = done

                    def report(fraction: float, offset: int = offset, size: int = disk.virtual_size) -> None:
                        if progress is not None:
                            progress(offset + int(fraction * size), total)

                    _convert(qemu_json_for(member), dst, f"converting {member.name} to {dst}", report)
                    if disk.capacity > disk.virtual_size and disk.capacity % 512 == 0:
                        _qemu_img(
                            ["resize", "-q", "-f", IMPORTED_FORMAT, str(dst), str(disk.capacity)],
                            f"growing {dst} to the declared capacity",
                        )
                    done += disk.virtual_size
                    source = member.name
                defined.append(ld.DefinedDisk(disk.spec, dst, IMPORTED_FORMAT))
                results.append(
                    ImportedDiskResult(disk.spec.target, disk.spec.bus, str(dst), max(disk.capacity, 0), source)
                )
            xml = self._domain_xml(name, plan.hardware, defined, directory)
            dom = ld.define(conn, xml)
            uuid = build.uuid = str(dom.UUIDString())
            builder.markers.write("restore", name, {"name": name, "dir": str(directory), "uuid": uuid})
            if start:
                ld.start(dom)
        return uuid, results

    def _domain_xml(self, name: str, hardware: Hardware, disks: Sequence[ld.DefinedDisk], directory: Path) -> str:
        try:
            xml = ld.domain_xml(
                name, hardware, disks, nics=None, domain_type=self.domain_type, console_log=directory / "console.log"
            )
        except ValueError as exc:  # lxml refuses text that is not XML-compatible (control characters)
            raise OvfInvalidValue(f"the package's hardware cannot be written as a libvirt domain: {exc}") from exc
        if not any(d.spec.bus == "scsi" for d in disks):
            return xml
        root = etree.fromstring(xml.encode())
        devices = root.find("devices")
        if devices is not None and devices.find("controller[@type='scsi']") is None:
            # libvirt's default SCSI HBA on x86 is an LSI card; virtio-scsi is what guests here have drivers for.
            devices.insert(0, etree.Element("controller", type="scsi", index="0", model="virtio-scsi"))
        return etree.tostring(root, pretty_print=True, encoding="unicode")

    # -- small checks -----------------------------------------------------------------------------------------

    @staticmethod
    def _check_name_free(conn: Any, name: str) -> None:
        if ld.name_taken(conn, name):
            raise InvalidRequest(f"an instance named {name!r} already exists; choose another name with --as")

    @staticmethod
    def _require_network(conn: Any, network: str) -> None:
        state = _network_state(conn, network) if _NET_RE.match(network) else "missing"
        if state == "missing":
            raise InvalidRequest(
                f"libvirt network {network!r} does not exist; define and start it (`virsh net-define`, "
                "`virsh net-start`) or leave out --network"
            )
        if state == "inactive":
            raise InvalidRequest(f"libvirt network {network!r} exists but is not active; `virsh net-start {network}`")

    def _available(self, set_ref: str) -> SnapshotSet:
        snapshot_set = self.service.catalog.get_set(set_ref)
        if snapshot_set.status is not SetStatus.AVAILABLE:
            raise InvalidRequest(
                f"set {snapshot_set.name} ({snapshot_set.id}) is {snapshot_set.status}; only available sets can be "
                "exported"
            )
        missing = [f"{m.target} ({m.path})" for m in snapshot_set.members if not Path(m.path).is_file()]
        if missing or not snapshot_set.members:
            raise PreflightFailed(
                f"set {snapshot_set.name} ({snapshot_set.id}) is missing member data: "
                f"{', '.join(missing) or 'no members'}; check it with `freezeframe verify {snapshot_set.id}`"
            )
        return snapshot_set


# ---- module helpers ---------------------------------------------------------------------------------------


def _check_export_args(disk_format: str, ovf_version: int) -> None:
    if disk_format not in DISK_FORMATS:
        raise InvalidRequest(f"--disk-format {disk_format!r}: use one of {', '.join(DISK_FORMATS)}")
    if ovf_version not in OVF_VERSIONS:
        raise InvalidRequest(f"--ovf-version {ovf_version}: use 1 or 2 (1 is what most importers read)")


def _network_state(conn: Any, name: str) -> str:
    """``active``, ``inactive`` or ``missing``."""
    try:
        net = conn.networkLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
            return "missing"
        raise HypervisorError(f"looking up libvirt network {name!r}: {exc.get_error_message()}") from exc
    return "active" if net.isActive() else "inactive"


def _efi_available(caps: etree._Element) -> bool:
    values = [v.text for v in caps.findall("os/enum[@name='firmware']/value")]
    return "efi" in values or caps.find("os/loader[@supported='yes']/value") is not None


def _check_vcpus(caps: etree._Element, vcpus: int) -> None:
    el = caps.find("vcpu")
    limit = int(el.get("max", "0")) if el is not None and (el.get("max") or "").isdigit() else 0
    if limit and vcpus > limit:
        raise PreflightFailed(f"the package's machine has {vcpus} vCPUs; this host's machine type allows {limit}")


def _check_buses(caps: etree._Element, plans: Sequence[_DiskPlan]) -> None:
    known = {v.text for v in caps.findall("devices/disk/enum[@name='bus']/value")}
    for plan in plans:
        if known and plan.spec.bus not in known:
            raise PreflightFailed(
                f"disk {plan.spec.target} is on a {plan.spec.bus} bus, which this host's machine type does not offer "
                f"(it has {', '.join(sorted(k for k in known if k))})"
            )


def _check_unique_targets(plans: Sequence[_DiskPlan]) -> None:
    seen: set[str] = set()
    for plan in plans:
        if plan.spec.target in seen:
            raise OvfInvalidValue(f"the package attaches two disks as {plan.spec.target}")
        seen.add(plan.spec.target)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text(value: object, what: str, limit: int = 4096) -> None:
    if value is not None and (not isinstance(value, str) or len(value) > limit or "\0" in value):
        raise OvfInvalidValue(f"the package's {what} is not a string of at most {limit} characters")


def _check_hardware(hw: Hardware) -> None:
    """The freezeframe section is not signed: every recorded value is checked before it reaches libvirt."""
    if not _is_int(hw.vcpus) or not 1 <= hw.vcpus <= 4096:
        raise OvfInvalidValue(f"the package's machine has {hw.vcpus!r} vCPUs (1-4096 accepted)")
    if not _is_int(hw.memory_kib) or not 1 <= hw.memory_kib <= 64 * 2**30:
        raise OvfInvalidValue(f"the package's machine has {hw.memory_kib!r} KiB of memory (at most 64 TiB)")
    if not isinstance(hw.arch, str) or not _ARCH_RE.match(hw.arch):
        raise OvfInvalidValue(f"the package's architecture {hw.arch!r} is not one libvirt knows")
    if hw.machine is not None and (not isinstance(hw.machine, str) or not _MACHINE_RE.match(hw.machine)):
        raise OvfInvalidValue(f"the package's machine type {hw.machine!r} is not a machine type name")
    if hw.os_type != "hvm":
        raise OvfInvalidValue(f"the package's OS type {hw.os_type!r} is not hvm; only full virtualization is imported")
    if hw.boot.firmware not in ("bios", "efi"):
        raise OvfInvalidValue(f"the package's firmware {hw.boot.firmware!r} is neither bios nor efi")
    if any(dev not in _BOOT_DEVS for dev in hw.boot.boot_devices):
        raise OvfInvalidValue(f"the package's boot devices {list(hw.boot.boot_devices)!r} are not all known")
    _check_text(hw.boot.cmdline, "kernel command line")
    _check_text(hw.description, "description", 65536)
    _check_text(hw.metadata_xml, "<metadata>", 1 << 20)
    if hw.metadata_xml and re.search(r"<!\s*(DOCTYPE|ENTITY)", hw.metadata_xml, re.IGNORECASE):
        raise OvfInvalidValue("the package's <metadata> declares a DOCTYPE/ENTITY; refused")
    for nic in hw.nics:
        _check_text(nic.source, "NIC source", 64)
        _check_text(nic.model, "NIC model", 32)
        if nic.model is not None and not _MODEL_RE.match(nic.model):
            raise OvfInvalidValue(f"the package's NIC model {nic.model!r} is not a model name")


def _check_disk_spec(spec: DiskSpec) -> None:
    if not isinstance(spec.target, str) or not _TARGET_RE.match(spec.target):
        raise OvfInvalidValue(f"the package's disk target {spec.target!r} is not a libvirt disk name (vdX, sdX, hdX)")
    if spec.bus not in _BUSES or not spec.target.startswith(_TARGET_PREFIX[spec.bus]):
        raise OvfInvalidValue(f"the package's disk {spec.target} is on bus {spec.bus!r}, which does not fit it")
    if spec.boot_order is not None and (not _is_int(spec.boot_order) or not 1 <= spec.boot_order <= 1000):
        raise OvfInvalidValue(f"the package's disk {spec.target} has boot order {spec.boot_order!r}")
    if spec.serial is not None and (not isinstance(spec.serial, str) or not _SERIAL_RE.match(spec.serial)):
        raise OvfInvalidValue(f"the package's disk {spec.target} has serial {spec.serial!r}")


def _foreign_targets(disks: Sequence[ImportedDisk], warnings: list[str]) -> tuple[list[str], list[str]]:
    """(bus, target) per disk: buses from the OVF controllers, targets in controller/unit order per bus."""
    buses: list[str] = []
    for disk in disks:
        bus = _FOREIGN_BUS.get(disk.controller or "")
        if bus is None:
            warnings.append(
                f"disk {disk.disk_id}: controller {disk.controller or '(none)'} has no libvirt equivalent here; "
                "it is attached as virtio"
            )
            bus = "virtio"
        buses.append(bus)
    if buses.count("ide") > 4:
        warnings.append(f"{buses.count('ide')} IDE disks do not fit on 2 IDE channels; they are attached as SATA")
        buses = ["sata" if b == "ide" else b for b in buses]
    rank = {"virtio": 0, "scsi": 0, "ide": 0, "sata": 1, "usb": 2}
    order = sorted(
        range(len(disks)),
        key=lambda i: (
            _TARGET_PREFIX[buses[i]],
            rank[buses[i]],
            _num(disks[i].controller_address),
            _num(disks[i].address),
            i,
        ),
    )
    targets = [""] * len(disks)
    counters: dict[str, int] = {}
    for i in order:
        prefix = _TARGET_PREFIX[buses[i]]
        targets[i] = prefix + _letters(counters.get(prefix, 0))
        counters[prefix] = counters.get(prefix, 0) + 1
    return buses, targets


__all__ = [
    "BOOT_DIRS_ENV",
    "DISK_FORMATS",
    "OVF_VERSIONS",
    "ExportResult",
    "ExportedDisk",
    "ImportResult",
    "ImportedDiskResult",
    "Portable",
    "package_base",
    "summarize",
]
