"""Verify over scripted ports: checksums and manifest, and a boot check whose clone never outlives the call."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakes import Boom, World
from freezeframe.errors import InvalidRequest
from freezeframe.model import SetStatus
from freezeframe.ports import MANIFEST


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "home")


def test_checksums_match(world: World) -> None:
    s = world.add_set({"vda": "a", "vdb": "b"})
    report = world.lifecycle.verify(s.id)
    assert report.ok and [(c.subject, c.what) for c in report.checks] == [("vda", "sha256"), ("vdb", "sha256")]
    assert not report.booted and world.domains.calls == []


def test_a_corrupted_or_missing_member_is_named(world: World) -> None:
    s = world.add_set({"vda": "a", "vdb": "b"})
    Path(s.members[1].path).write_text("flipped")
    report = world.lifecycle.verify(s.id)
    assert [(c.subject, c.what) for c in report.failures] == [("vdb", "sha256")]
    assert "member vdb" in report.failures[0].detail
    Path(s.members[0].path).unlink()
    report = world.lifecycle.verify(s.id, boot=True)
    assert [(c.subject, c.what) for c in report.failures] == [("vda", "sha256"), ("vdb", "sha256"), ("clone", "boot")]
    assert world.domains.calls == [], "no clone of a set whose data is wrong"


def test_the_manifest_is_checked(world: World) -> None:
    s = world.add_set({"vda": "a"})
    (world.repository.set_dir(s.id) / MANIFEST).unlink()
    assert [c.what for c in world.lifecycle.verify(s.id).failures] == [MANIFEST]


def test_only_available_sets(world: World) -> None:
    s = world.add_set({"vda": "a"})
    s.status = SetStatus.FAILED
    world.catalog.update_set(s)
    with pytest.raises(InvalidRequest, match="only available sets"):
        world.lifecycle.verify(s.id)


def test_boot_check_runs_every_step_and_removes_the_clone(world: World) -> None:
    s = world.add_set({"vda": "a", "vdb": "b"})
    report = world.lifecycle.verify(s.id, boot=True)
    assert report.ok and report.booted, report.failures
    whats = {(c.subject, c.what) for c in report.checks if c.ok}
    assert {("clone", "guest agent"), ("clone", "shutdown")} <= whats
    for target in ("vda", "vdb"):
        assert {(target, "sha256"), (target, "fsck whole disk"), (target, "mounted")} <= whats
    plans = [c for c in world.domains.calls if c in ("define", "start", "remove", "forget_log")]
    assert plans == ["define", "start", "remove", "forget_log"]
    assert world.leftovers() == []


def test_a_clone_that_cannot_start_is_a_failed_check_and_leaves_nothing(world: World) -> None:
    s = world.add_set({"vda": "a"})
    world.domains.fail["start"] = 1
    report = world.lifecycle.verify(s.id, boot=True)
    assert [(c.subject, c.what) for c in report.failures] == [("clone", "boot")]
    assert "could not be built or started" in report.failures[0].detail and not report.booted
    assert world.domains.calls[-1] == "forget_log", "the hypervisor's log of the clone's name goes too"
    assert world.leftovers() == []


def test_a_guest_that_never_answers_is_destroyed(world: World) -> None:
    s = world.add_set({"vda": "a"})
    world.domains.boots = False
    report = world.lifecycle.verify(s.id, boot=True)
    assert {(c.subject, c.what) for c in report.failures} == {("clone", "guest agent"), ("clone", "shutdown")}
    assert world.leftovers() == []


def test_a_failure_while_checking_a_disk_still_removes_the_clone(world: World) -> None:
    s = world.add_set({"vda": "a", "vdb": "b"})
    world.images.fail["convert"] = 2  # the raw copy of the second disk
    with pytest.raises(Boom):
        world.lifecycle.verify(s.id, boot=True)
    assert world.leftovers() == []
    world.host_fs.clean = False
    report = world.lifecycle.verify(s.id, boot=True)
    assert ("vda", "fsck whole disk") in {(c.subject, c.what) for c in report.failures}
    assert world.leftovers() == []
