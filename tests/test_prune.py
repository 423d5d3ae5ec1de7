"""The keep rules (ops/prune.py) over a simulated year of hourly sets, against an independent model of borg prune's
documented semantics, plus freezeframe's protections (the newest set, sets restored instances build on)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freezeframe.ops.prune import RULES, Candidate, KeepRules, keep_by_rules, plan

START = datetime(2025, 1, 1, tzinfo=UTC)
HOURS_IN_YEAR = 24 * 365


def model_keep(items: Sequence[tuple[str, datetime]], rules: dict[str, int]) -> dict[str, str]:
    """borg's documentation, read literally and written differently: group the sets by period (calendar fields),
    take the periods newest first, keep each period's newest set unless an earlier rule kept it, stop at the
    rule's total; a rule that could not reach its total also keeps the oldest set."""
    keys = {
        "last": lambda i, w: (i,),
        "hourly": lambda i, w: (w.year, w.month, w.day, w.hour),
        "daily": lambda i, w: (w.year, w.month, w.day),
        "weekly": lambda i, w: tuple(w.isocalendar()[:2]),
        "monthly": lambda i, w: (w.year, w.month),
        "yearly": lambda i, w: (w.year,),
    }
    newest_first = sorted(items, key=lambda x: (x[1], x[0]), reverse=True)
    kept: dict[str, str] = {}
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        total = rules.get(rule, 0)
        if not total or not items:
            continue
        newest_of: dict[tuple[int, ...] | tuple[str], str] = {}
        for set_id, when in newest_first:
            newest_of.setdefault(keys[rule](set_id, when), set_id)  # first seen = newest of its period
        chosen = [s for s in newest_of.values() if s not in kept][:total]
        for s in chosen:
            kept[s] = rule
        oldest = newest_first[-1][0]
        if len(chosen) < total and oldest not in kept:
            kept[oldest] = rule
    return kept


def hourly_year(missing: set[int]) -> list[tuple[str, datetime]]:
    return [(f"set-{h:05d}", START + timedelta(hours=h)) for h in range(HOURS_IN_YEAR) if h not in missing]


rule_counts = st.fixed_dictionaries({r: st.integers(min_value=0, max_value=40) for r in RULES})


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=rule_counts, missing=st.sets(st.integers(min_value=0, max_value=HOURS_IN_YEAR - 1), max_size=3000))
def test_keep_rules_match_the_model_over_a_year_of_hourly_sets(rules: dict[str, int], missing: set[int]) -> None:
    items = hourly_year(missing)
    got = keep_by_rules(items, KeepRules(**rules))
    assert set(got) == set(model_keep(items, rules))
    assert len(got) <= sum(rules.values()) + sum(1 for v in rules.values() if v)  # each rule: its total (+ oldest)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rules=rule_counts,
    missing=st.sets(st.integers(min_value=0, max_value=HOURS_IN_YEAR - 1), max_size=2000),
    pinned=st.sets(st.integers(min_value=0, max_value=HOURS_IN_YEAR - 1), max_size=5),
)
def test_the_plan_never_deletes_the_newest_or_a_pinned_set(
    rules: dict[str, int], missing: set[int], pinned: set[int]
) -> None:
    items = hourly_year(missing)
    candidates = [
        Candidate(set_id, when, pinned="restored instance" if int(set_id[4:]) in pinned else None)
        for set_id, when in items
    ]
    result = plan(candidates, KeepRules(**rules))
    ids = {c.id for c in candidates}
    assert set(result.keep) | set(result.delete) == ids and not set(result.keep) & set(result.delete)
    if not any(rules.values()):
        assert result.delete == []
        return
    assert items[-1][0] in result.keep  # the newest
    assert set(model_keep(items, rules)) <= set(result.keep)
    assert {c.id for c in candidates if c.pinned} <= set(result.keep)
    assert set(result.keep) == set(model_keep(items, rules)) | {items[-1][0]} | {c.id for c in candidates if c.pinned}
    assert result.delete == sorted(result.delete, reverse=True)  # newest first: children before their parents


def test_keep_daily_takes_the_newest_set_of_each_of_the_most_recent_days_that_have_sets() -> None:
    items = [(f"d{d}h{h}", START + timedelta(days=d, hours=h)) for d in (0, 1, 3, 4) for h in (1, 13)]
    assert set(keep_by_rules(items, KeepRules(daily=3))) == {"d4h13", "d3h13", "d1h13"}
    # a set kept by keep-last does not count for keep-daily, and its day is still covered (borg's prune_split)
    assert set(keep_by_rules(items, KeepRules(last=1, daily=2))) == {"d4h13", "d3h13", "d1h13"}
    # not enough days: the oldest set is kept too (borg 1.2)
    assert set(keep_by_rules(items, KeepRules(daily=10))) == {"d4h13", "d3h13", "d1h13", "d0h13", "d0h1"}


def test_weeks_are_iso_weeks_in_utc() -> None:
    sunday, monday = datetime(2025, 1, 5, 23, tzinfo=UTC), datetime(2025, 1, 6, 0, 30, tzinfo=UTC)
    assert set(keep_by_rules([("sun", sunday), ("mon", monday)], KeepRules(weekly=2))) == {"sun", "mon"}


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_keep_counts_are_whole_numbers(bad: object) -> None:
    with pytest.raises(ValueError, match="keep-daily"):
        KeepRules(daily=bad)  # type: ignore[arg-type]
