"""Export, image store, import: sets leave as OVA packages and come back as instances.

Three parts. Synthetic sets (qemu-io patterns, domains defined but not booted) pin down the rebuilt hardware,
the data round trip, the store and every failure path. Hostile and third-party packages go through the import
operation and the `import` command: each is imported or refused with a specific one-line error, and nothing is
left in libvirt or on disk. The ``vm`` part exports a real 3-disk set taken under the ledger workload, imports
it with --start (qcow2 and vmdk packages) and checks that the imported guest boots and its ledger holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libvirt
import pytest
import typer
from lxml import etree
from typer.testing import CliRunner

from freezeframe import wiring
from freezeframe.adapters import libvirt_define as ld
from freezeframe.adapters.image_store import DirectoryImageStore, open_image_store
from freezeframe.adapters.ova import open_ova, qemu_json_for
from freezeframe.adapters.ovf import OvfDisk, build_descriptor, validate_descriptor
from freezeframe.cli_portable import register
from freezeframe.config import Settings
from freezeframe.errors import (
    FreezeframeError,
    HypervisorError,
    ImageNotFound,
    InvalidRequest,
    OvaDigestMismatch,
    OvaDiskError,
    OvaMissingFile,
    OvaUnsafeMember,
    OvfCapacityError,
    OvfNotOvf,
    OvfUnsafeXml,
    PreflightFailed,
)
from freezeframe.flow import SnapshotRequest
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
from freezeframe.ops.common import Holds
from freezeframe.ops.import_plan import Planner
from freezeframe.ports import HostCapabilities, ImageRef
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import GuestImage
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance
from freezeframe.testbed.ledger import check_ledger

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared" / "ovf"
OVA_SAMPLES = SHARED / "samples" / "ova"
XSD = SHARED / "xsd"
MiB = 1 << 20
LIBVIRT_LOGS = Path("/var/log/libvirt/qemu")
_LEDGER_RE = re.compile(rb"ff-ledger (?:paused |resumed )?i=(\d+)")
PREFIX = "ffpt-"

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io not installed (package qemu-utils)",
)


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
    ff: Freezeframe, hardware: Hardware, patterns: dict[str, int], *, size: int = 8 * MiB, name: str | None = None
) -> SnapshotSet:
    """An available set whose members hold a known pattern, recorded as the flow records one."""
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
        id=set_id, name=name or f"synthetic-{set_id[:8]}", instance_name="origin vm", instance_uuid=str(uuid.uuid4()),
        requested=Consistency.CRASH, status=SetStatus.AVAILABLE, created_at=now, completed_at=now,
        hardware=hardware, achieved=Consistency.CRASH, members=members, metadata={"ticket": "42"},
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
    if XSD.is_dir():
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


# ---- synthetic sets: export layout, round trip, hardware, failures ------------------------------------


@pytest.mark.parametrize(("disk_format", "ovf_version"), [("qcow2", 1), ("vmdk", 2)])
def test_export_then_import_rebuilds_the_machine_and_its_data(
    ff: Freezeframe, pt: Pt, guest_image: GuestImage, tmp_path: Path, disk_format: str, ovf_version: int
) -> None:
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 0x11, "sda": 0x22, "hdb": 0x33})
    calls: list[tuple[int, int]] = []
    out = tmp_path / "out" / "origin.ova"
    out.parent.mkdir()
    result = pt.export(
        s.name, out, disk_format=disk_format, ovf_version=ovf_version, progress=lambda d, t: calls.append((d, t))
    )
    assert result.path == str(out) and out.stat().st_size == result.size
    assert [d.target for d in result.disks] == ["vda", "sda", "hdb"]
    assert all(d.format == disk_format for d in result.disks)
    assert calls and calls[-1][0] == calls[-1][1]
    assert sorted(p.name for p in out.parent.iterdir()) == ["origin.ova"], "temporary files were left"
    assert out.stat().st_mode & 0o777 == 0o600, "a package holds guest disks: its owner's only"
    package = check_package(out, ovf_version)
    assert package.machine.ovf_version == ovf_version
    assert [d.name for d in package.disks] == [f"origin_vm-{t}.{disk_format}" for t in ("vda", "sda", "hdb")]
    for disk, member in zip(package.disks, s.members, strict=True):
        assert same_data(qemu_json_for(disk), member.path), f"{disk.name} differs from member {member.target}"

    imported = pt.import_package(out, f"{PREFIX}rt-{disk_format}")
    assert imported.origin == "freezeframe" and not imported.started
    assert imported.direct_kernel_boot and imported.machine == "pc"
    assert imported.left_out == {"hdc": "cdrom: not part of a snapshot set"}
    root = xml_of(ff.hypervisor.conn, imported.name)
    assert root.get("type") == "qemu"
    assert root.findtext("vcpu") == "2" and int(root.findtext("memory") or 0) == 192 * 1024
    type_el = root.find("os/type")
    assert type_el is not None and (type_el.get("machine") or "").startswith("pc")
    assert root.findtext("os/kernel") == str(guest_image.kernel)
    assert root.findtext("os/initrd") == str(guest_image.initrd)
    assert root.findtext("os/cmdline") == "console=ttyS0 ff.workload=idle"
    assert root.findtext("description") == "exported by the portable tests"
    assert disk_rows(root) == [("vda", "virtio", "1"), ("sda", "scsi", None), ("hdb", "ide", None)]
    assert root.findtext("devices/disk/serial") == "ROOT"
    assert root.find("devices/controller[@type='scsi'][@model='virtio-scsi']") is not None
    nics = root.findall("devices/interface")
    assert [n.get("type") for n in nics] == ["user"]
    assert (pt.instances_dir / imported.name).stat().st_mode & 0o777 == 0o700
    for disk, member in zip(imported.disks, s.members, strict=True):
        assert Path(disk.path).stat().st_mode & 0o777 == 0o600, f"{disk.path} is readable by others"
        assert Path(disk.path).parent == pt.instances_dir / imported.name
        info = json.loads(qemu_img("info", "--output=json", disk.path).stdout)
        assert info["format"] == "qcow2" and "backing-filename" not in info
        assert same_data(disk.path, member.path), f"{disk.target} differs from its member"
    ff.lifecycle.discard(imported.name)
    assert_nothing_left(pt, imported.name)


def test_sparse_disks_stay_small(ff: Freezeframe, pt: Pt, guest_image: GuestImage, tmp_path: Path) -> None:
    hw = synthetic_hardware(guest_image, size=1024 * MiB)
    s = synthetic_set(ff, hw, {"vda": 0x5A}, size=1024 * MiB)
    for fmt in ("qcow2", "vmdk"):
        result = pt.export(s.id, tmp_path / f"sparse-{fmt}.ova", disk_format=fmt)
        assert result.disks[0].capacity == 1024 * MiB
        assert result.allocated < 8 * MiB, f"{fmt}: a 1 GiB disk with 1 MiB of data took {result.allocated} bytes"


def test_export_refusals(ff: Freezeframe, pt: Pt, guest_image: GuestImage, tmp_path: Path) -> None:
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 1})
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    out = tmp_path / "x.ova"
    out.write_bytes(b"precious")
    with pytest.raises(InvalidRequest, match="already exists; use --force"):
        pt.export(s.id, out)
    assert out.read_bytes() == b"precious"
    result = pt.export(s.id, out, force=True)
    assert out.stat().st_size == result.size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ova"], "the replaced file left a temporary"
    with pytest.raises(InvalidRequest, match="is a directory"):
        pt.export(s.id, tmp_path)
    with pytest.raises(InvalidRequest, match="does not exist"):
        pt.export(s.id, tmp_path / "nowhere" / "x.ova")
    with pytest.raises(InvalidRequest, match="--disk-format"):
        pt.export(s.id, tmp_path / "y.ova", disk_format="vhd")
    with pytest.raises(InvalidRequest, match="--ovf-version"):
        pt.export(s.id, tmp_path / "y.ova", ovf_version=3)
    s.status = SetStatus.FAILED
    ff.catalog.update_set(s)
    with pytest.raises(InvalidRequest, match="failed; only available sets can be exported"):
        pt.export(s.id, tmp_path / "y.ova")
    with pytest.raises(InvalidRequest, match="failed; only available sets"):
        pt.export_to_store(s.id)
    assert not (tmp_path / "y.ova").exists()
    # The CLI refuses contradictory options before touching anything.
    runner = CliRunner()
    home = ["--home", str(ff.settings.home)]
    for args in (["export", s.id, *home], ["export", s.id, "-o", "a.ova", "--to-store", *home],
                 ["export", s.id, "-o", "a.ova", "--name", "n", *home]):  # fmt: skip
        bad = runner.invoke(cli_app(), args)
        assert isinstance(bad.exception, InvalidRequest), bad.output


def test_image_store_round_trip_through_the_cli(
    ff: Freezeframe, pt: Pt, guest_image: GuestImage, tmp_path: Path
) -> None:
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 0x41, "sda": 0x42}, name="nightly")
    runner = CliRunner()
    home = ["--home", str(ff.settings.home)]
    app = cli_app()
    args = ["export", s.id, "--to-store", "--name", "golden", "--disk-format", "vmdk", "--json", *home]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    exported = json.loads(ok.output)
    image = exported["image"]
    assert image["name"] == "golden" and image["source_set_id"] == s.id
    root = ff.settings.home / "images"
    package = root / image["id"] / image["filename"]
    assert package.is_file() and (root / image["id"] / "image.json").is_file()
    assert image["size"] == package.stat().st_size
    assert image["sha256"] == hashlib.sha256(package.read_bytes()).hexdigest()
    summary = image["summary"]
    assert (summary["vcpus"], summary["memory_bytes"], summary["ovf_version"], summary["disk_format"]) == (
        2, 192 * MiB, 1, "vmdk",
    )  # fmt: skip
    assert [(d["target"], d["capacity"]) for d in summary["disks"]] == [("vda", 8 * MiB), ("sda", 8 * MiB)]
    assert [(n["network"], n["model"]) for n in summary["nics"]] == [("user", "virtio")]
    assert not any((root / ".staging").iterdir()), "the export's staging folder was left"

    listed = json.loads(runner.invoke(app, ["images", "list", "--json", *home]).output)
    assert [i["id"] for i in listed] == [image["id"]]
    shown = runner.invoke(app, ["images", "show", image["id"][:8], "--json", *home])
    assert json.loads(shown.output) == image
    human = runner.invoke(app, ["images", "show", "golden", *home])
    assert human.exit_code == 0 and image["sha256"] in human.output and "vda" in human.output
    table = runner.invoke(app, ["images", "list", *home])
    assert table.exit_code == 0 and "golden" in table.output

    # Import by id: the store's record and the package digests are checked, the data is the set's.
    imported = pt.import_package(image["id"], f"{PREFIX}from-store")
    assert imported.image_id == image["id"] and imported.origin == "freezeframe"
    for disk, member in zip(imported.disks, s.members, strict=True):
        assert same_data(disk.path, member.path)
    ff.lifecycle.discard(imported.name)

    # Deleting is refused while an import reads the image; the record and data go together.
    with Holds(ff.locks).hold(f"image-{image['id']}", "test"):
        busy = runner.invoke(app, ["images", "delete", image["id"], *home])
        assert busy.exception is not None and "in use" in str(busy.exception)
    gone = runner.invoke(app, ["images", "delete", "golden", "--json", *home])
    assert gone.exit_code == 0 and json.loads(gone.output)["deleted"] == image["id"]
    assert not (root / image["id"]).exists()
    assert json.loads(runner.invoke(app, ["images", "list", "--json", *home]).output) == []
    with pytest.raises(ImageNotFound, match="no stored image matches"):
        pt.image(image["id"])
    missing = runner.invoke(app, ["import", "golden", "--as", f"{PREFIX}nope", *home])
    assert isinstance(missing.exception, ImageNotFound) and "no file of that name" in str(missing.exception)


def test_store_integrity_and_repair(ff: Freezeframe, pt: Pt, guest_image: GuestImage, tmp_path: Path) -> None:
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 7})
    stored = pt.export_to_store(s.id)
    assert stored.image is not None
    image = stored.image
    assert image.name == s.name and Path(image.location).is_file()
    # A package changed in the store is refused before anything is made.
    package = Path(image.location)
    data = bytearray(package.read_bytes())
    data[-2000] ^= 0xFF
    package.write_bytes(bytes(data))
    with pytest.raises(OvaDigestMismatch, match="changed or damaged in the store"):
        pt.import_package(image.id, f"{PREFIX}tampered")
    assert_nothing_left(pt, f"{PREFIX}tampered")
    # Leftovers of killed processes go; an interrupted delete is finished.
    store = pt.store
    assert isinstance(store, DirectoryImageStore)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (store.root / ".staging" / f"{'0' * 12}-{dead.pid}").mkdir(parents=True)
    (store.root / f".put-{uuid.uuid4()}-{dead.pid}").mkdir()
    store.records.mark(image.id, "deleting")
    reports = pt.repair()
    assert len(reports) == 3, reports
    assert not (store.root / image.id).exists()
    assert sorted(p.name for p in store.root.iterdir()) == [".staging"]
    assert not any((store.root / ".staging").iterdir())
    assert pt.images() == []
    # The store location is configurable; other backends are named and refused clearly.
    other = open_image_store(ff.settings.home, ff.catalog, f"file://{tmp_path / 'elsewhere'}")
    assert isinstance(other, DirectoryImageStore) and other.root == tmp_path / "elsewhere"
    with pytest.raises(InvalidRequest, match="not available yet"):
        open_image_store(ff.settings.home, ff.catalog, "s3://bucket/images")


def test_import_failures_leave_nothing_behind(
    ff: Freezeframe, pt: Pt, guest_image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = ff.hypervisor.conn
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 1, "sda": 2, "hdb": 3})
    ova = tmp_path / "good.ova"
    pt.export(s.id, ova)

    taken = pt.import_package(ova, f"{PREFIX}taken")
    with pytest.raises(InvalidRequest, match=f"^an instance named '{PREFIX}taken' already exists; choose another"):
        pt.import_package(ova, f"{PREFIX}taken")
    assert domain_exists(conn, f"{PREFIX}taken") and (pt.instances_dir / taken.name).is_dir()
    with pytest.raises(InvalidRequest, match="not usable"):
        pt.import_package(ova, "../escape")

    leftover = pt.instances_dir / f"{PREFIX}leftover"
    leftover.mkdir()
    (leftover / "keep").write_text("mine")
    with pytest.raises(InvalidRequest, match="already exists"):
        pt.import_package(ova, f"{PREFIX}leftover")
    assert (leftover / "keep").read_text() == "mine"
    shutil.rmtree(leftover)

    with pytest.raises(InvalidRequest, match="ff-no-such-net"):
        pt.import_package(ova, f"{PREFIX}nonet", network="ff-no-such-net")
    assert_nothing_left(pt, f"{PREFIX}nonet")

    # Start fails after the disks were made and the domain defined: all of it is undone.
    def refuse(dom: Any) -> None:
        raise HypervisorError(f"{dom.name()} was defined but did not start: test")

    monkeypatch.setattr(ld, "start", refuse)
    with pytest.raises(HypervisorError, match="did not start"):
        pt.import_package(ova, f"{PREFIX}nostart", start=True)
    assert_nothing_left(pt, f"{PREFIX}nostart")
    monkeypatch.undo()

    # The second disk's conversion fails: the first one's file goes with the folder.
    real_convert = ff.images.convert
    count = 0

    def flaky(source: ImageRef, target: ImageRef, **kwargs: Any) -> None:
        nonlocal count
        count += 1
        if count == 2:
            raise HypervisorError(f"copying {source.path} to {target.path} failed: injected")
        real_convert(source, target, **kwargs)

    monkeypatch.setattr(ff.images, "convert", flaky)
    with pytest.raises(HypervisorError, match="injected"):
        pt.import_package(ova, f"{PREFIX}halfway")
    assert_nothing_left(pt, f"{PREFIX}halfway")
    monkeypatch.undo()

    # Our own package names files to boot (by file name: no host path leaves the host) and a machine type:
    # checked before anything is made. (Absolute paths of older packages: tests/test_ops_import.py.)
    cases: list[tuple[Hardware, type[Exception], str]] = [
        (
            replace(s.hardware, boot=BootSpec(kernel="/nonexistent/vmlinuz-not-here")),
            PreflightFailed,
            "no directory an import may boot from",
        ),
        (replace(s.hardware, machine="pc-i440fx-99.9"), PreflightFailed, "machine type pc-i440fx-99.9"),
    ]
    for i, (hardware, error, match) in enumerate(cases):
        path = tmp_path / f"bad-{i}.ova"
        pt.export(synthetic_set(ff, hardware, {"vda": 1}).id, path)
        with pytest.raises(error, match=match):
            pt.import_package(path, f"{PREFIX}bad-{i}")
        assert_nothing_left(pt, f"{PREFIX}bad-{i}")
    # The section is not signed: someone who re-writes the manifest can put anything in it.
    edited = rewrite_package(
        tmp_path, ova, b"&quot;vcpus&quot;:2", b"&quot;vcpus&quot;:&quot;2; rm -rf /&quot;", "edited.ova"
    )
    with pytest.raises(InvalidRequest, match="vCPUs"):
        pt.import_package(edited, f"{PREFIX}edited")
    assert_nothing_left(pt, f"{PREFIX}edited")
    # The boot-file check looks at the content too, wherever the allowed directories are.
    fake = tmp_path / "boot" / "vmlinuz"
    fake.parent.mkdir()
    fake.write_bytes(b"not a kernel" * 100)
    fake_hw = Hardware(**{**vars(s.hardware), "boot": BootSpec(kernel=str(fake))})
    pt.export(synthetic_set(ff, fake_hw, {"vda": 1}).id, tmp_path / "fake.ova")
    permissive = wiring.portable(ff, boot_dirs=[fake.parent])
    with pytest.raises(InvalidRequest, match="does not look like a kernel"):
        permissive.import_package(tmp_path / "fake.ova", f"{PREFIX}fake")
    assert_nothing_left(pt, f"{PREFIX}fake")


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


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_packages_are_refused_by_import(kind: str, pt: Pt, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    package = hostile_package(kind, work)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    error, match = HOSTILE[kind]
    name = f"{PREFIX}hostile-{kind}"
    with pytest.raises(error, match=match) as caught:
        pt.import_package(package, name)
    assert isinstance(caught.value, InvalidRequest) and "\n" not in str(caught.value)
    assert_nothing_left(pt, name)
    after = sorted(p.relative_to(work) for p in work.rglob("*"))
    assert after == before, f"the import wrote files: {set(after) - set(before)}"
    assert not (tmp_path / "evil.vmdk").exists() and not (tmp_path / "evil-abs.vmdk").exists()
    assert not pt.instances_dir.exists() or not any(pt.instances_dir.iterdir())


def test_hostile_package_through_the_command_is_one_line(
    ff: Freezeframe, guest_image: GuestImage, tmp_path: Path, libvirt_conn: Any
) -> None:
    env = cli_env(ff.settings.home, guest_image)
    for kind in ("symlink", "laughs", "corrupt"):
        package = hostile_package(kind, tmp_path)
        done = run_cli(["import", str(package), "--as", f"{PREFIX}cli-{kind}"], env)
        assert done.returncode == 3, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("freezeframe: error: "), done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
        assert not domain_exists(libvirt_conn, f"{PREFIX}cli-{kind}")
        assert not (ff.settings.home / "instances" / f"{PREFIX}cli-{kind}").exists()


# ---- third-party packages ------------------------------------------------------------------------------------

SAMPLE_EXPECTATIONS: dict[str, tuple[int, str]] = {
    "cot_ubuntu2.0.ova": (0, "imported"),
    "glance__testserver.ova": (3, "is 4 bytes: too small to be a vmdk image"),
    "govmomi__ttylinux-pc_i486-16.1.ova": (3, "Invalid footer"),
}


def test_every_sample_ova_has_an_expectation() -> None:
    if not OVA_SAMPLES.is_dir():
        pytest.skip(f"shared OVA samples not found at {OVA_SAMPLES}")
    assert sorted(p.name for p in OVA_SAMPLES.glob("*.ova")) == sorted(SAMPLE_EXPECTATIONS)


@pytest.mark.parametrize("sample", sorted(SAMPLE_EXPECTATIONS))
def test_sample_ovas_through_the_import_command(
    sample: str, ff: Freezeframe, pt: Pt, guest_image: GuestImage, libvirt_conn: Any
) -> None:
    path = OVA_SAMPLES / sample
    if not path.is_file():
        pytest.skip(f"shared OVA sample {path} not found")
    name = f"{PREFIX}sample-{sample.split('_')[0]}"
    code, expected = SAMPLE_EXPECTATIONS[sample]
    done = run_cli(["import", str(path), "--as", name], cli_env(ff.settings.home, guest_image))
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    if code != 0:
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], done.stderr
        assert_nothing_left(pt, name)
        return
    assert f"instance {name}" in done.stdout and "(foreign)" in done.stdout
    assert "libvirt network 'NAT' does not exist here; it uses user-mode networking" in done.stderr
    root = xml_of(libvirt_conn, name)
    assert root.get("type") == "qemu"
    assert root.findtext("vcpu") == "1" and int(root.findtext("memory") or 0) == 512 * 1024
    type_el = root.find("os/type")
    assert type_el is not None and (type_el.get("machine") or "").startswith("pc")
    assert root.find("os/kernel") is None and root.find("os").get("firmware") is None  # type: ignore[union-attr]
    assert disk_rows(root) == [("sda", "sata", "1")]
    nic = root.find("devices/interface")
    assert nic is not None and nic.get("type") == "user"
    assert nic.find("model").get("type") == "e1000"  # type: ignore[union-attr]
    disk = pt.instances_dir / name / "sda.qcow2"
    info = json.loads(qemu_img("info", "--output=json", str(disk)).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 8 * 2**30
    assert disk.stat().st_blocks * 512 < 16 * MiB, "the empty 8 GiB disk was not kept sparse"
    ff.lifecycle.discard(name)
    assert_nothing_left(pt, name)


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


def test_foreign_package_hardware_is_mapped(ff: Freezeframe, pt: Pt, tmp_path: Path, libvirt_conn: Any) -> None:
    package, sources = foreign_package(tmp_path, "VM Network")
    result = pt.import_package(package, f"{PREFIX}foreign")
    assert result.origin == "foreign" and result.vcpus == 3 and result.memory_kib == 1024 * 1024
    assert result.firmware == "efi" and result.machine == "pc" and not result.direct_kernel_boot
    assert any("'VM Network' does not exist here" in w for w in result.warnings), result.warnings
    root = xml_of(libvirt_conn, result.name)
    # Targets follow controller/unit addresses, whatever the item order; the descriptor's first disk boots.
    assert [(d.target, d.bus) for d in result.disks] == [
        ("sda", "scsi"),
        ("hda", "ide"),
        ("sdc", "scsi"),
        ("sdb", "scsi"),
    ]
    assert sorted(disk_rows(root)) == [("hda", "ide", None), ("sda", "scsi", "1"), ("sdb", "scsi", None),
                                       ("sdc", "scsi", None)]  # fmt: skip
    assert root.find("devices/controller[@type='scsi'][@model='virtio-scsi']") is not None
    assert root.find("os").get("firmware") == "efi"  # type: ignore[union-attr]
    nic = root.find("devices/interface")
    assert nic is not None and nic.get("type") == "user" and nic.find("model").get("type") == "vmxnet3"  # type: ignore[union-attr]
    by_target = {d.target: d for d in result.disks}
    assert same_data(by_target["sda"].path, sources["vmdisk1"])
    assert same_data(by_target["sdb"].path, sources["vmdisk2"])
    assert same_data(by_target["hda"].path, sources["vmdisk3"])
    assert by_target["sdc"].source == "blank"
    scratch = json.loads(qemu_img("info", "--output=json", by_target["sdc"].path).stdout)
    assert scratch["virtual-size"] == 4 * MiB
    ff.lifecycle.discard(result.name)
    assert_nothing_left(pt, result.name)


def test_nics_go_to_a_network_of_the_same_name_when_there_is_one(
    ff: Freezeframe, pt: Pt, tmp_path: Path, libvirt_conn: Any
) -> None:
    """An active network is used as is; an inactive one falls back with a warning, and --network must be usable."""

    class Host:
        def capabilities(self, arch: str, machine: str | None, domain_type: str) -> HostCapabilities:
            return HostCapabilities(efi=False, max_vcpus=None, disk_buses=frozenset())

        def network_state(self, name: str) -> str:
            return "active"

        def bridge_exists(self, name: str) -> bool:
            return False

    warnings: list[str] = []
    nic = Planner(Host(), "qemu", []).map_nic("network", "backend", "e1000", warnings)
    assert (nic.source_type, nic.source, nic.model, warnings) == ("network", "backend", "e1000", [])

    name = f"{PREFIX}net-{uuid.uuid4().hex[:6]}"
    net = libvirt_conn.networkDefineXML(f"<network><name>{name}</name><bridge name='ffptbr{name[-4:]}'/></network>")
    try:
        package, _ = foreign_package(tmp_path, name)
        with pytest.raises(InvalidRequest, match="is not active"):
            pt.import_package(package, f"{PREFIX}on-net", network=name)
        assert_nothing_left(pt, f"{PREFIX}on-net")
        result = pt.import_package(package, f"{PREFIX}on-net")
        assert any(f"{name!r} is not active" in w for w in result.warnings), result.warnings
        ff.lifecycle.discard(result.name)
    finally:
        net.undefine()


# ---- real guests ------------------------------------------------------------------------------------------

LEDGER_DISKS = [DiskRequest(64 * MiB), DiskRequest(64 * MiB), DiskRequest(64 * MiB)]


@pytest.fixture(scope="module")
def ledger_vm(
    libvirt_conn: Any, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestInstance]:
    workdir = tmp_path_factory.mktemp("portable-guest")
    with running_instance(
        libvirt_conn, disks=LEDGER_DISKS, workload="ledger", workdir=workdir, guest=guest_image,
        name_prefix="ffpt", vcpus=2, memory_mib=288,
    ) as inst:  # fmt: skip
        yield inst


@pytest.fixture(scope="module")
def shared(
    ledger_vm: TestInstance, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Pt, SnapshotSet]]:
    """One filesystem-consistent 3-disk set of the ledger guest, shared by the VM tests (one home)."""
    home = tmp_path_factory.mktemp("portable-home")
    with Freezeframe.open(Settings(home=home, agent_timeout_s=5)) as service:
        portable = Pt(service, guest_boot_dirs(guest_image))
        try:
            s = service.snapshot(SnapshotRequest(ledger_vm.name, Consistency.FILESYSTEM, require=True))
            yield portable, s
        finally:
            remove_everything(portable)


def wait_agent(pt: Pt, name: str, timeout_s: float = 180) -> float:
    started = time.monotonic()
    hypervisor = pt.service.hypervisor
    while True:
        try:
            hypervisor.agent_ping(hypervisor.lookup(name))
            return time.monotonic() - started
        except FreezeframeError:
            if time.monotonic() - started > timeout_s:
                raise
            time.sleep(0.5)


def ledger_progress(console: Path) -> int | None:
    found = _LEDGER_RE.findall(console.read_bytes()) if console.exists() else []
    return int(found[-1]) if found else None


def ledger_start(console: Path) -> int | None:
    found = re.findall(rb"ff-ledger start i=(\d+)", console.read_bytes()) if console.exists() else []
    return int(found[-1]) if found else None


def wait_ledger(console: Path, after: int, timeout_s: float = 90) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = ledger_progress(console)
        if now is not None and now > after:
            return now
        time.sleep(0.3)
    raise AssertionError(f"the imported guest's ledger did not pass {after}: {console.read_text()[-800:]}")


def boot_and_check(pt: Pt, s: SnapshotSet, name: str, disks: dict[str, str], ledger_vm: TestInstance) -> None:
    """The imported guest answers its agent, resumes the ledger, shuts down cleanly, and its ledger holds."""
    conn = pt.service.hypervisor.conn
    took = wait_agent(pt, name)
    members = {m.target: m.path for m in s.members}
    before = check_ledger(Path(members["vdb"]), Path(members["vdc"]))
    assert before.ok and before.state is not None, before
    root = xml_of(conn, name)
    assert root.findtext("vcpu") == str(s.hardware.vcpus) == "2"
    assert int(root.findtext("memory") or 0) == s.hardware.memory_kib == 288 * 1024
    assert [r[0] for r in disk_rows(root)] == [d.target for d in s.hardware.disks] == ["vda", "vdb", "vdc"]
    assert [r[1] for r in disk_rows(root)] == ["virtio"] * 3
    assert root.findtext("os/cmdline") == s.hardware.boot.cmdline
    console = pt.instances_dir / name / "console.log"
    progressed = wait_ledger(console, before.state)
    assert ledger_start(console) == (before.last_journal or 0) + 1, "it did not boot from the set's data"
    dom = conn.lookupByName(name)
    assert ld.shutdown_via_agent(dom, 90), "the imported guest did not shut down through its agent"
    after = check_ledger(Path(disks["vdb"]), Path(disks["vdc"]))
    assert after.ok, after
    assert after.state is not None and after.state >= progressed > before.state
    print(f"{name}: agent {took:.1f}s after start, ledger {before.state} -> {after.state}")


@pytest.mark.vm
def test_export_and_import_of_a_real_set_boots(
    shared: tuple[Pt, SnapshotSet], ledger_vm: TestInstance, tmp_path: Path
) -> None:
    pt, s = shared
    assert [m.target for m in s.members] == ["vda", "vdb", "vdc"]
    out = tmp_path / "ledger.ova"
    result = pt.export(s.id, out)
    data = sum(Path(m.path).stat().st_size for m in s.members)
    started = time.monotonic()
    for m in s.members:
        shutil.copyfile(m.path, tmp_path / f"copy-{m.target}")
    copy_s = time.monotonic() - started
    print(
        f"export qcow2: {result.size / MiB:.1f} MiB package in {result.seconds:.2f}s "
        f"({data / MiB / max(result.seconds, 1e-3):.0f} MiB/s of member files); plain copy {copy_s:.2f}s"
    )
    check_package(out, 1)
    name = f"{PREFIX}ledger-qcow2"
    imported = pt.import_package(out, name, start=True)
    assert imported.started and imported.origin == "freezeframe" and imported.direct_kernel_boot
    boot_and_check(pt, s, name, {d.target: d.path for d in imported.disks}, ledger_vm)
    pt.service.lifecycle.discard(name)
    assert_nothing_left(pt, name)


@pytest.mark.vm
def test_vmdk_export_and_import_through_the_command_boots(
    shared: tuple[Pt, SnapshotSet], ledger_vm: TestInstance, guest_image: GuestImage, tmp_path: Path
) -> None:
    pt, s = shared
    out = tmp_path / "ledger-vmdk.ova"
    env = cli_env(pt.service.settings.home, guest_image)
    done = run_cli(["export", s.id, "-o", str(out), "--disk-format", "vmdk", "--ovf-version", "2", "--json"], env)
    assert done.returncode == 0, done.stderr
    exported = json.loads(done.stdout)
    started = time.monotonic()
    for m in s.members:
        argv = ["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", m.path, str(tmp_path / f"{m.target}.vmdk")]
        assert qemu_img(*argv).returncode == 0
    reference = time.monotonic() - started
    data = sum(m.virtual_size for m in s.members)
    print(
        f"export vmdk: {exported['seconds']:.2f}s for {data / MiB:.0f} MiB of disks "
        f"({data / MiB / max(exported['seconds'], 1e-3):.0f} MiB/s) vs qemu-img convert alone {reference:.2f}s"
    )
    package = check_package(out, 2)
    for disk, member in zip(package.disks, s.members, strict=True):
        assert disk.format == "vmdk" and same_data(qemu_json_for(disk), member.path)
    name = f"{PREFIX}ledger-vmdk"
    done = run_cli(["import", str(out), "--as", name, "--start", "--json"], env)
    assert done.returncode == 0, done.stderr
    imported = json.loads(done.stdout)
    assert imported["started"] and imported["origin"] == "freezeframe"
    boot_and_check(pt, s, name, {d["target"]: d["path"] for d in imported["disks"]}, ledger_vm)
    pt.service.lifecycle.discard(name)
    assert_nothing_left(pt, name)


@pytest.mark.vm
def test_store_round_trip_of_the_real_set(
    shared: tuple[Pt, SnapshotSet], guest_image: GuestImage, libvirt_conn: Any
) -> None:
    pt, s = shared
    env = cli_env(pt.service.settings.home, guest_image)
    done = run_cli(["export", s.name, "--to-store", "--name", "ledger-golden", "--json"], env)
    assert done.returncode == 0, done.stderr
    image = json.loads(done.stdout)["image"]
    listed = json.loads(run_cli(["images", "list", "--json"], env).stdout)
    assert image["id"] in [i["id"] for i in listed]
    shown = json.loads(run_cli(["images", "show", image["id"], "--json"], env).stdout)
    assert shown["source_set_id"] == s.id and shown["sha256"] == image["sha256"]
    assert [d["target"] for d in shown["summary"]["disks"]] == ["vda", "vdb", "vdc"]
    name = f"{PREFIX}ledger-store"
    done = run_cli(["import", image["id"], "--as", name, "--json"], env)
    assert done.returncode == 0, done.stderr
    imported = json.loads(done.stdout)
    assert imported["image_id"] == image["id"] and not imported["started"]
    members = {m.target: m.path for m in s.members}
    for disk in imported["disks"]:
        assert same_data(disk["path"], members[disk["target"]])
    pt.service.lifecycle.discard(name)
    assert not domain_exists(libvirt_conn, name)
    done = run_cli(["images", "delete", image["id"]], env)
    assert done.returncode == 0, done.stderr
    assert image["id"] not in [i["id"] for i in json.loads(run_cli(["images", "list", "--json"], env).stdout)]
    assert not (pt.service.settings.home / "images" / image["id"]).exists()
