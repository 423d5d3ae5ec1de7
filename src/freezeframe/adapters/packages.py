"""The ``Packages`` port over the OVA writer/reader (``adapters/ova.py``) and the OVF descriptor (``adapters/ovf.py``).

Translates between their types and the port's: a set's members in, a written package out; a checked package in
the port's terms (what planning reads), its disk files as byte ranges of the OVA that QEMU opens in place with the
format pinned and no backing file. ``probe`` is the OVA reader's disk probe, which checks each image header itself
before any QEMU tool opens it.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from freezeframe.adapters.ova import (
    OvaDiskMember,
    OvaDiskSource,
    OvaPackage,
    open_ova,
    open_ova_collection,
    probe_disk,
    write_ova,
)
from freezeframe.adapters.ovf import (
    ImportedMachine,
    OvfDisk,
    build_collection_descriptor,
    build_descriptor,
    parse_collection,
    parse_descriptor,
)
from freezeframe.durable import fsync_path, sha256_file
from freezeframe.errors import OvaDiskError, OvaWriteError
from freezeframe.model import SnapshotSet
from freezeframe.ports import (
    DeclaredDisk,
    DeclaredNic,
    ImageDisk,
    ImageNic,
    ImageRef,
    ImageSummary,
    OpenedPackage,
    PackageFile,
    PackageSource,
    ProbedDisk,
    ProgressCallback,
    RecordedMember,
    RecordedSet,
    WrittenDisk,
    WrittenPackage,
)

PACKAGE_MODE = 0o600
"""Packages hold whole guest disks: readable by their owner only."""
_SECTOR = 512


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


def summarize_collection(name: str, machines: Sequence[ImportedMachine], disk_format: str) -> ImageSummary:
    """A collection as one stored image summary: the systems' CPUs, memory, disks and NICs together."""
    parts = [summarize(m, disk_format) for m in machines]
    return ImageSummary(
        machine_name=name,
        vcpus=sum(p.vcpus for p in parts),
        memory_bytes=sum(p.memory_bytes for p in parts),
        ovf_version=parts[0].ovf_version,
        disk_format=disk_format,
        arch=parts[0].arch,
        firmware=parts[0].firmware,
        disks=tuple(replace(d, target=f"{p.machine_name}:{d.target}") for p in parts for d in p.disks),
        nics=tuple(n for p in parts for n in p.nics),
    )


def _ova_source(source: PackageSource) -> OvaDiskSource:
    image = source.image
    if image.offset or image.size is not None:
        raise OvaWriteError(f"member {source.target}: only whole image files can be packaged")
    if source.to_vmdk:
        return OvaDiskSource.to_vmdk(source.href, image.path, image.format, source.target, source.adapter_type)
    return OvaDiskSource.copy(source.href, image.path, image.format, source.target)


def _opened(package: OvaPackage) -> OpenedPackage:
    m = package.machine
    recorded = None
    if m.freezeframe is not None:
        members = tuple(
            RecordedMember(x.href, x.target, x.bus, x.virtual_size, x.boot_order) for x in m.freezeframe.members
        )
        recorded = RecordedSet(m.freezeframe.hardware, members)
    return OpenedPackage(
        file_name=package.path.name,
        machine_name=m.name,
        vcpus=m.vcpus,
        memory_bytes=m.memory_bytes,
        arch=m.arch,
        firmware=m.firmware,
        os_description=m.os_description,
        disks=tuple(
            DeclaredDisk(d.disk_id, d.href, d.capacity, d.controller, d.controller_address, d.address) for d in m.disks
        ),
        nics=tuple(DeclaredNic(n.network, n.model) for n in m.nics),
        files={d.name: PackageFile(d.name, handle=d) for d in package.disks},
        recorded=recorded,
        warnings=tuple(package.warnings),
    )


