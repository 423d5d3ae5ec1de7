"""Policies without a guest: the schedule (every/cron, missed ticks collapse), one start per tick, a run's
snapshot/copy/prune over scripted parts, outcomes and failures recorded, and the serve scheduler's
never-two-at-once rule on a real job runner. tests/test_remote_restore.py runs a policy on a real guest."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import run_cli
from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.policy_store import CatalogPolicies
from freezeframe.adapters.service_store import JobStore
from freezeframe.api.jobs import JobRunner
from freezeframe.api.policy_scheduler import SKIPPED, PolicyScheduler
from freezeframe.errors import CaptureFailed, InvalidRequest
from freezeframe.flow import SnapshotRequest
from freezeframe.group_flow import GroupRequest
from freezeframe.group_model import GROUP_KEY, GROUP_SET_KEY, GroupSet
from freezeframe.model import Consistency, Hardware, RestoreRecord, SetStatus, SnapshotSet
from freezeframe.ops.groups import GroupSetView
from freezeframe.ops.policies import POLICY_KEY, GroupRuns, PolicyRun, RemoteCopies, due_tick, new_policy, remote_units
from freezeframe.ports.policies import PolicyState
from freezeframe.scheduling import Policies
from group_fakes import GroupHypervisor, use_scripted_cli

T0 = datetime(2026, 1, 5, 0, 0, tzinfo=UTC)


def state(policy_kw: dict[str, Any], last_tick: datetime | None = None, paused: bool = False) -> PolicyState:
    return PolicyState(new_policy("p", "vm1", **policy_kw), paused, T0, last_tick)


def test_every_ticks_from_creation_and_missed_ticks_collapse_into_one() -> None:
    every = {"every": "1h", "cron": None}
    assert due_tick(state(every), T0 + timedelta(minutes=59)) is None
    assert due_tick(state(every), T0 + timedelta(minutes=61)) == T0 + timedelta(hours=1)
    assert due_tick(state(every, T0 + timedelta(hours=1)), T0 + timedelta(minutes=119)) is None
    # five hours of downtime: one run, for the latest tick only
    assert due_tick(state(every, T0 + timedelta(hours=1)), T0 + timedelta(hours=6, minutes=5)) == T0 + timedelta(
        hours=6
    )
    assert due_tick(state(every, paused=True), T0 + timedelta(hours=3)) is None


def test_cron_ticks_in_utc() -> None:
    nightly = {"every": None, "cron": "0 2 * * *"}
    assert due_tick(state(nightly), T0 + timedelta(hours=1)) is None
    assert due_tick(state(nightly), T0 + timedelta(days=2, hours=5)) == T0 + timedelta(days=2, hours=2)
    assert due_tick(state(nightly, T0 + timedelta(days=2, hours=2)), T0 + timedelta(days=2, hours=23)) is None


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"every": "1h", "cron": "0 2 * * *"}, "exactly one schedule"),
        ({"every": None, "cron": None}, "exactly one schedule"),
        ({"every": "5s", "cron": None}, "at least"),
        ({"every": "1 hour", "cron": None}, "a number and a unit"),
        ({"every": None, "cron": "61 * * * *"}, "not a cron expression"),
        ({"every": "1h", "cron": None, "keep": {"daily": -1}}, "keep-daily"),
        ({"every": "1h", "cron": None, "remote_keep": {"last": 1}}, "--copy-to"),
        ({"every": "1h", "cron": None, "consistency": "perfect"}, "consistency"),
    ],
)
def test_bad_policies_are_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        new_policy("p", "vm1", **kw)


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[SqlCatalog]:
    with SqlCatalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}") as opened:
        yield opened


def test_a_tick_starts_once(catalog: SqlCatalog) -> None:
    store = CatalogPolicies(catalog)
    store.add(new_policy("p", "vm1", every="1h", cron=None), T0)
    tick = T0 + timedelta(hours=1)
    assert store.claim_tick("p", None, tick)
    assert not store.claim_tick("p", None, tick)  # a second scheduler that read the same state loses
    assert store.get("p").last_tick == tick


class ScriptedSets:
    """The catalog and the snapshot a run uses: each snapshot is a new available set, an hour after the last."""

    def __init__(self) -> None:
        self.sets: list[SnapshotSet] = []
        self.deleted: list[str] = []
        self.restored: dict[str, str] = {}

    def snapshot(self, request: SnapshotRequest) -> SnapshotSet:
        made = SnapshotSet(
            id=str(uuid.uuid4()), name=f"s{len(self.sets)}", instance_name=request.instance, instance_uuid="u1",
            requested=request.consistency, status=SetStatus.AVAILABLE,
            created_at=T0 + timedelta(hours=len(self.sets)), hardware=Hardware(1, 1024, "x86_64", None),
            metadata=dict(request.metadata),
        )  # fmt: skip
        self.sets.append(made)
        return made

    def list_sets(self, **filters: Any) -> list[SnapshotSet]:
        return [s for s in self.sets if s.id not in self.deleted]

    def delete(self, set_id: str) -> None:
        self.deleted.append(set_id)

    def for_set(self, set_id: str) -> list[RestoreRecord]:
        name = self.restored.get(set_id)
        return [RestoreRecord(set_id, name, "vda", "/x", "cow", T0)] if name else []


def manifest(snapshot_set: SnapshotSet) -> dict[str, Any]:
    """The fields of a copy's manifest that pruning reads (adapters write the whole set record)."""
    return {"id": snapshot_set.id, "created_at": snapshot_set.created_at.isoformat(),
            "metadata": dict(snapshot_set.metadata)}  # fmt: skip


