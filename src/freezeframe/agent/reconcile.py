"""No set of this host stays ``creating`` after its job ended: the agent fails it and removes its files.

The flow records a set ``creating``, then ``available`` or ``failed``; the agent retries those writes across a
database restart (``steady``), but an outage longer than that bound, or a process that died between the two
writes with its journal already cleared, can still leave the first write without the second. Repair covers
sets whose journal entry survived; this covers the rest, for sets made by a job routed to THIS host only (the
job id is in the set's metadata), and only when that job is no longer queued or running, no journal entry names
the set and the instance's lock is free - so a snapshot in progress is never touched. Run at start-up and
every 5 s (from the heartbeat thread).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.adapters.service_store import QUEUED, RUNNING, JobStore
from freezeframe.api.projects import JOB_KEY
from freezeframe.errors import InstanceBusy, NotFound
from freezeframe.model import SetStatus, SnapshotSet
from freezeframe.service import Freezeframe

log = logging.getLogger("freezeframe.agent")


def stale_sets(service: Freezeframe, registry: HostRegistry, host: str) -> list[SnapshotSet]:
    """``creating`` sets of jobs routed to ``host`` that ended, whose journal entry is gone."""
    journaled = {entry.set_id for entry in service.parts.journal.pending()}
    store = JobStore(service.catalog)
    found = []
    for snapshot_set in service.catalog.list_sets(status=SetStatus.CREATING):
        job_id = snapshot_set.metadata.get(JOB_KEY)
        if job_id is None or snapshot_set.id in journaled or registry.job_host(job_id) != host:
            continue
        try:
            if store.get(job_id).state in (QUEUED, RUNNING):
                continue
        except NotFound:
            continue
        found.append(snapshot_set)
    return found


def fail_stale_sets(service: Freezeframe, registry: HostRegistry, host: str) -> list[str]:
    """Fail each stale set under its instance's lock (a busy instance waits for the next round); reports."""
    reports = []
    parts = service.parts
    for stale in stale_sets(service, registry, host):
        try:
            with parts.locks.hold(stale.instance_uuid):
                if any(entry.set_id == stale.id for entry in parts.journal.pending()):
                    continue
                snapshot_set = service.catalog.get_set(stale.id)
                if snapshot_set.status is not SetStatus.CREATING:
                    continue
                parts.repository.remove(snapshot_set.id)
                snapshot_set.status = SetStatus.FAILED
                snapshot_set.members = []
                snapshot_set.completed_at = datetime.now(UTC)
                snapshot_set.error = (
                    f"interrupted: job {snapshot_set.metadata.get(JOB_KEY)} ended before this set's outcome could be "
                    f"recorded (the catalog was unreachable); the agent of host {host} removed its files"
                )
                service.catalog.update_set(snapshot_set)
        except InstanceBusy:
            continue
        reports.append(f"set {stale.id} of {stale.instance_name} was left creating; marked failed, files removed")
    return reports
