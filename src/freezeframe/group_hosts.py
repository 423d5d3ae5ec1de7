"""A group snapshot whose instances run on several hosts, coordinated by the service over the hosts' agents.

The coordinator (itself a job on one agent) splits the group by host, records the group set (``creating``) and
queues one share per host (``ShareJobs``); each share runs ``GroupFlow.snapshot_share`` on its host and meets
the others at the barrier (``group_barrier``). The coordinator watches the shares' jobs: the first that fails -
including one the reaper fails because its host stopped answering - aborts the board, so every other share stops
waiting, releases its guests and fails its sets. The group set is ``available`` only when every share succeeded,
else ``failed`` with the first reason; either way nothing is left half-made.

A coordinator that dies (its agent killed, its host down) leaves its group set ``creating``; once its job has
ended (failed by the restarted agent or by the reaper) and every share has ended, the agents ``settle`` it: when
every share succeeded and every instance has an available set, the group set is COMPLETED - the shares met at the
barrier and recorded their sets only after every host had copied, so the point in time is whole and throwing it
away would lose a good backup; otherwise each agent fails and cleans the sets held on its host, and the group set
is failed once none of its sets is left (a member set on a host that is down waits for that host's agent).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from freezeframe.errors import GroupBarrierFailed, InvalidRequest
from freezeframe.group_barrier import READY, BarrierTimeouts
from freezeframe.group_flow import GroupRequest, new_group_set, weakest
from freezeframe.group_model import Group, GroupMember, GroupSet
from freezeframe.model import Consistency, SetStatus, SnapshotSet
from freezeframe.ports.barrier import BarrierBoard, ShareJobs, ShareOutcome
from freezeframe.ports.groups import Groups

COORDINATOR = "coordinator"
"""The name the coordinator aborts the board under."""


def split_by_host(group: Group, host_of: Callable[[str], str]) -> dict[str, list[GroupMember]]:
    shares: dict[str, list[GroupMember]] = {}
    for member in sorted(group.members, key=lambda m: m.instance_uuid):
        shares.setdefault(host_of(member.instance_uuid), []).append(member)
    return dict(sorted(shares.items()))


def share_body(
    request: GroupRequest, group_set: GroupSet, hosts: list[str], members: list[GroupMember]
) -> dict[str, object]:
    """What a share job carries: the request, the group set and which hosts meet at its barrier."""
    return {
        "group": request.group, "group_set_id": group_set.id, "consistency": str(request.consistency),
        "require": request.require, "name": group_set.name, "metadata": dict(request.metadata),
        "hosts": hosts, "members": [m.instance_uuid for m in members],
    }  # fmt: skip


def request_of(body: Mapping[str, object]) -> GroupRequest:
    metadata = body.get("metadata") or {}
    assert isinstance(metadata, dict)
    return GroupRequest(
        str(body["group"]), Consistency(str(body["consistency"])), bool(body.get("require")),
        name=str(body["name"]), metadata={str(k): str(v) for k, v in metadata.items()},
        group_set_id=str(body["group_set_id"]),
    )  # fmt: skip


@dataclass
class GroupCoordinator:
    groups: Groups
    board: BarrierBoard
    jobs: ShareJobs
    host_of: Callable[[str], str]
    poll_s: float = 0.2
    ready_s: float = BarrierTimeouts.ready_s
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def snapshot(self, request: GroupRequest) -> GroupSet:
        group = self.groups.get_group(request.group)
        if not group.members:
            raise InvalidRequest(f"group {group.name} has no instances; add some with `freezeframe group add`")
        shares = split_by_host(group, self.host_of)
        group_set = new_group_set(group, request)
        self.groups.add_group_set(group_set)
        hosts = list(shares)
        outcomes: dict[str, ShareOutcome] = {}
        try:
            jobs = {h: self.jobs.submit_share(h, share_body(request, group_set, hosts, m)) for h, m in shares.items()}
            outcomes = self._watch(group_set.id, jobs)
        except BaseException as exc:
            self.board.abort(group_set.id, COORDINATOR, str(exc) or type(exc).__name__)
            self.decide(group_set, {}, error=str(exc) or type(exc).__name__)
            raise
        return self.decide(group_set, outcomes)

    def _watch(self, group_set_id: str, jobs: dict[str, str]) -> dict[str, ShareOutcome]:
        """Until every share ended; the first failure aborts the board so that the others stop at once. Shares
        must reach ``ready`` within ``ready_s`` (a host whose worker never takes its share - down, or busy with
        other jobs - fails the group set in bounded time); after an abort, a share that never reached ``ready``
        holds nothing and is not waited for (when it runs it finds the abort and fails its own sets)."""
        outcomes: dict[str, ShareOutcome] = {}
        ready_by = self.clock() + self.ready_s
        while True:
            for host, job_id in jobs.items():
                outcome = outcomes.get(host) or self.jobs.outcome(job_id)
                if outcome is None or host in outcomes:
                    continue
                outcomes[host] = outcome
                if not outcome.ok:
                    self.board.abort(group_set_id, host, outcome.error or "its share failed")
            state = self.board.state(group_set_id)
            ready = state.arrived.get(READY, frozenset())
            if state.aborted_by is None and self.clock() > ready_by and not ready >= set(jobs):
                missing = ", ".join(sorted(set(jobs) - ready))
                self.board.abort(group_set_id, COORDINATOR, f"host(s) {missing} did not start their share in time")
                continue
            waiting = [h for h in jobs if h not in outcomes and (state.aborted_by is None or h in ready)]
            if not waiting:
                return {h: outcomes.get(h) or ShareOutcome(False, state.reason) for h in jobs}
            self.sleep(self.poll_s)

    def settle(
        self, group_set: GroupSet, shares: Mapping[str, str], sets: Sequence[SnapshotSet],
        clean: Callable[[SnapshotSet], bool], why: str,
    ) -> str | None:  # fmt: skip
        """A ``creating`` group set whose coordinator's job ended (see the module docstring): ``shares`` are its
        share jobs by host, ``sets`` its member sets, ``clean`` fails and cleans one set if this host holds it
        (False: another host's, or busy). Returns what was done; None while a share still runs or a set waits
        for its host."""
        outcomes = {h: self.jobs.outcome(j) for h, j in shares.items()}
        ended = {h: o for h, o in outcomes.items() if o is not None}
        if len(ended) != len(outcomes):
            return None
        whole = {s.instance_uuid for s in sets if s.status is SetStatus.AVAILABLE} >= {
            m.instance_uuid for m in group_set.instances
        }
        if ended and whole and all(o.ok for o in ended.values()):
            self.decide(group_set, ended)
            return f"group set {group_set.name}: {why}, but every share succeeded; recorded available"
        left = [s for s in sets if s.status is not SetStatus.FAILED and not clean(s)]
        if left:
            return None
        self.decide(group_set, {}, error=f"interrupted: {why}; every share ended and the sets' data was removed")
        return f"group set {group_set.name}: {why}; marked failed, its sets removed"

    def decide(self, group_set: GroupSet, outcomes: dict[str, ShareOutcome], error: str | None = None) -> GroupSet:
        failed = [f"host {h}: {o.error}" for h, o in outcomes.items() if not o.ok]
        error = error or ("; ".join(failed) if failed else None)
        group_set.completed_at = datetime.now(UTC)
        if error is None:
            group_set.status = SetStatus.AVAILABLE
            group_set.achieved = weakest([Consistency(o.achieved or group_set.requested) for o in outcomes.values()])
            windows = [o.window_ms for o in outcomes.values() if o.window_ms is not None]
            group_set.window_ms = max(windows) if windows else None  # the longest any host held its guests
        else:
            group_set.status, group_set.error = SetStatus.FAILED, error
        self.groups.update_group_set(group_set)
        self.board.forget(group_set.id)
        if error is not None and outcomes:
            raise GroupBarrierFailed(f"group set {group_set.name} failed: {error}")
        return group_set
