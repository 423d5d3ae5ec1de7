"""Open an OVA defensively: layout, then every manifest digest, then the descriptor; nothing is extracted.

The reader refuses anything that could escape the package (``tar.scan_members``: paths, links,
devices) and verifies the manifest before anything else is believed. Disks stay where they are in
the tar; ``probe`` checks them and gives QEMU a pinned, offset-bounded view of each. See docs/ovf.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from freezeframe.adapters.ova.disk_writer import CHUNK
from freezeframe.adapters.ova.manifest import DIGESTS, MAX_MANIFEST_BYTES, parse_manifest
from freezeframe.adapters.ova.tar import OvaMember, scan_members
from freezeframe.adapters.ovf import (
    MAX_DESCRIPTOR_BYTES,
    ImportedDisk,
    ImportedMachine,
    OvfFileRef,
    parse_collection,
    parse_descriptor,
)
from freezeframe.errors import OvaDigestMismatch, OvaLayoutError, OvaManifestError, OvaMissingFile, OvfMalformed


@dataclass(frozen=True)
class OvaDiskMember:
    """A disk of the descriptor located inside the package, readable in place by qemu."""

    name: str
    offset: int
    size: int
    ova_path: Path
    format: str | None  # as the descriptor declares it; ``probe.verify_disk`` says what it really is
    disk: ImportedDisk


@dataclass(frozen=True)
class OvaPackage:
    path: Path
    descriptor_name: str
    descriptor: bytes
    machine: ImportedMachine
    manifest_name: str | None
    verified: Mapping[str, str]
    unverified: tuple[str, ...]
    disks: tuple[OvaDiskMember, ...]
    warnings: tuple[str, ...]


def _read_member(f: IO[bytes], member: OvaMember, limit: int, what: str) -> bytes:
    if member.size > limit:
        raise OvfMalformed(f"{what} {member.name!r} is {member.size} bytes; more than {limit} is refused")
    f.seek(member.offset)
    data = f.read(member.size)
    if len(data) != member.size:
        raise OvaLayoutError(f"{what} {member.name!r} is truncated")
    return data


def _digest_member(f: IO[bytes], member: OvaMember, algorithm: str) -> str:
    digest = hashlib.new(DIGESTS[algorithm][0])
    f.seek(member.offset)
    left = member.size
    while left > 0:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            raise OvaLayoutError(f"member {member.name!r} is truncated")
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def _verify_manifest(f: IO[bytes], manifest: OvaMember, by_name: Mapping[str, OvaMember]) -> dict[str, str]:
    """Every digest the manifest lists, checked: file name -> algorithm."""
    verified: dict[str, str] = {}
    for algorithm, name, expected in parse_manifest(_read_member(f, manifest, MAX_MANIFEST_BYTES, "manifest")):
        member = by_name.get(name)
        if member is None:
            raise OvaManifestError(f"manifest lists {name!r}, which is not in the package")
        actual = _digest_member(f, member, algorithm)
        if actual != expected:
            raise OvaDigestMismatch(
                f"{algorithm} of {name!r} is {actual}, the manifest says {expected}: corrupt or tampered"
            )
        verified[name] = algorithm
    return verified


@dataclass(frozen=True)
class _Layout:
    members: list[OvaMember]
    descriptor: bytes
    manifest: OvaMember | None
    certificates: list[str]
    verified: dict[str, str]


def _read_layout(path: Path) -> _Layout:
    with path.open("rb") as f:
        members = scan_members(path, f)
        first = members[0]
        if not first.name.lower().endswith(".ovf"):
            raise OvaLayoutError(f"the first member of {path} is {first.name!r}; the .ovf descriptor must come first")
        if sum(1 for m in members if m.name.lower().endswith(".ovf")) > 1:
            raise OvaLayoutError(f"{path} holds several .ovf descriptors")
        manifests = [m for m in members if m.name.lower().endswith(".mf")]
        if len(manifests) > 1:
            raise OvaLayoutError(f"{path} holds several .mf manifests")
        manifest = manifests[0] if manifests else None
        by_name = {m.name: m for m in members}
        verified = _verify_manifest(f, manifest, by_name) if manifest is not None else {}
        descriptor = _read_member(f, first, MAX_DESCRIPTOR_BYTES, "descriptor")
    certificates = [m.name for m in members if m.name.lower().endswith(".cert")]
    return _Layout(members, descriptor, manifest, certificates, verified)


def _referenced(machine: ImportedMachine, by_name: Mapping[str, OvaMember], warnings: list[str]) -> list[str]:
    referenced: list[str] = []
    for ref in machine.files:
        if "://" in ref.href:
            raise OvaMissingFile(f"the descriptor references external file {ref.href!r}; it is not fetched")
        member = by_name.get(ref.href)
        if member is None:
            raise OvaMissingFile(f"the descriptor references {ref.href!r}, which is not in the package")
        referenced.append(ref.href)
        if ref.size is not None and ref.size != member.size:
            warnings.append(f"{ref.href!r} is {member.size} bytes but the descriptor says {ref.size}")
    return referenced


def open_ova(path: Path) -> OvaPackage:
    """Open an OVA defensively: layout checks, then manifest digests, then the descriptor.

    Nothing is extracted: disks are read in place through ``qemu_json_for``. Referenced files absent
    from the manifest are allowed and listed in ``unverified``.
    """
    layout = _checked_layout(path)
    machine = parse_descriptor(layout.descriptor)
    return _package(path, layout, machine, machine.files)


def open_ova_collection(path: Path) -> tuple[OvaPackage, ...]:
    """An OVA holding a VirtualSystemCollection (a group set), checked as ``open_ova`` checks one machine:
    one ``OvaPackage`` per virtual system, each with only its own disks."""
    layout = _checked_layout(path)
    machines = parse_collection(layout.descriptor)
    every_file = tuple(ref for m in machines for ref in m.files)
    return tuple(_package(path, layout, m, every_file) for m in machines)


def _checked_layout(path: Path) -> _Layout:
    if not path.is_file():
        raise OvaLayoutError(f"{path} is not a regular file")
    return _read_layout(path)


def _package(path: Path, layout: _Layout, machine: ImportedMachine, every_file: tuple[OvfFileRef, ...]) -> OvaPackage:
    """One machine of the package; ``every_file``: the files of every machine (for the extra-member warning)."""
    members, first = layout.members, layout.members[0]
    by_name = {m.name: m for m in members}
    warnings: list[str] = []
    if layout.certificates:
        warnings.append(f"certificate {layout.certificates[0]!r} present but not verified")
    if layout.manifest is None:
        warnings.append("no manifest: the package contents are not integrity-checked")
    referenced = _referenced(machine, by_name, warnings)
    unverified = tuple(name for name in referenced if name not in layout.verified)
    if layout.manifest is not None and unverified:
        warnings.append(f"not in the manifest: {', '.join(unverified)}")
    if [m.name for m in members if m.name in referenced] != referenced:
        warnings.append("files are not stored in References order")
    manifest_names = [layout.manifest.name] if layout.manifest else []
    known = {first.name, *manifest_names, *layout.certificates, *(ref.href for ref in every_file)}
    extra = [m.name for m in members if m.name not in known]
    if extra:
        warnings.append(f"members not referenced by the descriptor: {', '.join(extra)}")

    disks = tuple(
        OvaDiskMember(
            name=disk.href,
            offset=by_name[disk.href].offset,
            size=by_name[disk.href].size,
            ova_path=path.resolve(),
            format=disk.format,
            disk=disk,
        )
        for disk in machine.disks
        if disk.href is not None
    )
    return OvaPackage(
        path=path,
        descriptor_name=first.name,
        descriptor=layout.descriptor,
        machine=machine,
        manifest_name=layout.manifest.name if layout.manifest else None,
        verified=layout.verified,
        unverified=unverified,
        disks=disks,
        warnings=tuple([*warnings, *machine.warnings]),
    )
