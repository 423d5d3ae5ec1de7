"""Images: a set exported as an OVA package, and an OVA imported back as a new instance.

Thin glue over ``adapters/ova.py`` and ``adapters/ovf.py`` (which do the format work and its safety checks):
export writes ``$FREEZEFRAME_HOME/images/<image-id>.ova`` (descriptor with the set's freezeframe section, SHA-256
manifest, one disk per member); import reads it back defensively, copies each disk out of the package into
``$FREEZEFRAME_HOME/instances/<name>/`` and defines the domain from the recorded hardware, so ``discard`` can
remove it like a restored instance. Either undoes everything it made when it fails.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from freezeframe.adapters import libvirt_define as ld
from freezeframe.adapters.ova import OvaDiskSource, open_ova, probe_disk, qemu_json_for, write_ova
from freezeframe.adapters.ovf import OvfDisk, build_descriptor
from freezeframe.errors import HypervisorError, InstanceBusy, InsufficientSpace, InvalidRequest
from freezeframe.lifecycle import validate_name
from freezeframe.model import DiskSpec, Hardware, NicSpec, SetStatus, SnapshotSet
from freezeframe.ports import ProgressCallback
from freezeframe.service import Freezeframe
from freezeframe.signals import deferred_signals

log = logging.getLogger(__name__)

IMPORT_FORMAT = "qcow2"


@dataclass(frozen=True)
class Exported:
    path: Path
    size: int


@dataclass(frozen=True)
class Imported:
    name: str
    uuid: str
    disks: list[str]
    started: bool
    warnings: list[str]


@contextlib.contextmanager
def _hold(service: Freezeframe, key: str, what: str) -> Iterator[None]:
    """The same lock keys as ``Lifecycle`` so a delete cannot remove a set while it is exported."""
    try:
        with service.locks.hold(key):
            yield
    except InstanceBusy:
        raise InstanceBusy(f"{what} is in use by another freezeframe operation; wait for it to finish") from None


def images_dir(service: Freezeframe) -> Path:
    directory = service.settings.home / "images"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def export_set(
    service: Freezeframe,
    snapshot_set: SnapshotSet,
    out: Path,
    disk_format: str = "qcow2",
    progress: ProgressCallback | None = None,
) -> Exported:
    """An OVA of the set's members; with ``vmdk`` the disks are converted to streamOptimized VMDK."""
    with _hold(service, f"set-{snapshot_set.id}", f"set {snapshot_set.name}"):
        snapshot_set = service.catalog.get_set(snapshot_set.id)
        if snapshot_set.status is not SetStatus.AVAILABLE:
            raise InvalidRequest(f"set {snapshot_set.name} is {snapshot_set.status}; only available sets are exported")
        missing = [m.target for m in snapshot_set.members if not Path(m.path).is_file()]
        if missing or not snapshot_set.members:
            raise InvalidRequest(
                f"set {snapshot_set.name} is missing member data ({', '.join(missing) or 'no members'}); "
                "verify or delete it"
            )
        short = snapshot_set.id[:8]
        sources = [
            OvaDiskSource.copy(f"{short}-{m.target}.qcow2", Path(m.path), "qcow2", m.target)
            if disk_format == "qcow2"
            else OvaDiskSource.to_vmdk(f"{short}-{m.target}.vmdk", Path(m.path), "qcow2", m.target)
            for m in snapshot_set.members
        ]

        def descriptor(disks: Sequence[OvfDisk]) -> bytes:
            return build_descriptor(snapshot_set, disks)

        result = write_ova(out, f"freezeframe-{short}.ovf", descriptor, sources, progress)
    return Exported(result.path, result.size)


def _hardware_for(package_hardware: Hardware | None, vcpus: int, memory_bytes: int, arch: str | None) -> Hardware:
    if package_hardware is not None:
        return package_hardware
    return Hardware(vcpus=max(1, vcpus), memory_kib=max(1, memory_bytes // 1024), arch=arch or "x86_64", machine=None)


def import_package(service: Freezeframe, path: Path, name: str, *, start: bool = False) -> Imported:
    """A new instance from an OVA: every disk copied out of the package (qcow2), the domain defined (and started)."""
    validate_name(name)
    conn = service.hypervisor.conn
    instances = service.settings.home / "instances"
    directory = instances / name
    package = open_ova(path)
    probes = [probe_disk(d) for d in package.disks]
    if not probes:
        raise InvalidRequest("the package holds no disk to import")
    need = sum(p.virtual_size for p in probes)
    instances.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(instances).free
    if free < need:
        raise InsufficientSpace(f"importing needs up to {need >> 20} MiB, {free >> 20} MiB are free")
    machine = package.machine
    info = machine.freezeframe
    by_href = {m.href: m for m in info.members} if info is not None else {}
    hardware = _hardware_for(info.hardware if info else None, machine.vcpus, machine.memory_bytes, machine.arch)
    recorded = {d.target: d for d in hardware.disks}
    warnings = list(package.warnings)
    with _hold(service, f"name-{name}", f"instance name {name}"):
        if ld.name_taken(conn, name):
            raise InvalidRequest(f"an instance named {name!r} already exists; choose another name")
        try:
            directory.mkdir()
        except FileExistsError:
            raise InvalidRequest(f"a folder for an instance named {name!r} is left over; choose another name") from None
        uuid: str | None = None
        try:
            defined: list[ld.DefinedDisk] = []
            for i, disk in enumerate(package.disks):
                member = by_href.get(disk.name)
                target = member.target if member is not None else f"vd{chr(ord('a') + i)}"
                dst = directory / f"{target}.{IMPORT_FORMAT}"
                _convert(qemu_json_for(disk), dst)
                spec = recorded.get(target) or DiskSpec(
                    target=target, bus="virtio", source_path=None, format=IMPORT_FORMAT,
                    virtual_size=probes[i].virtual_size, boot_order=1 if i == 0 else None,
                )  # fmt: skip
                defined.append(ld.DefinedDisk(spec, dst, IMPORT_FORMAT))
            nics: list[NicSpec] | None = None
            try:
                ld.check_nics(conn, hardware.nics)
            except InvalidRequest as exc:
                nics = []
                warnings.append(f"imported without network interfaces: {exc}")
            xml = ld.domain_xml(
                name,
                replace(hardware, disks=tuple(d.spec for d in defined)),
                defined,
                nics=nics,
                domain_type="qemu",
                console_log=directory / "console.log",
            )
            dom = ld.define(conn, xml)
            uuid = str(dom.UUIDString())
            if start:
                ld.start(dom)
        except BaseException:
            with deferred_signals():
                if uuid is not None:
                    try:
                        ld.remove_domain(conn, uuid)
                    except HypervisorError:
                        log.exception("could not remove the half-imported domain %s", name)
                shutil.rmtree(directory, ignore_errors=True)
            raise
    return Imported(name, uuid, [d.spec.target for d in defined], start, warnings)


def _convert(source: str, dst: Path) -> None:
    argv = ["qemu-img", "convert", "-O", IMPORT_FORMAT, source, str(dst)]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=3600)
    except subprocess.TimeoutExpired as exc:
        raise HypervisorError(f"copying a disk out of the package into {dst} took over an hour") from exc
    if result.returncode != 0:
        detail = result.stderr.strip()
        if "No space left" in detail:
            raise InsufficientSpace(f"no space left copying a disk out of the package into {dst}")
        raise HypervisorError(f"copying a disk out of the package into {dst} failed: {detail}")


def now() -> datetime:
    return datetime.now(UTC)
