"""Lifecycle operations on sets with RBD members, on a real guest and the real one-node cluster (TCG).

One ledger guest (vda root file, vdb journal file, vdc state on an RBD image) serves the module: its members are
written into new RBD images (``restore --disk --to rbd:…``), booted as a throw-away clone (``verify --boot``),
exported and imported back onto RBD (``import --storage rbd``) and booted, and a restored mixed instance is
reverted (files copied back, its RBD clone rolled back) and booted again.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from ceph_helpers import ceph_testbed, qemu_source
from freezeframe import wiring
from freezeframe.config import Settings
from freezeframe.errors import InvalidRequest
from freezeframe.flow import SnapshotRequest
from freezeframe.model import Member, SnapshotSet
from freezeframe.service import Freezeframe
from freezeframe.testbed.ceph import CephTestbed, remove_image
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance
from portable_support import guest_boot_dirs

__all__ = ["ceph_testbed"]
pytestmark = pytest.mark.vm

MiB = 1 << 20
_LEDGER_RE = re.compile(rb"ff-ledger (?:paused |resumed )?i=(\d+)")


@pytest.fixture(scope="module")
def guest(
    libvirt_conn: Any, guest_image: Any, ceph_testbed: CephTestbed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestInstance]:
    disks = [DiskRequest(64 * MiB), DiskRequest(64 * MiB), DiskRequest(64 * MiB, ceph=ceph_testbed)]
    workdir = tmp_path_factory.mktemp("rbd-life")
    with running_instance(libvirt_conn, disks=disks, workload="ledger", workdir=workdir, guest=guest_image) as inst:
        yield inst


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rbd-life-home")


@pytest.fixture(scope="module")
def service(home: Path, ceph_testbed: CephTestbed) -> Iterator[Freezeframe]:
    with wiring.open_service(Settings(home=home, agent_timeout_s=5)) as ff:
        yield ff


@pytest.fixture(scope="module")
def snapshot_set(service: Freezeframe, guest: TestInstance) -> Iterator[SnapshotSet]:
    s = service.snapshot(SnapshotRequest(guest.name))
    yield s
    service.lifecycle.delete(s.id, force=True)


def _member(s: SnapshotSet, target: str) -> Member:
    return next(m for m in s.members if m.target == target)


def _qemu(info: CephTestbed, path: str) -> list[str]:
    """``-f FMT NAME`` for qemu-img: an RBD source with the cluster options, or a member's qcow2 file."""
    return ["-f", "raw", qemu_source(info, path)] if path.startswith("rbd:") else ["-f", "qcow2", path]


