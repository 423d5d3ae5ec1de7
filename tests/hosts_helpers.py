"""Shared by the multi-host test modules: the deployment they build, its API server, and waiting on it; the one
multi-host test bed the VM modules share (``shared_hosts``), and the hooks that run those modules one after the
other and close the bed after the last of them."""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import subprocess
import time
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.adapters.service_store import JobStore
from freezeframe.errors import FreezeframeError
from freezeframe.testbed import hosts as bed
from freezeframe.testbed.api_server import ServerProcess, issue_token, running_server
from freezeframe.testbed.multi_host import private_server
from freezeframe.testbed.postgres import Server
from freezeframe.testbed.side_by_side import entered_in_background

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
    api: tuple[ServerProcess, str] | None = None
    """The shared bed's API server and admin token (else ``hosts_api`` starts one for the module)."""

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
    if deployment.api is not None:
        yield deployment.api
        return
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


SHARED = "shared_hosts"
SETTLE_S = 30.0
"""How long a module waits for the jobs a previous module left unfinished before it rebuilds the bed."""


@dataclass(frozen=True)
class HostsBed:
    """A private PostgreSQL server, three hosts with their agents, and a ``serve --multi-host`` replica."""

    root: Path
    pg: Server
    url: str
    token: str
    starting: concurrent.futures.Future[ServerProcess]
    """The API server, started beside the modules' first guests."""

    @property
    def server(self) -> ServerProcess:
        return self.starting.result()

    def testbed(self) -> bed.HostsTestbed:
        """The hosts as they are now (a restarted agent has a new pid)."""
        state = bed.load_state(self.root)
        assert state is not None, f"no hosts test bed in {self.root}"
        return state

    def deployment(self, guests: dict[str, list[Any]]) -> Deployment:
        return Deployment(self.root, self.pg, self.url, self.testbed(), guests, self.server.home,
                          (self.server, self.token))  # fmt: skip


class SharedHosts:
    """One multi-host test bed for the VM modules that request ``shared_hosts``: building and tearing down the
    database, hosts, agents and API server costs each module ~25 s; each module still boots its own guests.

    ``for_module`` hands a module the bed in a known state - no domain on any host, no job unfinished, daemons
    and API server alive - or, if it cannot, a freshly built one: one module's failure cannot leak into the
    next. The module then runs ``bed.ensure_agents`` (beside its guests' boot), which restarts every agent that is
    not running with the module's ``FREEZEFRAME_*`` settings (e.g. a freeze cap)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._stack: contextlib.ExitStack | None = None
        self._bed: HostsBed | None = None
        self._built = 0

    def for_module(self) -> HostsBed:
        if self._bed is not None:
            problems = self._problems(self._bed)
            if not problems:
                left = bed.clear_domains(self._bed.root)
                if left:
                    print(f"shared hosts bed: removed domains a previous module left: {left}")
                return self._bed
            print(f"shared hosts bed: {'; '.join(problems)}; building a fresh one")
            self.close()
        return self._open()

    def _problems(self, hosts: HostsBed) -> list[str]:
        problems = [f"{name}'s daemons are gone" for name in bed.dead_hosts(hosts.root)]
        try:
            if httpx.get(f"{hosts.server.url}/healthz", timeout=10).status_code != 200:
                problems.append("the API server is not healthy")
            catalog = SqlCatalog(hosts.url)
            try:
                deadline = time.monotonic() + SETTLE_S
                while unfinished := JobStore(catalog).unfinished():
                    if time.monotonic() > deadline:
                        problems.append(f"{len(unfinished)} job(s) still unfinished after {SETTLE_S:.0f} s")
                        break
                    time.sleep(0.5)
            finally:
                catalog.close()
        except (httpx.HTTPError, FreezeframeError, RuntimeError) as exc:
            problems.append(f"unusable: {exc}")
        return problems

    def _open(self) -> HostsBed:
        self._built += 1
        root = self.base / f"bed{self._built}"
        with contextlib.ExitStack() as stack:
            patch = stack.enter_context(pytest.MonkeyPatch.context())
            pg, url, _ = stack.enter_context(hosts_and_database(root, patch))
            home = root / "api"
            token = issue_token(home, "admin")
            starting = stack.enter_context(entered_in_background(running_server(home, args=("--multi-host",))))
            self._bed = HostsBed(root, pg, url, token, starting)
            self._stack = stack.pop_all()
        return self._bed

    def close(self) -> None:
        """Idempotent: API server, hosts (agents, guests, daemons), database, environment."""
        stack, self._stack, self._bed = self._stack, None, None
        if stack is not None:
            stack.close()


_SHARED_KEY = pytest.StashKey[SharedHosts]()


@pytest.fixture(scope="session")
def shared_hosts(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedHosts]:
    shared = SharedHosts(tmp_path_factory.mktemp("multihost"))
    request.session.stash[_SHARED_KEY] = shared
    atexit.register(shared.close)
    try:
        yield shared
    finally:
        shared.close()
        atexit.unregister(shared.close)


def _uses_shared(item: pytest.Item | None) -> bool:
    return item is not None and SHARED in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that share the multi-host bed run one after the other, where the first of them is: the bed is
    held only while they run (and the others do not run beside its agents)."""
    users = [item for item in items if _uses_shared(item)]
    if users:
        first = items.index(users[0])
        items[first:] = users + [item for item in items[first:] if not _uses_shared(item)]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    """After the last test that uses the shared bed (its module's fixtures are gone by then), close the bed."""
    try:
        return (yield)
    finally:
        shared = item.session.stash.get(_SHARED_KEY, None)
        if shared is not None and _uses_shared(item) and not _uses_shared(nextitem):
            shared.close()
