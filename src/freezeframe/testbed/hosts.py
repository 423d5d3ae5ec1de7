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

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from freezeframe.testbed.host_ns import PRIVATE_MOUNTS
from freezeframe.testbed.instance import TestbedError

DEFAULT_DIR = Path("/var/tmp/freezeframe-hosts")
DIR_ENV = "FREEZEFRAME_HOSTS_TESTBED_DIR"
MAX_HOSTS = 16
LIBVIRT_CONFIG_FILES = ("qemu.conf", "libvirt.conf")
QEMU_CAPABILITIES = Path("/var/cache/libvirt/qemu/capabilities")
"""The machine's libvirtd's cache of what its QEMU binaries can do."""


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
    _seed_capabilities(directory / "cache" / "qemu" / "capabilities")
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


def _seed_capabilities(target: Path) -> None:
    """Start a host's libvirtd from the machine's QEMU capabilities cache: probing QEMU takes ~4 s under TCG at
    each host's first domain. The same binaries on the same machine: libvirtd checks the cache itself (QEMU's
    and its own binary, their versions) and probes again if it is stale; with no cache yet, it simply probes."""
    if not QEMU_CAPABILITIES.is_dir():
        return
    target.mkdir(parents=True, exist_ok=True)
    for cached in QEMU_CAPABILITIES.glob("*.xml"):
        if not (target / cached.name).exists():
            shutil.copy2(cached, target / cached.name)


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


def _stopped(pid: int) -> bool:
    """Stopped by SIGSTOP (or traced): it reacts to nothing but SIGKILL and SIGCONT."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] in ("T", "t")
    except OSError:
        return False


def stop_pids(pids: list[int | None], grace_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Signal every live process at once, then wait for all of them (SIGKILL whoever outlives ``grace_s``)."""
    live = [pid for pid in pids if pid is not None and _alive(pid)]
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + grace_s
    while any(_alive(pid) for pid in live) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in live:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def stop_pid(pid: int | None, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
    stop_pids([pid], grace_s, sig)


def _destroy_domains(uri: str) -> list[str]:
    """Every domain of a test-bed host is a test guest: stop and forget them (before the daemon goes); their names."""
    import libvirt

    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return []
    removed = []
    try:
        for domain in conn.listAllDomains():
            try:
                name = domain.name()
                if domain.isActive():
                    domain.destroy()
                domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError:
                continue
            removed.append(name)
    finally:
        conn.close()
    return removed


def state_file(root: Path) -> Path:
    return root / "state.json"


def load_state(root: Path) -> HostsTestbed | None:
    try:
        raw: dict[str, Any] = json.loads(state_file(root).read_text())
    except (OSError, ValueError):
        return None
    return HostsTestbed([TestbedHost(**h) for h in raw["hosts"]], raw["catalog_url"], raw["env"])


def save_state(root: Path, testbed: HostsTestbed) -> None:
    """Written aside, then renamed: a reader never sees half a file."""
    path = state_file(root)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(asdict(testbed), indent=2))
    partial.chmod(0o600)
    partial.replace(path)


def _wait_up(catalog_url: str, names: list[str], since: datetime | None = None, timeout_s: float = 60.0) -> None:
    """Until every agent has authenticated, repaired and sent its first heartbeat (after ``since``, if given: a
    restarted agent's predecessor may still look up)."""
    from freezeframe.adapters.catalog import SqlCatalog
    from freezeframe.adapters.host_registry import UP, HostRegistry

    catalog = SqlCatalog(catalog_url)
    try:
        registry = HostRegistry(catalog)
        deadline = time.monotonic() + timeout_s
        while True:
            up = {
                h.name for h in registry.hosts()
                if h.state == UP and (since is None or (h.last_heartbeat is not None and h.last_heartbeat >= since))
            }  # fmt: skip
            if up >= set(names):
                return
            if time.monotonic() > deadline:
                raise TestbedError(f"agents not up after {timeout_s:.0f} s: {sorted(set(names) - up)}")
            time.sleep(0.1)
    finally:
        catalog.close()


def enroll(catalog_url: str, *names: str) -> list[str]:
    """A fresh key for each host named (one catalog connection for all)."""
    from freezeframe.adapters.catalog import SqlCatalog
    from freezeframe.adapters.host_registry import HostRegistry

    catalog = SqlCatalog(catalog_url)
    try:
        registry = HostRegistry(catalog)
        return [registry.enroll(name) for name in names]
    finally:
        catalog.close()


def _host(state: HostsTestbed, name: str) -> TestbedHost:
    return next(h for h in state.hosts if h.name == name)


def stop_agent(root: Path, name: str, *, kill: bool = False) -> TestbedHost:
    """Stop a host's agent: SIGTERM (it finishes its jobs and signs off) or, with ``kill``, SIGKILL (nothing)."""
    state = load_state(root)
    if state is None:
        raise TestbedError(f"no hosts test bed in {root}")
    host = _host(state, name)
    stop_pid(host.agent_pid, sig=signal.SIGKILL if kill else signal.SIGTERM)
    return host


def restart_agent(root: Path, name: str, *, kill: bool = False, extra_env: dict[str, str] | None = None) -> TestbedHost:
    """Stop a host's agent (see ``stop_agent``) and start it again with the same key (and ``extra_env``)."""
    host = stop_agent(root, name, kill=kill)
    state = load_state(root)
    assert state is not None
    fresh = replace(host, agent_pid=start_agent(host, state.catalog_url, _key(host), extra_env))
    save_state(root, HostsTestbed([fresh if h.name == name else h for h in state.hosts], state.catalog_url, state.env))
    return fresh


