"""Instance-level sets of a real guest whose disks mix files and a Ceph RBD volume (real one-node cluster, TCG).

The ledger workload writes record i to a journal on vdb (a qcow2 file), then i to a state file on vdc (an RBD
image): a set whose members share one point in time satisfies state <= last_journal <= state + 1.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ceph_helpers import ceph_testbed, dead_conf, qemu_source
from freezeframe import wiring
from freezeframe.config import Settings
from freezeframe.errors import PreflightFailed, SetHasDependants
from freezeframe.flow import SnapshotRequest
from freezeframe.model import Consistency, SetStatus, SnapshotSet
from freezeframe.serialize import set_to_dict
from freezeframe.service import Freezeframe
from freezeframe.testbed.ceph import CephTestbed, open_pool
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance
from freezeframe.testbed.ledger import check_ledger

__all__ = ["ceph_testbed"]
pytestmark = pytest.mark.vm

MiB = 1 << 20
SETS = int(os.environ.get("FREEZEFRAME_TEST_SETS_PER_LEVEL", "30"))
SETS_TWO_RBD = int(os.environ.get("FREEZEFRAME_TEST_SETS_TWO_RBD", "10"))
"""Each two-RBD set reads two 64 MiB snapshots back (~6 s a set here): fewer, to keep the module within budget."""
_LEDGER_RE = re.compile(rb"ff-ledger (?:paused |resumed )?i=(\d+)")


@pytest.fixture(scope="module")
def rbd_guest(
    libvirt_conn: Any, guest_image: Any, ceph_testbed: CephTestbed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestInstance]:
    disks = [DiskRequest(64 * MiB), DiskRequest(64 * MiB), DiskRequest(64 * MiB, ceph=ceph_testbed)]
    workdir = tmp_path_factory.mktemp("rbd-guest")
    with running_instance(libvirt_conn, disks=disks, workload="ledger", workdir=workdir, guest=guest_image) as inst:
        yield inst


@pytest.fixture
def service(tmp_path: Path, ceph_testbed: CephTestbed) -> Iterator[Freezeframe]:
    with wiring.open_service(Settings(home=tmp_path / "ffhome", agent_timeout_s=3)) as ff:
        yield ff


def _verdict_ok(s: SnapshotSet, info: CephTestbed, tmp: Path) -> tuple[bool, str]:
    journal = Path(next(m.path for m in s.members if m.target == "vdb"))
    state = tmp / f"{s.id}-vdc.raw"
    source = next(m.path for m in s.members if m.target == "vdc")
    subprocess.run(["qemu-img", "convert", "-f", "raw", qemu_source(info, source), "-O", "raw", str(state)],
                   check=True)  # fmt: skip
    try:
        verdict = check_ledger(journal, state)
    finally:
        state.unlink()
    return verdict.ok and (verdict.state or 0) > 0, verdict.reason


def _rbd_snaps(info: CephTestbed, inst: TestInstance) -> list[str]:
    import rbd

    volume = inst.disks[2].rbd
    assert volume is not None
    with open_pool(info) as ioctx, rbd.Image(ioctx, volume.volume.split("/")[1]) as img:
        return [s["name"] for s in img.list_snaps()]


def _alive(inst: TestInstance) -> None:
    assert inst.dom.state()[0] == 1, "guest is not running"
    assert inst.agent({"execute": "guest-fsfreeze-status"})["return"] == "thawed"
    inst.wait_for_progress(after=inst.progress(), timeout_s=20)


@pytest.mark.parametrize(("level", "count"), [(Consistency.FILESYSTEM, SETS), (Consistency.CRASH, 5)])
def test_file_root_plus_rbd_volume_sets_pass_the_ledger(
    level: Consistency, count: int, rbd_guest: TestInstance, service: Freezeframe, ceph_testbed: CephTestbed,
    tmp_path: Path,
) -> None:  # fmt: skip
    windows, violations = [], []
    for _ in range(count):
        s = service.snapshot(SnapshotRequest(rbd_guest.name, level, require=True))
        assert s.status is SetStatus.AVAILABLE and s.achieved is level
        members = set_to_dict(s)["members"]
        assert [(m["target"], m["storage"]) for m in members] == [("vda", "file"), ("vdb", "file"), ("vdc", "rbd")]
        assert members[2]["source"] == f"rbd:{ceph_testbed.pool}/{rbd_guest.name}-vdc@freezeframe-{s.id}"
        ok, reason = _verdict_ok(s, ceph_testbed, tmp_path)
        if not ok:
            violations.append(f"{s.id}: {reason}")
        windows.append(s.pause_window_ms if level is Consistency.CRASH else s.freeze_window_ms)
        service.lifecycle.delete(s.id)
    assert violations == []
    assert level is not Consistency.CRASH or all(w is not None for w in windows), "crash level must pause"
    print(f"{level}: {count} sets, window median {sorted(windows)[len(windows) // 2]} ms")  # type: ignore[type-var]
    assert _rbd_snaps(ceph_testbed, rbd_guest) == []
    _alive(rbd_guest)


def test_unreachable_cluster_fails_the_set_and_leaves_the_guest_running(
    rbd_guest: TestInstance, ceph_testbed: CephTestbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FREEZEFRAME_CEPH_CONF", str(dead_conf(ceph_testbed, tmp_path)))
    monkeypatch.setenv("FREEZEFRAME_CEPH_TIMEOUT_S", "2")
    with wiring.open_service(Settings(home=tmp_path / "home", agent_timeout_s=3)) as ff:
        with pytest.raises(PreflightFailed, match="cannot be reached"):
            ff.snapshot(SnapshotRequest(rbd_guest.name))
        (failed,) = ff.list_sets()
        assert failed.status is SetStatus.FAILED and not ff.repository.exists(failed.id)
    assert _rbd_snaps(ceph_testbed, rbd_guest) == []
    _alive(rbd_guest)


def test_sigkill_inside_the_window_is_repaired_and_the_rbd_snapshot_removed(
    rbd_guest: TestInstance, ceph_testbed: CephTestbed, tmp_path: Path
) -> None:
    home = tmp_path / "kill-home"
    env = {**os.environ, "FREEZEFRAME_HOME": str(home), "FREEZEFRAME_FAULT_HOLD_IN_WINDOW_S": "60",
           "FREEZEFRAME_FREEZE_CAP_S": "120"}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "freezeframe.cli", "snapshot", rbd_guest.name], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while rbd_guest.agent({"execute": "guest-fsfreeze-status"})["return"] != "frozen":
            assert time.monotonic() < deadline, "guest never became frozen"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    repair = subprocess.run([sys.executable, "-m", "freezeframe.cli", "repair"], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert repair.returncode == 0, repair.stderr
    assert "thawed" in repair.stdout and "failed" in repair.stdout
    assert _rbd_snaps(ceph_testbed, rbd_guest) == []
    _alive(rbd_guest)


@pytest.fixture(scope="module")
def two_rbd_guest(
    libvirt_conn: Any, guest_image: Any, ceph_testbed: CephTestbed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestInstance]:
    """Root file vda; the ledger's journal (vdb) and state (vdc) both RBD images."""
    disks = [DiskRequest(64 * MiB), DiskRequest(64 * MiB, ceph=ceph_testbed), DiskRequest(64 * MiB, ceph=ceph_testbed)]
    workdir = tmp_path_factory.mktemp("rbd2-guest")
    with running_instance(libvirt_conn, disks=disks, workload="ledger", workdir=workdir, guest=guest_image) as inst:
        yield inst


