"""An RBD member's copy holds only what changed since the previous copied snapshot of the same volume (librbd
diff), on the real Ceph test bed and its radosgw; no guest."""

from __future__ import annotations

import os
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ceph_helpers import ceph_testbed, qemu_source
from freezeframe import wiring
from freezeframe.adapters.rbd_diff_pack import CLUSTER, widened
from freezeframe.config import Settings
from freezeframe.model import RBD_STORE, STORE_KEY, Consistency, DiskSpec, Hardware, Member, SetStatus, SnapshotSet
from freezeframe.service import Freezeframe
from freezeframe.testbed.ceph import CephTestbed, create_image, open_pool, remove_image
from freezeframe.testbed.radosgw import S3Access
from freezeframe.volume_members import RBD_SNAPSHOT_KEY
from remote_helpers import MiB, bucket_url

__all__ = ["ceph_testbed"]
SIZE = 64 * MiB


def rbd_set(ff: Freezeframe, volume: str, set_id: str, age_s: float) -> SnapshotSet:
    snap = f"freezeframe-{set_id}"
    member = Member(
        set_id=set_id, target="vdb", bus="virtio", boot_order=None, virtual_size=SIZE, format="raw",
        path=f"rbd:{volume}@{snap}", source_path=volume, sha256="0" * 64,
        metadata={"freezeframe.set_uuid": set_id, STORE_KEY: RBD_STORE, RBD_SNAPSHOT_KEY: snap},
    )  # fmt: skip
    disk = DiskSpec("vdb", "virtio", volume, "raw", SIZE, source_type="network", protocol="rbd")
    when = datetime.now(UTC) - timedelta(seconds=age_s)
    made = SnapshotSet(
        id=set_id, name=f"rbd-{set_id[:8]}", instance_name="ffs3-rbd", instance_uuid="ffs3-rbd-uuid",
        requested=Consistency.CRASH, status=SetStatus.AVAILABLE, created_at=when, completed_at=when,
        hardware=Hardware(1, 131072, "x86_64", "pc", disks=(disk,)), members=[member],
    )  # fmt: skip
    ff.catalog.add_set(made)
    return made


def test_widened_ranges_cover_whole_clusters_in_bounded_writes() -> None:
    assert widened([(100, 10), (CLUSTER + 5, 1)], 10 * CLUSTER) == [(0, 2 * CLUSTER)]
    assert widened([(0, 9 * MiB)], 64 * MiB) == [(0, 4 * MiB), (4 * MiB, 4 * MiB), (8 * MiB, MiB)]
    assert widened([(SIZE - 10, 10)], SIZE) == [(SIZE - CLUSTER, CLUSTER)]


def test_an_rbd_member_copy_sends_only_the_changes_since_the_previous_copied_snapshot(
    ceph_testbed: CephTestbed, s3: S3Access, tmp_path: Path
) -> None:
    import rbd

    name = f"ffs3-{uuid.uuid4().hex[:8]}"
    volume = f"{ceph_testbed.pool}/{name}"
    a_id, b_id = str(uuid.uuid4()), str(uuid.uuid4())
    create_image(ceph_testbed, name, SIZE)
    try:
        with open_pool(ceph_testbed) as ioctx, rbd.Image(ioctx, name) as img:
            img.write(os.urandom(8 * MiB), 0)
            img.create_snap(f"freezeframe-{a_id}")
            img.write(os.urandom(MiB), 20 * MiB)
            img.write(b"\0" * MiB, 2 * MiB)  # zeros over old data must survive too
            img.create_snap(f"freezeframe-{b_id}")
        url = bucket_url()
        with wiring.open_service(Settings.from_env(home=tmp_path / "home")) as ff:
            a, b = rbd_set(ff, volume, a_id, 60), rbd_set(ff, volume, b_id, 0)
            ff.offsite.add_remote("rbd-site", url, s3.s3_endpoint)
            first = ff.offsite.copy(a.id, "rbd-site")
            second = ff.offsite.copy(b.id, "rbd-site")
        assert first.bytes_sent > 8 * MiB
        assert MiB <= second.bytes_sent < 2 * MiB, second  # 1 MiB random + 1 MiB zeros (compressed), not 64 MiB
        with wiring.open_service(Settings.from_env(home=tmp_path / "elsewhere")) as other:
            other.offsite.add_remote("rbd-site", url, s3.s3_endpoint)
            fetched = other.offsite.fetch(b_id, "rbd-site")
            member = fetched.members[0]
            assert member.metadata["freezeframe.parent_set"] == a_id and member.store == "file"
            source = qemu_source(ceph_testbed, f"rbd:{volume}@freezeframe-{b_id}")
            same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", member.path, source],
                                  capture_output=True, text=True, check=False)  # fmt: skip
            assert same.returncode == 0, same.stdout + same.stderr
    finally:
        remove_image(ceph_testbed, name)
