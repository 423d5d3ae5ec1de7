"""Restore, extract and discard over scripted ports: what is built, and that a failure anywhere leaves nothing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fakes import Boom, World
from freezeframe.errors import InstanceBusy, InstanceNotFound, InvalidRequest, PreflightFailed
from freezeframe.model import STORE_KEY, Member, SetStatus
from freezeframe.ports import ImageRef, ProgressCallback
from freezeframe.ports.volumes import CLONE_SUFFIX


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "home")


def test_restore_builds_children_of_the_members_and_the_recorded_machine(world: World) -> None:
    s = world.add_set({"vda": "root-data", "vdb": "data-data"})
    result = world.lifecycle.restore(s.name, "copy1")
    assert result.mode == "cow" and not result.started
    assert result.left_out == {"hdc": "cdrom: not part of a snapshot set"}
    (dom,) = world.domains.domains.values()
    assert dom.name == "copy1" and dom.plan.hardware == s.hardware and dom.plan.nics is None
    assert [(d.spec.target, d.format) for d in dom.plan.disks] == [("vda", "qcow2"), ("vdb", "qcow2")]
    for disk, member in zip(result.disks, s.members, strict=True):
        assert Path(disk.path).parent == world.instances_dir / "copy1"
        assert world.images.info_of(disk.path).backing == str(Path(member.path).resolve())
        assert world.images.data(Path(disk.path)) == world.images.data(Path(member.path))
    assert [(r.target, r.instance_uuid, r.mode) for r in world.restores.for_set(s.id)] == [
        ("vda", result.uuid, "cow"),
        ("vdb", result.uuid, "cow"),
    ]
    assert world.markers.all() == []


def test_full_restore_copies_with_progress_and_starts(world: World) -> None:
    s = world.add_set({"vda": "root", "vdb": "data"})
    seen: list[tuple[int, int]] = []
    result = world.lifecycle.restore(s.id, "copy2", full=True, start=True, progress=lambda d, t: seen.append((d, t)))
    assert result.mode == "full" and result.started
    assert all(world.images.info_of(d.path).backing is None for d in result.disks)
    assert seen[-1][0] == seen[-1][1] == sum(m.virtual_size for m in s.members)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen), "progress went backwards"
    assert world.domains.by_name("copy2") is not None and world.domains.by_name("copy2").active  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("where", "call"),
    [("images", "create"), ("domains", "define"), ("domains", "start")],
)
def test_a_failure_anywhere_leaves_nothing_behind(world: World, where: str, call: str) -> None:
    s = world.add_set({"vda": "root", "vdb": "data"})
    fake = world.images if where == "images" else world.domains
    fake.fail[call] = 2 if call == "create" else 1
    with pytest.raises(Boom):
        world.lifecycle.restore(s.id, "broken", start=True)
    assert world.leftovers() == []
    assert world.catalog.get_set(s.id).status is SetStatus.AVAILABLE


def test_an_interrupt_is_undone_too(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    s = world.add_set({"vda": "root"})

    def interrupted(uuid: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(world.domains, "start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        world.lifecycle.restore(s.id, "cut", start=True)
    assert world.leftovers() == []


def test_a_killed_restore_is_removed_by_repair(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    s = world.add_set({"vda": "root"})

    def killed(*_: object, **__: object) -> None:
        raise SystemExit("killed")  # stands in for the process dying: no undo runs

    monkeypatch.setattr(world.builder, "undo", killed)
    world.domains.fail["start"] = 1
    with pytest.raises(SystemExit):
        world.lifecycle.restore(s.id, "killed", start=True)
    monkeypatch.undo()
    assert world.domains.by_name("killed") is not None and world.markers.all()
    reports = world.lifecycle.repair()
    assert any("killed" in r for r in reports), reports
    assert world.leftovers() == []


def test_name_rules_and_conflicts(world: World) -> None:
    s = world.add_set({"vda": "root"})
    world.lifecycle.restore(s.id, "taken")
    before = world.leftovers()
    with pytest.raises(InvalidRequest) as taken:
        world.lifecycle.restore(s.id, "taken")
    assert str(taken.value) == "an instance named 'taken' already exists; choose another name with --as"
    for bad in ("../escape", "trailing\n", "", "-dash"):
        with pytest.raises(InvalidRequest, match="not usable"):
            world.lifecycle.restore(s.id, bad)
    with world.locks.hold("name-held"), pytest.raises(InstanceBusy, match="instance name held"):
        world.lifecycle.restore(s.id, "held")
    assert world.leftovers() == before


def test_missing_member_data_or_network_makes_nothing(world: World) -> None:
    s = world.add_set({"vda": "root", "vdb": "data"})
    Path(s.members[1].path).unlink()
    with pytest.raises(PreflightFailed, match="vdb"):
        world.lifecycle.restore(s.id, "gone")
    from dataclasses import replace

    from freezeframe.model import NicSpec

    hw = replace(s.hardware, nics=(NicSpec("52:54:00:00:00:01", "virtio", "network", "nope"),))
    t = world.add_set({"vda": "root"}, hardware=hw)
    with pytest.raises(InvalidRequest, match="nope"):
        world.lifecycle.restore(t.id, "nonet")
    assert world.leftovers() == [] and world.images.calls == []


def test_only_available_sets_restore(world: World) -> None:
    s = world.add_set({"vda": "root"})
    s.status = SetStatus.DELETING
    world.catalog.update_set(s)
    with pytest.raises(InvalidRequest, match="deleting"):
        world.lifecycle.restore(s.id, "x")


def test_discard_removes_what_restore_made_and_nothing_else(world: World) -> None:
    s = world.add_set({"vda": "root"})
    world.lifecycle.restore(s.id, "mine")
    done = world.lifecycle.discard("mine")
    assert any("removed domain mine" in d for d in done)
    assert world.leftovers() == []
    with pytest.raises(InstanceNotFound, match="only discards what it made"):
        world.lifecycle.discard("somebody-else")


def test_extract_never_overwrites_and_leaves_no_temp(world: World, tmp_path: Path) -> None:
    s = world.add_set({"vda": "root", "vdb": "payload"})
    out = world.lifecycle.extract(s.id, "vdb", tmp_path / "vdb.raw", "raw")
    assert world.images.data(out) == "payload" and world.images.info_of(out).format == "raw"
    (tmp_path / "taken").write_text("keep me")
    with pytest.raises(InvalidRequest, match="does not overwrite"):
        world.lifecycle.extract(s.id, "vda", tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "keep me"
    with pytest.raises(InvalidRequest, match="no disk 'vdz'"):
        world.lifecycle.extract(s.id, "vdz", tmp_path / "x")
    world.images.fail["convert"] = 2
    with pytest.raises(Boom):
        world.lifecycle.extract(s.id, "vda", tmp_path / "failed.qcow2")
    assert not (tmp_path / "failed.qcow2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_restored_and_extracted_disks_are_private(world: World, tmp_path: Path) -> None:
    """Issue 17 item 3: no other local user may read a guest's disks."""
    s = world.add_set({"vda": "root"})
    for name, full in (("cow", False), ("copy", True)):
        result = world.lifecycle.restore(s.id, name, full=full)
        assert (world.instances_dir / name).stat().st_mode & 0o777 == 0o700
        assert {Path(d.path).stat().st_mode & 0o777 for d in result.disks} == {0o600}
    out = world.lifecycle.extract(s.id, "vda", tmp_path / "vda.qcow2")
    assert out.stat().st_mode & 0o777 == 0o600


