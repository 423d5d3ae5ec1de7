"""No group set stays ``creating`` after its coordinator died: the agents settle it (``GroupCoordinator.settle``).

The coordinator of a group set spread over hosts is a job on one agent; if that agent is killed (its job then
failed by its restart, ``Agent._fail_interrupted_jobs``) or its host goes down (failed by the reaper), nobody
records the group set's outcome. Every agent, at start-up and every 5 s, looks at the ``creating`` group sets made
by a coordinator job (the job's request names the group set): while that job or any of its shares is queued or
running it leaves the group set alone; after, it completes the group set if every share succeeded, or fails and
cleans the member sets held on THIS host (under the instance's lock) and fails the group set once none is left.
Group sets of the single-host service have no coordinator job: ``GroupFlow.repair`` covers them.
"""

from __future__ import annotations

import functools

from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.adapters.service_store import QUEUED, RUNNING, Job, JobStore
from freezeframe.api.group_cluster import GROUP_SNAPSHOT_KIND, cluster_coordinator, coordinator_lock, share_lock
from freezeframe.errors import InstanceBusy, InstanceNotFound
from freezeframe.group_model import GROUP_SET_KEY, GroupSet
from freezeframe.model import SetStatus, SnapshotSet
from freezeframe.service import Freezeframe


def coordinator_job(store: JobStore, group_set: GroupSet) -> Job | None:
    for job in store.locked_on(coordinator_lock(group_set.group_name)):
        if job.kind == GROUP_SNAPSHOT_KIND and job.request.get("group_set_id") == group_set.id:
            return job
    return None


def settle_orphaned_group_sets(service: Freezeframe, registry: HostRegistry, host: str) -> list[str]:
    """Settle each ``creating`` group set whose coordinator job ended; reports what was done."""
    store = JobStore(service.catalog)
    coordinator = None
    reports = []
    for group_set in service.groups.groups.list_group_sets(status=SetStatus.CREATING):
        job = coordinator_job(store, group_set)
        if job is None or job.state in (QUEUED, RUNNING):
            continue
        prefix = share_lock(group_set.id)
        shares = {share.lock_key.removeprefix(prefix): share.id for share in store.locked_on(prefix)}
        sets = service.catalog.list_sets(metadata={GROUP_SET_KEY: group_set.id})
        why = f"its coordinator job {job.id} ended ({job.state}: {job.error or 'no outcome recorded'})"
        coordinator = coordinator or cluster_coordinator(service, registry, None)
        clean = functools.partial(_clean_if_here, service, registry, host, group_set)
        report = coordinator.settle(group_set, shares, sets, clean, why)
        if report is not None:
            reports.append(report)
    return reports


def _clean_if_here(
    service: Freezeframe, registry: HostRegistry, host: str, group_set: GroupSet, snapshot_set: SnapshotSet
) -> bool:
    """Fail and clean ``snapshot_set`` if this host holds it (where its share recorded it, else where its instance
    runs) and its instance is free; False otherwise (its own host's agent does it)."""
    holder = registry.set_host(snapshot_set.id)
    if holder is None:
        try:
            holder = registry.locate(snapshot_set.instance_uuid)[0].name
        except InstanceNotFound:
            return False
    if holder != host:
        return False
    try:
        with service.parts.locks.hold(snapshot_set.instance_uuid):
            service.groups.fail_member_set(group_set, service.catalog.get_set(snapshot_set.id))
    except InstanceBusy:
        return False
    return True
