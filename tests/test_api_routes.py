"""The HTTP layer over a scripted service: routes translate requests into service calls and results into JSON.

No libvirt, no guest: the app's state holds a real catalog, job store and tokens, and a scripted façade in place
of ``Freezeframe`` (its instance lookups, busy check, snapshot and ``lifecycle.backup`` as the contract states
them). The backup-rotation rule of issue 17 (item 2) is proven end to end through the API here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.api.app import ApiConfig, create_app
from freezeframe.api.jobs import JobRunner
from freezeframe.api.projects import ProjectResolver
from freezeframe.api.state import AppState
from freezeframe.config import Settings
from freezeframe.errors import InstanceBusy, InstanceNotFound
from freezeframe.flow import SnapshotRequest
from freezeframe.model import (
    Consistency,
    DiskSpec,
    Hardware,
    Instance,
    InstanceState,
    Member,
    SetStatus,
    SnapshotSet,
)
from freezeframe.ops.compute import Visible

VM = Instance(
    "vm1",
    str(uuid.uuid4()),
    InstanceState.RUNNING,
    Hardware(
        vcpus=1,
        memory_kib=65536,
        arch="x86_64",
        machine=None,
        disks=(
            DiskSpec("vda", "virtio", "/img/vda.qcow2", "qcow2", 1 << 20, boot_order=1),
            DiskSpec("vdb", "virtio", "/img/vdb.qcow2", "qcow2", 1 << 20),
        ),
    ),
)


def _record(catalog: SqlCatalog, request: SnapshotRequest, backup_type: str | None = None) -> SnapshotSet:
    set_id = request.set_id or str(uuid.uuid4())
    now = datetime.now(UTC)
    made = SnapshotSet(
        id=set_id,
        name=request.name or f"vm1-{set_id[:8]}",
        instance_name=VM.name,
        instance_uuid=VM.uuid,
        requested=request.consistency,
        status=SetStatus.AVAILABLE,
        created_at=now,
        completed_at=now,
        hardware=VM.hardware,
        achieved=Consistency.CRASH,
        members=[
            Member(set_id, d.target, d.bus, d.boot_order, d.virtual_size, "qcow2", f"/repo/{set_id}/{d.target}.qcow2")
            for d in VM.hardware.disks
            if d.target not in request.exclude_disks
        ],
        metadata=dict(request.metadata),
        backup_type=backup_type or request.backup_type,
    )
    catalog.add_set(made)
    return made


@dataclass(frozen=True)
class Backup:
    snapshot_set: SnapshotSet
    rotated_out: list[str]
    kept_in_use: dict[str, str]


@dataclass
class ScriptedLifecycle:
    catalog: SqlCatalog
    calls: list[dict[str, Any]] = field(default_factory=list)

    def backup(self, instance: str, backup_type: str, rotation: int, **kw: Any) -> Backup:
        """The contract: capture under ``set_id``, then keep the newest ``rotation`` of the visible sets."""
        self.calls.append({"instance": instance, "backup_type": backup_type, "rotation": rotation, **kw})
        request = SnapshotRequest(instance, metadata=kw["metadata"], name=kw["name"], set_id=kw["set_id"])
        made = _record(self.catalog, request, backup_type)
        visible: Visible = kw["visible"]
        sets = self.catalog.list_sets(instance=instance, status=SetStatus.AVAILABLE, backup_type=backup_type)
        rotated = [s.id for s in [s for s in sets if visible(s)][rotation:]]
        for set_id in rotated:
            self.catalog.delete_set(set_id)
        return Backup(made, rotated, {})


@dataclass
class ScriptedService:
    """The façade's surface the API uses, over a real catalog."""

    catalog: SqlCatalog
    lifecycle: ScriptedLifecycle
    busy: set[str] = field(default_factory=set)
    requests: list[SnapshotRequest] = field(default_factory=list)

    def instance(self, ref: str) -> Instance:
        if ref in (VM.name, VM.uuid):
            return VM
        raise InstanceNotFound(f"no instance {ref!r}")

    def instances(self) -> list[Instance]:
        return [VM]

    def check_not_busy(self, instance_uuid: str) -> None:
        if instance_uuid in self.busy:
            raise InstanceBusy(f"another freezeframe operation on instance {instance_uuid} is in progress")

    def snapshot(self, request: SnapshotRequest, progress: Any = None) -> SnapshotSet:
        self.requests.append(request)
        if progress is not None:
            progress(1, 2)
        return _record(self.catalog, request)


@dataclass
class Api:
    client: TestClient
    state: AppState
    service: ScriptedService
    tokens: dict[str, str]

    def as_(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def job(self, response: httpx.Response, who: str) -> dict[str, Any]:
        assert response.status_code == 202, response.text
        deadline = time.monotonic() + 30
        while True:
            job: dict[str, Any] = self.client.get(f"/v1/jobs/{response.json()['id']}", headers=self.as_(who)).json()
            if job["state"] in ("succeeded", "failed"):
                assert job["state"] == "succeeded", job
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.02)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    settings = Settings.from_env(home=tmp_path / "home")
    state = AppState(settings, workers=1, shutdown_grace_s=5.0)
    real = state.service
    service = ScriptedService(real.catalog, ScriptedLifecycle(real.catalog))
    state.service = service  # type: ignore[assignment]
    state.resolver = ProjectResolver(service, state.projects)
    state.runner = JobRunner(state.jobs, 1)
    app = create_app(ApiConfig(settings))
    app.state.ff = state
    tokens = {
        "admin": state.tokens.create("admin", None).secret,
        "alpha": state.tokens.create("member", "alpha").secret,
        "beta": state.tokens.create("member", "beta").secret,
    }
    state.projects.assign(VM.uuid, VM.name, "alpha")
    try:
        yield Api(TestClient(app), state, service, tokens)
    finally:
        state.runner.shutdown(5.0)
        real.close()


