"""Let QEMU near a disk of a package only after its header has been checked, and pin the format it found.

``verify_disk`` parses the member's image header ourselves (``image_guard``): a disk that could make
QEMU open another file (VMDK text descriptors and their extents, backing and data files, ...) or
that is not what the descriptor declares is refused before any qemu-img runs. ``qemu_json_for``
runs that check every time it gives a QEMU target, so no caller can reach QEMU without it, and the
target pins the verified format on a raw layer bounded to the member's bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from freezeframe.adapters.image_guard import VerifiedImage, verify_image
from freezeframe.adapters.ova.qemu import QEMU_TIMEOUT, run_qemu_img, stderr_line
from freezeframe.adapters.ova.reader import OvaDiskMember
from freezeframe.adapters.ova.tar import round_up
from freezeframe.errors import OvaDiskError, OvaUnsafeDisk


@dataclass(frozen=True)
class DiskProbe:
    name: str
    format: str
    virtual_size: int
    check: str
    info: dict[str, Any]
    subformat: str = ""


def verify_disk(member: OvaDiskMember) -> VerifiedImage:
    """The member's image header, checked without QEMU (OvaDiskError / OvaUnsafeDisk otherwise)."""
    if member.format is None:
        raise OvaDiskError(f"disk {member.name}: unknown disk format {member.disk.format_uri!r}")
    try:
        fd = os.open(member.ova_path, os.O_RDONLY)
    except OSError as exc:
        raise OvaDiskError(f"cannot read the package {member.ova_path}: {exc}") from exc
    try:
        if member.offset + round_up(member.size) > os.fstat(fd).st_size:
            raise OvaDiskError(f"disk {member.name} runs past the end of the package: truncated")

        def read_at(offset: int, length: int) -> bytes:
            return os.pread(fd, length, member.offset + offset)

        return verify_image(member.name, member.format, member.size, read_at)
    finally:
        os.close(fd)


def qemu_target(member: OvaDiskMember, image: VerifiedImage) -> str:
    """A qemu ``json:`` filename: the verified driver over a raw layer with the member's offset and size.

    The size is rounded up to 512 bytes (qemu's raw layer requires it; the tar padding provides the
    bytes). ``"backing": null`` keeps qemu from opening any backing file whatever the header says.
    """
    spec: dict[str, Any] = {
        "driver": image.format,
        "file": {
            "driver": "raw",
            "offset": member.offset,
            "size": round_up(member.size),
            "file": {"driver": "file", "filename": str(member.ova_path)},
        },
        "backing": None,
    }
    return "json:" + json.dumps(spec, separators=(",", ":"))


def qemu_json_for(member: OvaDiskMember) -> str:
    """The pinned QEMU target reading the member in place, after ``verify_disk`` accepted its header."""
    return qemu_target(member, verify_disk(member))


def _check(member: OvaDiskMember, target: str, size_hint: str) -> str:
    try:
        proc = run_qemu_img(["check", "--output=json", target], timeout=QEMU_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise OvaDiskError(f"disk {member.name}: qemu-img check took too long") from exc
    if proc.returncode == 0:
        return "ok"
    if proc.returncode == 3:
        return "leaks"
    if proc.returncode == 2:
        raise OvaDiskError(f"disk {member.name} is corrupt: {stderr_line(proc)}{size_hint}")
    if proc.returncode != 63:
        raise OvaDiskError(f"disk {member.name} failed qemu-img check: {stderr_line(proc)}{size_hint}")
    return "unsupported"


def probe_disk(member: OvaDiskMember) -> DiskProbe:
    """Check the header ourselves, then have qemu open and check the image; raise OvaDiskError if unusable."""
    image = verify_disk(member)
    target = qemu_target(member, image)
    declared = member.disk.file_size
    size_hint = (
        f" (the package holds {member.size} bytes, the descriptor says {declared}: truncated?)"
        if declared is not None and declared != member.size
        else ""
    )
    try:
        proc = run_qemu_img(["info", "--output=json", target], timeout=120)
    except subprocess.TimeoutExpired as exc:
        raise OvaDiskError(f"disk {member.name}: qemu-img info took too long") from exc
    if proc.returncode != 0:
        raise OvaDiskError(f"disk {member.name} is not a usable {image.format} image: {stderr_line(proc)}{size_hint}")
    info = json.loads(proc.stdout)
    if info.get("format") != image.format:
        raise OvaDiskError(f"disk {member.name}: qemu opened it as {info.get('format')!r}, not {image.format}")
    if info.get("backing-filename"):
        raise OvaUnsafeDisk(f"disk {member.name} has a backing file; refused")
    extents = info.get("format-specific", {}).get("data", {}).get("extents")
    if image.format == "vmdk" and extents is not None and len(extents) != 1:
        raise OvaUnsafeDisk(f"disk {member.name} has {len(extents)} extents; only single-extent VMDKs are accepted")
    virtual_size = int(info["virtual-size"])
    if virtual_size > member.disk.capacity:
        raise OvaDiskError(
            f"disk {member.name} holds {virtual_size} bytes of disk but the descriptor declares {member.disk.capacity}"
        )
    check = _check(member, target, size_hint) if image.format in ("qcow2", "vmdk") else "unsupported"
    if size_hint:
        raise OvaDiskError(f"disk {member.name} does not match the descriptor{size_hint}")
    return DiskProbe(member.name, image.format, virtual_size, check, info, image.subformat)
