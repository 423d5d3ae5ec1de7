"""A multi-host deployment for real: 3 namespaced libvirt hosts, an agent each, 2 ledger guests per host, a private
PostgreSQL server (so restarting it disturbs no other test), and ``serve --multi-host`` replicas.

The test bed is the one the multi-host VM modules share (``hosts_helpers.SharedHosts``: handed over clean, its
agents restarted with this module's settings); the six guests are this module's, shared by its tests (booting is
the expensive part); each test leaves the agents running and the guests thawed, as it found them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.model import SetStatus
from freezeframe.testbed import hosts as bed
from freezeframe.testbed.api_server import ServerProcess
from freezeframe.testbed.guest import GuestImage
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance
from freezeframe.testbed.ledger import check_ledger
from freezeframe.testbed.side_by_side import entered_together
from hosts_helpers import (
    Deployment,
    SharedHosts,
    libvirt_connection,
    snapshot,
    snapshot_everywhere,
    wait_reported,
)

pytestmark = pytest.mark.vm
MiB = 1 << 20


@pytest.fixture(scope="module")
def deployment(
    guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory, shared_hosts: SharedHosts
) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("hostsvm")
    hosts = shared_hosts.for_module()
    with contextlib.ExitStack() as stack:
        conns = {h.name: stack.enter_context(libvirt_connection(h.uri)) for h in hosts.testbed().hosts}
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))
        agents = pool.submit(bed.ensure_agents, hosts.root)  # beside the boot
        on = [host for host in conns for _ in range(2)]
        booted: list[TestInstance] = stack.enter_context(entered_together([
            running_instance(
                conns[host], disks=[DiskRequest(32 * MiB)] * 3, workload="ledger", name_prefix=f"ffhosts-{host}",
                workdir=workdir / f"{host}-{index}", guest=guest_image, boot_timeout_s=180,
            )
            for index, host in enumerate(on)
        ]))  # fmt: skip
        agents.result()
        guests: dict[str, list[TestInstance]] = {host: [] for host in conns}
        for host, inst in zip(on, booted, strict=True):
            guests[host].append(inst)
        yield hosts.deployment(guests)


def test_six_instances_on_three_hosts_snapshotted_concurrently_each_on_its_host(
    deployment: Deployment, hosts_api: tuple[ServerProcess, str]
) -> None:
    finished = snapshot_everywhere(deployment, *hosts_api)
    catalog = deployment.catalog()
    try:
        registry = HostRegistry(catalog)
        for guest, job_id, job in finished:
            host = deployment.host_of(guest)
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
    deployment: Deployment, hosts_api: tuple[ServerProcess, str]
) -> None:
    server, token = hosts_api
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
    # Whoever notices first fails the job clearly: the reaper (the host's heartbeat went stale) or the restarted
    # agent (it was running when its predecessor died); either way never run again.
    assert job["state"] == "failed", job
    assert job["error"]["type"].rsplit("/", 1)[1] in ("interrupted", "host-unavailable"), job
    assert "ffhost1" in job["error"]["detail"]
    deadline = time.monotonic() + 60  # the reaper may fail the job before the restarted agent's repair thaws
    while guest.agent({"execute": "guest-fsfreeze-status"})["return"] != "thawed":
        assert time.monotonic() < deadline, "the restarted agent's repair never thawed the guest"
        time.sleep(0.2)
    before = guest.wait_for_progress()
    assert guest.wait_for_progress(after=before) > before  # the ledger writes again
    catalog = deployment.catalog()
    try:  # the half-made set is failed by the repair (or was never recorded); the repair thaws first, then fails it
        deadline = time.monotonic() + 30
        while (statuses := [s.status for s in catalog.load_sets([job["set_id"]])]) not in ([], [SetStatus.FAILED]):
            assert time.monotonic() < deadline, f"the half-made set is still {statuses} 30 s after the thaw"
            time.sleep(0.2)
    finally:
        catalog.close()


def test_a_set_restored_onto_another_host_is_transferred_and_boots(
    deployment: Deployment, hosts_api: tuple[ServerProcess, str]
) -> None:
    import libvirt
    import libvirt_qemu

    server, token = hosts_api
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
    assert job["state"] == "succeeded", job.get("error")
    assert job["result"]["transferred_from"] == "ffhost1" and job["result"]["host"] == "ffhost2"
    ffhost2 = next(h for h in deployment.testbed.hosts if h.name == "ffhost2")
    with libvirt_connection(ffhost2.uri) as conn:
        domain = conn.lookupByName(name)
        try:
            transferred = deployment.home_of("ffhost2") / "repository" / "transferred"
            disks = [p for p in (transferred / made["set_id"]).rglob("*") if p.is_file()]
            assert len(disks) == 3  # the set's members; an incremental set's parents travel beside it
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
    with libvirt_connection(next(h.uri for h in deployment.testbed.hosts if h.name == "ffhost1")) as conn:
        assert name not in [d.name() for d in conn.listAllDomains()]
