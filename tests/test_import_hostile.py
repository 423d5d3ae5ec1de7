"""Hostile packages through the import operation and the `import` command: each refused with one specific line,
nothing left in libvirt or on disk (issue 17: no package may read the host)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from freezeframe.errors import (
    InvalidRequest,
)
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import GuestImage
from portable_support import (
    HOSTILE,
    PREFIX,
    Pt,
    assert_nothing_left,
    cli_env,
    domain_exists,
    hostile_package,
    run_cli,
)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_packages_are_refused_by_import(kind: str, pt: Pt, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    package = hostile_package(kind, work)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    error, match = HOSTILE[kind]
    name = f"{PREFIX}hostile-{kind}"
    with pytest.raises(error, match=match) as caught:
        pt.import_package(package, name)
    assert isinstance(caught.value, InvalidRequest) and "\n" not in str(caught.value)
    assert_nothing_left(pt, name)
    after = sorted(p.relative_to(work) for p in work.rglob("*"))
    assert after == before, f"the import wrote files: {set(after) - set(before)}"
    assert not (tmp_path / "evil.vmdk").exists() and not (tmp_path / "evil-abs.vmdk").exists()
    assert not pt.instances_dir.exists() or not any(pt.instances_dir.iterdir())


def test_hostile_package_through_the_command_is_one_line(
    ff: Freezeframe, guest_image: GuestImage, tmp_path: Path, libvirt_conn: Any
) -> None:
    env = cli_env(ff.settings.home, guest_image)
    for kind in ("symlink", "laughs", "corrupt"):
        package = hostile_package(kind, tmp_path)
        done = run_cli(["import", str(package), "--as", f"{PREFIX}cli-{kind}"], env)
        assert done.returncode == 3, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("freezeframe: error: "), done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
        assert not domain_exists(libvirt_conn, f"{PREFIX}cli-{kind}")
        assert not (ff.settings.home / "instances" / f"{PREFIX}cli-{kind}").exists()
