"""Verify a set: every member's SHA-256 against the catalog and the set's manifest; with ``boot``, a throw-away
copy-on-write clone booted without network, its guest agent asked, shut down, and its filesystems checked on the
host. The clone (domain, folder, hypervisor log) is removed whatever happens.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

from freezeframe.errors import FreezeframeError, InvalidRequest, SetNotFound
from freezeframe.incremental import PARENT_KEY
from freezeframe.model import InstanceState, Member, SetStatus, SnapshotSet
from freezeframe.ops.common import Holds, Lazy, Stores, member_disks
from freezeframe.ops.instances import InstanceBuilder, domain_plan, member_disks_into, remove_backend_clones
from freezeframe.ports import (
    MANIFEST,
    Catalog,
    Domains,
    HostFilesystems,
    Hypervisor,
    ImageRef,
    Images,
    Repository,
)
from freezeframe.ports.volumes import RBD_PREFIX
from freezeframe.signals import deferred_signals
from freezeframe.volume_members import volume_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    subject: str
    what: str
    ok: bool | None
    """None: looked at but nothing to judge (e.g. a disk without a filesystem)."""
    detail: str


@dataclass
class VerifyReport:
    set_id: str
    set_name: str
    checks: list[Check] = field(default_factory=list)
    booted: bool = False

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    def add(self, subject: str, what: str, ok: bool | None, detail: str) -> None:
        self.checks.append(Check(subject, what, ok, detail))


@dataclass(frozen=True)
class _Clone:
    uuid: str
    directory: Path
    disks: dict[str, Path]
    """target -> the clone's disk."""


