"""Group snapshots in a multi-host deployment: the coordinator job and each host's share job, run by agents.

The API queues the coordinator on the host of the group's first instance (UUID order). The coordinator
(``group_hosts.GroupCoordinator``) records the group set and queues one share per host through the same job
queue as every other job (``ClusterJobs``: job row + route + procrastinate row in one transaction); each share
runs on its host (``GroupFlow.snapshot_share``) and meets the others on the catalog's barrier board.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from freezeframe.adapters.barrier_board import SqlBarrierBoard
from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.adapters.service_store import FAILED, SUCCEEDED, Job, JobStore
from freezeframe.api.cluster import ClusterJobs
from freezeframe.api.jobs import JobContext, JobSpec
from freezeframe.errors import HostUnavailable, InstanceNotFound, InvalidRequest, WrongHost
from freezeframe.group_barrier import HostBarrier
from freezeframe.group_flow import GroupRequest, weakest
from freezeframe.group_hosts import GroupCoordinator, request_of
from freezeframe.group_model import GROUP_SET_KEY, Group
from freezeframe.model import Consistency
from freezeframe.ports.barrier import ShareOutcome
from freezeframe.service import Freezeframe

GROUP_SNAPSHOT_KIND = "groupsnapshot"
GROUP_SHARE_KIND = "groupshare"
GROUP_JOB_KINDS = (GROUP_SNAPSHOT_KIND, GROUP_SHARE_KIND)


class ClusterShareJobs:
    """``ShareJobs`` over the cluster's job queue (opened at the first share queued: settling a dead coordinator's
    group set only reads outcomes) and the jobs' rows."""

    def __init__(self, cluster: Callable[[], ClusterJobs], store: JobStore, token_id: str | None) -> None:
        self.cluster, self.store, self.token_id = cluster, store, token_id

    def submit_share(self, host: str, body: Mapping[str, object]) -> str:
        spec = JobSpec(kind=GROUP_SHARE_KIND, lock_key=share_lock(str(body["group_set_id"]), host), project=None,
                       request=dict(body), token_id=self.token_id)  # fmt: skip
        cluster = self.cluster()
        return cluster.submit(spec, cluster.registry.host(host)).id

    def outcome(self, job_id: str) -> ShareOutcome | None:
        job = self.store.get(job_id)
        if job.state == FAILED:
            return ShareOutcome(False, job.error or job.error_type or "its share failed")
        if job.state != SUCCEEDED:
            return None
        result = job.result or {}
        return ShareOutcome(True, achieved=result.get("consistency"), window_ms=result.get("window_ms"),
                            set_ids=tuple(result.get("set_ids", ())))  # fmt: skip


def cluster_coordinator(service: Freezeframe, registry: HostRegistry, token_id: str | None) -> GroupCoordinator:
    """The coordinator over the cluster's queue and the catalog's barrier board (also what settles the group set
    of a coordinator that died, ``agent/group_reconcile``)."""
    cluster = functools.cache(lambda: ClusterJobs(service.catalog, service.settings.catalog_url, registry))
    return GroupCoordinator(
        service.groups.groups, SqlBarrierBoard(service.catalog), ClusterShareJobs(cluster, JobStore(service.catalog),
        token_id), host_of=lambda uuid: registry.locate(uuid)[0].name, poll_s=0.05,
    )  # fmt: skip


def coordinator_lock(group: str) -> str:
    return f"group:{group}"


def share_lock(group_set_id: str, host: str = "") -> str:
    """The lock key of a share job; with no host, the prefix every share of the group set starts with."""
    return f"groupshare:{group_set_id}:{host}"


def run_group_job(service: Freezeframe, registry: HostRegistry, host: str, ctx: JobContext, job: Job) -> dict[str, Any]:
    if job.kind == GROUP_SNAPSHOT_KIND:
        return _coordinate(service, registry, ctx, job)
    return _share(service, registry, host, ctx, job)


def coordinator_request(group: str, group_set_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The coordinator job's request: the API body plus the group and the group set's pre-assigned id."""
    return {**body, "group": group, "group_set_id": group_set_id}


def _coordinate(service: Freezeframe, registry: HostRegistry, ctx: JobContext, job: Job) -> dict[str, Any]:
    body = job.request
    request = GroupRequest(
        str(body["group"]), Consistency(body.get("consistency", Consistency.FILESYSTEM)), bool(body.get("require")),
        name=body.get("name"), metadata=dict(body.get("metadata") or {}), group_set_id=str(body["group_set_id"]),
    )  # fmt: skip
    ctx.phase("coordinating")
    group_set = cluster_coordinator(service, registry, job.token_id).snapshot(request)
    view = service.groups.show_set(group_set.id)
    return {"group_set_id": group_set.id, "status": str(group_set.status),
            "consistency": str(group_set.achieved) if group_set.achieved else None,
            "window_ms": group_set.window_ms, "set_ids": [s.id for s in view.sets],
            "hosts": sorted({str(registry.set_host(s.id)) for s in view.sets})}  # fmt: skip


def _share(service: Freezeframe, registry: HostRegistry, host: str, ctx: JobContext, job: Job) -> dict[str, Any]:
    body = job.request
    group_set = service.groups.groups.get_group_set(str(body["group_set_id"]))
    wanted = set(body["members"])
    members = [m for m in group_set.instances if m.instance_uuid in wanted]
    if len(members) != len(wanted):
        raise WrongHost(f"group set {group_set.id}: the share for {host} names instances outside the group")
    barrier = HostBarrier(SqlBarrierBoard(service.catalog), group_set.id, host, [str(h) for h in body["hosts"]])
    ctx.phase("snapshotting")
    try:
        sets, window_ms = service.groups.snapshot_share(group_set, members, request_of(body), barrier, ctx.progress)
    finally:
        for snapshot_set in service.catalog.list_sets(metadata={GROUP_SET_KEY: group_set.id}):
            if snapshot_set.instance_uuid in wanted:
                registry.record_set(snapshot_set.id, host)
    return {"group_set_id": group_set.id, "consistency": str(weakest([s.achieved or s.requested for s in sets])),
            "window_ms": window_ms, "set_ids": [s.id for s in sets]}  # fmt: skip


def on_hosts(registry: HostRegistry, group: Group) -> bool:
    """Whether the hosts' reports hold an instance of the group: its snapshot is then a coordinator job (the CLI
    asks; ``serve --multi-host`` always queues one)."""
    for member in group.members:
        try:
            registry.locate(member.instance_uuid)
        except InstanceNotFound:
            continue
        return True
    return False


def submit_group_snapshot(cluster: ClusterJobs, group: Group, body: Mapping[str, Any], token_id: str | None) -> Job:
    """Queue the coordinator on the host of the group's first instance (UUID order), locked on the group."""
    if not group.members:
        raise InvalidRequest(f"group {group.name} has no instances; add some with `freezeframe group add`")
    first = min(group.members, key=lambda m: m.instance_uuid)
    try:
        host = cluster.registry.locate(first.instance_uuid)[0]
    except InstanceNotFound:
        raise HostUnavailable(f"no host reports instance {first.instance_name} of group {group.name}") from None
    spec = JobSpec(kind=GROUP_SNAPSHOT_KIND, lock_key=coordinator_lock(group.name), project=None, token_id=token_id,
                   request=coordinator_request(group.name, str(uuid.uuid4()), body))  # fmt: skip
    return cluster.submit(spec, host)
