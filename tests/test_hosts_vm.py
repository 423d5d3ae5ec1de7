"""A multi-host deployment for real: 3 namespaced libvirt hosts, an agent each, 2 ledger guests per host, a private
PostgreSQL server (so restarting it disturbs no other test), and ``serve --multi-host`` replicas.

One test bed and the six guests are shared by the module (booting is the expensive part); each test leaves the
agents running and the guests thawed, as it found them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.adapters.service_store import JobStore
from freezeframe.model import SetStatus
from freezeframe.testbed import hosts as bed
from freezeframe.testbed.api_server import ServerProcess, issue_token, running_server
from freezeframe.testbed.guest import GuestImage
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance
from freezeframe.testbed.ledger import check_ledger
from freezeframe.testbed.multi_host import private_server
from freezeframe.testbed.postgres import Server

pytestmark = pytest.mark.vm
MiB = 1 << 20
STALE_S = "4"
"""Hosts are down after 4 s without a heartbeat here (their agents then beat every 1.3 s)."""


@dataclass
class Deployment:
    root: Path
    pg: Server
    url: str
    testbed: bed.HostsTestbed
    guests: dict[str, list[TestInstance]]
    """host name -> its two guests"""
    home: Path

    def catalog(self) -> SqlCatalog:
        return SqlCatalog(self.url)

    def host_of(self, guest: TestInstance) -> str:
        return next(h for h, gs in self.guests.items() if guest in gs)

    def home_of(self, host: str) -> Path:
        return Path(next(h.home for h in self.testbed.hosts if h.name == host))


@pytest.fixture(scope="module")
def deployment(
    guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("hostsbed")
    with contextlib.ExitStack() as stack:
        pg, url = stack.enter_context(private_server())
        monkeypatch_module.setenv("FREEZEFRAME_CATALOG_URL", url)
        monkeypatch_module.setenv("FREEZEFRAME_HOST_STALE_S", STALE_S)
        testbed = bed.up(3, url, root)
        stack.callback(bed.down, root)
        lock = threading.Lock()
        guests: dict[str, list[TestInstance]] = {h.name: [] for h in testbed.hosts}
        conns = {h.name: stack.enter_context(_libvirt(h.uri)) for h in testbed.hosts}

        def boot(host: str, index: int) -> None:
            cm = running_instance(
                conns[host], disks=[DiskRequest(32 * MiB)] * 3, workload="ledger", name_prefix=f"ffhosts-{host}",
                workdir=root / "guests" / f"{host}-{index}", guest=guest_image, boot_timeout_s=180,
            )  # fmt: skip
            inst = cm.__enter__()
            with lock:
                stack.push(cm.__exit__)
                guests[host].append(inst)

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            for future in [pool.submit(boot, h, i) for h in guests for i in range(2)]:
                future.result()
        yield Deployment(root, pg, url, testbed, guests, root / "api")


@contextlib.contextmanager
def _libvirt(uri: str) -> Iterator[Any]:
    import libvirt

    conn = libvirt.open(uri)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def api(deployment: Deployment) -> Iterator[tuple[ServerProcess, str]]:
    token = issue_token(deployment.home, "admin")
    with running_server(deployment.home, args=("--multi-host",)) as server:
        yield server, token


def wait_reported(d: Deployment, timeout_s: float = 30.0) -> None:
    """Until every host's heartbeat lists its guests (and every host is up)."""
    want = {g.name: h for h, gs in d.guests.items() for g in gs}
    catalog = d.catalog()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            hosts = HostRegistry(catalog).hosts()
            seen = {i["name"]: h.name for h in hosts if h.state == "up" for i in h.instances}
            if all(seen.get(n) == h for n, h in want.items()):
                return
            assert time.monotonic() < deadline, f"hosts report {seen}, want {want}"
            time.sleep(0.3)
    finally:
        catalog.close()


