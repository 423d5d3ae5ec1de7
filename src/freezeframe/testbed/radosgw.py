"""Ceph's S3 gateway (radosgw, Debian package ``radosgw``) on the test bed's cluster, loopback only.

``freezeframe testbed ceph up`` starts it after the cluster (``Cluster.up`` calls ``ensure``): one gateway
``client.rgw.ff`` with the beast front end on 127.0.0.1:7480 and one S3 user ``freezeframe-s3`` whose keys are
kept in ``s3.json`` in the state directory. A gateway that answers is left alone, so a second ``up`` costs one
HTTP request. Its options are given on the command line, so the cluster's ceph.conf stays as ``ceph.py`` wrote it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from freezeframe.testbed.instance import TestbedError

RGW_PORT = 7480
RGW_NAME = "client.rgw.ff"
S3_UID = "freezeframe-s3"
_START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class S3Access:
    """What an S3 client needs; ``testbed ceph up --json`` prints these three fields."""

    s3_endpoint: str
    s3_access_key_id: str
    s3_secret_access_key: str

    def env(self) -> dict[str, str]:
        """boto3's own variables (its credential chain) plus the endpoint tests and the demo pass to ``--endpoint``."""
        return {
            "AWS_ACCESS_KEY_ID": self.s3_access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_access_key,
            "FREEZEFRAME_S3_ENDPOINT": self.s3_endpoint,
        }


def _run(args: list[str], timeout: float = 60.0) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise TestbedError(f"{args[0]} not found: run scripts/setup-host.sh (it installs radosgw)") from exc
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"{' '.join(args[:3])} did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise TestbedError(f"{' '.join(args[:4])} failed: {(done.stderr or done.stdout).strip()[-600:]}")
    return done.stdout


class Gateway:
    """The gateway daemon and its S3 user, under the cluster's state directory."""

    def __init__(self, root: Path, conf: Path, admin_keyring: Path) -> None:
        self.root = root
        self.conf = conf
        self.admin = ["-c", str(conf), "-n", "client.admin", "--keyring", str(admin_keyring)]
        self.keyring = root / "rgw" / "keyring"
        self.pid_file = root / "run" / "rgw.ff.pid"
        self.keys_file = root / "s3.json"
        self.endpoint = f"http://127.0.0.1:{RGW_PORT}"

    def ensure(self) -> S3Access:
        """Idempotent: a gateway that answers and a user whose keys are known are kept."""
        access = self._known_access()
        if access is None or not self._answers():
            self.stop()
            self._start()
            access = self._user()
        return access

    def stop(self) -> None:
        pid = self._pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self._alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    # ---- state -----------------------------------------------------------------------------------------------

    def _known_access(self) -> S3Access | None:
        try:
            return S3Access(**json.loads(self.keys_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._alive(pid) else None

    def _answers(self) -> bool:
        """Anonymous ``GET /`` gives an S3 XML answer (200) when the gateway serves requests."""
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    # ---- start -------------------------------------------------------------------------------------------------

    def _start(self) -> None:
        self.keyring.parent.mkdir(parents=True, exist_ok=True)
        _run(["ceph", *self.admin, "auth", "get-or-create", RGW_NAME, "mon", "allow rw", "osd", "allow rwx",
              "mgr", "allow rw", "-o", str(self.keyring)])  # fmt: skip
        options = {
            "rgw_frontends": f"beast endpoint=127.0.0.1:{RGW_PORT}",
            "rgw_data": str(self.root / "rgw"),
            "keyring": str(self.keyring),
            "pid_file": str(self.pid_file),
            "log_file": str(self.root / "log" / "rgw.ff.log"),
            "admin_socket": str(self.root / "run" / "rgw.ff.asok"),
            "rgw_dns_name": "127.0.0.1",
            "osd_pool_default_pg_num": "8",
            "osd_pool_default_pgp_num": "8",
            # The OSD keeps objects in RAM: give deleted objects' space back in seconds, not the default 2 hours.
            "rgw_gc_obj_min_wait": "5",
            "rgw_gc_processor_period": "10",
        }
        args = ["radosgw", "-c", str(self.conf), "-n", RGW_NAME]
        for key, value in options.items():
            args += [f"--{key}", value]
        _run(args)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._answers():
            if time.monotonic() > deadline:
                raise TestbedError(f"radosgw did not answer on {self.endpoint}; see {options['log_file']}")
            time.sleep(0.3)

    def _user(self) -> S3Access:
        """The S3 user, created once per cluster; its keys are read back from radosgw-admin either way."""
        admin = ["radosgw-admin", *self.admin]
        try:
            text = _run([*admin, "user", "info", "--uid", S3_UID])
        except TestbedError:
            text = _run([*admin, "user", "create", "--uid", S3_UID, "--display-name", "freezeframe test bed"])
        keys = json.loads(text)["keys"][0]
        access = S3Access(self.endpoint, str(keys["access_key"]), str(keys["secret_key"]))
        self.keys_file.write_text(json.dumps(asdict(access), indent=2))
        self.keys_file.chmod(0o600)
        return access
