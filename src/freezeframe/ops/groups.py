"""Consistency groups as one object for the CLI and the HTTP API: manage groups, snapshot them, and show,
restore, delete and rotate group sets (each member set through the ordinary lifecycle operations)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from freezeframe.errors import FreezeframeError, InvalidRequest, SetHasDependants
from freezeframe.group_barrier import Rendezvous
from freezeframe.group_flow import GroupFlow, GroupRequest
from freezeframe.group_model import GROUP_SET_KEY, Group, GroupMember, GroupSet
from freezeframe.lifecycle import DeleteResult, Lifecycle, RestoreResult
from freezeframe.model import Instance, SetStatus, SnapshotSet
from freezeframe.ports import Catalog, Hypervisor, ProgressCallback
from freezeframe.ports.groups import Groups
from freezeframe.validation import validate_backup_type, validate_name

Lookup = Callable[[str], Instance]


@dataclass
class GroupSetView:
    """A group set with its member sets (newest data from the catalog) and the instances it has no set for."""

    group_set: GroupSet
    sets: list[SnapshotSet]
    missing: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GroupBackupResult:
    view: GroupSetView
    rotated: list[str]
    kept: dict[str, str]


class GroupOps:
    def __init__(
        self,
        groups: Groups,
        catalog: Catalog,
        hypervisor: Callable[[], Hypervisor],
        group_flow: Callable[[], GroupFlow],
        lifecycle: Callable[[], Lifecycle],
    ) -> None:
        self.groups = groups
        self.catalog = catalog
        self._hypervisor = hypervisor
        self._group_flow = group_flow
        self._lifecycle = lifecycle

    # ---- groups -------------------------------------------------------------------------------------------

    def create(self, name: str, instances: Sequence[str], lookup: Lookup | None = None) -> Group:
        """``lookup``: where instances are found (default this host's hypervisor; the hosts' reports when the
        service runs over several hosts)."""
        members = self._resolve([], instances, lookup)
        group = Group(validate_name(name, "group name"), members, datetime.now(UTC))
        self.groups.create_group(group)
        return group

    def add(self, name: str, instances: Sequence[str], lookup: Lookup | None = None) -> Group:
        group = self.groups.get_group(name)
        members = self._resolve(group.members, instances, lookup)
        self.groups.set_members(name, members)
        return self.groups.get_group(name)

    def remove(self, name: str, instances: Sequence[str]) -> Group:
        group = self.groups.get_group(name)
        unknown = [i for i in instances if not any(i in (m.instance_name, m.instance_uuid) for m in group.members)]
        if unknown:
            raise InvalidRequest(f"group {name} has no instance {', '.join(unknown)}")
        kept = [m for m in group.members if not ({m.instance_name, m.instance_uuid} & set(instances))]
        self.groups.set_members(name, kept)
        return self.groups.get_group(name)

    def list_groups(self) -> list[Group]:
        return self.groups.list_groups()

    def show(self, name: str) -> Group:
        return self.groups.get_group(name)

    def delete(self, name: str) -> None:
        """The group only: its group sets stay (restorable, deletable) until deleted themselves."""
        self.groups.delete_group(name)

    def _resolve(
        self, have: Sequence[GroupMember], refs: Sequence[str], lookup: Lookup | None
    ) -> tuple[GroupMember, ...]:
        """Instances by name or UUID, checked now; the group keeps their UUIDs."""
        members = list(have)
        for ref in refs:
            found = lookup(ref) if lookup is not None else self._hypervisor().lookup(ref)
            if any(m.instance_uuid == found.uuid for m in members):
                raise InvalidRequest(f"instance {found.name} is in the group already")
            members.append(GroupMember(found.uuid, found.name))
        return tuple(members)

    # ---- group sets ---------------------------------------------------------------------------------------

    def snapshot(self, request: GroupRequest, progress: ProgressCallback | None = None) -> GroupSetView:
        return self._view(self._group_flow().snapshot(request, progress))

    def snapshot_share(
        self,
        group_set: GroupSet,
        members: Sequence[GroupMember],
        request: GroupRequest,
        rendezvous: Rendezvous,
        progress: ProgressCallback | None = None,
    ) -> tuple[list[SnapshotSet], float | None]:
        """This host's share of a group set spread over several hosts (see ``group_hosts``)."""
        return self._group_flow().snapshot_share(group_set, members, request, rendezvous, progress)

    def fail_member_set(self, group_set: GroupSet, snapshot_set: SnapshotSet) -> None:
        """A set of a group set that did not complete, held on this host (``GroupFlow.fail_member_set``); the
        caller holds the instance's lock."""
        self._group_flow().fail_member_set(group_set, snapshot_set)

    def show_set(self, ref: str) -> GroupSetView:
        return self._view(self.groups.get_group_set(ref))

    def list_sets(self, group: str | None = None) -> list[GroupSet]:
        return self.groups.list_group_sets(group)

    def _view(self, group_set: GroupSet) -> GroupSetView:
        sets = self.catalog.list_sets(metadata={GROUP_SET_KEY: group_set.id})
        sets.sort(key=lambda s: s.instance_name)
        have = {s.instance_uuid for s in sets}
        missing = [m.instance_name for m in group_set.instances if m.instance_uuid not in have]
        return GroupSetView(group_set, sets, missing)

    def restore(
        self,
        ref: str,
        prefix: str,
        *,
        start: bool = False,
        full: bool = False,
        progress: ProgressCallback | None = None,
    ) -> list[RestoreResult]:
        """Every instance of the group set as ``PREFIX<instance name>``; all or nothing."""
        view = self.usable(ref)
        names = {
            s.id: validate_name(f"{prefix}{s.instance_name}", "instance name (--as-prefix + name)") for s in view.sets
        }
        lifecycle = self._lifecycle()
        done: list[RestoreResult] = []
        try:
            for snapshot_set in view.sets:
                done.append(lifecycle.restore(snapshot_set.id, names[snapshot_set.id], start=start, full=full,
                                              progress=progress))  # fmt: skip
        except BaseException:
            for result in done:
                try:
                    lifecycle.discard(result.name)
                except FreezeframeError:
                    continue
            raise
        return done

    def delete_set(self, ref: str, *, force: bool = False) -> list[DeleteResult]:
        """Every member set, then the group set; refused before anything is deleted while one has dependants."""
        group_set = self.groups.get_group_set(ref)
        if group_set.status is SetStatus.CREATING:
            raise InvalidRequest(
                f"group set {group_set.name} is still being created; if no freezeframe process is running, "
                "run `freezeframe repair` first"
            )
        view = self._view(group_set)
        lifecycle = self._lifecycle()
        if not force:
            for snapshot_set in view.sets:
                if lifecycle.dependants(snapshot_set):
                    raise SetHasDependants(
                        f"set {snapshot_set.name} of group set {group_set.name} still backs restored instances; "
                        "`delete --force` copies the data into them first, or discard those instances",
                        lifecycle.dependants(snapshot_set),
                    )
        results = [lifecycle.delete(s.id, force=force) for s in view.sets]
        self.groups.delete_group_set(group_set.id)
        return results

    def usable(self, ref: str) -> GroupSetView:
        """The group set with every member set, if it is available (restore and export need all of them)."""
        view = self.show_set(ref)
        if view.group_set.status is not SetStatus.AVAILABLE:
            raise InvalidRequest(f"group set {view.group_set.name} is {view.group_set.status}, not available")
        if view.missing:
            raise InvalidRequest(
                f"group set {view.group_set.name} lacks the sets of {', '.join(view.missing)} (deleted on their own)"
            )
        return view

    def backup(self, request: GroupRequest, rotation: int) -> GroupBackupResult:
        """A group set tagged with a backup type, then only the newest ``rotation`` group sets of that type stay."""
        if request.backup_type is None:
            raise InvalidRequest("a group backup needs a backup type (--type)")
        validate_backup_type(request.backup_type)
        if rotation < 0:
            raise InvalidRequest(f"--rotation {rotation}: must be 0 or more (how many backups to keep)")
        view = self.snapshot(request)
        rotated, kept = self.rotate(request.group, request.backup_type, rotation)
        return GroupBackupResult(view, rotated, kept)

    def rotate(self, group: str, backup_type: str, rotation: int) -> tuple[list[str], dict[str, str]]:
        mine = [g for g in self.groups.list_group_sets(group)
                if g.backup_type == backup_type and g.status is SetStatus.AVAILABLE]  # fmt: skip
        rotated: list[str] = []
        kept: dict[str, str] = {}
        for old in mine[rotation:]:
            try:
                self.delete_set(old.id)
                rotated.append(old.id)
            except FreezeframeError as exc:
                kept[old.id] = str(exc)
        return rotated, kept

    def repair(self) -> list[str]:
        return self._group_flow().repair()
