"""Restarting the host's libvirtd under running guests, as an upgrade or a crash of the daemon does.

The daemon is the one scripts/setup-host.sh starts (``libvirtd -d``, pid in /run/libvirtd.pid); it is stopped by
that pid only (other daemons on the machine, e.g. a test bed's private ones, are left alone) and always started
again, whatever failed. Guests keep running: QEMU does not depend on the daemon, which reconnects to their
monitors when it comes back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import libvirt

PID_FILE = Path("/run/libvirtd.pid")


class DaemonError(RuntimeError):
    """libvirtd could not be stopped or did not come back."""


def _daemon_pid() -> int:
    try:
        pid = int(PID_FILE.read_text().strip())
        command = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError) as exc:
        raise DaemonError(f"no running libvirtd found through {PID_FILE} ({exc})") from exc
    if command != "libvirtd":
        raise DaemonError(f"{PID_FILE} names pid {pid}, which is {command!r}, not libvirtd")
    return pid


def _answers(uri: str) -> bool:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    conn.close()
    return True


def ensure_libvirtd(uri: str, timeout_s: float = 60.0) -> None:
    """Start libvirtd the way the host set-up does if ``uri`` does not answer, and wait until it does."""
    if _answers(uri):
        return
    subprocess.run(["libvirtd", "-d"], check=False, capture_output=True, timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while not _answers(uri):
        if time.monotonic() > deadline:
            raise DaemonError(f"libvirtd does not answer at {uri} {timeout_s:.0f} s after `libvirtd -d`")
        time.sleep(0.2)


def reopen_in_place(conn: Any, uri: str) -> None:
    """Give a connection object the daemon dropped a fresh connection, so whoever holds it (a session fixture,
    a test instance's teardown) keeps working. Domain objects made from the old one must be looked up again."""
    fresh = libvirt.open(uri)
    conn._o, fresh._o = fresh._o, conn._o
    with contextlib.suppress(libvirt.libvirtError):
        fresh.close()  # the dead connection


def restart_libvirtd(uri: str, conns: Sequence[Any] = (), timeout_s: float = 60.0) -> float:
    """Stop libvirtd (SIGTERM, its pid only), start it again, reopen ``conns``; seconds it was away."""
    pid = _daemon_pid()
    started = time.monotonic()
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = started + timeout_s
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                raise DaemonError(f"libvirtd (pid {pid}) did not stop within {timeout_s:.0f} s of SIGTERM")
            time.sleep(0.1)
    finally:
        ensure_libvirtd(uri, timeout_s)
    for conn in conns:
        reopen_in_place(conn, uri)
    return time.monotonic() - started
