"""Revert over scripted ports: all disks or none, a safety set first, a kill between the renames rolled forward."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fakes import Boom, World
from freezeframe.errors import InstanceNotFound, InvalidRequest, PreflightFailed
from freezeframe.model import DiskSpec, Instance, InstanceState, SnapshotSet

UUID = "11111111-2222-3333-4444-555555555555"


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "home")


def instance(world: World, state: InstanceState = InstanceState.SHUTOFF) -> Instance:
    return world.add_instance(state, UUID)


def disk_data(world: World, inst: Instance) -> dict[str, str]:
    return {d.target: world.images.data(Path(str(d.source_path))) for d in inst.hardware.disks if d.device == "disk"}


def old_set(world: World, inst: Instance) -> SnapshotSet:
    return world.add_set({"vda": "old-vda", "vdb": "old-vdb"}, instance_uuid=inst.uuid, hardware=inst.hardware)


def test_revert_takes_a_safety_set_then_rolls_every_disk_back(world: World) -> None:
    inst = instance(world)
    s = old_set(world, inst)
    result = world.lifecycle.revert(s.id)
    assert disk_data(world, inst) == {"vda": "old-vda", "vdb": "old-vdb"}
    assert sorted(result.reverted) == ["vda", "vdb"] and result.untouched == []
    (request,) = world.snapshots
    assert request.instance == UUID and request.metadata == {"freezeframe.safety_for": s.id}
    safety = world.catalog.get_set(str(result.safety_set_id))
    assert {m.target: world.images.data(Path(m.path)) for m in safety.members} == {"vda": "now-vda", "vdb": "now-vdb"}
    formats = {d.target: world.images.info_of(str(d.source_path)).format for d in inst.hardware.disks[:2]}
    assert formats == {"vda": "qcow2", "vdb": "raw"}, "each disk keeps its own format"
    assert world.leftovers() == []


def test_revert_refuses_a_running_instance_before_anything(world: World) -> None:
    inst = instance(world, InstanceState.RUNNING)
    s = old_set(world, inst)
    with pytest.raises(InvalidRequest, match="shut-off instance"):
        world.lifecycle.revert(s.id)
    assert world.snapshots == [] and disk_data(world, inst) == {"vda": "now-vda", "vdb": "now-vdb"}


def test_revert_refuses_disks_it_cannot_write(world: World) -> None:
    inst = instance(world)
    s = old_set(world, inst)
    block = replace(inst.hardware.disks[1], source_type="block")
    world.hypervisor.instances[UUID] = replace(
        inst, hardware=replace(inst.hardware, disks=(inst.hardware.disks[0], block))
    )
    with pytest.raises(PreflightFailed, match="only file-backed disks"):
        world.lifecycle.revert(s.id, safety=False)
    assert disk_data(world, inst) == {"vda": "now-vda", "vdb": "now-vdb"}


def test_a_copy_failing_on_the_second_disk_changes_no_disk(world: World) -> None:
    inst = instance(world)
    s = old_set(world, inst)
    world.images.fail["convert"] = 2
    with pytest.raises(Boom):
        world.lifecycle.revert(s.id, safety=False)
    assert disk_data(world, inst) == {"vda": "now-vda", "vdb": "now-vdb"}
    assert world.leftovers() == [], "a temp file or marker was left"


def test_a_revert_killed_between_renames_is_rolled_forward(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    inst = instance(world)
    s = old_set(world, inst)
    real_replace = Path.replace
    renames = {"n": 0}

    def dies_after_first(self: Path, target: Path) -> Path:  # type: ignore[override]
        renames["n"] += self.name.endswith(".ff-revert.tmp")
        if renames["n"] == 2:
            raise SystemExit("killed")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", dies_after_first)
    with pytest.raises(SystemExit):
        world.lifecycle.revert(s.id, safety=False)
    monkeypatch.undo()
    assert disk_data(world, inst) == {"vda": "old-vda", "vdb": "now-vdb"}, "half-way, as a kill leaves it"
    (marker,) = world.markers.all()
    assert json.loads(marker.read_text())["kind"] == "revert"
    reports = world.lifecycle.repair()
    assert any("interrupted revert" in r for r in reports), reports
    assert disk_data(world, inst) == {"vda": "old-vda", "vdb": "old-vdb"}
    assert world.leftovers() == []


def test_revert_of_a_vanished_instance_says_what_to_do(world: World) -> None:
    s = world.add_set({"vda": "x"})
    with pytest.raises(InstanceNotFound, match="freezeframe restore"):
        world.lifecycle.revert(s.id)


def test_disks_not_in_the_set_are_left_alone(world: World) -> None:
    inst = instance(world)
    s = world.add_set({"vda": "old-vda"}, instance_uuid=inst.uuid, hardware=inst.hardware)
    result = world.lifecycle.revert(s.id)
    assert result.untouched == ["vdb"]
    assert disk_data(world, inst) == {"vda": "old-vda", "vdb": "now-vdb"}
    assert world.snapshots[0].exclude_disks == ("vdb",)
    assert isinstance(inst.hardware.disks[0], DiskSpec)
