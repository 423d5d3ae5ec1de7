"""The group flow's guarantees, driven through a scripted hypervisor holding several instances.

One barrier (all freezes before any capture, all captures before any release), one watchdog for the whole
group, locks in one global order, per-member fallback or a whole-group failure with nothing left behind. The
same run on real guests is tests/test_group_vm.py.
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from freezeframe.errors import (
    ConsistencyUnavailable,
    FreezeWindowExceeded,
    GroupNotFound,
    HypervisorError,
    InstanceBusy,
    InvalidRequest,
)
from freezeframe.group_flow import GroupRequest
from freezeframe.group_model import GROUP_SET_KEY
from freezeframe.model import Consistency, InstanceState, SetStatus
from freezeframe.ports import JournalEntry
from group_fakes import GroupWorld, group_world


@pytest.fixture
def world(tmp_path: Path) -> GroupWorld:
    return group_world(tmp_path, n=3)


def _nothing_left(world: GroupWorld) -> None:
    """Every guest thawed and running, every set failed with its data gone, no journal entry."""
    assert world.guests_released()
    sets = world.catalog.list_sets()
    assert sets and all(s.status is SetStatus.FAILED and s.members == [] for s in sets)
    assert not any(world.repository.exists(s.id) for s in sets)
    assert world.journal.pending() == []
    (group_set,) = world.groups.list_group_sets()
    assert group_set.status is SetStatus.FAILED and group_set.error


def test_one_barrier_all_freezes_then_all_captures_then_all_thaws(world: GroupWorld) -> None:
    world.make_group("app", "vm1", "vm2", "vm3")
    group_set = world.group_flow().snapshot(GroupRequest("app"))
    hv = world.hv
    assert max(hv.times("frozen")) < min(hv.times("capture")), "a capture started before every guest was frozen"
    assert max(hv.times("capture")) < min(hv.times("thaw")), "a guest was thawed before every capture started"
    assert len(hv.times("frozen")) == len(hv.times("capture")) == len(hv.times("thaw")) == 3
    assert group_set.status is SetStatus.AVAILABLE and group_set.achieved is Consistency.FILESYSTEM
    assert group_set.window_ms is not None and group_set.window_ms >= 0
    sets = world.catalog.list_sets(metadata={GROUP_SET_KEY: group_set.id})
    assert sorted(s.instance_name for s in sets) == ["vm1", "vm2", "vm3"]
    for snapshot_set in sets:
        assert snapshot_set.status is SetStatus.AVAILABLE and snapshot_set.achieved is Consistency.FILESYSTEM
        assert [m.target for m in snapshot_set.members] == ["vda", "vdb"]
        assert all(m.metadata["freezeframe.set_uuid"] == snapshot_set.id for m in snapshot_set.members)
        assert snapshot_set.freeze_window_ms is not None
    assert world.guests_released() and world.journal.pending() == []


@pytest.mark.parametrize("step", ["freeze", "start_capture", "thaw"])
def test_every_step_runs_for_all_members_at_once_not_one_after_another(world: GroupWorld, step: str) -> None:
    """Every member's freeze (capture start, thaw) starts before any one of them has answered: the agent round
    trips and libvirt calls of the members overlap, so the group window is not the sum of its members'."""
    original = getattr(world.hv, step)
    started: list[float] = []
    answered: list[float] = []

    def slow(*args):  # type: ignore[no-untyped-def]
        started.append(time.monotonic())
        time.sleep(0.2)
        try:
            return original(*args)
        finally:
            answered.append(time.monotonic())

    setattr(world.hv, step, slow)
    world.make_group("app", "vm1", "vm2", "vm3")
    world.group_flow().snapshot(GroupRequest("app"))
    assert len(started) == 3 and max(started) < min(answered), f"{step} ran one member after another"


def test_crash_level_pauses_every_instance_around_every_capture(world: GroupWorld) -> None:
    world.make_group("app", "vm1", "vm2", "vm3")
    group_set = world.group_flow().snapshot(GroupRequest("app", Consistency.CRASH))
    hv = world.hv
    assert "freeze" not in hv.calls() and "ping" not in hv.calls(), "crash level touched a guest agent"
    assert max(hv.times("pause")) < min(hv.times("capture"))
    assert max(hv.times("capture")) < min(hv.times("resume"))
    assert len(hv.times("pause")) == 3 and group_set.achieved is Consistency.CRASH
    assert all(s.pause_window_ms is not None for s in world.catalog.list_sets())
    assert world.guests_released()


