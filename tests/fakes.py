"""Scripted stand-ins for the ports, shared by the tests/test_ops_*.py unit tests.

An "image" here is a small JSON file (format, virtual size, backing file, guest data as a string), so restore,
revert, delete and verify run their real code over real files in milliseconds, and a failure can be switched on
at any call. ``World`` wires the operations the way ``freezeframe.wiring`` does, over these fakes.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from freezeframe.adapters.locks import FileLocks
from freezeframe.adapters.repository import DirectoryRepository, FileMembers
from freezeframe.errors import AgentUnavailable, HypervisorError, InstanceNotFound, InvalidRequest, SetNotFound
from freezeframe.flow import SnapshotRequest
from freezeframe.lifecycle import Lifecycle
from freezeframe.model import (
    BootSpec,
    Consistency,
    DiskSpec,
    Hardware,
    Instance,
    InstanceState,
    Member,
    NicSpec,
    RestoreRecord,
    SetStatus,
    SnapshotSet,
)
from freezeframe.ops.common import Holds, Markers, Stores
from freezeframe.ops.instances import InstanceBuilder
from freezeframe.ops.restore import Restore
from freezeframe.ops.retention import Retention
from freezeframe.ops.revert import Revert
from freezeframe.ops.verify import Verify
from freezeframe.ports import (
    DiskUser,
    DomainPlan,
    Filesystem,
    HostCapabilities,
    ImageCheck,
    ImageInfo,
    ImageRef,
    ProgressCallback,
)

MiB = 1 << 20


class Boom(HypervisorError):
    """The injected failure."""


# ---- images ------------------------------------------------------------------------------------------------


@dataclass
class ScriptedImages:
    """Images as JSON files; ``fail`` maps an operation name to the call number (1-based) that fails."""

    fail: dict[str, int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def _tick(self, op: str) -> None:
        self.calls.append(op)
        if self.fail.get(op) == self.calls.count(op):
            raise Boom(f"simulated {op} failure")

    @staticmethod
    def write(path: Path, fmt: str, size: int, data: str | None, backing: str | None = None) -> None:
        path.write_text(json.dumps({"format": fmt, "size": size, "data": data, "backing": backing}))

    @staticmethod
    def read(path: Path) -> dict[str, object]:
        record: dict[str, object] = json.loads(path.read_text())
        return record

    def data(self, path: Path) -> str:
        """The guest-visible data, through the backing chain."""
        record = self.read(path)
        if record["data"] is None and record["backing"]:
            return self.data(Path(str(record["backing"])))
        return str(record["data"])

    def info_of(self, path: str | Path) -> ImageInfo:
        return self.info(ImageRef(Path(path), "qcow2"))

    def info(self, image: ImageRef) -> ImageInfo:
        record = self.read(image.path)
        return ImageInfo(
            format=str(record["format"]), virtual_size=int(str(record["size"])), actual_size=0,
            backing=str(record["backing"]) if record["backing"] else None,
            backing_format="qcow2" if record["backing"] else None,
        )  # fmt: skip

    def create(
        self,
        path: Path,
        fmt: str,
        size: int | None = None,
        *,
        backing: ImageRef | None = None,
        options: Mapping[str, str] | None = None,
    ) -> None:
        self._tick("create")
        if backing is not None:
            self.write(path, fmt, size or int(str(self.read(backing.path)["size"])), None, str(backing.path))
        else:
            self.write(path, fmt, size or 0, "")

    def convert(
        self,
        source: ImageRef,
        target: ImageRef,
        *,
        existing: bool = False,
        compress: bool = False,
        options: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> None:
        self._tick("convert")
        size = int(str(self.read(source.path)["size"]))
        self.write(target.path, target.format, size, self.data(source.path))
        if progress is not None:
            progress(size, size)

    def rebase(self, path: Path, fmt: str, backing: ImageRef | None) -> None:
        self._tick("rebase")
        record = self.read(path)
        self.write(path, fmt, int(str(record["size"])), self.data(path))

    def resize(self, path: Path, fmt: str, size: int) -> None:
        self._tick("resize")

    def check(self, image: ImageRef, timeout: float | None = None) -> ImageCheck:
        return ImageCheck("ok")

    def measure(self, source: ImageRef, target_format: str) -> int:
        return int(str(self.read(source.path)["size"]))

    def data_bytes(self, image: ImageRef) -> int:
        return len(self.data(image.path))


# ---- domains and the hypervisor ----------------------------------------------------------------------------


@dataclass
class FakeDomain:
    name: str
    uuid: str
    plan: DomainPlan
    active: bool = False


@dataclass
class ScriptedDomains:
    images: ScriptedImages
    fail: dict[str, int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    domains: dict[str, FakeDomain] = field(default_factory=dict)
    networks: dict[str, str] = field(default_factory=dict)
    boots: bool = True
    """A started clone's agent answers and it shuts down cleanly."""

    def _tick(self, op: str) -> None:
        self.calls.append(op)
        if self.fail.get(op) == self.calls.count(op):
            raise Boom(f"simulated {op} failure")

    def by_name(self, name: str) -> FakeDomain | None:
        return next((d for d in self.domains.values() if d.name == name), None)

    def name_taken(self, name: str) -> bool:
        return self.by_name(name) is not None

    def uuid_of(self, name: str) -> str | None:
        found = self.by_name(name)
        return found.uuid if found else None

    def check_nics(self, nics: Sequence[NicSpec]) -> None:
        for nic in nics:
            if nic.source_type == "network" and self.networks.get(nic.source or "") != "active":
                raise InvalidRequest(f"libvirt network {nic.source!r} does not exist")

    def network_state(self, name: str) -> str:
        return self.networks.get(name, "missing")

    def bridge_exists(self, name: str) -> bool:
        return False

    def capabilities(self, arch: str, machine: str | None, domain_type: str) -> HostCapabilities:
        return HostCapabilities(efi=True, max_vcpus=64, disk_buses=frozenset({"virtio", "ide", "sata", "scsi"}))

    def define(self, plan: DomainPlan) -> str:
        self._tick("define")
        uuid = str(uuidlib.uuid4())
        self.domains[uuid] = FakeDomain(plan.name, uuid, plan)
        return uuid

    def start(self, uuid: str) -> None:
        self._tick("start")
        self.domains[uuid].active = True

    def remove(self, uuid: str) -> bool:
        self.calls.append("remove")
        return self.domains.pop(uuid, None) is not None

    def disk_sources(self, uuid: str) -> dict[str, str]:
        return {d.spec.target: str(d.path) for d in self.domains[uuid].plan.disks}

    def users_of(self, paths: Sequence[str]) -> dict[str, DiskUser]:
        found = {}
        for dom in self.domains.values():
            for disk in dom.plan.disks:
                if str(disk.path) in paths:
                    found[str(disk.path)] = DiskUser(dom.name, dom.uuid, disk.spec.target, dom.active)
        return found

    def block_pull(self, uuid: str, target: str, timeout_s: float = 3600.0) -> None:
        self._tick("block_pull")
        disk = next(d for d in self.domains[uuid].plan.disks if d.spec.target == target)
        self.images.rebase(disk.path, disk.format, None)

    def shutdown_via_agent(self, uuid: str, timeout_s: float) -> bool:
        self.domains[uuid].active = False
        return self.boots

    def guest_mounts(self, uuid: str, targets: Sequence[str]) -> dict[str, list[str]]:
        return {t: ["/ (ext4)"] for t in targets} if self.boots else {}

    def forget_log(self, name: str) -> None:
        self.calls.append("forget_log")


