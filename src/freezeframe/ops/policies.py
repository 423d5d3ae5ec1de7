"""Policies: their schedule (``--every`` or ``--cron``, croniter), and one run: snapshot, copy, prune.

Schedule: ticks are the interval's multiples from the policy's creation, or the cron expression's times (UTC).
A policy is due when a tick has passed since its last started tick; after downtime only the latest passed tick
runs (missed ticks are not replayed). Starting a tick is a compare-and-set in the store, so it starts once.

One run (``PolicyRun.run``): a set of the instance (tagged ``freezeframe.policy=<name>``); a copy to the policy's
remote; pruning of the policy's local sets (``keep``) and of its copies on the remote (``remote_keep``), each by
``ops/prune.py``. Locally, a set is also kept while a restored instance builds on it, and a pruned set that is
an incremental parent is merged into its children first (the lifecycle's delete), so no remaining set loses data;
on the remote a pruned parent stays, marked deleted, until no copy builds on it (``ops/remote_delete.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from freezeframe.errors import InvalidRequest
from freezeframe.flow import SnapshotRequest
from freezeframe.incremental import MODES
from freezeframe.model import Consistency, SetStatus, SnapshotSet
from freezeframe.ops import prune
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
    name: str, instance: str, *, every: str | None, cron: str | None, consistency: str = "filesystem",
    mode: str = "auto", keep: dict[str, int] | None = None, copy_to: str | None = None,
    remote_keep: dict[str, int] | None = None,
) -> Policy:  # fmt: skip
    """A policy from untrusted input (the CLI and the API call this)."""
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
        name=validate_name(name, "policy name"), instance=validate_name(instance, "instance"),
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
    copied_to: str | None = None
    deleted_local: list[str] = field(default_factory=list)
    deleted_remote: list[str] = field(default_factory=list)
    kept_local: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "set": self.set_id, "copied_to": self.copied_to,
            "deleted_local": self.deleted_local, "deleted_remote": self.deleted_remote, "kept_local": self.kept_local,
        }  # fmt: skip


@dataclass(frozen=True)
class RemoteCopies:
    """What a run needs of a remote: copy a set, list the policy's copies there, delete one (chain-aware)."""

    copy: Callable[[str, str], object]
    candidates: Callable[[str, str], list[prune.Candidate]]
    delete: Callable[[str, str], object]


class PolicyRun:
    def __init__(
        self,
        catalog: Catalog,
        restores: Restores,
        snapshot: Callable[[SnapshotRequest], SnapshotSet],
        delete_set: Callable[[str], object],
        remote: RemoteCopies,
    ) -> None:
        self.catalog = catalog
        self.restores = restores
        self.snapshot = snapshot
        self.delete_set = delete_set
        self.remote = remote

    def run(self, policy: Policy) -> RunReport:
        report = RunReport(policy.name)
        request = SnapshotRequest(
            policy.instance, Consistency(policy.consistency), mode=policy.mode, metadata={POLICY_KEY: policy.name}
        )
        made = self.snapshot(request)
        report.set_id = made.id
        if policy.copy_to is not None:
            self.remote.copy(made.id, policy.copy_to)
            report.copied_to = policy.copy_to
        report.kept_local, doomed = self._local_plan(policy, made)
        for set_id in doomed:
            self.delete_set(set_id)
            report.deleted_local.append(set_id)
        if policy.copy_to is not None and policy.remote_keep.any:
            remote_plan = prune.plan(self.remote.candidates(policy.copy_to, policy.name), policy.remote_keep)
            for set_id in remote_plan.delete:
                self.remote.delete(set_id, policy.copy_to)
                report.deleted_remote.append(set_id)
        return report

    def _local_plan(self, policy: Policy, made: SnapshotSet) -> tuple[dict[str, str], list[str]]:
        every = self.catalog.list_sets(instance=made.instance_uuid, status=SetStatus.AVAILABLE)
        mine = [s for s in every if s.metadata.get(POLICY_KEY) == policy.name]
        result = prune.plan([prune.Candidate(s.id, s.created_at, self._pin(s.id)) for s in mine], policy.keep)
        return result.keep, result.delete

    def _pin(self, set_id: str) -> str | None:
        restored = self.restores.for_set(set_id)
        return f"restored instance {restored[0].instance_name} builds on it" if restored else None


def remote_candidates(manifests: Sequence[dict[str, Any]], policy: str) -> list[prune.Candidate]:
    """The policy's copies on a remote, from their manifests (their sets may be gone locally)."""
    found = []
    for manifest in manifests:
        if manifest.get("metadata", {}).get(POLICY_KEY) == policy:
            created = datetime.fromisoformat(str(manifest["created_at"])).astimezone(UTC)
            found.append(prune.Candidate(str(manifest["id"]), created))
    return found
