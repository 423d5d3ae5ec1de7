"""The multi-host deployment's failure handling without booting a guest: 3 namespaced libvirt hosts with their
agents, a private PostgreSQL server and ``serve --multi-host`` replicas, over shut-off domains (offline copies, one
small disk each). A host that stops answering, PostgreSQL restarted under load, two API replicas racing, and a
set restored onto another host - the job path proven without the cost of guests (``test_hosts_vm.py`` proves the
rest with real running guests).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.adapters.job_queue import RUN_JOB_TASK, JobQueue, conninfo, queue_of
from freezeframe.adapters.service_store import JobStore
from freezeframe.api.projects import JOB_KEY
from freezeframe.model import SetStatus
from freezeframe.set_query import SetFilter
from freezeframe.testbed import hosts as bed
from freezeframe.testbed.api_server import ServerProcess, running_server
from hosts_helpers import (
    STALE_S,
    Deployment,
    define_offline,
    hosts_and_database,
    libvirt_connection,
    snapshot,
    snapshot_everywhere,
    wait_jobs,
    wait_reported,
)

MiB = 1 << 20


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("hostsbed-offline")
    (root / "disks").mkdir()
    with contextlib.ExitStack() as stack:
        pg, url, testbed = stack.enter_context(hosts_and_database(root, monkeypatch_module))
        guests: dict[str, list[Any]] = {}
        for host in testbed.hosts:
            with libvirt_connection(host.uri) as conn:
                guests[host.name] = [define_offline(conn, root / "disks") for _ in range(2)]
        yield Deployment(root, pg, url, testbed, guests, root / "api")


def test_six_offline_instances_on_three_hosts_each_snapshotted_on_its_host(
    deployment: Deployment, hosts_api: tuple[ServerProcess, str]
) -> None:
    finished = snapshot_everywhere(deployment, *hosts_api)
    catalog = deployment.catalog()
    try:
        registry = HostRegistry(catalog)
        for guest, job_id, job in finished:
            host = deployment.host_of(guest)
            assert job["state"] == "succeeded", job
            assert registry.job_host(job_id) == host and registry.set_host(job["set_id"]) == host
            members = catalog.get_set(job["set_id"]).members
            assert [Path(m.path).is_relative_to(deployment.home_of(host)) for m in members] == [True]
            on_host = catalog.page_sets(SetFilter(host=host), 10).sets
            assert job["set_id"] in {s.id for s in on_host}  # `list --host` finds it
    finally:
        catalog.close()


def test_a_set_restored_onto_another_host_is_transferred_there(
    deployment: Deployment, hosts_api: tuple[ServerProcess, str]
) -> None:
    server, token = hosts_api
    wait_reported(deployment)
    name = f"ffhosts-off-restored-{uuid.uuid4().hex[:6]}"
    with server.client(token) as client:
        made = server.wait_job(client, snapshot(client, deployment.guests["ffhost1"][0].name), timeout_s=120)
        response = client.post(f"/v1/snapshot-sets/{made['set_id']}/restore", json={"name": name, "host": "ffhost3"})
        assert response.status_code == 202, response.text
        job = server.wait_job(client, response.json()["id"], timeout_s=120)
        deadline = time.monotonic() + 10
        while client.get(f"/v1/instances/{name}").status_code != 200:  # the next heartbeat of ffhost3 reports it
            assert time.monotonic() < deadline
            time.sleep(0.2)
        taken = client.post(f"/v1/snapshot-sets/{made['set_id']}/restore", json={"name": name, "host": "ffhost2"})
    assert job["state"] == "succeeded", job
    assert (job["result"]["host"], job["result"]["transferred_from"]) == ("ffhost3", "ffhost1")
    assert taken.status_code == 409  # the name is taken, whichever host has it
    hosts = {h.name: h.uri for h in deployment.testbed.hosts}
    with libvirt_connection(hosts["ffhost3"]) as conn:
        assert name in [d.name() for d in conn.listAllDomains()]
    with libvirt_connection(hosts["ffhost1"]) as conn:
        assert name not in [d.name() for d in conn.listAllDomains()]
    copies = [p for p in (deployment.home_of("ffhost3") / "repository" / "transferred").rglob("*") if p.is_file()]
    assert len(copies) == 1


def test_a_host_that_stops_answering_fails_its_jobs_while_the_others_carry_on(
    deployment: Deployment, hosts_api: tuple[ServerProcess, str]
) -> None:
    server, token = hosts_api
    wait_reported(deployment)
    bed.stop_agent(deployment.root, "ffhost3", kill=True)
    try:
        time.sleep(float(STALE_S) + 1)
        with server.client(token) as client:
            refused = client.post(f"/v1/instances/{deployment.guests['ffhost3'][0].name}/snapshots", json={})
            assert refused.status_code == 503, refused.text
            assert "ffhost3" in refused.json()["detail"]
            assert refused.json()["type"].endswith("/host-unavailable")
            hosts = {h["name"]: h["state"] for h in client.get("/v1/hosts").json()}
            assert hosts == {"ffhost1": "up", "ffhost2": "up", "ffhost3": "down"}
            job = server.wait_job(client, snapshot(client, deployment.guests["ffhost2"][1].name), timeout_s=120)
            assert job["state"] == "succeeded", job
    finally:
        bed.restart_agent(deployment.root, "ffhost3")


def test_postgresql_restarted_under_load_loses_and_repeats_no_job(
    deployment: Deployment, hosts_api: tuple[ServerProcess, str]
) -> None:
    server, token = hosts_api
    wait_reported(deployment)
    guests = [g for gs in deployment.guests.values() for g in gs]
    with server.client(token) as client:
        job_ids = [snapshot(client, g.name) for g in guests]
        deployment.pg.restart()
        for _ in range(3):  # the API reconnects: new requests work again
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/v1/hosts").status_code == 200:
                    break
            time.sleep(1)
        jobs = wait_jobs(server, client, job_ids)
        wait_reported(deployment)
        again = wait_jobs(server, client, [snapshot(client, g.name) for g in guests])
    finished = {j["state"] for j in jobs.values()}
    assert finished <= {"succeeded", "failed"}, jobs
    assert all(j["state"] == "succeeded" for j in again.values()), again
    catalog = deployment.catalog()
    try:
        half_recorded = [
            f"set {s.id} of {s.instance_name} is {s.status} (job {s.metadata.get(JOB_KEY)}, error {s.error!r})"
            for s in catalog.list_sets()
            if s.status not in (SetStatus.AVAILABLE, SetStatus.FAILED)
        ]
        assert half_recorded == [], f"{half_recorded}; jobs: {jobs}"
        for job in jobs.values():
            if job["state"] == "succeeded":
                made = catalog.get_set(job["set_id"])
                assert made.status is SetStatus.AVAILABLE, f"set {made.id} is {made.status} after job {job}"
        store = JobStore(catalog)
        assert not store.unfinished()
    finally:
        catalog.close()

    with psycopg.connect(conninfo(deployment.url)) as connection:
        rows = connection.execute(
            "SELECT args->>'job_id', count(*) FROM procrastinate_jobs WHERE queue_name LIKE 'host.%' "
            "GROUP BY 1 HAVING count(*) > 1"
        ).fetchall()
        stuck = connection.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing') AND queue_name LIKE 'host.%'"
        ).fetchone()
    assert rows == []  # no job queued twice
    assert stuck == (0,)


def test_two_api_replicas_accept_one_job_per_instance_and_both_report_it(
    deployment: Deployment, hosts_api: tuple[ServerProcess, str]
) -> None:
    first, token = hosts_api
    wait_reported(deployment)
    guest = deployment.guests["ffhost3"][0]
    # The host's agent is held (SIGSTOP) while the ten requests arrive: the accepted job stays unfinished for all
    # of them. Else a request the loaded machine delayed could come after a set of a shut-off instance (a second)
    # was already made, and be rightly accepted.
    agent = next(h for h in bed.load_state(deployment.root).hosts if h.name == "ffhost3").agent_pid
    assert agent
    with running_server(deployment.home / "replica2", args=("--multi-host",)) as second:
        replicas = [first, second]
        barrier = threading.Barrier(10)

        def ask(i: int) -> httpx.Response:
            with replicas[i % 2].client(token) as client:
                barrier.wait()
                return client.post(f"/v1/instances/{guest.name}/snapshots", json={})

        os.kill(agent, signal.SIGSTOP)
        try:
            with concurrent.futures.ThreadPoolExecutor(10) as pool:
                answers = list(pool.map(ask, range(10)))
        finally:
            os.kill(agent, signal.SIGCONT)
        assert sorted(a.status_code for a in answers) == [202] + [409] * 9, [a.text for a in answers]
        job_id = next(a.json()["id"] for a in answers if a.status_code == 202)
        with first.client(token) as one, second.client(token) as two:
            job = second.wait_job(two, job_id, timeout_s=120)
            assert job["state"] == "succeeded", job
            assert one.get(f"/v1/jobs/{job_id}").json() == job


def test_verify_revert_and_delete_run_once_on_the_host_that_holds_the_members(
    deployment: Deployment, hosts_api: tuple[ServerProcess, str]
) -> None:
    server, token = hosts_api
    wait_reported(deployment)
    guest = deployment.guests["ffhost2"][0]
    catalog = deployment.catalog()
    registry = HostRegistry(catalog)
    try:
        with server.client(token) as client:
            made = server.wait_job(client, snapshot(client, guest.name), timeout_s=120)
            set_id = made["set_id"]
            done = {}
            for kind, call in (
                ("verify", lambda: client.post(f"/v1/snapshot-sets/{set_id}/verify", json={})),
                ("revert", lambda: client.post(f"/v1/snapshot-sets/{set_id}/revert", json={"safety": True})),
                ("delete", lambda: client.delete(f"/v1/snapshot-sets/{set_id}")),
            ):
                answer = call()
                assert answer.status_code == 202, (kind, answer.text)
                assert answer.json()["kind"] == kind
                done[kind] = server.wait_job(client, answer.json()["id"], timeout_s=120)
                assert done[kind]["state"] == "succeeded", done[kind]
                assert registry.job_host(done[kind]["id"]) == "ffhost2"
            assert done["verify"]["result"]["ok"] is True and done["verify"]["result"]["checks"]
            safety = done["revert"]["result"]["safety_set_id"]
            assert done["revert"]["result"]["reverted"] == ["vda"]
            assert registry.set_host(safety) == "ffhost2"  # the safety set's members are on ffhost2 too
            assert client.get(f"/v1/snapshot-sets/{set_id}").status_code == 404
            assert client.get(f"/v1/snapshot-sets/{safety}").json()["status"] == "available"
            assert registry.set_host(set_id) is None
            assert not (deployment.home_of("ffhost2") / "repository" / set_id).exists()

            # A duplicate delivery of the delete job (the queue handing it out again) runs nothing.
            queue = JobQueue(deployment.url)
            with queue.opened() as app:
                again = app.configure_task(RUN_JOB_TASK, queue=queue_of("ffhost2")).defer(job_id=done["delete"]["id"])
            deadline = time.monotonic() + 30
            while queue_status(deployment.url, again) in ("todo", "doing"):
                assert time.monotonic() < deadline, "the duplicate delivery was never fetched"
                time.sleep(0.3)
            assert client.get(f"/v1/jobs/{done['delete']['id']}").json() == done["delete"]
    finally:
        catalog.close()
    with psycopg.connect(conninfo(deployment.url)) as connection:
        deliveries = connection.execute(
            "SELECT args->>'job_id', count(*) FROM procrastinate_jobs WHERE args->>'job_id' = ANY(%s) GROUP BY 1",
            ([j["id"] for j in done.values()],),
        ).fetchall()
    assert sorted(n for _, n in deliveries) == [1, 1, 2]  # each queued once; the delete delivered twice on purpose


def queue_status(url: str, queue_job_id: int) -> str:
    with psycopg.connect(conninfo(url)) as connection:
        row = connection.execute("SELECT status FROM procrastinate_jobs WHERE id = %s", (queue_job_id,)).fetchone()
    assert row is not None
    return str(row[0])
