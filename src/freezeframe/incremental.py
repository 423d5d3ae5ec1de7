"""Incremental sets: which members copy only what changed since the parent set, and why the others are full.

Decided before the guest is touched, from the catalog and the hypervisor's checkpoints: a member is incremental
only when its disk's dirty bitmap has recorded every write since the parent set's point in time. Anything that
cannot be trusted (a bitmap QEMU lost in a crash, a resized or replaced disk, a missing parent) gives a full
member with the reason; a set never fails for these reasons and never builds on a bitmap that could miss writes.

What a member is stays in its metadata (``freezeframe.kind`` …), so every record of it carries it unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from freezeframe.errors import FreezeframeError, InvalidRequest
from freezeframe.model import DiskSpec, Instance, InstanceState, Member, SetStatus, SnapshotSet
from freezeframe.ports import CaptureTarget, Catalog, ChangeTracking

log = logging.getLogger(__name__)

AUTO, FULL, INCREMENTAL = "auto", "full", "incremental"
MODES = (AUTO, FULL, INCREMENTAL)
DEFAULT_MAX_CHAIN = 7
"""``auto`` makes a full member after this many incrementals: a longer chain costs every read a deeper lookup."""
MAX_CHAIN_LIMIT = 1000
LIVE_CHECKPOINTS = 2
"""Checkpoints (one dirty bitmap per disk each) kept live per instance: the newest set's, which the next
incremental uses, and one before it, so deleting the newest set still leaves an incremental parent. Every live
bitmap is updated on each guest write."""

KIND_KEY = "freezeframe.kind"
PARENT_KEY = "freezeframe.parent_set"
CHECKPOINT_KEY = "freezeframe.checkpoint"
DEPTH_KEY = "freezeframe.chain_depth"
WRITTEN_KEY = "freezeframe.bytes_written"
REASON_KEY = "freezeframe.full_reason"
BITMAP_FORMAT = "qcow2"
"""Only qcow2 images keep persistent dirty bitmaps."""


def validate_mode(mode: str, max_chain: int) -> None:
    if mode not in MODES:
        raise InvalidRequest(f"--mode {mode!r}: must be one of {', '.join(MODES)}")
    if isinstance(max_chain, bool) or not isinstance(max_chain, int) or not 0 <= max_chain <= MAX_CHAIN_LIMIT:
        raise InvalidRequest(f"--max-chain {max_chain!r}: must be a whole number from 0 to {MAX_CHAIN_LIMIT}")


def checkpoint_name(set_id: str) -> str:
    return f"ff-{set_id}"


def kind_of(member: Member) -> str:
    return member.metadata.get(KIND_KEY, FULL)


def depth_of(member: Member) -> int:
    """Incrementals between this member and its full ancestor (0 for a full member)."""
    try:
        return int(member.metadata.get(DEPTH_KEY, "0"))
    except ValueError:
        return 0


def set_checkpoint(snapshot_set: SnapshotSet) -> str | None:
    return next((m.metadata[CHECKPOINT_KEY] for m in snapshot_set.members if CHECKPOINT_KEY in m.metadata), None)


@dataclass(frozen=True)
class MemberPlan:
    kind: str
    parent: Member | None = None
    since: str | None = None
    reason: str | None = None
    """Why a member of an ``auto``/``incremental`` set is full."""
    bitmap: bool = False
    """The disk records changes under the new set's checkpoint."""

    def metadata(self, checkpoint: str | None) -> dict[str, str]:
        meta = {KIND_KEY: self.kind}
        if self.parent is not None:
            meta[PARENT_KEY] = self.parent.set_id
            meta[DEPTH_KEY] = str(depth_of(self.parent) + 1)
        if self.reason:
            meta[REASON_KEY] = self.reason
        if self.bitmap and checkpoint:
            meta[CHECKPOINT_KEY] = checkpoint
        return meta


@dataclass
class ChainPlan:
    checkpoint: str | None
    """The checkpoint the set's capture creates (None: nothing records changes after this set)."""
    members: dict[str, MemberPlan] = field(default_factory=dict)

    def parents(self) -> dict[str, str]:
        """target -> parent member path, for the repository to make incremental targets."""
        return {t: p.parent.path for t, p in self.members.items() if p.parent is not None}

    def encode(self) -> str:
        """Member metadata by target, kept in the journal for a process that finishes the copy (--no-wait)."""
        return json.dumps({t: p.metadata(self.checkpoint) for t, p in self.members.items()})


def decode_metadata(text: str | None) -> dict[str, dict[str, str]]:
    if not text:
        return {}
    raw = json.loads(text)
    return {str(t): {str(k): str(v) for k, v in meta.items()} for t, meta in raw.items()}


def newest_parent(sets: Sequence[SnapshotSet]) -> SnapshotSet | None:
    """The newest available set of the instance (``sets`` newest first): only it can be the parent."""
    return sets[0] if sets else None


