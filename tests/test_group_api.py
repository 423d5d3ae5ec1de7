"""``/v1/groups`` and ``/v1/group-sets`` through the real app, service, wiring and catalog, over the scripted
multi-instance hypervisor (no libvirt): a group snapshot is a job whose result names the group set."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from freezeframe.api.app import ApiConfig, create_app
from freezeframe.api.jobs import JobRunner
from freezeframe.api.state import AppState
from freezeframe.config import Settings
from freezeframe.service import Freezeframe
from group_fakes import GroupHypervisor, ScriptedWiring


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, dict[str, str]]]]:
    settings = Settings.from_env(home=tmp_path / "home")
    hv = GroupHypervisor()
    for name in ("db", "app"):
        hv.add(name)
    state = AppState(settings, workers=1, shutdown_grace_s=5.0)
    real = state.service
    state.service = Freezeframe(settings, ScriptedWiring(settings, hv))
    state.runner = JobRunner(state.jobs, 1)
    app = create_app(ApiConfig(settings))
    app.state.ff = state
    tokens = {role: state.tokens.create(role, None if role == "admin" else "alpha").secret
              for role in ("admin", "member")}  # fmt: skip
    headers = {role: {"Authorization": f"Bearer {secret}"} for role, secret in tokens.items()}
    try:
        yield TestClient(app), headers
    finally:
        state.runner.shutdown(5.0)
        state.service.close()
        real.close()


def _finished(client: TestClient, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["state"] in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def test_groups_and_a_group_snapshot_job(client: tuple[TestClient, dict[str, dict[str, str]]]) -> None:
    http, headers = client
    admin = headers["admin"]
    made = http.post("/v1/groups", json={"name": "shop", "instances": ["db"]}, headers=admin)
    assert made.status_code == 201, made.text
    added = http.post("/v1/groups/shop/instances", json={"instances": ["app"]}, headers=admin)
    assert [i["name"] for i in added.json()["instances"]] == ["db", "app"]
    assert http.get("/v1/groups", headers=admin).json()[0]["name"] == "shop"
    accepted = http.post("/v1/groups/shop/snapshots", json={"consistency": "crash"}, headers=admin)
    assert accepted.status_code == 202 and accepted.headers["Location"].startswith("/v1/jobs/")
    job = _finished(http, admin, accepted.json()["id"])
    assert job["state"] == "succeeded", job
    group_set_id = job["result"]["group_set_id"]
    shown = http.get(f"/v1/group-sets/{group_set_id}", headers=admin).json()
    assert shown["status"] == "available" and sorted(s["instance"]["name"] for s in shown["sets"]) == ["app", "db"]
    assert {s["id"] for s in shown["sets"]} == set(job["result"]["set_ids"])
    assert http.delete(f"/v1/group-sets/{group_set_id}", headers=admin).status_code == 204
    assert http.get(f"/v1/group-sets/{group_set_id}", headers=admin).status_code == 404
    assert http.delete("/v1/groups/shop/instances/db", headers=admin).json()["instances"][0]["name"] == "app"
    assert http.delete("/v1/groups/shop", headers=admin).status_code == 204


def test_bad_bodies_and_non_admins_are_refused(client: tuple[TestClient, dict[str, dict[str, str]]]) -> None:
    http, headers = client
    assert http.get("/v1/groups", headers=headers["member"]).status_code == 403
    assert (
        http.post("/v1/groups", json={"name": "x", "instances": ["db"]}, headers=headers["member"]).status_code == 403
    )
    bad = http.post("/v1/groups", json={"name": "no spaces", "instances": []}, headers=headers["admin"])
    assert bad.status_code in (400, 422)
    unknown = http.post("/v1/groups", json={"name": "g", "instances": ["nosuch"]}, headers=headers["admin"])
    assert unknown.status_code == 404
    missing = http.post("/v1/groups/none/snapshots", json={}, headers=headers["admin"])
    assert missing.status_code == 404
