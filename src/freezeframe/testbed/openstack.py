"""A real Keystone and Glance from Debian's packages, and a ``freezeframe serve`` registered as ``compute``.

``up`` is idempotent: a running test bed is left as it is (a ``serve`` on another data home is restarted on the
current one); a stopped one is restarted on its data; a missing one is made: ``keystone-manage`` db_sync, fernet
and credential keys and ``glance-manage db_sync`` at once, then bootstrap; a domain, two projects, users with the
admin/member/reader roles, service users for Glance and freezeframe; the ``image`` and ``compute`` services.
Keystone runs under Debian's uwsgi (one process, one thread: SQLite), Glance as its own ``glance-api`` (eventlet),
both on 127.0.0.1. State in ``$FREEZEFRAME_OPENSTACK_TESTBED_DIR`` (default ``/var/tmp/freezeframe-openstack``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from freezeframe.cloud_settings import CloudSettings
from freezeframe.testbed.api_server import free_port
from freezeframe.testbed.instance import TestbedError
from freezeframe.testbed.openstack_conf import (
    DOMAIN,
    MEMBER_CLOUD,
    OTHER_PROJECT,
    PROJECT,
    REGION,
    USERS,
    clouds_yaml,
    glance_conf,
    keystone_conf,
)
from freezeframe.testbed.openstack_identity import bootstrap_identity

STATE_ENV = "FREEZEFRAME_OPENSTACK_TESTBED_DIR"
DEFAULT_STATE = Path("/var/tmp/freezeframe-openstack")
_TIMEOUT_S = 180.0
DAEMONS = ("keystone", "glance", "serve")


@dataclass(frozen=True)
class CloudInfo:
    state_dir: str
    auth_url: str
    glance_url: str
    serve_url: str
    compute_url: str
    clouds_yaml: str
    env_file: str
    """``export FREEZEFRAME_KEYSTONE_…`` lines (the serve's service user) for CLI commands that talk to the cloud."""
    cloud: str
    clouds: dict[str, str]
    """cloud name -> its role (``ff-other`` is a member of another project)."""
    project: str
    project_id: str
    other_project: str
    other_project_id: str
    domain: str
    home: str


def state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE)


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = _TIMEOUT_S) -> None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    except FileNotFoundError as exc:
        raise TestbedError(
            f"{args[0]} not found: run scripts/setup-host.sh (it installs keystone and glance-api)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"{' '.join(args[:3])} did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise TestbedError(f"{' '.join(args[:3])} failed: {(done.stderr or done.stdout).strip()[-800:]}")


def _run_together(*commands: list[str]) -> None:
    """Independent set-up steps at once: each is a Python start-up of seconds."""
    with ThreadPoolExecutor(len(commands)) as pool:
        for future in [pool.submit(_run, command) for command in commands]:
            future.result()


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5.0).status_code < 500
    except httpx.HTTPError:
        return False


