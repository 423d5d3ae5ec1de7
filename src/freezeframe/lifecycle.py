"""What happens to a snapshot set after it is taken: restore, extract, revert, delete, backup rotation, verify.

Every operation either completes or leaves catalog, repository, instance disks and libvirt as they were:
it checks everything it can before making anything, undoes what it made when it fails, and writes a small
marker (``$FREEZEFRAME_HOME/lifecycle/``) before steps a SIGKILL could cut in half, so that ``repair()``
(or the next operation on the same set) can finish or undo them. See docs/lifecycle.md.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freezeframe.adapters import libvirt_define as ld
from freezeframe.adapters.catalog import RestoreLog
from freezeframe.durable import fsync_path, write_atomically
from freezeframe.errors import (
    FreezeframeError,
    HypervisorError,
    InstanceBusy,
    InstanceNotFound,
    InsufficientSpace,
    InvalidRequest,
    PreflightFailed,
    SetHasDependants,
    VerifyFailed,
)
from freezeframe.flow import SnapshotRequest
from freezeframe.model import (
    Consistency,
    DiskSpec,
    InstanceState,
    Member,
    NicSpec,
    RestoreRecord,
    SetStatus,
    SnapshotSet,
)
from freezeframe.ports import MANIFEST
from freezeframe.signals import deferred_signals

if TYPE_CHECKING:
    from freezeframe.service import Freezeframe

log = logging.getLogger(__name__)

COW = "cow"
FULL = "full"
RESTORED_FORMAT = "qcow2"
EXTRACT_FORMATS = ("qcow2", "raw")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_EXT_TYPES = ("ext2", "ext3", "ext4")
_SECTOR = 512


# ---- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoredDisk:
    target: str
    path: str
    member_path: str
    mode: str


@dataclass(frozen=True)
class RestoreResult:
    name: str
    uuid: str
    set_id: str
    set_name: str
    mode: str
    disks: list[RestoredDisk]
    started: bool
    left_out: dict[str, str] = field(default_factory=dict)
    """Disks of the original instance that are not in the set (target -> why), so not rebuilt."""


@dataclass(frozen=True)
class Dependant:
    """An image whose backing file is a member of the set."""

    instance_name: str
    instance_uuid: str | None
    target: str
    path: str
    member_path: str
    active: bool


@dataclass(frozen=True)
class DeleteResult:
    set_id: str
    set_name: str
    flattened: list[Dependant]


@dataclass(frozen=True)
class RevertResult:
    instance_name: str
    instance_uuid: str
    set_id: str
    safety_set_id: str | None
    reverted: dict[str, str]
    """target -> disk file now holding the set's data."""
    untouched: list[str]


@dataclass(frozen=True)
class BackupResult:
    snapshot_set: SnapshotSet
    rotated_out: list[str]
    """Ids of the older sets of this backup type that were deleted."""
    kept_in_use: dict[str, str]
    """Sets past the rotation that were kept (id -> why), e.g. restored instances depend on them."""


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


# ---- helpers --------------------------------------------------------------------------------------


def _run(argv: Sequence[str], what: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=timeout)
    except FileNotFoundError as exc:
        raise HypervisorError(f"{argv[0]} is not installed; run scripts/setup-host.sh") from exc
    except subprocess.TimeoutExpired as exc:
        raise HypervisorError(f"{what}: {argv[0]} did not finish within {timeout} s") from exc
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        if "No space left" in detail:
            raise InsufficientSpace(f"{what}: no space left ({detail}); free space and retry")
        raise HypervisorError(f"{what} failed: {detail}")
    return result


def image_info(path: Path | str) -> dict[str, Any]:
    """qemu-img's view of an image (-U: works while a running domain holds it)."""
    out = _run(["qemu-img", "info", "-U", "--output=json", str(path)], f"reading {path}", timeout=60).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def backing_file(path: Path | str) -> str | None:
    """The absolute backing file of an image, or None for a standalone image."""
    info = image_info(path)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if not backing:
        return None
    resolved = Path(backing) if Path(backing).is_absolute() else Path(path).parent / backing
    return str(resolved.resolve())


def _now() -> datetime:
    return datetime.now(UTC)


