"""Helpers shared by the export/import tests: synthetic sets, hostile and foreign packages, the façade under test."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libvirt
import pytest
import typer
from lxml import etree

from freezeframe import wiring
from freezeframe.adapters import libvirt_define as ld
from freezeframe.adapters.ova import open_ova
from freezeframe.adapters.ovf import OvfDisk, build_descriptor, validate_descriptor
from freezeframe.cli_portable import register
from freezeframe.config import Settings
from freezeframe.errors import (
    FreezeframeError,
    OvaDigestMismatch,
    OvaDiskError,
    OvaMissingFile,
    OvaUnsafeMember,
    OvfCapacityError,
    OvfNotOvf,
    OvfUnsafeXml,
)
from freezeframe.model import (
    BootSpec,
    Consistency,
    DiskSpec,
    Hardware,
    Member,
    NicSpec,
    SetStatus,
    SnapshotSet,
)
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import GuestImage

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared" / "ovf"
OVA_SAMPLES = SHARED / "samples" / "ova"
XSD = SHARED / "xsd"
MiB = 1 << 20
LIBVIRT_LOGS = Path("/var/log/libvirt/qemu")
_LEDGER_RE = re.compile(rb"ff-ledger (?:paused |resumed )?i=(\d+)")
PREFIX = "ffpt-"


# ---- helpers ---------------------------------------------------------------------------------------


class Pt:
    """The façade (built by the wiring, as the CLI and API get it) plus the service whose host the tests inspect."""

    def __init__(self, service: Freezeframe, boot_dirs: Sequence[Path]) -> None:
        self.service = service
        self.portable = wiring.portable(service, boot_dirs=boot_dirs)
        self.instances_dir = service.settings.home / "instances"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.portable, name)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def same_data(a: str | Path, b: str | Path) -> bool:
    result = qemu_img("compare", "-U", str(a), str(b))
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def write_pattern(path: Path, pattern: int, offset: int = 0, length: int = MiB, fmt: str = "qcow2") -> None:
    result = subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"write -P {pattern} {offset} {length}", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def domain_exists(conn: Any, name: str) -> bool:
    return bool(ld.name_taken(conn, name))


def xml_of(conn: Any, name: str) -> etree._Element:
    return etree.fromstring(conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())


def disk_rows(root: etree._Element) -> list[tuple[str | None, str | None, str | None]]:
    rows = []
    for el in root.findall("devices/disk"):
        target, boot = el.find("target"), el.find("boot")
        rows.append(
            (
                target.get("dev") if target is not None else None,
                target.get("bus") if target is not None else None,
                boot.get("order") if boot is not None else None,
            )
        )
    return rows


def remove_everything(pt: Pt, names: Sequence[str] = ()) -> None:
    """Whatever a test imported goes, even when the test failed half-way (domains, folders, libvirt logs)."""
    conn = pt.service.hypervisor.conn
    found = set(names)
    if pt.instances_dir.is_dir():
        found |= {p.name for p in pt.instances_dir.iterdir()}
    for name in sorted(found):
        with contextlib.suppress(libvirt.libvirtError, FreezeframeError):
            if domain_exists(conn, name):
                ld.remove_domain(conn, conn.lookupByName(name).UUIDString())
        shutil.rmtree(pt.instances_dir / name, ignore_errors=True)
    # libvirt keeps a log per domain name: drop those of the instances these tests imported and removed.
    if pt.service.hypervisor.uri == "qemu:///system":
        for log in LIBVIRT_LOGS.glob(f"{PREFIX}*.log"):
            if not domain_exists(conn, log.stem):
                log.unlink(missing_ok=True)


def assert_nothing_left(pt: Pt, name: str) -> None:
    assert not domain_exists(pt.service.hypervisor.conn, name), f"{name} was left defined"
    assert not (pt.instances_dir / name).exists(), f"{pt.instances_dir / name} was left behind"
    markers = pt.service.settings.home / "lifecycle"
    assert not markers.exists() or not any(markers.iterdir()), "an operation marker was left"


def guest_boot_dirs(guest: GuestImage) -> list[Path]:
    return [guest.kernel.parent]


def synthetic_hardware(guest: GuestImage, size: int = 8 * MiB) -> Hardware:
    return Hardware(
        vcpus=2,
        memory_kib=192 * 1024,
        arch="x86_64",
        machine="pc",
        boot=BootSpec(kernel=str(guest.kernel), initrd=str(guest.initrd), cmdline="console=ttyS0 ff.workload=idle"),
        disks=(
            DiskSpec("vda", "virtio", "/images/root.qcow2", "qcow2", size, boot_order=1, serial="ROOT"),
            DiskSpec("sda", "scsi", "/images/data.qcow2", "qcow2", size),
            DiskSpec("hdb", "ide", "/images/legacy.qcow2", "qcow2", size),
            DiskSpec("hdc", "ide", "/images/install.iso", "raw", 0, device="cdrom", readonly=True),
        ),
        nics=(NicSpec("52:54:00:aa:bb:cc", "virtio", "user", None),),
        description="exported by the portable tests",
    )


def synthetic_set(
    ff: Freezeframe,
    hardware: Hardware,
    patterns: dict[str, int],
    *,
    size: int = 8 * MiB,
    name: str | None = None,
    instance_name: str = "origin vm",
    instance_uuid: str | None = None,
    backup_type: str | None = None,
    metadata: dict[str, str] | None = None,
) -> SnapshotSet:
    """An available set whose members hold a known pattern, recorded as the flow records one (shared by the
    lifecycle and the export/import tests)."""
    set_id = str(uuid.uuid4())
    folder = ff.repository.root / set_id
    folder.mkdir(parents=True)
    members = []
    for disk in hardware.disks:
        if disk.target not in patterns:
            continue
        path = folder / f"{disk.target}.qcow2"
        assert qemu_img("create", "-q", "-f", "qcow2", str(path), str(size)).returncode == 0
        write_pattern(path, patterns[disk.target])
        members.append(
            Member(
                set_id=set_id, target=disk.target, bus=disk.bus, boot_order=disk.boot_order, virtual_size=size,
                format="qcow2", path=str(path), source_path=disk.source_path,
                sha256=ff.repository.checksum(path), metadata={"freezeframe.set_uuid": set_id},
            )
        )  # fmt: skip
    now = datetime.now(UTC)
    snapshot_set = SnapshotSet(
        id=set_id, name=name or f"synthetic-{set_id[:8]}", instance_name=instance_name,
        instance_uuid=instance_uuid or str(uuid.uuid4()), requested=Consistency.CRASH, status=SetStatus.AVAILABLE,
        created_at=now, completed_at=now, hardware=hardware, achieved=Consistency.CRASH, members=members,
        metadata={"ticket": "42"} if metadata is None else metadata, backup_type=backup_type,
    )  # fmt: skip
    ff.catalog.add_set(snapshot_set)
    ff.repository.write_manifest(snapshot_set)
    return snapshot_set


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path, "r:") as tf:
        return [m.name for m in tf.getmembers()]


def check_package(path: Path, ovf_version: int) -> Any:
    """Our package's layout and descriptor: .ovf first, .mf (OVF 1: SHA-1, 2: SHA-256), disks in References order,
    valid OVF."""
    package = open_ova(path)
    names = tar_members(path)
    assert names[0].endswith(".ovf") and names[1].endswith(".mf")
    assert names[2:] == [f.href for f in package.machine.files]
    assert set(package.verified) == set(names) - {names[1]}
    assert set(package.verified.values()) == {"SHA1" if ovf_version == 1 else "SHA256"}  # what each version expects
    with tarfile.open(path, "r:") as tf:
        infos = tf.getmembers()
    assert all(m.type == tarfile.REGTYPE for m in infos)
    with path.open("rb") as f:
        for info in infos:
            f.seek(info.offset + 257)
            assert f.read(8) == b"ustar\x0000", f"{info.name} has no POSIX ustar header"
    if not XSD.is_dir():
        pytest.skip(f"DMTF OVF schemas not found at {XSD} (shared/ovf/xsd): the descriptor could not be validated")
    validate_descriptor(package.descriptor, ovf_version, XSD)
    return package


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def ff(tmp_path: Path) -> Iterator[Freezeframe]:
    with Freezeframe.open(Settings(home=tmp_path / "ffhome", agent_timeout_s=3)) as service:
        yield service


@pytest.fixture
def pt(ff: Freezeframe, guest_image: GuestImage) -> Iterator[Pt]:
    portable = Pt(ff, guest_boot_dirs(guest_image))
    try:
        yield portable
    finally:
        remove_everything(portable)


def cli_env(home: Path, guest: GuestImage, store: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "FREEZEFRAME_HOME": str(home), "FREEZEFRAME_BOOT_DIRS": str(guest.kernel.parent)}
    env.pop("FREEZEFRAME_IMAGE_STORE", None)
    if store is not None:
        env["FREEZEFRAME_IMAGE_STORE"] = str(store)
    return env


def run_cli(args: Sequence[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The real `freezeframe` command."""
    return subprocess.run(
        [sys.executable, "-m", "freezeframe.cli", *args],
        capture_output=True, text=True, check=False, env=env, timeout=timeout,
    )  # fmt: skip


