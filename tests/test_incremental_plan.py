"""auto/full/incremental decisions and every untrusted state, with scripted change tracking (milliseconds).

The planner decides before the guest is touched; the flow then makes incremental targets over the parent member
(relative backing file) and records what each member is. tests/test_incremental.py shows the same on a real guest.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.journal import FileJournal
from freezeframe.adapters.locks import FileLocks
from freezeframe.adapters.qemu_img import QemuImg
from freezeframe.adapters.repository import DirectoryRepository
from freezeframe.errors import InvalidRequest
from freezeframe.flow import FlowSettings, SnapshotFlow, SnapshotRequest
from freezeframe.incremental import (
    ChainPlan,
    checkpoint_name,
    plan_chain,
    prunable,
)
from freezeframe.model import (
    Consistency,
    DiskSpec,
    Hardware,
    Instance,
    InstanceState,
    Member,
    SetStatus,
    SnapshotSet,
)
from freezeframe.ports import CaptureTarget, ImageRef, ProgressCallback

MiB = 1 << 20
UUID = "11111111-2222-3333-4444-555555555555"


@dataclass
class ScriptedTracking:
    """Says which targets' bitmaps cannot be trusted; records what it was asked and what it removed."""

    lost: dict[str, str] = field(default_factory=dict)
    asked: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    live: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def untrusted(
        self, instance: Instance, checkpoint: str, created_at: datetime, targets: Sequence[str]
    ) -> Mapping[str, str]:
        self.asked.append((checkpoint, tuple(targets)))
        return {t: why for t, why in self.lost.items() if t in targets}

    def checkpoints(self, instance: Instance) -> list[str]:
        return list(self.live)

    def remove(self, instance: Instance, checkpoint: str) -> None:
        self.removed.append(checkpoint)
        if checkpoint in self.live:
            self.live.remove(checkpoint)


def _disk(target: str, size: int = 4 * MiB, fmt: str = "qcow2", source: str | None = None) -> DiskSpec:
    return DiskSpec(target, "virtio", source or f"/vm/{target}.{fmt}", fmt, size)


DISKS = (_disk("vda"), _disk("vdb"))


def _instance(disks: Sequence[DiskSpec] = DISKS, state: InstanceState = InstanceState.RUNNING) -> Instance:
    return Instance("vm1", UUID, state, Hardware(vcpus=1, memory_kib=1024, arch="x86_64", machine=None,
                                                 disks=tuple(disks)))  # fmt: skip


def _set(set_id: str, disks: Sequence[DiskSpec] = DISKS, *, depth: int = 0, checkpoint: bool = True) -> SnapshotSet:
    members = []
    for d in disks:
        meta = {"freezeframe.kind": "incremental" if depth else "full", "freezeframe.chain_depth": str(depth)}
        if checkpoint:
            meta["freezeframe.checkpoint"] = checkpoint_name(set_id)
        path = f"/repo/{set_id}/{d.target}.qcow2"
        members.append(Member(set_id, d.target, "virtio", None, d.virtual_size, "qcow2", path, d.source_path,
                              metadata=meta))  # fmt: skip
    return SnapshotSet(set_id, "s", "vm1", UUID, Consistency.CRASH, SetStatus.AVAILABLE, datetime.now(UTC),
                       _instance(disks).hardware, members=members)  # fmt: skip


def _plan(
    *,
    mode: str = "auto",
    max_chain: int = 7,
    disks: Sequence[DiskSpec] = DISKS,
    parent: SnapshotSet | None = None,
    present: bool = True,
    tracking: ScriptedTracking | None = None,
    state: InstanceState = InstanceState.RUNNING,
) -> ChainPlan:
    return plan_chain(
        mode=mode, max_chain=max_chain, instance=_instance(disks, state), disks=disks, set_id="new", parent=parent,
        parent_present=present, tracking=tracking if tracking is not None else ScriptedTracking(),
    )  # fmt: skip


def _kinds(plan: ChainPlan) -> dict[str, str]:
    return {t: p.kind for t, p in plan.members.items()}


def _reasons(plan: ChainPlan) -> dict[str, str | None]:
    return {t: p.reason for t, p in plan.members.items()}


def test_auto_builds_on_a_trusted_parent() -> None:
    tracking = ScriptedTracking()
    plan = _plan(parent=_set("p"), tracking=tracking)
    assert _kinds(plan) == {"vda": "incremental", "vdb": "incremental"}
    assert plan.checkpoint == "ff-new"
    assert tracking.asked == [("ff-p", ("vda", "vdb"))], "the bitmaps were checked before deciding"
    assert plan.parents() == {"vda": "/repo/p/vda.qcow2", "vdb": "/repo/p/vdb.qcow2"}
    meta = plan.members["vda"].metadata(plan.checkpoint)
    assert meta == {
        "freezeframe.kind": "incremental", "freezeframe.parent_set": "p", "freezeframe.chain_depth": "1",
        "freezeframe.checkpoint": "ff-new",
    }  # fmt: skip


