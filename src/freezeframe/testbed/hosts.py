"""N libvirt "hypervisor hosts" on this machine, each with its own daemons, state and agent (issue 13).

Every host ``ffhostK`` gets a directory (default /var/tmp/freezeframe-hosts/ffhostK) holding its libvirt
config, state, logs and run directory, and lives in its own mount, network and UTS namespaces
(``testbed.host_ns``): its own virtlogd and libvirtd, reachable only through its UNIX socket
``qemu+unix:///system?socket=DIR/sock/libvirt-sock`` (its network namespace has nothing but loopback, so it has
no address anyone else could reach). A ``freezeframe agent`` runs inside the same namespaces, with its own home
(repository, journal, locks) under DIR/home, and reaches the catalog and job queue (PostgreSQL) through the
database's UNIX socket. Guests' disks live in paths the namespaces share (e.g. /var/tmp).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freezeframe.testbed.host_ns import PRIVATE_MOUNTS
from freezeframe.testbed.instance import TestbedError

DEFAULT_DIR = Path("/var/tmp/freezeframe-hosts")
DIR_ENV = "FREEZEFRAME_HOSTS_TESTBED_DIR"
MAX_HOSTS = 16
LIBVIRT_CONFIG_FILES = ("qemu.conf", "libvirt.conf")


@dataclass(frozen=True)
class TestbedHost:
    __test__ = False

    name: str
    uri: str
    dir: str
    home: str
    libvirtd_pid: int
    virtlogd_pid: int
    agent_pid: int | None


@dataclass(frozen=True)
class HostsTestbed:
    __test__ = False

    hosts: list[TestbedHost]
    catalog_url: str
    env: dict[str, str] = field(default_factory=dict)
    """What ``freezeframe`` commands on this machine need to use this deployment (catalog, job queue)."""


def testbed_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR)


def host_name(index: int) -> str:
    return f"ffhost{index}"


def socket_uri(directory: Path) -> str:
    return f"qemu+unix:///system?socket={directory / 'sock' / 'libvirt-sock'}"


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _prepare(directory: Path) -> None:
    """Private copies of libvirt's config (not its domain definitions) and empty state directories."""
    for sub in PRIVATE_MOUNTS:
        (directory / sub).mkdir(parents=True, exist_ok=True)
    (directory / "etc" / "qemu").mkdir(exist_ok=True)
    for name in LIBVIRT_CONFIG_FILES:
        source = Path("/etc/libvirt") / name
        if source.exists():
            shutil.copy2(source, directory / "etc" / name)
    (directory / "sock").mkdir(exist_ok=True)
    (directory / "home").mkdir(exist_ok=True, mode=0o700)
    conf = directory / "libvirtd.conf"
    if not conf.exists():
        conf.write_text(
            f'unix_sock_dir = "{directory / "sock"}"\n'
            'unix_sock_rw_perms = "0700"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            f'host_uuid = "{uuid.uuid4()}"\n'
            'log_outputs = "3:stderr"\n'
        )


def _wait_for(path: Path, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TestbedError(f"{what} did not appear at {path} within {timeout_s:.0f} s")
        time.sleep(0.05)


def start_daemons(name: str, directory: Path) -> tuple[int, int]:
    """libvirtd + virtlogd in new namespaces; (libvirtd pid, virtlogd pid)."""
    _prepare(directory)
    for pidfile in ("libvirtd.pid", "virtlogd.pid"):
        (directory / pidfile).unlink(missing_ok=True)
    (directory / "sock" / "libvirt-sock").unlink(missing_ok=True)
    argv = ["unshare", "--mount", "--net", "--uts", "--propagation", "private", "--",
            sys.executable, "-m", "freezeframe.testbed.host_ns", str(directory), name]  # fmt: skip
    with (directory / "namespace.log").open("ab") as log:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=False, env=_child_env())
    if done.returncode != 0:
        raise TestbedError(f"{name}: could not start its daemons; see {directory / 'namespace.log'}")
    _wait_for(directory / "sock" / "libvirt-sock", f"{name}'s libvirt socket")
    libvirtd, virtlogd = _read_pid(directory / "libvirtd.pid"), _read_pid(directory / "virtlogd.pid")
    if libvirtd is None or virtlogd is None:
        raise TestbedError(f"{name}: its daemons wrote no pid files in {directory}")
    return libvirtd, virtlogd


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def agent_env(host: TestbedHost, catalog_url: str, key: str) -> dict[str, str]:
    return {
        "FREEZEFRAME_HOME": host.home,
        "FREEZEFRAME_LIBVIRT_URI": host.uri,
        "FREEZEFRAME_CATALOG_URL": catalog_url,
        "FREEZEFRAME_AGENT_KEY": key,
    }


def start_agent(host: TestbedHost, catalog_url: str, key: str, extra_env: dict[str, str] | None = None) -> int:
    """``freezeframe agent`` inside the host's namespaces (nsenter into its libvirtd's); returns its pid."""
    argv = ["nsenter", "-t", str(host.libvirtd_pid), "--mount", "--net", "--uts", "--",
            sys.executable, "-m", "freezeframe.cli", "agent", "--name", host.name]  # fmt: skip
    env = _child_env({**agent_env(host, catalog_url, key), **(extra_env or {})})
    log = (Path(host.dir) / "agent.log").open("ab")
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
        )
    finally:
        log.close()
    (Path(host.dir) / "agent.pid").write_text(str(process.pid))
    return process.pid