def test_a_run_snapshots_copies_and_prunes_local_and_remote_separately() -> None:
    sets = ScriptedSets()
    copied: list[tuple[str, str]] = []
    remote_deleted: list[str] = []

    def manifests(remote: str) -> list[dict[str, Any]]:
        there = {s for s, r in copied if r == remote} - set(remote_deleted)
        return [manifest(s) for s in sets.sets if s.id in there]

    remote = RemoteCopies(lambda s, r: copied.append((s, r)), manifests, lambda s, r: remote_deleted.append(s))
    run = PolicyRun(sets, sets, sets.snapshot, sets.delete, remote)  # type: ignore[arg-type]
    policy = new_policy("p", "vm1", every="1h", cron=None, keep={"last": 2}, copy_to="site",
                        remote_keep={"last": 3})  # fmt: skip
    for _ in range(3):
        run.run(policy)
    sets.restored[sets.sets[2].id] = "clone-of-s2"  # a restored instance builds on s2 from now on
    reports = [run.run(policy) for _ in range(3)]
    ids = [s.id for s in sets.sets]
    assert all(s.metadata == {POLICY_KEY: "p"} for s in sets.sets)
    assert [c[0] for c in copied] == ids and {c[1] for c in copied} == {"site"}
    assert sets.deleted == [ids[0], ids[1], ids[3]]  # keep-last 2 locally, s2 pinned by its restored instance
    assert reports[-1].kept_local[ids[2]].startswith("restored instance clone-of-s2")
    assert remote_deleted == [ids[0], ids[1], ids[2]]  # remote-keep-last 3 on the remote, independently
    assert ids[5] in reports[-1].kept_local


def _policies(catalog: SqlCatalog, run: PolicyRun) -> Policies:
    return Policies(CatalogPolicies(catalog), JobStore(catalog), lambda: run)


def test_a_failed_run_is_a_failed_job_and_shows_on_the_policy(catalog: SqlCatalog) -> None:
    sets = ScriptedSets()

    def broken(request: SnapshotRequest) -> SnapshotSet:
        raise CaptureFailed("the backup job failed: disk full")

    remote = RemoteCopies(lambda s, r: None, lambda r: [], lambda s, r: None)
    policies = _policies(catalog, PolicyRun(sets, sets, broken, sets.delete, remote))  # type: ignore[arg-type]
    policies.create("p", "vm1", every="1h", cron=None, keep={"last": 1})
    job, report = policies.run_now("p")
    assert report is None and job.state == "failed" and job.kind == "policy"
    assert job.error_type == "capture-failed" and "disk full" in (job.error or "")
    shown = policies.get("p")
    assert shown.last_outcome == "failed" and shown.last_job_id == job.id and "disk full" in (shown.last_error or "")

    policies.create("q", "vm1", every="1h", cron=None, consistency=Consistency.CRASH.value)
    ok = _policies(catalog, PolicyRun(sets, sets, sets.snapshot, sets.delete, remote))  # type: ignore[arg-type]
    job, report = ok.run_now("q")
    assert job.state == "succeeded" and report is not None and job.set_id == report.set_id
    assert ok.get("q").last_outcome == "succeeded" and ok.get("q").last_error is None


