"""One point in time across several instances: prepare every member, freeze all, capture all, release all.

The steps are ``flow.SnapshotFlow``'s own (``prepare_member``, ``open_window``, ``enter_window``,
``capture_in_window``, ``close_window``); this module only orders them across instances:

1. Locks in one global order (instance UUID), so two group snapshots over overlapping instances cannot both end
   up holding half of what they need; then every member is prepared (repair, discovery, preflight, plan, set row,
   journal entry, target images) before any guest is touched.
2. The group window: every guest frozen in parallel (crash level: every guest paused), then every disk of every
   instance captured, then every guest released in parallel. One watchdog bounds the whole window: at the cap it
   releases every guest at once, whichever member is stuck.
3. After the window the copies complete and each member's set is recorded; the group set is ``available``.

A member whose agent fails the freeze falls back to crash level (paused for the capture), recorded in its set;
with ``require`` the whole group set fails. Any failure fails every member's set and removes all data: nothing
half-made is left, and every guest leaves the window thawed and running.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime

from freezeframe.errors import FreezeframeError, FreezeWindowExceeded, InstanceBusy, InstanceNotFound, InvalidRequest
from freezeframe.flow import SnapshotFlow, SnapshotRequest
from freezeframe.flow_steps import PreparedMember
from freezeframe.group_barrier import ALONE, Rendezvous
from freezeframe.group_model import GROUP_KEY, GROUP_SET_KEY, Group, GroupMember, GroupSet
from freezeframe.model import RBD_STORE, Consistency, InstanceState, SetStatus, SnapshotSet
from freezeframe.ports import ProgressCallback
from freezeframe.ports.groups import Groups
from freezeframe.signals import deferred_signals
from freezeframe.validation import validate_uuid
from freezeframe.volume_members import open_volumes
from freezeframe.window import THAW_PENDING, GuestWindow

log = logging.getLogger(__name__)
LEVELS = (Consistency.CRASH, Consistency.FILESYSTEM, Consistency.APPLICATION)


@dataclass(frozen=True)
class GroupRequest:
    group: str
    consistency: Consistency = Consistency.FILESYSTEM
    require: bool = False
    name: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    backup_type: str | None = None
    group_set_id: str | None = None
    """A pre-assigned UUID, so a caller (an API job) knows the group set's id before the operation runs."""

    def __post_init__(self) -> None:
        if self.group_set_id is not None:
            validate_uuid(self.group_set_id, "group set id")


def new_group_set(group: Group, request: GroupRequest) -> GroupSet:
    now = datetime.now(UTC)
    return GroupSet(
        id=request.group_set_id or str(uuid.uuid4()),
        name=request.name or f"{group.name}-{now:%Y%m%dT%H%M%S%fZ}",
        group_name=group.name,
        requested=request.consistency,
        status=SetStatus.CREATING,
        created_at=now,
        instances=list(group.members),
        backup_type=request.backup_type,
    )


def weakest(levels: Sequence[Consistency]) -> Consistency:
    return min(levels, key=LEVELS.index)


def in_parallel(calls: Sequence[Callable[[], None]]) -> list[BaseException]:
    """Run every call at once (guest-agent round trips overlap) and return what they raised, in call order."""
    if not calls:
        return []
    errors: list[BaseException | None] = [None] * len(calls)

    def run(k: int) -> None:
        try:
            calls[k]()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller, which re-raises it
            errors[k] = exc

    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="ff-group") as pool:
        list(pool.map(run, range(len(calls))))
    return [e for e in errors if e is not None]


