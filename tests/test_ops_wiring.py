"""The one builder: a home that cannot be used is one clear error, catalog-only work never touches libvirt."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from freezeframe import wiring
from freezeframe.config import Settings
from freezeframe.errors import FreezeframeError, InstanceBusy
from freezeframe.model import Consistency, Hardware, SetStatus, SnapshotSet


@pytest.mark.parametrize("where", ["a file", "under a file", "/proc"])
def test_an_unusable_home_is_one_typed_line(tmp_path: Path, where: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    home = {"a file": afile, "under a file": afile / "home", "/proc": Path("/proc/freezeframe-home")}[where]
    with pytest.raises(FreezeframeError) as refused:
        wiring.build(Settings(home=home))
    message = str(refused.value)
    assert "\n" not in message and str(home) in message and "--home" in message


def test_a_new_home_is_private(tmp_path: Path) -> None:
    home = tmp_path / "new" / "home"
    with wiring.open_service(Settings(home=home)):
        assert home.stat().st_mode & 0o777 == 0o700


def test_catalog_only_commands_import_no_libvirt_lxml_or_ovf(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from freezeframe import wiring\n"
        "from pathlib import Path\n"
        "from freezeframe.config import Settings\n"
        f"with wiring.open_service(Settings(home=Path({str(tmp_path / 'h')!r}))) as ff:\n"
        "    ff.list_sets()\n"
        "    ff.lifecycle\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('libvirt', 'libvirt_qemu', 'lxml')\n"
        "               or m in ('freezeframe.adapters.ova', 'freezeframe.adapters.ovf'))\n"
        "print(heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_deleting_a_plain_set_never_connects_to_libvirt(tmp_path: Path) -> None:
    with wiring.open_service(Settings(home=tmp_path / "h", libvirt_uri="test:///nonexistent")) as ff:
        s = SnapshotSet(
            "0b6c1c54-3f0e-4a53-9d0a-2a6f7f0e4b11", "plain", "vm", "u", Consistency.CRASH, SetStatus.AVAILABLE,
            datetime.now(UTC), Hardware(1, 1024, "x86_64", None),
        )  # fmt: skip
        ff.catalog.add_set(s)
        ff.repository.set_dir(s.id).mkdir()
        ff.lifecycle.delete(s.id)
        assert ff.list_sets() == [] and not ff.repository.exists(s.id)
        assert ff.parts._hypervisor is None


def test_check_not_busy(tmp_path: Path) -> None:
    with wiring.open_service(Settings(home=tmp_path / "h")) as ff:
        ff.check_not_busy("some-instance")
        with ff.locks.hold("some-instance"), pytest.raises(InstanceBusy):
            ff.check_not_busy("some-instance")
        ff.check_not_busy("some-instance")
