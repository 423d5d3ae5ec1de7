"""A guest whose ledger journal (vdb) and state (vdc) are both Ceph RBD images (real one-node cluster, TCG).

Sets at every level pass the ledger check read straight from the RBD snapshots; snapshots taken the way Nova's
volume-backed snapshot asks Cinder for them, one volume after the other without a freeze, fail it in the same run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ceph_helpers import ceph_testbed, ledger_sets, nova_style_capture
from freezeframe import wiring
from freezeframe.config import Settings
from freezeframe.model import Consistency
from freezeframe.service import Freezeframe
from freezeframe.testbed.ceph import CephTestbed
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance

__all__ = ["ceph_testbed"]
pytestmark = pytest.mark.vm

MiB = 1 << 20
SETS = int(os.environ.get("FREEZEFRAME_TEST_SETS_PER_LEVEL", "30"))
DISK = 16 * MiB


@pytest.fixture(scope="module")
def two_rbd_guest(
    libvirt_conn: Any, guest_image: Any, ceph_testbed: CephTestbed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestInstance]:
    """Root file vda; the ledger's journal (vdb) and state (vdc) both RBD images."""
    disks = [DiskRequest(DISK), DiskRequest(DISK, ceph=ceph_testbed), DiskRequest(DISK, ceph=ceph_testbed)]
    workdir = tmp_path_factory.mktemp("rbd2-guest")
    with running_instance(libvirt_conn, disks=disks, workload="ledger", workdir=workdir, guest=guest_image) as inst:
        yield inst


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, ceph_testbed: CephTestbed) -> Iterator[Freezeframe]:
    with wiring.open_service(Settings(home=tmp_path_factory.mktemp("rbd2-home"), agent_timeout_s=3)) as ff:
        yield ff


@pytest.mark.parametrize("level", [Consistency.CRASH, Consistency.FILESYSTEM, Consistency.APPLICATION])
def test_two_rbd_disks_sets_pass_the_ledger(
    level: Consistency, two_rbd_guest: TestInstance, service: Freezeframe, ceph_testbed: CephTestbed, tmp_path: Path
) -> None:
    windows = ledger_sets(service, two_rbd_guest, ceph_testbed, level, SETS, tmp_path)
    assert len(windows) == SETS, "two RBD images: crash level pauses the vCPUs, the others freeze"
    print(f"two RBD {level}: {SETS} sets, 0 violations, window median {sorted(windows)[len(windows) // 2]:.0f} ms")
    assert two_rbd_guest.agent({"execute": "guest-fsfreeze-status"})["return"] == "thawed"
    two_rbd_guest.wait_for_progress(after=two_rbd_guest.progress(), timeout_s=20)


def test_nova_style_sequential_rbd_snapshots_break_the_ledger(
    two_rbd_guest: TestInstance, ceph_testbed: CephTestbed, tmp_path: Path
) -> None:
    """The check above is shown able to fail in the same run: one RBD snapshot per volume, 1 s apart, no freeze."""
    verdicts = [nova_style_capture(two_rbd_guest, ceph_testbed, tmp_path, f"nova2-{i}") for i in range(3)]
    assert [v.ok for v in verdicts] == [False] * 3, [v.reason for v in verdicts]
    assert all("state disk was captured later" in v.reason for v in verdicts), [v.reason for v in verdicts]