def test_first_set_is_full_with_the_reason_and_starts_tracking() -> None:
    plan = _plan()
    assert _kinds(plan) == {"vda": "full", "vdb": "full"}
    assert all("first set" in (r or "") for r in _reasons(plan).values())
    assert plan.checkpoint == "ff-new" and all(p.bitmap for p in plan.members.values())


def test_full_mode_gives_full_members_without_a_reason_but_still_a_checkpoint() -> None:
    tracking = ScriptedTracking()
    plan = _plan(mode="full", parent=_set("p"), tracking=tracking)
    assert _kinds(plan) == {"vda": "full", "vdb": "full"}
    assert _reasons(plan) == {"vda": None, "vdb": None}
    assert plan.checkpoint == "ff-new" and tracking.asked == []


@pytest.mark.parametrize(
    ("lost", "expected"),
    [
        ("bitmap ff-p is inconsistent: QEMU stopped without saving it (killed or crashed)", "inconsistent"),
        ("bitmap ff-p is not in the image: QEMU stopped without saving it", "not in the image"),
        ("bitmap ff-p is not persistent", "not persistent"),
        ("bitmap ff-p is in use by another job", "in use"),
        ("checkpoint ff-p is gone from libvirt and cannot be redefined (no bitmap)", "cannot be redefined"),
    ],
)
def test_a_bitmap_that_may_miss_writes_gives_that_disk_a_full_member(lost: str, expected: str) -> None:
    plan = _plan(parent=_set("p"), tracking=ScriptedTracking(lost={"vdb": lost}))
    assert _kinds(plan) == {"vda": "incremental", "vdb": "full"}
    assert expected in (plan.members["vdb"].reason or "")
    assert plan.members["vdb"].parent is None and plan.members["vdb"].since is None
    assert plan.members["vdb"].bitmap, "the full member starts a fresh chain"


@pytest.mark.parametrize(
    ("disks", "target", "expected"),
    [
        ((_disk("vda"), _disk("vdb", size=8 * MiB)), "vdb", "resized"),
        ((_disk("vda"), _disk("vdb", source="/elsewhere/vdb.qcow2")), "vdb", "replaced"),
        ((*DISKS, _disk("vdc")), "vdc", "added since"),
        ((_disk("vda"), _disk("vdb", fmt="raw")), "vdb", "raw disk cannot keep a dirty bitmap"),
    ],
)
def test_disk_changes_give_that_disk_a_full_member(disks: tuple[DiskSpec, ...], target: str, expected: str) -> None:
    plan = _plan(disks=disks, parent=_set("p"))
    assert plan.members[target].kind == "full" and expected in (plan.members[target].reason or "")
    assert plan.members["vda"].kind == "incremental"


def test_raw_disks_record_no_bitmap() -> None:
    plan = _plan(disks=(_disk("vda"), _disk("vdb", fmt="raw")))
    assert plan.members["vda"].bitmap and not plan.members["vdb"].bitmap


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"state": InstanceState.SHUTOFF}, "shutoff: changed blocks are read from a running QEMU only"),
        ({"present": False}, "missing from the repository"),
        ({"parent_checkpoint": False}, "has no checkpoint"),
    ],
)
def test_set_wide_reasons(kwargs: dict[str, object], expected: str) -> None:
    parent = _set("p", checkpoint=bool(kwargs.pop("parent_checkpoint", True)))
    plan = _plan(parent=parent, **kwargs)  # type: ignore[arg-type]
    assert _kinds(plan) == {"vda": "full", "vdb": "full"}
    assert all(expected in (r or "") for r in _reasons(plan).values()), _reasons(plan)


def test_shut_off_instance_creates_no_checkpoint() -> None:
    assert _plan(parent=_set("p"), state=InstanceState.SHUTOFF).checkpoint is None


def test_no_change_tracking_means_full_members() -> None:
    plan = plan_chain(mode="auto", max_chain=7, instance=_instance(), disks=DISKS, set_id="new", parent=_set("p"),
                      parent_present=True, tracking=None)  # fmt: skip
    assert plan.checkpoint is None
    assert all("no change tracking" in (r or "") for r in _reasons(plan).values())