def test_rotation_after_a_remap_spares_and_hides_the_old_projects_backups(api: Api) -> None:
    alpha_sets = []
    for _ in range(2):
        body = {"backup_type": "weekly", "rotation": 5}
        job = api.job(
            api.client.post(f"/v1/instances/{VM.name}/snapshots", json=body, headers=api.as_("alpha")), "alpha"
        )
        alpha_sets.append(job["result"]["set_id"])
    moved = api.client.put(f"/v1/instances/{VM.name}/project", json={"project": "beta"}, headers=api.as_("admin"))
    assert moved.status_code == 200

    beta_jobs = []
    for i in range(2):
        body = {"createBackup": {"name": f"beta-{i}", "backup_type": "weekly", "rotation": 1}}
        response = api.client.post(f"/v1/servers/{VM.name}/action", json=body, headers=api.as_("beta"))
        beta_jobs.append(api.job(response, "beta"))
    first, second = (j["result"] for j in beta_jobs)
    assert first["rotated_out"] == [] and second["rotated_out"] == [first["set_id"]]
    assert not set(alpha_sets) & {*first["rotated_out"], *second["rotated_out"], *second["kept_in_use"]}
    assert [s.id for s in api.service.catalog.load_sets(alpha_sets)] == alpha_sets  # nothing of alpha's deleted
    listed = api.client.get("/v1/snapshot-sets", headers=api.as_("beta")).json()
    assert [s["id"] for s in listed["items"]] == [second["set_id"]]
    assert all(api.client.get(f"/v1/snapshot-sets/{i}", headers=api.as_("beta")).status_code == 404 for i in alpha_sets)
    # The job knew its set id before the capture started (no polling of the journal), and the call got it.
    for job in beta_jobs:
        assert job["set_id"] == job["result"]["set_id"]
    assert [c["set_id"] for c in api.service.lifecycle.calls[-2:]] == [j["set_id"] for j in beta_jobs]


def test_create_image_without_all_volumes_snapshots_the_root_disk(api: Api) -> None:
    body = {"createImage": {"name": "root-only", "all_volumes": False}}
    job = api.job(api.client.post(f"/v1/servers/{VM.uuid}/action", json=body, headers=api.as_("alpha")), "alpha")
    request = api.service.requests[-1]
    assert request.exclude_disks == ("vdb",) and request.set_id == job["set_id"] == job["result"]["set_id"]
    assert request.metadata["freezeframe.project"] == "alpha" and request.metadata["freezeframe.job_id"] == job["id"]
    shown = api.client.get(f"/v1/snapshot-sets/{job['set_id']}", headers=api.as_("alpha")).json()
    assert [m["target"] for m in shown["members"]] == ["vda"] and shown["members"][0]["path"] is None
    assert shown["project"] == "alpha" and shown["hardware"]["disks"][0]["source"] is None
    admin_view = api.client.get(f"/v1/snapshot-sets/{job['set_id']}", headers=api.as_("admin")).json()
    assert admin_view["members"][0]["path"].endswith("vda.qcow2")


def test_refusals_happen_before_a_job_is_queued(api: Api) -> None:
    post = api.client.post
    unknown = post(f"/v1/instances/{VM.name}/snapshots", json={"exclude_disks": ["vdz"]}, headers=api.as_("alpha"))
    assert unknown.status_code == 400 and "vdz" in unknown.json()["detail"]
    mixed = {"backup_type": "daily", "rotation": 1, "exclude_disks": ["vdb"]}
    refused = post(f"/v1/instances/{VM.name}/snapshots", json=mixed, headers=api.as_("alpha"))
    assert refused.status_code == 400 and "exclude_disks" in refused.json()["detail"]
    api.service.busy.add(VM.uuid)
    busy = post(f"/v1/instances/{VM.name}/snapshots", json={}, headers=api.as_("alpha"))
    assert busy.status_code == 409 and busy.json()["type"].endswith("/busy")
    assert api.client.get("/v1/jobs", headers=api.as_("admin")).json()["total"] == 0
    taken = post(f"/v1/snapshot-sets/{uuid.uuid4()}/restore", json={"name": VM.name}, headers=api.as_("alpha"))
    assert taken.status_code == 404  # an unknown set first; a taken name is checked on a visible set


def test_instances_come_from_the_service(api: Api) -> None:
    listed = api.client.get("/v1/instances", headers=api.as_("alpha")).json()
    assert [(i["name"], i["project"]) for i in listed] == [(VM.name, "alpha")]
    assert all(d["source"] is None for d in listed[0]["disks"])
    assert api.client.get("/v1/instances", headers=api.as_("beta")).json() == []
    assert api.client.get(f"/v1/instances/{VM.name}", headers=api.as_("beta")).status_code == 404