def test_locks_are_taken_in_one_global_order(world: GroupWorld) -> None:
    taken: list[str] = []
    original = world.locks.hold

    def spy(instance_uuid: str) -> AbstractContextManager[int]:
        taken.append(instance_uuid)
        return original(instance_uuid)

    world.locks.hold = spy  # type: ignore[method-assign]
    world.make_group("app", "vm3", "vm1", "vm2")
    world.group_flow().snapshot(GroupRequest("app"))
    uuids = {g.uuid for g in world.hv.guests.values()}
    assert taken[:3] == sorted(uuids), "locks not taken in UUID order"


def test_overlapping_group_snapshots_never_both_hold_half(world: GroupWorld) -> None:
    """Listed in opposite orders, the second group snapshot fails at its first lock, before it made anything."""
    world.make_group("forward", "vm1", "vm2")
    world.make_group("backward", "vm2", "vm1")
    results: dict[str, object] = {}

    def run(name: str, hold: float) -> None:
        try:
            results[name] = world.group_flow(hold_in_window_s=hold).snapshot(GroupRequest(name))
        except InstanceBusy as exc:
            results[name] = exc

    first = threading.Thread(target=run, args=("forward", 0.5))
    first.start()
    time.sleep(0.2)
    run("backward", 0.0)
    first.join()
    assert isinstance(results["backward"], InstanceBusy)
    assert getattr(results["forward"], "status", None) is SetStatus.AVAILABLE
    assert [g.group_name for g in world.groups.list_group_sets()] == ["forward"], "the refused one left a record"
    assert len(world.catalog.list_sets()) == 2


def test_a_member_whose_freeze_fails_falls_back_alone_and_is_paused(world: GroupWorld) -> None:
    world.hv.guests["vm2"].freeze_hang_s = 0.05
    world.make_group("app", "vm1", "vm2", "vm3")
    group_set = world.group_flow().snapshot(GroupRequest("app"))
    by_name = {s.instance_name: s for s in world.catalog.list_sets()}
    assert by_name["vm2"].achieved is Consistency.CRASH and "freeze failed" in (by_name["vm2"].reason or "")
    assert by_name["vm1"].achieved is Consistency.FILESYSTEM and by_name["vm3"].achieved is Consistency.FILESYSTEM
    assert group_set.status is SetStatus.AVAILABLE and group_set.achieved is Consistency.CRASH
    vm2 = world.hv.calls("vm2")
    assert vm2.index("pause") < vm2.index("capture") < vm2.index("resume"), "the fallen-back member ran on"
    assert world.guests_released()


def test_a_member_without_agent_is_planned_at_crash_level_and_paused(world: GroupWorld) -> None:
    world.hv.guests["vm3"].agent_ok = False
    world.make_group("app", "vm1", "vm3")
    world.group_flow().snapshot(GroupRequest("app"))
    vm3 = world.hv.calls("vm3")
    assert "freeze" not in vm3 and vm3.index("pause") < vm3.index("capture") < vm3.index("resume")
    (vm3_set,) = world.catalog.list_sets(instance="vm3")
    assert vm3_set.achieved is Consistency.CRASH and "agent" in (vm3_set.reason or "")


def test_require_fails_the_whole_group_and_leaves_nothing(world: GroupWorld) -> None:
    world.hv.guests["vm2"].freeze_hang_s = 0.05
    world.make_group("app", "vm1", "vm2", "vm3")
    with pytest.raises(ConsistencyUnavailable, match="vm2"):
        world.group_flow().snapshot(GroupRequest("app", require=True))
    assert "capture" not in world.hv.calls(), "captured although a required member could not freeze"
    _nothing_left(world)


def test_require_without_agent_fails_before_any_guest_is_touched(world: GroupWorld) -> None:
    world.hv.guests["vm3"].agent_ok = False
    world.make_group("app", "vm1", "vm2", "vm3")
    with pytest.raises(ConsistencyUnavailable):
        world.group_flow().snapshot(GroupRequest("app", require=True))
    assert not any(c.endswith(("freeze", "pause")) for c in world.hv.calls())
    _nothing_left(world)


def test_a_hung_agent_cannot_hold_the_others_past_the_cap(world: GroupWorld) -> None:
    world.hv.guests["vm2"].freeze_hang_s = 1.5
    world.make_group("app", "vm1", "vm2", "vm3")
    with pytest.raises(FreezeWindowExceeded, match="group window of app"):
        world.group_flow(freeze_cap_s=0.3).snapshot(GroupRequest("app"))
    timeline = world.hv.timeline
    for name in ("vm1", "vm3"):
        frozen = next(t for n, c, t in timeline if n == name and c == "frozen")
        thawed = next(t for n, c, t in timeline if n == name and c == "thaw")
        assert thawed - frozen < 0.9, f"{name} stayed frozen {thawed - frozen:.2f} s with a 0.3 s cap"
    assert "capture" not in world.hv.calls()
    _nothing_left(world)


