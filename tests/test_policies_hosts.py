"""Policies in a multi-host deployment without a guest: the real PostgreSQL test bed, procrastinate's real workers
and periodic deferrer, the real catalog, job routes and agent job body, over the scripted multi-instance
hypervisor of tests/group_fakes.py as host ``h1``'s libvirt.

Two scheduler replicas tick every second: every tick time is deferred once, each due policy tick is claimed once,
hours of downtime collapse into one run, a second policy of the same instance is refused while the first one's
job is queued, and the job lands on the instance's host's queue, where that host's agent body runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import procrastinate
import procrastinate.worker
import psycopg
import pytest
from fastapi.testclient import TestClient

from freezeframe.adapters.group_records import SqlGroups
from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.adapters.job_queue import CONTROL_QUEUE, conninfo
from freezeframe.adapters.service_store import JobStore
from freezeframe.agent.inventory import instance_record
from freezeframe.agent.work import HostWork
from freezeframe.api.app import ApiConfig, create_app
from freezeframe.api.cluster import ClusterJobs, Inventory
from freezeframe.api.policy_cluster import TICK_TASK, ClusterPolicies, register_policy_ticks
from freezeframe.api.state import AppState
from freezeframe.config import Settings
from freezeframe.ops.policies import POLICY_KEY, new_policy
from freezeframe.scheduling import SKIPPED
from freezeframe.service import Freezeframe
from group_fakes import GroupHypervisor, ScriptedWiring
from pg_helpers import pg_server, pg_url

__all__ = ["pg_server", "pg_url"]


@dataclass
class Host:
    url: str
    service: Freezeframe
    registry: HostRegistry

    def replica(self) -> ClusterPolicies:
        """One scheduler replica's view: its own job-queue client over the shared database."""
        catalog = self.service.catalog
        cluster = ClusterJobs(catalog, self.url, self.registry)
        return ClusterPolicies(self.service.policies, cluster, Inventory(self.registry), SqlGroups(catalog))

    def sql(self, query: str, *args: object) -> list[tuple[object, ...]]:
        with psycopg.connect(conninfo(self.url)) as connection:
            return list(connection.execute(query, args).fetchall())  # type: ignore[arg-type]


@pytest.fixture
def host(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    monkeypatch.setenv("FREEZEFRAME_CATALOG_URL", pg_url)
    scripted = GroupHypervisor()
    scripted.add("db")
    settings = Settings(home=tmp_path / "h1")
    service = Freezeframe(settings, ScriptedWiring(settings, scripted))
    try:
        registry = HostRegistry(service.catalog)
        key = registry.enroll("h1")
        registry.heartbeat(
            "h1", key, uri="test:///h1", repository=str(settings.repository_dir), free_bytes=None,
            instances=[instance_record(service.instance("db"))], agent_pid=os.getpid(),
        )  # fmt: skip
        yield Host(pg_url, service, registry)
    finally:
        service.close()


def run_replicas(host: Host, replicas: list[ClusterPolicies], seconds: float) -> None:
    """Each replica a procrastinate worker of its own on the control queue, ticking every second, for a while."""

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            workers = []
            for number, replica in enumerate(replicas):
                app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo(host.url)))
                register_policy_ticks(app, lambda r=replica: r, cron="* * * * * *")  # type: ignore[misc]
                await stack.enter_async_context(app.open_async())
                workers.append(procrastinate.worker.Worker(
                    app, queues=[CONTROL_QUEUE], name=f"replica-{number}", concurrency=2,
                    install_signal_handlers=False, fetch_job_polling_interval=0.2,
                ))  # fmt: skip
            running = [asyncio.create_task(w.run()) for w in workers]  # type: ignore[no-untyped-call]
            await asyncio.sleep(seconds)
            for worker in workers:
                worker.stop()  # type: ignore[no-untyped-call]
            await asyncio.gather(*running)

    asyncio.run(main())


