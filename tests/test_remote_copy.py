"""Off-site copies on the real S3 gateway (radosgw on the Ceph test bed): copy, resume after a kill, scan and fetch
after the home is gone, encryption, chain-aware delete. No guest: sets are made on disk (see test_remote_restore.py
for a real guest restored from a remote)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from freezeframe import wiring
from freezeframe.config import Settings
from freezeframe.errors import InvalidRequest
from freezeframe.ops.remotes import remote_spec
from freezeframe.service import Freezeframe
from freezeframe.testbed.ceph import Cluster
from freezeframe.testbed.radosgw import S3Access
from remote_helpers import MiB, bucket_url, make_set, same_data


def client(access: S3Access) -> object:
    return boto3.client("s3", endpoint_url=access.s3_endpoint, region_name="us-east-1")


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "freezeframe.cli", *args, "--home", str(home)],
                          capture_output=True, text=True, check=False, timeout=300)  # fmt: skip


def object_info(path: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", "-U", str(path)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return dict(json.loads(out))


def own_bytes(path: Path) -> int:
    """Bytes the image's own layer defines (data or zero clusters; its backing file not opened)."""
    spec = json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(path)}})
    out = subprocess.run(["qemu-img", "map", "--output=json", f"json:{spec}"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return sum(int(e["length"]) for e in json.loads(out) if e["present"])


def test_copy_sends_each_set_once_and_an_incremental_only_its_own_clusters(
    ff: Freezeframe, s3: S3Access, tmp_path: Path
) -> None:
    full = make_set(ff, writes=((0x11, 0, 16 * MiB),), age_s=60)
    child = make_set(ff, full, writes=((0x22, 4 * MiB, MiB), (0x00, 8 * MiB, MiB)))
    spec = ff.offsite.add_remote("site-b", bucket_url(), s3.s3_endpoint)

    report = ff.offsite.copy(child.id, "site-b")
    assert report.sets_copied == [full.id, child.id]  # the parent first, without being asked
    assert report.members_sent == 2 and report.bytes_sent == report.stored_bytes > 0
    again = ff.offsite.copy(child.id, "site-b")
    assert again.sets_copied == [] and again.bytes_sent == 0
    assert {c.set_id for c in ff.offsite.copies()} == {full.id, child.id}
    listed = {row.split("\t")[0]: row.split("\t") for row in cli(ff.settings.home, "list").stdout.splitlines()}
    assert listed[child.id][-1] == "site-b" and len(listed[child.id]) == 9  # `list` shows where copies are
    as_json = json.loads(cli(ff.settings.home, "list", "--json").stdout)
    assert {s["id"]: s["copies"] for s in as_json} == {full.id: ["site-b"], child.id: ["site-b"]}

    # What the bucket holds is readable with qemu-img alone: download side by side, compare with the local chain.
    s3c = client(s3)
    for one in (full, child):
        target = tmp_path / "dl" / one.id / "vda.qcow2"
        target.parent.mkdir(parents=True)
        s3c.download_file(spec.bucket, f"{spec.prefix}/sets/{one.id}/vda.qcow2", str(target))  # type: ignore[attr-defined]
        info = object_info(target)
        assert info["format-specific"]["data"]["compression-type"] == "zstd"  # type: ignore[index]
    downloaded = tmp_path / "dl" / child.id / "vda.qcow2"
    assert object_info(downloaded)["backing-filename"] == f"../{full.id}/vda.qcow2"
    assert own_bytes(downloaded) == 2 * MiB  # its 1 MiB write and its 1 MiB of zeros, nothing of the parent
    assert same_data(Path(child.members[0].path), downloaded)


def test_scan_and_fetch_rebuild_the_sets_after_the_home_is_gone(s3: S3Access, tmp_path: Path) -> None:
    url = bucket_url()
    originals = tmp_path / "originals"
    with wiring.open_service(Settings.from_env(home=tmp_path / "lost")) as ff:
        full = make_set(ff, writes=((0x31, 0, 4 * MiB),), age_s=60)
        child = make_set(ff, full, writes=((0x32, MiB, MiB),))
        ff.offsite.add_remote("dr", url, s3.s3_endpoint)
        ff.offsite.copy(child.id, "dr")
        shutil.copytree(ff.repository.root, originals)
    shutil.rmtree(tmp_path / "lost")  # the host is gone: repository, catalog and all

    home = tmp_path / "new"
    assert cli(home, "remote", "add", "dr", url, "--endpoint", s3.s3_endpoint).returncode == 0
    scanned = cli(home, "remote", "scan", "dr", "--json")
    assert scanned.returncode == 0, scanned.stderr
    assert {s["id"] for s in json.loads(scanned.stdout)} == {full.id, child.id}
    listed = json.loads(cli(home, "list", "--json").stdout)
    assert {s["id"] for s in listed} == {full.id, child.id}
    with wiring.open_service(Settings.from_env(home=home)) as ff:
        fetched = ff.offsite.fetch(child.id, "dr")
        assert fetched.name == child.name and fetched.hardware == child.hardware
        member = Path(fetched.members[0].path)
        assert same_data(member, originals / child.id / "vda.qcow2")
        assert ff.repository.checksum(member) == fetched.members[0].sha256
        assert same_data(Path(ff.show(full.id).members[0].path), originals / full.id / "vda.qcow2")


def _big_member(ff: Freezeframe, size: int) -> Path:
    """An incompressible member (random bytes): its packed object is about as large, so the upload takes many parts."""
    made = make_set(ff, writes=())
    path = Path(made.members[0].path)
    raw = path.with_suffix(".raw")
    with raw.open("wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    made.members[0].sha256 = ff.repository.checksum(path)
    made.members[0].virtual_size = size
    ff.catalog.update_set(made)
    return path


def test_a_copy_killed_mid_upload_resumes_without_sending_the_parts_already_there(
    ff: Freezeframe, s3: S3Access, tmp_path: Path
) -> None:
    size = 320 * MiB
    path = _big_member(ff, size)
    set_id = path.parent.name
    spec = ff.offsite.add_remote("slow", bucket_url(), s3.s3_endpoint)
    s3c = client(s3)
    proc = subprocess.Popen([sys.executable, "-m", "freezeframe.cli", "copy", set_id, "--to", "slow", "--home",
                             str(ff.settings.home)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    parts_at_kill = 0
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                uploads = s3c.list_multipart_uploads(Bucket=spec.bucket).get("Uploads", [])  # type: ignore[attr-defined]
            except ClientError:  # the bucket is not made yet
                uploads = []
            if uploads:
                u = uploads[0]
                listed = s3c.list_parts(Bucket=spec.bucket, Key=u["Key"], UploadId=u["UploadId"])  # type: ignore[attr-defined]
                parts_at_kill = len(listed.get("Parts", []))
                if parts_at_kill >= 3:
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the copy finished before it could be interrupted"
    assert parts_at_kill >= 3

    report = ff.offsite.copy(set_id, "slow")
    packed = report.stored_bytes
    assert report.sets_copied == [set_id]
    assert report.bytes_sent <= packed - parts_at_kill * 16 * MiB  # the parts already there were not sent again
    assert s3c.list_multipart_uploads(Bucket=spec.bucket).get("Uploads", []) == []  # type: ignore[attr-defined]
    assert not list((ff.settings.home / "staging").rglob("*.qcow2*")), "staged files were left behind"
    fresh = tmp_path / "fetched"
    with wiring.open_service(Settings.from_env(home=fresh)) as other:
        other.offsite.add_remote("slow", spec.url, s3.s3_endpoint)
        fetched = other.offsite.fetch(set_id, "slow")
        assert same_data(Path(fetched.members[0].path), path)


def test_an_encrypted_remote_round_trips_and_a_wrong_key_fails_clearly(
    ff: Freezeframe, s3: S3Access, tmp_path: Path
) -> None:
    key, wrong = tmp_path / "site.key", tmp_path / "other.key"
    url = bucket_url()
    added = cli(ff.settings.home, "remote", "add", "vault", url, "--endpoint", s3.s3_endpoint, "--key-file", str(key),
                "--new-key")  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    made = make_set(ff, writes=((0x5A, 0, 2 * MiB),))
    ff.offsite.copy(made.id, "vault")
    spec = ff.offsite.remote("vault")
    body = client(s3).get_object(Bucket=spec.bucket, Key=f"{spec.prefix}/sets/{made.id}/vda.qcow2.sealed")  # type: ignore[attr-defined]
    data = body["Body"].read()
    assert data.startswith(b"FFSEAL1\n") and b"QFI\xfb" not in data[:4096]  # no qcow2 header in clear
    listed = client(s3).list_objects_v2(Bucket=spec.bucket, Prefix=f"{spec.prefix}/sets/{made.id}/")  # type: ignore[attr-defined]
    assert {o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]} == {"set.json.sealed", "vda.qcow2.sealed"}

    good = tmp_path / "good"
    added = cli(good, "remote", "add", "vault", url, "--endpoint", s3.s3_endpoint, "--key-file", str(key))
    assert added.returncode == 0
    assert cli(good, "remote", "scan", "vault").returncode == 0
    restored = cli(good, "restore", made.id, "--from", "vault", "--disk", "vda", "--to", str(tmp_path / "vda.qcow2"))
    assert restored.returncode == 0, restored.stderr
    assert same_data(tmp_path / "vda.qcow2", Path(made.members[0].path))

    bad = tmp_path / "bad"
    assert cli(bad, "remote", "add", "vault", url, "--endpoint", s3.s3_endpoint, "--key-file", str(wrong),
               "--new-key").returncode == 0  # fmt: skip
    failed = cli(bad, "remote", "scan", "vault")
    assert failed.returncode == 12
    assert "cannot be decrypted with the key in" in failed.stderr and "Traceback" not in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    plain = tmp_path / "plain"
    assert cli(plain, "remote", "add", "vault", url, "--endpoint", s3.s3_endpoint).returncode == 0
    refused = cli(plain, "remote", "scan", "vault")
    assert refused.returncode == 12 and "encrypted" in refused.stderr


def test_remote_delete_keeps_a_parent_until_the_copies_building_on_it_are_gone(ff: Freezeframe, s3: S3Access) -> None:
    a = make_set(ff, writes=((0x41, 0, MiB),), age_s=120)
    b = make_set(ff, a, writes=((0x42, MiB, MiB),), age_s=60)
    c = make_set(ff, b, writes=((0x43, 2 * MiB, MiB),))
    spec = ff.offsite.add_remote("chain", bucket_url(), s3.s3_endpoint)
    ff.offsite.copy(c.id, "chain")
    store = ff.parts.open_remote("chain").store

    def on_remote() -> set[str]:
        return {k.split("/")[1] for k in store.keys("sets/")}

    assert ff.offsite.delete_copy(a.id, "chain").to_dict() == {"deleted": [], "kept": [a.id]}
    assert on_remote() == {a.id, b.id, c.id}
    assert a.id not in {s.id for s in ff.offsite.scan("chain")}  # marked deleted: no longer offered
    assert ff.offsite.delete_copy(b.id, "chain").kept == sorted([a.id, b.id])
    outcome = ff.offsite.delete_copy(c.id, "chain")
    assert set(outcome.deleted) == {a.id, b.id, c.id} and outcome.kept == []
    assert on_remote() == set() and ff.offsite.copies() == []
    assert spec.name == "chain"


@pytest.mark.parametrize(
    ("url", "endpoint", "message"),
    [
        ("http://bucket", None, "s3://BUCKET"),
        ("s3://UPPER", None, "bucket"),
        ("s3://ok-bucket/../up", None, "prefix"),
        ("s3://ok-bucket", "http://user:pw@host", "without credentials"),
        ("s3://ok-bucket", "ftp://host", "http://"),
    ],
)
def test_bad_remote_definitions_are_refused(url: str, endpoint: str | None, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        remote_spec("r", url, endpoint)


def test_testbed_up_starts_radosgw_and_prints_its_s3_access(s3: S3Access) -> None:
    shown = subprocess.run([sys.executable, "-m", "freezeframe.cli", "testbed", "ceph", "up", "--json"],
                           capture_output=True, text=True, check=True, timeout=300)  # fmt: skip
    info = json.loads(shown.stdout)
    assert info["s3_endpoint"] == s3.s3_endpoint == "http://127.0.0.1:7480"
    assert info["s3_access_key_id"] == s3.s3_access_key_id and info["s3_secret_access_key"]
    assert Cluster().up().s3_access_key_id == s3.s3_access_key_id  # idempotent: same gateway, same user
    assert "Buckets" in client(s3).list_buckets()  # type: ignore[attr-defined]
