"""Policies: their schedule (``--every`` or ``--cron``, croniter), and one run: snapshot, copy, prune.

Schedule: ticks are the interval's multiples from the policy's creation, or the cron expression's times (UTC).
A policy is due when a tick has passed since its last started tick; after downtime only the latest passed tick
runs (missed ticks are not replayed). Starting a tick is a compare-and-set in the store, so it starts once.

One run (``PolicyRun.run``): a set of the instance (tagged ``freezeframe.policy=<name>``), or a group set of the
group (every member set tagged); a copy of each new set to the policy's remote; pruning of the policy's local sets
(``keep``) and of its copies on the remote (``remote_keep``), each by ``ops/prune.py`` - by set, or for a group
policy by whole group set. Locally, a set (a group set: any member) is also kept while a restored instance builds
on it, and a pruned set that is an incremental parent is merged into its children first (the lifecycle's delete),
so no remaining set loses data; on the remote a pruned parent stays, marked deleted, until no copy builds on it
(``ops/remote_delete.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from freezeframe.errors import InvalidRequest
from freezeframe.flow import SnapshotRequest
from freezeframe.group_flow import GroupRequest
from freezeframe.group_model import GROUP_SET_KEY
from freezeframe.incremental import AUTO, MODES
from freezeframe.model import Consistency, SetStatus, SnapshotSet
from freezeframe.ops import prune
from freezeframe.ops.groups import GroupSetView
from freezeframe.ports import Catalog, Restores
from freezeframe.ports.policies import Policy, PolicyState
from freezeframe.validation import validate_name

POLICY_KEY = "freezeframe.policy"
"""Set metadata: the policy that made the set (pruning considers only these, like ``borg prune -a``)."""
MIN_EVERY_S = 10
_EVERY = re.compile(r"(\d{1,6})([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_every(text: str) -> int:
    match = _EVERY.fullmatch(text.strip())
    if match is None:
        raise InvalidRequest(f"--every {text[:40]!r}: a number and a unit, like 30m, 1h, 1d (s m h d w)")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds < MIN_EVERY_S:
        raise InvalidRequest(f"--every {text!r}: at least {MIN_EVERY_S} seconds")
    return seconds


def validate_cron(expression: str) -> str:
    from croniter import croniter

    if len(expression) > 100 or not croniter.is_valid(expression):
        raise InvalidRequest(f"--cron {expression[:60]!r} is not a cron expression (like '0 2 * * *')")
    return expression


def new_policy(
    name: str, instance: str | None, *, every: str | None, cron: str | None, consistency: str = "filesystem",
    mode: str = "auto", keep: dict[str, int] | None = None, copy_to: str | None = None,
    remote_keep: dict[str, int] | None = None, group: str | None = None,
) -> Policy:  # fmt: skip
    """A policy from untrusted input (the CLI and the API call this)."""
    if (instance is None) == (group is None):
        raise InvalidRequest("say what the policy snapshots: exactly one of --instance INSTANCE or --group GROUP")
    if group is not None and mode != AUTO:
        raise InvalidRequest(f"--mode {mode!r}: a group policy snapshots its group as `group snapshot` does (auto)")
    if (every is None) == (cron is None):
        raise InvalidRequest("give exactly one schedule: --every INTERVAL or --cron EXPRESSION")
    if consistency not in {c.value for c in Consistency}:
        raise InvalidRequest(f"--consistency {consistency!r}: one of crash, filesystem, application")
    if mode not in MODES:
        raise InvalidRequest(f"--mode {mode!r}: one of {', '.join(MODES)}")
    try:
        keep_rules, remote_rules = prune.KeepRules(**(keep or {})), prune.KeepRules(**(remote_keep or {}))
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"keep rules: {exc}") from None
    if remote_rules.any and copy_to is None:
        raise InvalidRequest("--remote-keep-… needs --copy-to REMOTE")
    return Policy(
        name=validate_name(name, "policy name"),
        instance=None if instance is None else validate_name(instance, "instance"),
        group=None if group is None else validate_name(group, "group name"),
        every_s=None if every is None else parse_every(every), cron=None if cron is None else validate_cron(cron),
        consistency=consistency, mode=mode, keep=keep_rules,
        copy_to=None if copy_to is None else validate_name(copy_to, "remote name"), remote_keep=remote_rules,
    )  # fmt: skip


# ---- schedule -----------------------------------------------------------------------------------------------


def latest_tick(policy: Policy, created_at: datetime, now: datetime) -> datetime | None:
    """The last schedule time at or before ``now`` (None before the first)."""
    if policy.every_s is not None:
        periods = int((now - created_at).total_seconds() // policy.every_s)
        return created_at + timedelta(seconds=periods * policy.every_s) if periods >= 1 else None
    from croniter import croniter

    assert policy.cron is not None
    previous: datetime = croniter(policy.cron, now + timedelta(microseconds=1)).get_prev(datetime)
    return previous if previous > created_at else None


def due_tick(state: PolicyState, now: datetime) -> datetime | None:
    """The tick to run now, if any: the latest passed tick, when it is newer than the last started one."""
    if state.paused:
        return None
    tick = latest_tick(state.policy, state.created_at, now)
    if tick is None or (state.last_tick is not None and tick <= state.last_tick):
        return None
    return tick


# ---- one run ------------------------------------------------------------------------------------------------


@dataclass
class RunReport:
    policy: str
    set_id: str | None = None
    group_set_id: str | None = None
    member_sets: list[str] = field(default_factory=list)
    """The sets the run made (one, or one per instance of the group)."""
    copied_to: str | None = None
    deleted_local: list[str] = field(default_factory=list)
    deleted_remote: list[str] = field(default_factory=list)
    kept_local: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "set": self.set_id, "group_set": self.group_set_id, "sets": self.member_sets,
            "copied_to": self.copied_to, "deleted_local": self.deleted_local, "deleted_remote": self.deleted_remote,
            "kept_local": self.kept_local,
        }  # fmt: skip


@dataclass(frozen=True)
class RemoteCopies:
    """What a run needs of a remote: copy a set, read the manifests of the copies there, delete a copy (chain-aware)."""

    copy: Callable[[str, str], object]
    manifests: Callable[[str], list[dict[str, Any]]]
    delete: Callable[[str, str], object]


@dataclass(frozen=True)
class GroupRuns:
    """What a group policy's run needs of the group operations (``ops/groups.py``)."""

    snapshot: Callable[[GroupRequest], GroupSetView]
    group_sets: Callable[[str], list[GroupSetView]]
    """The group's group sets, each with its member sets."""
    delete: Callable[[str], object]
    """A whole group set: every member set (merged into incremental children first), then its record."""


