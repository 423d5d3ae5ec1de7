"""A scripted hypervisor holding several instances, for the group flow's tests: every guest-visible call is
recorded in one timeline (instance, call, time), and each guest's failures are switched on on its own."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from freezeframe import cli_common
from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.group_records import SqlGroups
from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.adapters.journal import FileJournal
from freezeframe.adapters.locks import FileLocks
from freezeframe.adapters.qemu_img import QemuImg
from freezeframe.adapters.repository import DirectoryRepository
from freezeframe.agent.inventory import instance_record
from freezeframe.config import Settings
from freezeframe.errors import AgentUnavailable, CaptureFailed, HypervisorError, InstanceNotFound
from freezeframe.flow import FlowSettings, SnapshotFlow
from freezeframe.group_flow import GroupFlow
from freezeframe.group_model import Group, GroupMember
from freezeframe.model import DiskSpec, Hardware, Instance, InstanceState
from freezeframe.ports import CaptureTarget, ProgressCallback
from freezeframe.service import Freezeframe
from freezeframe.wiring import Wiring

MiB = 1 << 20


@dataclass
class Guest:
    name: str
    uuid: str
    disks: tuple[DiskSpec, ...]
    state: InstanceState = InstanceState.RUNNING
    agent_ok: bool = True
    freeze_hang_s: float = 0.0
    """The agent takes this long to answer a freeze, then times out (the guest froze after all)."""
    thaw_hang_s: float = 0.0
    frozen: bool = False
    in_flight: bool = False
    capture_fails: bool = False
    shut_down_on_freeze: bool = False
    """The instance stops between prepare and freeze (its freeze finds no running domain)."""


@dataclass
class GroupHypervisor:
    guests: dict[str, Guest] = field(default_factory=dict)
    atomic: bool = True
    timeline: list[tuple[str, str, float]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, n_disks: int = 2) -> Guest:
        uid = f"{len(self.guests) + 1:08d}-0000-4000-8000-{name.encode().hex()[:12]:0>12}"
        disks = tuple(
            DiskSpec(target=f"vd{chr(97 + i)}", bus="virtio", source_path=f"/nowhere/{name}-{i}.qcow2",
                     format="qcow2", virtual_size=4 * MiB, boot_order=1 if i == 0 else None)
            for i in range(n_disks)
        )  # fmt: skip
        self.guests[name] = Guest(name, uid, disks)
        return self.guests[name]

    def _note(self, guest: Guest, call: str) -> None:
        with self._lock:
            self.timeline.append((guest.name, call, time.monotonic()))

    def calls(self, name: str | None = None) -> list[str]:
        return [c if name else f"{n}:{c}" for n, c, _ in self.timeline if name in (None, n)]

    def times(self, call: str) -> list[float]:
        return [t for _, c, t in self.timeline if c == call]

    def _guest(self, ref: str) -> Guest:
        for guest in self.guests.values():
            if ref in (guest.name, guest.uuid):
                return guest
        raise InstanceNotFound(f"no instance {ref}")

    def lookup(self, ref: str) -> Instance:
        guest = self._guest(ref)
        hw = Hardware(vcpus=1, memory_kib=262144, arch="x86_64", machine="pc", disks=guest.disks)
        return Instance(guest.name, guest.uuid, guest.state, hw, True)

    def state(self, instance: Instance) -> InstanceState:
        return self._guest(instance.uuid).state

    def agent_ping(self, instance: Instance) -> None:
        guest = self._guest(instance.uuid)
        self._note(guest, "ping")
        if not guest.agent_ok:
            raise AgentUnavailable("guest agent is not connected")

    def freeze(self, instance: Instance) -> int:
        guest = self._guest(instance.uuid)
        self._note(guest, "freeze")
        if guest.shut_down_on_freeze:
            guest.state = InstanceState.SHUTOFF
            raise HypervisorError(f"domain {guest.name} is not running")
        if guest.freeze_hang_s:
            time.sleep(guest.freeze_hang_s)
            guest.frozen = True
            raise AgentUnavailable("guest agent timed out")
        if not guest.agent_ok:
            raise AgentUnavailable("guest agent is not connected")
        guest.frozen = True
        self._note(guest, "frozen")
        return len(guest.disks)

    def thaw(self, instance: Instance) -> int:
        guest = self._guest(instance.uuid)
        self._note(guest, "thaw")
        if guest.state is InstanceState.SHUTOFF:
            raise HypervisorError(f"domain {guest.name} is not running")
        if guest.thaw_hang_s:
            time.sleep(guest.thaw_hang_s)
            raise AgentUnavailable("guest agent timed out")
        guest.frozen = False
        return len(guest.disks)

    def pause(self, instance: Instance) -> None:
        guest = self._guest(instance.uuid)
        self._note(guest, "pause")
        if guest.state is InstanceState.SHUTOFF:
            raise HypervisorError(f"domain {guest.name} is not running")
        guest.state = InstanceState.PAUSED

    def paused_by_io_error(self, instance: Instance) -> bool:
        return False

    def resume(self, instance: Instance) -> None:
        guest = self._guest(instance.uuid)
        self._note(guest, "resume")
        if guest.state is InstanceState.PAUSED:
            guest.state = InstanceState.RUNNING

    def supports_atomic_capture(self, instance: Instance) -> bool:
        return self.atomic

    def start_capture(self, instance: Instance, targets: Sequence[CaptureTarget]) -> None:
        guest = self._guest(instance.uuid)
        self._note(guest, "capture")
        if guest.state is InstanceState.SHUTOFF:
            raise HypervisorError(f"domain {guest.name} is not running")
        guest.in_flight = True

    def wait_capture(self, instance: Instance, progress: ProgressCallback | None) -> None:
        guest = self._guest(instance.uuid)
        self._note(guest, "wait")
        guest.in_flight = False
        if guest.capture_fails:
            raise CaptureFailed("No space left on device")

    def abort_capture(self, instance: Instance) -> None:
        guest = self._guest(instance.uuid)
        self._note(guest, "abort")
        guest.in_flight = False

    def capture_in_flight(self, instance: Instance) -> bool:
        return self._guest(instance.uuid).in_flight

    def copy_offline(
        self, instance: Instance, targets: Sequence[CaptureTarget], progress: ProgressCallback | None
    ) -> None:
        self._note(self._guest(instance.uuid), "copy_offline")


@dataclass
class GroupWorld:
    hv: GroupHypervisor
    catalog: SqlCatalog
    repository: DirectoryRepository
    journal: FileJournal
    locks: FileLocks
    groups: SqlGroups

    def flow(self, **settings: float) -> SnapshotFlow:
        values = {"thaw_retry_s": 2.0, **settings}
        return SnapshotFlow(self.hv, self.catalog, self.repository, self.journal, self.locks,
                            settings=FlowSettings(**values))  # fmt: skip

    def group_flow(self, **settings: float) -> GroupFlow:
        return GroupFlow(self.flow(**settings), self.groups)

    def make_group(self, name: str, *guests: str) -> Group:
        members = tuple(GroupMember(self.hv.guests[g].uuid, g) for g in guests)
        group = Group(name, members, datetime.now(UTC))
        self.groups.create_group(group)
        return group

    def guests_released(self) -> bool:
        return all(not g.frozen and g.state is not InstanceState.PAUSED for g in self.hv.guests.values())


def group_world(tmp_path: Path, n: int = 2) -> GroupWorld:
    hv = GroupHypervisor()
    for k in range(n):
        hv.add(f"vm{k + 1}")
    catalog = SqlCatalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    return GroupWorld(hv, catalog, DirectoryRepository(tmp_path / "repo", QemuImg()), FileJournal(tmp_path / "journal"),
                      FileLocks(tmp_path / "locks"), SqlGroups(catalog))  # fmt: skip


class ScriptedWiring(Wiring):
    """The real wiring of one home, with the scripted hypervisor in place of libvirt."""

    def __init__(self, settings: Settings, hv: GroupHypervisor) -> None:
        super().__init__(settings)
        self.hv = hv

    @property
    def hypervisor(self):  # type: ignore[no-untyped-def, override]
        return self.hv

    def flow(self) -> SnapshotFlow:
        return SnapshotFlow(self.hv, self.catalog, self.repository, self.journal, self.locks,  # type: ignore[arg-type]
                            FlowSettings(thaw_retry_s=1.0))  # fmt: skip


def use_scripted_cli(monkeypatch: pytest.MonkeyPatch, home: Path, hv: GroupHypervisor) -> None:
    """The real CLI, service, wiring and catalog (in ``home``) over the scripted hypervisor."""

    @contextmanager
    def factory(settings: Settings) -> Iterator[Freezeframe]:
        service = Freezeframe(settings, ScriptedWiring(settings, hv))
        try:
            yield service
        finally:
            service.close()

    monkeypatch.setattr(cli_common, "service_factory", factory)
    monkeypatch.setenv("FREEZEFRAME_HOME", str(home))


def report_instances(service: Freezeframe, host: str, names: Sequence[str]) -> HostRegistry:
    """Enrol ``host`` and beat its heart once, reporting these instances, as its agent does."""
    registry = HostRegistry(service.catalog)
    key = registry.enroll(host)
    registry.heartbeat(
        host, key, uri=f"test:///{host}", repository=str(service.settings.repository_dir), free_bytes=None,
        instances=[instance_record(service.instance(n)) for n in names], agent_pid=os.getpid(),
    )  # fmt: skip
    return registry
