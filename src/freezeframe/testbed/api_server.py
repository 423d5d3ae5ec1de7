"""A real ``freezeframe serve`` in a subprocess on a free loopback port, for tests and the load benchmark.

A subprocess (not a thread) so that a test can SIGKILL it in the middle of a job and start another on the
same home, which is exactly what a crash of the service looks like.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from freezeframe.adapters.service_store import TokenStore
from freezeframe.config import Settings
from freezeframe.service import Freezeframe


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def issue_token(home: Path, role: str, project: str | None = None) -> str:
    """A bearer token written straight into the home's catalog (what `freezeframe token create` does)."""
    with Freezeframe.open(Settings.from_env(home=home)) as service:
        return TokenStore(service.catalog).create(role, project).secret


def cli(home: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``freezeframe`` with the service commands, as a subprocess on ``home``."""
    env = {**os.environ, "FREEZEFRAME_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "freezeframe.cli", *args],
        env=env, capture_output=True, text=True, check=False, timeout=timeout,
    )  # fmt: skip


@dataclass
class ServerProcess:
    home: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, token: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_job(self, client: httpx.Client, job_id: str, timeout_s: float = 300.0) -> dict[str, Any]:
        """Poll until the job is finished; return its last view."""
        deadline = time.monotonic() + timeout_s
        while True:
            response = client.get(f"/v1/jobs/{job_id}")
            response.raise_for_status()
            job: dict[str, Any] = response.json()
            if job["state"] in ("succeeded", "failed"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout_s:.0f}s: {job}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no cleanup; what a crash looks like."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 90.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()


@contextlib.contextmanager
def running_server(
    home: Path,
    *,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    startup_timeout_s: float = 120.0,
) -> Iterator[ServerProcess]:
    """Start ``serve`` on a free port, wait for /healthz (start-up repair included), always stop it."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = home / f"server-{port}.log"
    full_env = {**os.environ, "FREEZEFRAME_HOME": str(home), **(env or {})}
    argv = [sys.executable, "-m", "freezeframe.cli", "serve", "--port", str(port), "--log-level", "warning"]
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [*argv, *args], env=full_env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            start_new_session=True,
        )  # fmt: skip
    server = ServerProcess(home, port, proc, log_path)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"freezeframe serve exited with {proc.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"freezeframe serve did not answer in {startup_timeout_s:.0f}s:\n{server.log_tail()}"
                )
            time.sleep(0.1)
        yield server
    finally:
        server.stop()
