"""The real Ceph test bed for tests: brought up once (idempotent ``up``), reached through FREEZEFRAME_CEPH_*."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from freezeframe.adapters.rbd_volumes import CephSettings, RbdVolumes
from freezeframe.flow import SnapshotRequest
from freezeframe.model import Consistency, DiskSpec, SetStatus
from freezeframe.service import Freezeframe
from freezeframe.testbed.ceph import CephTestbed, Cluster, open_pool
from freezeframe.testbed.instance import TestInstance
from freezeframe.testbed.ledger import LedgerVerdict, check_raw_ledger, raw_copy
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


CHUNK = 4 << 20


def export_rbd(ioctx: Any, source: str, out: Path) -> Path:
    """An RBD source (``rbd:POOL/IMAGE[@SNAP]``) read whole into a sparse raw file through librbd on an open pool:
    the bytes QEMU's rbd driver would read, without a process and a cluster connection per image."""
    import rbd

    pool, _, image_spec = source.removeprefix("rbd:").partition("/")
    assert pool == ioctx.get_pool_name(), f"{source} is not in the test bed's pool"
    name, _, snap = image_spec.partition("@")
    with rbd.Image(ioctx, name, snapshot=snap or None, read_only=True) as image, out.open("wb") as fh:
        size = image.size()
        for offset in range(0, size, CHUNK):
            data = image.read(offset, min(CHUNK, size - offset))
            if data.count(0) != len(data):
                fh.seek(offset)
                fh.write(data)
        fh.truncate(size)
    return out


@contextlib.contextmanager
def _throwaway_raw(ioctx: Any, source: str, out: Path) -> Iterator[Path]:
    """A raw copy of a member or disk that the ledger check may change (its ext4 journal is replayed in it)."""
    if not source.startswith("rbd:"):
        with raw_copy(Path(source), tmp_dir=out.parent, replay_journal=False) as raw:
            yield raw
        return
    try:
        yield export_rbd(ioctx, source, out)
    finally:
        out.unlink(missing_ok=True)


def ledger_of(info: CephTestbed, journal: str, state: str, tmp: Path, ioctx: Any = None) -> LedgerVerdict:
    """The ledger verdict over the journal (vdb) and state (vdc) images, read without booting; ``ioctx`` (an open
    pool) saves a cluster connection per call."""
    with contextlib.ExitStack() as stack:
        if ioctx is None and "rbd:" in journal[:4] + state[:4]:
            ioctx = stack.enter_context(open_pool(info))
        raws = [stack.enter_context(_throwaway_raw(ioctx, source, tmp / f"{role}.raw"))
                for role, source in (("journal", journal), ("state", state))]  # fmt: skip
        return check_raw_ledger(raws[0], raws[1])


def nova_style_capture(inst: TestInstance, info: CephTestbed, tmp: Path, tag: str, gap_s: float = 1.0) -> LedgerVerdict:
    """The naive baseline: one volume after the other, no freeze (Nova's volume-backed snapshot asks Cinder for
    each volume in turn; a file disk gets its own backup job), journal first; judged, then removed."""
    sources: list[str] = []
    made: list[str] = []
    with volumes_for(info) as volumes:
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
    with open_pool(info) as ioctx:
        for _ in range(count):
            _one_ledger_set(service, inst, info, level, tmp, ioctx, violations, windows)
    assert violations == [], f"{len(violations)} of {count} {level} sets broke the ledger: {violations[:3]}"
    return windows


def _one_ledger_set(service: Freezeframe, inst: TestInstance, info: CephTestbed, level: Consistency, tmp: Path,
                    ioctx: Any, violations: list[str], windows: list[float]) -> None:  # fmt: skip
    """One set taken, judged on its members as captured, its window noted, then deleted."""
    s = service.snapshot(SnapshotRequest(inst.name, level, require=True))
    assert s.status is SetStatus.AVAILABLE and s.achieved is level
    source = {m.target: m.path for m in s.members}
    verdict = ledger_of(info, source["vdb"], source["vdc"], tmp, ioctx)
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
