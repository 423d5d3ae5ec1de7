"""The HTTP service against a real server process and a real running 3-disk guest (ledger workload).

One guest and one server for the module: snapshot over HTTP (job -> available set whose members carry the set
UUID), list/show with filters and pages, the createImage/createBackup aliases (rotation), restore as a new
instance, export to an OVA image and import it back, delete; then a service killed with SIGKILL inside a freeze
window: after a restart the guest is thawed, the interrupted job is failed and a finished one still succeeded.
"""

from __future__ import annotations

import contextlib
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from freezeframe.config import Settings
from freezeframe.errors import FreezeframeError
from freezeframe.service import Freezeframe
from freezeframe.testbed.api_server import ServerProcess, cli, issue_token, running_server
from freezeframe.testbed.guest import GuestImage
from freezeframe.testbed.instance import DiskRequest, TestInstance, destroy_and_undefine, running_instance
from freezeframe.testbed.ledger import check_ledger

pytestmark = pytest.mark.vm

MiB = 1 << 20
SET_UUID_KEY = "freezeframe.set_uuid"


@pytest.fixture(scope="module")
def guest(
    libvirt_conn: Any, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestInstance]:
    workdir = tmp_path_factory.mktemp("api-guest")
    disks = [DiskRequest(64 * MiB)] * 3
    with running_instance(libvirt_conn, disks=disks, workload="ledger", workdir=workdir, guest=guest_image) as inst:
        yield inst


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api-home")


@pytest.fixture(scope="module")
def server(home: Path, guest: TestInstance, guest_image: GuestImage) -> Iterator[ServerProcess]:
    assigned = cli(home, "project", "assign", guest.name, "alpha")
    assert assigned.returncode == 0, assigned.stderr
    # Imports may boot only kernels from known places; the test guest's kernel sits in the build cache.
    with running_server(home, env={"FREEZEFRAME_BOOT_DIRS": str(guest_image.kernel.parent)}) as srv:
        yield srv


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client(issue_token(server.home, "admin")) as client:
        yield client


