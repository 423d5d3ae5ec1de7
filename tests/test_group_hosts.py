"""A group spread over two hosts, with scripted hypervisors: the barrier's guarantees in milliseconds.

Each "host" has its own scripted hypervisor, journal, locks and repository; they share the catalog and one
in-memory barrier board; share jobs run in threads. Proven here: no capture on any host before every guest of
every host is held; a host that stops answering (its board calls hang) cannot hold the other host's guests past
the cap, nor its own (its own watchdog releases them); the group set then fails with nothing left half-made.
The same on real guests on two namespaced hosts: tests/test_group_hosts_vm.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from freezeframe.adapters.journal import FileJournal
from freezeframe.adapters.locks import FileLocks
from freezeframe.adapters.qemu_img import QemuImg
from freezeframe.adapters.repository import DirectoryRepository
from freezeframe.errors import GroupBarrierFailed, HostUnavailable
from freezeframe.group_barrier import BarrierTimeouts, HostBarrier
from freezeframe.group_flow import GroupRequest, new_group_set, weakest
from freezeframe.group_hosts import GroupCoordinator, request_of, share_body, split_by_host
from freezeframe.group_model import GROUP_SET_KEY, Group, GroupMember, GroupSet
from freezeframe.model import Consistency, SetStatus, SnapshotSet
from freezeframe.ports.barrier import BarrierState, ShareOutcome
from group_fakes import GroupHypervisor, GroupWorld, group_world


@dataclass
class MemoryBoard:
    arrived: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    aborts: dict[str, tuple[str, str]] = field(default_factory=dict)
    cut_off: set[str] = field(default_factory=set)
    """Hosts whose calls hang (the host stopped answering) until ``heal``."""
    healed: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _reach(self, host: str) -> None:
        if host in self.cut_off:
            self.healed.wait(10)

    def arrive(self, group_set_id: str, host: str, phase: str) -> None:
        self._reach(host)
        with self.lock:
            self.arrived.setdefault(group_set_id, {}).setdefault(phase, set()).add(host)

    def abort(self, group_set_id: str, host: str, reason: str) -> None:
        self._reach(host)
        with self.lock:
            self.aborts.setdefault(group_set_id, (host, reason))

    def state(self, group_set_id: str) -> BarrierState:
        with self.lock:
            arrived = {p: frozenset(h) for p, h in self.arrived.get(group_set_id, {}).items()}
            by, reason = self.aborts.get(group_set_id, (None, None))
        return BarrierState(arrived, by, reason)

    def forget(self, group_set_id: str) -> None:
        with self.lock:
            self.arrived.pop(group_set_id, None)


@dataclass
class ThreadJobs:
    """Each share runs in a thread on its host's world, like an agent's worker."""

    worlds: dict[str, GroupWorld]
    board: MemoryBoard
    cap_s: float = 2.0
    ready_s: float = 5.0
    down: set[str] = field(default_factory=set)
    stalled: set[str] = field(default_factory=set)
    """Hosts whose worker never takes the share (its job stays queued)."""
    outcomes: dict[str, ShareOutcome] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    def submit_share(self, host: str, body: Mapping[str, object]) -> str:
        job_id = f"job-{host}"
        if host in self.down:
            self.outcomes[job_id] = ShareOutcome(False, f"host {host} stopped answering")
            return job_id
        if host in self.stalled:
            return job_id
        thread = threading.Thread(target=self._run, args=(job_id, host, body))
        self.threads.append(thread)
        thread.start()
        return job_id

    def _run(self, job_id: str, host: str, body: Mapping[str, object]) -> None:
        world, request = self.worlds[host], request_of(body)
        group_set = world.groups.get_group_set(str(body["group_set_id"]))
        members = [m for m in group_set.instances if m.instance_uuid in body["members"]]  # type: ignore[operator]
        hosts = [str(h) for h in body["hosts"]]  # type: ignore[attr-defined]
        barrier = HostBarrier(self.board, group_set.id, host, hosts, BarrierTimeouts(ready_s=self.ready_s))
        try:
            sets, window = world.group_flow(freeze_cap_s=self.cap_s).snapshot_share(
                group_set, members, request, barrier
            )
            level = weakest([s.achieved or s.requested for s in sets])
            self.outcomes[job_id] = ShareOutcome(True, achieved=str(level), window_ms=window)
        except Exception as exc:  # noqa: BLE001 - recorded as the job's outcome, as an agent does
            self.outcomes[job_id] = ShareOutcome(False, str(exc))

    def outcome(self, job_id: str) -> ShareOutcome | None:
        return self.outcomes.get(job_id)


@dataclass
class TwoHosts:
    worlds: dict[str, GroupWorld]
    board: MemoryBoard
    jobs: ThreadJobs
    ready_s: float = 5.0

    def coordinator(self) -> GroupCoordinator:
        owner = {g.uuid: h for h, w in self.worlds.items() for g in w.hv.guests.values()}
        return GroupCoordinator(
            self.worlds["h1"].groups, self.board, self.jobs, owner.__getitem__, poll_s=0.01, ready_s=self.ready_s
        )

    def timeline(self) -> list[tuple[str, str, float]]:
        return sorted((e for w in self.worlds.values() for e in w.hv.timeline), key=lambda e: e[2])

    def all_released(self) -> bool:
        return all(w.guests_released() for w in self.worlds.values())


@pytest.fixture
def hosts(tmp_path: Path) -> TwoHosts:
    first = group_world(tmp_path / "h1", n=0)
    worlds = {"h1": first}
    for name, guests in (("h1", ("a1", "a2")), ("h2", ("b1",))):
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        hv = GroupHypervisor()
        for g in guests:
            hv.add(g)
        worlds[name] = replace(first, hv=hv, repository=DirectoryRepository(root / "repo", QemuImg()),
                               journal=FileJournal(root / "journal"), locks=FileLocks(root / "locks"))  # fmt: skip
    board = MemoryBoard()
    two = TwoHosts(worlds, board, ThreadJobs(worlds, board))
    return two


def _make_group(two: TwoHosts) -> None:
    members = tuple(GroupMember(g.uuid, g.name) for w in two.worlds.values() for g in w.hv.guests.values())
    two.worlds["h1"].groups.create_group(Group("app", members, datetime.now(UTC)))


def _request(consistency: Consistency = Consistency.FILESYSTEM) -> GroupRequest:
    return GroupRequest("app", consistency)


def _nothing_left(two: TwoHosts) -> None:
    assert two.all_released(), "a guest is still frozen or paused"
    catalog = two.worlds["h1"].catalog
    sets = catalog.list_sets()
    assert sets and all(s.status is SetStatus.FAILED and s.members == [] for s in sets)
    for world in two.worlds.values():
        assert not any(world.repository.exists(s.id) for s in sets)
        assert world.journal.pending() == []
    (group_set,) = two.worlds["h1"].groups.list_group_sets()
    assert group_set.status is SetStatus.FAILED and group_set.error


@pytest.mark.parametrize("level", [Consistency.CRASH, Consistency.FILESYSTEM])
def test_no_host_captures_before_every_guest_of_every_host_is_held(hosts: TwoHosts, level: Consistency) -> None:
    _make_group(hosts)
    group_set = hosts.coordinator().snapshot(_request(level))
    held = "pause" if level is Consistency.CRASH else "frozen"
    timeline = hosts.timeline()
    holds = [t for _, c, t in timeline if c == held]
    captures = [t for _, c, t in timeline if c == "capture"]
    assert len(holds) == len(captures) == 3
    assert max(holds) < min(captures), "a host captured while a guest on another host still ran"
    assert group_set.status is SetStatus.AVAILABLE and group_set.achieved is level
    sets = hosts.worlds["h1"].catalog.list_sets(metadata={GROUP_SET_KEY: group_set.id})
    assert sorted(s.instance_name for s in sets) == ["a1", "a2", "b1"]
    assert all(s.status is SetStatus.AVAILABLE for s in sets)
    assert hosts.all_released()


def test_a_host_that_stops_answering_in_the_window_holds_no_guest_past_the_cap(hosts: TwoHosts) -> None:
    """h2 freezes its guest, then cannot reach the board: h1 waits for it until its cap, releases, aborts; h2's own
    watchdog releases h2's guest at its cap, whatever the board does."""
    _make_group(hosts)
    hosts.jobs.cap_s = 0.4
    board = hosts.board
    original = board.arrive

    def arrive(group_set_id: str, host: str, phase: str) -> None:
        if host == "h2" and phase == "frozen":
            board.cut_off.add("h2")
        original(group_set_id, host, phase)

    board.arrive = arrive  # type: ignore[method-assign]
    threading.Timer(1.5, board.healed.set).start()
    with pytest.raises(GroupBarrierFailed, match="did not reach 'frozen'"):
        hosts.coordinator().snapshot(_request())
    for thread in hosts.jobs.threads:
        thread.join(10)
    timeline = hosts.timeline()
    for name in ("a1", "a2", "b1"):
        frozen = next(t for n, c, t in timeline if n == name and c == "frozen")
        thawed = next(t for n, c, t in timeline if n == name and c == "thaw")
        assert thawed - frozen < 0.4 + 0.5, f"{name} stayed frozen {thawed - frozen:.2f} s with a 0.4 s cap"
    assert "capture" not in [c for _, c, _ in timeline]
    _nothing_left(hosts)


