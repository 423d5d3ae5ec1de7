"""Restore a set as a new instance, extract one member as a standalone image, discard what restore made.

Restored disks are copy-on-write children of the members by default (``--full``: standalone copies), recorded as
restore rows so that ``delete`` knows which sets still back which instances.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from freezeframe.durable import fsync_path
from freezeframe.errors import InstanceNotFound, InvalidRequest, PreflightFailed
from freezeframe.model import Member, RestoreRecord, SnapshotSet
from freezeframe.ops.common import Holds, Lazy, Stores, available, ensure_name_free, left_out, member_disks, now
from freezeframe.ops.instances import InstanceBuilder, domain_plan, member_disks_into, remove_backend_clones
from freezeframe.ports import Catalog, Domains, ImageRef, Images, MemberStore, ProgressCallback, Restores
from freezeframe.ports.volumes import RBD_PREFIX
from freezeframe.signals import deferred_signals
from freezeframe.validation import validate_name, validate_rbd_volume
from freezeframe.volume_members import volume_images

COW = "cow"
FULL = "full"
EXTRACT_FORMATS = ("qcow2", "raw")


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


class Restore:
    def __init__(
        self,
        catalog: Catalog,
        stores: Stores,
        images: Images,
        domains: Lazy[Domains],
        restores: Restores,
        builder: InstanceBuilder,
        holds: Holds,
        instances_dir: Path,
        domain_type: str = "qemu",
    ) -> None:
        self.catalog = catalog
        self.stores = stores
        self.images = images
        self.domains = domains
        self.restores = restores
        self.builder = builder
        self.holds = holds
        self.instances_dir = instances_dir
        self.domain_type = domain_type
        """Restored domains run under TCG by default (``qemu``); ``kvm`` where the host has it."""

    def restore(
        self,
        set_ref: str,
        name: str,
        *,
        start: bool = False,
        full: bool = False,
        progress: ProgressCallback | None = None,
    ) -> RestoreResult:
        """A new instance from the set, its disks copy-on-write over the members (``full``: independent copies)."""
        validate_name(name, "instance name")
        snapshot_set = available(self.catalog, set_ref)
        with self.holds.set(snapshot_set), self.holds.name(name):
            snapshot_set = available(self.catalog, snapshot_set.id)
            ensure_name_free(self.domains(), name)
            self.domains().check_nics(snapshot_set.hardware.nics)
            disks = member_disks(snapshot_set, self.stores)
            mode = FULL if full else COW
            with self.builder.building(name, self.instances_dir / name, forget_restores=True) as build:
                restored = member_disks_into(build.directory, disks, self.stores, full=full, progress=progress)
                self._record(snapshot_set.id, name, [s.target for s, _ in disks], restored, mode)
                plan = domain_plan(build, snapshot_set, disks, restored, domain_type=self.domain_type)
                uuid = self.builder.define(build, plan)
                self.restores.bind_uuid(name, uuid)
                if start:
                    self.domains().start(uuid)
        return RestoreResult(
            name=name,
            uuid=uuid,
            set_id=snapshot_set.id,
            set_name=snapshot_set.name,
            mode=mode,
            disks=[
                RestoredDisk(s.target, str(r.path), m.path, mode) for (s, m), r in zip(disks, restored, strict=True)
            ],
            started=start,
            left_out=left_out(snapshot_set),
        )

    def _record(self, set_id: str, name: str, targets: Sequence[str], restored: Sequence[ImageRef], mode: str) -> None:
        stale = [r.id for r in self.restores.for_instance(name) if r.id is not None]
        self.restores.remove_ids(stale)  # same name, no domain, no directory: left by someone's undefine
        when = now()
        self.restores.add(
            [RestoreRecord(set_id, name, t, str(r.path), mode, when) for t, r in zip(targets, restored, strict=True)]
        )

    # ---- discard ---------------------------------------------------------------------------------------------

    def discard(self, name: str) -> list[str]:
        """Remove an instance that restore or import made: its domain, its disks under instances/, its rows."""
        validate_name(name, "instance name")
        directory = self.instances_dir / name
        rows = self.restores.for_instance(name)
        if not rows and not directory.exists():
            raise InstanceNotFound(
                f"{name!r} is not an instance restored or imported by freezeframe (no restore record, no "
                f"{directory}); freezeframe only discards what it made"
            )
        done = []
        with self.holds.name(name), deferred_signals():
            for uuid in sorted({r.instance_uuid for r in rows if r.instance_uuid}):
                if self.domains().remove(uuid):
                    done.append(f"removed domain {name} ({uuid})")
            if self.builder.remove_domain_in(name, directory):
                done.append(f"removed domain {name}")
            recorded = [r.path for r in rows]
            done += remove_backend_clones(self.stores, directory, recorded)
            if directory.exists():
                shutil.rmtree(directory)
                done.append(f"removed {directory}")
            self.restores.remove_instance(name)
        return done

    # ---- extract one volume --------------------------------------------------------------------------------

    def extract(self, set_ref: str, target: str, to: Path, fmt: str = "qcow2") -> Path:
        """One member as a standalone image at ``to``; never overwrites (link(2) fails if ``to`` appears).

        ``to`` = ``rbd:POOL/IMAGE``: a new RBD image (raw guest data, ``fmt`` does not apply), whatever the member's
        store; made, filled, and removed again if the copy fails.
        """
        if str(to).startswith(RBD_PREFIX):
            return self._extract_to_volume(set_ref, target, validate_rbd_volume(str(to)))
        if fmt not in EXTRACT_FORMATS:
            raise InvalidRequest(f"--format {fmt!r}: use one of {', '.join(EXTRACT_FORMATS)}")
        snapshot_set, member, store = self._member_of(set_ref, target)
        to = Path(to).absolute()
        if to.exists() or to.is_symlink():
            raise InvalidRequest(f"{to} already exists; freezeframe does not overwrite it: choose another --to")
        if not to.parent.is_dir():
            raise InvalidRequest(f"directory {to.parent} does not exist; create it first")
        tmp = to.with_name(f".{to.name}.ff-{uuidlib.uuid4().hex[:8]}.tmp")
        with self.holds.set(snapshot_set):
            try:
                self.images.convert(store.source(member), ImageRef(tmp, fmt))
                tmp.chmod(0o600)  # a guest's disk: readable by its owner only
                fsync_path(tmp)
                _publish(tmp, to)
                fsync_path(to.parent)
            finally:
                tmp.unlink(missing_ok=True)
        return to

    def _member_of(self, set_ref: str, target: str) -> tuple[SnapshotSet, Member, MemberStore]:
        snapshot_set = available(self.catalog, set_ref)
        member = next((m for m in snapshot_set.members if m.target == target), None)
        if member is None:
            raise InvalidRequest(
                f"set {snapshot_set.name} has no disk {target!r} (its disks: "
                f"{', '.join(m.target for m in snapshot_set.members)})"
            )
        store = self.stores.of(member)
        if not store.present(member):
            raise PreflightFailed(
                f"member {target} of set {snapshot_set.name} is missing its data ({member.path}); "
                f"check the set with `freezeframe verify {snapshot_set.id}`"
            )
        return snapshot_set, member, store

    def _extract_to_volume(self, set_ref: str, target: str, volume: str) -> Path:
        images = volume_images(self.stores.by_kind)
        snapshot_set, member, store = self._member_of(set_ref, target)
        with self.holds.set(snapshot_set):
            ref = images.new_image(volume, member.virtual_size)
            try:
                self.images.convert(store.source(member), ref, existing=True)
            except BaseException:  # KeyboardInterrupt too: no half-written image stays behind
                images.remove_image(volume)
                raise
        return Path(f"{RBD_PREFIX}{volume}")


def _publish(tmp: Path, to: Path) -> None:
    """Give the finished file its name without ever replacing a file that appeared meanwhile."""
    appeared = InvalidRequest(f"{to} appeared while extracting; it was left as it is")
    try:
        os.link(tmp, to)
    except FileExistsError:
        raise appeared from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP):
            raise
        if to.exists():  # no hard links on this filesystem: check, then rename
            raise appeared from None
        tmp.rename(to)
