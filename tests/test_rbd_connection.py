"""The RBD adapters share one cluster connection per service, without a cluster: fake ``rados``/``rbd`` modules.

Opening a librados connection per operation cost ~0.4 s per set. These prove, in milliseconds, that every
operation reuses one connection, that a connection an operation found broken (timed out, shut down) or in doubt (a
Ceph error may have left it holding a lock) is replaced on the next call, that the connect keeps its client
timeouts, and that closing the service shuts it down.
"""

from __future__ import annotations

import errno
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from freezeframe import wiring
from freezeframe.adapters.rbd_members import RbdMembers
from freezeframe.adapters.rbd_volumes import CephSettings, RbdVolumes, snapshot_name
from freezeframe.config import Settings
from freezeframe.errors import CaptureFailed, PreflightFailed
from freezeframe.model import RBD_STORE, STORE_KEY, DiskSpec, Member

SET_ID = "0badc0de-0000-4000-8000-00000000c0de"


class RadosError(Exception):
    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class RadosStateError(RadosError):
    pass


class TimedOut(RadosError):
    pass


class RbdError(Exception):
    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class ImageNotFound(RbdError):
    pass


class DiskQuotaExceeded(RbdError):
    pass


@dataclass
class Cluster:
    """What the fake bindings talk to: images and their snapshots, every handle made, faults to inject."""

    images: dict[str, list[str]] = field(default_factory=dict)
    handles: list[FakeRados] = field(default_factory=list)
    time_out_next: int = 0
    """The next N ``open_ioctx`` calls time out (what a handle cut off from the cluster reports)."""
    connect_delay_s: float = 0.0
    unreachable: bool = False
    connect_gate: threading.Event | None = None
    """Set: a connect waits for it (a cluster slow to answer); ``connecting`` is set once one is waiting."""
    connecting: threading.Event = field(default_factory=threading.Event)
    pool_full: bool = False
    """Snapshots fail like a pool at its quota (the client may be left holding the image's lock)."""


class FakeRados:
    cluster: Cluster

    def __init__(self, conffile: str, rados_id: str, conf: dict[str, str] | None = None) -> None:
        self.conf = conf or {}
        self.state = "configuring"
        self.shutdowns = 0
        self.cluster.handles.append(self)

    def connect(self, timeout: int = 0) -> None:
        time.sleep(self.cluster.connect_delay_s)
        if self.cluster.unreachable:
            raise TimedOut("[errno 110] RADOS timed out (error connecting to the cluster)", errno=errno.ETIMEDOUT)
        if self.cluster.connect_gate is not None:
            self.cluster.connecting.set()
            assert self.cluster.connect_gate.wait(timeout=10)
        self.state = "connected"

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.state = "shutdown"

    def conf_get(self, key: str) -> str:
        return "127.0.0.1:6789"

    def open_ioctx(self, pool: str) -> FakeIoctx:
        if self.state != "connected":
            raise RadosStateError(f"RADOS rados state (You cannot perform that operation in state {self.state})")
        if self.cluster.time_out_next:
            self.cluster.time_out_next -= 1
            raise TimedOut("[errno 110] RADOS timed out (error opening pool)", errno=errno.ETIMEDOUT)
        return FakeIoctx(self.cluster)


@dataclass
class FakeIoctx:
    cluster: Cluster

    def close(self) -> None:
        pass