def snapshot(client: httpx.Client, name: str) -> str:
    response = client.post(f"/v1/instances/{name}/snapshots", json={})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def wait_jobs(server: ServerProcess, client: httpx.Client, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    return {j: server.wait_job(client, j, timeout_s=180) for j in job_ids}


def test_six_instances_on_three_hosts_snapshotted_concurrently_each_on_its_host(
    deployment: Deployment, api: tuple[ServerProcess, str]
) -> None:
    server, token = api
    wait_reported(deployment)
    guests = [g for gs in deployment.guests.values() for g in gs]
    with server.client(token) as client, concurrent.futures.ThreadPoolExecutor(6) as pool:
        job_ids = list(pool.map(lambda g: snapshot(client, g.name), guests))
        jobs = wait_jobs(server, client, job_ids)
    catalog = deployment.catalog()
    try:
        registry = HostRegistry(catalog)
        for guest, job_id in zip(guests, job_ids, strict=True):
            job, host = jobs[job_id], deployment.host_of(guest)
            assert job["state"] == "succeeded", job
            assert registry.job_host(job_id) == host
            set_id = job["result"]["set_id"]
            assert registry.set_host(set_id) == host
            members = {m.target: Path(m.path) for m in catalog.get_set(set_id).members}
            assert all(p.is_relative_to(deployment.home_of(host)) and p.exists() for p in members.values())
            verdict = check_ledger(members["vdb"], members["vdc"])
            assert verdict.ok, f"{guest.name} on {host}: {verdict.reason}"
    finally:
        catalog.close()


def test_an_agent_killed_in_the_freeze_window_leaves_no_guest_frozen(
    deployment: Deployment, api: tuple[ServerProcess, str]
) -> None:
    server, token = api
    host, guest = "ffhost1", deployment.guests["ffhost1"][0]
    bed.restart_agent(deployment.root, host, extra_env={"FREEZEFRAME_FAULT_HOLD_IN_WINDOW_S": "30"})
    wait_reported(deployment)
    with server.client(token) as client:
        job_id = snapshot(client, guest.name)
        deadline = time.monotonic() + 60
        while guest.agent({"execute": "guest-fsfreeze-status"})["return"] != "frozen":
            assert time.monotonic() < deadline, client.get(f"/v1/jobs/{job_id}").json()
            time.sleep(0.1)
        bed.stop_agent(deployment.root, host, kill=True)
        time.sleep(1.0)
        assert guest.agent({"execute": "guest-fsfreeze-status"})["return"] == "frozen"  # nobody thawed it yet
        bed.restart_agent(deployment.root, host)
        job = server.wait_job(client, job_id, timeout_s=60)
    assert job["state"] == "failed" and job["error"]["type"].endswith("/interrupted"), job
    assert "agent of host ffhost1 stopped" in job["error"]["detail"]
    assert guest.agent({"execute": "guest-fsfreeze-status"})["return"] == "thawed"
    before = guest.wait_for_progress()
    assert guest.wait_for_progress(after=before) > before  # the ledger writes again
    catalog = deployment.catalog()
    try:  # the half-made set is failed by the repair (or was never recorded)
        assert [s.status for s in catalog.load_sets([job["set_id"]])] in ([], [SetStatus.FAILED])
    finally:
        catalog.close()


def test_a_host_that_stops_answering_fails_its_jobs_while_the_others_carry_on(
    deployment: Deployment, api: tuple[ServerProcess, str]
) -> None:
    server, token = api
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
    deployment: Deployment, api: tuple[ServerProcess, str]
) -> None:
    server, token = api
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
        sets = catalog.list_sets()
        assert all(s.status in (SetStatus.AVAILABLE, SetStatus.FAILED) for s in sets)
        for job in jobs.values():
            if job["state"] == "succeeded":
                assert catalog.get_set(job["set_id"]).status is SetStatus.AVAILABLE
        store = JobStore(catalog)
        assert not store.unfinished()
    finally:
        catalog.close()
    import psycopg

    from freezeframe.adapters.job_queue import conninfo

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


def test_a_set_restored_onto_another_host_is_transferred_and_boots(
    deployment: Deployment, api: tuple[ServerProcess, str]
) -> None:
    import libvirt
    import libvirt_qemu

    server, token = api
    wait_reported(deployment)
    guest = deployment.guests["ffhost1"][1]
    name = f"ffhosts-restored-{int(time.time())}"
    with server.client(token) as client:
        made = server.wait_job(client, snapshot(client, guest.name), timeout_s=120)
        assert made["state"] == "succeeded", made
        response = client.post(
            f"/v1/snapshot-sets/{made['set_id']}/restore", json={"name": name, "host": "ffhost2", "start": True}
        )
        assert response.status_code == 202, response.text
        job = server.wait_job(client, response.json()["id"], timeout_s=180)
    assert job["state"] == "succeeded", job
    assert job["result"]["transferred_from"] == "ffhost1" and job["result"]["host"] == "ffhost2"
    ffhost2 = next(h for h in deployment.testbed.hosts if h.name == "ffhost2")
    with _libvirt(ffhost2.uri) as conn:
        domain = conn.lookupByName(name)
        try:
            disks = [
                p for p in (deployment.home_of("ffhost2") / "repository" / "transferred").rglob("*") if p.is_file()
            ]
            assert len(disks) == 3
            deadline = time.monotonic() + 150
            while True:  # booted: its guest agent answers
                try:
                    libvirt_qemu.qemuAgentCommand(domain, '{"execute": "guest-ping"}', 5, 0)
                    break
                except libvirt.libvirtError:
                    assert time.monotonic() < deadline, "the restored guest never answered"
                    time.sleep(1)
        finally:
            domain.destroy()
            domain.undefine()
    with _libvirt(next(h.uri for h in deployment.testbed.hosts if h.name == "ffhost1")) as conn:
        assert name not in [d.name() for d in conn.listAllDomains()]


def test_two_api_replicas_accept_one_job_per_instance_and_both_report_it(
    deployment: Deployment, api: tuple[ServerProcess, str]
) -> None:
    first, token = api
    wait_reported(deployment)
    guest = deployment.guests["ffhost3"][0]
    with running_server(deployment.home / "replica2", args=("--multi-host",)) as second:
        replicas = [first, second]
        barrier = threading.Barrier(10)

        def ask(i: int) -> httpx.Response:
            with replicas[i % 2].client(token) as client:
                barrier.wait()
                return client.post(f"/v1/instances/{guest.name}/snapshots", json={})

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(ask, range(10)))
        assert sorted(a.status_code for a in answers) == [202] + [409] * 9, [a.text for a in answers]
        job_id = next(a.json()["id"] for a in answers if a.status_code == 202)
        with first.client(token) as one, second.client(token) as two:
            job = second.wait_job(two, job_id, timeout_s=120)
            assert job["state"] == "succeeded", job
            assert one.get(f"/v1/jobs/{job_id}").json() == job
