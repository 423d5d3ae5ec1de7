"""The real Ceph test bed for tests: brought up once (idempotent ``up``), reached through FREEZEFRAME_CEPH_*."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from freezeframe.adapters.rbd_volumes import CephSettings, RbdVolumes
from freezeframe.flow import SnapshotRequest
from freezeframe.model import Consistency, DiskSpec, SetStatus
from freezeframe.service import Freezeframe
from freezeframe.testbed.ceph import CephTestbed, Cluster
from freezeframe.testbed.instance import TestInstance
from freezeframe.testbed.ledger import LedgerVerdict, check_ledger
from freezeframe.testbed.naive import naive_capture


@pytest.fixture(scope="module")
def ceph_testbed() -> Iterator[CephTestbed]:
    """A healthy cluster, and freezeframe's environment pointing at it for the module's duration."""
    info = Cluster().up()
    saved = {k: os.environ.get(k) for k in info.env()}
    os.environ.update(info.env())
    try:
        yield info
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def volumes_for(info: CephTestbed) -> RbdVolumes:
    return RbdVolumes(CephSettings(conf=info.conf, user=info.user, keyring=info.keyring, secret_uuid=info.secret_uuid))


def dead_conf(info: CephTestbed, where: Path) -> Path:
    """The test bed's ceph.conf with the monitor moved to a port nobody listens on: an unreachable cluster."""
    text = Path(info.conf).read_text().replace(info.mon_host, "127.0.0.1:1")
    path = where / "dead-ceph.conf"
    path.write_text(text)
    return path


def qemu_source(info: CephTestbed, source: str) -> str:
    """A member's ``rbd:POOL/IMAGE@SNAP`` with the options qemu-img needs (the documented form)."""
    return f"{source}:id={info.user}:conf={info.conf}:keyring={info.keyring}"


def readable_raw(info: CephTestbed, source: str, out: Path) -> Path:
    """A member or disk the ledger check can read: an RBD source (``rbd:POOL/IMAGE[@SNAP]``) copied to a raw file
    through QEMU's rbd driver; a file as it is."""
    if not source.startswith("rbd:"):
        return Path(source)
    subprocess.run(["qemu-img", "convert", "-f", "raw", qemu_source(info, source), "-O", "raw", str(out)], check=True)
    return out


def ledger_of(info: CephTestbed, journal: str, state: str, tmp: Path) -> LedgerVerdict:
    """The ledger verdict over the journal (vdb) and state (vdc) images, read without booting."""
    paths = [readable_raw(info, journal, tmp / "journal.raw"), readable_raw(info, state, tmp / "state.raw")]
    try:
        return check_ledger(paths[0], paths[1], tmp_dir=tmp)
    finally:
        for path in paths:
            if path.parent == tmp:
                path.unlink(missing_ok=True)


def nova_style_capture(inst: TestInstance, info: CephTestbed, tmp: Path, tag: str, gap_s: float = 1.0) -> LedgerVerdict:
    """The naive baseline: one volume after the other, no freeze (Nova's volume-backed snapshot asks Cinder for
    each volume in turn; a file disk gets its own backup job), journal first; judged, then removed."""
    volumes = volumes_for(info)
    sources: list[str] = []
    made: list[str] = []
    try:
        for n, target in enumerate(("vdb", "vdc")):
            if n:
                time.sleep(gap_s)
            disk = inst.disks[ord(target[-1]) - ord("a")]
            if disk.rbd is None:
                out = tmp / f"naive-{target}.qcow2"
                naive_capture(inst.dom, [(target, out)], gap_s=0)
                sources.append(str(out))
                continue
            spec = DiskSpec(target, "virtio", disk.rbd.volume, "raw", 0, "network", protocol="rbd")
            with volumes.open(tag, "nova-style", [spec]) as capture:
                (snap,) = capture.snapshot()
            made.append(disk.rbd.volume)
            sources.append(snap.source)
        return ledger_of(info, sources[0], sources[1], tmp)
    finally:
        volumes.remove(tag, made)


def ledger_sets(service: Freezeframe, inst: TestInstance, info: CephTestbed, level: Consistency, count: int,
                tmp: Path) -> list[float]:  # fmt: skip
    """``count`` sets at ``level``, each judged on its members as captured (RBD snapshots read in place), then
    deleted; fails on any violation. Returns the windows (freeze, or the vCPU pause at crash level)."""
    violations, windows = [], []
    for _ in range(count):
        s = service.snapshot(SnapshotRequest(inst.name, level, require=True))
        assert s.status is SetStatus.AVAILABLE and s.achieved is level
        source = {m.target: m.path for m in s.members}
        verdict = ledger_of(info, source["vdb"], source["vdc"], tmp)
        if not verdict.ok or not verdict.state:
            violations.append(f"{s.id}: {verdict.reason}")
        elif level is Consistency.APPLICATION and (
            verdict.state != verdict.last_journal or verdict.app_events[-1:] != [f"freeze i={verdict.state}"]
        ):
            violations.append(f"{s.id}: the application hook did not stop the writer at a record: {verdict}")
        window = s.pause_window_ms if level is Consistency.CRASH else s.freeze_window_ms
        if window is not None:
            windows.append(window)
        service.lifecycle.delete(s.id)
    assert violations == [], f"{len(violations)} of {count} {level} sets broke the ledger: {violations[:3]}"
    return windows