def validate_name(name: str) -> None:
    """The name becomes a libvirt name and a directory name, so keep it to a portable alphabet."""
    if not _NAME_RE.match(name):
        raise InvalidRequest(
            f"instance name {name!r} is not usable: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


# ---- the operations --------------------------------------------------------------------------------


class Lifecycle:
    """Restore, extract, revert, delete, backup with rotation and verify, over a ``Freezeframe`` service.

    ``Lifecycle(service)`` uses the service's catalog, repository, hypervisor, locks and snapshot flow.
    """

    def __init__(
        self,
        service: Freezeframe,
        *,
        domain_type: str = "qemu",
        boot_timeout_s: float = 180.0,
        shutdown_timeout_s: float = 60.0,
    ) -> None:
        self.service = service
        self.domain_type = domain_type
        """Restored domains run under TCG by default (``qemu``); ``kvm`` where the host has it."""
        self.boot_timeout_s = boot_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.restores = RestoreLog(service.catalog)
        home = service.settings.home
        self.instances_dir = home / "instances"
        self.verify_dir = home / "verify"
        self.markers_dir = home / "lifecycle"

    # ---- restore -------------------------------------------------------------------------------------

    def restore(self, set_ref: str, name: str, *, start: bool = False, full: bool = False) -> RestoreResult:
        """A new instance from the set, its disks copy-on-write over the members (``full``: independent copies)."""
        validate_name(name)
        snapshot_set = self._available(set_ref)
        conn = self.service.hypervisor.conn
        with (
            self.hold(f"set-{snapshot_set.id}", f"set {snapshot_set.name}"),
            self.hold(f"name-{name}", f"instance name {name}"),
        ):
            snapshot_set = self._available(snapshot_set.id)
            if ld.name_taken(conn, name):
                raise InvalidRequest(f"an instance named {name!r} already exists; choose another name with --as")
            ld.check_nics(conn, snapshot_set.hardware.nics)
            disks = self._member_disks(snapshot_set)
            uuid, restored = self._build(
                snapshot_set,
                name,
                self.instances_dir / name,
                disks,
                mode=FULL if full else COW,
                start=start,
                nics=None,
                record=True,
            )
        return RestoreResult(
            name=name,
            uuid=uuid,
            set_id=snapshot_set.id,
            set_name=snapshot_set.name,
            mode=FULL if full else COW,
            disks=restored,
            started=start,
            left_out=self._left_out(snapshot_set),
        )

    def _build(
        self,
        snapshot_set: SnapshotSet,
        name: str,
        directory: Path,
        disks: Sequence[tuple[DiskSpec, Member]],
        *,
        mode: str,
        start: bool,
        nics: Sequence[NicSpec] | None,
        record: bool,
    ) -> tuple[str, list[RestoredDisk]]:
        """Make the disks, record them, define (and start) the domain; on any failure undo all of it."""
        conn = self.service.hypervisor.conn
        marker = self.claim_instance_dir(name, directory)
        uuid: str | None = None
        restored: list[RestoredDisk] = []
        try:
            for spec, member in disks:
                dst = directory / f"{spec.target}.{RESTORED_FORMAT}"
                self._make_disk(Path(member.path), dst, mode)
                restored.append(RestoredDisk(spec.target, str(dst), member.path, mode))
            if record:
                stale = [r.id for r in self.restores.for_instance(name) if r.id is not None]
                self.restores.remove_ids(stale)  # same name, no domain, no directory: left by someone's undefine
                now = _now()
                self.restores.add([RestoreRecord(snapshot_set.id, name, d.target, d.path, mode, now) for d in restored])
            xml = ld.domain_xml(
                name,
                snapshot_set.hardware,
                [
                    ld.DefinedDisk(spec, Path(d.path), RESTORED_FORMAT)
                    for (spec, _), d in zip(disks, restored, strict=True)
                ],
                nics=nics,
                domain_type=self.domain_type,
                console_log=directory / "console.log",
            )
            dom = ld.define(conn, xml)
            uuid = str(dom.UUIDString())
            self._write_marker("restore", name, {"name": name, "dir": str(directory), "uuid": uuid})
            if record:
                self.restores.bind_uuid(name, uuid)
            if start:
                ld.start(dom)
        except BaseException:
            with deferred_signals():
                self._undo_build(name, directory, uuid, forget=record)
                marker.unlink(missing_ok=True)
            raise
        marker.unlink(missing_ok=True)
        return uuid, restored

    def _make_disk(self, member: Path, dst: Path, mode: str) -> None:
        if mode == COW:
            backing = str(member.resolve())
            _run(
                ["qemu-img", "create", "-q", "-f", RESTORED_FORMAT, "-F", "qcow2", "-b", backing, str(dst)],
                f"creating the copy-on-write disk {dst}",
                timeout=120,
            )
        else:
            _run(
                ["qemu-img", "convert", "-f", "qcow2", "-O", RESTORED_FORMAT, str(member), str(dst)],
                f"copying {member} to {dst}",
            )

    def _undo_build(self, name: str, directory: Path, uuid: str | None, *, forget: bool) -> None:
        """Best effort, each step on its own, so one failing step does not keep the others from running."""
        conn = self.service.hypervisor.conn
        try:
            if uuid is not None:
                ld.remove_domain(conn, uuid)
            else:
                # Defined but killed before the marker learnt the UUID: only a domain whose disks are ours.
                self._remove_domain_in(name, directory)
        except FreezeframeError:
            log.exception("could not remove the half-made domain %s", name)
        shutil.rmtree(directory, ignore_errors=True)
        if forget:
            try:
                self.restores.remove_instance(name)
            except FreezeframeError:
                log.exception("could not forget the restore rows of %s", name)

    def _remove_domain_in(self, name: str, directory: Path) -> bool:
        """Remove the domain called ``name`` only if every disk of it lives in ``directory`` (so it is ours)."""
        conn = self.service.hypervisor.conn
        if not ld.name_taken(conn, name):
            return False
        dom = conn.lookupByName(name)
        sources = ld.disk_sources(dom, live=False)
        if sources and all(Path(s).resolve().parent == directory.resolve() for s in sources.values()):
            return ld.remove_domain(conn, str(dom.UUIDString()))
        return False

    def _member_disks(self, snapshot_set: SnapshotSet) -> list[tuple[DiskSpec, Member]]:
        """Each member with the disk the set recorded for it; the member files must all be there."""
        specs = {d.target: d for d in snapshot_set.hardware.disks}
        missing = [f"{m.target} ({m.path})" for m in snapshot_set.members if not Path(m.path).is_file()]
        if missing:
            raise PreflightFailed(
                f"set {snapshot_set.id} ({snapshot_set.name}) is missing member data: {', '.join(missing)}; "
                f"nothing was changed. Check it with `freezeframe verify {snapshot_set.id}` or delete it"
            )
        if not snapshot_set.members:
            raise PreflightFailed(f"set {snapshot_set.id} ({snapshot_set.name}) has no members to restore")
        result = []
        for m in snapshot_set.members:
            spec = specs.get(m.target) or DiskSpec(
                target=m.target, bus=m.bus, source_path=m.source_path, format=m.format,
                virtual_size=m.virtual_size, boot_order=m.boot_order,
            )  # fmt: skip
            result.append((spec, m))
        return result

    @staticmethod
    def _left_out(snapshot_set: SnapshotSet) -> dict[str, str]:
        captured = {m.target for m in snapshot_set.members}
        skipped = {}
        for item in snapshot_set.metadata.get("freezeframe.skipped_disks", "").split("; "):
            target, sep, why = item.partition(": ")
            if sep:
                skipped[target] = why
        left = {}
        for disk in snapshot_set.hardware.disks:
            if disk.target in captured:
                continue
            if disk.device != "disk":
                left[disk.target] = f"{disk.device}: not part of a snapshot set"
            else:
                left[disk.target] = skipped.get(disk.target, "not captured in the set")
        return left

    # ---- discard a restored instance ----------------------------------------------------------------

    def discard(self, name: str) -> list[str]:
        """Remove an instance that restore made: its domain, its disks under instances/, its restore rows."""
        validate_name(name)
        directory = self.instances_dir / name
        rows = self.restores.for_instance(name)
        if not rows and not directory.exists():
            raise InstanceNotFound(
                f"{name!r} is not an instance restored by freezeframe (no restore record, no {directory}); "
                "freezeframe only discards what it made"
            )
        done = []
        conn = self.service.hypervisor.conn
        with self.hold(f"name-{name}", f"instance name {name}"), deferred_signals():
            uuids = {r.instance_uuid for r in rows if r.instance_uuid}
            for uuid in sorted(uuids):
                if ld.remove_domain(conn, uuid):
                    done.append(f"removed domain {name} ({uuid})")
            if self._remove_domain_in(name, directory):
                done.append(f"removed domain {name}")
            if directory.exists():
                shutil.rmtree(directory)
                done.append(f"removed {directory}")
            self.restores.remove_instance(name)
        return done

    # ---- extract one volume --------------------------------------------------------------------------

    def extract(self, set_ref: str, target: str, to: Path, fmt: str = "qcow2") -> Path:
        """One member as a standalone image at ``to``; never overwrites (link(2) fails if ``to`` appears)."""
        if fmt not in EXTRACT_FORMATS:
            raise InvalidRequest(f"--format {fmt!r}: use one of {', '.join(EXTRACT_FORMATS)}")
        snapshot_set = self._available(set_ref)
        member = next((m for m in snapshot_set.members if m.target == target), None)
        if member is None:
            raise InvalidRequest(
                f"set {snapshot_set.name} has no disk {target!r} (its disks: "
                f"{', '.join(m.target for m in snapshot_set.members)})"
            )
        to = Path(to).absolute()
        if to.exists() or to.is_symlink():
            raise InvalidRequest(f"{to} already exists; freezeframe does not overwrite it: choose another --to")
        if not to.parent.is_dir():
            raise InvalidRequest(f"directory {to.parent} does not exist; create it first")
        if not Path(member.path).is_file():
            raise PreflightFailed(
                f"member {target} of set {snapshot_set.name} is missing its data ({member.path}); "
                f"check the set with `freezeframe verify {snapshot_set.id}`"
            )
        tmp = to.with_name(f".{to.name}.ff-{uuidlib.uuid4().hex[:8]}.tmp")
        with self.hold(f"set-{snapshot_set.id}", f"set {snapshot_set.name}"):
            try:
                _run(
                    ["qemu-img", "convert", "-f", "qcow2", "-O", fmt, member.path, str(tmp)],
                    f"extracting {target} of set {snapshot_set.name} to {to}",
                )
                fsync_path(tmp)
                try:
                    os.link(tmp, to)
                except FileExistsError:
                    raise InvalidRequest(f"{to} appeared while extracting; it was left as it is") from None
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP):
                        raise
                    if to.exists():  # no hard links on this filesystem: check, then rename
                        raise InvalidRequest(f"{to} appeared while extracting; it was left as it is") from None
                    tmp.rename(to)
                fsync_path(to.parent)
            finally:
                tmp.unlink(missing_ok=True)
        return to

    # ---- revert --------------------------------------------------------------------------------------

    def revert(self, set_ref: str, *, safety: bool = True) -> RevertResult:
        """Roll the set's own instance back to the set, all disks together; the instance must be shut off."""
        snapshot_set = self._available(set_ref)
        hypervisor = self.service.hypervisor
        try:
            instance = hypervisor.lookup(snapshot_set.instance_uuid)
        except InstanceNotFound:
            raise InstanceNotFound(
                f"instance {snapshot_set.instance_name} ({snapshot_set.instance_uuid}) of set {snapshot_set.name} "
                f"no longer exists; build a new one with `freezeframe restore {snapshot_set.id} --as NAME`"
            ) from None
        plan, untouched = self._revert_plan(snapshot_set, instance.name, instance.state, instance.hardware.disks)
        safety_id: str | None = None
        if safety:
            when = _now()
            safety_set = self.service.snapshot(
                SnapshotRequest(
                    instance=instance.uuid,
                    name=f"{instance.name}-before-revert-{when:%Y%m%dT%H%M%S%fZ}",
                    exclude_disks=tuple(t for t in untouched if t in {d.target for d in instance.hardware.disks}),
                    metadata={"freezeframe.safety_for": snapshot_set.id},
                )
            )
            safety_id = safety_set.id
        with self.hold(instance.uuid, f"instance {instance.name}"):
            self._finish_revert(instance.uuid)
            instance = hypervisor.lookup(instance.uuid)
            plan, untouched = self._revert_plan(snapshot_set, instance.name, instance.state, instance.hardware.disks)
            self._copy_over(instance.uuid, plan)
        return RevertResult(
            instance_name=instance.name,
            instance_uuid=instance.uuid,
            set_id=snapshot_set.id,
            safety_set_id=safety_id,
            reverted={m.target: str(d.source_path) for m, d in plan},
            untouched=untouched,
        )

    def _revert_plan(
        self, snapshot_set: SnapshotSet, name: str, state: InstanceState, disks: Sequence[DiskSpec]
    ) -> tuple[list[tuple[Member, DiskSpec]], list[str]]:
        if state is not InstanceState.SHUTOFF:
            raise InvalidRequest(
                f"{name} is {state}; revert only works on a shut-off instance: shut it down "
                f"(`virsh shutdown {name}`) and run revert again"
            )
        self._member_disks(snapshot_set)
        by_target = {d.target: d for d in disks if d.device == "disk"}
        plan = []
        problems = []
        for member in snapshot_set.members:
            disk = by_target.get(member.target)
            if disk is None:
                problems.append(f"{member.target}: the instance has no such disk any more")
            elif disk.source_type != "file" or not disk.source_path:
                problems.append(f"{member.target}: only file-backed disks can be reverted ({disk.source_type})")
            elif disk.format not in ("qcow2", "raw"):
                problems.append(f"{member.target}: format {disk.format} cannot be written")
            else:
                plan.append((member, disk))
        if problems:
            raise PreflightFailed(
                f"cannot revert {name} to set {snapshot_set.name}: {'; '.join(problems)}; nothing was changed. "
                f"`freezeframe restore {snapshot_set.id} --as NAME` builds a new instance instead"
            )
        captured = {m.target for m in snapshot_set.members}
        return plan, sorted(t for t in by_target if t not in captured)

    def _copy_over(self, instance_uuid: str, plan: Sequence[tuple[Member, DiskSpec]]) -> None:
        """Convert every member to a temp file beside its disk, then rename all of them over the disks."""
        pairs: list[tuple[Path, Path]] = []
        marker: Path | None = None
        try:
            for member, disk in plan:
                dst = Path(str(disk.source_path))
                tmp = dst.with_name(f".{dst.name}.ff-revert.tmp")
                pairs.append((tmp, dst))
                _run(
                    ["qemu-img", "convert", "-f", "qcow2", "-O", disk.format, member.path, str(tmp)],
                    f"copying set data for {disk.target} next to {dst}",
                )
                with contextlib.suppress(FileNotFoundError):
                    st = dst.stat()
                    os.chown(tmp, st.st_uid, st.st_gid)
                    tmp.chmod(st.st_mode & 0o7777)
                fsync_path(tmp)
            with deferred_signals():
                marker = self._write_marker("revert", instance_uuid, {"renames": [[str(t), str(d)] for t, d in pairs]})
                self._rename_all(pairs)
                marker.unlink(missing_ok=True)
        except BaseException:
            if marker is None or not marker.exists():
                for tmp, _ in pairs:
                    tmp.unlink(missing_ok=True)
            else:
                log.error("revert of %s stopped half-way; `freezeframe repair` finishes it", instance_uuid)
            raise

    @staticmethod
    def _rename_all(pairs: Sequence[tuple[Path, Path]]) -> None:
        for tmp, dst in pairs:
            if tmp.exists():
                tmp.replace(dst)
        for directory in {dst.parent for _, dst in pairs}:
            fsync_path(directory)

    def _finish_revert(self, instance_uuid: str) -> str | None:
        """A revert killed between its renames is rolled forward: every temp was complete before the first."""
        marker = self.markers_dir / f"revert-{instance_uuid}.json"
        if not marker.exists():
            return None
        data = json.loads(marker.read_text())
        pairs = [(Path(t), Path(d)) for t, d in data["renames"]]
        self._rename_all(pairs)
        marker.unlink(missing_ok=True)
        return f"finished an interrupted revert of {instance_uuid} ({len(pairs)} disks)"

    # ---- delete --------------------------------------------------------------------------------------

    def delete(self, set_ref: str, *, force: bool = False) -> DeleteResult:
        """Remove the set and its data; with dependants only under ``force``, which flattens them first."""
        snapshot_set = self.service.catalog.get_set(set_ref)
        with self.hold(f"set-{snapshot_set.id}", f"set {snapshot_set.name}"):
            snapshot_set = self.service.catalog.get_set(snapshot_set.id)
            if snapshot_set.status is SetStatus.CREATING:
                raise InvalidRequest(
                    f"set {snapshot_set.name} is still being created; if no freezeframe process is running "
                    f"for {snapshot_set.instance_name}, run `freezeframe repair {snapshot_set.instance_name}` first"
                )
            dependants = self.dependants(snapshot_set)
            if dependants and not force:
                names = ", ".join(f"{d.instance_name} ({d.target}: {d.path})" for d in dependants)
                raise SetHasDependants(
                    f"set {snapshot_set.name} ({snapshot_set.id}) is still the copy-on-write base of: {names}; "
                    "`delete --force` copies the data into them first, or discard those instances",
                    dependants,
                )
            for dependant in dependants:
                self._flatten(dependant)
            self._remove_set(snapshot_set)
        return DeleteResult(snapshot_set.id, snapshot_set.name, dependants)

    def _remove_set(self, snapshot_set: SnapshotSet) -> None:
        """Mark deleting, remove data, delete the row: a crash in between leaves a 'deleting' row to finish."""
        catalog, repository = self.service.catalog, self.service.repository
        if snapshot_set.status is not SetStatus.DELETING:
            snapshot_set.status = SetStatus.DELETING
            catalog.update_set(snapshot_set)
        with deferred_signals():
            repository.remove(snapshot_set.id)
            leftover = repository.root / snapshot_set.id
            if leftover.exists():
                raise HypervisorError(
                    f"could not remove {leftover}; set {snapshot_set.id} stays 'deleting' until a later delete "
                    "or `freezeframe repair` removes it"
                )
            catalog.delete_set(snapshot_set.id)

    def dependants(self, snapshot_set: SnapshotSet) -> list[Dependant]:
        """Images whose backing file is one of the set's members: restore rows plus our instance folders."""
        members = {str(Path(m.path).resolve()): m for m in snapshot_set.members}
        if not members:
            return []
        rows = {r.path: r for r in self.restores.for_set(snapshot_set.id)}
        candidates = dict.fromkeys(rows)
        for folder in (self.instances_dir, self.verify_dir):
            if folder.is_dir():
                candidates.update(dict.fromkeys(str(p) for p in sorted(folder.glob("*/*.qcow2"))))
        found: list[tuple[str, str]] = []
        for path in candidates:
            if not Path(path).is_file():
                continue
            try:
                backing = backing_file(path)
            except HypervisorError:
                log.warning("cannot read %s to see whether it depends on set %s", path, snapshot_set.id)
                continue
            if backing in members:
                found.append((path, backing))
        if not found:
            return []
        users = ld.domains_using(self.service.hypervisor.conn, [p for p, _ in found])
        result = []
        for path, backing in found:
            row = rows.get(path)
            dom_target = users.get(path)
            uuid: str | None
            if dom_target is not None:
                dom, target = dom_target
                name, uuid, active = str(dom.name()), str(dom.UUIDString()), bool(dom.isActive())
            else:
                name = row.instance_name if row else Path(path).parent.name
                uuid = row.instance_uuid if row else None
                target = row.target if row else Path(path).stem
                active = False
            result.append(Dependant(name, uuid, target, path, members[backing].path, active))
        return result

    def _flatten(self, dependant: Dependant) -> None:
        """Copy the member's data into the child so it stands alone (running children: blockpull)."""
        if dependant.active and dependant.instance_uuid:
            dom = ld.require_domain(self.service.hypervisor.conn, dependant.instance_uuid, dependant.instance_name)
            ld.block_pull(dom, dependant.target)
        else:
            _run(
                ["qemu-img", "rebase", "-f", "qcow2", "-b", "", dependant.path],
                f"flattening {dependant.path} of {dependant.instance_name}",
            )
        if backing_file(dependant.path) is not None:
            raise HypervisorError(
                f"{dependant.path} of {dependant.instance_name} still has a backing file after flattening; "
                "the set was not deleted"
            )

    # ---- backup with rotation ------------------------------------------------------------------------

    def backup(
        self,
        instance: str,
        backup_type: str,
        rotation: int,
        *,
        metadata: dict[str, str] | None = None,
        consistency: Consistency = Consistency.FILESYSTEM,
        require: bool = False,
        name: str | None = None,
    ) -> BackupResult:
        """Nova's createBackup: a set tagged ``backup_type``, then only the newest ``rotation`` of that type stay."""
        if rotation < 0:
            raise InvalidRequest(f"--rotation {rotation}: must be 0 or more (how many backups to keep)")
        if not backup_type.strip():
            raise InvalidRequest("--type must name the backup type, e.g. daily or weekly")
        found = self.service.hypervisor.lookup(instance)
        when = _now()
        snapshot_set = self.service.snapshot(
            SnapshotRequest(
                instance=found.uuid,
                consistency=consistency,
                require=require,
                name=name or f"{found.name}-{backup_type}-{when:%Y%m%dT%H%M%S%fZ}",
                metadata=dict(metadata or {}),
                backup_type=backup_type,
            )
        )
        # Only a backup that succeeded gets here (the flow raises otherwise), so a failure deletes nothing.
        rotated, kept = self.rotate(found.uuid, backup_type, rotation)
        return BackupResult(snapshot_set, rotated, kept)

    def rotate(self, instance_uuid: str, backup_type: str, rotation: int) -> tuple[list[str], dict[str, str]]:
        """Delete the available sets of this type for this instance beyond the newest ``rotation``."""
        sets = self.service.catalog.list_sets(
            instance=instance_uuid, status=SetStatus.AVAILABLE, backup_type=backup_type
        )
        rotated: list[str] = []
        kept: dict[str, str] = {}
        for old in sets[rotation:]:
            try:
                self.delete(old.id)
                rotated.append(old.id)
            except (SetHasDependants, InstanceBusy) as exc:
                kept[old.id] = str(exc)
                log.warning("backup rotation kept set %s: %s", old.id, exc)
        return rotated, kept

    # ---- verify --------------------------------------------------------------------------------------

    def verify(self, set_ref: str, *, boot: bool = False) -> VerifyReport:
        """Recompute every member's SHA-256; with ``boot`` also boot a throw-away clone and check its disks."""
        snapshot_set = self.service.catalog.get_set(set_ref)
        if snapshot_set.status is not SetStatus.AVAILABLE:
            raise InvalidRequest(f"set {snapshot_set.name} is {snapshot_set.status}; only available sets have data")
        report = VerifyReport(snapshot_set.id, snapshot_set.name)
        with self.hold(f"set-{snapshot_set.id}", f"set {snapshot_set.name}"):
            self._verify_data(snapshot_set, report)
            if boot:
                if report.ok:
                    self._verify_boot(snapshot_set, report)
                else:
                    report.add("clone", "boot", False, "not booted: the member data does not match the catalog")
        return report

    def _verify_data(self, snapshot_set: SnapshotSet, report: VerifyReport) -> None:
        manifest: dict[str, str] = {}
        manifest_path = self.service.repository.root / snapshot_set.id / MANIFEST
        try:
            record = json.loads(manifest_path.read_text())
            manifest = {m["target"]: m.get("sha256") for m in record.get("members", [])}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            report.add("set", MANIFEST, False, f"{manifest_path} is missing or unreadable ({exc})")
        for member in snapshot_set.members:
            path = Path(member.path)
            if not path.is_file():
                report.add(member.target, "sha256", False, f"member {member.target}: {path} is missing")
                continue
            started = time.monotonic()
            actual = self.service.repository.checksum(path)
            took = time.monotonic() - started
            if actual != member.sha256:
                report.add(
                    member.target, "sha256", False,
                    f"member {member.target} ({path}) has SHA-256 {actual}, the catalog says {member.sha256}",
                )  # fmt: skip
            else:
                report.add(member.target, "sha256", True, f"{path.stat().st_size} bytes match ({took:.2f}s)")
            if manifest and manifest.get(member.target) != member.sha256:
                report.add(member.target, MANIFEST, False, f"{MANIFEST} disagrees with the catalog for {member.target}")

    def _verify_boot(self, snapshot_set: SnapshotSet, report: VerifyReport) -> None:
        """Boot a copy-on-write clone without network, ask its agent, shut it down, fsck its disks on the host."""
        hypervisor = self.service.hypervisor
        name = f"ff-verify-{snapshot_set.id[:8]}-{uuidlib.uuid4().hex[:6]}"
        directory = self.verify_dir / name
        with self.hold(f"name-{name}", f"instance name {name}"):
            disks = self._member_disks(snapshot_set)
            uuid: str | None = None
            try:
                started = time.monotonic()
                try:
                    uuid, restored = self._build(
                        snapshot_set, name, directory, disks, mode=COW, start=True, nics=[], record=False
                    )
                except FreezeframeError as exc:  # _build removed whatever it made
                    report.add("clone", "boot", False, f"the clone could not be built or started: {exc}")
                    return
                report.booted = True
                dom = ld.require_domain(hypervisor.conn, uuid, name)
                instance = hypervisor.lookup(uuid)
                answered = self._wait_agent(instance.uuid, started)
                mounts: dict[str, list[str]] = {}
                if answered is None:
                    report.add("clone", "guest agent", False, f"no answer within {self.boot_timeout_s:.0f} s of start")
                else:
                    report.add("clone", "guest agent", True, f"answered guest-ping {answered:.1f}s after start")
                    mounts = self._guest_mounts(instance.uuid, dom, [d.target for d in restored])
                clean = answered is not None and ld.shutdown_via_agent(dom, self.shutdown_timeout_s)
                if not clean:
                    ld.remove_domain(hypervisor.conn, uuid)  # destroy; its disks go with the folder below
                report.add(
                    "clone", "shutdown", clean,
                    "powered off through the agent (filesystems unmounted)" if clean else "had to be destroyed",
                )  # fmt: skip
                for disk in restored:
                    self._check_disk(directory, disk, mounts.get(disk.target, []) if answered else None, report)
            finally:
                with deferred_signals():
                    if uuid is not None:
                        try:
                            ld.remove_domain(hypervisor.conn, uuid)
                        except FreezeframeError:
                            log.exception("could not remove the verify clone %s", name)
                    shutil.rmtree(directory, ignore_errors=True)
                    if hypervisor.uri == "qemu:///system":  # libvirt keeps a log per domain name; this one is ours
                        with contextlib.suppress(OSError):
                            Path("/var/log/libvirt/qemu", f"{name}.log").unlink(missing_ok=True)

    def _wait_agent(self, instance_uuid: str, started: float) -> float | None:
        hypervisor = self.service.hypervisor
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

    def _guest_mounts(self, instance_uuid: str, dom: Any, targets: Sequence[str]) -> dict[str, list[str]]:
        """target -> mount points the guest reports (guest-get-fsinfo), matched by PCI address or device name."""
        hypervisor = self.service.hypervisor
        instance = hypervisor.lookup(instance_uuid)
        try:
            info = hypervisor.agent_command(instance, {"execute": "guest-get-fsinfo"}) or []
        except FreezeframeError as exc:
            log.warning("guest-get-fsinfo failed: %s", exc)
            return {}
        by_pci = {pci: target for target, pci in ld.disk_pci_addresses(dom).items()}
        mounts: dict[str, list[str]] = {t: [] for t in targets}
        for fs in info:
            for disk in fs.get("disk", []):
                pci = disk.get("pci-controller", {})
                key = (int(pci.get("domain", -1)), int(pci.get("bus", -1)), int(pci.get("slot", -1)),
                       int(pci.get("function", -1)))  # fmt: skip
                target: str | None = by_pci.get(key)
                if target is None:
                    dev = Path(str(disk.get("dev", ""))).name
                    target = dev if dev in mounts else None
                if target in mounts:
                    mounts[target].append(f"{fs.get('mountpoint')} ({fs.get('type')})")
        return mounts

    def _check_disk(self, directory: Path, disk: RestoredDisk, mounted: list[str] | None, report: VerifyReport) -> None:
        """fsck -n every filesystem of the clone's disk from the host, on a raw copy of the powered-off clone."""
        raw = directory / f"{disk.target}.check.raw"
        try:
            _run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", disk.path, str(raw)], f"reading {disk.path}")
            filesystems = probe_filesystems(raw)
            if not filesystems:
                report.add(disk.target, "filesystem", None, "no filesystem found on the disk (nothing to check)")
            checkable = [fs for fs in filesystems if fs.type != "swap"]
            for fs in filesystems:
                report.add(disk.target, f"fsck {fs.where}", *fsck(raw, fs))
            if mounted is not None and checkable:
                ok = len(mounted) >= len(checkable)
                detail = (
                    f"mounted in the guest at {', '.join(mounted)}" if mounted else "the guest did not mount it"
                ) + f" ({len(checkable)} filesystem(s) on the disk)"
                report.add(disk.target, "mounted", ok, detail)
        finally:
            raw.unlink(missing_ok=True)

    # ---- locks, markers, repair ---------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self, key: str, what: str) -> Iterator[None]:
        """The per-set/name/instance locks every lifecycle and portable operation takes, named for the user."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.service.locks.hold(key))
            except InstanceBusy:
                raise InstanceBusy(
                    f"{what} is in use by another freezeframe operation; wait for it to finish"
                ) from None
            yield

    def claim_instance_dir(self, name: str, directory: Path) -> Path:
        """Create a new instance's folder and its restore marker (so `repair` removes a half-made instance)."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir()
        except FileExistsError:
            raise InvalidRequest(
                f"{directory} already exists (left by an earlier instance named {name}?); "
                "remove it or choose another name"
            ) from None
        return self._write_marker("restore", name, {"name": name, "dir": str(directory), "uuid": None})

    def _write_marker(self, kind: str, key: str, data: dict[str, Any]) -> Path:
        self.markers_dir.mkdir(parents=True, exist_ok=True)
        path = self.markers_dir / f"{kind}-{key}.json"
        write_atomically(path, json.dumps({"kind": kind, "pid": os.getpid(), **data}).encode())
        return path

    def repair(self) -> list[str]:
        """Finish or undo what killed lifecycle operations left: half-made instances, reverts, deletions."""
        reports: list[str] = []
        markers = sorted(self.markers_dir.glob("*.json")) if self.markers_dir.is_dir() else []
        for marker in markers:
            try:
                data = json.loads(marker.read_text())
            except (OSError, ValueError):
                continue
            kind = data.get("kind")
            try:
                if kind == "restore":
                    name = str(data["name"])
                    with self.hold(f"name-{name}", f"instance name {name}"):
                        directory = Path(data["dir"])
                        self._undo_build(name, directory, data.get("uuid"), forget=True)
                        marker.unlink(missing_ok=True)
                        reports.append(f"{name}: removed an instance an interrupted restore/verify left half-made")
                elif kind == "revert":
                    uuid = marker.stem.removeprefix("revert-")
                    with self.hold(uuid, f"instance {uuid}"):
                        done = self._finish_revert(uuid)
                        if done:
                            reports.append(done)
            except InstanceBusy:
                reports.append(f"{marker.name}: its operation is still running; left alone")
        for snapshot_set in self.service.catalog.list_sets(status=SetStatus.DELETING):
            try:
                with self.hold(f"set-{snapshot_set.id}", f"set {snapshot_set.name}"):
                    self._remove_set(snapshot_set)
                    reports.append(f"set {snapshot_set.id} ({snapshot_set.name}): finished an interrupted delete")
            except InstanceBusy:
                reports.append(f"set {snapshot_set.id}: being deleted by another process; left alone")
        stale = [r.id for r in self.restores.all() if r.id is not None and not Path(r.path).exists()]
        if stale:
            self.restores.remove_ids(stale)
            reports.append(f"forgot {len(stale)} restore record(s) whose disks no longer exist")
        return reports

    # ---- lookups -------------------------------------------------------------------------------------

    def _available(self, set_ref: str) -> SnapshotSet:
        snapshot_set = self.service.catalog.get_set(set_ref)
        if snapshot_set.status is not SetStatus.AVAILABLE:
            raise InvalidRequest(
                f"set {snapshot_set.name} ({snapshot_set.id}) is {snapshot_set.status}; only available sets "
                "can be restored, reverted to or extracted"
            )
        return snapshot_set


