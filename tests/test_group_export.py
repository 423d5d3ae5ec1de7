"""A group set as one OVA: an OVF VirtualSystemCollection, one VirtualSystem per instance, and back.

Synthetic group sets (two sets of known patterns, different hardware, tagged with one group set) are exported,
validated against the DMTF schemas and imported with --as-prefix (domains defined, not booted). Hostile and
malformed collections are refused with a specific error and leave nothing; a collection given to a plain
single-instance import names --as-prefix.
"""

from __future__ import annotations

import json
import tarfile
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from freezeframe.adapters.ova import open_ova_collection, qemu_json_for
from freezeframe.adapters.ovf import (
    OvfDisk,
    build_collection_descriptor,
    parse_collection,
    validate_descriptor,
)
from freezeframe.api.app import ApiConfig, create_app
from freezeframe.api.jobs import JobRunner
from freezeframe.api.state import AppState
from freezeframe.config import Settings
from freezeframe.errors import (
    HypervisorError,
    InvalidRequest,
    OvaDiskError,
    OvfBuildError,
    OvfRejected,
    OvfUnsupported,
)
from freezeframe.group_model import GROUP_KEY, GROUP_SET_KEY, GroupMember, GroupSet
from freezeframe.model import Consistency, NicSpec, SetStatus, SnapshotSet
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import GuestImage
from portable_support import (
    PREFIX,
    XSD,
    MiB,
    Pt,
    assert_nothing_left,
    cli_app,
    ff,
    hostile_disk,
    kdmv_with_descriptor,
    manifest_of,
    pt,
    remove_everything,
    same_data,
    small_set,
    synthetic_hardware,
    synthetic_set,
    tar_of,
)

__all__ = ["ff", "pt"]  # fixtures


def group_set_of(ff: Freezeframe, guest: GuestImage) -> tuple[GroupSet, list[SnapshotSet]]:
    """Two instances with different hardware (db: 2 vCPU, 3 disks; app: 1 vCPU, 1 disk), one group set."""
    gs_id = str(uuid.uuid4())
    tags = {GROUP_SET_KEY: gs_id, GROUP_KEY: "shop"}
    hw = synthetic_hardware(guest)
    app_hw = replace(hw, vcpus=1, memory_kib=128 * 1024, disks=hw.disks[:1],
                     nics=(NicSpec("52:54:00:00:00:02", "e1000", "user", None),))  # fmt: skip
    db = synthetic_set(ff, hw, {"vda": 0x11, "sda": 0x22, "hdb": 0x33}, instance_name="db", metadata=tags)
    app = synthetic_set(ff, app_hw, {"vda": 0x44}, instance_name="app", metadata=tags)
    now = datetime.now(UTC)
    members = [GroupMember(s.instance_uuid, s.instance_name) for s in (db, app)]
    gs = GroupSet(gs_id, f"nightly-{gs_id[:6]}", "shop", Consistency.CRASH, SetStatus.AVAILABLE, now, members,
                  achieved=Consistency.CRASH, completed_at=now)  # fmt: skip
    ff.groups.groups.add_group_set(gs)
    return gs, [app, db]  # a group set lists its sets by instance name


def schema_valid(descriptor: bytes, ovf_version: int) -> None:
    if not XSD.is_dir():
        pytest.skip(f"DMTF OVF schemas not found at {XSD} (shared/ovf/xsd): the descriptor could not be validated")
    validate_descriptor(descriptor, ovf_version, XSD)


@pytest.mark.parametrize(("disk_format", "ovf_version"), [("qcow2", 1), ("vmdk", 2)])
def test_group_set_round_trip_through_one_collection_package(
    ff: Freezeframe, pt: Pt, guest_image: GuestImage, tmp_path: Path, disk_format: str, ovf_version: int
) -> None:
    gs, sets = group_set_of(ff, guest_image)
    out = tmp_path / "out" / "shop.ova"
    out.parent.mkdir()
    result = pt.export_group_set(gs.name, out, disk_format=disk_format, ovf_version=ovf_version)
    assert result.name == gs.name and [s.set_id for s in result.sets] == [s.id for s in sets]
    assert [len(s.disks) for s in result.sets] == [1, 3] and len(result.package.disks) == 4
    assert sorted(p.name for p in out.parent.iterdir()) == ["shop.ova"], "temporary files were left"
    assert out.stat().st_mode & 0o777 == 0o600
    with tarfile.open(out, "r:") as tf:
        names = tf.getnames()
    assert names[0].endswith(".ovf") and names[1].endswith(".mf") and len(names) == 6

    systems = open_ova_collection(out)
    schema_valid(systems[0].descriptor, ovf_version)
    assert b"<VirtualSystemCollection" in systems[0].descriptor or b":VirtualSystemCollection" in systems[0].descriptor
    assert [p.machine.name for p in systems] == ["app", "db"]
    for package, snapshot_set in zip(systems, sets, strict=True):
        assert len(package.disks) == len(snapshot_set.members)
        assert all(name in package.verified for name in (d.name for d in package.disks)), "disks not in the manifest"
        for disk, member in zip(package.disks, snapshot_set.members, strict=True):
            assert same_data(qemu_json_for(disk), member.path), f"{disk.name} differs from {member.target}"

    imported = pt.import_collection(out, f"{PREFIX}g-")
    assert [r.name for r in imported] == [f"{PREFIX}g-app", f"{PREFIX}g-db"]
    for r, snapshot_set in zip(imported, sets, strict=True):
        hw = snapshot_set.hardware
        assert r.origin == "freezeframe" and not r.started
        assert (r.vcpus, r.memory_kib, r.machine) == (hw.vcpus, hw.memory_kib, hw.machine)
        members = {m.target: m for m in snapshot_set.members}
        assert sorted(d.target for d in r.disks) == sorted(members)
        for d in r.disks:
            assert d.bus == members[d.target].bus
            assert same_data(d.path, members[d.target].path), f"{r.name} {d.target} lost its data"


