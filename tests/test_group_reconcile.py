"""The agent's side of a group set whose coordinator died (agent/group_reconcile.py), on SQLite with a scripted
hypervisor: the real job rows, routes and set hosts, no PostgreSQL and no guest needed.

The group set is made by an ordinary group snapshot, then put back to ``creating`` with the job rows a multi-host
run leaves when the coordinator's agent is killed after the shares recorded their sets: the coordinator's job
failed (interrupted), one share's job failed. The agent must fail the group set and clean its sets; while the
coordinator's job still runs it must not touch anything.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.adapters.service_store import FAILED, RUNNING, SUCCEEDED, Job, JobStore
from freezeframe.agent.group_reconcile import settle_orphaned_group_sets
from freezeframe.api.group_cluster import GROUP_SHARE_KIND, GROUP_SNAPSHOT_KIND, coordinator_lock, share_lock
from freezeframe.config import Settings
from freezeframe.group_flow import GroupRequest
from freezeframe.group_model import GROUP_SET_KEY, GroupSet
from freezeframe.model import SetStatus
from freezeframe.service import Freezeframe
from group_fakes import GroupHypervisor, ScriptedWiring, report_instances


@dataclass
class Host:
    service: Freezeframe
    registry: HostRegistry
    hv: GroupHypervisor

    def job(self, kind: str, lock_key: str, state: str, request: dict[str, object], error: str | None = None) -> str:
        job = Job(id=str(uuid.uuid4()), kind=kind, state=state, project=None, lock_key=lock_key, request=request,
                  created_at=datetime.now(UTC), error=error)  # fmt: skip
        JobStore(self.service.catalog).add(job)
        self.registry.route(job.id, "h1")
        return job.id


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    scripted = GroupHypervisor()
    for name in ("db", "app"):
        scripted.add(name)
    settings = Settings(home=tmp_path / "h1")
    service = Freezeframe(settings, ScriptedWiring(settings, scripted))
    try:
        registry = report_instances(service, "h1", ("db", "app"))
        yield Host(service, registry, scripted)
    finally:
        service.close()


def _left_creating(host: Host, coordinator_state: str) -> GroupSet:
    """A group set whose sets were recorded by its share, still ``creating``: its coordinator never decided it."""
    groups = host.service.groups
    groups.create("app", ["db", "app"])
    view = groups.snapshot(GroupRequest("app"))
    group_set = view.group_set
    for snapshot_set in view.sets:
        host.registry.record_set(snapshot_set.id, "h1")
    group_set.status, group_set.completed_at, group_set.achieved = SetStatus.CREATING, None, None
    groups.groups.update_group_set(group_set)
    host.job(GROUP_SNAPSHOT_KIND, coordinator_lock("app"), coordinator_state,
             {"group": "app", "group_set_id": group_set.id},
             error="interrupted: the agent of host h1 stopped while this job was running")  # fmt: skip
    host.job(GROUP_SHARE_KIND, share_lock(group_set.id, "h1"), FAILED, {"group_set_id": group_set.id},
             error="interrupted: the agent of host h1 stopped while this job was running")  # fmt: skip
    return group_set


def test_a_group_set_whose_coordinator_job_ended_is_failed_and_its_sets_cleaned(host: Host) -> None:
    group_set = _left_creating(host, FAILED)
    sets = host.service.catalog.list_sets(metadata={GROUP_SET_KEY: group_set.id})
    assert len(sets) == 2 and all(host.service.parts.repository.exists(s.id) for s in sets)
    reports = settle_orphaned_group_sets(host.service, host.registry, "h1")
    assert len(reports) == 1 and "marked failed" in reports[0], reports
    settled = host.service.groups.show_set(group_set.id)
    assert settled.group_set.status is SetStatus.FAILED
    assert "coordinator job" in (settled.group_set.error or "")
    assert len(settled.sets) == 2
    for snapshot_set in settled.sets:
        assert snapshot_set.status is SetStatus.FAILED and snapshot_set.members == []
        assert not host.service.parts.repository.exists(snapshot_set.id)
    assert settle_orphaned_group_sets(host.service, host.registry, "h1") == [], "settled twice"


def test_another_hosts_agent_leaves_this_hosts_sets_and_the_group_set_waits(host: Host) -> None:
    group_set = _left_creating(host, FAILED)
    assert settle_orphaned_group_sets(host.service, host.registry, "h2") == []
    view = host.service.groups.show_set(group_set.id)
    assert view.group_set.status is SetStatus.CREATING
    assert all(s.status is SetStatus.AVAILABLE for s in view.sets)


@pytest.mark.parametrize("state", [RUNNING, SUCCEEDED])
def test_a_group_set_whose_coordinator_still_runs_is_left_alone(host: Host, state: str) -> None:
    """RUNNING: the coordinator decides. (SUCCEEDED is the control: the same rows with an ended job are settled.)"""
    group_set = _left_creating(host, state)
    reports = settle_orphaned_group_sets(host.service, host.registry, "h1")
    view = host.service.groups.show_set(group_set.id)
    if state == RUNNING:
        assert reports == [] and view.group_set.status is SetStatus.CREATING
        assert all(s.status is SetStatus.AVAILABLE and host.service.parts.repository.exists(s.id) for s in view.sets)
    else:
        assert reports and view.group_set.status is SetStatus.FAILED