class Verify:
    def __init__(
        self,
        catalog: Catalog,
        repository: Repository,
        stores: Stores,
        images: Images,
        host_fs: HostFilesystems,
        hypervisor: Lazy[Hypervisor],
        domains: Lazy[Domains],
        builder: InstanceBuilder,
        holds: Holds,
        verify_dir: Path,
        *,
        domain_type: str = "qemu",
        boot_timeout_s: float = 180.0,
        shutdown_timeout_s: float = 60.0,
    ) -> None:
        self.catalog = catalog
        self.repository = repository
        self.stores = stores
        self.images = images
        self.host_fs = host_fs
        self.hypervisor = hypervisor
        self.domains = domains
        self.builder = builder
        self.holds = holds
        self.verify_dir = verify_dir
        self.domain_type = domain_type
        self.boot_timeout_s = boot_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s

    def verify(self, set_ref: str, *, boot: bool = False) -> VerifyReport:
        """Recompute every member's SHA-256; with ``boot`` also boot a throw-away clone and check its disks."""
        snapshot_set = self.catalog.get_set(set_ref)
        if snapshot_set.status is not SetStatus.AVAILABLE:
            raise InvalidRequest(f"set {snapshot_set.name} is {snapshot_set.status}; only available sets have data")
        report = VerifyReport(snapshot_set.id, snapshot_set.name)
        with self.holds.set(snapshot_set):
            self._verify_data(snapshot_set, report)
            if boot:
                if report.ok:
                    self._verify_boot(snapshot_set, report)
                else:
                    report.add("clone", "boot", False, "not booted: the member data does not match the catalog")
        return report

    def _verify_data(self, snapshot_set: SnapshotSet, report: VerifyReport) -> None:
        manifest: dict[str, str | None] = {}
        try:
            manifest = self.repository.manifest_checksums(snapshot_set.id)
        except FreezeframeError as exc:
            report.add("set", MANIFEST, False, str(exc))
        for member in snapshot_set.members:
            store = self.stores.of(member)
            if not store.present(member):
                report.add(member.target, "sha256", False, f"member {member.target}: {member.path} is missing")
                continue
            started = time.monotonic()
            actual = store.checksum(member)
            took = time.monotonic() - started
            if actual != member.sha256:
                report.add(
                    member.target, "sha256", False,
                    f"member {member.target} ({member.path}) has SHA-256 {actual}, the catalog says {member.sha256}",
                )  # fmt: skip
            else:
                report.add(member.target, "sha256", True, f"{member.path} matches ({took:.2f}s)")
            if manifest and manifest.get(member.target) != member.sha256:
                report.add(member.target, MANIFEST, False, f"{MANIFEST} disagrees with the catalog for {member.target}")
            self._verify_chain(member, report)

    def _verify_chain(self, member: Member, report: VerifyReport) -> None:
        """An incremental member reads the rest of its disk from its parents' files: those must match too."""
        parent_id, depth = member.metadata.get(PARENT_KEY), 0
        while parent_id is not None:
            try:
                parent_set = self.catalog.get_set(parent_id)
            except SetNotFound:
                report.add(member.target, "chain", False, f"parent set {parent_id} of {member.target} is gone")
                return
            parent = next((m for m in parent_set.members if m.target == member.target), None)
            store = self.stores.of(parent) if parent is not None else None
            if parent is None or store is None or not store.present(parent) or store.checksum(parent) != parent.sha256:
                report.add(member.target, "chain", False, f"parent member {member.target} of set {parent_id} is "
                           "missing or does not match its SHA-256")  # fmt: skip
                return
            parent_id, depth = parent.metadata.get(PARENT_KEY), depth + 1
        if depth:
            report.add(member.target, "chain", True, f"the {depth} parent member(s) it builds on match")

    def _verify_boot(self, snapshot_set: SnapshotSet, report: VerifyReport) -> None:
        """Boot a copy-on-write clone without network, ask its agent, shut it down, fsck its disks on the host."""
        name = f"ff-verify-{snapshot_set.id[:8]}-{uuidlib.uuid4().hex[:6]}"
        directory = self.verify_dir / name
        with self.holds.name(name):
            clone: _Clone | None = None
            try:
                started = time.monotonic()
                try:
                    clone = self._start_clone(snapshot_set, name, directory)
                except FreezeframeError as exc:  # the builder removed whatever it made
                    report.add("clone", "boot", False, f"the clone could not be built or started: {exc}")
                    return
                report.booted = True
                self._inspect(clone, started, report)
            finally:
                with deferred_signals():
                    self._remove_clone(name, directory, clone)

    def _start_clone(self, snapshot_set: SnapshotSet, name: str, directory: Path) -> _Clone:
        disks = member_disks(snapshot_set, self.stores)
        with self.builder.building(name, directory, forget_restores=False) as build:
            restored = member_disks_into(directory, disks, self.stores, full=False)
            plan = domain_plan(build, snapshot_set, disks, restored, domain_type=self.domain_type, without_network=True)
            uuid = self.builder.define(build, plan, start=True)
        return _Clone(uuid, directory, {s.target: r.path for (s, _), r in zip(disks, restored, strict=True)})

    def _inspect(self, clone: _Clone, started: float, report: VerifyReport) -> None:
        answered = self._wait_agent(clone.uuid, started)
        mounts: dict[str, list[str]] = {}
        if answered is None:
            report.add("clone", "guest agent", False, f"no answer within {self.boot_timeout_s:.0f} s of start")
        else:
            report.add("clone", "guest agent", True, f"answered guest-ping {answered:.1f}s after start")
            mounts = self.domains().guest_mounts(clone.uuid, list(clone.disks))
        clean = answered is not None and self.domains().shutdown_via_agent(clone.uuid, self.shutdown_timeout_s)
        if not clean:
            self.domains().remove(clone.uuid)  # destroy; its disks go with the folder
        report.add(
            "clone", "shutdown", clean,
            "powered off through the agent (filesystems unmounted)" if clean else "had to be destroyed",
        )  # fmt: skip
        for target, path in clone.disks.items():
            mounted = mounts.get(target, []) if answered is not None else None
            self._check_disk(target, path, clone.directory / f"{target}.check.raw", mounted, report)

    def _remove_clone(self, name: str, directory: Path, clone: _Clone | None) -> None:
        try:
            if clone is not None:
                self.domains().remove(clone.uuid)
            self.domains().forget_log(name)  # also the log of a clone that failed to start
            remove_backend_clones(self.stores, directory)
        except FreezeframeError:
            log.exception("could not remove the verify clone %s", name)
        shutil.rmtree(directory, ignore_errors=True)

    def _wait_agent(self, instance_uuid: str, started: float) -> float | None:
        hypervisor = self.hypervisor()
        deadline = started + self.boot_timeout_s
        while time.monotonic() < deadline:
            instance = hypervisor.lookup(instance_uuid)
            if instance.state is not InstanceState.RUNNING:
                return None
            try:
                hypervisor.agent_ping(instance)
                return time.monotonic() - started
            except FreezeframeError:
                time.sleep(0.5)
        return None

    def _readable(self, disk: Path) -> ImageRef:
        """A clone's qcow2 file, or its RBD clone (``rbd:POOL/IMAGE``) read through the cluster."""
        if str(disk).startswith(RBD_PREFIX):
            return volume_images(self.stores.by_kind).readable(str(disk).removeprefix(RBD_PREFIX))
        return ImageRef(disk, "qcow2")

    def _check_disk(self, target: str, disk: Path, raw: Path, mounted: list[str] | None, report: VerifyReport) -> None:
        """Check every filesystem of the clone's disk from the host, on a raw copy (``raw``, in the clone's folder
        even when the disk is an RBD clone) of the powered-off clone."""
        try:
            self.images.convert(self._readable(disk), ImageRef(raw, "raw"))
            filesystems = self.host_fs.probe(raw)
            if not filesystems:
                report.add(target, "filesystem", None, "no filesystem found on the disk (nothing to check)")
            for fs in filesystems:
                report.add(target, f"fsck {fs.where}", *self.host_fs.fsck(raw, fs))
            checkable = [fs for fs in filesystems if fs.type != "swap"]
            if mounted is not None and checkable:
                ok = len(mounted) >= len(checkable)
                detail = (
                    f"mounted in the guest at {', '.join(mounted)}" if mounted else "the guest did not mount it"
                ) + f" ({len(checkable)} filesystem(s) on the disk)"
                report.add(target, "mounted", ok, detail)
        finally:
            with contextlib.suppress(OSError):
                raw.unlink(missing_ok=True)