class OvaPackages:
    """OVA files on this host."""

    def write(
        self,
        out: Path,
        snapshot_set: SnapshotSet,
        descriptor_name: str,
        sources: Sequence[PackageSource],
        ovf_version: int,
        progress: ProgressCallback | None,
        *,
        replace: bool = False,
        manifest_digest: str = "sha256",
    ) -> WrittenPackage:
        def descriptor(disks: Sequence[OvfDisk]) -> bytes:
            return build_descriptor(snapshot_set, disks, ovf_version)

        def summary(xml: bytes, disk_format: str) -> ImageSummary:
            return summarize(parse_descriptor(xml), disk_format)

        return self._write(out, descriptor_name, descriptor, sources, progress, replace, manifest_digest, summary)

    def write_collection(
        self,
        out: Path,
        name: str,
        systems: Sequence[tuple[SnapshotSet, Sequence[PackageSource]]],
        descriptor_name: str,
        ovf_version: int,
        progress: ProgressCallback | None,
        *,
        replace: bool = False,
        manifest_digest: str = "sha256",
    ) -> WrittenPackage:
        counts = [len(sources) for _, sources in systems]

        def descriptor(disks: Sequence[OvfDisk]) -> bytes:
            per_system: list[tuple[SnapshotSet, Sequence[OvfDisk]]] = []
            start = 0
            for (snapshot_set, _), count in zip(systems, counts, strict=True):
                per_system.append((snapshot_set, disks[start : start + count]))
                start += count
            return build_collection_descriptor(name, per_system, ovf_version)

        def summary(xml: bytes, disk_format: str) -> ImageSummary:
            return summarize_collection(name, parse_collection(xml), disk_format)

        sources = [s for _, system_sources in systems for s in system_sources]
        return self._write(out, descriptor_name, descriptor, sources, progress, replace, manifest_digest, summary)

    def _write(
        self,
        out: Path,
        descriptor_name: str,
        descriptor: Callable[[Sequence[OvfDisk]], bytes],
        sources: Sequence[PackageSource],
        progress: ProgressCallback | None,
        replace: bool,
        manifest_digest: str,
        summary: Callable[[bytes, str], ImageSummary],
    ) -> WrittenPackage:
        replacing = replace and (out.exists() or out.is_symlink())
        target = out.with_name(f".{out.name}.ff-{uuidlib.uuid4().hex[:8]}.tmp") if replacing else out
        result = write_ova(
            target, descriptor_name, descriptor, [_ova_source(s) for s in sources], progress, manifest_digest
        )
        try:
            target.chmod(PACKAGE_MODE)
            if replacing:
                target.replace(out)
                fsync_path(out.parent)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        disk_format = "vmdk" if any(s.to_vmdk for s in sources) else "qcow2"
        return WrittenPackage(
            path=out,
            size=result.size,
            allocated=out.stat().st_blocks * 512,
            seconds=result.seconds,
            disks=tuple(
                WrittenDisk(d.target, d.href, d.format, d.file_size, d.capacity, d.populated_size) for d in result.disks
            ),
            summary=summary(result.descriptor, disk_format),
        )

    def open(self, path: Path) -> OpenedPackage:
        return _opened(open_ova(path))

    def open_collection(self, path: Path) -> tuple[OpenedPackage, ...]:
        return tuple(_opened(p) for p in open_ova_collection(path))

    def probe(self, file: PackageFile) -> ProbedDisk:
        member = file.handle
        if not isinstance(member, OvaDiskMember):
            raise OvaDiskError(f"disk {file.name} was not opened by this package reader")
        probe = probe_disk(member)  # the header guard, then qemu-img info/check with the format pinned
        size = -(-member.size // _SECTOR) * _SECTOR  # qemu's raw layer wants whole sectors; tar padding has them
        image = ImageRef(member.ova_path, probe.format, offset=member.offset, size=size, backing=False)
        return ProbedDisk(member.name, probe.virtual_size, image)

    def sha256(self, path: Path) -> str:
        return sha256_file(path)
