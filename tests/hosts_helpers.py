"""Shared by the multi-host test modules: the deployment they build, its API server, and waiting on it."""

from __future__ import annotations

import concurrent.futures
import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.testbed import hosts as bed
from freezeframe.testbed.api_server import ServerProcess, issue_token, running_server
from freezeframe.testbed.multi_host import private_server
from freezeframe.testbed.postgres import Server

MiB = 1 << 20


@dataclass(frozen=True)
class OfflineDomain:
    name: str


def define_offline(conn: Any, workdir: Path) -> OfflineDomain:
    """A defined, never started domain with one 16 MiB disk: its snapshots copy the disk offline."""
    name = f"ffhosts-off-{uuid.uuid4().hex[:8]}"
    disk = workdir / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(16 * MiB)], check=True)
    conn.defineXML(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
        "</devices></domain>"
    )
    return OfflineDomain(name)


STALE_S = "4"
"""Hosts are down after 4 s without a heartbeat here (their agents then beat every 1.3 s)."""


@dataclass
class Deployment:
    root: Path
    pg: Server
    url: str
    testbed: bed.HostsTestbed
    guests: dict[str, list[Any]]
    """host name -> its two guests"""
    home: Path

    def catalog(self) -> SqlCatalog:
        return SqlCatalog(self.url)

    def host_of(self, guest: Any) -> str:
        return next(h for h, gs in self.guests.items() if guest in gs)

    def home_of(self, host: str) -> Path:
        return Path(next(h.home for h in self.testbed.hosts if h.name == host))


@contextlib.contextmanager
def libvirt_connection(uri: str) -> Iterator[Any]:
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
def hosts_api(deployment: Deployment) -> Iterator[tuple[ServerProcess, str]]:
    token = issue_token(deployment.home, "admin")
    with running_server(deployment.home, args=("--multi-host",)) as server:
        yield server, token


def wait_reported(d: Deployment, timeout_s: float = 30.0) -> None:
    """Until every host's heartbeat lists its guests (and every host is up)."""
    wait_hosts_report(d.catalog(), {g.name: h for h, gs in d.guests.items() for g in gs}, timeout_s)


def wait_hosts_report(catalog: SqlCatalog, want: dict[str, str], timeout_s: float = 30.0) -> None:
    """Until each instance named in ``want`` is reported by its host there (the host up); closes ``catalog``."""
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


def snapshot_everywhere(d: Deployment, server: ServerProcess, token: str) -> list[tuple[Any, str, dict[str, Any]]]:
    """Every guest of every host snapshotted through the API at once: (guest, job id, finished job) each."""
    wait_reported(d)
    guests = [g for gs in d.guests.values() for g in gs]
    with server.client(token) as client, concurrent.futures.ThreadPoolExecutor(len(guests)) as pool:
        job_ids = list(pool.map(lambda g: snapshot(client, g.name), guests))
        jobs = wait_jobs(server, client, job_ids)
    return [(guest, job_id, jobs[job_id]) for guest, job_id in zip(guests, job_ids, strict=True)]


@contextlib.contextmanager
def hosts_and_database(
    root: Path, patch: pytest.MonkeyPatch, count: int = 3
) -> Iterator[tuple[Server, str, bed.HostsTestbed]]:
    """A private PostgreSQL server and ``count`` test-bed hosts on it; the environment points at them."""
    with contextlib.ExitStack() as stack:
        pg, url = stack.enter_context(private_server())
        patch.setenv("FREEZEFRAME_CATALOG_URL", url)
        patch.setenv("FREEZEFRAME_HOST_STALE_S", STALE_S)
        testbed = bed.up(count, url, root)
        stack.callback(bed.down, root)
        yield pg, url, testbed