def test_the_scheduler_never_runs_two_jobs_at_once_for_one_instance(catalog: SqlCatalog) -> None:
    sets = ScriptedSets()
    release, started = threading.Event(), threading.Event()

    def slow(request: SnapshotRequest) -> SnapshotSet:
        started.set()
        assert release.wait(10)
        return sets.snapshot(request)

    remote = RemoteCopies(lambda s, r: None, lambda r: [], lambda s, r: None)
    policies = _policies(catalog, PolicyRun(sets, sets, slow, sets.delete, remote))  # type: ignore[arg-type]
    policies.create("a", "vm1", every="10s", cron=None)
    policies.create("b", "vm1", every="10s", cron=None)
    runner = JobRunner(JobStore(catalog), workers=2)
    scheduler = PolicyScheduler(policies, runner, lambda name: f"uuid-of-{name}")
    try:
        now = datetime.now(UTC) + timedelta(seconds=11)
        first = scheduler.tick(now)
        assert len(first) == 1 and started.wait(10)
        assert SKIPPED in {s.last_outcome for s in policies.all()}  # the other policy's tick found vm1 busy
        assert scheduler.tick(now) == []  # the same tick is not started again
        release.set()
        job = JobStore(catalog).get(first[0])
        for _ in range(100):
            job = JobStore(catalog).get(first[0])
            if job.finished:
                break
            threading.Event().wait(0.05)
        assert job.state == "succeeded" and job.kind == "policy" and job.lock_key == "instance:uuid-of-vm1"
        skipped = [s for s in policies.all() if s.last_outcome == SKIPPED]
        assert len(skipped) == 1 and "still running" in (skipped[0].last_error or "")
    finally:
        release.set()
        runner.shutdown(10)


# ---- group policies ---------------------------------------------------------------------------------------------


class ScriptedGroups:
    """Group sets of two instances, an hour apart, over ``ScriptedSets``; deletes remove a whole group set."""

    def __init__(self, sets: ScriptedSets) -> None:
        self.sets = sets
        self.group_sets: list[GroupSet] = []
        self.deleted: list[str] = []

    def snapshot(self, request: GroupRequest) -> GroupSetView:
        when = T0 + timedelta(hours=len(self.group_sets))
        made = GroupSet(str(uuid.uuid4()), f"g{len(self.group_sets)}", request.group, request.consistency,
                        SetStatus.AVAILABLE, when)  # fmt: skip
        self.group_sets.append(made)
        for instance in ("db", "app"):
            metadata = {**request.metadata, GROUP_SET_KEY: made.id, GROUP_KEY: request.group}
            member = self.sets.snapshot(SnapshotRequest(instance, request.consistency, metadata=metadata))
            member.created_at = when
        return self.view(made)

    def view(self, group_set: GroupSet) -> GroupSetView:
        return GroupSetView(group_set, [s for s in self.sets.sets if s.metadata.get(GROUP_SET_KEY) == group_set.id])

    def of_group(self, group: str) -> list[GroupSetView]:
        return [self.view(g) for g in self.group_sets if g.group_name == group and g.id not in self.deleted]

    def delete(self, group_set_id: str) -> None:
        self.deleted.append(group_set_id)


def test_a_group_policy_copies_every_member_and_prunes_whole_group_sets() -> None:
    sets = ScriptedSets()
    groups = ScriptedGroups(sets)
    copied: list[str] = []
    remote_deleted: list[str] = []

    def manifests(remote: str) -> list[dict[str, Any]]:
        return [manifest(s) for s in sets.sets if s.id in copied and s.id not in remote_deleted]

    remote = RemoteCopies(lambda s, r: copied.append(s), manifests, lambda s, r: remote_deleted.append(s))
    runs = GroupRuns(groups.snapshot, groups.of_group, groups.delete)
    run = PolicyRun(sets, sets, sets.snapshot, sets.delete, remote, runs)  # type: ignore[arg-type]
    policy = new_policy("p", None, group="shop", every="1h", cron=None, keep={"last": 2}, copy_to="site",
                        remote_keep={"last": 3})  # fmt: skip
    groups.snapshot(GroupRequest("shop", Consistency.CRASH))  # a group set the policy did not make: never pruned
    for _ in range(3):
        run.run(policy)
    pinned = groups.view(groups.group_sets[3])
    sets.restored[pinned.sets[1].id] = "clone-of-app"  # a restored instance builds on one member of g3
    reports = [run.run(policy) for _ in range(3)]
    g = [x.id for x in groups.group_sets]
    assert sets.deleted == [] and groups.deleted == [g[1], g[2], g[4]]  # by group set; g0 manual, g3 pinned
    assert reports[-1].kept_local[g[3]] == f"restored instance clone-of-app builds on set {pinned.sets[1].name}"
    assert g[0] not in reports[-1].kept_local and g[6] in reports[-1].kept_local  # the newest, whatever the rules
    members = {gs: [s.id for s in groups.view(x).sets] for gs, x in zip(g, groups.group_sets, strict=True)}
    assert copied == [m for gs in g[1:] for m in members[gs]]  # every member of every run, in order
    assert reports[-1].group_set_id == g[6] and reports[-1].member_sets == members[g[6]]
    assert reports[-1].set_id is None and reports[-1].copied_to == "site"
    # remote-keep-last 3 counts group sets, and a pruned group set's copies all go (g1, g2, g3 of six)
    assert remote_deleted == members[g[1]] + members[g[2]] + members[g[3]]
    assert [r.deleted_remote for r in reports] == [[g[1]], [g[2]], [g[3]]]


