"""Boot a throw-away test guest and always tear it down: domain, disks, console log, libvirt's log.

Tests and benchmarks need real VMs with a live guest agent; leaking one (or its disks) poisons later runs, so
cleanup happens in ``finally`` with Ctrl-C deferred until it is done.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import libvirt
import libvirt_qemu

from freezeframe.testbed.domain import DISK_FORMATS, GuestLink, RbdDisk, TestDisk, disk_target, domain_xml
from freezeframe.testbed.guest import GuestImage, build_guest

if TYPE_CHECKING:
    from freezeframe.testbed.ceph import CephTestbed

MIB = 1024 * 1024
LIBVIRT_DOMAIN_LOG_DIR = Path("/var/log/libvirt/qemu")
_LEDGER_RE = re.compile(rb"ff-ledger (?:paused |resumed )?i=(\d+)")
_HEARTBEAT_RE = re.compile(rb"ff-heartbeat seq=(\d+)")
_LINK_RE = re.compile(rb"ff-link(?:-recv)? (?:start )?(?:i|last)=(\d+)")
_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)

_registry_lock = threading.Lock()
_live: set[str] = set()
_created: set[str] = set()


class TestbedError(RuntimeError):
    """The test guest did not come up or misbehaved; the message carries the console tail."""

    __test__ = False


@dataclass(frozen=True)
class DiskRequest:
    """A disk to create for a test instance (attached in order as vda, vdb, ...)."""

    size_bytes: int = 64 * MIB
    format: str = "qcow2"
    ceph: CephTestbed | None = None
    """Make the disk an RBD image in this Ceph test bed (raw) instead of a file."""
    fill_bytes: int = 0
    """Bytes of data (a non-zero pattern) written from the host at the start of the disk before the guest boots:
    fast, where a TCG guest would take minutes (benchmarks)."""
    backing: Path | None = None
    """Create the disk as a qcow2 overlay of this cached qcow2 image (the database guest's prebuilt disks)."""


def live_instance_names() -> frozenset[str]:
    """Domains this process has defined and not yet cleaned up."""
    with _registry_lock:
        return frozenset(_live)


def created_instance_names() -> frozenset[str]:
    """Every domain name this process has created (for leak checks at the end of a session)."""
    with _registry_lock:
        return frozenset(_created)


_quieted = False


def quiet_libvirt_errors() -> None:
    """Stop libvirt's C library printing every (expected) error, e.g. agent pings during boot, to stderr."""
    global _quieted
    if not _quieted:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _quieted = True


@dataclass
class TestInstance:
    """A running test guest. Disks are ``disks[i].path``; vdb/vdc hold the ledger's journal/state."""

    __test__ = False

    name: str
    uuid: str
    dom: Any
    disks: list[TestDisk]
    console_log: Path
    workload: str
    boot_seconds: float = 0.0
    agent_timeout_s: int = 10

    @property
    def disk_paths(self) -> dict[str, Path]:
        return {d.target: d.path for d in self.disks}

    def disk_path(self, target: str) -> Path:
        return self.disk_paths[target]

    def agent(self, cmd: dict[str, Any], timeout_s: int | None = None) -> dict[str, Any]:
        """One raw guest-agent command; returns the whole response (``{"return": ...}``)."""
        timeout = self.agent_timeout_s if timeout_s is None else timeout_s
        raw = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(cmd), timeout, 0)
        response: dict[str, Any] = json.loads(raw)
        return response

    def guest_exec(self, argv: Sequence[str], timeout_s: float = 30.0) -> tuple[int, str, str]:
        """Run a program in the guest via guest-exec; returns (exit code, stdout, stderr)."""
        started = self.agent(
            {"execute": "guest-exec", "arguments": {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}}
        )
        pid = started["return"]["pid"]
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.agent({"execute": "guest-exec-status", "arguments": {"pid": pid}})["return"]
            if status.get("exited"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {argv!r} still running after {timeout_s}s")
            time.sleep(0.05)
        code = int(status.get("exitcode", -int(status.get("signal", 1))))
        out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
        err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
        return code, out, err

    def console_bytes(self) -> bytes:
        try:
            return self.console_log.read_bytes()
        except FileNotFoundError:
            return b""

    def console_tail(self, lines: int = 25) -> str:
        return "\n".join(self.console_bytes().decode(errors="replace").splitlines()[-lines:])

    def ledger_progress(self) -> int | None:
        """The last ledger record the guest reported on its console (about once a second)."""
        found = _LEDGER_RE.findall(self.console_bytes())
        return int(found[-1]) if found else None

    def heartbeat_progress(self) -> int | None:
        found = _HEARTBEAT_RE.findall(self.console_bytes())
        return int(found[-1]) if found else None

    def progress(self) -> int | None:
        """The workload's last reported counter (ledger record or heartbeat sequence)."""
        if self.workload == "ledger":
            return self.ledger_progress()
        if self.workload == "heartbeat":
            return self.heartbeat_progress()
        if self.workload in ("link-send", "link-recv"):
            found = _LINK_RE.findall(self.console_bytes())
            return int(found[-1]) if found else None
        return None

    def wait_for_progress(self, after: int | None = None, timeout_s: float = 30.0) -> int:
        """Block until the workload reports a counter beyond ``after`` (any counter if None)."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = self.progress()
            if now is not None and (after is None or now > after):
                return now
            if time.monotonic() > deadline:
                raise TestbedError(
                    f"{self.name}: {self.workload} made no progress past {after} in {timeout_s}s; "
                    f"console:\n{self.console_tail()}"
                )
            time.sleep(0.2)

    def guest_clock_offset_ns(self) -> int:
        """Guest realtime minus host realtime (heartbeat timestamps are guest time)."""
        before = time.time_ns()
        guest = int(self.agent({"execute": "guest-get-time"})["return"])
        after = time.time_ns()
        return guest - (before + after) // 2

    def is_running(self) -> bool:
        return bool(self.dom.isActive())

    def shutdown(self, timeout_s: float = 30.0) -> bool:
        """Agent shutdown (guest stops the workload, unmounts, powers off); destroy if it does not stop.

        Returns True for a clean shutdown, False if the domain had to be destroyed.
        """
        if not self.dom.isActive():
            return True
        with contextlib.suppress(libvirt.libvirtError):  # the agent may be gone; we destroy below
            self.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.dom.isActive():
                return True
            time.sleep(0.1)
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.destroy()
        return False


def _supports_o_direct(directory: Path) -> bool:
    """cache='none' needs O_DIRECT; tmpfs (older kernels) lacks it, then the disks use writeback."""
    probe = directory / f".odirect-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    except OSError:
        return False
    else:
        os.close(fd)
        return True
    finally:
        probe.unlink(missing_ok=True)


def _create_disk(path: Path, req: DiskRequest) -> None:
    if req.format not in DISK_FORMATS:
        raise ValueError(f"disk format must be one of {DISK_FORMATS}, not {req.format!r}")
    backing = ["-b", str(req.backing), "-F", "qcow2"] if req.backing is not None else []
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", req.format, *backing, str(path), str(req.size_bytes)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise TestbedError(f"qemu-img create {path} failed: {proc.stderr.strip()}")
    chunk = 256 << 20
    writes = [f"write -q -P 0x5a {o} {min(chunk, req.fill_bytes - o)}" for o in range(0, req.fill_bytes, chunk)]
    if writes:
        argv = ["qemu-io", "-f", req.format, "-t", "none", *(a for w in writes for a in ("-c", w)), str(path)]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise TestbedError(f"filling {path} failed: {proc.stderr.strip() or proc.stdout.strip()}")


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Let cleanup finish before a Ctrl-C takes effect (only the main thread can install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits: list[int] = []

    def remember(signum: int, _frame: FrameType | None) -> None:
        hits.append(signum)

    previous = signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if hits:
            raise KeyboardInterrupt


def destroy_and_undefine(conn: Any, name: str) -> bool:
    """Remove the named domain if it exists; True if there was one."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    with contextlib.suppress(libvirt.libvirtError):  # already stopped
        if dom.isActive():
            dom.destroy()
    try:
        dom.undefineFlags(_UNDEFINE_FLAGS)
    except libvirt.libvirtError:
        dom.undefine()
    return True


def _cleanup(conn: Any, name: str, files: list[Path]) -> None:
    try:
        destroy_and_undefine(conn, name)
    finally:
        for path in [*files, LIBVIRT_DOMAIN_LOG_DIR / f"{name}.log"]:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        with _registry_lock:
            _live.discard(name)


def _wait_ready(inst: TestInstance, started: float, deadline: float) -> None:
    """Agent answers guest-ping, init printed FF-READY, and the workload (if any) reported progress."""
    while True:
        if not inst.dom.isActive():
            raise TestbedError(f"{inst.name} stopped while booting; console:\n{inst.console_tail()}")
        try:
            inst.agent({"execute": "guest-ping"}, timeout_s=2)
            break
        except libvirt.libvirtError as exc:
            if time.monotonic() > deadline:
                raise TestbedError(
                    f"{inst.name}: guest agent not answering after {time.monotonic() - started:.0f}s ({exc}); "
                    f"console:\n{inst.console_tail()}"
                ) from exc
            time.sleep(0.2)
    inst.boot_seconds = time.monotonic() - started
    while b"FF-READY" not in inst.console_bytes():
        if time.monotonic() > deadline:
            raise TestbedError(f"{inst.name}: init never printed FF-READY; console:\n{inst.console_tail()}")
        time.sleep(0.1)
    if inst.workload in ("ledger", "heartbeat"):  # a link workload needs its partner: its caller waits
        inst.wait_for_progress(timeout_s=max(1.0, deadline - time.monotonic()))


@contextlib.contextmanager
def running_instance(
    conn: Any,
    *,
    disks: Sequence[DiskRequest],
    workload: str = "idle",
    name_prefix: str = "fftest",
    workdir: Path,
    guest: GuestImage | None = None,
    memory_mib: int = 256,
    vcpus: int = 1,
    nics: int = 1,
    boot_timeout_s: float = 60.0,
    extra_cmdline: Sequence[str] = (),
    link: GuestLink | None = None,
) -> Iterator[TestInstance]:
    """Define and start a fresh guest, wait until it is usable, and always remove it and its files."""
    quiet_libvirt_errors()
    image = guest or build_guest()
    name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    images: list[tuple[CephTestbed, str]] = []
    with _registry_lock:
        _live.add(name)
        _created.add(name)
    try:
        test_disks: list[TestDisk] = []
        for i, req in enumerate(disks):
            target = disk_target(i)
            if req.ceph is not None:
                from freezeframe.testbed.ceph import create_image

                image_name = f"{name}-{target}"
                images.append((req.ceph, image_name))
                create_image(req.ceph, image_name, req.size_bytes)
                rbd = RbdDisk(f"{req.ceph.pool}/{image_name}", req.ceph.mon_host, req.ceph.user, req.ceph.secret_uuid)
                test_disks.append(TestDisk(target=target, path=Path(f"rbd:{rbd.volume}"), format="raw", rbd=rbd))
                continue
            path = workdir / f"{name}-{target}.{req.format}"
            files.append(path)
            _create_disk(path, req)
            test_disks.append(TestDisk(target=target, path=path, format=req.format))
        console = workdir / f"{name}-console.log"
        files.append(console)
        xml = domain_xml(
            name,
            image,
            test_disks,
            workload,
            memory_mib,
            vcpus,
            console_log=console,
            nics=nics,
            disk_cache="none" if _supports_o_direct(workdir) else "writeback",
            extra_cmdline=extra_cmdline,
            link=link,
        )
        started = time.monotonic()
        dom = conn.defineXML(xml)
        dom.create()
        inst = TestInstance(
            name=name,
            uuid=dom.UUIDString(),
            dom=dom,
            disks=test_disks,
            console_log=console,
            workload=workload,
        )
        _wait_ready(inst, started, started + boot_timeout_s)
        print(f"testbed: {name} ({workload}, {len(disks)} disks) agent ready {inst.boot_seconds:.1f}s after define")
        yield inst
    finally:
        with _sigint_deferred():
            _cleanup(conn, name, files)
            if images:
                from freezeframe.testbed.ceph import remove_image

                for info, image_name in images:
                    remove_image(info, image_name)