def test_two_replicas_run_each_tick_once_on_the_instances_host_and_downtime_runs_once(host: Host) -> None:
    policies = host.service.policies
    created = datetime.now(UTC) - timedelta(hours=5, minutes=1)
    policies.store.add(new_policy("hourly", "db", every="1h", cron=None, keep={"last": 1}), created)
    policies.store.add(new_policy("also", "db", every="1h", cron=None), created + timedelta(seconds=1))

    run_replicas(host, [host.replica(), host.replica()], seconds=4.5)

    # procrastinate: one tick job per tick time, whichever replica deferred it, and several ticks ran
    ticks = host.sql("SELECT args->>'timestamp', count(*) FROM procrastinate_jobs WHERE task_name = %s GROUP BY 1",
                     TICK_TASK)  # fmt: skip
    assert len(ticks) >= 3 and all(count == 1 for _, count in ticks), ticks
    # five hours of missed ticks: ONE run of the latest tick, and the instance's other policy refused meanwhile
    jobs = [j for j in JobStore(host.service.catalog).unfinished() if j.kind == "policy"]
    assert len(jobs) == 1, jobs
    job = jobs[0]
    states = {s.policy.name: s for s in policies.all()}
    runner = str(job.request["policy"])
    other = "also" if runner == "hourly" else "hourly"
    offset = timedelta(hours=5) if runner == "hourly" else timedelta(hours=5, seconds=1)
    assert states[runner].last_tick == created + offset
    assert job.request["tick"] == states[runner].last_tick.isoformat()  # type: ignore[union-attr]
    assert states[other].last_outcome == SKIPPED and "still running" in (states[other].last_error or "")
    # routed to the instance's host and queued there, locked on the instance
    assert host.registry.job_route(job.id)[0] == "h1"  # type: ignore[index]
    assert host.sql("SELECT queue_name, lock FROM procrastinate_jobs WHERE args->>'job_id' = %s", job.id) == [
        ("host.h1", f"instance:{job.instance_uuid}")
    ]

    # h1's agent body runs it: a set of the instance, recorded on h1, the outcome on the policy
    assert HostWork("h1", host.service, host.registry).run(job.id)
    done = JobStore(host.service.catalog).get(job.id)
    assert done.state == "succeeded", done.error
    made = host.service.catalog.list_sets(metadata={POLICY_KEY: runner})
    assert len(made) == 1 and host.registry.set_host(made[0].id) == "h1"
    assert policies.get(runner).last_outcome == "succeeded" and policies.get(runner).last_job_id == job.id

    # the same replicas again, within the hour: nothing is due, no second run of the tick
    run_replicas(host, [host.replica(), host.replica()], seconds=2.5)
    assert host.sql("SELECT id FROM jobs WHERE kind = 'policy'") == [(job.id,)]


def test_run_now_through_a_multi_host_api_replica_is_queued_on_the_host(host: Host) -> None:
    host.service.groups.create("shop", ["db"])
    settings = Settings.from_env(home=host.service.settings.home.parent / "api")
    state = AppState(settings, workers=1, shutdown_grace_s=5.0, multi_host=True)
    try:
        state.start()
        app = create_app(ApiConfig(settings, multi_host=True))
        app.state.ff = state
        http = TestClient(app, headers={"Authorization": f"Bearer {state.tokens.create('admin', None).secret}"})
        for body in ({"name": "one", "instance": "db"}, {"name": "grp", "group": "shop"}):
            made = http.post("/v1/policies", json={**body, "every": "1h", "keep": {"last": 2}})
            assert made.status_code == 201, made.text
        assert http.post("/v1/policies", json={"name": "x", "every": "1h"}).status_code == 400  # no target
        assert http.post("/v1/policies", json={"name": "x", "group": "nosuch", "every": "1h"}).status_code == 404
        run = http.post("/v1/policies/one/run")
        assert run.status_code == 202, run.text
        job_id = run.json()["id"]
        assert http.post("/v1/policies/one/run").status_code == 409  # its instance's job is still queued
        group_run = http.post("/v1/policies/grp/run")
        assert group_run.status_code == 202, group_run.text
        locks = host.sql("SELECT args->>'job_id', queue_name, lock FROM procrastinate_jobs ORDER BY id")
        uuid_ = host.service.instance("db").uuid
        assert locks == [(job_id, "host.h1", f"instance:{uuid_}"), (group_run.json()["id"], "host.h1", "group:shop")]
        assert HostWork("h1", host.service, host.registry).run(group_run.json()["id"])
        assert http.get(f"/v1/jobs/{group_run.json()['id']}").json()["state"] == "succeeded"
        shown = http.get("/v1/policies/grp").json()
        assert shown["group"] == "shop" and shown["instance"] is None and shown["last_outcome"] == "succeeded"
    finally:
        state.close()
