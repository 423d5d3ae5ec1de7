"""The snapshot flow: discover disks → quiesce → capture all → thaw → record → wait for completion.

It owns the order of the guest-visible steps and imports only ports and the domain model, so the same flow
drives any hypervisor or storage adapter. Whatever fails, the guest leaves the window thawed and running
(or paused, if it was paused before): every exit path goes through ``window.GuestWindow.release``.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from freezeframe.discovery import Disks, discover_disks, split_volumes
from freezeframe.errors import (
    AgentUnavailable,
    CaptureFailed,
    ConsistencyUnavailable,
    FreezeframeError,
    FreezeWindowExceeded,
    InsufficientSpace,
    InvalidRequest,
    PreflightFailed,
    RepositoryFull,
)
from freezeframe.flow_steps import Plan, PreparedMember, WindowSteps
from freezeframe.incremental import (
    AUTO,
    DEFAULT_MAX_CHAIN,
    WRITTEN_KEY,
    ChainPlan,
    checkpoint_name,
    decode_metadata,
    newest_parent,
    plan_chain,
    prune_checkpoints,
    validate_mode,
    with_tracking,
)
from freezeframe.model import (
    Consistency,
    DiskSpec,
    Instance,
    InstanceState,
    Member,
    SetStatus,
    SnapshotSet,
)
from freezeframe.ports import (
    CaptureTarget,
    Catalog,
    ChangeTracking,
    Hypervisor,
    InstanceLocks,
    Journal,
    JournalEntry,
    ProgressCallback,
    Repository,
)
from freezeframe.ports.volumes import Volumes, VolumeSnapshot
from freezeframe.recovery import Recovery
from freezeframe.signals import deferred_signals
from freezeframe.validation import validate_freeze_cap, validate_uuid
from freezeframe.volume_members import (
    existing_volumes,
    journal_volumes,
    open_volumes,
    remove_volumes,
    volume_members,
)
from freezeframe.window import THAW_PENDING

log = logging.getLogger(__name__)

SET_UUID_KEY = "freezeframe.set_uuid"
FULL_BELOW_BYTES = 16 << 20


@dataclass(frozen=True)
class SnapshotRequest:
    instance: str
    consistency: Consistency = Consistency.FILESYSTEM
    require: bool = False
    name: str | None = None
    exclude_disks: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    backup_type: str | None = None
    pause_vcpus: bool = False
    """Pause the vCPUs around the capture even where an atomic multi-disk capture exists."""
    set_id: str | None = None
    """A pre-assigned UUID for the new set, so a caller knows its id before the operation runs."""
    mode: str = AUTO
    """auto: incremental members where a trustworthy parent exists; full; incremental (no chain limit)."""
    max_chain: int = DEFAULT_MAX_CHAIN

    def __post_init__(self) -> None:
        validate_mode(self.mode, self.max_chain)
        if self.set_id is not None:
            validate_uuid(self.set_id, "set id")


Handoff = Callable[[SnapshotSet, int], None]
"""Takes over a set whose copy is in flight, with the held instance lock's file descriptor."""


@dataclass(frozen=True)
class FlowSettings:
    freeze_cap_s: float = 10.0
    thaw_retry_s: float = 60.0
    """How long to keep trying to thaw a guest whose agent stopped answering before leaving it to repair."""
    hold_in_window_s: float = 0.0
    """Fault injection for tests: stay this long inside the window (to SIGKILL there or trip the watchdog)."""

    def __post_init__(self) -> None:
        """The watchdog can be tuned, never switched off: an infinite, NaN or out-of-range cap is refused."""
        validate_freeze_cap(self.freeze_cap_s, "freeze cap")


