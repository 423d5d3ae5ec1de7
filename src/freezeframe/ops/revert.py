"""Roll an instance back to one of its sets, all disks together, in place; the instance must be shut off.

Every member is first copied to a temp file beside its disk; only when all copies are complete are they renamed
over the disks, with a marker listing the renames, so a SIGKILL in between is rolled forward by ``repair``.
An RBD disk whose member is a snapshot of that same image is rolled back in place (``rollback_to_snap``), after
the file copies and under the same marker, so ``repair`` finishes the rollbacks too.
A safety set of the current state is taken first unless asked not to.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from freezeframe.durable import fsync_path
from freezeframe.errors import InstanceBusy, InstanceNotFound, InvalidRequest, PreflightFailed
from freezeframe.flow import SnapshotRequest
from freezeframe.model import RBD_STORE, DiskSpec, Instance, InstanceState, Member, SnapshotSet
from freezeframe.ops.common import Holds, Lazy, Markers, Snapshot, Stores, available, member_disks, now
from freezeframe.ports import Catalog, Hypervisor, ImageRef, Images
from freezeframe.ports.volumes import RBD_PREFIX
from freezeframe.signals import deferred_signals
from freezeframe.volume_members import volume_images

log = logging.getLogger(__name__)
MARKER = "revert"
REVERTIBLE_FORMATS = ("qcow2", "raw")


@dataclass(frozen=True)
class RevertResult:
    instance_name: str
    instance_uuid: str
    set_id: str
    safety_set_id: str | None
    reverted: dict[str, str]
    """target -> disk file now holding the set's data."""
    untouched: list[str]


