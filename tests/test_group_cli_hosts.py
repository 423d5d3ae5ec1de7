"""``freezeframe snapshot --group NAME`` when the hosts of a multi-host deployment report the group's instances:
the CLI queues the same coordinator job as ``POST /v1/groups/NAME/snapshots`` (``submit_group_snapshot``) and
follows it, then prints the group set like the single-host command.

Scripted, on SQLite: one host "h1" whose heartbeat reports the scripted guests; its agent is ``HostWork`` itself
(the code a procrastinate task calls), run in a thread for each job queued. Only procrastinate's queue is left
out (``QueueFreeCluster`` writes the job row and its route as ``ClusterJobs.submit`` does and hands the job to the
"agent"): the coordinator, its shares, the barrier board and the job rows are the real ones. The same job through
the real queue and agents on PostgreSQL (queued by the API route): tests/test_group_hosts_vm.py.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cli_helpers import run_cli
from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.host_registry import HostRecord, HostRegistry
from freezeframe.adapters.service_store import QUEUED, Job, JobStore
from freezeframe.agent.work import HostWork
from freezeframe.api import cluster as cluster_module
from freezeframe.api import group_cluster
from freezeframe.api.jobs import JobSpec
from freezeframe.config import Settings
from freezeframe.model import InstanceState
from freezeframe.service import Freezeframe
from group_fakes import GroupHypervisor, ScriptedWiring, report_instances, use_scripted_cli


@dataclass
class Agents:
    """The agent of each host: its ``HostWork`` runs each job queued for it, in a thread of its own."""

    work: dict[str, HostWork] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def take(self, host: str, job: Job) -> None:
        self.kinds.append(job.kind)
        thread = threading.Thread(target=self.work[host].run, args=(job.id,))
        self.threads.append(thread)
        thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(30)


AGENTS = Agents()


class QueueFreeCluster:
    """``ClusterJobs`` without procrastinate: the job's row and route, then straight to the host's agent."""

    def __init__(self, catalog: SqlCatalog, catalog_url: str, registry: HostRegistry) -> None:
        self.catalog, self.registry = catalog, registry

    def submit(self, spec: JobSpec, host: HostRecord) -> Job:
        job = Job(id=str(uuid.uuid4()), kind=spec.kind, state=QUEUED, project=spec.project, lock_key=spec.lock_key,
                  request=spec.request, created_at=datetime.now(UTC), token_id=spec.token_id)  # fmt: skip
        JobStore(self.catalog).add(job)
        self.registry.route(job.id, host.name)
        AGENTS.take(host.name, job)
        return job


@pytest.fixture
def hv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[GroupHypervisor]:
    scripted = GroupHypervisor()
    for name in ("db", "app"):
        scripted.add(name)
    home = tmp_path / "home"
    use_scripted_cli(monkeypatch, home, scripted)
    monkeypatch.setattr(cluster_module, "ClusterJobs", QueueFreeCluster)
    monkeypatch.setattr(group_cluster, "ClusterJobs", QueueFreeCluster)
    settings = Settings(home=home)
    agent = Freezeframe(settings, ScriptedWiring(settings, scripted))
    AGENTS.work, AGENTS.threads, AGENTS.kinds = {}, [], []
    try:
        registry = report_instances(agent, "h1", ("db", "app"))
        AGENTS.work["h1"] = HostWork("h1", agent, registry)
        yield scripted
    finally:
        AGENTS.join()
        agent.close()


def test_snapshot_group_across_hosts_queues_the_coordinator_and_prints_the_group_set(
    hv: GroupHypervisor, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "group", "create", "shop", "db", "app").code == 0
    result = run_cli(capsys, "snapshot", "--group", "shop", "--name", "nightly", "--meta", "k=v", "--json")
    assert result.code == 0, result.err
    shown = json.loads(result.out)
    assert AGENTS.kinds == [group_cluster.GROUP_SNAPSHOT_KIND, group_cluster.GROUP_SHARE_KIND]
    assert shown["status"] == "available" and shown["name"] == "nightly", shown
    assert sorted(s["instance"]["name"] for s in shown["sets"]) == ["app", "db"]
    assert all(s["metadata"]["k"] == "v" for s in shown["sets"])
    assert "frozen" in hv.calls("db") and all(g.state is InstanceState.RUNNING for g in hv.guests.values())
    human = run_cli(capsys, "show", "nightly")
    assert human.code == 0 and "nightly" in human.out


def test_a_failed_group_snapshot_across_hosts_is_one_line_and_its_exit_code(
    hv: GroupHypervisor, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "group", "create", "shop", "db", "app").code == 0
    hv.guests["app"].capture_fails = True
    result = run_cli(capsys, "snapshot", "--group", "shop")
    assert result.code != 0 and result.err.count("\n") == 1, result.err
    assert "group snapshot of shop failed" in result.err and "No space left" in result.err
    assert "Traceback" not in result.err
    as_json = run_cli(capsys, "snapshot", "--group", "shop", "--json")
    assert as_json.code == result.code and json.loads(as_json.out)["state"] == "failed"
    capped = run_cli(capsys, "snapshot", "--group", "shop", "--freeze-cap", "5")
    assert capped.code == 3 and "each agent's own cap" in capped.err
