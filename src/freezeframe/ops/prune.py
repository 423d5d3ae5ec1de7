"""Which sets a policy keeps: ``borg prune`` semantics (borg 1.2+), then freezeframe's own protections. Pure.

The keep rules, as borg documents them:

- ``--keep-daily 7`` keeps the newest set of each day, for the 7 most recent days that have sets (days without
  sets do not count); likewise hourly, weekly (ISO weeks, Monday to Sunday), monthly, yearly.
- ``--keep-last N`` keeps the N newest sets (borg's ``--keep-secondly``; here each set is its own period, so two
  sets in the same second both count).
- The rules are applied in the order last, hourly, daily, weekly, monthly, yearly, and a set kept by an earlier
  rule does not count towards a later rule's total.
- When a rule cannot fill its total, it keeps the oldest set too (borg 1.2: the first set goes on ageing until
  newer ones replace it).
- Periods are taken in UTC (borg uses local time: a host's time zone must not change what a policy keeps).

Then, whatever the rules say, these are kept: the newest set, and a set a restored instance still builds on
(copy-on-write). With no rule at all nothing is pruned (borg refuses to prune without a rule). Incremental chains
are the deleting side's business: a local delete merges the set into its children first (docs/incremental.md), a
remote delete keeps a parent, marked deleted, until no copy builds on it (ops/remote_delete.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")

PERIODS: dict[str, Callable[[str, datetime], str]] = {
    "last": lambda set_id, _when: set_id,
    "hourly": lambda _id, when: when.strftime("%Y-%m-%d %H"),
    "daily": lambda _id, when: when.strftime("%Y-%m-%d"),
    "weekly": lambda _id, when: when.strftime("%G-%V"),
    "monthly": lambda _id, when: when.strftime("%Y-%m"),
    "yearly": lambda _id, when: when.strftime("%Y"),
}


@dataclass(frozen=True)
class KeepRules:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for rule in RULES:
            value = getattr(self, rule)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"keep-{rule} must be a whole number >= 0, not {value!r}")

    @property
    def any(self) -> bool:
        return any(getattr(self, r) for r in RULES)

    def to_dict(self) -> dict[str, int]:
        return {r: getattr(self, r) for r in RULES}

    @classmethod
    def from_dict(cls, record: Mapping[str, int]) -> KeepRules:
        return cls(**{r: int(record.get(r, 0)) for r in RULES})


@dataclass(frozen=True)
class Candidate:
    """A set (or a set's copy on a remote) pruning may remove."""

    id: str
    created_at: datetime
    pinned: str | None = None
    """Why it must stay whatever the rules say (a restored instance uses it), or None."""


@dataclass
class PrunePlan:
    keep: dict[str, str] = field(default_factory=dict)
    """Set id -> why it is kept (``daily #3``, ``newest``, ``restored instance …``)."""
    delete: list[str] = field(default_factory=list)
    """Newest first."""


def keep_by_rules(items: Sequence[tuple[str, datetime]], rules: KeepRules) -> dict[str, str]:
    """borg's prune_split, rule after rule: the newest set of each period not yet kept, up to the rule's total."""
    ordered = sorted(items, key=lambda item: (item[1], item[0]), reverse=True)
    kept: dict[str, str] = {}
    for rule in RULES:
        total = getattr(rules, rule)
        if total == 0 or not ordered:
            continue
        period_of = PERIODS[rule]
        count, last_period = 0, None
        for set_id, when in ordered:
            period = period_of(set_id, when)
            if period == last_period:
                continue
            last_period = period
            if set_id not in kept:
                count += 1
                kept[set_id] = f"{rule} #{count}"
                if count == total:
                    break
        oldest = ordered[-1][0]
        if count < total and oldest not in kept:
            kept[oldest] = f"{rule} (oldest)"
    return kept


def plan(candidates: Sequence[Candidate], rules: KeepRules) -> PrunePlan:
    """What to keep (and why) and what to delete."""
    if not candidates:
        return PrunePlan()
    if not rules.any:
        return PrunePlan(keep={c.id: "no keep rule" for c in candidates})
    keep = keep_by_rules([(c.id, c.created_at) for c in candidates], rules)
    newest = max(candidates, key=lambda c: (c.created_at, c.id))
    keep.setdefault(newest.id, "newest")
    for c in candidates:
        if c.pinned is not None:
            keep.setdefault(c.id, c.pinned)
    ordered = sorted(candidates, key=lambda c: (c.created_at, c.id), reverse=True)
    return PrunePlan(keep=keep, delete=[c.id for c in ordered if c.id not in keep])
