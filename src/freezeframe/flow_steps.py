"""The guest-visible steps of one instance's snapshot, each callable on its own.

``flow.SnapshotFlow`` drives them for one instance under one watchdog; ``group_flow.GroupFlow`` drives the same
steps for several instances at once (all freezes, then all captures, then all releases) under one watchdog for
the whole group. A mixin of ``SnapshotFlow``, like ``recovery.Recovery``: the collaborators are declared here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from freezeframe.errors import AgentUnavailable, CaptureFailed, ConsistencyUnavailable, FreezeWindowExceeded
from freezeframe.incremental import ChainPlan
from freezeframe.model import Consistency, DiskSpec, Instance, InstanceState, SnapshotSet
from freezeframe.ports import CaptureTarget, Catalog, Hypervisor, Journal, JournalEntry
from freezeframe.ports.volumes import VolumeCapture, VolumeSnapshot
from freezeframe.volume_members import NO_VOLUMES
from freezeframe.window import EnsureThawed, GuestWindow


class _WindowSettings(Protocol):
    @property
    def freeze_cap_s(self) -> float: ...

    @property
    def hold_in_window_s(self) -> float: ...


@dataclass
class Plan:
    level: Consistency
    reason: str | None
    pause: bool
    several_captures: bool = False
    """Several capture mechanisms (backup job, each RBD snapshot, other instances of a group) meet at one
    instant only in paused guests: a fallback to crash level then pauses the vCPUs."""


@dataclass
class PreparedMember:
    """One instance made ready before any guest is touched: lock held, set and journal entry recorded."""

    instance: Instance
    snapshot_set: SnapshotSet
    plan: Plan
    entry: JournalEntry
    require: bool
    files: list[DiskSpec]
    vols: list[DiskSpec]
    chain: ChainPlan
    targets: list[CaptureTarget] = field(default_factory=list)
    capture: VolumeCapture = NO_VOLUMES
    snaps: list[VolumeSnapshot] = field(default_factory=list)
    pause: bool = False
    """Decided in ``open_window``; a failed freeze may turn it on."""

    @property
    def running(self) -> bool:
        return self.instance.state is InstanceState.RUNNING


class WindowSteps:
    hypervisor: Hypervisor
    catalog: Catalog
    journal: Journal
    settings: _WindowSettings
    ensure_thawed: EnsureThawed

    def open_window(self, member: PreparedMember) -> GuestWindow:
        """Write the journal entry saying everything the window may do, before it opens (no write inside)."""
        plan, entry = member.plan, member.entry
        member.pause = plan.pause and member.running
        # A failed freeze falls back to crash level inside the window, where no journal write happens: record now
        # that the guest may be paused then, so that repair resumes it.
        may_pause = member.pause or (member.running and plan.several_captures and plan.level.freezes_filesystems)
        entry.froze, entry.paused, entry.capture_started = plan.level.freezes_filesystems, may_pause, True
        entry.phase = "window"
        self.journal.record(entry)
        return GuestWindow(self.hypervisor, self.journal, self.ensure_thawed, member.instance, entry)

    def enter_window(self, member: PreparedMember, window: GuestWindow) -> None:
        """Freeze (falling back to crash level when the agent fails, unless required) and/or pause."""
        snapshot_set = member.snapshot_set
        if member.plan.level.freezes_filesystems:
            try:
                window.freeze()
            except AgentUnavailable as exc:
                if not window.thaw_confirmed:
                    raise CaptureFailed(
                        f"freeze of {member.instance.name} failed ({exc}) and the guest agent has not confirmed a "
                        "thaw since; `freezeframe repair` keeps trying"
                    ) from exc
                if member.require:
                    raise ConsistencyUnavailable(
                        f"--require {snapshot_set.requested}: {member.instance.name}: {exc}"
                    ) from exc
                snapshot_set.achieved, snapshot_set.reason = Consistency.CRASH, f"freeze failed: {exc}"
                member.pause = member.entry.paused
        if member.pause:
            window.pause()

    def capture_in_window(self, member: PreparedMember, window: GuestWindow) -> None:
        """Fix the point in time of every disk (backup job start, RBD snapshots); the copy runs afterwards."""
        if window.expired:
            raise FreezeWindowExceeded(self.cap_message(member.instance))
        if member.targets:
            self.hypervisor.start_capture(member.instance, member.targets)
        member.snaps = member.capture.snapshot()

    def close_window(self, member: PreparedMember, window: GuestWindow) -> None:
        """After the release: record the windows and that the guest is thawed (the copy may still run)."""
        snapshot_set, entry = member.snapshot_set, member.entry
        snapshot_set.freeze_window_ms = window.ms(window.freeze_started, window.freeze_ended)
        snapshot_set.pause_window_ms = window.ms(window.pause_started, window.pause_ended)
        if window.thaw_confirmed:
            entry.froze = entry.paused = False
            entry.phase = "copying"
            self.journal.record(entry)
        self.catalog.update_set(snapshot_set)

    def cap_message(self, instance: Instance) -> str:
        return (
            f"the freeze/pause window of {instance.name} reached its cap of {self.settings.freeze_cap_s:g} s; "
            "the guest was released and the set failed"
        )

    def hold_for_tests(self) -> None:
        deadline = time.monotonic() + self.settings.hold_in_window_s
        while time.monotonic() < deadline:
            time.sleep(0.05)
