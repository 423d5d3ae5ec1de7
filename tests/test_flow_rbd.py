"""RBD volumes in the snapshot flow, driven by scripted adapters: order inside the window, members, faults, repair.

The real cluster and a real guest show the same in tests/test_rbd_real.py; these pin down the failure timings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.journal import FileJournal
from freezeframe.adapters.locks import FileLocks
from freezeframe.adapters.qemu_img import QemuImg
from freezeframe.adapters.repository import DirectoryRepository
from freezeframe.errors import AgentUnavailable, CaptureFailed, PreflightFailed
from freezeframe.flow import FlowSettings, SnapshotFlow, SnapshotRequest
from freezeframe.model import Consistency, DiskSpec, Instance, InstanceState, SetStatus
from freezeframe.ports import JournalEntry
from freezeframe.ports.volumes import VOLUMES_KEY, VolumeSnapshot
from freezeframe.serialize import set_to_dict
from freezeframe.volume_members import LEFTOVER_KEY
from test_flow import ScriptedHypervisor, _disks

MiB = 1 << 20
Parts = tuple[SqlCatalog, DirectoryRepository, FileJournal, FileLocks]


def rbd_disk(target: str, image: str) -> DiskSpec:
    return DiskSpec(target, "virtio", f"pool/{image}", "raw", 8 * MiB, source_type="network", protocol="rbd")


@dataclass
class ScriptedVolumes:
    """A cluster in a dict: volume -> its snapshots; failures switched on per test."""

    calls: list[str]
    snaps: dict[str, set[str]] = field(default_factory=dict)
    unreachable: bool = False
    fail_on: str | None = None
    """Snapshots of this volume fail inside the window (pool full, OSD gone)."""

    @contextlib.contextmanager
    def open(self, set_id: str, set_name: str, disks: Sequence[DiskSpec]) -> Iterator[_Capture]:
        if self.unreachable:
            raise PreflightFailed("the Ceph cluster (ceph.conf, client.x) cannot be reached: timed out")
        self.calls.append(f"open:{len(disks)}")
        try:
            yield _Capture(self, set_id, disks)
        finally:
            self.calls.append("close")

    def existing(self, set_id: str, disks: Sequence[DiskSpec]) -> list[VolumeSnapshot]:
        return [VolumeSnapshot(d, f"ff-{set_id}", f"rbd:{d.source_path}@ff-{set_id}") for d in disks]

    def checksum(self, snapshot: VolumeSnapshot) -> str:
        return "ab" * 32

    def remove(self, set_id: str, volumes: Sequence[str]) -> list[str]:
        self.calls.append("remove")
        if self.unreachable:
            raise PreflightFailed("the Ceph cluster (ceph.conf, client.x) cannot be reached: timed out")
        removed = []
        for volume in volumes:
            if f"ff-{set_id}" in self.snaps.get(volume, set()):
                self.snaps[volume].discard(f"ff-{set_id}")
                removed.append(volume)
        return removed

    def left(self) -> list[str]:
        return sorted(f"{v}@{s}" for v, names in self.snaps.items() for s in names)


@dataclass
class _Capture:
    volumes: ScriptedVolumes
    set_id: str
    disks: Sequence[DiskSpec]

    def snapshot(self) -> list[VolumeSnapshot]:
        made = []
        for d in self.disks:
            volume = str(d.source_path)
            if volume == self.volumes.fail_on:
                raise CaptureFailed(f"RBD snapshot of {volume} failed: [errno 122] quota exceeded (pool full)")
            self.volumes.calls.append(f"rbd:{volume}")
            self.volumes.snaps.setdefault(volume, set()).add(f"ff-{self.set_id}")
            made.append(VolumeSnapshot(d, f"ff-{self.set_id}", f"rbd:{volume}@ff-{self.set_id}"))
        return made


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    return (
        SqlCatalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}"),
        DirectoryRepository(tmp_path / "repo", QemuImg()),
        FileJournal(tmp_path / "journal"),
        FileLocks(tmp_path / "locks"),
    )


def _setup(parts: Parts, disks: tuple[DiskSpec, ...], **volumes: object) -> tuple[ScriptedHypervisor, ScriptedVolumes,
                                                                                   SnapshotFlow]:  # fmt: skip
    hv = ScriptedHypervisor(disks=disks)
    vols = ScriptedVolumes(hv.calls, **volumes)  # type: ignore[arg-type]
    return hv, vols, SnapshotFlow(hv, *parts, settings=FlowSettings(thaw_retry_s=2.0), volumes=vols)


def test_mixed_filesystem_level_snapshots_rbd_inside_the_same_freeze(parts: Parts) -> None:
    hv, vols, flow = _setup(parts, (*_disks(1), rbd_disk("vdb", "data")))
    result = flow.snapshot(SnapshotRequest("vm1"))
    assert hv.calls == ["ping", "open:1", "freeze", "capture:1", "rbd:pool/data", "thaw", "close", "wait"]
    assert result.status is SetStatus.AVAILABLE and [m.target for m in result.members] == ["vda", "vdb"]
    members = set_to_dict(result)["members"]
    assert [m["storage"] for m in members] == ["file", "rbd"]
    assert members[0]["source"].endswith("vda.qcow2")
    assert members[1]["source"] == f"rbd:pool/data@ff-{result.id}" and members[1]["sha256"] == "ab" * 32
    assert members[1]["metadata"]["freezeframe.set_uuid"] == result.id
    assert vols.left() == [f"pool/data@ff-{result.id}"]


def test_mixed_crash_level_pauses_the_vcpus_around_both_captures(parts: Parts) -> None:
    hv, _, flow = _setup(parts, (*_disks(1), rbd_disk("vdb", "data")))
    flow.snapshot(SnapshotRequest("vm1", Consistency.CRASH))
    assert hv.calls == ["open:1", "pause", "capture:1", "rbd:pool/data", "resume", "close", "wait"]


def test_only_rbd_crash_level_pauses_for_several_images_not_for_one(parts: Parts) -> None:
    hv, _, flow = _setup(parts, (rbd_disk("vda", "root"), rbd_disk("vdb", "data")))
    result = flow.snapshot(SnapshotRequest("vm1", Consistency.CRASH))
    assert hv.calls == ["open:2", "pause", "rbd:pool/root", "rbd:pool/data", "resume", "close"]
    assert result.pause_window_ms is not None and [m.store for m in result.members] == ["rbd", "rbd"]
    hv, _, flow = _setup(parts, (rbd_disk("vda", "solo"),))
    flow.snapshot(SnapshotRequest("vm1", Consistency.CRASH))
    assert hv.calls == ["open:1", "rbd:pool/solo", "close"]


def test_only_rbd_filesystem_level_freezes_without_backup_job(parts: Parts) -> None:
    hv, _, flow = _setup(parts, (rbd_disk("vda", "root"), rbd_disk("vdb", "data")))
    result = flow.snapshot(SnapshotRequest("vm1"))
    assert hv.calls == ["ping", "open:2", "freeze", "rbd:pool/root", "rbd:pool/data", "thaw", "close"]
    assert result.achieved is Consistency.FILESYSTEM


def test_pool_full_inside_the_window_thaws_removes_made_snapshots_and_fails_the_set(parts: Parts) -> None:
    hv, vols, flow = _setup(parts, (*_disks(1), rbd_disk("vdb", "a"), rbd_disk("vdc", "b")), fail_on="pool/b")
    with pytest.raises(CaptureFailed, match="pool full"):
        flow.snapshot(SnapshotRequest("vm1"))
    assert not hv.frozen and hv.state_now is InstanceState.RUNNING and "abort" in hv.calls
    assert hv.calls.index("rbd:pool/a") < hv.calls.index("thaw") < hv.calls.index("remove")
    assert vols.left() == []
    (failed,) = parts[0].list_sets()
    assert failed.status is SetStatus.FAILED and "pool full" in (failed.error or "")
    assert not parts[1].exists(failed.id) and parts[2].pending() == []


def test_unreachable_cluster_fails_before_the_guest_is_touched(parts: Parts) -> None:
    hv, _, flow = _setup(parts, (*_disks(1), rbd_disk("vdb", "data")), unreachable=True)
    with pytest.raises(PreflightFailed, match="cannot be reached"):
        flow.snapshot(SnapshotRequest("vm1"))
    assert "freeze" not in hv.calls and "pause" not in hv.calls and not hv.frozen
    (failed,) = parts[0].list_sets()
    assert failed.status is SetStatus.FAILED and not parts[1].exists(failed.id)


def test_repair_removes_the_snapshots_a_killed_process_made(parts: Parts) -> None:
    hv, vols, flow = _setup(parts, (*_disks(1), rbd_disk("vdb", "data")))
    leftover = flow.snapshot(SnapshotRequest("vm1"))
    leftover.status = SetStatus.CREATING
    parts[0].update_set(leftover)
    hv.frozen, hv.state_now = True, InstanceState.PAUSED
    entry = JournalEntry(hv.lookup("vm1").uuid, "vm1", leftover.id, 999999, "window", froze=True, paused=True,
                         capture_started=True, extra={VOLUMES_KEY: "pool/data"})  # fmt: skip
    parts[2].record(entry)
    assert vols.left() == [f"pool/data@ff-{leftover.id}"]
    (report,) = flow.repair()
    assert "thawed" in report and "resumed" in report
    assert vols.left() == [] and not hv.frozen and hv.state_now is InstanceState.RUNNING
    assert parts[0].get_set(leftover.id).status is SetStatus.FAILED and parts[2].pending() == []


def test_snapshots_a_failed_set_could_not_remove_are_removed_by_a_later_repair(parts: Parts) -> None:
    """Pool full inside the window, then the cluster gone: the journal is cleared, the set row remembers."""
    hv, vols, flow = _setup(parts, (*_disks(1), rbd_disk("vdb", "a"), rbd_disk("vdc", "b")), fail_on="pool/b")

    def lose_the_cluster(set_id: str, volumes: Sequence[str]) -> list[str]:
        vols.unreachable = True
        return ScriptedVolumes.remove(vols, set_id, volumes)

    vols.remove = lose_the_cluster  # type: ignore[method-assign]
    with pytest.raises(CaptureFailed, match="pool full"):
        flow.snapshot(SnapshotRequest("vm1"))
    (failed,) = parts[0].list_sets()
    assert parts[2].pending() == [] and not hv.frozen and hv.state_now is InstanceState.RUNNING
    assert vols.left() == [f"pool/a@ff-{failed.id}"]
    assert failed.metadata[LEFTOVER_KEY] == "pool/a,pool/b"
    assert "still cannot be removed" in flow.repair()[0]
    del vols.remove
    vols.unreachable = False
    (report,) = flow.repair()
    assert f"set {failed.id}: removed the RBD snapshots" in report and vols.left() == []
    assert LEFTOVER_KEY not in parts[0].get_set(failed.id).metadata
    assert flow.repair() == []


def test_repair_while_the_cluster_is_unreachable_keeps_the_removal_for_later(parts: Parts) -> None:
    hv, vols, flow = _setup(parts, (*_disks(1), rbd_disk("vdb", "data")))
    leftover = flow.snapshot(SnapshotRequest("vm1"))
    leftover.status = SetStatus.CREATING
    parts[0].update_set(leftover)
    hv.frozen = True
    parts[2].record(JournalEntry(hv.lookup("vm1").uuid, "vm1", leftover.id, 999999, "window", froze=True,
                                 extra={VOLUMES_KEY: "pool/data"}))  # fmt: skip
    vols.unreachable = True
    (report, still) = flow.repair()
    assert "thawed" in report and "repair retries" in report and "still cannot be removed" in still
    assert parts[2].pending() == [] and parts[0].get_set(leftover.id).status is SetStatus.FAILED
    assert vols.left() == [f"pool/data@ff-{leftover.id}"]
    vols.unreachable = False
    assert "removed the RBD snapshots" in flow.repair()[0] and vols.left() == []


def test_other_network_protocols_are_refused_naming_exclude_disk(parts: Parts) -> None:
    nbd = DiskSpec("vdb", "virtio", "export", "raw", 0, source_type="network", protocol="nbd")
    hv, _, flow = _setup(parts, (*_disks(1), nbd))
    with pytest.raises(PreflightFailed, match=r"vdb \(network nbd/raw\).*--exclude-disk"):
        flow.snapshot(SnapshotRequest("vm1"))
    assert hv.calls == []
    result = flow.snapshot(SnapshotRequest("vm1", exclude_disks=("vdb",)))
    assert [m.target for m in result.members] == ["vda"]


def test_rbd_disks_without_a_configured_cluster_are_a_clear_preflight_error(parts: Parts) -> None:
    hv = ScriptedHypervisor(disks=(*_disks(1), rbd_disk("vdb", "data")))
    with pytest.raises(PreflightFailed, match="FREEZEFRAME_CEPH_CONF"):
        SnapshotFlow(hv, *parts).snapshot(SnapshotRequest("vm1"))
    assert "freeze" not in hv.calls


def test_shut_off_instance_copies_files_and_snapshots_volumes_without_a_window(parts: Parts) -> None:
    hv, _, flow = _setup(parts, (*_disks(1), rbd_disk("vdb", "data")))
    hv.state_now = InstanceState.SHUTOFF
    result = flow.snapshot(SnapshotRequest("vm1"))
    assert hv.calls == ["open:1", "copy_offline:1", "rbd:pool/data", "close"]
    assert [m.store for m in result.members] == ["file", "rbd"]


class _FreezeFails(ScriptedHypervisor):
    def freeze(self, instance: Instance) -> int:
        self.calls.append("freeze")
        raise AgentUnavailable("guest agent timed out")


def test_mixed_set_whose_freeze_fails_falls_back_to_a_paused_crash_capture(parts: Parts) -> None:
    """Without the freeze, the backup job and the RBD snapshot meet at one instant only with the vCPUs paused."""
    hv = _FreezeFails(disks=(*_disks(1), rbd_disk("vdb", "data")))
    flow = SnapshotFlow(hv, *parts, settings=FlowSettings(thaw_retry_s=2.0), volumes=ScriptedVolumes(hv.calls))
    result = flow.snapshot(SnapshotRequest("vm1"))
    assert result.achieved is Consistency.CRASH and "freeze failed" in (result.reason or "")
    paused, resumed = hv.calls.index("pause"), hv.calls.index("resume")
    assert paused < hv.calls.index("capture:1") < resumed and paused < hv.calls.index("rbd:pool/data") < resumed
    assert result.pause_window_ms is not None