def test_collection_descriptor_is_schema_valid_and_reads_back_per_system() -> None:
    a, b = small_set(), replace(small_set(), instance_name="h2")
    b = replace(b, hardware=replace(b.hardware, vcpus=3))
    for version in (1, 2):
        xml = build_collection_descriptor("pair", [
            (a, [OvfDisk("vda", "a.qcow2", 10, "qcow2", 64 * MiB, MiB)]),
            (b, [OvfDisk("vda", "b.qcow2", 20, "qcow2", 64 * MiB, MiB)]),
        ], version)  # fmt: skip
        schema_valid(xml, version)
        machines = parse_collection(xml)
        assert [(m.name, m.vcpus) for m in machines] == [("hostile", 1), ("h2", 3)]
        assert [[f.href for f in m.files] for m in machines] == [["a.qcow2"], ["b.qcow2"]]
        assert [[d.href for d in m.disks] for m in machines] == [["a.qcow2"], ["b.qcow2"]]
    with pytest.raises(OvfBuildError, match="same name"):
        build_collection_descriptor("x", [(a, []), (a, [])])


def _pair(tmp_path: Path, second: bytes, second_format: str = "qcow2", edit: Any = None) -> Path:
    """A collection package of two small sets; the second system's disk file is ``second``."""
    disk = hostile_disk(tmp_path)
    a, b = small_set(), replace(small_set(), instance_name="h2")
    xml = build_collection_descriptor("pair", [
        (a, [OvfDisk("vda", "a.qcow2", len(disk), "qcow2", 64 * MiB, MiB)]),
        (b, [OvfDisk("vda", f"b.{second_format}", len(second), second_format, 64 * MiB, MiB)]),
    ])  # fmt: skip
    if edit is not None:
        xml = edit(xml)
    files = {"pair.ovf": xml, "a.qcow2": disk, f"b.{second_format}": second}
    mf = manifest_of(files)
    return tar_of(tmp_path / "pair.ova", [("pair.ovf", xml), ("pair.mf", mf), *list(files.items())[1:]])


def test_a_hostile_disk_in_any_system_refuses_the_whole_collection(pt: Pt, tmp_path: Path) -> None:
    package = _pair(tmp_path, kdmv_with_descriptor('RW 128 FLAT "/etc/hostname" 0'), "vmdk")
    with pytest.raises(OvaDiskError):
        pt.import_collection(package, f"{PREFIX}h-")
    for name in ("hostile", "h2"):
        assert_nothing_left(pt, f"{PREFIX}h-{name}")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda x: x.replace(b'ovf:fileRef="file2"', b'ovf:fileRef="file1"'), "both use disk file"),
        (lambda x: x.replace(b'ovf:id="h2"', b'ovf:id="hostile"'), "share an id"),
        (lambda x: x.replace(b"<rasd:VirtualQuantity>1<", b"<rasd:VirtualQuantity>-1<", 1), "virtual system"),
    ],
)
def test_a_malformed_system_refuses_the_collection_with_a_specific_error(
    pt: Pt, tmp_path: Path, edit: Any, match: str
) -> None:
    package = _pair(tmp_path, hostile_disk(tmp_path), edit=edit)
    with pytest.raises(OvfRejected, match=match):
        pt.import_collection(package, f"{PREFIX}m-")
    for name in ("hostile", "h2"):
        assert_nothing_left(pt, f"{PREFIX}m-{name}")