class SnapshotFlow(WindowSteps, Recovery):
    settings: FlowSettings

    def __init__(
        self,
        hypervisor: Hypervisor,
        catalog: Catalog,
        repository: Repository,
        journal: Journal,
        locks: InstanceLocks,
        settings: FlowSettings | None = None,
        volumes: Volumes | None = None,
        tracking: ChangeTracking | None = None,
    ) -> None:
        self.hypervisor = hypervisor
        self.tracking = tracking
        self.catalog = catalog
        self.repository = repository
        self.journal = journal
        self.locks = locks
        self.settings = settings or FlowSettings()
        self.volumes = volumes

    # ---- the operation -----------------------------------------------------------------------------

    def snapshot(
        self, request: SnapshotRequest, progress: ProgressCallback | None = None, handoff: Handoff | None = None
    ) -> SnapshotSet:
        """discover → preflight → quiesce → capture all → thaw → record → wait for completion.

        With ``handoff`` the wait is left to whoever ``handoff`` starts (``--no-wait``): it receives the set,
        still ``creating``, and the held instance lock, and must finish it with ``complete``.
        """
        instance = self.hypervisor.lookup(request.instance)
        with self.locks.hold(instance.uuid) as lock:
            member = self.prepare_member(instance.uuid, request)
            instance, snapshot_set, entry = member.instance, member.snapshot_set, member.entry
            handed_off = False
            try:
                self.prepare_targets(member)
                with open_volumes(self.volumes, snapshot_set, member.vols) as capture:
                    member.capture = capture
                    if instance.state is InstanceState.SHUTOFF:
                        self.copy_at_rest(member, progress)
                    else:
                        self._capture_point_in_time(member)
                if instance.state is not InstanceState.SHUTOFF:
                    if handoff is not None:
                        handoff(snapshot_set, lock)
                        handed_off = True
                        return snapshot_set
                    if member.targets:
                        self.hypervisor.wait_capture(instance, progress)
                self._record_members(snapshot_set, member.targets, member.snaps, entry)
            except BaseException as exc:
                raise self._failed(instance, snapshot_set, exc, entry) from exc
            finally:
                if not handed_off and entry.phase != THAW_PENDING:
                    self.journal.clear(instance.uuid)
            prune_checkpoints(self.tracking, self.catalog, instance)
            return snapshot_set

    def prepare_member(self, instance_uuid: str, request: SnapshotRequest, *, in_group: bool = False) -> PreparedMember:
        """Everything before the guest is touched, with the instance's lock held: repair what a dead process left,
        discover, preflight, plan, record the set (``creating``) and the journal entry. Nothing is made on disk."""
        self.repair_locked(instance_uuid)
        instance = self.hypervisor.lookup(instance_uuid)
        disks = discover_disks(instance, request.exclude_disks)
        files, vols = split_volumes(disks.captured)
        self._preflight(files)
        plan = self._plan(instance, request)
        plan.several_captures = in_group or (1 if files else 0) + len(vols) > 1
        if plan.level is Consistency.CRASH and plan.several_captures:
            plan.pause = True
        snapshot_set = self._new_set(instance, request, disks)
        chain = self._chain(instance, request, files, snapshot_set.id)
        self.catalog.add_set(snapshot_set)
        entry = JournalEntry(instance.uuid, instance.name, snapshot_set.id, os.getpid(), "preparing")
        journal_volumes(entry, vols)
        entry.extra["chain"] = chain.encode()
        self.journal.record(entry)
        snapshot_set.achieved, snapshot_set.reason = plan.level, plan.reason
        return PreparedMember(instance, snapshot_set, plan, entry, request.require, files, vols, chain)

    def prepare_targets(self, member: PreparedMember) -> None:
        """Empty target images (incremental where the chain says so), ready before any guest-visible step."""
        chain = member.chain
        parents = chain.parents()
        member.targets = with_tracking(chain, self.repository.prepare(member.snapshot_set.id, member.files, parents))

    def copy_at_rest(self, member: PreparedMember, progress: ProgressCallback | None) -> None:
        """A shut-off instance's disks do not change: copy them, no window needed."""
        member.entry.phase = "copying"
        self.journal.record(member.entry)
        self.hypervisor.copy_offline(member.instance, member.targets, progress)
        member.snaps = member.capture.snapshot()

    def complete(self, set_id: str, progress: ProgressCallback | None = None) -> SnapshotSet:
        """Wait for and record a set whose copy another process started and handed over, lock already held."""
        snapshot_set = self.catalog.get_set(set_id)
        instance = self.hypervisor.lookup(snapshot_set.instance_uuid)
        entry = next((e for e in self.journal.pending() if e.set_id == set_id), None)
        if entry is None or snapshot_set.status is not SetStatus.CREATING:
            raise InvalidRequest(f"set {set_id} has no copy in flight to complete")
        entry.pid = os.getpid()
        self.journal.record(entry)
        try:
            files, vols = split_volumes(snapshot_set.hardware.disks)
            targets = self.repository.existing_targets(set_id, files)
            if targets:
                self.hypervisor.wait_capture(instance, progress)
            snaps = existing_volumes(self.volumes, set_id, vols, entry)
            self._record_members(snapshot_set, targets, snaps, entry)
        except BaseException as exc:
            raise self._failed(instance, snapshot_set, exc, entry) from exc
        finally:
            if entry.phase != THAW_PENDING:
                self.journal.clear(instance.uuid)
        prune_checkpoints(self.tracking, self.catalog, instance)
        return snapshot_set

    def _failed(
        self, instance: Instance, snapshot_set: SnapshotSet, exc: BaseException, entry: JournalEntry
    ) -> BaseException:
        """Clean up after ``exc`` and return what to raise: a full repository gets its own error."""
        full = isinstance(exc, CaptureFailed) and self.repository.free_bytes() < FULL_BELOW_BYTES
        self._fail(instance, snapshot_set, exc, abort_capture=entry.capture_started)
        remove_volumes(self.volumes, snapshot_set.id, entry, self.catalog)
        if full:
            return RepositoryFull(
                f"the repository filled up during the copy ({exc}); set {snapshot_set.id} failed and its "
                "files were removed; the instance was left running as it was"
            )
        return exc

    def _plan(self, instance: Instance, request: SnapshotRequest) -> Plan:
        """Which level we will try and why it is lower than asked, decided before the guest is touched."""
        wanted = request.consistency

        def lower(reason: str) -> Plan:
            if request.require and wanted is not Consistency.CRASH:
                raise ConsistencyUnavailable(f"--require {wanted}: {reason}; nothing was changed")
            return Plan(Consistency.CRASH, reason if wanted is not Consistency.CRASH else None, False)

        if instance.state is InstanceState.SHUTOFF:
            if instance.clean_shutdown:
                return Plan(wanted, "instance is shut off: its disks are at rest", False)
            return lower("instance is shut off after a crash or forced stop: disks as they were left")
        if instance.state is InstanceState.PAUSED:
            return lower("instance is paused: the guest agent cannot freeze or thaw a paused guest")
        if instance.state is not InstanceState.RUNNING:
            raise PreflightFailed(f"{instance.name} is neither running, paused nor shut off; cannot snapshot it")
        pause = request.pause_vcpus or not self.hypervisor.supports_atomic_capture(instance)
        if wanted is Consistency.CRASH:
            return Plan(wanted, None, pause)
        try:
            self.hypervisor.agent_ping(instance)
        except AgentUnavailable as exc:
            plan = lower(f"guest agent not answering ({exc})")
            plan.pause = pause
            return plan
        return Plan(wanted, None, pause)

    def _chain(self, instance: Instance, request: SnapshotRequest, disks: Sequence[DiskSpec], set_id: str) -> ChainPlan:
        """Which members copy only changes, checked against the catalog and the checkpoints before the window."""
        parent = newest_parent(self.catalog.list_sets(instance=instance.uuid, status=SetStatus.AVAILABLE))
        return plan_chain(
            mode=request.mode, max_chain=request.max_chain, instance=instance, disks=disks, set_id=set_id,
            parent=parent, parent_present=bool(parent and self.repository.exists(parent.id)), tracking=self.tracking,
        )  # fmt: skip

    def _preflight(self, disks: Sequence[DiskSpec]) -> None:
        worst_case = sum(d.virtual_size for d in disks)
        free = self.repository.free_bytes()
        if free < worst_case:
            raise InsufficientSpace(
                f"the repository has {free / 2**20:.0f} MiB free but the worst case for these disks is "
                f"{worst_case / 2**20:.0f} MiB; free space or point FREEZEFRAME_HOME elsewhere"
            )

    def _new_set(self, instance: Instance, request: SnapshotRequest, disks: Disks) -> SnapshotSet:
        now = datetime.now(UTC)
        metadata = dict(request.metadata)
        if disks.skipped:
            metadata["freezeframe.skipped_disks"] = "; ".join(f"{k}: {v}" for k, v in sorted(disks.skipped.items()))
        return SnapshotSet(
            id=request.set_id or str(uuid.uuid4()),
            name=request.name or f"{instance.name}-{now:%Y%m%dT%H%M%S%fZ}",
            instance_name=instance.name,
            instance_uuid=instance.uuid,
            requested=request.consistency,
            status=SetStatus.CREATING,
            created_at=now,
            hardware=instance.hardware,
            metadata=metadata,
            backup_type=request.backup_type,
            instance_state=instance.state,
        )

    def _capture_point_in_time(self, member: PreparedMember) -> None:
        """quiesce → capture all (backup job start, RBD snapshots) → thaw; the copy itself runs after the window."""
        window = self.open_window(member)
        watchdog = threading.Timer(self.settings.freeze_cap_s, window.expire)
        watchdog.daemon = True
        try:
            with deferred_signals():
                watchdog.start()
                try:
                    self.enter_window(member, window)
                    self.hold_for_tests()
                    self.capture_in_window(member, window)
                finally:
                    window.release()
            if window.expired:
                raise FreezeWindowExceeded(self.cap_message(member.instance))
        finally:
            watchdog.cancel()
        self.close_window(member, window)

    def _record_members(
        self,
        snapshot_set: SnapshotSet,
        targets: Sequence[CaptureTarget],
        snaps: Sequence[VolumeSnapshot],
        entry: JournalEntry,
    ) -> None:
        """The proposal's naming scheme: every member carries its set's UUID (and what it is in a chain)."""
        chain = decode_metadata(entry.extra.get("chain"))
        if snapshot_set.instance_state is not InstanceState.SHUTOFF:  # offline copies skip zeros already
            self.repository.drop_zeros(targets)
        if snapshot_set.achieved is None:
            snapshot_set.achieved = snapshot_set.requested
        common = {
            SET_UUID_KEY: snapshot_set.id,
            "freezeframe.instance_uuid": snapshot_set.instance_uuid,
            "freezeframe.consistency": str(snapshot_set.achieved),
        }
        snapshot_set.members = [
            Member(
                set_id=snapshot_set.id,
                target=t.disk.target,
                bus=t.disk.bus,
                boot_order=t.disk.boot_order,
                virtual_size=t.disk.virtual_size,
                format=t.format,
                path=str(t.path),
                source_path=t.disk.source_path,
                sha256=self.repository.checksum(t.path),
                metadata={
                    **common,
                    "freezeframe.target": t.disk.target,
                    **chain.get(t.disk.target, {}),
                    WRITTEN_KEY: str(self.repository.written_bytes(t.path)),
                },
            )
            for t in targets
        ]
        if snaps and self.volumes is not None:
            snapshot_set.members += volume_members(snapshot_set, snaps, self.volumes, common)
        order = [d.target for d in snapshot_set.hardware.disks]
        snapshot_set.members.sort(key=lambda m: order.index(m.target) if m.target in order else len(order))
        snapshot_set.status = SetStatus.AVAILABLE
        snapshot_set.completed_at = datetime.now(UTC)
        self.repository.write_manifest(snapshot_set)
        self.catalog.update_set(snapshot_set)

    def _fail(self, instance: Instance, snapshot_set: SnapshotSet, exc: BaseException, abort_capture: bool) -> None:
        """Nothing half-made stays behind: abort the copy, remove the data, keep a failed row saying why."""
        if abort_capture:
            try:
                self.hypervisor.abort_capture(instance)
                if self.tracking is not None:
                    self.tracking.remove(instance, checkpoint_name(snapshot_set.id))
            except FreezeframeError:
                log.exception("could not abort the capture of %s", instance.name)
        if snapshot_set.instance_state is InstanceState.RUNNING:
            self._unblock(instance)
        self.repository.remove(snapshot_set.id)
        snapshot_set.status = SetStatus.FAILED
        snapshot_set.members = []
        snapshot_set.completed_at = datetime.now(UTC)
        snapshot_set.error = str(exc) or type(exc).__name__
        if isinstance(exc, KeyboardInterrupt):
            snapshot_set.error = "interrupted"
        try:
            self.catalog.update_set(snapshot_set)
        except FreezeframeError:
            log.exception("could not record the failure of set %s", snapshot_set.id)