class PolicyRun:
    """One run of a policy. Pruning works on units: a set for an instance's policy, a whole group set for a
    group's (its member sets go together, locally and on the remote, so no group set is left half-kept)."""

    def __init__(
        self,
        catalog: Catalog,
        restores: Restores,
        snapshot: Callable[[SnapshotRequest], SnapshotSet],
        delete_set: Callable[[str], object],
        remote: RemoteCopies,
        groups: GroupRuns | None = None,
    ) -> None:
        self.catalog = catalog
        self.restores = restores
        self.snapshot = snapshot
        self.delete_set = delete_set
        self.remote = remote
        self.groups = groups

    def run(self, policy: Policy) -> RunReport:
        report = RunReport(policy.name)
        if policy.group is not None:
            candidates, delete = self._snapshot_group(policy, report), self._group_runs().delete
        else:
            candidates, delete = self._snapshot_instance(policy, report), self.delete_set
        if policy.copy_to is not None:
            for set_id in report.member_sets:
                self.remote.copy(set_id, policy.copy_to)
            report.copied_to = policy.copy_to
        local = prune.plan(candidates, policy.keep)
        report.kept_local = local.keep
        for unit in local.delete:
            delete(unit)
            report.deleted_local.append(unit)
        if policy.copy_to is not None and policy.remote_keep.any:
            self._prune_remote(policy, policy.copy_to, report)
        return report

    def _snapshot_instance(self, policy: Policy, report: RunReport) -> list[prune.Candidate]:
        """The new set; returns the policy's sets of the instance, the candidates of local pruning."""
        assert policy.instance is not None
        request = SnapshotRequest(
            policy.instance, Consistency(policy.consistency), mode=policy.mode, metadata={POLICY_KEY: policy.name}
        )
        made = self.snapshot(request)
        report.set_id = made.id
        report.member_sets = [made.id]
        every = self.catalog.list_sets(instance=made.instance_uuid, status=SetStatus.AVAILABLE)
        mine = [s for s in every if s.metadata.get(POLICY_KEY) == policy.name]
        return [prune.Candidate(s.id, s.created_at, self._pin([s])) for s in mine]

    def _snapshot_group(self, policy: Policy, report: RunReport) -> list[prune.Candidate]:
        """The new group set; returns the policy's available group sets of the group (candidates, by group set)."""
        assert policy.group is not None
        groups = self._group_runs()
        request = GroupRequest(policy.group, Consistency(policy.consistency), metadata={POLICY_KEY: policy.name})
        made = groups.snapshot(request)
        report.group_set_id = made.group_set.id
        report.member_sets = [s.id for s in made.sets]
        mine = [
            view for view in groups.group_sets(policy.group)
            if view.group_set.status is SetStatus.AVAILABLE and any(s.metadata.get(POLICY_KEY) == policy.name
                                                                    for s in view.sets)
        ]  # fmt: skip
        return [prune.Candidate(v.group_set.id, v.group_set.created_at, self._pin(v.sets)) for v in mine]

    def _group_runs(self) -> GroupRuns:
        if self.groups is None:
            raise InvalidRequest("group policies need the consistency-group operations, which this service lacks")
        return self.groups

    def _pin(self, sets: Sequence[SnapshotSet]) -> str | None:
        for snapshot_set in sets:
            restored = self.restores.for_set(snapshot_set.id)
            if restored:
                return f"restored instance {restored[0].instance_name} builds on set {snapshot_set.name}"
        return None

    def _prune_remote(self, policy: Policy, remote: str, report: RunReport) -> None:
        candidates, members = remote_units(self.remote.manifests(remote), policy.name)
        for unit in prune.plan(candidates, policy.remote_keep).delete:
            for set_id in members[unit]:
                self.remote.delete(set_id, remote)
            report.deleted_remote.append(unit)


def remote_units(
    manifests: Sequence[dict[str, Any]], policy: str
) -> tuple[list[prune.Candidate], dict[str, list[str]]]:
    """The policy's copies on a remote, from their manifests (their sets may be gone locally), as pruning units:
    a set, or a group set (its member copies together, dated by its newest member). Returns the candidates and
    each unit's member set ids."""
    created: dict[str, datetime] = {}
    members: dict[str, list[str]] = {}
    for manifest in manifests:
        metadata = manifest.get("metadata", {})
        if metadata.get(POLICY_KEY) != policy:
            continue
        set_id = str(manifest["id"])
        unit = str(metadata.get(GROUP_SET_KEY) or set_id)
        when = datetime.fromisoformat(str(manifest["created_at"])).astimezone(UTC)
        created[unit] = max(created.get(unit, when), when)
        members.setdefault(unit, []).append(set_id)
    return [prune.Candidate(unit, when) for unit, when in created.items()], members