def test_a_failed_system_removes_the_instances_already_made(
    ff: Freezeframe, pt: Pt, guest_image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gs, _ = group_set_of(ff, guest_image)
    out = pt.export_group_set(gs.id, tmp_path / "shop.ova").package.path
    importer = pt.importer
    build = importer._build
    calls: list[str] = []

    def second_fails(name: str, *args: Any) -> Any:
        calls.append(name)
        if len(calls) == 2:
            raise HypervisorError("defining the second instance failed")
        return build(name, *args)

    monkeypatch.setattr(importer, "_build", second_fails)
    with pytest.raises(HypervisorError, match="second instance"):
        pt.import_collection(out, f"{PREFIX}f-")
    assert calls == [f"{PREFIX}f-app", f"{PREFIX}f-db"]
    for name in calls:
        assert_nothing_left(pt, name)


def test_plain_import_of_a_collection_names_as_prefix(
    ff: Freezeframe, pt: Pt, guest_image: GuestImage, tmp_path: Path
) -> None:
    gs, _ = group_set_of(ff, guest_image)
    out = Path(pt.export_group_set(gs.name, tmp_path / "shop.ova").package.path)
    with pytest.raises(OvfUnsupported, match="--as-prefix"):
        pt.import_package(out, f"{PREFIX}plain")
    assert_nothing_left(pt, f"{PREFIX}plain")
    single = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 1})
    pt.export(single.id, tmp_path / "one.ova")
    with pytest.raises(OvfUnsupported, match="--as NAME"):
        pt.import_collection(tmp_path / "one.ova", f"{PREFIX}p-")


def test_the_commands_export_and_import_a_group_set(
    ff: Freezeframe, guest_image: GuestImage, tmp_path: Path, pt: Pt
) -> None:
    gs, _ = group_set_of(ff, guest_image)
    env = {"FREEZEFRAME_BOOT_DIRS": str(guest_image.kernel.parent)}
    home = ["--home", str(ff.settings.home)]
    runner = CliRunner()
    app = cli_app()
    out = tmp_path / "shop.ova"
    done = runner.invoke(app, ["export", gs.name, "-o", str(out), "--ovf-version", "2", *home])
    assert done.exit_code == 0, done.output
    assert f"group set {gs.name} exported" in done.output and "2 instances" in done.output
    stored = runner.invoke(app, ["export", gs.name, "--to-store", "--name", "shop-img", "--json", *home])
    assert stored.exit_code == 0, stored.output
    image = json.loads(stored.output)["image"]
    assert image["name"] == "shop-img" and image["summary"]["vcpus"] == 3  # db's 2 + app's 1
    plain = runner.invoke(app, ["import", str(out), "--as", f"{PREFIX}c", *home], env=env)
    assert isinstance(plain.exception, OvfUnsupported) and "--as-prefix" in str(plain.exception)
    neither = runner.invoke(app, ["import", str(out), *home], env=env)
    assert isinstance(neither.exception, InvalidRequest) and "--as-prefix P" in str(neither.exception)
    made = runner.invoke(app, ["import", str(out), "--as-prefix", f"{PREFIX}c-", "--json", *home], env=env)
    assert made.exit_code == 0, made.output
    assert [r["name"] for r in json.loads(made.output)] == [f"{PREFIX}c-app", f"{PREFIX}c-db"]


def test_the_rest_api_exports_a_group_set_as_one_stored_image(guest_image: GuestImage, tmp_path: Path) -> None:
    settings = Settings.from_env(home=tmp_path / "home")
    state = AppState(settings, workers=1, shutdown_grace_s=5.0)
    state.runner = JobRunner(state.jobs, 1)
    app = create_app(ApiConfig(settings))
    app.state.ff = state
    admin = {"Authorization": f"Bearer {state.tokens.create('admin', None).secret}"}
    member = {"Authorization": f"Bearer {state.tokens.create('member', 'alpha').secret}"}
    pt = Pt(state.service, [guest_image.kernel.parent])
    try:
        gs, sets = group_set_of(state.service, guest_image)
        http = TestClient(app)
        url = f"/v1/group-sets/{gs.id}/export"
        assert http.post(url, json={"ovf_version": 2}, headers=member).status_code == 403
        accepted = http.post(url, json={"ovf_version": 2, "name": "shop-image"}, headers=admin)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        deadline = time.monotonic() + 120
        while (job := http.get(f"/v1/jobs/{job_id}", headers=admin).json())["state"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert job["state"] == "succeeded", job
        assert job["result"]["set_ids"] == [s.id for s in sets]
        image_id = job["result"]["image_id"]
        shown = http.get(f"/v1/images/{image_id}", headers=admin)
        assert shown.status_code == 200 and shown.json()["name"] == "shop-image"
        assert http.get(f"/v1/images/{image_id}", headers=member).status_code == 404, "admin's image leaked"
        imported = pt.import_collection(image_id, f"{PREFIX}api-")
        assert [r.name for r in imported] == [f"{PREFIX}api-app", f"{PREFIX}api-db"]
        assert all(r.image_id == image_id for r in imported)
    finally:
        remove_everything(pt)
        state.runner.shutdown(5.0)
        state.service.close()
