"""The HTTP layer's rules without a server or a guest: the error table, the one serialisation of a set, the
Nova-style request semantics (``ops/compute.py``), rotation limited to the caller's sets, token scopes, the
input rules shared with the CLI, and no CDN-loaded docs page."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import text

from freezeframe import errors
from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.service_store import ProjectAssignment, TokenStore
from freezeframe.api.access import Principal
from freezeframe.api.app import ApiConfig, create_app
from freezeframe.api.problems import classify, describe
from freezeframe.api.projects import PROJECT_KEY, ProjectResolver
from freezeframe.api.schemas import CreateBackup, SnapshotCreate
from freezeframe.config import Settings
from freezeframe.errors import (
    CatalogError,
    HypervisorError,
    InsufficientSpace,
    InvalidRequest,
    OvaNoSpace,
    OvaUnsafeDisk,
    OvfSchemaError,
    RecordInvalid,
    SetNotFound,
)
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
from freezeframe.ops.compute import Order, check_order, image_exclusions, root_disk, take
from freezeframe.serialize import set_from_dict, set_to_dict

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SRC = Path(__file__).resolve().parents[1] / "src"


# ---- the error table ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "exit_code", "status", "slug"),
    [
        (errors.FreezeframeError, 1, 500, "operation-failed"),
        (errors.SetNotFound, 2, 404, "not-found"),
        (errors.InvalidRequest, 3, 400, "invalid-request"),
        (errors.InstanceBusy, 4, 409, "busy"),
        (errors.InsufficientSpace, 5, 409, "preflight-failed"),
        (errors.ConsistencyUnavailable, 6, 409, "consistency-unavailable"),
        (errors.FreezeWindowExceeded, 7, 500, "capture-failed"),
        (errors.AgentUnavailable, 8, 502, "hypervisor-error"),
        (errors.CatalogError, 9, 503, "catalog-unavailable"),
        (errors.VerifyFailed, 10, 500, "verify-failed"),
        (OvfSchemaError, 3, 400, "invalid-request"),
        (OvaUnsafeDisk, 3, 400, "invalid-request"),
        (OvaNoSpace, InsufficientSpace.exit_code, 409, "preflight-failed"),
        (errors.SetHasDependants, 3, 400, "invalid-request"),
        (RecordInvalid, 3, 400, "invalid-request"),
    ],
)
def test_every_class_reads_its_row(cls: type[errors.FreezeframeError], exit_code: int, status: int, slug: str) -> None:
    assert (cls.exit_code, cls.http_status, cls.slug) == (exit_code, status, slug)
    assert describe(slug) == (status, cls.title)


def test_table_covers_every_class_and_slugs_mean_one_thing() -> None:
    table = errors.table()
    assert OvaNoSpace in table and errors.TokenNotFound in table
    by_slug: dict[str, tuple[int, str, bool]] = {}
    for row in table.values():
        seen = by_slug.setdefault(row.slug, (row.http_status, row.title, row.public))
        assert seen == (row.http_status, row.title, row.public), row.slug


def test_classify_shows_public_details_redacted_and_hides_the_rest() -> None:
    shown = classify(SetNotFound("no set at /var/lib/freezeframe/repo/x"), "e1")
    assert (shown.status, shown.slug) == (404, "not-found") and "<path>" in shown.detail and "/var" not in shown.detail
    for exc, status in ((HypervisorError("qemu:///system said no"), 502), (CatalogError("db /x locked"), 503)):
        hidden = classify(exc, "abc123")
        assert hidden.status == status and "abc123" in hidden.detail and "qemu" not in hidden.detail
        assert "/x" not in hidden.detail
    unknown = classify(RuntimeError("secret"), "e2")
    assert (unknown.status, unknown.slug) == (500, "internal-error") and "secret" not in unknown.detail


# ---- one serialisation --------------------------------------------------------------------------------------


def _hardware(*disks: DiskSpec) -> Hardware:
    return Hardware(vcpus=1, memory_kib=65536, arch="x86_64", machine=None, disks=disks)


def _disk(target: str, boot_order: int | None = None, device: str = "disk") -> DiskSpec:
    return DiskSpec(target, "virtio", f"/img/{target}.qcow2", "qcow2", 1 << 20, device=device, boot_order=boot_order)


def _set(instance_uuid: str = "u-1", metadata: dict[str, str] | None = None, **kw: Any) -> SnapshotSet:
    sid = str(uuid.uuid4())
    return SnapshotSet(
        id=sid,
        name=kw.pop("name", "s"),
        instance_name="vm",
        instance_uuid=instance_uuid,
        requested=Consistency.FILESYSTEM,
        status=SetStatus.AVAILABLE,
        created_at=T0,
        hardware=_hardware(_disk("vda", 1)),
        achieved=Consistency.CRASH,
        completed_at=T0,
        members=[Member(sid, "vda", "virtio", 1, 1 << 20, "qcow2", f"/repo/{sid}/vda.qcow2", metadata={"a": "b"})],
        metadata=dict(metadata or {}),
        instance_state=InstanceState.RUNNING,
        **kw,
    )


def test_set_round_trips_through_json() -> None:
    s = _set(backup_type="daily", freeze_window_ms=3.5)
    assert set_from_dict(json.loads(json.dumps(set_to_dict(s)))) == s


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("status",), "bogus", "status"),
        (("consistency", "requested"), "perfect", "requested consistency"),
        (("created_at",), "yesterday", "created_at"),
        (("members",), "vda", "members"),
        (("hardware", "vcpus"), "two", "vcpus"),
    ],
)
def test_bad_records_are_one_line_errors(path: tuple[str, ...], value: Any, message: str) -> None:
    record = set_to_dict(_set())
    target = record
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(RecordInvalid, match=message) as caught:
        set_from_dict(record)
    assert "\n" not in str(caught.value)


# ---- Nova-style requests ------------------------------------------------------------------------------------


def _instance(*disks: DiskSpec, uuid_: str = "u-1") -> Instance:
    return Instance("vm", uuid_, InstanceState.RUNNING, _hardware(*disks))


def test_create_image_without_all_volumes_keeps_the_boot_disk() -> None:
    vm = _instance(_disk("vda"), _disk("vdb", boot_order=1), _disk("sda", device="cdrom"))
    assert root_disk(vm) == "vdb"
    assert image_exclusions(vm, all_volumes=False) == ("vda",)
    assert image_exclusions(vm, all_volumes=True) == ()
    assert root_disk(_instance(_disk("vdc"), _disk("vdd"))) == "vdc"


def test_orders_that_cannot_be_done_are_refused_before_a_job() -> None:
    vm = _instance(_disk("vda"), _disk("vdb"))
    check_order(vm, Order(exclude_disks=("vdb",)))
    with pytest.raises(InvalidRequest, match="vdz: vm has no such disk"):
        check_order(vm, Order(exclude_disks=("vdz",)))
    with pytest.raises(InvalidRequest, match="rotation needs backup_type"):
        check_order(vm, Order(rotation=1))
    with pytest.raises(InvalidRequest, match="drop exclude_disks"):
        check_order(vm, Order(backup_type="daily", rotation=1, exclude_disks=("vdb",)))


@dataclass
class FakeBackups:
    """The contract of ``lifecycle.backup``: rotation among the sets ``visible`` admits, newest first."""

    sets: list[SnapshotSet]
    calls: list[dict[str, Any]] = field(default_factory=list)

    def backup(self, instance: str, backup_type: str, rotation: int, **kw: Any) -> Any:
        self.calls.append({"instance": instance, "backup_type": backup_type, "rotation": rotation, **kw})
        made = _set(instance, metadata=kw["metadata"], backup_type=backup_type)
        made.id = kw["set_id"]
        self.sets.insert(0, made)
        visible = kw["visible"] or (lambda s: True)
        mine = [s for s in self.sets if s.backup_type == backup_type and s.instance_uuid == instance and visible(s)]
        rotated = [s.id for s in mine[rotation:]]
        self.sets = [s for s in self.sets if s.id not in rotated]

        @dataclass
        class Result:
            snapshot_set: SnapshotSet
            rotated_out: list[str]
            kept_in_use: dict[str, str]

        return Result(made, rotated, {})


@dataclass
class FakeService:
    lifecycle: FakeBackups
    requests: list[SnapshotRequest] = field(default_factory=list)

    def snapshot(self, request: SnapshotRequest, progress: Any = None) -> SnapshotSet:
        self.requests.append(request)
        made = _set(request.instance)
        made.id = request.set_id or made.id
        return made


def test_take_uses_the_assigned_set_id_for_snapshots_and_backups() -> None:
    service = FakeService(FakeBackups([]))
    vm = _instance(_disk("vda"), _disk("vdb"))
    sid1, sid2 = str(uuid.uuid4()), str(uuid.uuid4())
    made = take(service, vm, Order(exclude_disks=("vdb",), pause=True), set_id=sid1, visible=lambda s: True)
    assert made.snapshot_set.id == sid1 and not made.rotated
    assert service.requests[0].set_id == sid1 and service.requests[0].exclude_disks == ("vdb",)
    assert service.requests[0].pause_vcpus
    backed = take(service, vm, Order(backup_type="daily", rotation=2), set_id=sid2, visible=lambda s: True)
    assert backed.snapshot_set.id == sid2 and service.lifecycle.calls[0]["set_id"] == sid2


# ---- rotation acts only on the caller's sets (issue 17, item 2) ---------------------------------------------


@dataclass
class FakeMapping:
    assignments: dict[str, str]

    def get(self, instance_uuid: str) -> str | None:
        return self.assignments.get(instance_uuid)

    def all(self) -> dict[str, ProjectAssignment]:
        return {u: ProjectAssignment(u, "vm", p, T0) for u, p in self.assignments.items()}


@dataclass
class FakeInstances:
    by_uuid: dict[str, Instance]

    def instance(self, ref: str) -> Instance:
        return self.by_uuid[ref]


def test_backup_rotation_after_a_remap_spares_and_hides_the_old_projects_sets() -> None:
    vm = _instance(_disk("vda"), uuid_="u-remapped")
    old = [_set(vm.uuid, {PROJECT_KEY: "alpha"}, backup_type="daily", name=f"old{i}") for i in range(3)]
    mapping = FakeMapping({vm.uuid: "alpha"})
    resolver = ProjectResolver(FakeInstances({vm.uuid: vm}), mapping)
    mapping.assignments[vm.uuid] = "beta"  # the admin moves the instance to project beta
    beta = Principal("t-beta", "member", "beta")

    def visible(s: SnapshotSet) -> bool:
        return beta.sees(resolver.of_set(s))

    backups = FakeBackups(list(old))
    service = FakeService(backups)
    order = Order(backup_type="daily", rotation=1, metadata={PROJECT_KEY: "beta"})
    first = take(service, vm, order, set_id=str(uuid.uuid4()), visible=visible)
    second = take(service, vm, order, set_id=str(uuid.uuid4()), visible=visible)
    assert first.rotated == [] and second.rotated == [first.snapshot_set.id]  # only beta's own backup rotates out
    assert {s.id for s in old} <= {s.id for s in backups.sets}  # alpha's sets are all still there
    assert not {s.id for s in old} & set(first.rotated + second.rotated + list(second.kept))
    admin = Principal("t-admin", "admin", None)
    assert all(admin.sees(resolver.of_set(s)) for s in old) and not any(visible(s) for s in old)


# ---- tokens (issue 17, item 5) ------------------------------------------------------------------------------


def test_admin_tokens_are_global(tmp_path: Path) -> None:
    with SqlCatalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}") as catalog:
        tokens = TokenStore(catalog)
        with pytest.raises(InvalidRequest, match="admin token is global") as caught:
            tokens.create("admin", "alpha")
        assert "\n" not in str(caught.value)
        issued = tokens.create("admin", None)
        # A token an older version stored with a project: reported as global, the project as ignored.
        with catalog.connect("test", write=True) as connection:
            connection.execute(text("UPDATE api_tokens SET project = 'alpha' WHERE id = :i"), {"i": issued.token.id})
        listed = next(t for t in tokens.all() if t.id == issued.token.id)
        assert listed.project is None and listed.ignored_project == "alpha"
        token = tokens.authenticate(issued.secret)
        assert token is not None and Principal.of(token).visible_projects() is None


# ---- input rules shared with the CLI (issue 17, item 7) -----------------------------------------------------


@pytest.mark.parametrize("value", ["a\x00b", "bell\x07", "\uffff", "esc\x1b[31m"])
def test_metadata_values_must_be_xml_safe(value: str) -> None:
    with pytest.raises(ValidationError, match="control character"):
        SnapshotCreate(metadata={"note": value})
    with pytest.raises(ValidationError):
        CreateBackup(name="b", backup_type="daily", rotation=1, metadata={"note": value})
    assert SnapshotCreate(metadata={"note": "tab\tand\nnewline"}).metadata["note"] == "tab\tand\nnewline"


@pytest.mark.parametrize("name", ["web\n", "../x", "-lead", "a" * 64])
def test_names_follow_the_cli_rule(name: str) -> None:
    with pytest.raises(ValidationError):
        SnapshotCreate(name=name)


def test_reserved_metadata_keys_are_refused() -> None:
    with pytest.raises(ValidationError, match="reserved"):
        SnapshotCreate(metadata={"freezeframe.project": "beta"})


# ---- no docs page that loads a CDN (issue 17, item 7) -------------------------------------------------------


def test_docs_pages_are_off_and_openapi_stays(tmp_path: Path) -> None:
    app = create_app(ApiConfig(Settings.from_env(home=tmp_path)))
    client = TestClient(app)  # no lifespan: the service is not opened
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    spec = client.get("/openapi.json")
    assert spec.status_code == 200 and "/v1/snapshot-sets" in spec.json()["paths"]
    assert "cdn" not in spec.text.lower()


# ---- imports: no cycles, no Alembic for an open at head -----------------------------------------------------


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(SRC)}, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_catalog_adapters_import_without_cycles_or_alembic(tmp_path: Path) -> None:
    for module in ("catalog", "image_store", "service_store"):
        loaded = _python(
            f"import sys, freezeframe.adapters.{module}; "
            "print(sorted(m for m in sys.modules if m.startswith('freezeframe.adapters.') or m in ('alembic', "
            "'sqlalchemy.orm')))"
        )
        assert "alembic" not in loaded and "sqlalchemy.orm" not in loaded, (module, loaded)
        if module == "catalog":
            assert "image_store" not in loaded and "service_store" not in loaded
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    assert _python(f"import sys; from freezeframe.adapters.catalog import SqlCatalog; SqlCatalog('{url}').close(); "
                   "print('alembic' in sys.modules)") == "True"  # fmt: skip
    assert _python(f"import sys; from freezeframe.adapters.catalog import SqlCatalog; SqlCatalog('{url}').close(); "
                   "print('alembic' in sys.modules)") == "False"  # fmt: skip