def test_an_instance_shut_down_between_prepare_and_freeze(world: GroupWorld) -> None:
    world.hv.guests["vm2"].shut_down_on_freeze = True
    world.make_group("app", "vm1", "vm2", "vm3")
    started = time.monotonic()
    with pytest.raises(HypervisorError, match="not running"):
        world.group_flow(thaw_retry_s=30.0).snapshot(GroupRequest("app"))
    assert time.monotonic() - started < 5, "kept retrying to thaw an instance that is shut off"
    assert world.hv.guests["vm2"].state is InstanceState.SHUTOFF
    assert not world.hv.guests["vm1"].frozen and not world.hv.guests["vm3"].frozen
    _nothing_left(world)


def test_one_failed_copy_fails_every_set_of_the_group(world: GroupWorld) -> None:
    world.hv.guests["vm3"].capture_fails = True
    world.make_group("app", "vm1", "vm2", "vm3")
    with pytest.raises(Exception, match="No space"):
        world.group_flow().snapshot(GroupRequest("app"))
    _nothing_left(world)


def test_a_missing_member_fails_before_any_guest_is_touched(world: GroupWorld) -> None:
    world.make_group("app", "vm1", "vm2")
    del world.hv.guests["vm2"]
    with pytest.raises(Exception, match="no instance"):
        world.group_flow().snapshot(GroupRequest("app"))
    assert not any(c.endswith(("freeze", "pause", "capture")) for c in world.hv.calls())
    assert world.guests_released() and world.journal.pending() == []


def test_repair_after_a_kill_inside_the_group_window(world: GroupWorld) -> None:
    """What a SIGKILL inside the window leaves: journal entries, frozen guests, sets and group set ``creating``."""
    world.make_group("app", "vm1", "vm2")
    done = world.group_flow().snapshot(GroupRequest("app"))
    sets = world.catalog.list_sets(metadata={GROUP_SET_KEY: done.id})
    done.status = SetStatus.CREATING
    world.groups.update_group_set(done)
    for snapshot_set in sets:
        guest = world.hv.guests[snapshot_set.instance_name]
        guest.frozen = guest.in_flight = True
        snapshot_set.status = SetStatus.CREATING
        world.catalog.update_set(snapshot_set)
        world.journal.record(JournalEntry(guest.uuid, guest.name, snapshot_set.id, 999999, "window",
                                          froze=True, capture_started=True))  # fmt: skip
    reports = world.group_flow().repair()
    assert sum("thawed" in r for r in reports) == 2 and any("group set" in r for r in reports)
    assert world.guests_released() and not any(g.in_flight for g in world.hv.guests.values())
    _nothing_left(world)


def test_repair_leaves_a_group_set_alone_while_its_process_runs(world: GroupWorld) -> None:
    world.make_group("app", "vm1", "vm2")
    results: list[object] = []
    worker = threading.Thread(target=lambda: results.append(world.group_flow(hold_in_window_s=0.6).snapshot(
        GroupRequest("app"))))  # fmt: skip
    worker.start()
    time.sleep(0.3)
    reports = world.group_flow().repair()
    worker.join()
    assert any("still running" in r for r in reports)
    assert getattr(results[0], "status", None) is SetStatus.AVAILABLE


def test_unknown_and_empty_groups_are_refused(world: GroupWorld) -> None:
    with pytest.raises(GroupNotFound):
        world.group_flow().snapshot(GroupRequest("nope"))
    world.make_group("empty")
    with pytest.raises(InvalidRequest, match="no instances"):
        world.group_flow().snapshot(GroupRequest("empty"))
    with pytest.raises(InvalidRequest, match="group set id"):
        GroupRequest("app", group_set_id="x")


def test_paused_and_shut_off_members_join_the_group_as_they_are(world: GroupWorld) -> None:
    """A paused member is captured paused (and stays so); a shut-off one is copied at rest after the window."""
    world.hv.guests["vm2"].state = InstanceState.PAUSED
    world.hv.guests["vm3"].state = InstanceState.SHUTOFF
    world.make_group("app", "vm1", "vm2", "vm3")
    group_set = world.group_flow().snapshot(GroupRequest("app"))
    assert world.hv.calls("vm2") == ["capture", "wait"] and world.hv.guests["vm2"].state is InstanceState.PAUSED
    assert world.hv.calls("vm3") == ["copy_offline"]
    by_name = {s.instance_name: s for s in world.catalog.list_sets()}
    assert by_name["vm2"].achieved is Consistency.CRASH and "paused" in (by_name["vm2"].reason or "")
    assert by_name["vm3"].achieved is Consistency.FILESYSTEM and "at rest" in (by_name["vm3"].reason or "")
    assert group_set.status is SetStatus.AVAILABLE and group_set.achieved is Consistency.CRASH