def cli_app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def rewrite_package(tmp_path: Path, package: Path, old: bytes, new: bytes, name: str) -> Path:
    """Edit the descriptor and re-tar with a fresh, matching manifest (a tamperer who knows the format)."""
    members: list[tuple[str, bytes]] = []
    with tarfile.open(package, "r:") as tf:
        for m in tf.getmembers():
            f = tf.extractfile(m)
            assert f is not None
            members.append((m.name, f.read()))
    ovf = members[0][1].rstrip()
    assert old in ovf
    members[0] = (members[0][0], ovf.replace(old, new))
    manifest = manifest_of({n: d for n, d in members if not n.endswith(".mf")})
    members = [(n, manifest if n.endswith(".mf") else d) for n, d in members]
    return tar_of(tmp_path / name, members)


# ---- hostile packages through import -----------------------------------------------------------------------


def add(tf: tarfile.TarFile, name: str, data: bytes = b"", **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    tf.addfile(info, io.BytesIO(data) if info.isreg() else None)


def tar_of(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            add(tf, name, data)
    return path


def manifest_of(entries: dict[str, bytes]) -> bytes:
    return "".join(f"SHA256({n})= {hashlib.sha256(d).hexdigest()}\n" for n, d in entries.items()).encode()


def small_set() -> SnapshotSet:
    set_id = str(uuid.uuid4())
    hw = Hardware(vcpus=1, memory_kib=131072, arch="x86_64", machine="pc",
                  disks=(DiskSpec("vda", "virtio", "/x/vda.qcow2", "qcow2", 64 * MiB, boot_order=1),))  # fmt: skip
    now = datetime.now(UTC)
    return SnapshotSet(
        id=set_id, name="hostile", instance_name="hostile", instance_uuid=str(uuid.uuid4()),
        requested=Consistency.CRASH, status=SetStatus.AVAILABLE, created_at=now, hardware=hw,
        members=[Member(set_id, "vda", "virtio", 1, 64 * MiB, "qcow2", "/x/vda.qcow2")],
    )  # fmt: skip


def hostile_disk(tmp_path: Path) -> bytes:
    path = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    write_pattern(path, 0x5A)
    return path.read_bytes()


def corrupt_qcow2(disk: bytes) -> bytes:
    """Point the first L2 entry at an unaligned offset past the end: qemu-img check reports corruption."""
    data = bytearray(disk)
    l1 = struct.unpack(">Q", data[40:48])[0]
    l2 = struct.unpack(">Q", data[l1 : l1 + 8])[0] & 0x00FFFFFFFFFFFE00
    data[l2 : l2 + 8] = struct.pack(">Q", (1 << 63) | 0x7FFFF200)
    return bytes(data)


VMDK_EXTENTS = {
    "vmdk-descriptor-absolute": 'RW 128 FLAT "/etc/hostname" 0',
    "vmdk-descriptor-relative": 'RW 128 FLAT "../../../../../../etc/hostname" 0',
    "vmdk-descriptor-device": 'RW 128 FLAT "/dev/zero" 0',
}


def kdmv_with_descriptor(extent: str) -> bytes:
    """Issue 17, item 1: a sparse VMDK header (KDMV) of capacity 0 whose embedded text descriptor names an extent.

    QEMU then treats the embedded descriptor as the image and reads the extent's host file (or device) as the disk.
    """
    descriptor = (
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n'
        f'# Extent description\n{extent}\n\n# The Disk Data Base\n#DDB\nddb.virtualHWVersion = "4"\n'
    ).encode()
    # magic, version, flags, capacity 0, grain 128, descriptor at sector 1 (20 sectors), GTEs, rgd, gd, overhead
    header = struct.pack("<4sIIQQQQIQQQB4sH", b"KDMV", 1, 3, 0, 128, 1, 20, 512, 0, 0, 128, 0, b"\n \r\n", 0)
    return (header.ljust(512, b"\0") + descriptor.ljust(20 * 512, b"\0")).ljust(64 * 1024, b"\0")


def hostile_package(kind: str, tmp_path: Path) -> Path:
    disk = hostile_disk(tmp_path)
    descriptor = build_descriptor(small_set(), [OvfDisk("vda", "d.qcow2", len(disk), "qcow2", 64 * MiB, MiB)])
    path = tmp_path / f"{kind}.ova"
    good = [("x.ovf", descriptor), ("d.qcow2", disk)]
    if kind in ("dotdot", "absolute", "symlink", "hardlink", "device"):
        member = {
            "dotdot": ("../evil.vmdk", {}),
            "absolute": (str(tmp_path.parent / "evil-abs.vmdk"), {}),
            "symlink": ("link.vmdk", {"type": tarfile.SYMTYPE, "linkname": "/etc/shadow"}),
            "hardlink": ("hard.vmdk", {"type": tarfile.LNKTYPE, "linkname": "/etc/shadow"}),
            "device": ("dev.vmdk", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}),
        }[kind]
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for name, data in good:
                add(tf, name, data)
            name, attrs = member
            add(tf, name, b"" if attrs else b"evil", **attrs)
        return path
    if kind == "laughs":
        laughs = b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">'
        laughs += b'<!ENTITY c "&b;&b;&b;&b;&b;&b;">]><Envelope>&c;</Envelope>'
        return tar_of(path, [("x.ovf", laughs), ("d.qcow2", disk)])
    if kind == "external-entity":
        xxe = b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]><Envelope>&x;</Envelope>'
        return tar_of(path, [("x.ovf", xxe), ("d.qcow2", disk)])
    if kind == "manifest-mismatch":
        tampered = bytearray(disk)
        tampered[-1] ^= 0xFF
        mf = manifest_of({"x.ovf": descriptor, "d.qcow2": disk})
        return tar_of(path, [("x.ovf", descriptor), ("x.mf", mf), ("d.qcow2", bytes(tampered))])
    if kind == "truncated":
        cut = disk[: len(disk) // 2 // 512 * 512]
        desc = build_descriptor(small_set(), [OvfDisk("vda", "d.qcow2", len(cut), "qcow2", 64 * MiB, MiB)])
        return tar_of(path, [("x.ovf", desc), ("x.mf", manifest_of({"x.ovf": desc, "d.qcow2": cut})), ("d.qcow2", cut)])
    if kind == "corrupt":
        bad = corrupt_qcow2(disk)
        return tar_of(path, [("x.ovf", descriptor), ("d.qcow2", bad)])
    if kind == "capacity-too-small":
        small = descriptor.replace(b'ovf:capacity="67108864"', b'ovf:capacity="1048576"')
        small = small.replace(b'ovf:populatedSize="1048576"', b'ovf:populatedSize="1024"')
        return tar_of(path, [("x.ovf", small), ("d.qcow2", disk)])
    if kind == "capacity-absurd":
        absurd = descriptor.replace(b'ovf:capacity="67108864"', b'ovf:capacity="%d"' % (128 * 2**40))
        return tar_of(path, [("x.ovf", absurd), ("d.qcow2", disk)])
    if kind == "missing-file":
        return tar_of(path, [("x.ovf", descriptor)])
    if kind in VMDK_EXTENTS:
        vmdk = kdmv_with_descriptor(VMDK_EXTENTS[kind])
        desc = build_descriptor(small_set(), [OvfDisk("vda", "d.vmdk", len(vmdk), "vmdk", 64 * MiB, MiB)])
        return tar_of(path, [("x.ovf", desc), ("x.mf", manifest_of({"x.ovf": desc, "d.vmdk": vmdk})), ("d.vmdk", vmdk)])
    if kind == "not-ovf":
        return tar_of(path, [("x.ovf", b"<html><body>not an ovf</body></html>"), ("d.qcow2", disk)])
    raise AssertionError(kind)


HOSTILE: dict[str, tuple[type[Exception], str]] = {
    "dotdot": (OvaUnsafeMember, r"'\.\.'"),
    "absolute": (OvaUnsafeMember, "absolute"),
    "symlink": (OvaUnsafeMember, "symbolic link"),
    "hardlink": (OvaUnsafeMember, "hard link"),
    "device": (OvaUnsafeMember, "device"),
    "laughs": (OvfUnsafeXml, "DOCTYPE"),
    "external-entity": (OvfUnsafeXml, "DOCTYPE"),
    "manifest-mismatch": (OvaDigestMismatch, r"d\.qcow2"),
    "truncated": (OvaDiskError, "d.qcow2"),
    "corrupt": (OvaDiskError, "corrupt"),
    "capacity-too-small": (OvaDiskError, "declares 1048576"),
    "capacity-absurd": (OvfCapacityError, "64 TiB"),
    "missing-file": (OvaMissingFile, r"d\.qcow2"),
    "not-ovf": (OvfNotOvf, "not an OVF Envelope"),
    **{kind: (OvaDiskError, r"d\.vmdk") for kind in VMDK_EXTENTS},
}


# ---- a foreign package with several controllers --------------------------------------------------------------

FOREIGN_OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
    <File ovf:href="web-disk1.vmdk" ovf:id="file1" ovf:size="{s1}"/>
    <File ovf:href="web-disk2.vmdk" ovf:id="file2" ovf:size="{s2}"/>
    <File ovf:href="web-disk3.vmdk" ovf:id="file3" ovf:size="{s3}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="8" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk2" ovf:fileRef="file2"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="8388608" ovf:diskId="vmdisk3" ovf:fileRef="file3"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="4" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="scratch"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="{net}"><Description>app</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="web">
    <Info>A virtual machine</Info>
    <Name>web</Name>
    <OperatingSystemSection ovf:id="101"><Info>os</Info><Description>Other Linux (64-bit)</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemType>vmx-14</vssd:VirtualSystemType>
      </System>
      <Item><rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits><rasd:ElementName>3 CPUs</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>3</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^30</rasd:AllocationUnits><rasd:ElementName>1 GB</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:ElementName>SCSI 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:Address>1</rasd:Address><rasd:ElementName>IDE 1</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceType>5</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>5</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:ElementName>Hard disk 3</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk3</rasd:HostResource><rasd:InstanceID>6</rasd:InstanceID>
        <rasd:Parent>4</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>2</rasd:AddressOnParent><rasd:ElementName>Hard disk 4</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/scratch</rasd:HostResource><rasd:InstanceID>7</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>1</rasd:AddressOnParent><rasd:ElementName>Hard disk 2</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource><rasd:InstanceID>8</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>7</rasd:AddressOnParent><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>{net}</rasd:Connection><rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>9</rasd:InstanceID><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def foreign_package(tmp_path: Path, network: str) -> tuple[Path, dict[str, Path]]:
    """A VMware-style OVA: 3 streamOptimized disks on SCSI units 0/1 and IDE 1:0, a blank disk on SCSI 2."""
    sources: dict[str, Path] = {}
    files: list[tuple[str, bytes]] = []
    for i, (size, pattern) in enumerate(((16, 0x61), (8, 0x62), (8, 0x63)), start=1):
        src = tmp_path / f"disk{i}.qcow2"
        assert qemu_img("create", "-q", "-f", "qcow2", str(src), f"{size}M").returncode == 0
        write_pattern(src, pattern, offset=MiB * i, length=MiB)
        vmdk = tmp_path / f"web-disk{i}.vmdk"
        converted = qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(src), str(vmdk))
        assert converted.returncode == 0, converted.stderr
        sources[f"vmdisk{i}"] = src
        files.append((vmdk.name, vmdk.read_bytes()))
    descriptor = FOREIGN_OVF.format(s1=len(files[0][1]), s2=len(files[1][1]), s3=len(files[2][1]), net=network)
    ovf = descriptor.encode()
    mf = manifest_of({"web.ovf": ovf, **dict(files)})
    return tar_of(tmp_path / "web.ova", [("web.ovf", ovf), ("web.mf", mf), *files]), sources