def stop_pid(pid: int | None, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
    if not _alive(pid):
        return
    assert pid is not None
    os.kill(pid, sig)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _destroy_domains(uri: str) -> None:
    """Every domain of a test-bed host is a test guest: stop and forget them before the daemon goes."""
    import libvirt

    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return
    try:
        for domain in conn.listAllDomains():
            try:
                if domain.isActive():
                    domain.destroy()
                domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError:
                continue
    finally:
        conn.close()


def state_file(root: Path) -> Path:
    return root / "state.json"


def load_state(root: Path) -> HostsTestbed | None:
    try:
        raw: dict[str, Any] = json.loads(state_file(root).read_text())
    except (OSError, ValueError):
        return None
    return HostsTestbed([TestbedHost(**h) for h in raw["hosts"]], raw["catalog_url"], raw["env"])


def save_state(root: Path, testbed: HostsTestbed) -> None:
    path = state_file(root)
    path.write_text(json.dumps(asdict(testbed), indent=2))
    path.chmod(0o600)


def _wait_up(catalog_url: str, names: list[str], timeout_s: float = 60.0) -> None:
    """Until every agent has authenticated, repaired and sent its first heartbeat."""
    from freezeframe.adapters.catalog import SqlCatalog
    from freezeframe.adapters.host_registry import UP, HostRegistry

    catalog = SqlCatalog(catalog_url)
    try:
        registry = HostRegistry(catalog)
        deadline = time.monotonic() + timeout_s
        while True:
            up = {h.name for h in registry.hosts() if h.state == UP}
            if up >= set(names):
                return
            if time.monotonic() > deadline:
                raise TestbedError(f"agents not up after {timeout_s:.0f} s: {sorted(set(names) - up)}")
            time.sleep(0.2)
    finally:
        catalog.close()


def enroll(catalog_url: str, name: str) -> str:
    from freezeframe.adapters.catalog import SqlCatalog
    from freezeframe.adapters.host_registry import HostRegistry

    catalog = SqlCatalog(catalog_url)
    try:
        return HostRegistry(catalog).enroll(name)
    finally:
        catalog.close()


def stop_agent(root: Path, name: str, *, kill: bool = False) -> TestbedHost:
    """Stop a host's agent: SIGTERM (it finishes its jobs and signs off) or, with ``kill``, SIGKILL (nothing)."""
    state = load_state(root)
    if state is None:
        raise TestbedError(f"no hosts test bed in {root}")
    host = next(h for h in state.hosts if h.name == name)
    stop_pid(host.agent_pid, sig=signal.SIGKILL if kill else signal.SIGTERM)
    return host


def restart_agent(root: Path, name: str, *, kill: bool = False, extra_env: dict[str, str] | None = None) -> TestbedHost:
    """Stop a host's agent (see ``stop_agent``) and start it again with the same key (and ``extra_env``)."""
    host = stop_agent(root, name, kill=kill)
    state = load_state(root)
    assert state is not None
    key = (Path(host.dir) / "agent.key").read_text().strip()
    fresh = TestbedHost(**{**asdict(host), "agent_pid": start_agent(host, state.catalog_url, key, extra_env)})
    save_state(root, HostsTestbed([fresh if h.name == name else h for h in state.hosts], state.catalog_url, state.env))
    return fresh


def up(count: int, catalog_url: str, root: Path | None = None) -> HostsTestbed:
    """Hosts ffhost1..N, each with its daemons and an enrolled agent; a host already up is kept (its agent is
    restarted), extra hosts of an earlier, larger test bed are stopped."""
    if not 1 <= count <= MAX_HOSTS:
        raise TestbedError(f"between 1 and {MAX_HOSTS} hosts, not {count}")
    root = root or testbed_dir()
    root.mkdir(parents=True, exist_ok=True)
    previous = load_state(root)
    old = {h.name: h for h in previous.hosts} if previous else {}
    hosts = []
    for index in range(1, count + 1):
        name = host_name(index)
        directory = root / name
        known = old.pop(name, None)
        if known is not None and _alive(known.libvirtd_pid) and _alive(known.virtlogd_pid):
            libvirtd, virtlogd = known.libvirtd_pid, known.virtlogd_pid
            stop_pid(known.agent_pid)
        else:
            if known is not None:
                _stop_host(known)
            libvirtd, virtlogd = start_daemons(name, directory)
        host = TestbedHost(
            name, socket_uri(directory), str(directory), str(directory / "home"), libvirtd, virtlogd, None
        )
        key = enroll(catalog_url, name)
        key_file = directory / "agent.key"
        key_file.write_text(key)
        key_file.chmod(0o600)
        hosts.append(TestbedHost(**{**asdict(host), "agent_pid": start_agent(host, catalog_url, key)}))
    for extra in old.values():
        _stop_host(extra)
    testbed = HostsTestbed(hosts, catalog_url, {"FREEZEFRAME_CATALOG_URL": catalog_url})
    save_state(root, testbed)
    _wait_up(catalog_url, [h.name for h in hosts])
    return testbed


def _stop_host(host: TestbedHost) -> None:
    stop_pid(host.agent_pid)
    _destroy_domains(host.uri)
    stop_pid(host.libvirtd_pid)
    stop_pid(host.virtlogd_pid)


def down(root: Path | None = None) -> list[str]:
    """Stop every host (agent, guests, daemons) and remove its directory; the names of the hosts stopped."""
    root = root or testbed_dir()
    state = load_state(root)
    if state is None:
        return []
    for host in state.hosts:
        _stop_host(host)
        shutil.rmtree(host.dir, ignore_errors=True)
    state_file(root).unlink(missing_ok=True)
    return [h.name for h in state.hosts]