class OpenStackTestbed:
    def __init__(self, state: Path | None = None) -> None:
        self.state = state or state_dir()
        self.record_path = self.state / "state.json"

    # ---- the record of what was made -------------------------------------------------------------------

    def _record(self) -> dict[str, Any]:
        try:
            loaded: dict[str, Any] = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return {}
        return loaded

    def _save(self, record: dict[str, Any]) -> None:
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.chmod(0o600)
        tmp.replace(self.record_path)

    def _pid(self, name: str) -> int | None:
        try:
            return int((self.state / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    # ---- up / down / status ----------------------------------------------------------------------------

    def up(self, home: Path) -> CloudInfo:
        record = self._record()
        if not record.get("bootstrapped"):
            self._stop_all()
            shutil.rmtree(self.state, ignore_errors=True)
            record = self._create()
        else:
            self._start_keystone(record)
            self._start_glance(record)
        self._start_serve(record, home)
        clouds = self.state / "clouds.yaml"
        clouds.write_text(clouds_yaml(record["auth_url"], record["passwords"]))
        clouds.chmod(0o600)
        env_file = self.state / "freezeframe.env"
        env_file.write_text("".join(f"export {k}={v}\n" for k, v in self.settings().env().items()))
        env_file.chmod(0o600)
        return self._info(record)

    def down(self) -> None:
        self._stop_all()
        shutil.rmtree(self.state, ignore_errors=True)

    def stop_serve(self) -> None:
        """Stop only the ``freezeframe serve`` (its data home may be going away); Keystone and Glance stay."""
        self._stop("serve")

    def status(self) -> dict[str, Any]:
        record = self._record()
        daemons = {name: _alive(self._pid(name)) for name in DAEMONS}
        healthy = (
            bool(record.get("bootstrapped"))
            and all(daemons.values())
            and all(_answers(record[key]) for key in ("auth_url", "glance_url", "serve_url"))
        )
        return {"state_dir": str(self.state), "daemons": daemons, "healthy": healthy,
                "serve_home": record.get("serve_home")}  # fmt: skip

    def settings(self) -> CloudSettings:
        """What the test bed's ``serve`` is given: Keystone, its service user, Glance."""
        record = self._record()
        if not record.get("bootstrapped"):
            raise TestbedError(f"no OpenStack test bed in {self.state}: run `freezeframe testbed openstack up`")
        return _serve_settings(record)

    # ---- making it -----------------------------------------------------------------------------------------

    def _create(self) -> dict[str, Any]:
        for sub in ("fernet-keys", "credential-keys", "images", "staging", "tasks", "locks"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        self.state.chmod(0o700)
        ports = {"keystone": free_port(), "glance": free_port(), "serve": free_port()}
        names = ["admin", "glance", "freezeframe", *(u.cloud for u in USERS)]
        record: dict[str, Any] = {
            "ports": ports,
            "auth_url": f"http://127.0.0.1:{ports['keystone']}/v3",
            "glance_url": f"http://127.0.0.1:{ports['glance']}",
            "serve_url": f"http://127.0.0.1:{ports['serve']}",
            "passwords": {name: secrets.token_urlsafe(18) for name in names},
        }
        (self.state / "keystone.conf").write_text(keystone_conf(self.state))
        (self.state / "glance-api.conf").write_text(
            glance_conf(self.state, ports["glance"], record["auth_url"], record["passwords"]["glance"])
        )
        conf = ["--config-file", str(self.state / "keystone.conf")]
        owner = ["--keystone-user", "root", "--keystone-group", "root"]
        _run_together(
            ["keystone-manage", *conf, "db_sync"],
            ["keystone-manage", *conf, "fernet_setup", *owner],
            ["keystone-manage", *conf, "credential_setup", *owner],
            ["glance-manage", "--config-file", str(self.state / "glance-api.conf"), "db_sync"],
        )
        url = record["auth_url"]
        _run(["keystone-manage", *conf, "bootstrap", "--bootstrap-password", record["passwords"]["admin"],
              "--bootstrap-admin-url", url, "--bootstrap-public-url", url, "--bootstrap-internal-url", url,
              "--bootstrap-region-id", REGION])  # fmt: skip
        self._start_keystone(record)
        record["projects"] = bootstrap_identity(record)
        self._start_glance(record)
        record["bootstrapped"] = True
        self._save(record)
        return record

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.state / f"{name}.log").open("ab")
        try:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True, cwd=self.state)  # fmt: skip
        finally:
            log.close()
        (self.state / f"{name}.pid").write_text(str(proc.pid))

    def _wait(self, name: str, url: str) -> None:
        deadline = time.monotonic() + _TIMEOUT_S
        while time.monotonic() < deadline:
            if _answers(url):
                return
            if not _alive(self._pid(name)):
                break
            time.sleep(0.5)
        tail = "\n".join((self.state / f"{name}.log").read_text(errors="replace").splitlines()[-15:])
        raise TestbedError(f"{name} did not answer at {url}:\n{tail}")

    def _start_keystone(self, record: dict[str, Any]) -> None:
        if _alive(self._pid("keystone")) and _answers(record["auth_url"]):
            return
        self._stop("keystone")
        env = {**os.environ, "OS_KEYSTONE_CONFIG_FILES": str(self.state / "keystone.conf")}
        self._spawn("keystone", [
            "uwsgi", "--plugin", "python3", "--http-socket", f"127.0.0.1:{record['ports']['keystone']}",
            "--wsgi-file", "/usr/bin/keystone-wsgi-public", "--master", "--processes", "1", "--threads", "1",
            "--die-on-term", "--buffer-size", "65535", "--add-header", "Connection: close",
        ], env)  # fmt: skip
        self._wait("keystone", record["auth_url"])

    def _start_glance(self, record: dict[str, Any]) -> None:
        if _alive(self._pid("glance")) and _answers(record["glance_url"]):
            return
        self._stop("glance")
        self._spawn("glance", ["glance-api", "--config-file", str(self.state / "glance-api.conf")])
        self._wait("glance", record["glance_url"])

    def _start_serve(self, record: dict[str, Any], home: Path) -> None:
        if _alive(self._pid("serve")) and record.get("serve_home") == str(home) and _answers(record["serve_url"]):
            return
        self._stop("serve")
        env = {**os.environ, **_serve_settings(record).env(), "FREEZEFRAME_HOME": str(home)}
        port = str(record["ports"]["serve"])
        self._spawn("serve", [sys.executable, "-m", "freezeframe.cli", "serve", "--port", port], env)
        self._wait("serve", record["serve_url"] + "/healthz")
        record["serve_home"] = str(home)
        self._save(record)

    def _stop(self, name: str) -> None:
        pid = self._pid(name)
        if _alive(pid):
            assert pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.2)
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
            _reap(pid)
        (self.state / f"{name}.pid").unlink(missing_ok=True)

    def _stop_all(self) -> None:
        for name in reversed(DAEMONS):
            self._stop(name)

    def _info(self, record: dict[str, Any]) -> CloudInfo:
        projects = record["projects"]
        return CloudInfo(
            state_dir=str(self.state), auth_url=record["auth_url"], glance_url=record["glance_url"],
            serve_url=record["serve_url"], compute_url=record["serve_url"] + "/v2.1",
            clouds_yaml=str(self.state / "clouds.yaml"), env_file=str(self.state / "freezeframe.env"),
            cloud=MEMBER_CLOUD,
            clouds={u.cloud: u.role for u in USERS}, project=PROJECT, project_id=projects[PROJECT],
            other_project=OTHER_PROJECT, other_project_id=projects[OTHER_PROJECT], domain=DOMAIN,
            home=record.get("serve_home", ""),
        )  # fmt: skip


def _serve_settings(record: dict[str, Any]) -> CloudSettings:
    return CloudSettings(
        auth_url=record["auth_url"], username="freezeframe", password=record["passwords"]["freezeframe"],
        region_name=REGION, glance=record["glance_url"],
    )  # fmt: skip


def _reap(pid: int) -> None:
    """Collect our own child (a daemon this process started), so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def info_dict(info: CloudInfo) -> dict[str, Any]:
    return asdict(info)
