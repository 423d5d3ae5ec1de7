"""The group commands end to end through the real CLI, service, wiring and catalog, over the scripted
multi-instance hypervisor of tests/group_fakes.py (tests/test_group_vm.py does it on real guests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import run_cli
from freezeframe.model import InstanceState
from group_fakes import GroupHypervisor, use_scripted_cli


@pytest.fixture
def hv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GroupHypervisor:
    scripted = GroupHypervisor()
    for name in ("db", "app", "queue"):
        scripted.add(name)
    use_scripted_cli(monkeypatch, tmp_path / "home", scripted)
    return scripted


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> object:
    result = run_cli(capsys, *args, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_group_management(hv: GroupHypervisor, capsys: pytest.CaptureFixture[str]) -> None:
    created = _json(capsys, "group", "create", "shop", "db", "app")
    assert [i["name"] for i in created["instances"]] == ["db", "app"]  # type: ignore[index]
    assert [i["name"] for i in _json(capsys, "group", "add", "shop", "queue")["instances"]] == ["db", "app", "queue"]  # type: ignore[index]
    assert [i["name"] for i in _json(capsys, "group", "remove", "shop", "app")["instances"]] == ["db", "queue"]  # type: ignore[index]
    assert [g["name"] for g in _json(capsys, "group", "list")] == ["shop"]  # type: ignore[union-attr]
    dup = run_cli(capsys, "group", "add", "shop", "db")
    assert dup.code == 3 and "in the group already" in dup.err and dup.err.count("\n") == 1
    missing = run_cli(capsys, "group", "create", "other", "nosuchvm")
    assert missing.code == 2 and "nosuchvm" in missing.err
    bad = run_cli(capsys, "group", "create", "bad name!", "db")
    assert bad.code == 3 and "group name" in bad.err
    taken = run_cli(capsys, "group", "create", "shop")
    assert taken.code == 3 and "exists already" in taken.err
    assert run_cli(capsys, "group", "delete", "shop").code == 0
    gone = run_cli(capsys, "group", "show", "shop")
    assert gone.code == 2 and "no group named" in gone.err


def test_snapshot_show_delete_a_group_set(hv: GroupHypervisor, capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(capsys, "group", "create", "shop", "db", "app", "queue")
    made = _json(capsys, "snapshot", "--group", "shop", "--consistency", "application", "--name", "before-upgrade")
    assert made["status"] == "available" and made["consistency"]["achieved"] == "application"  # type: ignore[index]
    sets = made["sets"]  # type: ignore[index]
    assert sorted(s["instance"]["name"] for s in sets) == ["app", "db", "queue"]
    assert all(s["metadata"]["freezeframe.group_set"] == made["id"] for s in sets)  # type: ignore[index]
    shown = _json(capsys, "show", made["id"][:8])  # type: ignore[index]
    assert shown["id"] == made["id"] and len(shown["sets"]) == 3  # type: ignore[index]
    human = run_cli(capsys, "show", "before-upgrade")
    assert human.code == 0 and "group window" in human.out and "queue: set" in human.out
    assert len(_json(capsys, "group", "sets", "--group", "shop")) == 1  # type: ignore[arg-type]
    assert len(_json(capsys, "list")) == 3  # type: ignore[arg-type]
    assert run_cli(capsys, "delete", "before-upgrade").code == 0
    assert _json(capsys, "list") == [] and _json(capsys, "group", "sets") == []


def test_snapshot_argument_errors(hv: GroupHypervisor, capsys: pytest.CaptureFixture[str]) -> None:
    both = run_cli(capsys, "snapshot", "db", "--group", "shop")
    assert both.code == 3 and "not both" in both.err
    extra = run_cli(capsys, "snapshot", "--group", "shop", "--exclude-disk", "vdb")
    assert extra.code == 3 and "--group takes" in extra.err
    unknown = run_cli(capsys, "snapshot", "--group", "nope")
    assert unknown.code == 2 and "no group named" in unknown.err


def test_require_failure_is_one_line_and_leaves_nothing(
    hv: GroupHypervisor, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cli(capsys, "group", "create", "shop", "db", "app")
    hv.guests["app"].freeze_hang_s = 0.05
    failed = run_cli(capsys, "snapshot", "--group", "shop", "--require")
    assert failed.code == 6 and "app" in failed.err and failed.err.count("\n") == 1
    assert all(s["status"] == "failed" for s in _json(capsys, "list"))  # type: ignore[union-attr]
    assert [g["status"] for g in _json(capsys, "group", "sets")] == ["failed"]  # type: ignore[union-attr]
    assert all(not g.frozen and g.state is InstanceState.RUNNING for g in hv.guests.values())


def test_group_backup_rotates_whole_group_sets(hv: GroupHypervisor, capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(capsys, "group", "create", "shop", "db", "app")
    ids = [_json(capsys, "group", "backup", "shop", "--type", "daily", "--rotation", "2")["id"] for _ in range(3)]  # type: ignore[index]
    left = _json(capsys, "group", "sets")
    assert [g["id"] for g in left] == ids[:0:-1], "the oldest group set was not rotated out"  # type: ignore[union-attr]
    assert len(_json(capsys, "list")) == 4, "rotation left sets of a rotated group set, or took too many"  # type: ignore[arg-type]
    remaining = {s["metadata"]["freezeframe.group_set"] for s in _json(capsys, "list")}  # type: ignore[union-attr]
    assert remaining == set(ids[1:])