def plan_chain(
    *,
    mode: str,
    max_chain: int,
    instance: Instance,
    disks: Sequence[DiskSpec],
    set_id: str,
    parent: SnapshotSet | None,
    parent_present: bool,
    tracking: ChangeTracking | None,
) -> ChainPlan:
    """Per disk: full or incremental over the parent set's member, and why not incremental."""
    running = instance.state in (InstanceState.RUNNING, InstanceState.PAUSED)
    tracked = tracking is not None and running
    checkpoint = checkpoint_name(set_id) if tracked and any(d.format == BITMAP_FORMAT for d in disks) else None
    plan = ChainPlan(checkpoint)

    def full(disk: DiskSpec, reason: str | None) -> MemberPlan:
        bitmap = checkpoint is not None and disk.format == BITMAP_FORMAT
        return MemberPlan(FULL, reason=None if mode == FULL else reason, bitmap=bitmap)

    common = _set_reason(mode, instance, running, tracking, parent, parent_present)
    candidates: dict[str, Member] = {}
    for disk in disks:
        reason = common or _disk_reason(mode, max_chain, disk, parent)
        if reason is None and parent is not None:
            candidates[disk.target] = next(m for m in parent.members if m.target == disk.target)
        else:
            plan.members[disk.target] = full(disk, reason)
    if candidates and tracking is not None and parent is not None:
        since = set_checkpoint(parent) or ""
        try:
            lost = dict(tracking.untrusted(instance, since, parent.created_at, sorted(candidates)))
        except FreezeframeError as exc:  # a set never fails for change-tracking reasons
            lost = dict.fromkeys(candidates, f"the change-tracking state could not be read ({exc})")
        for target, member in candidates.items():
            disk = next(d for d in disks if d.target == target)
            if target in lost:
                plan.members[target] = full(disk, lost[target])
            else:
                plan.members[target] = MemberPlan(INCREMENTAL, parent=member, since=since, bitmap=True)
    return plan


def _set_reason(
    mode: str,
    instance: Instance,
    running: bool,
    tracking: ChangeTracking | None,
    parent: SnapshotSet | None,
    parent_present: bool,
) -> str | None:
    if mode == FULL:
        return "full requested"
    if tracking is None:
        return "this hypervisor has no change tracking"
    if not running:
        return f"{instance.name} is {instance.state}: changed blocks are read from a running QEMU only"
    if parent is None:
        return "first set of the instance (no earlier available set to build on)"
    if not parent_present:
        return f"the data of the parent set {parent.id} is missing from the repository"
    if set_checkpoint(parent) is None:
        return f"the parent set {parent.id} has no checkpoint (taken while shut off, or without change tracking)"
    return None


def _disk_reason(mode: str, max_chain: int, disk: DiskSpec, parent: SnapshotSet | None) -> str | None:
    if disk.format != BITMAP_FORMAT:
        return f"a {disk.format} disk cannot keep a dirty bitmap"
    member = next((m for m in parent.members if m.target == disk.target), None) if parent else None
    if member is None or CHECKPOINT_KEY not in member.metadata:
        return f"disk {disk.target} is not tracked in the parent set (added since, or excluded then)"
    if member.virtual_size != disk.virtual_size:
        return f"disk {disk.target} was resized since the parent set ({member.virtual_size} -> {disk.virtual_size})"
    if member.source_path != disk.source_path:
        return f"disk {disk.target} was replaced since the parent set ({member.source_path} -> {disk.source_path})"
    if mode == AUTO and depth_of(member) >= max_chain:
        return f"chain limit reached ({max_chain} incrementals since the last full member)"
    return None


def prunable(checkpoints: Sequence[str], sets: Sequence[SnapshotSet]) -> list[str]:
    """freezeframe's checkpoints beyond those of the newest ``LIVE_CHECKPOINTS`` sets (``sets`` newest first)."""
    keep = set(list(dict.fromkeys(c for c in (set_checkpoint(s) for s in sets) if c))[:LIVE_CHECKPOINTS])
    return [c for c in checkpoints if c.startswith("ff-") and c not in keep]


def with_tracking(plan: ChainPlan, targets: Sequence[CaptureTarget]) -> list[CaptureTarget]:
    """The capture targets with what each copies (changes since the parent's checkpoint) and records."""
    result = []
    for target in targets:
        member = plan.members.get(target.disk.target)
        checkpoint = plan.checkpoint if member is not None and member.bitmap else None
        result.append(replace(target, since=member.since if member else None, checkpoint=checkpoint))
    return result


def prune_checkpoints(tracking: ChangeTracking | None, catalog: Catalog, instance: Instance) -> None:
    """Keep at most ``LIVE_CHECKPOINTS`` live; a failure here costs guest write speed, never a set."""
    if tracking is None or instance.state is InstanceState.SHUTOFF:
        return
    try:
        sets = catalog.list_sets(instance=instance.uuid, status=SetStatus.AVAILABLE)
        for name in prunable(tracking.checkpoints(instance), [s for s in sets if s.instance_uuid == instance.uuid]):
            tracking.remove(instance, name)
    except FreezeframeError:
        log.exception("could not remove old checkpoints of %s", instance.name)
