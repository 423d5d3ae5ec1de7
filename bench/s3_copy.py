"""Off-site copies to radosgw (the Ceph test bed's S3 gateway), against baselines measured in the same run.

1. Upload throughput: ``freezeframe``'s multipart upload (``S3Store.upload``: Content-MD5 per part, resumable,
   ETag verified) of a staged member object, against boto3's own ``upload_file`` of the same bytes (what
   ``aws s3 cp`` does), and against the storage read limit (reading the same file, nothing sent). Alternating,
   medians and p95; also the client's CPU seconds per GiB (this process, all threads), which a loaded machine
   does not distort as it does the rates: ours hashes every byte twice (SHA-256 kept with the object, MD5 per
   part for Content-MD5 and the ETag checks), boto3 with ``when_required`` checksums hashes nothing.
2. Incremental copy: a full set, then an incremental set whose guest-visible change is N MiB of random data;
   bytes ``copy`` sends for the incremental set against the bytes changed.
3. Peak memory: ``freezeframe copy`` of a member of --member-gib GiB (virtual; a quarter random data) and of one
   8 times smaller, each in its own process: peak RSS of the process and of its largest child (qemu-img).

    flock /work/wt/vm.lock .venv/bin/python bench/s3_copy.py            # 4 GiB member, 256 MiB uploads x4
    .venv/bin/python bench/s3_copy.py --quick                            # smoke run, temp dir
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from common import (
    MiB,
    Run,
    add_common_args,
    machine_info,
    output_dir,
    pyplot,
    ratio,
    replot,
    run_note,
    save_figure,
    scratch_dir,
    summary,
)
from common import run as run_cmd
from freezeframe import wiring
from freezeframe.adapters.s3_remote import S3Store
from freezeframe.config import Settings
from freezeframe.model import Consistency, DiskSpec, Hardware, Member, SetStatus, SnapshotSet
from freezeframe.ports.remote import RemoteSpec
from freezeframe.service import Freezeframe
from freezeframe.testbed.ceph import Cluster

GiB = 1024 * MiB


def random_file(path: Path, size: int) -> None:
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))


def qcow2_member(path: Path, virtual: int, random_bytes: int, tmp: Path) -> None:
    """A qcow2 of ``virtual`` bytes whose first ``random_bytes`` are random (incompressible), the rest unwritten."""
    run_cmd(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(virtual)])
    chunk = tmp / "chunk.bin"
    step = 64 * MiB
    for offset in range(0, random_bytes, step):
        random_file(chunk, min(step, random_bytes - offset))
        run_cmd(["qemu-io", "-f", "qcow2", "-c", f"write -q -s {chunk} {offset} {min(step, random_bytes - offset)}",
                 str(path)])  # fmt: skip
    chunk.unlink()


def record_set(ff: Freezeframe, path: Path, set_id: str, virtual: int, parent: str | None, age_s: float) -> str:
    meta = {"freezeframe.set_uuid": set_id}
    if parent is not None:
        meta |= {"freezeframe.kind": "incremental", "freezeframe.parent_set": parent}
    member = Member(set_id=set_id, target="vda", bus="virtio", boot_order=1, virtual_size=virtual, format="qcow2",
                    path=str(path), sha256=ff.repository.checksum(path), metadata=meta)  # fmt: skip
    from datetime import UTC, datetime, timedelta

    when = datetime.now(UTC) - timedelta(seconds=age_s)
    hardware = Hardware(1, 131072, "x86_64", "pc", disks=(DiskSpec("vda", "virtio", "/x", "qcow2", virtual),))
    ff.catalog.add_set(SnapshotSet(
        id=set_id, name=f"bench-{set_id[:8]}", instance_name="bench", instance_uuid="bench",
        requested=Consistency.CRASH, status=SetStatus.AVAILABLE, created_at=when, completed_at=when,
        hardware=hardware, members=[member],
    ))  # fmt: skip
    return set_id


def new_set_dir(ff: Freezeframe) -> tuple[str, Path]:
    set_id = str(uuid.uuid4())
    folder = ff.repository.root / set_id
    folder.mkdir(parents=True)
    return set_id, folder / "vda.qcow2"


# ---- 1. throughput ---------------------------------------------------------------------------------------------


def read_rate(path: Path) -> float:
    started = time.monotonic()
    with path.open("rb") as f:
        while f.read(8 * MiB):
            pass
    return path.stat().st_size / (time.monotonic() - started)


def throughput(spec: RemoteSpec, size: int, repeats: int, tmp: Path) -> dict[str, Any]:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    staged = tmp / "object.bin"
    random_file(staged, size)
    ours = S3Store(spec)
    ours.ensure_bucket()
    config = Config(request_checksum_calculation="when_required", response_checksum_validation="when_required",
                    s3={"addressing_style": "path"})  # fmt: skip
    raw = boto3.client("s3", endpoint_url=spec.endpoint, region_name="us-east-1", config=config)
    transfer = TransferConfig(multipart_chunksize=16 * MiB)
    rates: dict[str, list[float]] = {"freezeframe": [], "boto3_upload_file": [], "read": []}
    cpu: dict[str, list[float]] = {"freezeframe": [], "boto3_upload_file": []}
    for i in range(repeats):
        rates["read"].append(read_rate(staged))
        started, cpu_started = time.monotonic(), time.process_time()
        ours.upload(f"tp/ours-{i}", staged, {})
        rates["freezeframe"].append(size / (time.monotonic() - started))
        cpu["freezeframe"].append((time.process_time() - cpu_started) / (size / GiB))
        ours.delete(f"tp/ours-{i}")
        started, cpu_started = time.monotonic(), time.process_time()
        raw.upload_file(str(staged), spec.bucket, f"{spec.prefix}/tp/raw-{i}", Config=transfer)
        rates["boto3_upload_file"].append(size / (time.monotonic() - started))
        cpu["boto3_upload_file"].append((time.process_time() - cpu_started) / (size / GiB))
        raw.delete_object(Bucket=spec.bucket, Key=f"{spec.prefix}/tp/raw-{i}")
    staged.unlink()
    mib = {k: summary([v / MiB for v in vs]) for k, vs in rates.items()}
    return {
        "object_bytes": size, "repeats": repeats, "mib_per_s": mib,
        "client_cpu_s_per_gib": {k: summary(vs) for k, vs in cpu.items()},
        "ours_vs_boto3": ratio(mib["freezeframe"]["median"], mib["boto3_upload_file"]["median"]),
        "ours_vs_read": ratio(mib["freezeframe"]["median"], mib["read"]["median"]),
    }  # fmt: skip


# ---- 2. incremental -------------------------------------------------------------------------------------------


def incremental(ff: Freezeframe, remote: str, virtual: int, changes_mib: list[int], tmp: Path) -> list[dict[str, Any]]:
    results = []
    for changed in changes_mib:
        full_id, full_path = new_set_dir(ff)
        qcow2_member(full_path, virtual, virtual // 4, tmp)
        record_set(ff, full_path, full_id, virtual, None, 60)
        full = ff.offsite.copy(full_id, remote)
        child_id, child_path = new_set_dir(ff)
        run_cmd(["qemu-img", "create", "-q", "-f", "qcow2", "-b", f"../{full_id}/vda.qcow2", "-F", "qcow2",
                 str(child_path)])  # fmt: skip
        chunk = tmp / "change.bin"
        random_file(chunk, changed * MiB)
        run_cmd(["qemu-io", "-f", "qcow2", "-c", f"write -q -s {chunk} {virtual // 8} {changed * MiB}",
                 str(child_path)])  # fmt: skip
        chunk.unlink()
        record_set(ff, child_path, child_id, virtual, full_id, 0)
        started = time.monotonic()
        inc = ff.offsite.copy(child_id, remote)
        results.append({
            "changed_bytes": changed * MiB, "incremental_sent": inc.bytes_sent, "full_sent": full.bytes_sent,
            "incremental_s": round(time.monotonic() - started, 2),
            "sent_per_changed": ratio(inc.bytes_sent, changed * MiB),
        })  # fmt: skip
        for set_id in (child_id, full_id):
            ff.offsite.delete_copy(set_id, remote)
            ff.lifecycle.delete(set_id)
    return results


# ---- 3. peak memory --------------------------------------------------------------------------------------------

_PROBE = """
import json, resource, sys
from freezeframe import wiring
from freezeframe.config import Settings
with wiring.open_service(Settings.from_env(home=__import__("pathlib").Path(sys.argv[1]))) as ff:
    report = ff.offsite.copy(sys.argv[2], sys.argv[3])
