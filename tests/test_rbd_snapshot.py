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

from ceph_helpers import ceph_testbed, dead_conf, ledger_sets, nova_style_capture
from freezeframe import wiring
from freezeframe.config import Settings
from freezeframe.errors import PreflightFailed, SetHasDependants
from freezeframe.flow import SnapshotRequest
from freezeframe.model import Consistency, SetStatus
from freezeframe.serialize import set_to_dict
from freezeframe.service import Freezeframe
from freezeframe.testbed.ceph import CephTestbed, open_pool
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance

__all__ = ["ceph_testbed"]
pytestmark = pytest.mark.vm

MiB = 1 << 20
SETS = int(os.environ.get("FREEZEFRAME_TEST_SETS_PER_LEVEL", "30"))
DISK = 16 * MiB
"""Small ledger disks: every set is read back whole (digest, ledger check), so their size is the test's time."""
_LEDGER_RE = re.compile(rb"ff-ledger (?:paused |resumed )?i=(\d+)")


@pytest.fixture(scope="module")
def rbd_guest(
    libvirt_conn: Any, guest_image: Any, ceph_testbed: CephTestbed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestInstance]:
    disks = [DiskRequest(DISK), DiskRequest(DISK), DiskRequest(DISK, ceph=ceph_testbed)]
    workdir = tmp_path_factory.mktemp("rbd-guest")
    with running_instance(libvirt_conn, disks=disks, workload="ledger", workdir=workdir, guest=guest_image) as inst:
        yield inst


@pytest.fixture
def service(tmp_path: Path, ceph_testbed: CephTestbed) -> Iterator[Freezeframe]:
    with wiring.open_service(Settings(home=tmp_path / "ffhome", agent_timeout_s=3)) as ff:
        yield ff


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


@pytest.mark.parametrize("level", [Consistency.CRASH, Consistency.FILESYSTEM, Consistency.APPLICATION])
def test_file_root_plus_rbd_volume_sets_pass_the_ledger(
    level: Consistency, rbd_guest: TestInstance, service: Freezeframe, ceph_testbed: CephTestbed, tmp_path: Path,
) -> None:  # fmt: skip
    s = service.snapshot(SnapshotRequest(rbd_guest.name, level, require=True))
    members = set_to_dict(s)["members"]
    assert [(m["target"], m["storage"]) for m in members] == [("vda", "file"), ("vdb", "file"), ("vdc", "rbd")]
    assert members[2]["source"] == f"rbd:{ceph_testbed.pool}/{rbd_guest.name}-vdc@freezeframe-{s.id}"
    service.lifecycle.delete(s.id)
    windows = ledger_sets(service, rbd_guest, ceph_testbed, level, SETS, tmp_path)
    assert len(windows) == SETS, "every set of a file + RBD guest pauses (crash) or freezes its guest"
    print(f"file+RBD {level}: {SETS} sets, 0 violations, window median {sorted(windows)[len(windows) // 2]:.0f} ms")
    assert _rbd_snaps(ceph_testbed, rbd_guest) == []
    _alive(rbd_guest)


def test_nova_style_sequential_capture_breaks_the_ledger(
    rbd_guest: TestInstance, ceph_testbed: CephTestbed, tmp_path: Path
) -> None:
    """The check above is shown able to fail in the same run: the file disk, then the RBD volume, 1 s apart."""
    verdicts = [nova_style_capture(rbd_guest, ceph_testbed, tmp_path, f"nova-{i}") for i in range(3)]
    assert [v.ok for v in verdicts] == [False] * 3, [v.reason for v in verdicts]
    assert all("state disk was captured later" in v.reason for v in verdicts), [v.reason for v in verdicts]
    assert _rbd_snaps(ceph_testbed, rbd_guest) == []


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


def test_sigkill_during_the_set_is_repaired_and_its_rbd_snapshot_removed_once_the_cluster_answers(
    rbd_guest: TestInstance, ceph_testbed: CephTestbed, tmp_path: Path
) -> None:
    """Killed as soon as its RBD snapshot exists (inside the window or just after it); the first repair runs while the
    cluster is unreachable: it thaws/resumes the guest and fails the set (clearing the journal) but cannot remove
    the snapshot; the set's row keeps it, and the next repair, with the cluster back, removes it."""
    import rbd

    home = tmp_path / "kill-home"
    env = {**os.environ, "FREEZEFRAME_HOME": str(home)}
    volume = rbd_guest.disks[2].rbd
    assert volume is not None
    proc = subprocess.Popen([sys.executable, "-m", "freezeframe.cli", "snapshot", rbd_guest.name], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        # Opened for writing so librbd keeps a watch and sees the new snapshot at once (no write is made).
        with open_pool(ceph_testbed) as ioctx, rbd.Image(ioctx, volume.volume.split("/")[1]) as img:
            deadline = time.monotonic() + 60
            while not img.list_snaps() or not any(s["name"].startswith("freezeframe-") for s in img.list_snaps()):
                assert proc.poll() is None and time.monotonic() < deadline, "no RBD snapshot while the set ran"
                time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    try:
        dead = str(dead_conf(ceph_testbed, tmp_path))
        cut_off = {**env, "FREEZEFRAME_CEPH_CONF": dead, "FREEZEFRAME_CEPH_TIMEOUT_S": "2"}
        repair = subprocess.run([sys.executable, "-m", "freezeframe.cli", "repair"], env=cut_off, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert repair.returncode == 0, repair.stderr
        assert "marked set" in repair.stdout and "repair retries" in repair.stdout, repair.stdout
        (left,) = _rbd_snaps(ceph_testbed, rbd_guest)
        _alive(rbd_guest)
        assert not list((home / "journal").glob("*.json")), "the journal entry is cleared; the set's row remembers"
        again = subprocess.run([sys.executable, "-m", "freezeframe.cli", "repair"], env=env, capture_output=True,
                               text=True, timeout=120)  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert "removed the RBD snapshots its failure left" in again.stdout, again.stdout
        assert left.removeprefix("freezeframe-") in again.stdout
        assert _rbd_snaps(ceph_testbed, rbd_guest) == []
    finally:  # whatever failed above, the guest is not left frozen for the tests after this one
        subprocess.run([sys.executable, "-m", "freezeframe.cli", "repair"], env=env, capture_output=True, timeout=120)


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
