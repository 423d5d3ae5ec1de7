"""Shared fixtures: the cached test guest, a libvirt connection and throw-away instances.

Each session gets a throw-away FREEZEFRAME_HOME (catalog, repository, locks) unless one is set, while the guest
image cache stays in a stable place (FREEZEFRAME_CACHE_DIR, else the real home's cache) so it is built once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from freezeframe.config import Settings
from freezeframe.testbed.guest import GuestImage, build_guest
from freezeframe.testbed.instance import (
    DiskRequest,
    TestInstance,
    created_instance_names,
    destroy_and_undefine,
    running_instance,
)

pytest_plugins = ("portable_support", "remote_helpers", "hosts_helpers")
"""The export/import fixtures (ff, pt) for the modules that test packages; ``s3`` (radosgw) for off-site copies;
the multi-host fixtures (hosts_api)."""

_session_home: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Pin the guest cache before pointing FREEZEFRAME_HOME at a session temp dir."""
    global _session_home
    if "FREEZEFRAME_CACHE_DIR" not in os.environ:
        os.environ["FREEZEFRAME_CACHE_DIR"] = str(Settings.from_env().cache_dir)
    if "FREEZEFRAME_HOME" not in os.environ:
        _session_home = Path(tempfile.mkdtemp(prefix="freezeframe-test-home-"))
        os.environ["FREEZEFRAME_HOME"] = str(_session_home)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _session_home
    if _session_home is not None:
        shutil.rmtree(_session_home, ignore_errors=True)
        os.environ.pop("FREEZEFRAME_HOME", None)
        _session_home = None


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest(Path(os.environ["FREEZEFRAME_CACHE_DIR"]))


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[Any]:
    import libvirt

    uri = Settings.from_env().libvirt_uri
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        pytest.fail(
            f"libvirt at {uri} is not reachable ({exc}). Run scripts/setup-host.sh as root to install QEMU/libvirt "
            "and start virtlogd + libvirtd.",
            pytrace=False,
        )
    try:
        yield conn
    finally:
        conn.close()


MakeInstance = Callable[..., TestInstance]


@pytest.fixture
def make_instance(libvirt_conn: Any, guest_image: GuestImage, tmp_path: Path) -> Iterator[MakeInstance]:
    """Factory: ``make_instance(disks=[DiskRequest()] * 3, workload="ledger")``; all torn down after the test."""
    with contextlib.ExitStack() as stack:
        count = 0

        def make(
            *, disks: Sequence[DiskRequest] = (DiskRequest(),), workload: str = "idle", **kwargs: Any
        ) -> TestInstance:
            nonlocal count
            count += 1
            return stack.enter_context(
                running_instance(
                    libvirt_conn,
                    disks=disks,
                    workload=workload,
                    workdir=tmp_path / f"instance-{count}",
                    guest=guest_image,
                    **kwargs,
                )
            )

        yield make


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_domains() -> Iterator[None]:
    """After the session, no domain this session created may still exist; remove any and fail loudly."""
    yield
    names = created_instance_names()
    if not names:
        return
    import libvirt

    conn = libvirt.open(Settings.from_env().libvirt_uri)
    try:
        leftovers = sorted(n for n in names if destroy_and_undefine(conn, n))
    finally:
        conn.close()
    assert not leftovers, f"test domains were left behind (now removed): {leftovers}"