def test_two_rbd_disks_sets_pass_the_ledger(
    two_rbd_guest: TestInstance, service: Freezeframe, ceph_testbed: CephTestbed, tmp_path: Path
) -> None:
    violations = []
    for _ in range(SETS_TWO_RBD):
        s = service.snapshot(SnapshotRequest(two_rbd_guest.name, Consistency.FILESYSTEM, require=True))
        assert [m.store for m in s.members] == ["file", "rbd", "rbd"]
        raws = {}
        for target in ("vdb", "vdc"):
            raws[target] = tmp_path / f"{target}.raw"
            source = next(m.path for m in s.members if m.target == target)
            subprocess.run(["qemu-img", "convert", "-f", "raw", qemu_source(ceph_testbed, source), "-O", "raw",
                            str(raws[target])], check=True)  # fmt: skip
        verdict = check_ledger(raws["vdb"], raws["vdc"])
        if not verdict.ok or not verdict.state:
            violations.append(f"{s.id}: {verdict.reason}")
        service.lifecycle.delete(s.id)
    assert violations == []
    _alive(two_rbd_guest)


def _wait_ledger_progress(console: Path, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = _LEDGER_RE.findall(console.read_bytes()) if console.exists() else []
        if found:
            return int(found[-1])
        time.sleep(0.5)
    raise AssertionError(f"no ledger progress on {console} within {timeout_s:.0f} s")


def test_restore_clones_boots_verify_and_delete_respect_the_clone(
    rbd_guest: TestInstance, service: Freezeframe, ceph_testbed: CephTestbed, tmp_path: Path
) -> None:
    lc = service.lifecycle
    s = service.snapshot(SnapshotRequest(rbd_guest.name))
    report = lc.verify(s.id)
    assert report.ok, report
    name = f"ffrbd-restored-{s.id[:6]}"
    result = lc.restore(s.id, name, start=True)
    try:
        by_target = {d.target: d.path for d in result.disks}
        assert by_target["vdc"] == f"rbd:{ceph_testbed.pool}/{name}-vdc"
        # the restored guest boots from its file clones + RBD clone and its ledger writer runs on them
        assert _wait_ledger_progress(tmp_path / "ffhome" / "instances" / name / "console.log") >= 0
        with pytest.raises(SetHasDependants, match=f"{name}-vdc"):
            lc.delete(s.id)
        lc.delete(s.id, force=True)  # flattens the running clones (files: block pull, RBD: flatten)
        assert f"freezeframe-{s.id}" not in _rbd_snaps(ceph_testbed, rbd_guest)
    finally:
        done = lc.discard(name)
    assert f"removed RBD image {ceph_testbed.pool}/{name}-vdc" in done


def test_export_reads_the_rbd_snapshot_into_the_ova(rbd_guest: TestInstance, service: Freezeframe,
                                                    tmp_path: Path) -> None:  # fmt: skip
    s = service.snapshot(SnapshotRequest(rbd_guest.name))
    try:
        result = service.portable.export(s.id, tmp_path / "rbd.ova")
        with tarfile.open(result.path) as tar:
            vdc = next(n for n in tar.getnames() if n.endswith("vdc.qcow2"))
            tar.extract(vdc, tmp_path, filter="data")
        raw = tmp_path / "vdc.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", str(tmp_path / vdc), "-O", "raw", str(raw)], check=True)
        member = next(m for m in s.members if m.target == "vdc")
        assert hashlib.sha256(raw.read_bytes()).hexdigest() == member.sha256
        assert not list(tmp_path.glob(".ff-export-*")), "the staged copy of the RBD snapshot was left behind"
    finally:
        service.lifecycle.delete(s.id)