# ---- host-side filesystem checks ------------------------------------------------------------------


@dataclass(frozen=True)
class Filesystem:
    type: str
    offset: int
    where: str
    """'whole disk' or 'partition N'."""


def _blkid(raw: Path, offset: int) -> dict[str, str]:
    result = subprocess.run(
        ["blkid", "-p", "-o", "export", "-O", str(offset), str(raw)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    if result.returncode not in (0, 2):  # 2: nothing found
        raise HypervisorError(f"blkid {raw} failed: {result.stderr.strip()}")
    values = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    return values


def probe_filesystems(raw: Path) -> list[Filesystem]:
    """Filesystems on a raw disk image: on the whole disk, or in each partition of its partition table."""
    whole = _blkid(raw, 0)
    if whole.get("TYPE"):
        return [Filesystem(whole["TYPE"], 0, "whole disk")]
    if not whole.get("PTTYPE"):
        return []
    result = _run(["partx", "-g", "-b", "-o", "NR,START,SECTORS", str(raw)], f"reading the partitions of {raw}", 60)
    found = []
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        number, start = parts[0], int(parts[1]) * _SECTOR
        probed = _blkid(raw, start)
        if probed.get("TYPE"):
            found.append(Filesystem(probed["TYPE"], start, f"partition {number}"))
    return found


def fsck(raw: Path, fs: Filesystem) -> tuple[bool | None, str]:
    """``e2fsck -n -f`` (read-only, forced) for ext2/3/4; other types are reported as not checked."""
    if fs.type == "swap":
        return None, "swap: nothing to check"
    if fs.type not in _EXT_TYPES:
        return None, f"{fs.type}: no read-only host checker wired in, not checked"
    device = f"{raw}?offset={fs.offset}" if fs.offset else str(raw)
    result = subprocess.run(["e2fsck", "-n", "-f", device], capture_output=True, text=True, check=False, timeout=3600)
    if result.returncode == 0:
        summary = (result.stdout.strip().splitlines() or ["clean"])[-1]
        return True, f"e2fsck -n -f: {fs.type} clean ({summary.split(': ', 1)[-1]})"
    tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
    return False, f"e2fsck -n -f exited {result.returncode}: {tail}"


__all__ = [
    "COW",
    "FULL",
    "BackupResult",
    "Check",
    "DeleteResult",
    "Dependant",
    "Lifecycle",
    "RestoreResult",
    "RestoredDisk",
    "RevertResult",
    "SetHasDependants",
    "VerifyFailed",
    "VerifyReport",
    "backing_file",
    "image_info",
    "probe_filesystems",
]
