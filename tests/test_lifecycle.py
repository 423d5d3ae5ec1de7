"""Set lifecycle: restore, single-volume extract, revert, delete, backup rotation and verify.

Two halves. The first works on small synthetic sets (member images written with qemu-io) and defines real
libvirt domains without booting them: it pins down the rebuilt hardware and every failure path quickly. The
second (``vm``) runs on a real 3-disk guest under the ledger workload: restored instances boot, their agent
answers, the ledger invariant holds on their disks, and their data equals the members'. After every test the
catalog, the repository, the instance folders and libvirt must agree (``assert_consistent``).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import libvirt
import pytest
import typer
from lxml import etree
from typer.testing import CliRunner

import portable_support
from freezeframe import wiring
from freezeframe.adapters import libvirt_define as ld
from freezeframe.adapters.host_fs import HostTools
from freezeframe.cli_lifecycle import register
from freezeframe.config import Settings
from freezeframe.errors import (
    ConsistencyUnavailable,
    FreezeframeError,
    HypervisorError,
    InstanceBusy,
    InvalidRequest,
    PreflightFailed,
    SetHasDependants,
    VerifyFailed,
)
from freezeframe.flow import SnapshotRequest
from freezeframe.lifecycle import COW, FULL
from freezeframe.model import (
    BootSpec,
    Consistency,
    DiskSpec,
    Hardware,
    NicSpec,
    SetStatus,
    SnapshotSet,
)
from freezeframe.ops.instances import InstanceBuilder
from freezeframe.ports import MANIFEST
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import GuestImage
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance
from freezeframe.testbed.ledger import check_ledger

MiB = 1 << 20
META_NS = "urn:freezeframe-test:app"
META_XML = f'<metadata><app:tier xmlns:app="{META_NS}">front</app:tier></metadata>'
LIBVIRT_LOGS = Path("/var/log/libvirt/qemu")
_LEDGER_RE = re.compile(rb"ff-ledger (?:paused |resumed )?i=(\d+)")


# ---- helpers ---------------------------------------------------------------------------------------


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def qemu_info(path: str | Path) -> dict[str, Any]:
    result = qemu_img("info", "-U", "--output=json", str(path))
    assert result.returncode == 0, result.stderr
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def backing_file(path: str | Path) -> str | None:
    backing = qemu_info(path).get("full-backing-filename")
    return str(Path(backing).resolve()) if backing else None


def probe_filesystems(raw: Path) -> list[Any]:
    return HostTools().probe(raw)


class LC:
    """``ff.lifecycle`` plus the parts of the home these tests look at."""

    def __init__(self, service: Freezeframe) -> None:
        self.service = service
        self.instances_dir = service.parts.instances_dir
        self.verify_dir = service.parts.verify_dir
        self.markers_dir = service.parts.markers.directory
        self.restores = service.parts.restores

    def __getattr__(self, name: str) -> Any:
        return getattr(self.service.lifecycle, name)

    def _write_marker(self, kind: str, key: str, data: dict[str, Any]) -> Path:
        return self.service.parts.markers.write(kind, key, data)


def same_data(a: str | Path, b: str | Path) -> bool:
    """qemu-img compare: 0 identical guest-visible content, 1 different."""
    result = qemu_img("compare", "-U", str(a), str(b))
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def write_pattern(path: Path, pattern: int, offset: int = 0, length: int = MiB) -> None:
    result = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def domain_exists(conn: Any, name: str) -> bool:
    return bool(ld.name_taken(conn, name))


def assert_consistent(lc: LC) -> None:
    """Catalog rows, repository folders, restored-instance folders and libvirt tell the same story."""
    ff = lc.service
    sets = ff.catalog.list_sets()
    ids = {s.id for s in sets}
    for s in sets:
        assert s.status in (SetStatus.AVAILABLE, SetStatus.FAILED), f"set {s.id} left {s.status}"
        folder = ff.repository.root / s.id
        if s.status is SetStatus.AVAILABLE:
            assert folder.is_dir(), f"available set {s.id} has no data"
            for m in s.members:
                assert Path(m.path).is_file(), f"member {m.target} of {s.id} is missing"
        else:
            assert not folder.exists(), f"failed set {s.id} still has data"
    for folder in ff.repository.root.iterdir():
        assert folder.name in ids, f"repository folder {folder} has no catalog row"
    conn = ff.hypervisor.conn
    if lc.instances_dir.is_dir():
        for folder in lc.instances_dir.iterdir():
            assert domain_exists(conn, folder.name), f"{folder} belongs to no defined instance"
    for row in lc.restores.all():
        assert Path(row.path).is_file(), f"restore row for {row.path} points at nothing"
        assert row.instance_uuid and ld.lookup_uuid(conn, row.instance_uuid) is not None, row
    assert not lc.verify_dir.exists() or not any(lc.verify_dir.iterdir()), "a verify clone was left"
    assert not lc.markers_dir.exists() or not any(lc.markers_dir.iterdir()), "an operation marker was left"


def synthetic_set(ff: Freezeframe, hardware: Hardware, patterns: dict[str, int], **kwargs: Any) -> SnapshotSet:
    """The shared synthetic set, as the lifecycle tests record it: instance "origin", no user metadata."""
    return portable_support.synthetic_set(ff, hardware, patterns, instance_name="origin", metadata={}, **kwargs)


def synthetic_hardware(guest: GuestImage, nics: tuple[NicSpec, ...] | None = None) -> Hardware:
    return Hardware(
        vcpus=2,
        memory_kib=192 * 1024,
        arch="x86_64",
        machine="pc",
        boot=BootSpec(kernel=str(guest.kernel), initrd=str(guest.initrd), cmdline="console=ttyS0 ff.workload=idle"),
        disks=(
            DiskSpec("vda", "virtio", "/images/root.qcow2", "qcow2", 8 * MiB, boot_order=1, serial="ROOT"),
            DiskSpec("vdb", "virtio", "/images/data.raw", "raw", 8 * MiB, boot_order=2),
            DiskSpec("hdb", "ide", "/images/legacy.qcow2", "qcow2", 8 * MiB),
            DiskSpec("hdc", "ide", "/images/install.iso", "raw", 0, device="cdrom", readonly=True),
        ),
        nics=nics if nics is not None else (NicSpec("52:54:00:aa:bb:cc", "virtio", "user", None),),
        description="restored by the lifecycle tests",
        metadata_xml=META_XML,
    )


@pytest.fixture
def ff(tmp_path: Path) -> Iterator[Freezeframe]:
    options = wiring.LifecycleOptions(boot_timeout_s=90, shutdown_timeout_s=30)
    with wiring.open_service(Settings(home=tmp_path / "ffhome", agent_timeout_s=3), options) as service:
        yield service


@pytest.fixture
def lc(ff: Freezeframe) -> Iterator[LC]:
    lifecycle = LC(ff)
    try:
        yield lifecycle
    finally:
        _discard_all(lifecycle)


def _discard_all(lifecycle: LC) -> None:
    """Whatever a test restored goes, even when the test failed half-way."""
    names = {r.instance_name for r in lifecycle.restores.all()}
    if lifecycle.instances_dir.is_dir():
        names |= {p.name for p in lifecycle.instances_dir.iterdir()}
    for name in sorted(names):
        with contextlib.suppress(FreezeframeError, libvirt.libvirtError):
            lifecycle.discard(name)
        with contextlib.suppress(libvirt.libvirtError, HypervisorError):
            conn = lifecycle.service.hypervisor.conn
            if domain_exists(conn, name):
                ld.remove_domain(conn, conn.lookupByName(name).UUIDString())
    # libvirt keeps a log per domain name: drop those of the instances these tests restored and removed.
    conn = lifecycle.service.hypervisor.conn
    for log in [*LIBVIRT_LOGS.glob("ff-lc-*.log"), *LIBVIRT_LOGS.glob("fflc-*.log")]:
        if not domain_exists(conn, log.stem):
            log.unlink(missing_ok=True)


def _disk_summary(el: etree._Element) -> dict[str, str | None]:
    target, boot = el.find("target"), el.find("boot")
    return {
        "dev": target.get("dev") if target is not None else None,
        "bus": target.get("bus") if target is not None else None,
        "boot": boot.get("order") if boot is not None else None,
    }


def _xml(conn: Any, name: str) -> etree._Element:
    return etree.fromstring(conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())


# ---- synthetic sets: hardware, data, failure paths (no guest boots) ----------------------------------


def test_restore_rebuilds_the_recorded_hardware(ff: Freezeframe, lc: LC, guest_image: GuestImage) -> None:
    hardware = synthetic_hardware(guest_image)
    s = synthetic_set(ff, hardware, {"vda": 0x11, "vdb": 0x22, "hdb": 0x33})
    result = lc.restore(s.name, "ff-lc-hw")
    assert result.mode == COW and not result.started
    assert [d.target for d in result.disks] == ["vda", "vdb", "hdb"]
    assert result.left_out == {"hdc": "cdrom: not part of a snapshot set"}
    root = _xml(ff.hypervisor.conn, "ff-lc-hw")
    assert root.get("type") == "qemu"
    assert root.findtext("vcpu") == "2"
    assert int(root.findtext("memory") or 0) == 192 * 1024
    type_el = root.find("os/type")
    assert type_el is not None and type_el.get("arch") == "x86_64"
    assert (type_el.get("machine") or "").startswith("pc")
    assert root.findtext("os/kernel") == str(guest_image.kernel)
    assert root.findtext("os/initrd") == str(guest_image.initrd)
    assert root.findtext("os/cmdline") == "console=ttyS0 ff.workload=idle"
    disks = [(d.get("dev"), d.get("bus"), d.get("boot")) for d in map(_disk_summary, root.findall("devices/disk"))]
    assert disks == [("vda", "virtio", "1"), ("vdb", "virtio", "2"), ("hdb", "ide", None)]
    assert root.findtext("devices/disk/serial") == "ROOT"
    nics = root.findall("devices/interface")
    assert len(nics) == 1 and nics[0].get("type") == "user"
    mac = nics[0].find("mac")
    assert mac is not None and mac.get("address") != "52:54:00:aa:bb:cc"
    assert root.findtext("description") == "restored by the lifecycle tests"
    assert root.find(f"metadata/{{{META_NS}}}tier") is not None
    assert root.findtext(f"metadata/{{{META_NS}}}tier") == "front"
    channel = root.find("devices/channel/target")
    assert channel is not None and channel.get("name") == ld.AGENT_CHANNEL
    for disk, member in zip(result.disks, s.members, strict=True):
        assert Path(disk.path).parent == lc.instances_dir / "ff-lc-hw"
        assert backing_file(disk.path) == str(Path(member.path).resolve())
        info = ld_info(disk.path)
        assert info["format"] == "qcow2" and info["backing-filename-format"] == "qcow2"
        assert same_data(disk.path, member.path)
    assert {r.target for r in lc.restores.for_set(s.id)} == {"vda", "vdb", "hdb"}
    assert all(r.instance_uuid == result.uuid and r.mode == COW for r in lc.restores.for_set(s.id))
    assert_consistent(lc)


def ld_info(path: str) -> dict[str, Any]:
    return qemu_info(path)


def test_two_restores_are_independent_and_full_copies_stand_alone(
    ff: Freezeframe, lc: LC, guest_image: GuestImage
) -> None:
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 0x11, "vdb": 0x22, "hdb": 0x33})
    one = lc.restore(s.id, "ff-lc-one")
    two = lc.restore(s.id, "ff-lc-two", full=True)
    assert two.mode == FULL
    assert all(backing_file(d.path) is None for d in two.disks)
    write_pattern(Path(one.disks[0].path), 0x77)
    assert not same_data(one.disks[0].path, s.members[0].path)
    assert same_data(two.disks[0].path, s.members[0].path), "a write in one instance showed in the other"
    assert same_data(lc.restores.for_instance("ff-lc-two")[0].path, s.members[0].path)
    # Only copy-on-write children depend on the set.
    assert {d.instance_name for d in lc.dependants(s)} == {"ff-lc-one"}
    assert_consistent(lc)


def test_restore_failures_leave_nothing_behind(
    ff: Freezeframe, lc: LC, guest_image: GuestImage, libvirt_conn: Any
) -> None:
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 1, "vdb": 2, "hdb": 3})
    lc.restore(s.id, "ff-lc-taken")
    before = {p.name for p in lc.instances_dir.iterdir()}

    with pytest.raises(InvalidRequest, match="already exists"):
        lc.restore(s.id, "ff-lc-taken")
    with pytest.raises(InvalidRequest, match="not usable"):
        lc.restore(s.id, "../escape")

    no_net = replace(s.hardware, nics=(NicSpec("52:54:00:00:00:01", "virtio", "network", "ff-no-such-net"),))
    s_net = synthetic_set(ff, no_net, {"vda": 1})
    with pytest.raises(InvalidRequest, match="ff-no-such-net"):
        lc.restore(s_net.id, "ff-lc-nonet")

    s_gone = synthetic_set(ff, s.hardware, {"vda": 1, "vdb": 2})
    Path(s_gone.members[1].path).unlink()
    with pytest.raises(PreflightFailed, match="vdb"):
        lc.restore(s_gone.id, "ff-lc-gone")
    shutil.rmtree(ff.repository.root / s_gone.id)
    ff.catalog.delete_set(s_gone.id)

    # Fails after the disks and rows were made and the domain defined: libvirt cannot start it.
    bad_boot = replace(s.hardware, boot=replace(s.hardware.boot, kernel="/nonexistent/vmlinuz"))
    s_boot = synthetic_set(ff, bad_boot, {"vda": 1})
    with pytest.raises(HypervisorError, match="did not start"):
        lc.restore(s_boot.id, "ff-lc-noboot", start=True)

    for name in ("ff-lc-nonet", "ff-lc-gone", "ff-lc-noboot"):
        assert not domain_exists(libvirt_conn, name), f"{name} was left defined"
        assert not lc.restores.for_instance(name)
    assert {p.name for p in lc.instances_dir.iterdir()} == before
    # A set that is not available cannot be restored.
    s.status = SetStatus.DELETING
    ff.catalog.update_set(s)
    with pytest.raises(InvalidRequest, match="deleting"):
        lc.restore(s.id, "ff-lc-deleting")
    s.status = SetStatus.AVAILABLE
    ff.catalog.update_set(s)
    assert_consistent(lc)


def test_restore_interrupted_mid_way_is_undone_by_repair(
    ff: Freezeframe, lc: LC, guest_image: GuestImage, libvirt_conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGKILL after define leaves a marker; repair removes the domain, the disks and the rows."""
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 1})

    def killed(*_: object, **__: object) -> None:
        raise SystemExit("simulated kill")  # stands in for the process dying: skip the undo below

    monkeypatch.setattr(InstanceBuilder, "undo", killed)
    monkeypatch.setattr(ld, "start", lambda _dom: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        lc.restore(s.id, "ff-lc-killed", start=True)
    monkeypatch.undo()
    assert domain_exists(libvirt_conn, "ff-lc-killed")
    assert (lc.markers_dir / "restore-ff-lc-killed.json").exists()
    reports = lc.repair()
    assert any("ff-lc-killed" in r for r in reports), reports
    assert not domain_exists(libvirt_conn, "ff-lc-killed")
    assert not (lc.instances_dir / "ff-lc-killed").exists()
    assert not lc.restores.for_instance("ff-lc-killed")
    assert_consistent(lc)


def test_extract_one_volume(ff: Freezeframe, lc: LC, guest_image: GuestImage, tmp_path: Path) -> None:
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 1, "vdb": 0x5A})
    out = lc.extract(s.id, "vdb", tmp_path / "vdb.qcow2")
    assert backing_file(out) is None and same_data(out, s.members[1].path)
    raw = lc.extract(s.id, "vdb", tmp_path / "vdb.raw", "raw")
    assert ld_info(str(raw))["format"] == "raw" and same_data(raw, s.members[1].path)
    (tmp_path / "taken.img").write_bytes(b"keep me")
    with pytest.raises(InvalidRequest, match="does not overwrite"):
        lc.extract(s.id, "vda", tmp_path / "taken.img")
    assert (tmp_path / "taken.img").read_bytes() == b"keep me"
    with pytest.raises(InvalidRequest, match="no disk 'vdz'"):
        lc.extract(s.id, "vdz", tmp_path / "x.qcow2")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left
    assert_consistent(lc)


