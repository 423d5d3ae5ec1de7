"""Off-site copy tests: the test bed's radosgw reached through boto3's own environment, and sets made on disk."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from freezeframe.model import Consistency, DiskSpec, Hardware, Member, SetStatus, SnapshotSet
from freezeframe.service import Freezeframe
from freezeframe.testbed.ceph import Cluster
from freezeframe.testbed.radosgw import S3Access

MiB = 1024 * 1024
SIZE = 64 * MiB


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Access]:
    """radosgw on the shared Ceph test bed (``up`` is idempotent), its keys in boto3's environment variables."""
    info = Cluster().up()
    assert info.s3_endpoint and info.s3_access_key_id and info.s3_secret_access_key
    access = S3Access(info.s3_endpoint, info.s3_access_key_id, info.s3_secret_access_key)
    saved = {k: os.environ.get(k) for k in access.env()}
    os.environ.update(access.env())
    try:
        yield access
    finally:
        purge_buckets(access, TEST_BUCKET_PREFIX)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


TEST_BUCKET_PREFIX = "fftest-"


def bucket_url() -> str:
    return f"s3://{TEST_BUCKET_PREFIX}{uuid.uuid4().hex[:12]}/copies"


def purge_buckets(access: S3Access, prefix: str) -> None:
    """Remove the tests' buckets and everything in them: the memstore OSD keeps objects in RAM (4 GiB in all)."""
    names = [b["Name"] for b in _client(access).list_buckets().get("Buckets", [])]
    purge(access, [name for name in names if name.startswith(prefix)])


def _client(access: S3Access) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=access.s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=access.s3_access_key_id,
                        aws_secret_access_key=access.s3_secret_access_key)  # fmt: skip


def purge(access: S3Access, buckets: list[str]) -> None:
    client = _client(access)
    for bucket in buckets:
        for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=item["Key"])
        client.delete_bucket(Bucket=bucket)


def run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True)


def write(path: Path, pattern: int, offset: int, length: int) -> None:
    run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {length}", str(path))


def make_set(
    ff: Freezeframe, parent: SnapshotSet | None = None, *, writes: tuple[tuple[int, int, int], ...] = ((0x11, 0, MiB),),
    age_s: float = 0.0, instance: str = "remote-test-vm",
) -> SnapshotSet:  # fmt: skip
    """An available one-disk set as the flow records one: full, or incremental over ``parent``'s member."""
    set_id = str(uuid.uuid4())
    folder = ff.repository.root / set_id
    folder.mkdir(parents=True)
    path = folder / "vda.qcow2"
    meta = {"freezeframe.set_uuid": set_id}
    if parent is None:
        run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE))
    else:
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"../{parent.id}/vda.qcow2", "-F", "qcow2", str(path))
        meta |= {"freezeframe.kind": "incremental", "freezeframe.parent_set": parent.id}
    for pattern, offset, length in writes:
        write(path, pattern, offset, length)
    member = Member(
        set_id=set_id, target="vda", bus="virtio", boot_order=1, virtual_size=SIZE, format="qcow2", path=str(path),
        source_path="/images/vda.qcow2", sha256=ff.repository.checksum(path), metadata=meta,
    )  # fmt: skip
    disk = DiskSpec("vda", "virtio", "/images/vda.qcow2", "qcow2", SIZE, boot_order=1)
    hardware = Hardware(vcpus=1, memory_kib=128 * 1024, arch="x86_64", machine="pc", disks=(disk,))
    when = datetime.now(UTC) - timedelta(seconds=age_s)
    made = SnapshotSet(
        id=set_id, name=f"remote-{set_id[:8]}", instance_name=instance,
        instance_uuid=str(uuid.uuid5(uuid.NAMESPACE_DNS, instance)), requested=Consistency.CRASH,
        status=SetStatus.AVAILABLE, created_at=when, completed_at=when,
        hardware=hardware, achieved=Consistency.CRASH, members=[member],
    )  # fmt: skip
    ff.catalog.add_set(made)
    ff.repository.write_manifest(made)
    return made


def same_data(a: Path, b: Path) -> bool:
    """qemu-img compare: the guest-visible content of two images (chains followed) is identical."""
    done = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(a), str(b)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    return done.returncode == 0