def test_remote_units_group_member_copies_and_date_them_by_the_newest_member() -> None:
    def m(set_id: str, hour: int, **metadata: str) -> dict[str, Any]:
        return {"id": set_id, "created_at": (T0 + timedelta(hours=hour)).isoformat(), "metadata": metadata}

    candidates, members = remote_units(
        [m("a", 1, **{POLICY_KEY: "p", GROUP_SET_KEY: "G"}), m("b", 2, **{POLICY_KEY: "p", GROUP_SET_KEY: "G"}),
         m("c", 3, **{POLICY_KEY: "p"}), m("d", 4, **{POLICY_KEY: "other"}), m("e", 5)], "p",
    )  # fmt: skip
    assert members == {"G": ["a", "b"], "c": ["c"]}
    assert {(c.id, c.created_at) for c in candidates} == {
        ("G", T0 + timedelta(hours=2)),
        ("c", T0 + timedelta(hours=3)),
    }


@pytest.mark.parametrize(
    ("instance", "kw", "message"),
    [
        ("vm1", {"group": "shop"}, "exactly one of --instance"),
        (None, {}, "exactly one of --instance"),
        (None, {"group": "shop", "mode": "incremental"}, "group policy"),
        (None, {"group": "bad name!"}, "group name"),
    ],
)
def test_bad_group_policies_are_refused(instance: str | None, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        new_policy("p", instance, every="1h", cron=None, **kw)


@pytest.fixture
def scripted_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GroupHypervisor:
    """The real CLI, service, wiring and catalog over the scripted multi-instance hypervisor."""
    scripted = GroupHypervisor()
    for name in ("db", "app"):
        scripted.add(name)
    use_scripted_cli(monkeypatch, tmp_path / "home", scripted)
    return scripted


def test_group_policy_end_to_end_through_the_cli(
    scripted_cli: GroupHypervisor, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "group", "create", "shop", "db", "app").code == 0
    missing = run_cli(capsys, "policy", "create", "typo", "--group", "nosuch", "--every", "1h")
    assert missing.code == 2 and "no group named 'nosuch'" in missing.err and missing.err.count("\n") == 1
    created = run_cli(capsys, "policy", "create", "hourly", "--group", "shop", "--every", "1h", "--keep-last", "1",
                      "--json")  # fmt: skip
    assert created.code == 0 and json.loads(created.out)["group"] == "shop"
    assert [p["name"] for p in json.loads(run_cli(capsys, "policy", "list", "--json").out)] == ["hourly"]
    results = []
    for _ in range(2):
        ran = run_cli(capsys, "policy", "run", "hourly", "--json")
        assert ran.code == 0, ran.err
        results.append(json.loads(ran.out))
    assert all(r["state"] == "succeeded" for r in results)
    made = [r["result"]["group_set"] for r in results]
    assert results[-1]["result"]["deleted_local"] == [made[0]] and len(results[-1]["result"]["sets"]) == 2
    left = json.loads(run_cli(capsys, "group", "sets", "--group", "shop", "--json").out)
    assert sorted(g["id"] for g in left) == sorted(made[1:])
    listed = json.loads(run_cli(capsys, "list", "--json").out)
    assert len(listed) == 2 and {s["metadata"][POLICY_KEY] for s in listed} == {"hourly"}
    shown = json.loads(run_cli(capsys, "policy", "show", "hourly", "--json").out)
    assert shown["last_outcome"] == "succeeded" and shown["instance"] is None