def test_delete_refuses_with_dependants_then_force_flattens(ff: Freezeframe, lc: LC, guest_image: GuestImage) -> None:
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 0x61, "vdb": 0x62})
    child = lc.restore(s.id, "ff-lc-child")
    with pytest.raises(SetHasDependants, match="ff-lc-child") as refused:
        lc.delete(s.id)
    assert {d.target for d in refused.value.dependants} == {"vda", "vdb"}
    assert ff.catalog.get_set(s.id).status is SetStatus.AVAILABLE  # nothing changed
    assert all(Path(m.path).is_file() for m in s.members)
    copies = [lc.extract(s.id, m.target, ff.settings.home / f"copy-{m.target}.qcow2") for m in s.members]

    result = lc.delete(s.id, force=True)
    assert {d.path for d in result.flattened} == {d.path for d in child.disks}
    assert not (ff.repository.root / s.id).exists()
    with pytest.raises(Exception, match="no snapshot set"):
        ff.catalog.get_set(s.id)
    for disk, copy in zip(child.disks, copies, strict=True):
        assert backing_file(disk.path) is None
        assert same_data(disk.path, copy), "flattening lost data"
    assert not lc.restores.for_set(s.id)  # went with the set row
    # The child is now an ordinary restored instance: discard removes it.
    lc.discard("ff-lc-child")
    assert_consistent(lc)