print(json.dumps({"self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "stored_bytes": report.stored_bytes}))
"""


def peak_memory(ff: Freezeframe, remote: str, sizes: list[int], tmp: Path) -> list[dict[str, Any]]:
    found = []
    for virtual in sizes:
        set_id, path = new_set_dir(ff)
        qcow2_member(path, virtual, virtual // 4, tmp)
        record_set(ff, path, set_id, virtual, None, 0)
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(ff.settings.home), set_id, remote],
                              capture_output=True, text=True, check=True, env=os.environ)  # fmt: skip
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
        found.append({
            "virtual_bytes": virtual, "data_bytes": virtual // 4, "stored_bytes": probe["stored_bytes"],
            "copy_s": round(time.monotonic() - started, 1), "peak_rss_mib": round(probe["self_kib"] / 1024, 1),
            "peak_child_rss_mib": round(probe["children_kib"] / 1024, 1),
        })  # fmt: skip
        ff.offsite.delete_copy(set_id, remote)
        ff.lifecycle.delete(set_id)
    return found


def plot(report: dict[str, Any], path: Path, note: str | None) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    tp = report["throughput"]["mib_per_s"]
    names = ["read", "boto3_upload_file", "freezeframe"]
    axes[0].bar(
        names, [tp[n]["median"] for n in names], yerr=[[0] * 3, [tp[n]["p95"] - tp[n]["median"] for n in names]]
    )
    axes[0].set_yscale("log")  # the read limit is far above both uploads
    axes[0].set_ylabel("MiB/s, log scale (median, bar to p95)")
    axes[0].set_title(f"upload of {report['throughput']['object_bytes'] // MiB} MiB")
    inc = report["incremental"]
    axes[1].bar([str(r["changed_bytes"] // MiB) for r in inc], [r["incremental_sent"] / MiB for r in inc],
                label="sent for the incremental copy")  # fmt: skip
    axes[1].plot([str(r["changed_bytes"] // MiB) for r in inc], [r["changed_bytes"] / MiB for r in inc], "k_",
                 markersize=30, label="changed")  # fmt: skip
    axes[1].set_xlabel("MiB changed")
    axes[1].set_ylabel("MiB")
    axes[1].legend()
    axes[1].set_title("incremental copy")
    mem = report["peak_memory"]
    labels = [f"{r['virtual_bytes'] / GiB:g} GiB" for r in mem]
    axes[2].bar(labels, [r["peak_rss_mib"] for r in mem], label="freezeframe process")
    axes[2].bar(labels, [r["peak_child_rss_mib"] for r in mem], bottom=[r["peak_rss_mib"] for r in mem],
                label="largest child (qemu-img)")  # fmt: skip
    axes[2].set_ylabel("peak RSS MiB")
    axes[2].set_title("peak memory of `copy` by member size")
    axes[2].legend()
    save_figure(fig, path, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--member-gib", type=float, default=4.0)
    parser.add_argument("--upload-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    if replot(args, "s3_copy", plot):
        return
    member = int((0.25 if args.quick else args.member_gib) * GiB)
    upload, repeats = (64 * MiB, 2) if args.quick else (args.upload_mib * MiB, args.repeats)
    changes = [1, 16] if args.quick else [1, 16, 128]
    out_dir = output_dir(args, "s3_copy")
    info = Cluster().up()
    os.environ.update({"AWS_ACCESS_KEY_ID": str(info.s3_access_key_id),
                       "AWS_SECRET_ACCESS_KEY": str(info.s3_secret_access_key)})  # fmt: skip
    bench = Run("s3_copy", args.quick)
    with scratch_dir("s3copy") as tmp:
        bench.machine = machine_info(None, tmp)
        bucket = f"ffbench-{uuid.uuid4().hex[:10]}"
        spec = RemoteSpec("bench", bucket, "b", info.s3_endpoint, None)
        with wiring.open_service(Settings.from_env(home=tmp / "home")) as ff:
            ff.offsite.add_remote("bench", f"s3://{bucket}/b", info.s3_endpoint)
            report = {
                "throughput": throughput(spec, upload, repeats, tmp),
                "incremental": incremental(ff, "bench", 256 * MiB if args.quick else GiB, changes, tmp),
                "peak_memory": peak_memory(ff, "bench", [member // 8, member], tmp),
            }
        json_path = bench.write(out_dir, report)
    plot(report, out_dir / "s3_copy.png", run_note(args.quick))
    print(json.dumps({k: report[k] for k in ("throughput", "incremental", "peak_memory")}, indent=1))
    print(f"wrote {json_path} and {out_dir / 's3_copy.png'}")


if __name__ == "__main__":
    main()