class Revert:
    def __init__(
        self,
        catalog: Catalog,
        hypervisor: Lazy[Hypervisor],
        snapshot: Snapshot,
        stores: Stores,
        images: Images,
        holds: Holds,
        markers: Markers,
    ) -> None:
        self.catalog = catalog
        self.hypervisor = hypervisor
        self.snapshot = snapshot
        self.stores = stores
        self.images = images
        self.holds = holds
        self.markers = markers

    def revert(self, set_ref: str, *, safety: bool = True) -> RevertResult:
        snapshot_set = available(self.catalog, set_ref)
        try:
            instance = self.hypervisor().lookup(snapshot_set.instance_uuid)
        except InstanceNotFound:
            raise InstanceNotFound(
                f"instance {snapshot_set.instance_name} ({snapshot_set.instance_uuid}) of set {snapshot_set.name} "
                f"no longer exists; build a new one with `freezeframe restore {snapshot_set.id} --as NAME`"
            ) from None
        plan, untouched = self._plan(snapshot_set, instance)
        safety_id = self._safety_set(snapshot_set, instance, untouched) if safety else None
        with self.holds.instance(instance.uuid, instance.name):
            self.finish(instance.uuid)
            instance = self.hypervisor().lookup(instance.uuid)
            plan, untouched = self._plan(snapshot_set, instance)
            self._copy_over(instance.uuid, plan)
        return RevertResult(
            instance_name=instance.name,
            instance_uuid=instance.uuid,
            set_id=snapshot_set.id,
            safety_set_id=safety_id,
            reverted={m.target: str(d.source_path) for m, d in plan},
            untouched=untouched,
        )

    def _safety_set(self, snapshot_set: SnapshotSet, instance: Instance, untouched: Sequence[str]) -> str:
        disks = {d.target for d in instance.hardware.disks}
        safety_set = self.snapshot(
            SnapshotRequest(
                instance=instance.uuid,
                name=f"{instance.name}-before-revert-{now():%Y%m%dT%H%M%S%fZ}",
                exclude_disks=tuple(t for t in untouched if t in disks),
                metadata={"freezeframe.safety_for": snapshot_set.id},
            )
        )
        return safety_set.id

    def _plan(self, snapshot_set: SnapshotSet, instance: Instance) -> tuple[list[tuple[Member, DiskSpec]], list[str]]:
        name, state = instance.name, instance.state
        if state is not InstanceState.SHUTOFF:
            raise InvalidRequest(
                f"{name} is {state}; revert only works on a shut-off instance: shut it down "
                f"(`virsh shutdown {name}`) and run revert again"
            )
        member_disks(snapshot_set, self.stores)
        by_target = {d.target: d for d in instance.hardware.disks if d.device == "disk"}
        plan = []
        problems = []
        for member in snapshot_set.members:
            disk = by_target.get(member.target)
            if disk is None:
                problems.append(f"{member.target}: the instance has no such disk any more")
            elif disk.volume == RBD_STORE or member.store == RBD_STORE:
                if member.store != RBD_STORE or disk.volume != RBD_STORE or not _same_image(member, disk):
                    problems.append(
                        f"{member.target}: an RBD disk rolls back only to a snapshot of that same image "
                        f"(disk {disk.source_path}, member {member.path})"
                    )
                else:
                    plan.append((member, disk))
            elif disk.source_type != "file" or not disk.source_path:
                problems.append(f"{member.target}: only file-backed disks can be reverted ({disk.source_type})")
            elif disk.format not in REVERTIBLE_FORMATS:
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
        """Convert every file member to a temp file beside its disk, then roll the RBD images back and rename all
        the temps over the disks."""
        pairs: list[tuple[Path, Path]] = []
        rollbacks = [member.path for member, disk in plan if disk.volume == RBD_STORE]
        marker: Path | None = None
        try:
            for member, disk in plan:
                if disk.volume == RBD_STORE:
                    continue
                dst = Path(str(disk.source_path))
                tmp = dst.with_name(f".{dst.name}.ff-revert.tmp")
                pairs.append((tmp, dst))
                self.images.convert(self.stores.of(member).source(member), ImageRef(tmp, disk.format))
                with contextlib.suppress(FileNotFoundError):
                    st = dst.stat()
                    os.chown(tmp, st.st_uid, st.st_gid)
                    tmp.chmod(st.st_mode & 0o7777)
                fsync_path(tmp)
            with deferred_signals():
                renames = [[str(t), str(d)] for t, d in pairs]
                marker = self.markers.write(MARKER, instance_uuid, {"renames": renames, "rollbacks": rollbacks})
                self._rollback_all(rollbacks)
                _rename_all(pairs)
                marker.unlink(missing_ok=True)
        except BaseException:
            if marker is None or not marker.exists():
                for tmp, _ in pairs:
                    tmp.unlink(missing_ok=True)
            else:
                log.error("revert of %s stopped half-way; `freezeframe repair` finishes it", instance_uuid)
            raise

    def finish(self, instance_uuid: str) -> str | None:
        """A revert killed between its renames is rolled forward: every temp was complete before the first."""
        marker = self.markers.path(MARKER, instance_uuid)
        data = self.markers.read(marker) if marker.exists() else None
        if data is None:
            return None
        pairs = [(Path(t), Path(d)) for t, d in data["renames"]]
        rollbacks = [str(source) for source in data.get("rollbacks", [])]
        self._rollback_all(rollbacks)
        _rename_all(pairs)
        marker.unlink(missing_ok=True)
        return f"finished an interrupted revert of {instance_uuid} ({len(pairs) + len(rollbacks)} disks)"

    def _rollback_all(self, sources: Sequence[str]) -> None:
        """In place, so repeatable: a rollback cut short by a kill is simply run again by ``finish``."""
        if sources:
            images = volume_images(self.stores.by_kind)
            for source in sources:
                images.rollback(source)

    def repair(self) -> list[str]:
        reports = []
        for path in self.markers.all():
            if not path.name.startswith(f"{MARKER}-"):
                continue
            uuid = path.stem.removeprefix(f"{MARKER}-")
            try:
                with self.holds.hold(uuid, f"instance {uuid}"):
                    done = self.finish(uuid)
            except InstanceBusy:
                reports.append(f"{path.name}: its operation is still running; left alone")
                continue
            if done:
                reports.append(done)
        return reports


def _same_image(member: Member, disk: DiskSpec) -> bool:
    """``rbd:POOL/IMAGE@SNAP`` is a snapshot of the disk's ``POOL/IMAGE``."""
    return member.path.startswith(RBD_PREFIX) and member.path[len(RBD_PREFIX) :].partition("@")[0] == disk.source_path


def _rename_all(pairs: Sequence[tuple[Path, Path]]) -> None:
    for tmp, dst in pairs:
        if tmp.exists():
            tmp.replace(dst)
    for directory in {dst.parent for _, dst in pairs}:
        fsync_path(directory)