class FakeImage:
    def __init__(self, ioctx: FakeIoctx, name: str, snapshot: str | None = None, read_only: bool = False) -> None:
        if name not in ioctx.cluster.images:
            raise ImageNotFound(f"[errno 2] RBD image not found (error opening image {name})", errno=errno.ENOENT)
        self.cluster = ioctx.cluster
        self.snaps = ioctx.cluster.images[name]
        self.metadata: dict[str, str] = {}

    def list_snaps(self) -> list[dict[str, str]]:
        return [{"name": s} for s in self.snaps]

    def metadata_set(self, key: str, value: str) -> None:
        self.metadata[key] = value

    def metadata_remove(self, key: str) -> None:
        self.metadata.pop(key, None)

    def create_snap(self, name: str) -> None:
        if self.cluster.pool_full:
            raise DiskQuotaExceeded("[errno 122] error creating snapshot: Disk quota exceeded", errno=errno.EDQUOT)
        self.snaps.append(name)

    def is_protected_snap(self, name: str) -> bool:
        return False

    def remove_snap(self, name: str) -> None:
        self.snaps.remove(name)

    def list_children2(self) -> list[dict[str, Any]]:
        return []

    def size(self) -> int:
        return 8

    def read(self, offset: int, length: int) -> bytes:
        return b"x" * length

    def close(self) -> None:
        pass


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Cluster:
    """Fake ``rados`` and ``rbd`` modules in ``sys.modules``: what the adapters import."""
    state = Cluster(images={"img": [], "other": []})
    rados = types.ModuleType("rados")
    handle_class = type("Rados", (FakeRados,), {"cluster": state})
    rados.__dict__.update(Rados=handle_class, Error=RadosError, RadosStateError=RadosStateError, TimedOut=TimedOut)
    rbd = types.ModuleType("rbd")
    rbd.__dict__.update(Image=FakeImage, Error=RbdError, ImageNotFound=ImageNotFound, ObjectNotFound=ImageNotFound)
    monkeypatch.setitem(sys.modules, "rados", rados)
    monkeypatch.setitem(sys.modules, "rbd", rbd)
    return state


def _volumes() -> RbdVolumes:
    return RbdVolumes(CephSettings(conf="/etc/ceph/test.conf", user="ff", keyring="/k", timeout_s=3))


def _disk(image: str) -> DiskSpec:
    return DiskSpec("vdb", "virtio", f"pool/{image}", "raw", 8, "network", protocol="rbd")


def _member(image: str) -> Member:
    return Member(SET_ID, "vdb", "virtio", None, 8, "raw", f"rbd:pool/{image}@{snapshot_name(SET_ID)}",
                  metadata={STORE_KEY: RBD_STORE})  # fmt: skip


def _a_set(volumes: RbdVolumes) -> None:
    """What one set costs the cluster: open + tag + snapshot, digest, then the checks and removal of a delete."""
    members = RbdMembers(volumes)
    with volumes.open(SET_ID, "nightly", [_disk("img"), _disk("other")]) as capture:
        snaps = capture.snapshot()
    assert len({volumes.checksum(s) for s in snaps}) == 1
    assert members.present(_member("img")) and members.children(_member("img")) == []
    members.remove(_member("img"))
    assert volumes.remove(SET_ID, ["pool/other", "pool/gone"]) == ["pool/other@" + snapshot_name(SET_ID)]


def test_every_operation_of_every_set_reuses_one_connection_with_the_client_timeouts(cluster: Cluster) -> None:
    volumes = _volumes()
    for _ in range(3):
        _a_set(volumes)
    assert len(cluster.handles) == 1, f"{len(cluster.handles)} connections for 3 sets: one per operation"
    (handle,) = cluster.handles
    assert handle.state == "connected" and handle.shutdowns == 0
    assert handle.conf == {"client_mount_timeout": "3", "rados_mon_op_timeout": "3", "rados_osd_op_timeout": "3",
                           "keyring": "/k"}  # fmt: skip
    volumes.close()
    assert handle.shutdowns == 1
    volumes.close()
    assert handle.shutdowns == 1, "close is idempotent"
    _a_set(volumes)
    assert len(cluster.handles) == 2 and cluster.handles[1].state == "connected", "used after close: reconnects"
    volumes.close()