def test_delete_without_dependants_and_crash_recovery(ff: Freezeframe, lc: LC, guest_image: GuestImage) -> None:
    plain = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 1})
    lc.delete(plain.name)
    assert not (ff.repository.root / plain.id).exists()
    assert not ff.catalog.list_sets()

    # Killed after "mark deleting": the next delete finishes the job.
    s1 = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 1})
    s1.status = SetStatus.DELETING
    ff.catalog.update_set(s1)
    lc.delete(s1.id)
    # Killed after the data went but before the row did: repair finishes it.
    s2 = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 1})
    s2.status = SetStatus.DELETING
    ff.catalog.update_set(s2)
    shutil.rmtree(ff.repository.root / s2.id)
    assert any(s2.id in r for r in lc.repair())
    assert not ff.catalog.list_sets()

    creating = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 1})
    creating.status = SetStatus.CREATING
    ff.catalog.update_set(creating)
    with pytest.raises(InvalidRequest, match="still being created"):
        lc.delete(creating.id)
    creating.status = SetStatus.AVAILABLE
    ff.catalog.update_set(creating)
    with ff.locks.hold(f"set-{creating.id}"), pytest.raises(InstanceBusy, match="in use"):
        lc.delete(creating.id)
    assert ff.catalog.get_set(creating.id).status is SetStatus.AVAILABLE
    assert_consistent(lc)