def test_chain_limit_forces_full_in_auto_only() -> None:
    parent = _set("p", depth=3)
    assert _kinds(_plan(parent=parent, max_chain=3)) == {"vda": "full", "vdb": "full"}
    assert "chain limit reached (3" in (_plan(parent=parent, max_chain=3).members["vda"].reason or "")
    assert _kinds(_plan(parent=parent, max_chain=4)) == {"vda": "incremental", "vdb": "incremental"}
    assert _kinds(_plan(mode="incremental", parent=parent, max_chain=3)) == {"vda": "incremental", "vdb": "incremental"}
    assert _plan(parent=parent, max_chain=4).members["vda"].metadata("ff-new")["freezeframe.chain_depth"] == "4"


def test_mode_and_chain_limit_are_validated() -> None:
    with pytest.raises(InvalidRequest, match="--mode"):
        SnapshotRequest("vm1", mode="differential")
    with pytest.raises(InvalidRequest, match="--max-chain"):
        SnapshotRequest("vm1", max_chain=-1)


def test_only_the_newest_sets_checkpoints_stay_live() -> None:
    sets = [_set("s3"), _set("s2", checkpoint=False), _set("s1"), _set("s0")]
    live = ["ff-s0", "ff-s1", "ff-s3", "ff-failed", "someone-elses"]
    assert prunable(live, sets) == ["ff-s0", "ff-failed"]


# ---- the flow with change tracking ------------------------------------------------------------------------------


@dataclass
class CapturingHypervisor:
    """Records the capture targets; the copy itself is left out (targets stay as prepared)."""

    disks: tuple[DiskSpec, ...]
    state_now: InstanceState = InstanceState.RUNNING
    captured: list[list[CaptureTarget]] = field(default_factory=list)

    def lookup(self, ref: str) -> Instance:
        return replace(_instance(self.disks), state=self.state_now)

    def state(self, instance: Instance) -> InstanceState:
        return self.state_now

    def agent_ping(self, instance: Instance) -> None:
        return None

    def freeze(self, instance: Instance) -> int:
        return 1

    def thaw(self, instance: Instance) -> int:
        return 1

    def pause(self, instance: Instance) -> None:
        return None

    def paused_by_io_error(self, instance: Instance) -> bool:
        return False

    def resume(self, instance: Instance) -> None:
        return None

    def supports_atomic_capture(self, instance: Instance) -> bool:
        return True

    def start_capture(self, instance: Instance, targets: Sequence[CaptureTarget]) -> None:
        self.captured.append(list(targets))

    def wait_capture(self, instance: Instance, progress: ProgressCallback | None) -> None:
        return None

    def abort_capture(self, instance: Instance) -> None:
        return None

    def capture_in_flight(self, instance: Instance) -> bool:
        return False

    def copy_offline(
        self, instance: Instance, targets: Sequence[CaptureTarget], progress: ProgressCallback | None
    ) -> None:
        self.captured.append(list(targets))


def _flow(tmp_path: Path, hv: CapturingHypervisor, tracking: ScriptedTracking) -> SnapshotFlow:
    catalog = SqlCatalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    return SnapshotFlow(
        hv, catalog, DirectoryRepository(tmp_path / "repo", QemuImg()), FileJournal(tmp_path / "journal"),
        FileLocks(tmp_path / "locks"), FlowSettings(thaw_retry_s=1.0), tracking=tracking,
    )  # fmt: skip


def test_flow_makes_incremental_targets_over_the_parent_and_records_the_chain(tmp_path: Path) -> None:
    hv, tracking = CapturingHypervisor(DISKS), ScriptedTracking()
    flow = _flow(tmp_path, hv, tracking)
    first = flow.snapshot(SnapshotRequest("vm1"))
    tracking.live.append(checkpoint_name(first.id))
    second = flow.snapshot(SnapshotRequest("vm1"))

    assert [(t.since, t.checkpoint) for t in hv.captured[0]] == [(None, f"ff-{first.id}")] * 2
    assert [(t.since, t.checkpoint) for t in hv.captured[1]] == [(f"ff-{first.id}", f"ff-{second.id}")] * 2
    child = QemuImg().info(ImageRef(hv.captured[1][0].path, "qcow2"))
    assert child.backing == str(Path(first.members[0].path).resolve())
    header = hv.captured[1][0].path.read_bytes()[:4096]
    assert f"../{first.id}/vda.qcow2".encode() in header, "the backing file is named relative to the repository"
    for m in second.members:
        assert m.metadata["freezeframe.kind"] == "incremental"
        assert m.metadata["freezeframe.parent_set"] == first.id
        assert int(m.metadata["freezeframe.bytes_written"]) > 0
    assert all("first set" in m.metadata["freezeframe.full_reason"] for m in first.members)


