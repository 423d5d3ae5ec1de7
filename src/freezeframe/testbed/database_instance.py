"""Boot the database test guest on fresh overlays of its cached disks and follow its pgbench load.

pgbench prints one progress line per second, with a Unix timestamp, on the serial console; the host reads it
to know the load runs and to measure the throughput the guest sees while a snapshot is taken.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt

from freezeframe.testbed.database_check import SqlRunner
from freezeframe.testbed.database_guest import DATA_SIZE, ROOT_SIZE, WAL_SIZE, DatabaseGuestImage
from freezeframe.testbed.instance import DiskRequest, TestbedError, TestInstance, running_instance

KERNEL_CMDLINE = ("root=/dev/vda", "rw", "fastboot")
GUEST_PSQL = ("/usr/bin/setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--reset-env",
              "/usr/lib/postgresql/15/bin/psql", "-X", "-q")  # fmt: skip
"""psql itself as postgres: Debian's /usr/bin/psql is a Perl wrapper and su opens a PAM session, seconds of CPU
each under TCG, which starved the guest (pgbench's TPS) and the fsfreeze hook."""
_PROGRESS = re.compile(rb"progress: (\d+\.\d+) s, (\d+\.\d+) tps")


@contextlib.contextmanager
def running_database(
    conn: Any,
    image: DatabaseGuestImage,
    *,
    workdir: Path,
    name_prefix: str = "ffdb",
    clients: int = 4,
    memory_mib: int = 512,
    boot_timeout_s: float = 600.0,
    checkpoint_every_s: float | None = 2.0,
) -> Iterator[TestInstance]:
    """Boot a database guest on fresh overlays of the cached disks and wait until pgbench reports progress."""
    disks = [
        DiskRequest(ROOT_SIZE, backing=image.root),
        DiskRequest(DATA_SIZE, backing=image.data),
        DiskRequest(WAL_SIZE, backing=image.wal),
    ]
    cmdline = (*KERNEL_CMDLINE, f"ff.pgbench.clients={clients}")
    with running_instance(
        conn, disks=disks, workload="idle", name_prefix=name_prefix, workdir=workdir, guest=image.boot,
        memory_mib=memory_mib, boot_timeout_s=boot_timeout_s, extra_cmdline=cmdline,
    ) as inst:  # fmt: skip
        inst.agent_timeout_s = 60  # the application-level hook runs a CHECKPOINT under TCG
        wait_for_pgbench(inst, timeout_s=boot_timeout_s)
        if checkpoint_every_s:
            harshen_load(inst, checkpoint_every_s)
        yield inst


def pgbench_progress(inst: TestInstance) -> list[tuple[float, float]]:
    """(guest Unix time, transactions per second) of every per-second progress line pgbench printed."""
    return [(float(t), float(tps)) for t, tps in _PROGRESS.findall(inst.console_bytes())]


def wait_for_pgbench(inst: TestInstance, timeout_s: float = 120.0, after: float = 0.0) -> float:
    """Block until pgbench reports a second with committed transactions later than ``after``; its time."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = [t for t, tps in pgbench_progress(inst) if t > after and tps > 0]
        if busy:
            return busy[-1]
        if not inst.is_running() or time.monotonic() > deadline:
            raise TestbedError(f"{inst.name}: pgbench made no progress; console:\n{inst.console_tail(40)}")
        time.sleep(0.5)


def harshen_load(inst: TestInstance, checkpoint_every_s: float = 2.0) -> None:
    """Make the load harsher, through the guest agent: a CHECKPOINT every few seconds (as a write-heavy server
    that reaches max_wal_size often has) and prompt page-cache writeback, so the data volume changes all the
    time instead of every 30 s. pgbench alone under TCG (a few TPS) hardly ever broke a naive capture."""
    loop = f"cd /; while :; do sleep {checkpoint_every_s:g}; {' '.join(GUEST_PSQL)} -c CHECKPOINT; done"
    script = (
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin; "
        "sysctl -q -w vm.dirty_background_bytes=1048576 vm.dirty_expire_centisecs=100; "
        f"({loop}) >/dev/null 2>&1 </dev/null &"
    )
    code, _, err = inst.guest_exec(["/bin/sh", "-c", script], timeout_s=60)
    if code != 0:
        raise TestbedError(f"{inst.name}: could not start the checkpoint loop: {err.strip()}")


def guest_sql(inst: TestInstance, timeout_s: float = 300.0) -> SqlRunner:
    """Run SQL in the guest's own PostgreSQL through the guest agent (for a set restored as a new instance)."""

    def run(sql: str) -> tuple[bool, str]:
        argv = [*GUEST_PSQL, "-tA", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", sql]
        code, out, err = inst.guest_exec(argv, timeout_s=timeout_s)
        return (True, out.strip()) if code == 0 else (False, (err.strip() or f"psql exited {code}")[-600:])

    return run


def wait_for_database(inst: TestInstance, timeout_s: float = 600.0) -> float:
    """Seconds until the guest's PostgreSQL accepts connections and has left recovery (its crash recovery done)."""
    started = time.monotonic()
    run, last = guest_sql(inst, timeout_s=60), "no answer yet"
    while time.monotonic() - started < timeout_s:
        try:
            ok, last = run("SELECT pg_is_in_recovery()")
            if ok and last == "f":
                return time.monotonic() - started
        except (OSError, TimeoutError, libvirt.libvirtError, KeyError) as exc:  # the agent is not up yet
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1.0)
    raise TestbedError(f"{inst.name}: PostgreSQL did not come up in {timeout_s:.0f} s: {last}")
