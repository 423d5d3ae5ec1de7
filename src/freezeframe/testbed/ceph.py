"""A real one-node Ceph cluster for tests, the demo and benchmarks: one mon, one mgr, one OSD on 127.0.0.1.

Built from Debian's packages (scripts/setup-host.sh installs them) and started by hand, since these machines have
no service manager. The OSD uses the memstore objectstore (RAM-backed: fast to create, data gone on stop), so
``up`` after ``down`` (or after the daemons died) builds a fresh cluster in seconds; ``up`` on a healthy cluster
returns at once. cephx is on; a client ``client.freezeframe`` limited to the pool gets a keyring, and libvirt
gets a secret of usage type ``ceph`` holding its key, so guests' ``<disk type='network'>`` can authenticate.

Everything lives under one state directory: ``FREEZEFRAME_CEPH_TESTBED_DIR``, default
``/var/tmp/freezeframe-ceph`` (ceph.conf, keyrings, daemons' data, logs, pid files, ``testbed.json``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from freezeframe.testbed.instance import TestbedError
from freezeframe.testbed.radosgw import Gateway

STATE_ENV = "FREEZEFRAME_CEPH_TESTBED_DIR"
DEFAULT_STATE = Path("/var/tmp/freezeframe-ceph")
MON_PORT = 6789
USER = "freezeframe"
POOL = "freezeframe"
SECRET_USAGE = "client.freezeframe freezeframe testbed"
DAEMONS = ("mon.a", "mgr.x", "osd.0")
_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class CephTestbed:
    """What a client needs: ``--json`` prints exactly these fields."""

    conf: str
    keyring: str
    user: str
    pool: str
    mon_host: str
    secret_uuid: str
    state_dir: str
    s3_endpoint: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None

    def env(self) -> dict[str, str]:
        """The settings freezeframe reads to reach this cluster."""
        return {
            "FREEZEFRAME_CEPH_CONF": self.conf,
            "FREEZEFRAME_CEPH_USER": self.user,
            "FREEZEFRAME_CEPH_KEYRING": self.keyring,
            "FREEZEFRAME_CEPH_SECRET_UUID": self.secret_uuid,
        }


def state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE)


def _run(args: list[str], *, input_text: str | None = None, timeout: float = _TIMEOUT_S) -> str:
    try:
        done = subprocess.run(args, input=input_text, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise TestbedError(f"{args[0]} not found: run scripts/setup-host.sh (it installs the Ceph packages)") from exc
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"{' '.join(args[:3])} did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise TestbedError(f"{' '.join(args[:4])} failed: {(done.stderr or done.stdout).strip()[-600:]}")
    return done.stdout


class Cluster:
    """The daemons and files under one state directory."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir()
        self.conf = self.root / "ceph.conf"
        self.admin_keyring = self.root / "ceph.client.admin.keyring"
        self.user_keyring = self.root / f"ceph.client.{USER}.keyring"
        self.info_file = self.root / "testbed.json"

    # ---- status --------------------------------------------------------------------------------------------

    def _pid(self, daemon: str) -> int | None:
        try:
            pid = int((self.root / "run" / f"{daemon}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def running(self) -> dict[str, int | None]:
        return {d: self._pid(d) for d in DAEMONS}

    def info(self) -> CephTestbed | None:
        try:
            return CephTestbed(**json.loads(self.info_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def healthy(self) -> bool:
        """All daemons run and the pool answers as the client user."""
        if self.info() is None or not all(self.running().values()):
            return False
        try:
            self._ceph(["osd", "pool", "get", POOL, "size"], timeout=10)
        except TestbedError:
            return False
        return True

    # ---- up / down -----------------------------------------------------------------------------------------

    def up(self) -> CephTestbed:
        """Idempotent: a healthy cluster is left alone; anything else is rebuilt from scratch. A file lock keeps
        two concurrent ``up`` (several test runs sharing the test bed) from rebuilding it under each other."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "up.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._up()

    def _up(self) -> CephTestbed:
        info = self.info()
        if info is not None and self.healthy():
            self._ensure_secret(info.secret_uuid)
            return self._with_s3(info)
        self.down()
        self._write_config()
        self._start_mon()
        self._start_mgr()
        self._start_osd()
        self._make_pool()
        secret = self._secret_uuid()
        self._ensure_secret(secret)
        info = CephTestbed(
            conf=str(self.conf), keyring=str(self.user_keyring), user=USER, pool=POOL,
            mon_host=f"127.0.0.1:{MON_PORT}", secret_uuid=secret, state_dir=str(self.root),
        )  # fmt: skip
        self.info_file.write_text(json.dumps(asdict(info), indent=2))
        return self._with_s3(info)

    def gateway(self) -> Gateway:
        return Gateway(self.root, self.conf, self.admin_keyring)

    def _with_s3(self, info: CephTestbed) -> CephTestbed:
        """radosgw on the cluster (testbed/radosgw.py), its endpoint and S3 keys added to what ``up`` prints."""
        access = self.gateway().ensure()
        return replace(info, **asdict(access))

    def down(self) -> None:
        """Stop the daemons (SIGKILL by pid: memstore keeps nothing worth a clean stop) and remove the data."""
        self.gateway().stop()
        for daemon in DAEMONS:
            pid = self._pid(daemon)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                self._wait_gone(pid)
        for sub in ("mon", "mgr", "osd", "run"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        self.info_file.unlink(missing_ok=True)

    @staticmethod
    def _wait_gone(pid: int) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    # ---- building --------------------------------------------------------------------------------------------

    def _write_config(self) -> None:
        for sub in ("mon/a", "mgr/x", "osd/0", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        r = self.root
        self.conf.write_text(
            f"""# written by `freezeframe testbed ceph up`
[global]
fsid = {fsid}
mon_host = v1:127.0.0.1:{MON_PORT}
mon_initial_members = a
ms_bind_msgr2 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
paxos_propose_interval = 0.1
osd_objectstore = memstore
memstore_device_bytes = 4294967296
run_dir = {r}/run
pid_file = {r}/run/$name.pid
admin_socket = {r}/run/$cluster-$name.asok
log_file = {r}/log/$cluster-$name.log
[mon.a]
mon_data = {r}/mon/a
keyring = {r}/mon/a/keyring
[mgr.x]
mgr_data = {r}/mgr/x
keyring = {r}/mgr/x/keyring
[osd.0]
osd_data = {r}/osd/0
keyring = {r}/osd/0/keyring
[client]
keyring = {self.admin_keyring}
"""
        )

    def _ceph(self, args: list[str], *, admin: bool = True, timeout: float = _TIMEOUT_S) -> str:
        who = ["-n", "client.admin"] if admin else ["--id", USER, "--keyring", str(self.user_keyring)]
        return _run(["ceph", "-c", str(self.conf), *who, "--connect-timeout", "10", *args], timeout=timeout)

    def _start_mon(self) -> None:
        mon_keyring = self.root / "mon" / "mon.keyring"
        mon_caps = ["--cap", "mon", "allow *"]
        _run(["ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.", *mon_caps])
        _run([
            "ceph-authtool", "--create-keyring", str(self.admin_keyring), "--gen-key", "-n", "client.admin",
            "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *", "--cap", "mds", "allow *",
        ])  # fmt: skip
        _run(["ceph-authtool", str(mon_keyring), "--import-keyring", str(self.admin_keyring)])
        monmap = self.root / "mon" / "monmap"
        conf_lines = self.conf.read_text().splitlines()
        fsid = next(line.split("=", 1)[1].strip() for line in conf_lines if line.startswith("fsid"))
        addr = f"[v1:127.0.0.1:{MON_PORT}]"
        _run(["monmaptool", "--create", "--clobber", "--fsid", fsid, "--addv", "a", addr, str(monmap)])
        mkfs = ["--mkfs", "-i", "a", "--monmap", str(monmap), "--keyring", str(mon_keyring)]
        _run(["ceph-mon", "-c", str(self.conf), *mkfs])
        _run(["ceph-mon", "-c", str(self.conf), "-i", "a"])
        self._ceph(["mon", "stat"])

    def _start_mgr(self) -> None:
        keyring = self.root / "mgr" / "x" / "keyring"
        self._ceph(["auth", "get-or-create", "mgr.x", "mon", "allow profile mgr", "osd", "allow *", "mds", "allow *",
                    "-o", str(keyring)])  # fmt: skip
        _run(["ceph-mgr", "-c", str(self.conf), "-i", "x"])

    def _start_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        keyring = self.root / "osd" / "0" / "keyring"
        _run(["ceph-authtool", "--create-keyring", str(keyring), "--gen-key", "-n", "osd.0"])
        key = next(line.split("=", 1)[1].strip() for line in keyring.read_text().splitlines() if "key" in line)
        secrets = self.root / "osd" / "secrets.json"
        secrets.write_text(json.dumps({"cephx_secret": key}))
        self._ceph(["osd", "new", osd_uuid, "-i", str(secrets)])
        secrets.unlink()
        _run(["ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, "--no-mon-config"])
        _run(["ceph-osd", "-c", str(self.conf), "-i", "0"])

    def _make_pool(self) -> None:
        self._ceph(["osd", "set-require-min-compat-client", "mimic", "--yes-i-really-mean-it"])
        self._ceph(["osd", "pool", "create", POOL, "8"])
        self._ceph(["osd", "pool", "application", "enable", POOL, "rbd"])
        self._ceph([
            "auth", "get-or-create", f"client.{USER}", "mon", "profile rbd", "osd", f"profile rbd pool={POOL}",
            "mgr", f"profile rbd pool={POOL}", "-o", str(self.user_keyring),
        ])  # fmt: skip
        deadline = time.monotonic() + _TIMEOUT_S
        while time.monotonic() < deadline:
            stats = json.loads(self._ceph(["pg", "stat", "--format", "json"]))
            by_state = stats.get("pg_summary", stats).get("num_pg_by_state", [])
            total = sum(int(s.get("num", 0)) for s in by_state)
            clean = sum(int(s.get("num", 0)) for s in by_state if s.get("name") == "active+clean")
            if total and clean == total:
                return
            time.sleep(0.2)
        raise TestbedError(f"the pool's placement groups did not become active+clean; see {self.root}/log")

    # ---- libvirt secret --------------------------------------------------------------------------------------

    def _secret_uuid(self) -> str:
        """One UUID per state directory, kept across rebuilds so guests' XML stays valid."""
        path = self.root / "secret.uuid"
        if not path.exists():
            path.write_text(str(uuid.uuid4()))
        return path.read_text().strip()

    def user_key(self) -> str:
        return next(
            line.split("=", 1)[1].strip() for line in self.user_keyring.read_text().splitlines() if "key" in line
        )

    def _ensure_secret(self, secret_uuid: str) -> None:
        """A libvirt secret (usage ceph) holding the client's key; redefined whenever the key changed."""
        xml = (
            f"<secret ephemeral='no' private='no'><uuid>{secret_uuid}</uuid>"
            f"<usage type='ceph'><name>{SECRET_USAGE}</name></usage></secret>"
        )
        xml_file = self.root / "secret.xml"
        xml_file.write_text(xml)
        key = self.user_key()
        try:
            current = _run(["virsh", "-q", "secret-get-value", secret_uuid], timeout=20).strip()
        except TestbedError:
            current = ""
        if current == key:
            return
        _run(["virsh", "-q", "secret-define", str(xml_file)], timeout=20)
        key_file = self.root / "secret.key"
        key_file.write_bytes(base64.b64decode(key))
        try:
            _run(["virsh", "-q", "secret-set-value", secret_uuid, "--file", str(key_file), "--plain"], timeout=20)
        finally:
            key_file.unlink()

    def status(self) -> dict[str, object]:
        info = self.info()
        return {
            "state_dir": str(self.root),
            "daemons": self.running(),
            "healthy": self.healthy(),
            "testbed": asdict(info) if info else None,
        }


# ---- images for test guests (through the client user, like freezeframe) ---------------------------------------


@contextlib.contextmanager
def open_pool(info: CephTestbed) -> Iterator[Any]:
    import rados

    conf = {"keyring": info.keyring, "client_mount_timeout": "10"}
    handle = rados.Rados(conffile=info.conf, rados_id=info.user, conf=conf)
    handle.connect(timeout=10)
    try:
        ioctx = handle.open_ioctx(info.pool)
        try:
            yield ioctx
        finally:
            ioctx.close()
    finally:
        handle.shutdown()


def create_image(info: CephTestbed, name: str, size: int) -> None:
    """A format-2 image with layering + exclusive-lock (what Nova/Cinder make; no object-map, see the notes)."""
    import rbd

    with open_pool(info) as ioctx:
        features = rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
        rbd.RBD().create(ioctx, name, size, old_format=False, features=features)


def remove_image(info: CephTestbed, name: str) -> None:
    """Remove the image with its snapshots (clones of them first); quiet when it is gone already."""
    import rbd

    with open_pool(info) as ioctx:
        try:
            with rbd.Image(ioctx, name) as img:
                for snap in list(img.list_snaps()):
                    if img.is_protected_snap(snap["name"]):
                        img.unprotect_snap(snap["name"])
                    img.remove_snap(snap["name"])
        except rbd.ImageNotFound:
            return
        deadline = time.monotonic() + 60  # a stopped QEMU's watch can linger until the OSD times it out (30 s)
        while True:
            try:
                rbd.RBD().remove(ioctx, name)
                return
            except rbd.ImageBusy:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
