"""Verify, revert and delete as jobs of the embedded service (``serve`` without ``--multi-host``), through the same
job bodies (``api.set_jobs``) the agents run in a multi-host deployment (``test_hosts_offline.py``). A shut-off
domain with one 16 MiB disk on the machine's libvirt: no guest boots."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from freezeframe.adapters.service_store import TokenStore
from freezeframe.api.app import ApiConfig, create_app
from freezeframe.config import Settings
from hosts_helpers import define_offline, libvirt_connection


@pytest.fixture
def offline(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    settings = Settings.from_env(home=tmp_path / "home")
    with libvirt_connection(settings.libvirt_uri) as conn:
        domain = define_offline(conn, tmp_path)
        try:
            yield domain.name, tmp_path / f"{domain.name}.qcow2"
        finally:
            conn.lookupByName(domain.name).undefine()


def wait(client: TestClient, answer: Any, headers: dict[str, str]) -> dict[str, Any]:
    assert answer.status_code == 202, answer.text
    for _ in range(600):
        job: dict[str, Any] = client.get(f"/v1/jobs/{answer.json()['id']}", headers=headers).json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {answer.json()['id']} did not finish")


def holds(disk: Path, pattern: int) -> bool:
    """Whether the first MiB of the qcow2 ``disk`` is ``pattern`` throughout."""
    read = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-r", "-c", f"read -P {pattern} 0 1M", str(disk)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    answered = "read 1048576/1048576 bytes" in read.stdout or "verification failed" in read.stdout
    assert answered, read.stdout + read.stderr
    return read.returncode == 0 and "verification failed" not in read.stdout


def test_the_embedded_service_verifies_reverts_and_deletes_with_the_agents_job_bodies(
    offline: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FREEZEFRAME_CATALOG_URL", raising=False)
    name, disk = offline
    app = create_app(ApiConfig(Settings.from_env(home=tmp_path / "home")))
    with TestClient(app) as client:
        admin = {"Authorization": f"Bearer {TokenStore(app.state.ff.service.catalog).create('admin', None).secret}"}
        made = wait(client, client.post(f"/v1/instances/{name}/snapshots", json={}, headers=admin), admin)
        set_id = made["result"]["set_id"]
        # The disk changes after the snapshot; the revert must bring the snapshot's content (zeros) back.
        write = ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(disk)]
        subprocess.run(write, check=True, capture_output=True)
        assert holds(disk, 0x5A) and not holds(disk, 0)

        verified = wait(client, client.post(f"/v1/snapshot-sets/{set_id}/verify", json={}, headers=admin), admin)
        assert verified["state"] == "succeeded" and verified["result"]["ok"] is True, verified
        reverted = wait(client, client.post(f"/v1/snapshot-sets/{set_id}/revert", json={}, headers=admin), admin)
        assert reverted["state"] == "succeeded", reverted
        assert reverted["result"]["reverted"] == ["vda"] and reverted["result"]["safety_set_id"]
        assert holds(disk, 0)  # the written megabyte is gone again
        assert client.delete(f"/v1/snapshot-sets/{set_id}", headers=admin).status_code == 204
        assert client.get(f"/v1/snapshot-sets/{set_id}", headers=admin).status_code == 404
        safety = reverted["result"]["safety_set_id"]
        assert client.get(f"/v1/snapshot-sets/{safety}", headers=admin).json()["status"] == "available"