@pytest.fixture(scope="module")
def member(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client(issue_token(server.home, "member", "alpha")) as client:
        yield client


def _accepted(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] in ("queued", "running")
    return job


def _succeeded(server: ServerProcess, client: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    done = server.wait_job(client, job["id"])
    assert done["state"] == "succeeded", (done["kind"], done["error"], server.log_tail())
    assert done["error"] is None and done["finished_at"] is not None
    return done


def _snapshot(server: ServerProcess, client: httpx.Client, instance: str, **body: Any) -> dict[str, Any]:
    job = _succeeded(server, client, _accepted(client.post(f"/v1/instances/{instance}/snapshots", json=body)))
    response = client.get(f"/v1/snapshot-sets/{job['result']['set_id']}")
    assert response.status_code == 200, response.text
    shown: dict[str, Any] = response.json()
    return shown


def _discard(home: Path, libvirt_conn: Any, name: str) -> None:
    """Remove an instance the API made (restore/import): its domain, disks and records."""
    with Freezeframe.open(Settings.from_env(home=home)) as ff, contextlib.suppress(FreezeframeError):
        ff.lifecycle.discard(name)
    destroy_and_undefine(libvirt_conn, name)


def test_snapshot_show_list_restore_export_import_delete(
    server: ServerProcess, admin: httpx.Client, member: httpx.Client, guest: TestInstance, libvirt_conn: Any
) -> None:
    # The member sees its project's guest, with disks but no host paths.
    listed = member.get("/v1/instances").json()
    assert [i["name"] for i in listed] == [guest.name]
    assert listed[0]["project"] == "alpha" and [d["target"] for d in listed[0]["disks"]] == ["vda", "vdb", "vdc"]
    assert all(d["source"] is None for d in listed[0]["disks"])

    # Snapshot over HTTP: a job, then an available set of all three disks, each member carrying the set UUID.
    shown = _snapshot(server, member, guest.name, name="api-first", metadata={"owner": "qa"})
    set_id = shown["id"]
    assert shown["status"] == "available" and shown["project"] == "alpha"
    assert shown["consistency"] == {"requested": "filesystem", "achieved": "filesystem", "reason": None}
    assert [m["target"] for m in shown["members"]] == ["vda", "vdb", "vdc"]
    for m in shown["members"]:
        assert m["metadata"][SET_UUID_KEY] == set_id
        assert m["path"] is None and len(m["sha256"]) == 64 and m["size"] == 64 * MiB
    assert shown["metadata"]["owner"] == "qa" and shown["metadata"]["freezeframe.project"] == "alpha"
    assert shown["hardware"]["vcpus"] >= 1 and [d["target"] for d in shown["hardware"]["disks"]] == [
        "vda",
        "vdb",
        "vdc",
    ]
    # The admin sees the member files: the captured disks pass the ledger check.
    paths = {m["target"]: Path(m["path"]) for m in admin.get(f"/v1/snapshot-sets/{set_id}").json()["members"]}
    verdict = check_ledger(paths["vdb"], paths["vdc"])
    assert verdict.ok, verdict.reason

    # One snapshot operation per instance: a second request gets 409 naming the running job.
    root_only_body = {"createImage": {"name": "root-only", "all_volumes": False}}
    first = _accepted(member.post(f"/v1/servers/{guest.name}/action", json=root_only_body))
    busy = member.post(f"/v1/instances/{guest.name}/snapshots", json={})
    assert busy.status_code == 409, busy.text
    assert busy.headers["content-type"] == "application/problem+json"
    assert busy.json()["job_id"] == first["id"]
    root_only = member.get(f"/v1/snapshot-sets/{_succeeded(server, member, first)['result']['set_id']}").json()
    assert [m["target"] for m in root_only["members"]] == ["vda"] and root_only["name"] == "root-only"
    everything = _succeeded(server, member, _accepted(member.post(
        f"/v1/servers/{guest.uuid}/action", json={"createImage": {"name": "all", "metadata": {"k": "v"}}}
    )))  # fmt: skip
    assert len(member.get(f"/v1/snapshot-sets/{everything['result']['set_id']}").json()["members"]) == 3

    # Filters and pages.
    page = member.get("/v1/snapshot-sets", params={"instance": guest.name, "limit": 2, "count": True}).json()
    assert page["total"] == 3 and len(page["items"]) == 2 and page["next_cursor"]
    rest = member.get(page["next"]).json()  # the next link keeps the filters and carries the cursor
    assert [s["id"] for s in rest["items"]] == [set_id] and rest["next_cursor"] is None and rest["next"] is None
    by_meta = member.get("/v1/snapshot-sets", params={"metadata": ["owner=qa"], "status": "available"}).json()
    assert [s["id"] for s in by_meta["items"]] == [set_id]
    assert member.get("/v1/snapshot-sets", params={"status": "failed"}).json()["items"] == []
    jobs = member.get("/v1/jobs", params={"kind": "snapshot"}).json()
    assert jobs["total"] == 3 and all(j["state"] == "succeeded" for j in jobs["items"])

    # Verify recomputes every member's checksum.
    verified = _succeeded(server, member, _accepted(member.post(f"/v1/snapshot-sets/{set_id}/verify", json={})))
    assert verified["result"]["ok"] is True and len(verified["result"]["checks"]) >= 3

    restored_name = f"{guest.name}-r"
    imported_name = f"{guest.name}-i"
    try:
        # Restore as a new instance: it lands in the set's project, its disks copy-on-write over the members.
        job = _succeeded(server, member, _accepted(
            member.post(f"/v1/snapshot-sets/{set_id}/restore", json={"name": restored_name})
        ))  # fmt: skip
        assert job["result"]["instance"]["name"] == restored_name and job["result"]["disks"] == ["vda", "vdb", "vdc"]
        restored = member.get(f"/v1/instances/{restored_name}").json()
        assert restored["project"] == "alpha" and restored["state"] == "shutoff"
        # Deleting the set now would pull the data from under the restored instance.
        refused = member.delete(f"/v1/snapshot-sets/{set_id}")
        assert refused.status_code == 409 and restored_name in refused.json()["detail"]

        # Export to an OVA image, download it, import it back as another instance.
        job = _succeeded(server, member, _accepted(member.post(f"/v1/snapshot-sets/{set_id}/export", json={})))
        image_id = job["result"]["image_id"]
        assert job["image_id"] == image_id
        image = member.get(f"/v1/images/{image_id}").json()
        assert image["status"] == "available" and image["set_id"] == set_id and image["size"] > 0
        assert [i["id"] for i in member.get("/v1/images").json()["items"]] == [image_id]
        with member.stream("GET", f"/v1/images/{image_id}/file") as download:
            assert download.status_code == 200
            head = next(download.iter_bytes(1 << 16))
        assert tarfile.TarInfo.frombuf(head[:512], "utf-8", "strict").name.endswith(".ovf")  # descriptor first
        job = _succeeded(server, member, _accepted(
            member.post(f"/v1/images/{image_id}/import", json={"name": imported_name})
        ))  # fmt: skip
        assert job["result"]["disks"] == ["vda", "vdb", "vdc"]
        assert member.get(f"/v1/instances/{imported_name}").json()["project"] == "alpha"
        assert member.delete(f"/v1/images/{image_id}").status_code == 204
        assert member.get(f"/v1/images/{image_id}").status_code == 404
    finally:
        _discard(server.home, libvirt_conn, restored_name)
        _discard(server.home, libvirt_conn, imported_name)

    # With the restored instance gone the set can be deleted, data and all.
    assert member.delete(f"/v1/snapshot-sets/{set_id}").status_code == 204
    assert member.get(f"/v1/snapshot-sets/{set_id}").status_code == 404
    assert not any(p.exists() for p in paths.values())


def test_create_backup_alias_rotates(server: ServerProcess, member: httpx.Client, guest: TestInstance) -> None:
    made = []
    for i in range(3):
        body = {"createBackup": {"name": f"nightly-{i}", "backup_type": "nightly", "rotation": 2}}
        job = _succeeded(server, member, _accepted(member.post(f"/v1/servers/{guest.name}/action", json=body)))
        assert job["kind"] == "backup"
        made.append(job["result"]["set_id"])
    assert job["result"]["rotated_out"] == [made[0]]
    kept = member.get("/v1/snapshot-sets", params={"backup_type": "nightly", "instance": guest.uuid}).json()
    assert [s["id"] for s in kept["items"]] == [made[2], made[1]]
    assert all(s["backup_type"] == "nightly" for s in kept["items"])
    assert member.get(f"/v1/snapshot-sets/{made[0]}").status_code == 404
    # The proposal's createBackup and the native call with backup_type + rotation are one operation.
    native = _snapshot(server, member, guest.name, backup_type="nightly", rotation=1)
    kept = member.get("/v1/snapshot-sets", params={"backup_type": "nightly"}).json()
    assert [s["id"] for s in kept["items"]] == [native["id"]]


def test_novaclient_create_image_of_the_running_guest_captures_every_disk_consistently(
    server: ServerProcess, member: httpx.Client, guest: TestInstance
) -> None:
    """The real python-novaclient, our token through keystoneauth, Nova's createImage at 2.96 on the running
    3-disk guest: the image is the set, with every disk, filesystem-consistent (qemu-ga froze them)."""
    nova_client = pytest.importorskip("novaclient.client", reason="python-novaclient is not installed (dev extras)")
    from keystoneauth1 import session, token_endpoint

    token = issue_token(server.home, "member", "alpha")
    auth = token_endpoint.Token(f"{server.url}/v2.1", token)
    nova = nova_client.Client("2.96", session=session.Session(auth=auth), endpoint_override=f"{server.url}/v2.1")
    assert nova.servers.get(guest.uuid).status == "ACTIVE"
    image_id = nova.servers.create_image(guest.uuid, "running guest ☕", metadata={"Image Type": "snapshot"})
    deadline = time.monotonic() + 300
    while (image := member.get(f"/v2/images/{image_id}").json())["status"] != "active":
        assert image["status"] in ("queued", "saving") and time.monotonic() < deadline, (image, server.log_tail())
        time.sleep(0.5)
    assert image["name"] == "running guest ☕" and image["Image Type"] == "snapshot"
    shown = member.get(f"/v1/snapshot-sets/{image_id}").json()
    assert [m["target"] for m in shown["members"]] == ["vda", "vdb", "vdc"]
    assert shown["consistency"]["achieved"] == "filesystem"


def test_rotation_after_a_remap_spares_the_old_projects_backups(
    server: ServerProcess, admin: httpx.Client, member: httpx.Client, guest: TestInstance
) -> None:
    """Issue 17, item 2: a new project's createBackup rotates its own backups only, and names no other set."""
    backup = {"backup_type": "weekly", "rotation": 5}
    alpha_sets = [_snapshot(server, member, guest.name, **backup)["id"] for _ in range(2)]
    assert admin.put(f"/v1/instances/{guest.name}/project", json={"project": "beta"}).status_code == 200
    try:
        with server.client(issue_token(server.home, "member", "beta")) as beta:
            results = []
            for i in range(2):
                body = {"createBackup": {"name": f"beta-{i}", "backup_type": "weekly", "rotation": 1}}
                results.append(
                    _succeeded(server, beta, _accepted(beta.post(f"/v1/servers/{guest.name}/action", json=body)))
                )
            assert results[0]["result"]["rotated_out"] == []
            assert results[1]["result"]["rotated_out"] == [results[0]["result"]["set_id"]]
            named = {i for r in results for i in [*r["result"]["rotated_out"], *r["result"]["kept_in_use"]]}
            assert not named & set(alpha_sets)
            listed = {s["id"] for s in beta.get("/v1/snapshot-sets", params={"limit": 500}).json()["items"]}
            assert listed == {results[1]["result"]["set_id"]}
        for set_id in alpha_sets:
            assert admin.get(f"/v1/snapshot-sets/{set_id}").json()["project"] == "alpha"
            assert member.get(f"/v1/snapshot-sets/{set_id}").status_code == 200
    finally:
        assert admin.put(f"/v1/instances/{guest.name}/project", json={"project": "alpha"}).status_code == 200


def _freeze_status(inst: TestInstance) -> str:
    status: str = inst.agent({"execute": "guest-fsfreeze-status"})["return"]
    return status


def test_restart_inside_the_freeze_window_is_repaired(guest: TestInstance, tmp_path: Path) -> None:
    home = tmp_path / "restart-home"
    token = issue_token(home, "admin")
    faulty = {"FREEZEFRAME_FAULT_HOLD_IN_WINDOW_S": "5", "FREEZEFRAME_FREEZE_CAP_S": "120"}
    with running_server(home, env=faulty) as first, first.client(token) as client:
        finished = _succeeded(first, client, _accepted(client.post(f"/v1/instances/{guest.name}/snapshots", json={})))
        cut = _accepted(client.post(f"/v1/instances/{guest.name}/snapshots", json={"name": "cut-short"}))
        deadline = time.monotonic() + 60
        while _freeze_status(guest) != "frozen":
            assert time.monotonic() < deadline, "the guest never froze"
            time.sleep(0.05)
        first.kill()
        assert _freeze_status(guest) == "frozen"  # the kill landed inside the window; nothing thawed it
    with running_server(home) as second, second.client(token) as client:
        # Start-up repair ran before the service answered.
        assert _freeze_status(guest) == "thawed"
        job = client.get(f"/v1/jobs/{cut['id']}").json()
        assert job["state"] == "failed", job
        assert job["error"]["title"] == "Interrupted" and "interrupted" in job["error"]["detail"]
        assert "/" not in job["error"]["detail"].replace("<path>", "")
        broken = client.get(f"/v1/snapshot-sets/{job['set_id']}").json()
        assert broken["status"] == "failed" and broken["members"] == []
        assert not (home / "repository" / job["set_id"]).exists()
        done = client.get(f"/v1/jobs/{finished['id']}").json()
        assert done["state"] == "succeeded" and done["result"]["set_id"] == finished["result"]["set_id"]
        assert client.get(f"/v1/snapshot-sets/{done['result']['set_id']}").json()["status"] == "available"
        # The instance is usable again at once.
        again = _succeeded(second, client, _accepted(client.post(f"/v1/instances/{guest.name}/snapshots", json={})))
        assert again["result"]["status"] == "available"
    before = guest.progress()
    guest.wait_for_progress(after=before, timeout_s=30)
