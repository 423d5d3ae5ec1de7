"""Inside one test-bed host's namespaces: private libvirt directories, then its own virtlogd and libvirtd.

Run by ``freezeframe.testbed.hosts`` as ``unshare --mount --net --uts --propagation private python -m
freezeframe.testbed.host_ns DIR NAME``. The bind mounts give the daemons their own /etc/libvirt (domain
definitions), /run/libvirt (virtlogd's socket, QEMU monitors), /var/lib, /var/cache and /var/log of libvirt; the
network namespace has only its own loopback, so the host is reachable through its UNIX socket only
(``unix_sock_dir`` in DIR/libvirtd.conf). The namespaces live as long as the daemons started here.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

PRIVATE_MOUNTS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)


def enter(directory: Path, name: str) -> None:
    """Mount the private directories, bring up loopback, name the host and start its daemons (they fork)."""
    for sub, target in PRIVATE_MOUNTS.items():
        Path(target).mkdir(parents=True, exist_ok=True)
        _run(["mount", "--bind", str(directory / sub), target])
    _run(["ip", "link", "set", "lo", "up"])
    socket.sethostname(name)
    _run(["virtlogd", "-d", "-p", str(directory / "virtlogd.pid")])
    _run(["libvirtd", "-d", "-f", str(directory / "libvirtd.conf"), "-p", str(directory / "libvirtd.pid")])


if __name__ == "__main__":
    enter(Path(sys.argv[1]), sys.argv[2])