def test_a_host_down_before_its_share_starts_fails_the_group_before_any_guest_is_touched(hosts: TwoHosts) -> None:
    _make_group(hosts)
    hosts.jobs.down.add("h2")
    started = time.monotonic()
    with pytest.raises(GroupBarrierFailed, match="stopped answering"):
        hosts.coordinator().snapshot(_request())
    for thread in hosts.jobs.threads:
        thread.join(10)
    assert time.monotonic() - started < 5, "h1 waited for the down host past the coordinator's abort"
    assert not any(c in ("freeze", "frozen", "pause") for _, c, _ in hosts.timeline())
    _nothing_left(hosts)


def test_a_failed_share_after_the_window_fails_the_other_hosts_sets_too(hosts: TwoHosts) -> None:
    _make_group(hosts)
    hosts.worlds["h2"].hv.guests["b1"].capture_fails = True
    with pytest.raises(GroupBarrierFailed, match="host h2"):
        hosts.coordinator().snapshot(_request())
    for thread in hosts.jobs.threads:
        thread.join(10)
    _nothing_left(hosts)


def test_an_unreachable_host_at_queueing_fails_the_group_set_cleanly(hosts: TwoHosts) -> None:
    _make_group(hosts)

    def refuse(host: str, body: Mapping[str, object]) -> str:
        raise HostUnavailable(f"host {host} is down")

    hosts.jobs.submit_share = refuse  # type: ignore[method-assign]
    with pytest.raises(HostUnavailable):
        hosts.coordinator().snapshot(_request())
    (group_set,) = hosts.worlds["h1"].groups.list_group_sets()
    assert group_set.status is SetStatus.FAILED and "down" in (group_set.error or "")
    assert hosts.all_released()


