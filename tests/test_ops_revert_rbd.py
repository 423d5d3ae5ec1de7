"""Revert of an instance with an RBD disk over scripted ports: rolled back in place, under the revert marker."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from fakes import World
from freezeframe.errors import PreflightFailed
from freezeframe.model import RBD_STORE, STORE_KEY, DiskSpec, Instance, InstanceState, Member, SnapshotSet
from freezeframe.ports import ImageRef
from freezeframe.ports.volumes import VolumeImages

UUID = "11111111-2222-3333-4444-555555555555"
MiB = 1 << 20


@dataclass
class ScriptedRbd:
    """The RBD store's whole-image calls; ``die`` makes the next rollback stop the process (SIGKILL stand-in)."""

    rolled_back: list[str] = field(default_factory=list)
    die: bool = False
    kind: str = RBD_STORE

    def present(self, member: Member) -> bool:
        return True

    def source(self, member: Member) -> ImageRef:
        return ImageRef(Path(member.path), "raw")

    def rollback(self, source: str) -> None:
        if self.die:
            self.die = False
            raise SystemExit("killed inside the rollback")
        self.rolled_back.append(source)

    def new_image(self, volume: str, size: int) -> ImageRef:
        raise AssertionError("revert makes no image")

    def remove_image(self, volume: str) -> None:
        raise AssertionError("revert removes no image")

    def readable(self, volume: str) -> ImageRef:
        return ImageRef(Path(f"rbd:{volume}"), "raw")


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "home")


def mixed(world: World, member_image: str = "vm1-vdc") -> tuple[Instance, SnapshotSet, ScriptedRbd]:
    """vda, vdb files and vdc an RBD image; the set's vdc member is a snapshot of ``member_image``."""
    rbd = ScriptedRbd()
    assert isinstance(rbd, VolumeImages)
    world.stores.by_kind[RBD_STORE] = rbd  # type: ignore[index]
    inst = world.add_instance(InstanceState.SHUTOFF, UUID)
    vdc = DiskSpec("vdc", "virtio", "pool/vm1-vdc", "raw", 8 * MiB, source_type="network", protocol="rbd")
    inst = replace(inst, hardware=replace(inst.hardware, disks=(*inst.hardware.disks, vdc)))
    world.hypervisor.instances[UUID] = inst
    s = world.add_set({"vda": "old-vda", "vdb": "old-vdb"}, instance_uuid=UUID, hardware=inst.hardware)
    s.members.append(Member(s.id, "vdc", "virtio", None, 8 * MiB, "raw", f"rbd:pool/{member_image}@freezeframe-{s.id}",
                            source_path="pool/vm1-vdc", metadata={STORE_KEY: RBD_STORE}))  # fmt: skip
    world.catalog.update_set(s)
    return inst, s, rbd


def files(world: World, inst: Instance) -> dict[str, str]:
    return {d.target: world.images.data(Path(str(d.source_path))) for d in inst.hardware.disks[:2]}


def test_files_are_copied_back_and_the_rbd_image_rolled_back_to_its_snapshot(world: World) -> None:
    inst, s, rbd = mixed(world)
    result = world.lifecycle.revert(s.id, safety=False)
    assert files(world, inst) == {"vda": "old-vda", "vdb": "old-vdb"}
    assert rbd.rolled_back == [f"rbd:pool/vm1-vdc@freezeframe-{s.id}"]
    assert result.reverted == {"vda": str(inst.hardware.disks[0].source_path),
                               "vdb": str(inst.hardware.disks[1].source_path), "vdc": "pool/vm1-vdc"}  # fmt: skip
    assert world.leftovers() == []


def test_a_member_of_another_image_is_refused_before_anything_changes(world: World) -> None:
    inst, s, rbd = mixed(world, member_image="someone-else")
    with pytest.raises(PreflightFailed, match="rolls back only to a snapshot of that same image"):
        world.lifecycle.revert(s.id, safety=False)
    assert files(world, inst) == {"vda": "now-vda", "vdb": "now-vdb"} and rbd.rolled_back == []


def test_a_revert_killed_inside_the_rollback_is_finished_by_repair(world: World) -> None:
    inst, s, rbd = mixed(world)
    rbd.die = True
    with pytest.raises(SystemExit):
        world.lifecycle.revert(s.id, safety=False)
    assert files(world, inst) == {"vda": "now-vda", "vdb": "now-vdb"}, "files are renamed after the rollbacks"
    (marker,) = world.markers.all()
    reports = world.lifecycle.repair()
    assert any("interrupted revert" in r for r in reports), reports
    assert rbd.rolled_back == [f"rbd:pool/vm1-vdc@freezeframe-{s.id}"]
    assert files(world, inst) == {"vda": "old-vda", "vdb": "old-vdb"} and not marker.exists()
    assert world.leftovers() == []