def _same_data(info: CephTestbed, a: str, b: str) -> bool:
    """qemu-img compare: the guest-visible data of two images is identical (exit 0)."""
    fa, na = _qemu(info, a)[1:]
    fb, nb = _qemu(info, b)[1:]
    done = subprocess.run(["qemu-img", "compare", "-f", fa, "-F", fb, na, nb], capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode == 0


def _ledger_runs(console: Path, timeout_s: float = 180) -> int:
    """The guest booted and its ledger writer is making progress (two distinct records seen on the console)."""
    deadline = time.monotonic() + timeout_s
    seen: set[int] = set()
    while time.monotonic() < deadline:
        seen |= {int(i) for i in _LEDGER_RE.findall(console.read_bytes())} if console.exists() else set()
        if len(seen) >= 2:
            return max(seen)
        time.sleep(0.5)
    raise AssertionError(f"no ledger progress on {console} within {timeout_s:.0f} s")


def _shut_off(conn: Any, name: str, timeout_s: float = 60) -> None:
    """Through the guest agent (a clean stop releases the RBD image's lock and watch at once)."""
    dom = conn.lookupByName(name)
    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
    deadline = time.monotonic() + timeout_s
    while dom.isActive():
        assert time.monotonic() < deadline, f"{name} did not shut down"
        time.sleep(0.2)


def test_restore_disk_to_a_new_rbd_image_from_rbd_and_file_members(
    service: Freezeframe, snapshot_set: SnapshotSet, ceph_testbed: CephTestbed, home: Path
) -> None:
    pool, tag = ceph_testbed.pool, snapshot_set.id[:8]
    made = [f"ffrbd-x-{tag}-vdc", f"ffrbd-x-{tag}-vda", f"ffrbd-x-{tag}-cli"]
    try:
        vdc = service.lifecycle.extract(snapshot_set.id, "vdc", Path(f"rbd:{pool}/{made[0]}"))
        vda = service.lifecycle.extract(snapshot_set.id, "vda", Path(f"rbd:{pool}/{made[1]}"))
        assert str(vdc) == f"rbd:{pool}/{made[0]}" and str(vda) == f"rbd:{pool}/{made[1]}"
        assert _same_data(ceph_testbed, str(vdc), _member(snapshot_set, "vdc").path)
        assert _same_data(ceph_testbed, str(vda), _member(snapshot_set, "vda").path)
        assert not _same_data(ceph_testbed, str(vda), _member(snapshot_set, "vdc").path), "compare can fail"
        with pytest.raises(InvalidRequest, match="already exists"):
            service.lifecycle.extract(snapshot_set.id, "vdb", Path(f"rbd:{pool}/{made[0]}"))
        assert _same_data(ceph_testbed, str(vdc), _member(snapshot_set, "vdc").path), "left as it was"
        cli = subprocess.run(
            [sys.executable, "-m", "freezeframe.cli", "restore", snapshot_set.id, "--disk", "vdb", "--to",
             f"rbd:{pool}/{made[2]}", "--json"],
            env={**os.environ, "FREEZEFRAME_HOME": str(home)}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["format"] == "raw"
        assert _same_data(ceph_testbed, f"rbd:{pool}/{made[2]}", _member(snapshot_set, "vdb").path)
        bad = subprocess.run(
            [sys.executable, "-m", "freezeframe.cli", "restore", snapshot_set.id, "--disk", "vdb", "--to",
             f"rbd:{pool}/x:conf=/etc/passwd"],
            env={**os.environ, "FREEZEFRAME_HOME": str(home)}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert bad.returncode != 0 and "RBD image" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        for name in made:
            remove_image(ceph_testbed, name)


def test_verify_boot_of_a_set_with_an_rbd_member(service: Freezeframe, snapshot_set: SnapshotSet) -> None:
    report = service.lifecycle.verify(snapshot_set.id, boot=True)
    assert report.ok and report.booted, report.failures()
    vdc = [c for c in report.checks if c.subject == "vdc"]
    assert any(c.what.startswith("fsck") and c.ok for c in vdc), vdc
    assert any(c.what == "mounted" and c.ok for c in vdc), vdc


def test_export_imports_back_onto_rbd_identical_and_boots(
    service: Freezeframe, snapshot_set: SnapshotSet, ceph_testbed: CephTestbed, home: Path, tmp_path: Path,
    guest_image: Any, libvirt_conn: Any,
) -> None:  # fmt: skip
    portable = wiring.portable(service, boot_dirs=guest_boot_dirs(guest_image))
    ova = portable.export(snapshot_set.id, tmp_path / "rbd-set.ova").path
    name = f"ffrbd-imp-{snapshot_set.id[:6]}"
    try:
        result = portable.import_package(ova, name, start=True, storage="rbd", pool=ceph_testbed.pool)
        paths = {d.target: d.path for d in result.disks}
        assert paths == {t: f"rbd:{ceph_testbed.pool}/{name}-{t}" for t in ("vda", "vdb", "vdc")}
        for target, path in paths.items():
            assert _same_data(ceph_testbed, path, _member(snapshot_set, target).path), target
        assert _ledger_runs(home / "instances" / name / "console.log") > 0
        _shut_off(libvirt_conn, name)  # a destroyed QEMU's watch would hold the images for 30 s
    finally:
        done = service.lifecycle.discard(name)
    assert f"removed domain {name}" in done
    assert f"removed RBD image {ceph_testbed.pool}/{name}-vdc" in done


def test_revert_of_a_mixed_instance_rolls_its_rbd_image_back_and_it_boots(
    service: Freezeframe, snapshot_set: SnapshotSet, ceph_testbed: CephTestbed, home: Path, libvirt_conn: Any
) -> None:
    """A restored instance (file clones + an RBD clone) runs, is shut off and captured, runs on, is reverted."""
    lc, name = service.lifecycle, f"ffrbd-rev-{snapshot_set.id[:6]}"
    console = home / "instances" / name / "console.log"
    try:
        lc.restore(snapshot_set.id, name, start=True)
        _ledger_runs(console)
        _shut_off(libvirt_conn, name)
        before = service.snapshot(SnapshotRequest(name))
        assert [m.store for m in before.members] == ["file", "file", "rbd"]
        libvirt_conn.lookupByName(name).create()
        console.write_bytes(b"")
        _ledger_runs(console)
        _shut_off(libvirt_conn, name)
        disks = {d.target: str(d.source_path) for d in service.instance(name).hardware.disks}
        vdc = f"rbd:{disks['vdc']}"
        assert not _same_data(ceph_testbed, vdc, _member(before, "vdc").path), "the guest wrote on after the set"
        result = lc.revert(before.id)
        assert sorted(result.reverted) == ["vda", "vdb", "vdc"] and result.safety_set_id
        for target, path in disks.items():
            live = f"rbd:{path}" if target == "vdc" else path
            assert _same_data(ceph_testbed, live, _member(before, target).path), target
        safety = service.show(result.safety_set_id)
        assert not _same_data(ceph_testbed, _member(safety, "vdc").path, _member(before, "vdc").path)
        console.write_bytes(b"")
        libvirt_conn.lookupByName(name).create()
        assert _ledger_runs(console) > 0
        _shut_off(libvirt_conn, name)
        for s in (before.id, result.safety_set_id):
            lc.delete(s)
    finally:
        lc.discard(name)