def test_verify_names_a_corrupted_member(ff: Freezeframe, lc: LC, guest_image: GuestImage) -> None:
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 1, "vdb": 2})
    report = lc.verify(s.id)
    assert report.ok and [c.subject for c in report.checks if c.what == "sha256"] == ["vda", "vdb"]
    flip_byte(Path(s.members[1].path))
    report = lc.verify(s.id)
    assert not report.ok
    assert [c.subject for c in report.failures] == ["vdb"]
    assert "member vdb" in report.failures[0].detail
    app = typer.Typer()
    register(app)
    run = CliRunner().invoke(app, ["verify", s.id, "--home", str(ff.settings.home)])
    assert isinstance(run.exception, VerifyFailed) and run.exception.exit_code != 0
    assert "vdb" in str(run.exception)
    assert_consistent(lc)


def test_verify_boot_reports_a_clone_that_cannot_start(
    ff: Freezeframe, lc: LC, guest_image: GuestImage, libvirt_conn: Any
) -> None:
    hardware = synthetic_hardware(guest_image)
    broken = replace(hardware, boot=replace(hardware.boot, kernel="/nonexistent/vmlinuz"))
    s = synthetic_set(ff, broken, {"vda": 1})
    report = lc.verify(s.id, boot=True)
    assert [(c.subject, c.what) for c in report.failures] == [("clone", "boot")]
    assert "did not start" in report.failures[0].detail and not report.booted
    assert not any(d.name().startswith("ff-verify-") for d in libvirt_conn.listAllDomains())
    assert_consistent(lc)


