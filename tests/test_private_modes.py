"""No local user may read snapshot data (issue 17): the home is 0700 and everything made in it is owner-only.

A home an older version made 0755 is tightened when a service opens it; then restore (copy-on-write and full),
extract, export (file and store), import, repair and delete each run, and after each one the whole home, the
repository and every file the operation handed out are walked: no group or other permission bit anywhere.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from freezeframe.config import Settings
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import GuestImage
from portable_support import PREFIX, Pt, guest_boot_dirs, remove_everything, synthetic_hardware, synthetic_set


def readable_by_others(*roots: Path) -> list[str]:
    """Every path under the roots (roots included) with a group or other permission bit."""
    found = []
    for root in roots:
        paths = [root, *root.rglob("*")] if root.is_dir() else [root]
        for path in paths:
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                found.append(f"{path} {stat.filemode(mode)}")
    return found


@pytest.fixture
def old_home(tmp_path: Path) -> Path:
    """A home as an older version left it: world-readable folder and catalog."""
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    return home


@pytest.fixture
def opened(old_home: Path, guest_image: GuestImage) -> Iterator[tuple[Freezeframe, Pt]]:
    previous = os.umask(0o022)  # what a login shell typically has
    try:
        with Freezeframe.open(Settings(home=old_home, agent_timeout_s=3)) as service:
            pt = Pt(service, guest_boot_dirs(guest_image))
            try:
                yield service, pt
            finally:
                remove_everything(pt)
    finally:
        os.umask(previous)


def test_every_operation_leaves_only_owner_readable_files(
    opened: tuple[Freezeframe, Pt], guest_image: GuestImage, tmp_path: Path
) -> None:
    ff, pt = opened
    home = ff.settings.home
    assert readable_by_others(home) == [], "opening the service did not make the old home private"

    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 0x21, "sda": 0x22})
    assert readable_by_others(home) == []

    restored = ff.lifecycle.restore(s.id, f"{PREFIX}modes-cow")
    full = ff.lifecycle.restore(s.id, f"{PREFIX}modes-full", full=True)
    assert readable_by_others(home) == [], "restore"

    out = tmp_path / "out"
    out.mkdir(mode=0o755)
    extracted = ff.lifecycle.extract(s.id, "sda", out / "sda.raw", fmt="raw")
    package = out / "set.ova"
    pt.export(s.id, package)
    stored = pt.export_to_store(s.id, name="modes")
    assert readable_by_others(home, extracted, package) == [], "extract / export"

    assert stored.image is not None
    imported = pt.import_package(stored.image.id, f"{PREFIX}modes-imp")
    assert readable_by_others(home) == [], "import"

    ff.repair()
    for name in (restored.name, full.name, imported.name):
        ff.lifecycle.discard(name)
    ff.lifecycle.delete(s.id)
    assert readable_by_others(home) == [], "repair / discard / delete"


def test_the_walk_finds_a_readable_file(tmp_path: Path) -> None:
    leak = tmp_path / "leak"
    leak.write_bytes(b"x")
    leak.chmod(0o644)
    tmp_path.chmod(0o700)
    assert readable_by_others(tmp_path) == [f"{leak} -rw-r--r--"]