def test_a_connection_an_operation_found_broken_or_in_doubt_is_replaced_on_the_next_call(cluster: Cluster) -> None:
    volumes = _volumes()
    _a_set(volumes)
    cluster.time_out_next = 1
    with pytest.raises(PreflightFailed, match=r"cannot be opened.*timed out"):
        volumes.checksum(volumes.existing(SET_ID, [_disk("img")])[0])
    assert cluster.handles[0].shutdowns == 1, "the timed-out connection was not dropped"
    _a_set(volumes)
    assert len(cluster.handles) == 2 and cluster.handles[1].state == "connected"
    # An error the operation itself takes for "not there" still drops a broken connection.
    cluster.time_out_next = 1
    assert RbdMembers(volumes).present(_member("img")) is False
    assert cluster.handles[1].shutdowns == 1
    _a_set(volumes)
    assert len(cluster.handles) == 3
    # A handle shut down behind our back is replaced too; an image that is really gone keeps the connection.
    cluster.handles[2].shutdown()
    _a_set(volumes)
    assert len(cluster.handles) == 4
    with pytest.raises(PreflightFailed, match="not found"):
        volumes.checksum(volumes.existing(SET_ID, [_disk("gone")])[0])
    _a_set(volumes)
    assert len(cluster.handles) == 4 and cluster.handles[3].shutdowns == 0
    # A snapshot failing at a full pool (in the window, in another thread) retires it as well.
    cluster.pool_full = True
    with volumes.open(SET_ID, "full", [_disk("img"), _disk("other")]) as capture:
        with pytest.raises(CaptureFailed, match="quota"):
            capture.snapshot()  # the caller handles it inside the block: the connection must still go
        assert cluster.handles[3].shutdowns == 0, "shut down under the images still open"
    assert cluster.handles[3].shutdowns == 1
    cluster.pool_full = False
    _a_set(volumes)
    assert len(cluster.handles) == 5
    volumes.close()
    assert [h.shutdowns for h in cluster.handles] == [1] * 5, "every connection shut down exactly once"


def test_an_unreachable_cluster_is_a_clear_error_and_nothing_is_kept(cluster: Cluster) -> None:
    volumes = _volumes()
    cluster.unreachable = True
    with pytest.raises(PreflightFailed, match=r"cannot be reached.*FREEZEFRAME_CEPH_CONF"):
        _a_set(volumes)
    assert cluster.handles[0].shutdowns == 1, "the handle that failed to connect was left open"
    cluster.unreachable = False
    _a_set(volumes)
    assert len(cluster.handles) == 2 and cluster.handles[1].state == "connected"
    volumes.close()


def test_threads_share_the_connection_and_close_waits_for_the_ones_still_using_it(cluster: Cluster) -> None:
    """Group snapshots open several instances' images at once: one connect, and no shutdown under an operation."""
    cluster.connect_delay_s = 0.05
    volumes = _volumes()
    inside, release = threading.Barrier(5), threading.Event()

    def operation() -> None:
        with volumes.cluster():
            inside.wait(timeout=5)
            release.wait(timeout=5)

    threads = [threading.Thread(target=operation) for _ in range(4)]
    for t in threads:
        t.start()
    inside.wait(timeout=5)
    assert len(cluster.handles) == 1, "threads starting at once each connected"
    volumes.close()
    assert cluster.handles[0].shutdowns == 0, "shut down under running operations"
    release.set()
    for t in threads:
        t.join(timeout=5)
    assert cluster.handles[0].shutdowns == 1


def test_closing_the_service_shuts_the_connection_down(cluster: Cluster, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("FREEZEFRAME_CEPH_CONF", "/etc/ceph/test.conf")
    with wiring.open_service(Settings(home=tmp_path / "home")) as ff:
        _a_set(ff.parts.volumes)
        _a_set(ff.parts.volumes)
        (handle,) = cluster.handles
        assert handle.shutdowns == 0
    assert handle.shutdowns == 1


def test_a_slow_connect_holds_up_no_other_thread_giving_its_connection_up(cluster: Cluster) -> None:
    """A snapshot failing in one instance's window retires the connection while another thread reconnects to a
    cluster slow to answer: the failing one neither waits for that connect nor shares it."""
    volumes = _volumes()
    gate = cluster.connect_gate = threading.Event()
    gate.set()
    operation = volumes.cluster()
    first = operation.__enter__()
    gate.clear()
    volumes.retire_if_in_doubt(first, TimedOut("[errno 110] RBD operation timeout", errno=errno.ETIMEDOUT))
    reconnecting = threading.Thread(target=lambda: volumes.checksum(volumes.existing(SET_ID, [_disk("img")])[0]))
    reconnecting.start()
    assert cluster.connecting.wait(timeout=5)
    giving_up = threading.Thread(target=lambda: operation.__exit__(None, None, None))
    giving_up.start()
    giving_up.join(timeout=5)
    stuck = giving_up.is_alive()
    gate.set()
    reconnecting.join(timeout=5)
    assert not stuck, "giving the retired connection up waited for another thread's connect"
    assert first.shutdowns == 1 and len(cluster.handles) == 2 and cluster.handles[1].state == "connected"
    volumes.close()