def test_a_share_no_worker_takes_fails_the_group_in_bounded_time(hosts: TwoHosts) -> None:
    """h2's worker is busy (or its agent gone) and its share stays queued: the coordinator aborts after ready_s."""
    _make_group(hosts)
    hosts.jobs.stalled.add("h2")
    hosts.ready_s = 0.3
    with pytest.raises(GroupBarrierFailed, match="did not start their share in time"):
        hosts.coordinator().snapshot(_request())
    for thread in hosts.jobs.threads:
        thread.join(10)
    assert not any(c in ("freeze", "frozen", "pause") for _, c, _ in hosts.timeline())
    _nothing_left(hosts)


def test_one_hosts_repair_leaves_a_group_set_spanning_hosts_to_its_coordinator(hosts: TwoHosts) -> None:
    """An agent restarting on h1 repairs its own journal, but a ``creating`` group set with an instance on h2 may
    still be running there: h1's locks say nothing about it, so h1 must not fail it."""
    _make_group(hosts)
    group = hosts.worlds["h1"].groups.get_group("app")
    group_set = new_group_set(group, _request())
    hosts.worlds["h1"].groups.add_group_set(group_set)
    reports = hosts.worlds["h1"].group_flow().repair()
    assert any("spans other hosts" in r for r in reports), reports
    assert hosts.worlds["h1"].groups.get_group_set(group_set.id).status is SetStatus.CREATING


# ---- a coordinator that died: the agents settle its group set ------------------------------------------------