class GroupFlow:
    def __init__(self, flow: SnapshotFlow, groups: Groups) -> None:
        self.flow = flow
        self.groups = groups

    def snapshot(self, request: GroupRequest, progress: ProgressCallback | None = None) -> GroupSet:
        group = self.groups.get_group(request.group)
        if not group.members:
            raise InvalidRequest(f"group {group.name} has no instances; add some with `freezeframe group add`")
        group_set = new_group_set(group, request)
        prepared = self._run(group, group_set, group.members, request, ALONE, progress, owner=True)
        return self._complete(group_set, prepared)

    def snapshot_share(
        self,
        group_set: GroupSet,
        members: Sequence[GroupMember],
        request: GroupRequest,
        rendezvous: Rendezvous,
        progress: ProgressCallback | None = None,
    ) -> tuple[list[SnapshotSet], float | None]:
        """This host's share of a group set spread over several hosts: the same steps, meeting the other hosts'
        shares at the barrier (``group_barrier``); the coordinator owns the group set's row. Returns this share's
        sets and its window in ms."""
        group = Group(group_set.group_name, tuple(group_set.instances), group_set.created_at)
        prepared = self._run(group, group_set, members, request, rendezvous, progress, owner=False)
        return [pm.snapshot_set for pm in prepared], group_set.window_ms

    def _run(
        self,
        group: Group,
        group_set: GroupSet,
        members: Sequence[GroupMember],
        request: GroupRequest,
        rendezvous: Rendezvous,
        progress: ProgressCallback | None,
        *,
        owner: bool,
    ) -> list[PreparedMember]:
        ordered = sorted(members, key=lambda m: m.instance_uuid)
        with ExitStack() as locks:
            for member in ordered:  # one global order: see the module docstring
                locks.enter_context(self.flow.locks.hold(member.instance_uuid))
            if owner:
                self.groups.add_group_set(group_set)
            prepared: list[PreparedMember] = []
            try:
                with ExitStack() as volumes:
                    for member in ordered:
                        prepared.append(self._prepare(member, group, group_set, request))
                        self.flow.prepare_targets(prepared[-1])
                        opened = open_volumes(self.flow.volumes, prepared[-1].snapshot_set, prepared[-1].vols)
                        prepared[-1].capture = volumes.enter_context(opened)
                    rendezvous.ready()
                    group_set.window_ms = self._group_window(group, prepared, rendezvous)
                    for pm in prepared:
                        if pm.instance.state is InstanceState.SHUTOFF:
                            self.flow.copy_at_rest(pm, progress)
                for pm in prepared:
                    if pm.instance.state is not InstanceState.SHUTOFF and pm.targets:
                        self.flow.hypervisor.wait_capture(pm.instance, progress)
                rendezvous.done()  # every host copied before any records: the group set is all or nothing
                for pm in prepared:
                    self.flow._record_members(pm.snapshot_set, pm.targets, pm.snaps, pm.entry)
            except BaseException as exc:
                _abort(rendezvous, exc)
                self._fail(group_set, prepared, exc, owner=owner)
                raise
            finally:
                for pm in prepared:
                    if pm.entry.phase != THAW_PENDING:
                        self.flow.journal.clear(pm.instance.uuid)
        return prepared

    def repair(self) -> list[str]:
        """Fail the group sets a killed process left ``creating``: with every member's lock held (nobody is working
        on them), thaw/resume what the journal says, then fail and empty every set of the group set."""
        reports = []
        for group_set in self.groups.list_group_sets():
            if group_set.status is not SetStatus.CREATING:
                continue
            if not self._all_here(group_set):
                reports.append(f"group set {group_set.name}: spans other hosts; its coordinator decides it")
                continue
            try:
                with ExitStack() as locks:
                    for member in sorted(group_set.instances, key=lambda m: m.instance_uuid):
                        locks.enter_context(self.flow.locks.hold(member.instance_uuid))
                    reports += [r for m in group_set.instances for r in self.flow.repair_locked(m.instance_uuid)]
                    self._fail_leftovers(group_set)
                reports.append(f"group set {group_set.name}: marked failed and removed the data of its sets")
            except InstanceBusy:
                reports.append(f"group set {group_set.name}: an operation is still running; left alone")
        return reports

    def _all_here(self, group_set: GroupSet) -> bool:
        """A group set with instances on other hosts is run by their agents too: this host's locks say nothing
        about them, so one host's repair must not fail it under their feet."""
        try:
            for member in group_set.instances:
                self.flow.hypervisor.lookup(member.instance_uuid)
        except InstanceNotFound:
            return False
        return True

    def _fail_leftovers(self, group_set: GroupSet) -> None:
        for snapshot_set in self.flow.catalog.list_sets(metadata={GROUP_SET_KEY: group_set.id}):
            self.fail_member_set(group_set, snapshot_set)
        group_set.status, group_set.completed_at = SetStatus.FAILED, datetime.now(UTC)
        group_set.error = "interrupted: the freezeframe process stopped before the group set completed; repaired"
        self.groups.update_group_set(group_set)

    def fail_member_set(self, group_set: GroupSet, snapshot_set: SnapshotSet) -> None:
        """One set of a group set that did not complete: its data removed (this host's repository, its RBD
        snapshots), the set failed. The caller holds the instance's lock."""
        if snapshot_set.status is SetStatus.FAILED:
            return
        self.flow.repository.remove(snapshot_set.id)
        rbd = [m.source_path for m in snapshot_set.members if m.store == RBD_STORE and m.source_path]
        if rbd and self.flow.volumes is not None:
            self.flow.volumes.remove(snapshot_set.id, rbd)
        snapshot_set.status, snapshot_set.members = SetStatus.FAILED, []
        snapshot_set.error = f"interrupted: group set {group_set.id} did not complete; repaired"
        snapshot_set.completed_at = datetime.now(UTC)
        self.flow.catalog.update_set(snapshot_set)

    def _prepare(self, member: GroupMember, group: Group, group_set: GroupSet, request: GroupRequest) -> PreparedMember:
        single = SnapshotRequest(
            member.instance_uuid,
            request.consistency,
            request.require,
            name=f"{group_set.name}-{member.instance_name}",
            metadata={**request.metadata, GROUP_SET_KEY: group_set.id, GROUP_KEY: group.name},
        )  # no backup type on the members: rotation works on whole group sets, never on one member
        return self.flow.prepare_member(member.instance_uuid, single, in_group=True)

    def _group_window(self, group: Group, prepared: Sequence[PreparedMember], rendezvous: Rendezvous) -> float | None:
        """Freeze/pause all → capture all → release all, bounded by one watchdog; returns the window in ms."""
        live = [pm for pm in prepared if pm.instance.state is not InstanceState.SHUTOFF]
        if not live:
            return None
        flow = self.flow
        windows = [flow.open_window(pm) for pm in live]
        watchdog = threading.Timer(flow.settings.freeze_cap_s, lambda: in_parallel([w.expire for w in windows]))
        watchdog.daemon = True
        pairs = list(zip(live, windows, strict=True))
        started = time.monotonic()
        try:
            with deferred_signals():
                watchdog.start()
                try:
                    _raise_first(in_parallel([_bind(flow.enter_window, pm, w) for pm, w in pairs]))
                    rendezvous.frozen(started + flow.settings.freeze_cap_s)  # every host's guests held
                    flow.hold_for_tests()
                    self._check_cap(group, windows)
                    _raise_first(in_parallel([_bind(flow.capture_in_window, pm, w) for pm, w in pairs]))
                finally:
                    released = in_parallel([w.release for w in windows])
                ended = time.monotonic()
                _raise_first(released)
            self._check_cap(group, windows)
        finally:
            watchdog.cancel()
        for pm, window in pairs:
            flow.close_window(pm, window)
        held = [w for w in windows if w.freeze_started is not None or w.pause_started is not None]
        return round((ended - started) * 1000.0, 3) if held else None

    def _check_cap(self, group: Group, windows: Sequence[GuestWindow]) -> None:
        if any(w.expired for w in windows):
            raise FreezeWindowExceeded(
                f"the group window of {group.name} reached its cap of {self.flow.settings.freeze_cap_s:g} s; "
                "every guest was released and the group set failed"
            )

    def _fail(
        self, group_set: GroupSet, prepared: Sequence[PreparedMember], exc: BaseException, *, owner: bool
    ) -> None:
        """Every member's set fails and loses its data; the group set keeps a failed row saying why."""
        for pm in prepared:
            try:
                self.flow._failed(pm.instance, pm.snapshot_set, exc, pm.entry)
            except FreezeframeError:
                log.exception("could not clean up set %s of group set %s", pm.snapshot_set.id, group_set.id)
        if not owner:
            return
        group_set.status = SetStatus.FAILED
        group_set.completed_at = datetime.now(UTC)
        group_set.error = "interrupted" if isinstance(exc, KeyboardInterrupt) else (str(exc) or type(exc).__name__)
        try:
            self.groups.update_group_set(group_set)
        except FreezeframeError:
            log.exception("could not record the failure of group set %s", group_set.id)

    def _complete(self, group_set: GroupSet, prepared: Sequence[PreparedMember]) -> GroupSet:
        reached = [pm.snapshot_set.achieved or pm.snapshot_set.requested for pm in prepared]
        group_set.achieved = weakest(reached)
        group_set.status = SetStatus.AVAILABLE
        group_set.completed_at = datetime.now(UTC)
        self.groups.update_group_set(group_set)
        return group_set


Step = Callable[[PreparedMember, GuestWindow], None]


def _bind(step: Step, pm: PreparedMember, window: GuestWindow) -> Callable[[], None]:
    return lambda: step(pm, window)


def _abort(rendezvous: Rendezvous, exc: BaseException) -> None:
    """Tell the other hosts' shares at once (they stop waiting and release their guests)."""
    try:
        rendezvous.abort("interrupted" if isinstance(exc, KeyboardInterrupt) else (str(exc) or type(exc).__name__))
    except FreezeframeError:
        log.exception("could not abort the barrier of the group snapshot")


def _raise_first(errors: Sequence[BaseException]) -> None:
    if errors:
        raise errors[0]
