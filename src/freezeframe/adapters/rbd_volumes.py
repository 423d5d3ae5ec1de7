"""The Volumes port on Ceph RBD, through Ceph's own Python bindings (``rados``, ``rbd``): no subprocess anywhere.

A set's snapshot of an image is named ``freezeframe-<set UUID>`` and the image carries the metadata key
``freezeframe.set.<set UUID>`` (the set's name), so both the snapshot and the tag name the set. Every call on
the cluster is bounded by the client timeouts below, so an unreachable cluster or a stuck OSD fails inside the
freeze cap instead of holding the guest frozen.

Settings (a user's real cluster): ``FREEZEFRAME_CEPH_CONF`` (ceph.conf path; default Ceph's own search),
``FREEZEFRAME_CEPH_USER`` (client id without ``client.``, default ``admin``), ``FREEZEFRAME_CEPH_KEYRING``,
``FREEZEFRAME_CEPH_SECRET_UUID`` (the libvirt secret restored guests authenticate with),
``FREEZEFRAME_CEPH_TIMEOUT_S`` (default 5).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from freezeframe.errors import CaptureFailed, PreflightFailed
from freezeframe.model import DiskSpec
from freezeframe.ports.volumes import VolumeSnapshot

SNAP_PREFIX = "freezeframe-"
TAG_PREFIX = "freezeframe.set."
_CHUNK = 4 << 20
_MAX_PARALLEL = 16
"""Snapshots taken at once inside the window (more images wait for a free thread)."""


def snapshot_name(set_id: str) -> str:
    return f"{SNAP_PREFIX}{set_id}"


def split_volume(volume: str) -> tuple[str, str]:
    """``POOL/IMAGE`` → (pool, image); a namespace (``POOL/NS/IMAGE``) is not supported yet."""
    pool, sep, image = volume.partition("/")
    if not sep or not pool or not image or "/" in image:
        raise PreflightFailed(f"RBD volume {volume!r} is not POOL/IMAGE (namespaces are not supported)")
    return pool, image


@dataclass(frozen=True)
class CephSettings:
    conf: str | None = None
    user: str = "admin"
    keyring: str | None = None
    secret_uuid: str | None = None
    timeout_s: float = 5.0

    @classmethod
    def from_env(cls) -> CephSettings:
        env = os.environ
        return cls(
            conf=env.get("FREEZEFRAME_CEPH_CONF") or None,
            user=env.get("FREEZEFRAME_CEPH_USER") or "admin",
            keyring=env.get("FREEZEFRAME_CEPH_KEYRING") or None,
            secret_uuid=env.get("FREEZEFRAME_CEPH_SECRET_UUID") or None,
            timeout_s=float(env.get("FREEZEFRAME_CEPH_TIMEOUT_S") or 5.0),
        )

    def qemu_options(self) -> str:
        """What qemu-img needs after ``rbd:POOL/IMAGE@SNAP``: ``:id=USER[:conf=PATH][:keyring=PATH]``."""
        parts = [f":id={self.user}"]
        if self.conf:
            parts.append(f":conf={self.conf}")
        if self.keyring:
            parts.append(f":keyring={self.keyring}")
        return "".join(parts)


def _bindings() -> tuple[ModuleType, ModuleType]:
    try:
        import rados
        import rbd
    except ImportError as exc:
        raise PreflightFailed(
            "Ceph's Python bindings (rados, rbd) are not importable: install python3-rados and python3-rbd "
            "(scripts/setup-host.sh links them into the venv)"
        ) from exc
    return rados, rbd


_CLEAN_ERRNOS = frozenset({errno.ENOENT, errno.EEXIST})
"""Ceph errors that leave nothing behind on the client: an image or snapshot that is not there, or already is."""


def connection_in_doubt(exc: BaseException) -> bool:
    """Whether an operation that raised ``exc`` may have left its connection broken (timed out, shut down,
    blocklisted) or holding state: an exclusive lock or a watch an image could not release while its pool was full,
    a map that still says the pool is full. Any Ceph error among its causes but "not found"/"already exists" counts:
    a connection per operation dropped all of that at its end, and so does retiring the shared one."""
    rados, rbd = _bindings()
    seen: BaseException | None = exc
    for _ in range(8):  # a chain of causes is short; the bound guards against a cycle
        if seen is None:
            return False
        if isinstance(seen, (rados.Error, rbd.Error)):
            code = getattr(seen, "errno", None)
            if code is None or abs(code) not in _CLEAN_ERRNOS:
                return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass
class _Connection:
    """A librados handle, how many operations use it, and whether it was taken out of use (closed, or in doubt)."""

    handle: Any
    users: int = 0
    retired: bool = False


class RbdVolumes:
    """One cluster connection per service, shared by every operation and thread; images opened before the window,
    closed after.

    A librados connection costs a monitor handshake, authentication and its own messenger threads (~0.4 s per set
    when every operation opened one), so it is opened on first use and kept until ``close``. An operation that
    fails with a Ceph error (timed out, shut down, blocklisted, pool full: see ``connection_in_doubt``) retires it
    on the way out and the next one reconnects: no operation is retried, so every call stays inside the client
    timeouts. A retired handle is shut down when the last operation still using it (another thread's) ends.
    """

    def __init__(self, settings: CephSettings | None = None) -> None:
        self.settings = settings or CephSettings.from_env()
        self._lock = threading.Lock()
        """Guards ``_shared`` and the counts; held for no call on the cluster."""
        self._connecting = threading.Lock()
        self._shared: _Connection | None = None

    def __enter__(self) -> RbdVolumes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Shut the connection down (now, or when the operations still using it end); idempotent, and a later
        operation opens a new one."""
        with self._lock:
            conn = self._shared
            idle = conn is not None and self._retire(conn)
        if idle and conn is not None:
            conn.handle.shutdown()

    @contextlib.contextmanager
    def cluster(self) -> Iterator[Any]:
        """The shared connection for one operation; retired if the operation failed with a Ceph error."""
        conn = self._acquire()
        in_doubt = False
        try:
            yield conn.handle
        except BaseException as exc:
            in_doubt = connection_in_doubt(exc)
            raise
        finally:
            with self._lock:
                conn.users -= 1
                if in_doubt:
                    self._retire(conn)
                last = conn.retired and conn.users == 0
            if last:
                conn.handle.shutdown()

    def _acquire(self) -> _Connection:
        """The shared connection, opened if there is none. The connect holds only ``_connecting``: threads starting at
        once share one connect, and no snapshot in a window waits on it to give its connection up."""
        conn = self._take_shared()
        if conn is not None:
            return conn
        with self._connecting:
            conn = self._take_shared()  # another thread connected while this one waited
            if conn is not None:
                return conn
            made = _Connection(self._connect(), users=1)
            with self._lock:
                self._shared = made
            return made

    def _take_shared(self) -> _Connection | None:
        with self._lock:
            conn = self._shared
            if conn is not None and conn.handle.state != "connected":
                self._retire(conn)  # shut down by someone else: nothing left to shut down
                conn = None
            if conn is not None:
                conn.users += 1
            return conn

    def _retire(self, conn: _Connection) -> bool:
        """Take ``conn`` out of use (the lock is held); True when nobody uses it, so the caller shuts it down."""
        if self._shared is conn:
            self._shared = None
        first = not conn.retired
        conn.retired = True
        return first and conn.users == 0

    def retire_if_in_doubt(self, handle: Any, exc: BaseException) -> None:
        """For an error an operation handles itself (it never reaches ``cluster``): a connection in doubt still
        goes; the operation's own end shuts it down."""
        if connection_in_doubt(exc):
            with self._lock:
                if self._shared is not None and self._shared.handle is handle:
                    self._retire(self._shared)

    def _connect(self) -> Any:
        rados, _ = _bindings()
        s = self.settings
        timeout = str(max(1, int(s.timeout_s)))
        conf = {"client_mount_timeout": timeout, "rados_mon_op_timeout": timeout, "rados_osd_op_timeout": timeout}
        if s.keyring:
            conf["keyring"] = s.keyring
        handle = None
        try:
            handle = rados.Rados(conffile=s.conf or "", rados_id=s.user, conf=conf)
            handle.connect(timeout=max(1, int(s.timeout_s)))
        except rados.Error as exc:
            if handle is not None:
                handle.shutdown()  # its threads and sockets, now that no operation gets it
            where = s.conf or "Ceph's default ceph.conf"
            raise PreflightFailed(
                f"the Ceph cluster ({where}, client.{s.user}) cannot be reached: {exc}; check FREEZEFRAME_CEPH_CONF, "
                "FREEZEFRAME_CEPH_USER and FREEZEFRAME_CEPH_KEYRING"
            ) from exc
        return handle

    @contextlib.contextmanager
    def image(self, handle: Any, volume: str, snapshot: str | None = None, read_only: bool = False) -> Iterator[Any]:
        rados, rbd = _bindings()
        pool, name = split_volume(volume)
        try:
            ioctx = handle.open_ioctx(pool)
        except rados.Error as exc:
            self.retire_if_in_doubt(handle, exc)
            raise PreflightFailed(f"RBD pool {pool!r} cannot be opened: {exc}") from exc
        try:
            try:
                img = rbd.Image(ioctx, name, snapshot=snapshot, read_only=read_only)
            except (rbd.Error, rados.Error) as exc:
                self.retire_if_in_doubt(handle, exc)  # callers may take this error for "the image is gone"
                what = f"{volume}@{snapshot}" if snapshot else volume
                raise PreflightFailed(f"RBD image {what} cannot be opened: {exc}") from exc
            try:
                yield img
            finally:
                img.close()
        finally:
            ioctx.close()

    def mon_hosts(self) -> tuple[tuple[str, str], ...]:
        """(host, port) of every monitor in the configuration (``v1:``/``v2:`` prefixes and brackets dropped)."""
        rados, _ = _bindings()
        handle = rados.Rados(conffile=self.settings.conf or "", rados_id=self.settings.user)
        try:
            text = str(handle.conf_get("mon_host") or "")
        finally:
            handle.shutdown()
        hosts = []
        for item in text.replace(";", ",").replace(" ", ",").split(","):
            addr = item.strip().strip("[]").removeprefix("v1:").removeprefix("v2:").split("/")[0]
            if addr:
                host, _, port = addr.rpartition(":") if addr.count(":") == 1 else (addr, "", "6789")
                hosts.append((host, port or "6789"))
        return tuple(dict.fromkeys(hosts))

    # ---- the Volumes port ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def open(self, set_id: str, set_name: str, disks: Sequence[DiskSpec]) -> Iterator[RbdCapture]:
        snap = snapshot_name(set_id)
        with self.cluster() as handle, contextlib.ExitStack() as stack:
            opened = []
            for disk in disks:
                volume = str(disk.source_path)
                img = stack.enter_context(self.image(handle, volume))
                if any(s["name"] == snap for s in img.list_snaps()):
                    raise PreflightFailed(f"RBD image {volume} already has a snapshot named {snap}")
                img.metadata_set(TAG_PREFIX + set_id, set_name)
                opened.append((disk, img))
            yield RbdCapture(snap, opened, lambda exc: self.retire_if_in_doubt(handle, exc))

    def existing(self, set_id: str, disks: Sequence[DiskSpec]) -> list[VolumeSnapshot]:
        snap = snapshot_name(set_id)
        return [VolumeSnapshot(d, snap, f"rbd:{d.source_path}@{snap}") for d in disks]

    def checksum(self, snapshot: VolumeSnapshot) -> str:
        digest = hashlib.sha256()
        volume = str(snapshot.disk.source_path)
        with self.cluster() as handle, self.image(handle, volume, snapshot.snapshot, read_only=True) as img:
            size = img.size()
            offset = 0
            while offset < size:
                data = img.read(offset, min(_CHUNK, size - offset))
                digest.update(data)
                offset += len(data)
        return digest.hexdigest()

    def remove(self, set_id: str, volumes: Sequence[str]) -> list[str]:
        _, rbd = _bindings()
        snap = snapshot_name(set_id)
        removed = []
        with self.cluster() as handle:
            for volume in volumes:
                try:
                    with self.image(handle, volume) as img:
                        if any(s["name"] == snap for s in img.list_snaps()):
                            if img.is_protected_snap(snap):
                                img.unprotect_snap(snap)
                            img.remove_snap(snap)
                            removed.append(f"{volume}@{snap}")
                        with contextlib.suppress(rbd.ObjectNotFound, KeyError):
                            img.metadata_remove(TAG_PREFIX + set_id)
                except PreflightFailed:
                    continue  # the image itself is gone: so is its snapshot
        return removed


class RbdCapture:
    """The images of one set, open and tagged: inside the window only ``create_snap`` runs, on every image at once.

    Each snapshot is a monitor round trip plus a request to the image's lock owner (QEMU): ~100 ms here. One thread
    per image overlaps them (librbd releases the GIL), so the window grows little with the number of images.
    """

    def __init__(
        self, snap: str, opened: list[tuple[DiskSpec, Any]], failed: Callable[[BaseException], None] | None = None
    ) -> None:
        self.snap = snap
        self.opened = opened
        self.failed = failed
        """Told of a failed snapshot even when the caller handles the error inside ``open``: the connection goes."""

    def snapshot(self) -> list[VolumeSnapshot]:
        if len(self.opened) == 1:
            return [self.snap_one(*self.opened[0])]
        with ThreadPoolExecutor(max_workers=min(len(self.opened), _MAX_PARALLEL)) as pool:
            futures = [pool.submit(self.snap_one, disk, img) for disk, img in self.opened]
        for future in futures:
            failed = future.exception()
            if failed is not None:
                raise failed  # CaptureFailed; the flow removes whatever the other threads made
        return [f.result() for f in futures]

    def snap_one(self, disk: DiskSpec, img: Any) -> VolumeSnapshot:
        rados, rbd = _bindings()
        try:
            img.create_snap(self.snap)
        except (rbd.Error, rados.Error) as exc:
            if self.failed is not None:
                self.failed(exc)
            raise CaptureFailed(f"RBD snapshot of {disk.source_path} ({disk.target}) failed: {exc}") from exc
        return VolumeSnapshot(disk, self.snap, f"rbd:{disk.source_path}@{self.snap}")