@dataclass
class ScriptedHypervisor:
    """Instances by UUID; an instance defined through ScriptedDomains is found too (verify's clone)."""

    domains: ScriptedDomains
    instances: dict[str, Instance] = field(default_factory=dict)

    def lookup(self, ref: str) -> Instance:
        for inst in self.instances.values():
            if ref in (inst.uuid, inst.name):
                return inst
        dom = self.domains.domains.get(ref) or self.domains.by_name(ref)
        if dom is None:
            raise InstanceNotFound(f"no instance {ref!r}")
        state = InstanceState.RUNNING if dom.active else InstanceState.SHUTOFF
        return Instance(dom.name, dom.uuid, state, dom.plan.hardware)

    def agent_ping(self, instance: Instance) -> None:
        if not self.domains.boots:
            raise AgentUnavailable("no agent")


# ---- records ----------------------------------------------------------------------------------------------


@dataclass
class MemoryCatalog:
    sets: dict[str, SnapshotSet] = field(default_factory=dict)
    fail_delete: bool = False

    def add_set(self, snapshot_set: SnapshotSet) -> None:
        self.sets[snapshot_set.id] = replace(snapshot_set, members=list(snapshot_set.members))

    def update_set(self, snapshot_set: SnapshotSet) -> None:
        self.add_set(snapshot_set)

    def get_set(self, ref: str) -> SnapshotSet:
        for s in self.sets.values():
            if ref in (s.id, s.name):
                return replace(s, members=list(s.members))
        raise SetNotFound(f"no snapshot set {ref!r}")

    def list_sets(
        self,
        instance: str | None = None,
        status: SetStatus | None = None,
        backup_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[SnapshotSet]:
        found = [
            s for s in self.sets.values()
            if (instance is None or instance in (s.instance_uuid, s.instance_name))
            and (status is None or s.status is status)
            and (backup_type is None or s.backup_type == backup_type)
        ]  # fmt: skip
        return sorted(found, key=lambda s: s.created_at, reverse=True)

    def delete_set(self, set_id: str) -> None:
        if self.fail_delete:
            raise Boom("simulated catalog failure")
        self.sets.pop(set_id, None)


@dataclass
class MemoryRestores:
    rows: list[RestoreRecord] = field(default_factory=list)

    def add(self, records: Sequence[RestoreRecord]) -> None:
        for r in records:
            self.rows.append(replace(r, id=len(self.rows) + 1000))

    def bind_uuid(self, instance_name: str, instance_uuid: str) -> None:
        self.rows = [
            replace(r, instance_uuid=instance_uuid) if r.instance_name == instance_name and not r.instance_uuid else r
            for r in self.rows
        ]

    def for_set(self, set_id: str) -> list[RestoreRecord]:
        return [r for r in self.rows if r.set_id == set_id]

    def for_instance(self, ref: str) -> list[RestoreRecord]:
        return [r for r in self.rows if ref in (r.instance_name, r.instance_uuid)]

    def all(self) -> list[RestoreRecord]:
        return list(self.rows)

    def remove_instance(self, instance_name: str) -> None:
        self.rows = [r for r in self.rows if r.instance_name != instance_name]

    def remove_ids(self, ids: Sequence[int]) -> None:
        self.rows = [r for r in self.rows if r.id not in ids]


@dataclass
class ScriptedHostFs:
    clean: bool = True

    def probe(self, raw: Path) -> list[Filesystem]:
        return [Filesystem("ext4", 0, "whole disk")]

    def fsck(self, raw: Path, fs: Filesystem) -> tuple[bool | None, str]:
        return (True, "clean") if self.clean else (False, "e2fsck found errors")


# ---- the world ----------------------------------------------------------------------------------------------


HARDWARE = Hardware(
    vcpus=2,
    memory_kib=262144,
    arch="x86_64",
    machine="pc",
    boot=BootSpec(),
    disks=(
        DiskSpec("vda", "virtio", "/images/root.qcow2", "qcow2", 8 * MiB, boot_order=1),
        DiskSpec("vdb", "virtio", "/images/data.raw", "raw", 8 * MiB),
        DiskSpec("hdc", "ide", "/images/install.iso", "raw", 0, device="cdrom", readonly=True),
    ),
    nics=(NicSpec("52:54:00:aa:bb:cc", "virtio", "user", None),),
)


class World:
    """The lifecycle operations over scripted ports and a real folder, built as ``freezeframe.wiring`` does."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.images = ScriptedImages()
        self.domains = ScriptedDomains(self.images)
        self.hypervisor = ScriptedHypervisor(self.domains)
        self.catalog = MemoryCatalog()
        self.restores = MemoryRestores()
        self.host_fs = ScriptedHostFs()
        self.repository = DirectoryRepository(home / "repository", self.images)
        self.locks = FileLocks(home / "locks")
        self.holds = Holds(self.locks)
        self.markers = Markers(home / "lifecycle")
        self.stores = Stores({"file": FileMembers(self.images)})
        self.instances_dir = home / "instances"
        self.verify_dir = home / "verify"
        self.snapshots: list[SnapshotRequest] = []
        self.builder = InstanceBuilder(lambda: self.domains, self.markers, self.restores, self.holds, self.stores)
        restore = Restore(
            self.catalog, self.stores, self.images, lambda: self.domains, self.restores, self.builder, self.holds,
            self.instances_dir,
        )  # fmt: skip
        revert = Revert(
            self.catalog, lambda: self.hypervisor, self.snapshot, self.stores, self.images, self.holds, self.markers
        )
        retention = Retention(
            self.catalog, self.repository, self.stores, self.images, lambda: self.domains, self.restores,
            lambda: self.hypervisor, self.snapshot, self.holds, (self.instances_dir, self.verify_dir),
        )  # fmt: skip
        verify = Verify(
            self.catalog, self.repository, self.stores, self.images, self.host_fs, lambda: self.hypervisor,
            lambda: self.domains, self.builder, self.holds, self.verify_dir, boot_timeout_s=0.3, shutdown_timeout_s=0.3,
        )  # fmt: skip
        self.lifecycle = Lifecycle(restore, revert, retention, verify, self.builder, self.restores)

    def add_instance(
        self, state: InstanceState = InstanceState.SHUTOFF, uuid: str = "11111111-2222-3333-4444-555555555555"
    ) -> Instance:
        """An instance ``vm1`` with HARDWARE's file disks (a qcow2 and a raw one) holding 'now-TARGET' data."""
        folder = self.home / "vm"
        folder.mkdir(parents=True, exist_ok=True)
        disks = []
        for spec in HARDWARE.disks:
            if spec.device == "disk":
                path = folder / f"{spec.target}.{spec.format}"
                self.images.write(path, spec.format, 8 * MiB, f"now-{spec.target}")
                spec = replace(spec, source_path=str(path))
            disks.append(spec)
        inst = Instance("vm1", uuid, state, replace(HARDWARE, disks=tuple(disks)))
        self.hypervisor.instances[uuid] = inst
        return inst

    def snapshot(self, request: SnapshotRequest, progress: ProgressCallback | None = None) -> SnapshotSet:
        """What the flow records, minus the guest: the instance's disks as they are now."""
        self.snapshots.append(request)
        instance = self.hypervisor.lookup(request.instance)
        data = {d.target: self.images.data(Path(str(d.source_path))) for d in instance.hardware.disks
                if d.device == "disk" and d.target not in request.exclude_disks}  # fmt: skip
        return self.add_set(
            data, instance_uuid=instance.uuid, instance_name=instance.name, name=request.name,
            backup_type=request.backup_type, metadata=request.metadata, set_id=request.set_id,
            hardware=instance.hardware,
        )  # fmt: skip

    def add_set(
        self,
        data: Mapping[str, str],
        *,
        instance_uuid: str = "11111111-2222-3333-4444-555555555555",
        instance_name: str = "origin",
        name: str | None = None,
        backup_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        set_id: str | None = None,
        hardware: Hardware = HARDWARE,
        created_at: datetime | None = None,
    ) -> SnapshotSet:
        """An available set whose members hold ``data`` (target -> guest data), recorded like the flow does."""
        set_id = set_id or str(uuidlib.uuid4())
        folder = self.repository.set_dir(set_id)
        folder.mkdir(parents=True)
        specs = {d.target: d for d in hardware.disks}
        members = []
        for target, content in data.items():
            path = folder / f"{target}.qcow2"
            self.images.write(path, "qcow2", 8 * MiB, content)
            spec = specs[target]
            members.append(
                Member(
                    set_id=set_id, target=target, bus=spec.bus, boot_order=spec.boot_order, virtual_size=8 * MiB,
                    format="qcow2", path=str(path), source_path=spec.source_path,
                    sha256=self.repository.checksum(path), metadata={"freezeframe.set_uuid": set_id},
                )
            )  # fmt: skip
        when = created_at or datetime.now(UTC)
        snapshot_set = SnapshotSet(
            id=set_id, name=name or f"set-{set_id[:8]}", instance_name=instance_name, instance_uuid=instance_uuid,
            requested=Consistency.CRASH, status=SetStatus.AVAILABLE, created_at=when, completed_at=when,
            hardware=hardware, achieved=Consistency.CRASH, members=members, backup_type=backup_type,
            metadata=dict(metadata or {}),
        )  # fmt: skip
        self.catalog.add_set(snapshot_set)
        self.repository.write_manifest(snapshot_set)
        return snapshot_set

    def leftovers(self) -> list[str]:
        """Anything an operation left behind: domains, instance or verify folders, markers, temp files, rows."""
        found = [f"domain {d.name}" for d in self.domains.domains.values()]
        for folder in (self.instances_dir, self.verify_dir):
            if folder.is_dir():
                found += [f"folder {p}" for p in folder.iterdir()]
        found += [f"marker {p.name}" for p in self.markers.all()]
        found += [f"restore row {r.instance_name}/{r.target}" for r in self.restores.all()]
        found += [f"temp {p}" for p in self.home.rglob(".*.tmp")]
        return found
