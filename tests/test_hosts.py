"""Multi-host deployment without guests: the host registry, routing jobs through procrastinate's queue, exactly-once
claims, the reaper of down hosts and ``GET /v1/hosts`` - all on the real PostgreSQL test bed (a schema per test).

The same guarantees are proven again with real agents and guests on namespaced libvirt hosts in
``test_hosts_vm.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.catalog_schema import JOBS
from freezeframe.adapters.host_registry import DOWN, UP, HostRegistry
from freezeframe.adapters.job_queue import conninfo, queue_of
from freezeframe.adapters.service_store import FAILED, QUEUED, JobStore, TokenStore
from freezeframe.agent.inventory import instance_from_record, instance_record
from freezeframe.agent.reaper import fail_stranded, stranded_jobs
from freezeframe.agent.work import HostWork
from freezeframe.api.app import ApiConfig, create_app
from freezeframe.api.cluster import ClusterJobs
from freezeframe.api.jobs import JobSpec
from freezeframe.config import Settings
from freezeframe.errors import AgentNotAuthorized, HostUnavailable, InstanceBusy, InstanceNotFound
from freezeframe.model import DiskSpec, Hardware, Instance, InstanceState
from freezeframe.service import Freezeframe
from pg_helpers import pg_server, pg_url  # noqa: F401 - fixtures


def _vm(name: str) -> Instance:
    disks = (
        DiskSpec("vda", "virtio", f"/img/{name}-vda.qcow2", "qcow2", 1 << 20, boot_order=1),
        DiskSpec("vdb", "virtio", f"/img/{name}-vdb.qcow2", "qcow2", 1 << 20),
    )
    hardware = Hardware(vcpus=1, memory_kib=65536, arch="x86_64", machine=None, disks=disks)
    return Instance(name, str(uuid.uuid4()), InstanceState.RUNNING, hardware)


@pytest.fixture
def catalog(pg_url: str) -> Iterator[SqlCatalog]:  # noqa: F811 - the fixture of pg_helpers
    found = SqlCatalog(pg_url)
    try:
        yield found
    finally:
        found.close()


@pytest.fixture
def registry(catalog: SqlCatalog) -> HostRegistry:
    return HostRegistry(catalog)


def beat(registry: HostRegistry, name: str, key: str, *instances: Instance) -> None:
    registry.heartbeat(
        name, key, uri=f"qemu+unix:///system?socket=/run/{name}", repository=f"/srv/{name}", free_bytes=5 << 30,
        instances=[instance_record(i) for i in instances], agent_pid=1,
    )  # fmt: skip


def spec(instance: Instance, kind: str = "snapshot") -> JobSpec:
    return JobSpec(
        kind=kind, lock_key=f"instance:{instance.uuid}", project=None, request={}, instance_uuid=instance.uuid,
        instance_name=instance.name, set_id=str(uuid.uuid4()),
    )  # fmt: skip


def queue_rows(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(conninfo(url), row_factory=psycopg.rows.dict_row) as connection:
        return list(connection.execute("SELECT id, queue_name, status, lock, args FROM procrastinate_jobs"))


# ---- the registry ------------------------------------------------------------------------------------------


def test_an_agent_needs_its_own_hosts_key(registry: HostRegistry) -> None:
    key1, key2 = registry.enroll("h1"), registry.enroll("h2")
    beat(registry, "h1", key1)
    for name, key in (("h1", key2), ("h1", None), ("h1", key1 + "x"), ("nowhere", key1)):
        with pytest.raises(AgentNotAuthorized):
            beat(registry, name, key or "")
    again = registry.enroll("h1")
    with pytest.raises(AgentNotAuthorized):
        beat(registry, "h1", key1)
    beat(registry, "h1", again)
    assert [h.state for h in registry.hosts()] == [UP, "enrolled"]


def test_hosts_report_instances_and_go_down_when_their_heartbeat_is_stale(catalog: SqlCatalog) -> None:
    registry = HostRegistry(catalog, stale_after_s=0.2)
    vm1, vm2 = _vm("vm1"), _vm("vm2")
    beat(registry, "h1", registry.enroll("h1"), vm1, vm2)
    h1 = registry.host("h1")
    assert (h1.state, h1.instance_count, h1.free_bytes) == (UP, 2, 5 << 30)
    assert instance_from_record(registry.locate("vm2")[1]) == vm2
    assert registry.locate(vm1.uuid)[0].name == "h1"
    with pytest.raises(InstanceNotFound):
        registry.locate("vm3")
    threading.Event().wait(0.3)
    assert registry.host("h1").state == DOWN


def test_a_moved_instance_is_found_on_the_host_that_runs_it_now(catalog: SqlCatalog) -> None:
    registry = HostRegistry(catalog, stale_after_s=0.3)
    vm = _vm("wanderer")
    k1, k2 = registry.enroll("h1"), registry.enroll("h2")
    beat(registry, "h1", k1, vm)
    threading.Event().wait(0.4)  # h1 goes quiet (down) while still listing the instance
    beat(registry, "h2", k2, vm)
    assert registry.locate("wanderer")[0].name == "h2"


# ---- routing through the queue ------------------------------------------------------------------------------


def test_a_job_is_recorded_routed_and_queued_on_its_hosts_queue_at_once(catalog: SqlCatalog, pg_url: str) -> None:  # noqa: F811
    registry = HostRegistry(catalog)
    vm = _vm("vm1")
    beat(registry, "h2", registry.enroll("h2"), vm)
    jobs = ClusterJobs(catalog, pg_url, registry)
    job = jobs.submit(spec(vm), registry.host("h2"))
    assert JobStore(catalog).get(job.id).state == QUEUED
    assert registry.job_route(job.id) is not None
    rows = queue_rows(pg_url)
    assert [(r["queue_name"], r["status"], r["lock"], r["args"]) for r in rows] == [
        (queue_of("h2"), "todo", f"instance:{vm.uuid}", {"job_id": job.id})
    ]
    with pytest.raises(InstanceBusy):
        jobs.submit(spec(vm), registry.host("h2"))
    assert len(queue_rows(pg_url)) == 1
    assert len(JobStore(catalog).query()) == 1


def test_two_api_replicas_accept_one_job_per_instance(pg_url: str) -> None:  # noqa: F811
    """Each replica its own engine (as two processes): racing submissions for one instance, exactly one wins."""
    catalogs = [SqlCatalog(pg_url) for _ in range(2)]
    try:
        registry = HostRegistry(catalogs[0])
        vm = _vm("raced")
        beat(registry, "h1", registry.enroll("h1"), vm)
        replicas = [ClusterJobs(c, pg_url, HostRegistry(c)) for c in catalogs]
        outcomes: list[str] = []
        start = threading.Barrier(8)

        def submit(replica: ClusterJobs) -> None:
            start.wait()
            try:
                replica.submit(spec(vm), replica.registry.host("h1"))
                outcomes.append("accepted")
            except InstanceBusy:
                outcomes.append("busy")

        threads = [threading.Thread(target=submit, args=(replicas[i % 2],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["accepted"] + ["busy"] * 7
        assert len(queue_rows(pg_url)) == 1
        assert len(JobStore(catalogs[0]).query()) == 1
    finally:
        for c in catalogs:
            c.close()


def test_a_host_that_is_down_refuses_new_jobs_at_once(catalog: SqlCatalog, pg_url: str) -> None:  # noqa: F811
    registry = HostRegistry(catalog, stale_after_s=0.1)
    vm = _vm("vm1")
    beat(registry, "h1", registry.enroll("h1"), vm)
    threading.Event().wait(0.2)
    with pytest.raises(HostUnavailable, match="h1"):
        ClusterJobs(catalog, pg_url, registry).submit(spec(vm), registry.host("h1"))
    assert JobStore(catalog).query() == []


def test_queued_jobs_of_a_host_that_went_down_fail_clearly_and_leave_the_queue(
    catalog: SqlCatalog,
    pg_url: str,  # noqa: F811
) -> None:
    registry = HostRegistry(catalog, stale_after_s=1.0)
    jobs = ClusterJobs(catalog, pg_url, registry)
    vm1, vm2 = _vm("on-h1"), _vm("on-h2")
    k2 = registry.enroll("h2")
    beat(registry, "h1", registry.enroll("h1"), vm1)
    beat(registry, "h2", k2, vm2)
    lost, fine = jobs.submit(spec(vm1), registry.host("h1")), jobs.submit(spec(vm2), registry.host("h2"))
    threading.Event().wait(1.1)
    beat(registry, "h2", k2, vm2)  # h2 keeps beating, h1 does not
    stranded = stranded_jobs(catalog, registry)
    assert [s.job_id for s in stranded] == [lost.id]
    for s in stranded:
        fail_stranded(catalog, s, registry.stale_after_s)
    failed = JobStore(catalog).get(lost.id)
    assert (failed.state, failed.error_type) == (FAILED, HostUnavailable.slug)
    assert "h1 stopped answering" in (failed.error or "")
    assert JobStore(catalog).get(fine.id).state == QUEUED


# ---- the agent's side: exactly once, own host only ---------------------------------------------------------------


@pytest.fixture
def agent_service(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Freezeframe]:  # noqa: F811
    monkeypatch.setenv("FREEZEFRAME_CATALOG_URL", pg_url)
    with Freezeframe.open(Settings.from_env(home=tmp_path / "agent")) as service:
        yield service


def test_a_second_delivery_of_a_job_runs_nothing(agent_service: Freezeframe, pg_url: str) -> None:  # noqa: F811
    registry = HostRegistry(agent_service.catalog)
    vm = _vm("vm1")
    beat(registry, "h1", registry.enroll("h1"), vm)
    job = ClusterJobs(agent_service.catalog, pg_url, registry).submit(spec(vm, kind="other"), registry.host("h1"))
    work = HostWork("h1", agent_service, registry)
    assert work.run(job.id) is True
    first = JobStore(agent_service.catalog).get(job.id)
    assert first.state == FAILED and "do not run on agents" in (first.error or "")
    assert work.run(job.id) is False  # duplicate delivery
    assert JobStore(agent_service.catalog).get(job.id) == first


def test_an_agent_refuses_a_job_routed_to_another_host(agent_service: Freezeframe, pg_url: str) -> None:  # noqa: F811
    registry = HostRegistry(agent_service.catalog)
    vm = _vm("vm1")
    beat(registry, "h1", registry.enroll("h1"), vm)
    beat(registry, "h2", registry.enroll("h2"))
    job = ClusterJobs(agent_service.catalog, pg_url, registry).submit(spec(vm), registry.host("h1"))
    assert HostWork("h2", agent_service, registry).run(job.id) is True
    refused = JobStore(agent_service.catalog).get(job.id)
    assert (refused.state, refused.error_type) == (FAILED, "wrong-host")
    assert "routed to host 'h1'" in (refused.error or "")


# ---- the API and the CLI ---------------------------------------------------------------------------------------


def test_the_api_lists_hosts_for_admins_and_routes_snapshots(
    pg_url: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FREEZEFRAME_CATALOG_URL", pg_url)
    settings = Settings.from_env(home=tmp_path / "api")
    app = create_app(ApiConfig(settings, multi_host=True))
    with TestClient(app) as client:
        state = app.state.ff
        tokens = TokenStore(state.service.catalog)
        admin = {"Authorization": f"Bearer {tokens.create('admin', None).secret}"}
        member = {"Authorization": f"Bearer {tokens.create('member', 'p1').secret}"}
        registry = HostRegistry(state.service.catalog)
        vm = _vm("vm-on-h3")
        beat(registry, "h3", registry.enroll("h3"), vm)
        hosts = client.get("/v1/hosts", headers=admin)
        assert hosts.status_code == 200
        assert [(h["name"], h["state"], h["instance_count"]) for h in hosts.json()] == [("h3", UP, 1)]
        assert client.get("/v1/hosts", headers=member).status_code == 403
        assert [i["name"] for i in client.get("/v1/instances", headers=admin).json()] == ["vm-on-h3"]
        accepted = client.post("/v1/instances/vm-on-h3/snapshots", json={}, headers=admin)
        assert accepted.status_code == 202, accepted.text
        assert registry.job_host(accepted.json()["id"]) == "h3"
        busy = client.post(f"/v1/instances/{vm.uuid}/snapshots", json={}, headers=admin)
        assert busy.status_code == 409
        assert client.post("/v1/instances/nope/snapshots", json={}, headers=admin).status_code == 404


def test_verify_revert_and_delete_are_queued_on_the_host_holding_the_members(
    pg_url: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from freezeframe.model import SetStatus

    monkeypatch.setenv("FREEZEFRAME_CATALOG_URL", pg_url)
    app = create_app(ApiConfig(Settings.from_env(home=tmp_path / "api"), multi_host=True))
    with TestClient(app) as client:
        catalog = app.state.ff.service.catalog
        admin = {"Authorization": f"Bearer {TokenStore(catalog).create('admin', None).secret}"}
        registry = HostRegistry(catalog)
        vm1, vm2 = _vm("vm1"), _vm("vm2")
        beat(registry, "h1", registry.enroll("h1"), vm1)
        beat(registry, "h2", registry.enroll("h2"), vm2)

        def a_set(vm: Instance, host: str | None, status: SetStatus = SetStatus.AVAILABLE) -> str:
            made = replace(_set_with_members(tmp_path, {}), instance_uuid=vm.uuid, instance_name=vm.name, status=status)
            catalog.add_set(made)
            if host is not None:
                registry.record_set(made.id, host)
            return made.id

        on_h1 = a_set(vm1, "h1")
        verify = client.post(f"/v1/snapshot-sets/{on_h1}/verify", json={}, headers=admin)
        assert verify.status_code == 202, verify.text
        assert (verify.json()["kind"], registry.job_host(verify.json()["id"])) == ("verify", "h1")
        assert JobStore(catalog).get(verify.json()["id"]).lock_key == f"set:{on_h1}"
        busy = client.delete(f"/v1/snapshot-sets/{on_h1}", headers=admin)  # the set's verify is still queued
        assert busy.status_code == 409 and verify.json()["id"] in busy.text
        revert = client.post(f"/v1/snapshot-sets/{on_h1}/revert", json={}, headers=admin)
        assert revert.status_code == 202, revert.text
        assert JobStore(catalog).get(revert.json()["id"]).lock_key == f"instance:{vm1.uuid}"
        assert registry.job_host(revert.json()["id"]) == "h1"

        deleted = client.delete(f"/v1/snapshot-sets/{a_set(vm2, 'h2')}?force=true", headers=admin)
        assert deleted.status_code == 202 and deleted.headers["Location"] == f"/v1/jobs/{deleted.json()['id']}"
        assert (registry.job_host(deleted.json()["id"]), deleted.json()["request"]) == ("h2", {"force": True})

        moved = client.post(f"/v1/snapshot-sets/{a_set(vm2, 'h1')}/revert", json={}, headers=admin)
        assert moved.status_code == 409 and "runs on host h2" in moved.text
        unplaced = client.post(f"/v1/snapshot-sets/{a_set(vm1, None)}/verify", json={}, headers=admin)
        assert unplaced.status_code == 400 and "not captured by an agent" in unplaced.text
        creating = client.delete(f"/v1/snapshot-sets/{a_set(vm2, 'h2', SetStatus.CREATING)}", headers=admin)
        assert creating.status_code == 409
    rows = queue_rows(pg_url)
    assert sorted(r["queue_name"] for r in rows) == ["host.h1", "host.h1", "host.h2"]  # one row per accepted job


def test_hosts_list_and_jobs_list_on_the_cli(catalog: SqlCatalog, pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    registry = HostRegistry(catalog)
    vm = _vm("vm1")
    beat(registry, "h1", registry.enroll("h1"), vm)
    job = ClusterJobs(catalog, pg_url, registry).submit(spec(vm), registry.host("h1"))
    env = {**os.environ, "FREEZEFRAME_CATALOG_URL": pg_url, "FREEZEFRAME_HOME": str(tmp_path / "cli")}

    def cli(*args: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "freezeframe.cli", *args], env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    hosts = cli("hosts", "list", "--json")
    assert [(h["name"], h["state"], h["instance_count"], h["free_repository_bytes"]) for h in hosts] == [
        ("h1", UP, 1, 5 << 30)
    ]
    assert hosts[0]["uri"].startswith("qemu+unix://") and hosts[0]["last_heartbeat"]
    listed = cli("jobs", "list", "--json")
    assert [(j["id"], j["state"], j["host"]) for j in listed] == [(job.id, QUEUED, "h1")]
    assert cli("jobs", "show", job.id, "--json")["instance"]["name"] == "vm1"


def test_job_rows_and_routes_match_one_to_one(catalog: SqlCatalog, pg_url: str) -> None:  # noqa: F811
    """Many instances on two hosts: every job has exactly one queue row on its instance's host's queue."""
    registry = HostRegistry(catalog)
    vms = {name: [_vm(f"{name}-{i}") for i in range(5)] for name in ("h1", "h2")}
    for name, hosted in vms.items():
        beat(registry, name, registry.enroll(name), *hosted)
    jobs = ClusterJobs(catalog, pg_url, registry)
    made = {jobs.submit(spec(vm), registry.locate(vm.name)[0]).id: host for host, hs in vms.items() for vm in hs}
    rows = queue_rows(pg_url)
    assert sorted(r["args"]["job_id"] for r in rows) == sorted(made)
    assert all(r["queue_name"] == queue_of(made[r["args"]["job_id"]]) for r in rows)
    with catalog.connect("reading", write=False) as connection:
        assert connection.scalar(select(JOBS.c.id).where(JOBS.c.state != QUEUED)) is None
    assert replace(registry.host("h1"), instances=[]).instance_count == 5


# ---- restore on another host: the verified transfer ------------------------------------------------------------


def _set_with_members(tmp_path: Path, payloads: dict[str, bytes], sha: dict[str, str] | None = None) -> Any:
    import hashlib
    from datetime import UTC, datetime

    from freezeframe.model import Consistency, Member, SetStatus, SnapshotSet

    vm = _vm("src")
    set_id = str(uuid.uuid4())
    members = []
    for target, data in payloads.items():
        path = tmp_path / "source-repo" / set_id / f"{target}.qcow2"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        digest = (sha or {}).get(target) or hashlib.sha256(data).hexdigest()
        members.append(Member(set_id, target, "virtio", None, len(data), "qcow2", str(path), sha256=digest))
    return SnapshotSet(
        set_id, "s", vm.name, vm.uuid, Consistency.CRASH, SetStatus.AVAILABLE, datetime.now(UTC), vm.hardware,
        members=members,
    )  # fmt: skip


def test_members_are_transferred_verified_and_restore_reads_the_copies(tmp_path: Path) -> None:
    from freezeframe.agent.transfer import RelocatedCatalog, relocated, transfer_members

    source = _set_with_members(tmp_path, {"vda": b"root" * 5000, "vdb": b"data" * 3000})
    seen: list[tuple[int, int]] = []
    copies = transfer_members(source, tmp_path / "here", lambda done, total: seen.append((done, total)))
    assert {t: p.read_bytes() for t, p in copies.items()} == {"vda": b"root" * 5000, "vdb": b"data" * 3000}
    assert all(p.is_relative_to(tmp_path / "here") for p in copies.values())
    assert seen[-1] == (32000, 32000)

    class Backing:
        def get_set(self, ref: str) -> Any:
            raise AssertionError("the relocated set is answered without the catalog")

        def load_sets(self, ids: list[str]) -> list[Any]:
            return [source]

    view = RelocatedCatalog(Backing(), relocated(source, copies))
    assert [m.path for m in view.get_set(source.id).members] == [str(copies["vda"]), str(copies["vdb"])]
    assert [m.path for m in view.load_sets([source.id])[0].members] == [str(copies["vda"]), str(copies["vdb"])]


def test_a_member_that_arrives_damaged_fails_the_transfer_and_leaves_nothing(tmp_path: Path) -> None:
    from freezeframe.agent.transfer import transfer_members
    from freezeframe.errors import VerifyFailed

    source = _set_with_members(tmp_path, {"vda": b"fine", "vdb": b"rotten"}, sha={"vdb": "0" * 64})
    with pytest.raises(VerifyFailed, match="nothing was restored"):
        transfer_members(source, tmp_path / "here", lambda done, total: None)
    assert not (tmp_path / "here" / source.id).exists()


def test_an_agent_restart_requeues_what_its_predecessor_fetched_but_never_claimed(
    agent_service: Freezeframe,
    pg_url: str,  # noqa: F811
) -> None:
    """A worker killed between fetching a queue row and claiming its job: at the next start the job goes back to
    the queue (it runs once, then); a job it had claimed is failed as interrupted and its queue row closed."""
    import asyncio

    from freezeframe.agent.process import Agent, AgentConfig

    registry = HostRegistry(agent_service.catalog)
    unclaimed_vm, claimed_vm = _vm("fetched"), _vm("claimed")
    key = registry.enroll("h1")
    beat(registry, "h1", key, unclaimed_vm, claimed_vm)
    jobs = ClusterJobs(agent_service.catalog, pg_url, registry)
    unclaimed, claimed = (
        jobs.submit(spec(unclaimed_vm), registry.host("h1")),
        jobs.submit(spec(claimed_vm), registry.host("h1")),
    )
    JobStore(agent_service.catalog).claim(claimed.id, 1)
    with psycopg.connect(conninfo(pg_url)) as connection:  # both fetched by a worker that then died
        connection.execute("UPDATE procrastinate_jobs SET status = 'doing'")
    agent = Agent(AgentConfig("h1", agent_service.settings, key))
    try:
        agent._fail_interrupted_jobs()

        async def restart() -> None:
            app = agent.queue_app()
            async with app.open_async():
                await agent._finish_orphaned_queue_jobs(app)

        asyncio.run(restart())
    finally:
        agent.service.close()
    statuses = {r["args"]["job_id"]: r["status"] for r in queue_rows(pg_url)}
    assert statuses == {unclaimed.id: "todo", claimed.id: "failed"}
    store = JobStore(agent_service.catalog)
    assert store.get(unclaimed.id).state == QUEUED
    interrupted = store.get(claimed.id)
    assert (interrupted.state, interrupted.error_type) == (FAILED, "interrupted")


def test_the_reaper_ticks_every_five_seconds_all_hour() -> None:
    """procrastinate reads a sixth cron field as seconds: the reaper's cron must tick every 5 s in every minute
    (``*/5 * * * * *`` ticked every second, in one minute of five)."""
    from datetime import UTC, datetime
    from itertools import pairwise

    import croniter

    from freezeframe.agent.process import REAP_CRON

    ticks = croniter.croniter(REAP_CRON, datetime(2026, 1, 1, 0, 1, 2, tzinfo=UTC))
    times = [ticks.get_next(datetime) for _ in range(30)]
    gaps = {(later - earlier).total_seconds() for earlier, later in pairwise(times)}
    assert gaps == {5.0}, gaps
