"""Where the hosts of a group snapshot meet: one board per group set (PostgreSQL in a multi-host deployment)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class BarrierState:
    arrived: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """phase -> the hosts that reached it"""
    aborted_by: str | None = None
    reason: str | None = None


class BarrierBoard(Protocol):
    def arrive(self, group_set_id: str, host: str, phase: str) -> None:
        """Record that ``host`` reached ``phase`` (idempotent)."""

    def abort(self, group_set_id: str, host: str, reason: str) -> None:
        """Abort the barrier; the first abort's host and reason are kept."""

    def state(self, group_set_id: str) -> BarrierState: ...

    def forget(self, group_set_id: str) -> None:
        """Drop the board once the group set is decided (available or failed)."""


@dataclass(frozen=True)
class ShareOutcome:
    """How one host's share of a group set ended (its job's outcome)."""

    ok: bool
    error: str | None = None
    achieved: str | None = None
    """The weakest consistency level its sets reached."""
    window_ms: float | None = None
    set_ids: tuple[str, ...] = ()


class ShareJobs(Protocol):
    """Hand each host its share of a group snapshot (a job on that host's queue) and read how it ended."""

    def submit_share(self, host: str, body: Mapping[str, object]) -> str:
        """Queue the share; return its job id. Raise HostUnavailable when the host is down."""

    def outcome(self, job_id: str) -> ShareOutcome | None:
        """None while the job is queued or running."""