def _key(host: TestbedHost) -> str:
    return (Path(host.dir) / "agent.key").read_text().strip()


def _settings_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("FREEZEFRAME_")}


def _runs_as_started_now(host: TestbedHost, catalog_url: str) -> bool:
    """The agent is alive, not stopped, and has the settings (``FREEZEFRAME_*``) a start now would give it."""
    pid = host.agent_pid
    if pid is None or not _alive(pid) or _stopped(pid):
        return False
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    running = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
    return _settings_env(running) == _settings_env(_child_env(agent_env(host, catalog_url, _key(host))))


def ensure_agents(root: Path, timeout_s: float = 60.0) -> list[str]:
    """Every host's agent running with the settings of this process's environment now (a test module's): an agent
    that is dead, stopped (SIGSTOP) or started with other ``FREEZEFRAME_*`` settings is restarted (SIGKILL if
    stopped, else SIGTERM). Returns the hosts restarted, once every agent has reported since."""
    state = load_state(root)
    if state is None:
        raise TestbedError(f"no hosts test bed in {root}")
    since = datetime.now(UTC)
    stale = [h for h in state.hosts if not _runs_as_started_now(h, state.catalog_url)]
    stop_pids([h.agent_pid for h in stale if h.agent_pid and _stopped(h.agent_pid)], sig=signal.SIGKILL)
    stop_pids([h.agent_pid for h in stale])
    fresh = {h.name: replace(h, agent_pid=start_agent(h, state.catalog_url, _key(h))) for h in stale}
    save_state(root, replace(state, hosts=[fresh.get(h.name, h) for h in state.hosts]))
    _wait_up(state.catalog_url, [h.name for h in state.hosts], timeout_s=timeout_s)
    if fresh:
        _wait_up(state.catalog_url, list(fresh), since, timeout_s)
    return sorted(fresh)


def up(count: int, catalog_url: str, root: Path | None = None) -> HostsTestbed:
    """Hosts ffhost1..N, each with its daemons and an enrolled agent; a host already up is kept (its agent is
    restarted), extra hosts of an earlier, larger test bed are stopped. The hosts start side by side."""
    if not 1 <= count <= MAX_HOSTS:
        raise TestbedError(f"between 1 and {MAX_HOSTS} hosts, not {count}")
    root = root or testbed_dir()
    root.mkdir(parents=True, exist_ok=True)
    previous = load_state(root)
    old = {h.name: h for h in previous.hosts} if previous else {}
    names = [host_name(index) for index in range(1, count + 1)]
    since = datetime.now(UTC)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        daemons = [pool.submit(_daemons_of, name, root / name, old.pop(name, None)) for name in names]
        keys = enroll(catalog_url, *names)  # meanwhile
        hosts = []
        for name, started, key in zip(names, daemons, keys, strict=True):
            libvirtd, virtlogd = started.result()
            directory = root / name
            key_file = directory / "agent.key"
            key_file.write_text(key)
            key_file.chmod(0o600)
            host = TestbedHost(name, socket_uri(directory), str(directory), str(directory / "home"), libvirtd,
                               virtlogd, None)  # fmt: skip
            hosts.append(replace(host, agent_pid=start_agent(host, catalog_url, key)))
    _stop_hosts(list(old.values()))
    testbed = HostsTestbed(hosts, catalog_url, {"FREEZEFRAME_CATALOG_URL": catalog_url})
    save_state(root, testbed)
    _wait_up(catalog_url, names, since)
    return testbed


def _daemons_of(name: str, directory: Path, known: TestbedHost | None) -> tuple[int, int]:
    """The daemons of a host already up (its agent stopped: it is started again with a new key), else new ones."""
    if known is not None and _alive(known.libvirtd_pid) and _alive(known.virtlogd_pid):
        stop_pid(known.agent_pid)
        return known.libvirtd_pid, known.virtlogd_pid
    if known is not None:
        _stop_hosts([known])
    return start_daemons(name, directory)


def clear_domains(root: Path) -> list[str]:
    """Remove every domain of every host (each one is a test guest); the names removed. Hosts and agents stay."""
    state = load_state(root)
    return [name for host in (state.hosts if state else []) for name in _destroy_domains(host.uri)]


def dead_hosts(root: Path) -> list[str]:
    """The hosts whose libvirtd or virtlogd is gone."""
    state = load_state(root)
    return [h.name for h in (state.hosts if state else []) if not (_alive(h.libvirtd_pid) and _alive(h.virtlogd_pid))]


def _stop_hosts(hosts: list[TestbedHost]) -> None:
    """Agents first (they finish their jobs and sign off), then the hosts' guests, then their daemons."""
    stop_pids([h.agent_pid for h in hosts])
    with concurrent.futures.ThreadPoolExecutor(max(1, len(hosts))) as pool:
        list(pool.map(lambda h: _destroy_domains(h.uri), hosts))
    stop_pids([pid for h in hosts for pid in (h.libvirtd_pid, h.virtlogd_pid)])


def down(root: Path | None = None) -> list[str]:
    """Stop every host (agent, guests, daemons) and remove its directory; the names of the hosts stopped."""
    root = root or testbed_dir()
    state = load_state(root)
    if state is None:
        return []
    _stop_hosts(state.hosts)
    for host in state.hosts:
        shutil.rmtree(host.dir, ignore_errors=True)
    state_file(root).unlink(missing_ok=True)
    return [h.name for h in state.hosts]