def _orphan(two: TwoHosts) -> tuple[GroupSet, dict[str, str]]:
    """A coordinator that recorded its group set, queued both shares and died: the shares run on without it."""
    _make_group(two)
    group = two.worlds["h1"].groups.get_group("app")
    group_set = new_group_set(group, _request())
    two.worlds["h1"].groups.add_group_set(group_set)
    shares = split_by_host(group, two.coordinator().host_of)
    body = {h: share_body(_request(), group_set, list(shares), m) for h, m in shares.items()}
    jobs = {h: two.jobs.submit_share(h, body[h]) for h in shares}
    for thread in two.jobs.threads:
        thread.join(10)
    return group_set, jobs


def _cleaner(two: TwoHosts, here: str, group_set: GroupSet) -> Callable[[SnapshotSet], bool]:
    """What an agent's ``clean`` does: fail and clean the sets its host holds, leave the others."""
    holder = two.coordinator().host_of
    world = two.worlds[here]

    def clean(snapshot_set: SnapshotSet) -> bool:
        if holder(snapshot_set.instance_uuid) != here:
            return False
        world.group_flow().fail_member_set(group_set, world.catalog.get_set(snapshot_set.id))
        return True

    return clean


def _settle(two: TwoHosts, here: str, group_set: GroupSet, jobs: dict[str, str]) -> str | None:
    sets = two.worlds["h1"].catalog.list_sets(metadata={GROUP_SET_KEY: group_set.id})
    current = two.worlds["h1"].groups.get_group_set(group_set.id)
    why = "its coordinator job c1 ended (failed: interrupted)"
    return two.coordinator().settle(current, jobs, sets, _cleaner(two, here, current), why)


def test_a_dead_coordinators_group_set_whose_shares_all_succeeded_is_completed(hosts: TwoHosts) -> None:
    """The shares recorded their sets only after every host copied: the point in time is whole, so it is kept."""
    group_set, jobs = _orphan(hosts)
    report = _settle(hosts, "h2", group_set, jobs)
    assert report is not None and "recorded available" in report
    settled = hosts.worlds["h1"].groups.get_group_set(group_set.id)
    assert settled.status is SetStatus.AVAILABLE and settled.achieved is Consistency.FILESYSTEM
    assert settled.window_ms is not None and settled.window_ms > 0
    sets = hosts.worlds["h1"].catalog.list_sets(metadata={GROUP_SET_KEY: group_set.id})
    assert len(sets) == 3 and all(s.status is SetStatus.AVAILABLE for s in sets)


def test_a_dead_coordinators_group_set_with_a_failed_share_is_failed_once_every_host_cleaned(hosts: TwoHosts) -> None:
    """h2's agent died after recording its set but before its job's success (the reaper failed the job): the group
    set fails; h1's agent cleans h1's sets at once, h2's set waits for h2's agent, then the group set is failed."""
    group_set, jobs = _orphan(hosts)
    hosts.jobs.outcomes[jobs["h2"]] = ShareOutcome(False, "host h2 stopped answering")
    assert _settle(hosts, "h1", group_set, jobs) is None, "h2's set is still there: the group set must wait"
    catalog = hosts.worlds["h1"].catalog
    assert hosts.worlds["h1"].groups.get_group_set(group_set.id).status is SetStatus.CREATING
    by_name = {s.instance_name: s for s in catalog.list_sets(metadata={GROUP_SET_KEY: group_set.id})}
    assert by_name["a1"].status is by_name["a2"].status is SetStatus.FAILED
    assert by_name["b1"].status is SetStatus.AVAILABLE and hosts.worlds["h2"].repository.exists(by_name["b1"].id)
    report = _settle(hosts, "h2", group_set, jobs)
    assert report is not None and "marked failed" in report
    _nothing_left(hosts)
    assert "coordinator job c1 ended" in (hosts.worlds["h1"].groups.list_group_sets()[0].error or "")


def test_a_dead_coordinators_group_set_is_left_alone_while_a_share_has_not_ended(hosts: TwoHosts) -> None:
    hosts.jobs.stalled.add("h2")
    hosts.jobs.ready_s = 0.3
    group_set, jobs = _orphan(hosts)
    assert _settle(hosts, "h1", group_set, jobs) is None
    assert hosts.worlds["h1"].groups.get_group_set(group_set.id).status is SetStatus.CREATING
    hosts.jobs.outcomes[jobs["h2"]] = ShareOutcome(False, "host h2 stopped answering")
    assert _settle(hosts, "h1", group_set, jobs) is not None
    _nothing_left(hosts)
