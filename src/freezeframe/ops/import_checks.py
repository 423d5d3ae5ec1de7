"""Checks of what a package claims, before any of it reaches the hypervisor or a host file is named to boot.

A freezeframe package's section is not signed: anyone who rewrites the manifest can put anything in it. So every
recorded value is held to what libvirt accepts, and a kernel/initrd the package names must be a real one, in a
directory an import may boot from.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from freezeframe.errors import InvalidRequest, OvfInvalidValue, PreflightFailed
from freezeframe.model import DiskSpec, Hardware
from freezeframe.ports import HostCapabilities

BOOT_DIRS_ENV = "FREEZEFRAME_BOOT_DIRS"
DEFAULT_BOOT_DIRS = ("/boot", "/var/lib/libvirt/boot", "/var/lib/libvirt/images")
"""Where an imported package's direct kernel boot may take its kernel/initrd from (plus FREEZEFRAME_HOME)."""

BUSES = ("virtio", "scsi", "sata", "ide", "usb")
TARGET_PREFIX = {"virtio": "vd", "scsi": "sd", "sata": "sd", "usb": "sd", "ide": "hd"}
TARGET_RE = re.compile(r"^(vd|sd|hd)[a-z]{1,3}$")
MACHINE_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ARCH_RE = re.compile(r"^[a-z0-9_]{1,16}$")
NET_RE = re.compile(r"^[^/\x00-\x1f]{1,64}$")
MODEL_RE = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
BRIDGE_RE = re.compile(r"^[A-Za-z0-9._-]{1,15}$")
_SERIAL_RE = re.compile(r"^[A-Za-z0-9_ .+-]{1,64}$")
_BOOT_DEVS = ("hd", "cdrom", "network", "fd")
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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text(value: object, what: str, limit: int = 4096) -> None:
    if value is not None and (not isinstance(value, str) or len(value) > limit or "\0" in value):
        raise OvfInvalidValue(f"the package's {what} is not a string of at most {limit} characters")


def check_hardware(hw: Hardware) -> None:
    """Every value the section recorded, held to what libvirt accepts."""
    if not _is_int(hw.vcpus) or not 1 <= hw.vcpus <= 4096:
        raise OvfInvalidValue(f"the package's machine has {hw.vcpus!r} vCPUs (1-4096 accepted)")
    if not _is_int(hw.memory_kib) or not 1 <= hw.memory_kib <= 64 * 2**30:
        raise OvfInvalidValue(f"the package's machine has {hw.memory_kib!r} KiB of memory (at most 64 TiB)")
    if not isinstance(hw.arch, str) or not ARCH_RE.match(hw.arch):
        raise OvfInvalidValue(f"the package's architecture {hw.arch!r} is not one libvirt knows")
    if hw.machine is not None and (not isinstance(hw.machine, str) or not MACHINE_RE.match(hw.machine)):
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
        if nic.model is not None and not MODEL_RE.match(nic.model):
            raise OvfInvalidValue(f"the package's NIC model {nic.model!r} is not a model name")


def check_disk_spec(spec: DiskSpec) -> None:
    if not isinstance(spec.target, str) or not TARGET_RE.match(spec.target):
        raise OvfInvalidValue(f"the package's disk target {spec.target!r} is not a libvirt disk name (vdX, sdX, hdX)")
    if spec.bus not in BUSES or not spec.target.startswith(TARGET_PREFIX[spec.bus]):
        raise OvfInvalidValue(f"the package's disk {spec.target} is on bus {spec.bus!r}, which does not fit it")
    if spec.boot_order is not None and (not _is_int(spec.boot_order) or not 1 <= spec.boot_order <= 1000):
        raise OvfInvalidValue(f"the package's disk {spec.target} has boot order {spec.boot_order!r}")
    if spec.serial is not None and (not isinstance(spec.serial, str) or not _SERIAL_RE.match(spec.serial)):
        raise OvfInvalidValue(f"the package's disk {spec.target} has serial {spec.serial!r}")


def check_unique_targets(specs: Sequence[DiskSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        if spec.target in seen:
            raise OvfInvalidValue(f"the package attaches two disks as {spec.target}")
        seen.add(spec.target)


def check_vcpus(caps: HostCapabilities, vcpus: int) -> None:
    if caps.max_vcpus and vcpus > caps.max_vcpus:
        raise PreflightFailed(
            f"the package's machine has {vcpus} vCPUs; this host's machine type allows {caps.max_vcpus}"
        )


def check_buses(caps: HostCapabilities, specs: Sequence[DiskSpec]) -> None:
    known = caps.disk_buses
    for spec in specs:
        if known and spec.bus not in known:
            raise PreflightFailed(
                f"disk {spec.target} is on a {spec.bus} bus, which this host's machine type does not offer "
                f"(it has {', '.join(sorted(k for k in known if k))})"
            )


def _looks_like_kernel(head: bytes) -> bool:
    return (
        head[0x202:0x206] == b"HdrS"  # x86 bzImage
        or head.startswith(b"\x7fELF")
        or head[0x38:0x3C] in (b"ARM\x64", b"RSC\x05")  # arm64 / riscv Image
        or head.startswith(b"MZ")  # EFI stub / PE kernels
    )


def find_boot_file(name: object, kind: str, boot_dirs: Sequence[Path]) -> str:
    """The host file an imported machine boots: packages record a bare file name (no host paths leave a host),
    looked up in the directories an import may boot from; an absolute path (older packages) is checked as is."""
    if isinstance(name, str) and name and "/" not in name and "\0" not in name and name not in (".", ".."):
        for directory in boot_dirs:
            candidate = directory / name
            if candidate.is_file():
                check_boot_file(str(candidate), kind, boot_dirs)
                return str(candidate)
        raise PreflightFailed(
            f"the package boots the {kind} {name!r} directly, as its source host did, but no directory an import may "
            f"boot from ({', '.join(map(str, boot_dirs))}) has a file of that name; put the same {kind} in one of "
            f"them (or add its directory to {BOOT_DIRS_ENV}) and import again"
        )
    check_boot_file(name, kind, boot_dirs)
    assert isinstance(name, str)
    return name


def check_boot_file(path: object, kind: str, boot_dirs: Sequence[Path]) -> None:
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
    allowed = [d.resolve() for d in boot_dirs]
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