def test_flow_prunes_checkpoints_beyond_the_newest_two(tmp_path: Path) -> None:
    hv, tracking = CapturingHypervisor(DISKS), ScriptedTracking()
    flow = _flow(tmp_path, hv, tracking)
    ids = []
    for _ in range(3):
        s = flow.snapshot(SnapshotRequest("vm1"))
        tracking.live.append(checkpoint_name(s.id))
        ids.append(s.id)
    flow.snapshot(SnapshotRequest("vm1", mode="full"))
    assert f"ff-{ids[0]}" in tracking.removed and f"ff-{ids[1]}" in tracking.removed
    assert f"ff-{ids[2]}" in tracking.live


def test_shut_off_instance_gets_a_reasoned_full_set(tmp_path: Path) -> None:
    hv, tracking = CapturingHypervisor(DISKS), ScriptedTracking()
    flow = _flow(tmp_path, hv, tracking)
    flow.snapshot(SnapshotRequest("vm1"))
    hv.state_now = InstanceState.SHUTOFF
    off = flow.snapshot(SnapshotRequest("vm1"))
    assert {m.metadata["freezeframe.kind"] for m in off.members} == {"full"}
    assert all("shutoff" in m.metadata["freezeframe.full_reason"] for m in off.members)
    assert all(t.checkpoint is None and t.since is None for t in hv.captured[-1])


def test_api_body_mode_reaches_the_snapshot_request() -> None:
    from freezeframe.api.routes_snapshots import order_from_body
    from freezeframe.api.schemas import SnapshotCreate

    order = order_from_body(SnapshotCreate(mode="full", max_chain=3))
    assert (order.mode, order.max_chain) == ("full", 3)
    with pytest.raises(ValueError, match="mode"):
        SnapshotCreate(mode="differential")  # type: ignore[arg-type]


def test_a_copy_finished_by_another_process_records_the_chain_too(tmp_path: Path) -> None:
    hv, tracking = CapturingHypervisor(DISKS), ScriptedTracking()
    flow = _flow(tmp_path, hv, tracking)
    first = flow.snapshot(SnapshotRequest("vm1"))
    handed: list[str] = []
    flow.snapshot(SnapshotRequest("vm1"), handoff=lambda s, _lock: handed.append(s.id))
    done = flow.complete(handed[0])
    assert {m.metadata["freezeframe.parent_set"] for m in done.members} == {first.id}
    assert {m.metadata["freezeframe.kind"] for m in done.members} == {"incremental"}


def test_change_tracking_that_cannot_be_read_gives_full_members() -> None:
    from freezeframe.errors import HypervisorError

    class Broken(ScriptedTracking):
        def untrusted(
            self, instance: Instance, checkpoint: str, created_at: datetime, targets: Sequence[str]
        ) -> Mapping[str, str]:
            raise HypervisorError("monitor gone")

    plan = _plan(parent=_set("p"), tracking=Broken())
    assert _kinds(plan) == {"vda": "full", "vdb": "full"}
    assert all("could not be read (monitor gone)" in (r or "") for r in _reasons(plan).values())


def test_a_member_of_a_raw_block_device_keeps_no_zeros(tmp_path: Path) -> None:
    """The backup job copies a block device's zeros as data (it cannot tell them apart); the member is rewritten
    without them. A file-backed disk's member is left alone (its holes were never copied)."""
    repo = DirectoryRepository(tmp_path / "repo", QemuImg())
    block = DiskSpec("vdb", "virtio", "/dev/loop9", "raw", 16 * MiB, source_type="block")
    file = DiskSpec("vdc", "virtio", "/vm/vdc.img", "raw", 16 * MiB)
    targets = repo.prepare("s1", [block, file])
    for target in targets:  # what the backup job leaves: 1 MiB of data, then zeros written as data
        command = ["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1M", "-c", f"write -P 0 1M {15 * MiB}"]
        subprocess.run([*command, str(target.path)], check=True, capture_output=True)
    before = {t.disk.target: repo.written_bytes(t.path) for t in targets}
    repo.drop_zeros(targets)
    after = {t.disk.target: repo.written_bytes(t.path) for t in targets}
    assert before["vdb"] > 15 * MiB and after["vdb"] < 2 * MiB, (before, after)
    assert after["vdc"] == before["vdc"], "a file disk's member is not rewritten"
    same = ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(targets[0].path), str(targets[1].path)]
    assert subprocess.run(same, capture_output=True).returncode == 0, "the content is unchanged"
    assert oct(targets[0].path.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in targets[0].path.parent.iterdir()) == ["vdb.qcow2", "vdc.qcow2"]
