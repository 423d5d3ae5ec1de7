"""The orchestrator's ordering and failure paths, driven through a scripted in-process hypervisor.

These run in milliseconds and pin down the guarantees (never left frozen or paused, nothing half-made left)
for failure timings that are hard to hit on a real guest; tests/test_snapshot.py shows the same on real VMs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.journal import FileJournal
from freezeframe.adapters.locks import FileLocks
from freezeframe.adapters.qemu_img import QemuImg
from freezeframe.adapters.repository import DirectoryRepository
from freezeframe.errors import (
    AgentUnavailable,
    CaptureFailed,
    ConsistencyUnavailable,
    FreezeWindowExceeded,
    InstanceBusy,
    InsufficientSpace,
    InvalidRequest,
    PreflightFailed,
)
from freezeframe.flow import FlowSettings, SnapshotFlow, SnapshotRequest
from freezeframe.model import Consistency, DiskSpec, Hardware, Instance, InstanceState, SetStatus
from freezeframe.ports import CaptureTarget, ProgressCallback

MiB = 1 << 20


@dataclass
class ScriptedHypervisor:
    """Records every guest-visible call; failures are switched on per test."""

    state_now: InstanceState = InstanceState.RUNNING
    disks: tuple[DiskSpec, ...] = ()
    atomic: bool = True
    agent_ok: bool = True
    freeze_hang_s: float = 0.0
    capture_fails: bool = False
    thaw_failures_left: int = 0
    calls: list[str] = field(default_factory=list)
    frozen: bool = False
    in_flight: bool = False
    clean_shutdown: bool = True
    resumed_at: float = 0.0
    paused_at: float = 0.0

    def lookup(self, ref: str) -> Instance:
        hw = Hardware(vcpus=1, memory_kib=262144, arch="x86_64", machine="pc", disks=self.disks)
        return Instance("vm1", "11111111-2222-3333-4444-555555555555", self.state_now, hw, self.clean_shutdown)

    def state(self, instance: Instance) -> InstanceState:
        return self.state_now

    def agent_ping(self, instance: Instance) -> None:
        self.calls.append("ping")
        if not self.agent_ok:
            raise AgentUnavailable("guest agent is not connected")

    def freeze(self, instance: Instance) -> int:
        self.calls.append("freeze")
        if self.freeze_hang_s:
            time.sleep(self.freeze_hang_s)
            self.frozen = True  # the guest froze after all, past our timeout
            raise AgentUnavailable("guest agent timed out")
        if not self.agent_ok:
            raise AgentUnavailable("guest agent is not connected")
        self.frozen = True
        return len(self.disks)

    def thaw(self, instance: Instance) -> int:
        self.calls.append("thaw")
        if self.thaw_failures_left:
            self.thaw_failures_left -= 1
            raise AgentUnavailable("guest agent busy")
        self.frozen = False
        return len(self.disks)

    def pause(self, instance: Instance) -> None:
        self.calls.append("pause")
        self.paused_at = time.monotonic()
        self.state_now = InstanceState.PAUSED

    def paused_by_io_error(self, instance: Instance) -> bool:
        return False

    def resume(self, instance: Instance) -> None:
        self.calls.append("resume")
        self.resumed_at = time.monotonic()
        self.state_now = InstanceState.RUNNING

    def supports_atomic_capture(self, instance: Instance) -> bool:
        return self.atomic

    def start_capture(self, instance: Instance, targets: Sequence[CaptureTarget]) -> None:
        self.calls.append(f"capture:{len(targets)}")
        self.in_flight = True

    def wait_capture(self, instance: Instance, progress: ProgressCallback | None) -> None:
        self.calls.append("wait")
        self.in_flight = False
        if self.capture_fails:
            raise CaptureFailed("No space left on device")

    def abort_capture(self, instance: Instance) -> None:
        self.calls.append("abort")
        self.in_flight = False

    def capture_in_flight(self, instance: Instance) -> bool:
        return self.in_flight

    def copy_offline(
        self, instance: Instance, targets: Sequence[CaptureTarget], progress: ProgressCallback | None
    ) -> None:
        self.calls.append(f"copy_offline:{len(targets)}")


def _disks(n: int = 3) -> tuple[DiskSpec, ...]:
    return tuple(
        DiskSpec(
            target=f"vd{chr(97 + i)}",
            bus="virtio",
            source_path=f"/nowhere/{i}.qcow2",
            format="qcow2",
            virtual_size=4 * MiB,
            boot_order=1 if i == 0 else None,
        )
        for i in range(n)
    )


@pytest.fixture
def parts(tmp_path: Path) -> tuple[SqlCatalog, DirectoryRepository, FileJournal, FileLocks]:
    catalog = SqlCatalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    return (
        catalog,
        DirectoryRepository(tmp_path / "repo", QemuImg()),
        FileJournal(tmp_path / "journal"),
        FileLocks(tmp_path / "locks"),
    )


def _flow(hv: ScriptedHypervisor, parts: tuple[SqlCatalog, DirectoryRepository, FileJournal, FileLocks],
          **settings: float) -> SnapshotFlow:  # fmt: skip
    return SnapshotFlow(hv, *parts, settings=FlowSettings(**{"thaw_retry_s": 2.0, **settings}))


def test_filesystem_level_order_is_freeze_capture_thaw_then_wait(parts) -> None:  # type: ignore[no-untyped-def]
    hv = ScriptedHypervisor(disks=_disks())
    result = _flow(hv, parts).snapshot(SnapshotRequest("vm1"))
    assert hv.calls == ["ping", "freeze", "capture:3", "thaw", "wait"]
    assert result.status is SetStatus.AVAILABLE
    assert result.achieved is Consistency.FILESYSTEM
    assert result.freeze_window_ms is not None and result.freeze_window_ms >= 0
    assert result.pause_window_ms is None
    assert [m.target for m in result.members] == ["vda", "vdb", "vdc"]
    assert all(m.metadata["freezeframe.set_uuid"] == result.id for m in result.members)
    assert all(len(m.sha256 or "") == 64 for m in result.members)
    assert parts[0].get_set(result.id).status is SetStatus.AVAILABLE
    assert parts[2].pending() == []


def test_application_level_freezes_too(parts) -> None:  # type: ignore[no-untyped-def]
    hv = ScriptedHypervisor(disks=_disks())
    result = _flow(hv, parts).snapshot(SnapshotRequest("vm1", Consistency.APPLICATION, require=True))
    assert hv.calls == ["ping", "freeze", "capture:3", "thaw", "wait"]
    assert result.achieved is Consistency.APPLICATION and result.freeze_window_ms is not None


def test_crash_level_touches_no_agent(parts) -> None:  # type: ignore[no-untyped-def]
    hv = ScriptedHypervisor(disks=_disks())
    result = _flow(hv, parts).snapshot(SnapshotRequest("vm1", Consistency.CRASH))
    assert hv.calls == ["capture:3", "wait"]
    assert result.achieved is Consistency.CRASH and result.freeze_window_ms is None


def test_without_atomic_capture_vcpus_are_paused_inside_the_freeze(parts) -> None:  # type: ignore[no-untyped-def]
    hv = ScriptedHypervisor(disks=_disks(), atomic=False)
    result = _flow(hv, parts).snapshot(SnapshotRequest("vm1"))
    assert hv.calls == ["ping", "freeze", "pause", "capture:3", "resume", "thaw", "wait"]
    assert result.pause_window_ms is not None


def test_no_agent_falls_back_to_crash_and_says_why(parts) -> None:  # type: ignore[no-untyped-def]
    hv = ScriptedHypervisor(disks=_disks(), agent_ok=False)
    result = _flow(hv, parts).snapshot(SnapshotRequest("vm1", Consistency.APPLICATION))
    assert result.achieved is Consistency.CRASH
    assert result.reason is not None and "agent" in result.reason
    assert "freeze" not in hv.calls


def test_require_without_agent_touches_nothing(parts) -> None:  # type: ignore[no-untyped-def]
    hv = ScriptedHypervisor(disks=_disks(), agent_ok=False)
    with pytest.raises(ConsistencyUnavailable, match="--require filesystem"):
        _flow(hv, parts).snapshot(SnapshotRequest("vm1", require=True))
    assert hv.calls == ["ping"]
    assert parts[0].list_sets() == []
    assert list((parts[1].root).iterdir()) == []


def test_freeze_timeout_that_lands_late_is_thawed_before_falling_back(parts) -> None:  # type: ignore[no-untyped-def]
    hv = ScriptedHypervisor(disks=_disks(), freeze_hang_s=0.05, thaw_failures_left=2)
    result = _flow(hv, parts).snapshot(SnapshotRequest("vm1"))
    assert not hv.frozen
    assert result.achieved is Consistency.CRASH and "freeze failed" in (result.reason or "")
    assert hv.calls.index("capture:3") > max(i for i, c in enumerate(hv.calls) if c == "thaw")


def test_watchdog_releases_the_guest_at_the_cap_and_fails_the_set(parts) -> None:  # type: ignore[no-untyped-def]
    hv = ScriptedHypervisor(disks=_disks(), atomic=False)
    flow = _flow(hv, parts, freeze_cap_s=0.2, hold_in_window_s=1.0)
    with pytest.raises(FreezeWindowExceeded):
        flow.snapshot(SnapshotRequest("vm1"))
    # Measured from the pause, not from the call: preparing the member images before the window may be slow.
    assert hv.resumed_at - hv.paused_at < 0.9, "released at the 0.2 s cap, not when the 1 s hold ended"
    assert not hv.frozen and hv.state_now is InstanceState.RUNNING
    assert "capture:3" not in hv.calls
    (failed,) = parts[0].list_sets()
    assert failed.status is SetStatus.FAILED and "cap" in (failed.error or "")
    assert not parts[1].exists(failed.id)


def test_copy_failure_fails_the_set_and_removes_its_files(parts) -> None:  # type: ignore[no-untyped-def]
    hv = ScriptedHypervisor(disks=_disks(), capture_fails=True)
    with pytest.raises(CaptureFailed, match="No space"):
        _flow(hv, parts).snapshot(SnapshotRequest("vm1"))
    (failed,) = parts[0].list_sets()
    assert failed.status is SetStatus.FAILED and failed.members == []
    assert not parts[1].exists(failed.id)
    assert not hv.frozen and parts[2].pending() == []


def test_paused_instance_stays_paused_and_is_crash_consistent(parts) -> None:  # type: ignore[no-untyped-def]
    hv = ScriptedHypervisor(disks=_disks(), state_now=InstanceState.PAUSED)
    result = _flow(hv, parts).snapshot(SnapshotRequest("vm1"))
    assert hv.calls == ["capture:3", "wait"]
    assert hv.state_now is InstanceState.PAUSED
    assert result.achieved is Consistency.CRASH and "paused" in (result.reason or "")
    with pytest.raises(ConsistencyUnavailable, match="paused"):
        _flow(hv, parts).snapshot(SnapshotRequest("vm1", require=True))


def test_shut_off_instance_is_copied_at_rest(parts) -> None:  # type: ignore[no-untyped-def]
    hv = ScriptedHypervisor(disks=_disks(), state_now=InstanceState.SHUTOFF)
    result = _flow(hv, parts).snapshot(SnapshotRequest("vm1", Consistency.APPLICATION))
    assert hv.calls == ["copy_offline:3"]
    assert result.achieved is Consistency.APPLICATION and "at rest" in (result.reason or "")
    hv.clean_shutdown = False
    crashed = _flow(hv, parts).snapshot(SnapshotRequest("vm1"))
    assert crashed.achieved is Consistency.CRASH


def test_excluded_readonly_and_shareable_disks_are_left_out_and_reported(parts) -> None:  # type: ignore[no-untyped-def]
    base = _disks(4)
    disks = (base[0], base[1], DiskSpec(**{**base[2].__dict__, "readonly": True}),
             DiskSpec(**{**base[3].__dict__, "shareable": True}))  # fmt: skip
    hv = ScriptedHypervisor(disks=disks)
    result = _flow(hv, parts).snapshot(SnapshotRequest("vm1", exclude_disks=("vdb",)))
    assert [m.target for m in result.members] == ["vda"]
    skipped = result.metadata["freezeframe.skipped_disks"]
    assert "vdb: excluded" in skipped and "vdc: read-only" in skipped and "vdd: shareable" in skipped
    with pytest.raises(InvalidRequest, match="no such disk"):
        _flow(hv, parts).snapshot(SnapshotRequest("vm1", exclude_disks=("vdz",)))


def test_network_disk_must_be_excluded_explicitly(parts) -> None:  # type: ignore[no-untyped-def]
    rbd = DiskSpec(target="vdd", bus="virtio", source_path="pool/img", format="raw", virtual_size=MiB,
                   source_type="network")  # fmt: skip
    hv = ScriptedHypervisor(disks=(*_disks(), rbd))
    with pytest.raises(PreflightFailed, match="--exclude-disk"):
        _flow(hv, parts).snapshot(SnapshotRequest("vm1"))
    assert hv.calls == []


def test_preflight_refuses_when_worst_case_does_not_fit(parts) -> None:  # type: ignore[no-untyped-def]
    huge = DiskSpec(target="vda", bus="virtio", source_path="/x", format="qcow2", virtual_size=1 << 60)
    hv = ScriptedHypervisor(disks=(huge,))
    with pytest.raises(InsufficientSpace, match="worst case"):
        _flow(hv, parts).snapshot(SnapshotRequest("vm1"))
    assert hv.calls == [] and parts[0].list_sets() == []


def test_second_operation_on_the_same_instance_is_refused(parts) -> None:  # type: ignore[no-untyped-def]
    hv = ScriptedHypervisor(disks=_disks())
    flow = _flow(hv, parts, hold_in_window_s=0.5)
    errors: list[BaseException] = []
    first = threading.Thread(target=lambda: flow.snapshot(SnapshotRequest("vm1")))
    first.start()
    time.sleep(0.2)
    try:
        _flow(hv, parts).snapshot(SnapshotRequest("vm1"))
    except InstanceBusy as exc:
        errors.append(exc)
    first.join()
    assert len(errors) == 1 and "in progress" in str(errors[0])
    assert [s.status for s in parts[0].list_sets()] == [SetStatus.AVAILABLE]


def test_repair_thaws_and_fails_what_a_killed_process_left(parts) -> None:  # type: ignore[no-untyped-def]
    from freezeframe.ports import JournalEntry

    hv = ScriptedHypervisor(disks=_disks(), atomic=False)
    flow = _flow(hv, parts)
    leftover = flow.snapshot(SnapshotRequest("vm1"))
    leftover.status = SetStatus.CREATING
    parts[0].update_set(leftover)
    hv.frozen, hv.state_now, hv.in_flight = True, InstanceState.PAUSED, True
    parts[2].record(JournalEntry(hv.lookup("vm1").uuid, "vm1", leftover.id, 999999, "capturing",
                                 froze=True, paused=True, capture_started=True))  # fmt: skip
    reports = flow.repair()
    assert len(reports) == 1 and "thawed" in reports[0] and "resumed" in reports[0] and "aborted" in reports[0]
    assert not hv.frozen and hv.state_now is InstanceState.RUNNING and not hv.in_flight
    assert parts[0].get_set(leftover.id).status is SetStatus.FAILED
    assert not parts[1].exists(leftover.id) and parts[2].pending() == []


def test_watchdog_still_guards_the_window_after_a_failed_freeze(parts) -> None:  # type: ignore[no-untyped-def]
    hv = ScriptedHypervisor(disks=_disks(), atomic=False, freeze_hang_s=0.05)
    flow = _flow(hv, parts, freeze_cap_s=0.3, hold_in_window_s=1.5)
    with pytest.raises(FreezeWindowExceeded):
        flow.snapshot(SnapshotRequest("vm1"))
    assert hv.state_now is InstanceState.RUNNING and not hv.frozen
    assert hv.calls.index("resume") > hv.calls.index("pause")
    assert parts[2].pending() == []


def test_journal_is_written_before_the_window_not_inside_it(parts) -> None:  # type: ignore[no-untyped-def]
    hv = ScriptedHypervisor(disks=_disks(), atomic=False)
    journal = parts[2]
    seen: list[tuple[str, tuple[str, ...]]] = []
    original = journal.record

    def spy(entry):  # type: ignore[no-untyped-def]
        seen.append((entry.phase, tuple(hv.calls)))
        original(entry)

    journal.record = spy  # type: ignore[method-assign]
    _flow(hv, parts).snapshot(SnapshotRequest("vm1"))
    window_writes = [calls for phase, calls in seen if "freeze" in calls and "thaw" not in calls]
    assert window_writes == [], "journal written inside the freeze window"
    assert ("window", ("ping",)) in seen


@pytest.mark.parametrize("cap", [float("inf"), float("nan"), -1.0, 0.0, 1e9])
def test_the_watchdog_cannot_be_switched_off(cap: float) -> None:
    """An infinite, NaN or out-of-range cap is refused before any guest is touched (it used to kill the timer)."""
    with pytest.raises(InvalidRequest, match="freeze cap"):
        FlowSettings(freeze_cap_s=cap)


def test_a_pre_assigned_set_id_is_used_and_checked(parts) -> None:  # type: ignore[no-untyped-def]
    hv = ScriptedHypervisor(disks=_disks(1))
    wanted = "0b6c1c54-3f0e-4a53-9d0a-2a6f7f0e4b11"
    result = _flow(hv, parts).snapshot(SnapshotRequest("vm1", set_id=wanted))
    assert result.id == wanted and parts[0].get_set(wanted).status is SetStatus.AVAILABLE
    with pytest.raises(InvalidRequest, match="set id"):
        SnapshotRequest("vm1", set_id="not-a-uuid")


def test_set_data_is_private(parts) -> None:  # type: ignore[no-untyped-def]
    """Issue 17 item 3: the repository, a set's folder, its members and set.json are readable by their owner only."""
    result = _flow(ScriptedHypervisor(disks=_disks(2)), parts).snapshot(SnapshotRequest("vm1"))
    folder = parts[1].set_dir(result.id)
    assert parts[1].root.stat().st_mode & 0o777 == 0o700 and folder.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        "vda.qcow2": 0o600, "vdb.qcow2": 0o600, "set.json": 0o600,
    }  # fmt: skip