def flip_byte(path: Path) -> None:
    """Corrupt one byte in the middle of the image (inside guest data, not the qcow2 header)."""
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.seek(size // 2)
        byte = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_probe_filesystems_whole_disk_and_partitions(tmp_path: Path) -> None:
    whole = tmp_path / "whole.raw"
    subprocess.run(["truncate", "-s", "8M", str(whole)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(whole)], check=True)
    assert [(f.type, f.offset) for f in probe_filesystems(whole)] == [("ext4", 0)]
    # An MBR with one partition at 1 MiB holding ext4.
    parted = tmp_path / "parted.raw"
    subprocess.run(["truncate", "-s", "16M", str(parted)], check=True)
    entry = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + (28672).to_bytes(4, "little")
    with parted.open("r+b") as fh:
        fh.seek(446)
        fh.write(entry)
        fh.seek(510)
        fh.write(b"\x55\xaa")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={MiB}", str(parted), "14M"], check=True)
    found = probe_filesystems(parted)
    assert [(f.type, f.offset, f.where) for f in found] == [("ext4", MiB, "partition 1")]
    empty = tmp_path / "empty.raw"
    subprocess.run(["truncate", "-s", "4M", str(empty)], check=True)
    assert probe_filesystems(empty) == []


def test_revert_of_a_shut_off_instance_and_its_failure_paths(
    ff: Freezeframe, lc: LC, guest_image: GuestImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Revert on a defined, never-started instance: all disks or none, safety set first, a kill rolled forward."""
    origin = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 0x11, "vdb": 0x22, "hdb": 0x33})
    inst = lc.restore(origin.id, "ff-lc-rev", full=True)
    s = ff.snapshot(SnapshotRequest("ff-lc-rev", Consistency.CRASH))  # shut off: copied as is
    disks = _disks(inst)
    for path in disks.values():
        write_pattern(Path(path), 0x44, offset=2 * MiB)
    original = {t: ff.repository.checksum(Path(p)) for t, p in disks.items()}

    # A copy failing on the second disk: no disk changed, no temp file, no marker (the safety set stays).
    real_convert = ff.images.convert
    calls = {"convert": 0}

    def flaky(source: Any, target: Any, **options: Any) -> None:
        if target.path.name.endswith(".ff-revert.tmp"):
            calls["convert"] += 1
            if calls["convert"] == 2:
                raise HypervisorError("simulated copy failure")
        real_convert(source, target, **options)

    monkeypatch.setattr(ff.images, "convert", flaky)
    with pytest.raises(HypervisorError, match="simulated"):
        lc.revert(s.id)
    monkeypatch.undo()
    assert {t: ff.repository.checksum(Path(p)) for t, p in disks.items()} == original
    assert not list((lc.instances_dir / "ff-lc-rev").glob(".*"))
    for extra in ff.catalog.list_sets(instance="ff-lc-rev"):
        if extra.id != s.id:
            lc.delete(extra.id)

    result = lc.revert(s.id, safety=False)
    assert result.safety_set_id is None and sorted(result.reverted) == ["hdb", "vda", "vdb"]
    for m in s.members:
        assert same_data(disks[m.target], m.path)
    assert ff.catalog.get_set(s.id).status is SetStatus.AVAILABLE

    # Killed between the renames: the marker lists complete temps; repair renames the rest.
    for path in disks.values():
        write_pattern(Path(path), 0x55, offset=2 * MiB)
    pairs = []
    for m in s.members:
        dst = Path(disks[m.target])
        tmp = dst.with_name(f".{dst.name}.ff-revert.tmp")
        assert qemu_img("convert", "-f", "qcow2", "-O", "qcow2", m.path, str(tmp)).returncode == 0
        pairs.append([str(tmp), str(dst)])
    Path(pairs[0][0]).replace(pairs[0][1])  # the first rename happened before the kill
    uuid_ = ff.instance("ff-lc-rev").uuid
    lc._write_marker("revert", uuid_, {"renames": pairs})
    assert any("interrupted revert" in r for r in lc.repair())
    for m in s.members:
        assert same_data(disks[m.target], m.path)
    lc.delete(s.id)
    lc.discard("ff-lc-rev")
    assert_consistent(lc)


def test_cli_commands(ff: Freezeframe, lc: LC, guest_image: GuestImage, tmp_path: Path) -> None:
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 1, "vdb": 2})
    app = typer.Typer()
    register(app)
    home = ["--home", str(ff.settings.home)]
    runner = CliRunner()
    bad = runner.invoke(app, ["restore", s.id, *home])
    assert isinstance(bad.exception, InvalidRequest) and "--as NAME" in str(bad.exception)
    bad = runner.invoke(app, ["restore", s.id, "--disk", "vdb", *home])
    assert isinstance(bad.exception, InvalidRequest)
    ok = runner.invoke(app, ["restore", s.id, "--disk", "vdb", "--to", str(tmp_path / "b.img"), "--json", *home])
    assert ok.exit_code == 0, ok.output
    assert same_data(tmp_path / "b.img", s.members[1].path)
    ok = runner.invoke(app, ["restore", s.id, "--as", "ff-lc-cli", *home])
    assert ok.exit_code == 0 and "ff-lc-cli" in ok.output, ok.output
    refused = runner.invoke(app, ["delete", s.id, *home])
    assert isinstance(refused.exception, SetHasDependants)
    ok = runner.invoke(app, ["verify", s.id, "--json", *home])
    assert ok.exit_code == 0 and '"ok": true' in ok.output, ok.output
    ok = runner.invoke(app, ["delete", s.id, "--force", *home])
    assert ok.exit_code == 0 and "flattened ff-lc-cli" in ok.output, ok.output
    ok = runner.invoke(app, ["discard", "ff-lc-cli", *home])
    assert ok.exit_code == 0 and "removed domain" in ok.output, ok.output
    assert_consistent(lc)


def test_backup_arguments_are_checked(ff: Freezeframe, lc: LC) -> None:
    with pytest.raises(InvalidRequest, match="rotation"):
        lc.backup("whatever", "daily", -1)
    with pytest.raises(InvalidRequest, match="type"):
        lc.backup("whatever", " ", 1)


# ---- real guests -----------------------------------------------------------------------------------

LEDGER_DISKS = [DiskRequest(64 * MiB), DiskRequest(64 * MiB), DiskRequest(64 * MiB)]


def test_one_broken_domain_does_not_hide_the_others(ff: Freezeframe, libvirt_conn: Any, tmp_path: Path) -> None:
    """A domain whose disk file is gone is still listed (size unknown), and so is every other instance."""
    name = f"fflc-broken-{uuid.uuid4().hex[:8]}"
    xml = (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><os><type>hvm</type></os>"
        f"<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{tmp_path / 'gone.qcow2'}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
    dom = libvirt_conn.defineXML(xml)
    try:
        listed = {i.name: i for i in ff.instances()}
        assert name in listed and listed[name].hardware.disks[0].virtual_size == 0
    finally:
        dom.undefine()


@pytest.fixture(scope="module")
def ledger_vm(
    libvirt_conn: Any, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestInstance]:
    workdir = tmp_path_factory.mktemp("lifecycle-guest")
    with running_instance(
        libvirt_conn, disks=LEDGER_DISKS, workload="ledger", workdir=workdir, guest=guest_image, name_prefix="fflc"
    ) as inst:
        # The instance's own <metadata>, which the set must carry into restored instances.
        inst.dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT, "<tier>front</tier>", "app", META_NS,
            libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG,
        )  # fmt: skip
        yield inst


@pytest.fixture(scope="module")
def shared(ledger_vm: TestInstance, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LC, SnapshotSet]]:
    """One filesystem-consistent 3-disk set of the ledger guest, shared by the VM tests (one home)."""
    home = tmp_path_factory.mktemp("lifecycle-home")
    options = wiring.LifecycleOptions(boot_timeout_s=120, shutdown_timeout_s=60)
    with wiring.open_service(Settings(home=home, agent_timeout_s=5), options) as service:
        lifecycle = LC(service)
        try:
            started = time.monotonic()
            s = service.snapshot(
                SnapshotRequest(ledger_vm.name, Consistency.FILESYSTEM, require=True, metadata={"purpose": "lc"})
            )
            print(f"shared set {s.id} in {time.monotonic() - started:.1f}s")
            yield lifecycle, s
        finally:
            _discard_all(lifecycle)


def _wait_agent(lc: LC, name: str, timeout_s: float = 120) -> float:
    started = time.monotonic()
    while True:
        try:
            lc.service.hypervisor.agent_ping(lc.service.hypervisor.lookup(name))
            return time.monotonic() - started
        except FreezeframeError:
            if time.monotonic() - started > timeout_s:
                raise
            time.sleep(0.5)


def _ledger_progress(console: Path) -> int | None:
    found = _LEDGER_RE.findall(console.read_bytes()) if console.exists() else []
    return int(found[-1]) if found else None


def _ledger_start(console: Path) -> int | None:
    """The record the guest's ledger writer resumed at: last journal record on its disk + 1."""
    found = re.findall(rb"ff-ledger start i=(\d+)", console.read_bytes()) if console.exists() else []
    return int(found[-1]) if found else None


def _wait_ledger(console: Path, after: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = _ledger_progress(console)
        if now is not None and now > after:
            return now
        time.sleep(0.3)
    raise AssertionError(f"the restored guest's ledger did not pass {after}: {console.read_text()[-800:]}")


def _disks(result: Any) -> dict[str, str]:
    return {d.target: d.path for d in result.disks}


@pytest.mark.vm
def test_restore_boots_with_the_snapshot_data(shared: tuple[LC, SnapshotSet], libvirt_conn: Any) -> None:
    lc, s = shared
    members = {m.target: m.path for m in s.members}
    assert [m.target for m in s.members] == ["vda", "vdb", "vdc"]
    assert s.hardware.metadata_xml and META_NS in s.hardware.metadata_xml
    verdict = check_ledger(Path(members["vdb"]), Path(members["vdc"]))
    assert verdict.ok and verdict.state is not None, verdict

    timings: dict[str, float] = {}
    started = time.monotonic()
    idle = lc.restore(s.id, "fflc-restored-a")
    timings["restore (define only)"] = time.monotonic() - started
    for target, path in _disks(idle).items():
        assert same_data(path, members[target]), f"{target} of the restored instance differs from its member"

    started = time.monotonic()
    live = lc.restore(s.id, "fflc-restored-b", start=True)
    timings["restore --start"] = time.monotonic() - started
    assert live.started
    timings["agent after start"] = _wait_agent(lc, "fflc-restored-b")
    root = _xml(libvirt_conn, "fflc-restored-b")
    assert root.findtext(f"metadata/{{{META_NS}}}tier") == "front"
    assert root.findtext("description") == s.hardware.description
    assert root.findtext("os/cmdline") == s.hardware.boot.cmdline
    assert root.findtext("vcpu") == str(s.hardware.vcpus)
    console = lc.instances_dir / "fflc-restored-b" / "console.log"
    progressed = _wait_ledger(console, verdict.state)
    assert _ledger_start(console) == (verdict.last_journal or 0) + 1, "B did not boot from the set's data"
    dom = libvirt_conn.lookupByName("fflc-restored-b")
    assert ld.shutdown_via_agent(dom, 60), "the restored guest did not shut down through its agent"
    disks_b = _disks(live)
    after = check_ledger(Path(disks_b["vdb"]), Path(disks_b["vdc"]))
    assert after.ok, after
    assert after.state is not None and after.state >= progressed > verdict.state
    # Independent: B wrote, A still reads exactly the snapshot.
    assert not same_data(disks_b["vdb"], members["vdb"])
    for target, path in _disks(idle).items():
        assert same_data(path, members[target]), f"B's writes showed up in A's {target}"
    print("timings:", {k: f"{v:.1f}s" for k, v in timings.items()})
    lc.discard("fflc-restored-a")
    lc.discard("fflc-restored-b")
    assert_consistent(lc)


@pytest.mark.vm
def test_extract_a_volume_of_the_real_set(shared: tuple[LC, SnapshotSet], tmp_path: Path) -> None:
    lc, s = shared
    out = lc.extract(s.id, "vdc", tmp_path / "state.img", "raw")
    assert same_data(out, next(m.path for m in s.members if m.target == "vdc"))
    with pytest.raises(InvalidRequest, match="does not overwrite"):
        lc.extract(s.id, "vdc", out)
    assert_consistent(lc)


@pytest.mark.vm
def test_revert_rolls_the_instance_back(shared: tuple[LC, SnapshotSet], libvirt_conn: Any) -> None:
    """Revert a restored instance to a set of its own: refused while running, then old data, then boots."""
    lc, s = shared
    ff = lc.service
    restored = lc.restore(s.id, "fflc-revert", start=True)
    _wait_agent(lc, "fflc-revert")
    console = lc.instances_dir / "fflc-revert" / "console.log"
    _wait_ledger(console, 0)
    own = ff.snapshot(SnapshotRequest("fflc-revert", Consistency.FILESYSTEM, require=True))
    own_members = {m.target: m.path for m in own.members}
    own_verdict = check_ledger(Path(own_members["vdb"]), Path(own_members["vdc"]))
    assert own_verdict.ok and own_verdict.state is not None

    sets_before = {x.id for x in ff.catalog.list_sets()}
    with pytest.raises(InvalidRequest, match="shut-off instance"):
        lc.revert(own.id)
    assert {x.id for x in ff.catalog.list_sets()} == sets_before, "a refused revert took a safety set"

    _wait_ledger(console, (_ledger_progress(console) or 0) + 3)  # the guest moves on past the set
    dom = libvirt_conn.lookupByName("fflc-revert")
    assert ld.shutdown_via_agent(dom, 60)
    disks = _disks(restored)
    assert not same_data(disks["vdb"], own_members["vdb"])

    started = time.monotonic()
    result = lc.revert(own.id)
    took = time.monotonic() - started
    assert result.safety_set_id is not None and set(result.reverted) == {"vda", "vdb", "vdc"}
    safety = ff.catalog.get_set(result.safety_set_id)
    assert safety.status is SetStatus.AVAILABLE and safety.metadata["freezeframe.safety_for"] == own.id
    assert not same_data(Path(next(m.path for m in safety.members if m.target == "vdb")), own_members["vdb"])
    for target, path in disks.items():
        assert same_data(path, own_members[target]), f"{target} was not reverted"
        assert ld_info(path)["format"] == "qcow2"
    print(f"revert of 3 x 64 MiB disks (with safety set) took {took:.1f}s")

    console.write_bytes(b"")
    dom.create()
    _wait_agent(lc, "fflc-revert")
    _wait_ledger(console, own_verdict.state)
    assert _ledger_start(console) == (own_verdict.last_journal or 0) + 1, "it did not resume from the set's data"
    assert ld.shutdown_via_agent(dom, 60)
    after = check_ledger(Path(disks["vdb"]), Path(disks["vdc"]))
    assert after.ok, after
    lc.discard("fflc-revert")
    for x in (own, safety):
        lc.delete(x.id)
    assert_consistent(lc)


@pytest.mark.vm
def test_delete_flattens_a_running_child_by_blockpull(
    shared: tuple[LC, SnapshotSet], ledger_vm: TestInstance, libvirt_conn: Any
) -> None:
    lc, _ = shared
    ff = lc.service
    t = ff.snapshot(SnapshotRequest(ledger_vm.name, Consistency.CRASH))
    shut = lc.restore(t.id, "fflc-child-off")
    running = lc.restore(t.id, "fflc-child-on", start=True)
    with pytest.raises(SetHasDependants) as refused:
        lc.delete(t.id)
    assert {d.instance_name for d in refused.value.dependants} == {"fflc-child-off", "fflc-child-on"}
    assert ff.catalog.get_set(t.id).status is SetStatus.AVAILABLE
    result = lc.delete(t.id, force=True)
    assert {(d.instance_name, d.active) for d in result.flattened} == {
        ("fflc-child-off", False),
        ("fflc-child-on", True),
    }
    for child in (shut, running):
        for path in _disks(child).values():
            assert backing_file(path) is None
    dom = libvirt_conn.lookupByName("fflc-child-on")
    assert dom.isActive()
    _wait_agent(lc, "fflc-child-on")  # still alive after its backing file went away
    lc.discard("fflc-child-on")
    lc.discard("fflc-child-off")
    assert_consistent(lc)


@pytest.mark.vm
def test_backup_rotation_keeps_the_newest(shared: tuple[LC, SnapshotSet], ledger_vm: TestInstance) -> None:
    lc, s = shared
    ff = lc.service
    rotation = 2
    made = []
    for _ in range(rotation + 2):
        result = lc.backup(ledger_vm.name, "daily", rotation, metadata={"cycle": "test"}, consistency=Consistency.CRASH)
        assert result.snapshot_set.backup_type == "daily"
        assert result.snapshot_set.metadata["cycle"] == "test"
        made.append(result.snapshot_set.id)
    daily = ff.list_sets(instance=ledger_vm.uuid, backup_type="daily")
    assert [x.id for x in daily] == made[::-1][:rotation]  # exactly N remain, the newest
    for gone in made[:-rotation]:
        assert not (ff.repository.root / gone).exists()
    assert ff.catalog.get_set(s.id).status is SetStatus.AVAILABLE  # sets of other types untouched
    assert [x.id for x in ff.list_sets(metadata={"cycle": "test"})] == made[::-1][:rotation]

    # A backup that fails deletes nothing: a paused guest cannot give --require filesystem.
    ledger_vm.dom.suspend()
    try:
        with pytest.raises(ConsistencyUnavailable):
            lc.backup(ledger_vm.name, "daily", 1, consistency=Consistency.FILESYSTEM, require=True)
    finally:
        ledger_vm.dom.resume()
    assert [x.id for x in ff.list_sets(instance=ledger_vm.uuid, backup_type="daily")] == made[::-1][:rotation]
    for x in daily:
        lc.delete(x.id)
    assert_consistent(lc)


@pytest.mark.vm
def test_verify_boots_a_clone_and_checks_filesystems(shared: tuple[LC, SnapshotSet], libvirt_conn: Any) -> None:
    lc, s = shared
    clones_before = {n for n in (d.name() for d in libvirt_conn.listAllDomains()) if n.startswith("ff-verify-")}
    started = time.monotonic()
    report = lc.verify(s.id, boot=True)
    took = time.monotonic() - started
    print(f"verify --boot took {took:.1f}s:", *(f"\n  {c}" for c in report.checks))
    assert report.ok, report.failures
    assert report.booted
    whats = {(c.subject, c.what) for c in report.checks if c.ok}
    for target in ("vda", "vdb", "vdc"):
        assert (target, "sha256") in whats
        assert (target, "fsck whole disk") in whats
        assert (target, "mounted") in whats
    assert ("clone", "guest agent") in whats and ("clone", "shutdown") in whats
    # Other processes may verify at the same time; this verify's clone must be gone.
    clones_after = {n for n in (d.name() for d in libvirt_conn.listAllDomains()) if n.startswith("ff-verify-")}
    assert clones_after <= clones_before
    assert_consistent(lc)


@pytest.mark.vm
def test_verify_fails_on_a_corrupted_member_of_a_real_set(
    shared: tuple[LC, SnapshotSet], ledger_vm: TestInstance
) -> None:
    lc, _ = shared
    ff = lc.service
    u = ff.snapshot(SnapshotRequest(ledger_vm.name, Consistency.CRASH))
    flip_byte(Path(next(m.path for m in u.members if m.target == "vdc")))
    report = lc.verify(u.id, boot=True)
    assert not report.ok
    assert [(c.subject, c.what) for c in report.failures] == [("vdc", "sha256"), ("clone", "boot")]
    assert not report.booted
    lc.delete(u.id)
    assert_consistent(lc)


@pytest.mark.vm
def test_revert_refuses_a_running_instance(shared: tuple[LC, SnapshotSet]) -> None:
    lc, s = shared
    before = [x.id for x in lc.service.catalog.list_sets()]
    with pytest.raises(InvalidRequest, match="shut-off instance"):
        lc.revert(s.id)
    assert [x.id for x in lc.service.catalog.list_sets()] == before
    assert_consistent(lc)


def test_manifest_is_checked(ff: Freezeframe, lc: LC, guest_image: GuestImage) -> None:
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 1})
    (ff.repository.root / s.id / MANIFEST).unlink()
    report = lc.verify(s.id)
    assert [c.what for c in report.failures] == [MANIFEST]