class ScriptedClones:
    """A backend (RBD-like) member store: restores are clones that live outside the instance folder."""

    kind = "rbd"

    def __init__(self) -> None:
        self.clones: set[str] = set()

    def present(self, member: Member) -> bool:
        return True

    def source(self, member: Member) -> ImageRef:
        return ImageRef(Path(f"rbd:pool/{member.target}@snap"), "raw")

    def restore(self, member: Member, dst: Path, *, full: bool, progress: ProgressCallback | None = None) -> ImageRef:
        clone = f"pool/{dst.parent.name}-{dst.stem}"
        self.clones.add(clone)
        dst.with_suffix(CLONE_SUFFIX).write_text(clone + "\n")
        return ImageRef(Path(f"rbd:{clone}"), "raw")

    def base_of(self, member: Member) -> str:
        return f"rbd:pool/{member.target}@snap"

    def checksum(self, member: Member) -> str:
        return "00" * 32

    def remove(self, member: Member) -> None:
        pass

    def children(self, member: Member) -> list[str]:
        return sorted(self.clones)

    def flatten(self, clone: str) -> None:
        pass

    def remove_clone(self, clone: str) -> None:
        self.clones.discard(clone)


def test_a_failed_restore_removes_the_backend_clones_it_made(world: World) -> None:
    """Clones live in the volume backend, not in the instance folder: the undo must remove them too."""
    s = world.add_set({"vda": "root", "vdb": "data"})
    vdb = next(m for m in s.members if m.target == "vdb")
    rbd_member = replace(vdb, metadata={**vdb.metadata, STORE_KEY: "rbd"})
    world.catalog.update_set(replace(s, members=[m if m.target != "vdb" else rbd_member for m in s.members]))
    clones = ScriptedClones()
    world.stores.by_kind["rbd"] = clones  # type: ignore[index]
    world.domains.fail["define"] = 1
    with pytest.raises(Boom):
        world.lifecycle.restore(s.id, "broken")
    assert clones.clones == set(), "a clone of the half-made instance was left in the backend"
    assert world.leftovers() == []
