"""Policies: what to snapshot, when, what to keep and where to copy; and the store that keeps them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from freezeframe.ops.prune import KeepRules


@dataclass(frozen=True)
class Policy:
    name: str
    instance: str | None
    every_s: int | None = None
    cron: str | None = None
    consistency: str = "filesystem"
    mode: str = "auto"
    keep: KeepRules = field(default_factory=KeepRules)
    copy_to: str | None = None
    remote_keep: KeepRules = field(default_factory=KeepRules)
    group: str | None = None
    """A consistency group's policy snapshots the group (``instance`` is None then)."""

    @property
    def target(self) -> str:
        """What a run snapshots, for people: ``instance vm1`` or ``group web``."""
        return f"group {self.group}" if self.group is not None else f"instance {self.instance}"

    @property
    def schedule(self) -> str:
        return f"every {self.every_s}s" if self.every_s is not None else f"cron {self.cron}"

    def to_record(self) -> dict[str, Any]:
        return {
            "instance": self.instance, "every_s": self.every_s, "cron": self.cron, "consistency": self.consistency,
            "mode": self.mode, "keep": self.keep.to_dict(), "copy_to": self.copy_to,
            "remote_keep": self.remote_keep.to_dict(), "group": self.group,
        }  # fmt: skip

    @classmethod
    def from_record(cls, name: str, record: dict[str, Any]) -> Policy:
        return cls(
            name=name, instance=record.get("instance"), group=record.get("group"), every_s=record.get("every_s"),
            cron=record.get("cron"), consistency=str(record.get("consistency", "filesystem")),
            mode=str(record.get("mode", "auto")),
            keep=KeepRules.from_dict(record.get("keep", {})), copy_to=record.get("copy_to"),
            remote_keep=KeepRules.from_dict(record.get("remote_keep", {})),
        )  # fmt: skip


@dataclass(frozen=True)
class PolicyState:
    """A policy with what the scheduler knows of it."""

    policy: Policy
    paused: bool
    created_at: datetime
    last_tick: datetime | None = None
    """The schedule time of the last run started (missed ticks after downtime collapse into one run)."""
    last_job_id: str | None = None
    last_outcome: str | None = None
    last_error: str | None = None


class PolicyStore(Protocol):
    def add(self, policy: Policy, created_at: datetime) -> None: ...

    def get(self, name: str) -> PolicyState: ...

    def all(self) -> list[PolicyState]: ...

    def remove(self, name: str) -> None: ...

    def set_paused(self, name: str, paused: bool) -> None: ...

    def claim_tick(self, name: str, previous: datetime | None, tick: datetime) -> bool:
        """Record ``tick`` as started if the policy's last tick is still ``previous`` (one runner wins a tick)."""

    def record_outcome(self, name: str, job_id: str, outcome: str, error: str | None) -> None: ...
