"""Delete, dependants and backup rotation over scripted ports, with failures in the middle."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fakes import Boom, World
from freezeframe.errors import InstanceBusy, InvalidRequest, SetHasDependants, SetNotFound
from freezeframe.model import InstanceState, SetStatus, SnapshotSet

UUID = "11111111-2222-3333-4444-555555555555"


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "home")


def gone(world: World, s: SnapshotSet) -> bool:
    try:
        world.catalog.get_set(s.id)
    except SetNotFound:
        return not world.repository.exists(s.id)
    return False


def test_delete_removes_data_and_row(world: World) -> None:
    s = world.add_set({"vda": "x"})
    result = world.lifecycle.delete(s.name)
    assert result.set_id == s.id and result.flattened == []
    assert gone(world, s)
    assert world.domains.calls == [], "a set without children needs no hypervisor"


def test_dependants_refuse_delete_and_force_flattens_them(world: World) -> None:
    s = world.add_set({"vda": "root", "vdb": "data"})
    off = world.lifecycle.restore(s.id, "child-off")
    on = world.lifecycle.restore(s.id, "child-on", start=True)
    with pytest.raises(SetHasDependants, match="child-off") as refused:
        world.lifecycle.delete(s.id)
    assert {(d.instance_name, d.active) for d in refused.value.dependants} == {
        ("child-off", False), ("child-on", True),
    }  # fmt: skip
    assert world.catalog.get_set(s.id).status is SetStatus.AVAILABLE and world.repository.exists(s.id)

    result = world.lifecycle.delete(s.id, force=True)
    assert len(result.flattened) == 4 and gone(world, s)
    assert world.domains.calls.count("block_pull") == 2, "running children are flattened live"
    for child in (off, on):
        for disk in child.disks:
            assert world.images.info_of(disk.path).backing is None
    assert world.images.data(Path(off.disks[0].path)) == "root"


def test_a_flatten_failing_half_way_keeps_the_set(world: World) -> None:
    s = world.add_set({"vda": "root", "vdb": "data"})
    child = world.lifecycle.restore(s.id, "child")
    world.images.fail["rebase"] = 2
    with pytest.raises(Boom):
        world.lifecycle.delete(s.id, force=True)
    assert world.catalog.get_set(s.id).status is SetStatus.AVAILABLE
    assert all(Path(m.path).is_file() for m in s.members), "no member data may go before every child stands alone"
    assert world.images.data(Path(child.disks[1].path)) == "data"


def test_a_delete_cut_after_the_data_went_is_finished_by_repair(world: World) -> None:
    s = world.add_set({"vda": "x"})
    world.catalog.fail_delete = True
    with pytest.raises(Boom):
        world.lifecycle.delete(s.id)
    assert world.catalog.get_set(s.id).status is SetStatus.DELETING and not world.repository.exists(s.id)
    world.catalog.fail_delete = False
    assert any(s.id in r for r in world.lifecycle.repair())
    assert gone(world, s)


def test_delete_refuses_creating_and_busy_sets(world: World) -> None:
    s = world.add_set({"vda": "x"})
    s.status = SetStatus.CREATING
    world.catalog.update_set(s)
    with pytest.raises(InvalidRequest, match="still being created"):
        world.lifecycle.delete(s.id)
    s.status = SetStatus.AVAILABLE
    world.catalog.update_set(s)
    with world.locks.hold(f"set-{s.id}"), pytest.raises(InstanceBusy, match="in use"):
        world.lifecycle.delete(s.id)
    assert world.catalog.get_set(s.id).status is SetStatus.AVAILABLE


# ---- backup and rotation ----------------------------------------------------------------------------------


def backups(world: World, owners: list[str]) -> list[SnapshotSet]:
    """Daily backups of one instance, oldest first, each tagged with the project that could see it."""
    start = datetime.now(UTC) - timedelta(days=len(owners))
    return [
        world.add_set({"vda": f"day{i}"}, instance_uuid=UUID, backup_type="daily",
                      metadata={"project": owner}, created_at=start + timedelta(days=i))
        for i, owner in enumerate(owners)
    ]  # fmt: skip


def test_rotation_keeps_the_newest_and_only_touches_visible_sets(world: World) -> None:
    """Issue 17 item 2: after the instance moved from project A to B, B's rotation never deletes A's sets."""
    old_a, old_b, mid_a, new_b, newest_b = backups(world, ["A", "B", "A", "B", "B"])
    other = world.add_set({"vda": "weekly"}, instance_uuid=UUID, backup_type="weekly")

    def visible(s: SnapshotSet) -> bool:
        return s.metadata.get("project") == "B"

    rotated, kept = world.lifecycle.rotate(UUID, "daily", 1, visible=visible)
    assert set(rotated) == {old_b.id, new_b.id} and kept == {}
    remaining = {s.id for s in world.catalog.list_sets()}
    assert remaining == {old_a.id, mid_a.id, newest_b.id, other.id}


def test_rotation_keeps_sets_in_use(world: World) -> None:
    first, second = backups(world, ["A", "A"])
    world.lifecycle.restore(first.id, "uses-first")
    rotated, kept = world.lifecycle.rotate(UUID, "daily", 0)
    assert rotated == [second.id] and list(kept) == [first.id]


def test_backup_snapshots_with_the_given_id_then_rotates(world: World) -> None:
    world.add_instance(uuid=UUID)
    (old,) = backups(world, ["B"])
    wanted = "0b6c1c54-3f0e-4a53-9d0a-2a6f7f0e4b11"
    result = world.lifecycle.backup("vm1", "daily", 1, set_id=wanted, metadata={"k": "v"})
    assert result.snapshot_set.id == wanted and result.rotated_out == [old.id]
    (request,) = world.snapshots
    assert request.backup_type == "daily" and request.set_id == wanted and request.metadata == {"k": "v"}


def test_a_failed_backup_rotates_nothing(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.add_instance(InstanceState.RUNNING, UUID)
    sets = backups(world, ["A", "A"])

    def fails(*_: object, **__: object) -> SnapshotSet:
        raise Boom("the snapshot failed")

    monkeypatch.setattr(world.lifecycle._retention, "snapshot", fails)
    with pytest.raises(Boom):
        world.lifecycle.backup("vm1", "daily", 0)
    assert all(world.catalog.get_set(s.id).status is SetStatus.AVAILABLE for s in sets)


@pytest.mark.parametrize(("kind", "rotation"), [("daily\n", 1), ("../x", 1), ("daily", -1)])
def test_backup_arguments_are_checked(world: World, kind: str, rotation: int) -> None:
    with pytest.raises(InvalidRequest):
        world.lifecycle.backup("vm1", kind, rotation)
    assert world.snapshots == []
