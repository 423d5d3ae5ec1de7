"""Freeze window of filesystem-level sets of a guest with 1, 3 and 8 Ceph RBD volumes, against the bare
freeze/thaw floor and Nova-style sequential per-volume snapshots (no freeze), same guest, same run; the time of
each RBD snapshot inside the window; and restoring an RBD member as a clone (copy-on-write) against copying it
(clone + flatten = ``restore --full``, and ``qemu-img convert`` of the snapshot to a local qcow2 file).

The guest boots from a qcow2 root file (vda) with N RBD data disks on the one-node Ceph test bed
(``freezeframe testbed ceph up``, brought up here). Floor, freezeframe set and sequential snapshots alternate so
machine noise hits all alike.

    .venv/bin/python bench/rbd_window.py            # full run, writes bench/results/rbd_window.json + .png
    .venv/bin/python bench/rbd_window.py --quick    # smoke run, writes to a temp dir
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    MiB,
    Run,
    add_common_args,
    libvirt_connection,
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
from freezeframe import wiring
from freezeframe.adapters import rbd_volumes
from freezeframe.adapters.rbd_members import RbdMembers
from freezeframe.config import Settings
from freezeframe.flow import SnapshotRequest
from freezeframe.model import RBD_STORE, STORE_KEY, Consistency, DiskSpec, Member
from freezeframe.testbed.ceph import CephTestbed, Cluster, create_image, open_pool, remove_image
from freezeframe.testbed.guest import build_guest
from freezeframe.testbed.instance import DiskRequest, running_instance

NAME = "rbd_window"
SNAP_MS: list[float] = []
"""Filled by the timed capture below: one entry per RBD snapshot taken inside a window."""


class TimedCapture(rbd_volumes.RbdCapture):
    """The adapter's capture with each ``create_snap`` timed (the flow's window holds exactly these calls)."""

    def snap_one(self, disk: DiskSpec, img: Any) -> rbd_volumes.VolumeSnapshot:
        started = time.perf_counter()
        made = super().snap_one(disk, img)
        SNAP_MS.append((time.perf_counter() - started) * 1000.0)
        return made


def sequential_ms(info: CephTestbed, volumes: Sequence[str], tag: str) -> float:
    """Nova's volume-backed snapshot: one Cinder/RBD snapshot per volume, one after another, guest not frozen; each
    on a cluster connection of its own, as Cinder's RBD driver connects per call."""
    settings = rbd_volumes.CephSettings(info.conf, info.user, info.keyring)
    started = time.perf_counter()
    for volume in volumes:
        disk = DiskSpec("x", "virtio", volume, "raw", 0, "network", protocol="rbd")
        with rbd_volumes.RbdVolumes(settings) as vols, vols.open(tag, "sequential", [disk]) as capture:
            capture.snapshot()
    took = (time.perf_counter() - started) * 1000.0
    with rbd_volumes.RbdVolumes(settings) as vols:
        vols.remove(tag, volumes)
    return took


def measure(n_rbd: int, samples: int, info: CephTestbed, conn: Any, tmp: Path) -> dict[str, Any]:
    disks = [DiskRequest(64 * MiB)] + [DiskRequest(64 * MiB, ceph=info) for _ in range(n_rbd)]
    floor, window, sequential, snaps = [], [], [], []
    with running_instance(conn, disks=disks, workload="heartbeat", workdir=tmp / f"g{n_rbd}",
                          guest=build_guest()) as inst:  # fmt: skip
        volumes = [d.rbd.volume for d in inst.disks if d.rbd is not None]
        with wiring.open_service(Settings(home=tmp / f"home{n_rbd}", agent_timeout_s=5)) as ff:
            hv = ff.hypervisor
            instance = hv.lookup(inst.name)
            for i in range(samples):
                started = time.perf_counter()
                hv.freeze(instance)
                hv.thaw(instance)
                floor.append((time.perf_counter() - started) * 1000.0)
                before = len(SNAP_MS)
                s = ff.snapshot(SnapshotRequest(inst.name, Consistency.FILESYSTEM))
                snaps += SNAP_MS[before:]
                if s.freeze_window_ms is not None:
                    window.append(s.freeze_window_ms)
                ff.lifecycle.delete(s.id)
                sequential.append(sequential_ms(info, volumes, f"seq-{n_rbd}-{i}"))
    return {
        "rbd_disks": n_rbd,
        "floor_ms": summary(floor),
        "window_ms": summary(window),
        "ratio_of_medians": ratio(summary(window)["median"], summary(floor)["median"]),
        "per_rbd_snapshot_ms": summary(snaps),
        "sequential_no_freeze_ms": summary(sequential),
    }


def restore_times(info: CephTestbed, size: int, samples: int, tmp: Path) -> dict[str, Any]:
    """Restore one RBD member of ``size`` bytes (all written) as a clone, as a flattened clone, and as a copy."""
    import rbd

    name = f"ffbench-restore-{size // MiB}"
    remove_image(info, name)
    create_image(info, name, size)
    settings = rbd_volumes.CephSettings(info.conf, info.user, info.keyring)
    members = RbdMembers(rbd_volumes.RbdVolumes(settings))
    clone, full, copy = [], [], []
    try:
        with open_pool(info) as ioctx, rbd.Image(ioctx, name) as img:
            block = os.urandom(4 * MiB)
            for offset in range(0, size, len(block)):
                img.write(block, offset)
            img.create_snap("ffbench")
        member = Member("bench", "vdb", "virtio", None, size, "raw", f"rbd:{info.pool}/{name}@ffbench",
                        metadata={STORE_KEY: RBD_STORE})  # fmt: skip
        source = str(members.source(member).path)
        for i in range(samples):
            folder = tmp / f"restore-{size}-{i}"
            folder.mkdir()
            for full_copy, into in ((False, clone), (True, full)):
                dst = folder / ("vdb-full.qcow2" if full_copy else "vdb.qcow2")
                started = time.perf_counter()
                ref = members.restore(member, dst, full=full_copy)
                into.append((time.perf_counter() - started) * 1000.0)
                members.remove_clone(str(ref.path).removeprefix("rbd:"))
            out = folder / "vdb.copy.qcow2"
            started = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-f", "raw", source, "-O", "qcow2", str(out)], check=True)
            copy.append((time.perf_counter() - started) * 1000.0)
            out.unlink()
    finally:
        members.volumes.close()
        remove_image(info, name)
    return {
        "size_bytes": size,
        "clone_ms": summary(clone),
        "clone_flatten_ms": summary(full),
        "qemu_img_copy_ms": summary(copy),
        "copy_per_clone": ratio(summary(copy)["median"], summary(clone)["median"]),
        "flatten_per_clone": ratio(summary(full)["median"], summary(clone)["median"]),
    }


def plot(report: dict[str, Any], path: Path, note: str | None) -> None:
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.4, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    rows = report["by_rbd_disks"]
    labels = [f"{r['rbd_disks']} RBD" for r in rows]
    series = [("floor_ms", "bare freeze+thaw"), ("window_ms", "freezeframe window"),
              ("sequential_no_freeze_ms", "Nova-style sequential (no freeze)")]  # fmt: skip
    width = 0.26
    for k, (key, label) in enumerate(series):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ax.bar(xs, [r[key]["median"] or 0 for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("median ms")
    ax.set_title("Filesystem-level set with RBD volumes (vda: qcow2 root file)", fontsize=9)
    ax.legend(fontsize=8)
    restores = report.get("restore", [])
    labels2 = [f"{r['size_bytes'] // MiB} MiB" for r in restores]
    series2 = [("clone_ms", "clone (default)"), ("clone_flatten_ms", "clone + flatten (--full)"),
               ("qemu_img_copy_ms", "qemu-img copy to qcow2")]  # fmt: skip
    for k, (key, label) in enumerate(series2):
        xs = [i + (k - 1) * width for i in range(len(restores))]
        ax2.bar(xs, [r[key]["median"] or 0 for r in restores], width, label=label)
    ax2.set_xticks(range(len(restores)), labels2)
    ax2.set_yscale("log")
    ax2.set_ylabel("median ms (log)")
    ax2.set_title("Restoring one RBD member", fontsize=9)
    ax2.legend(fontsize=8)
    save_figure(fig, path, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    if replot(args, NAME, plot):
        return
    out = output_dir(args, NAME)
    run = Run(NAME, args.quick)
    up = time.perf_counter()
    info = Cluster().up()
    up_s = time.perf_counter() - up
    rbd_volumes.RbdCapture = TimedCapture  # type: ignore[misc]  # time each snapshot the flow takes
    samples = 3 if args.quick else 10
    with libvirt_connection() as conn, scratch_dir(NAME) as tmp:
        run.machine = machine_info(conn, tmp)
        for key, value in info.env().items():
            os.environ[key] = value
        rows = [measure(n, samples, info, conn, tmp) for n in ((1,) if args.quick else (1, 3, 8))]
        sizes = (64 * MiB,) if args.quick else (64 * MiB, 256 * MiB)
        restores = [restore_times(info, size, 3 if args.quick else 7, tmp) for size in sizes]
        payload = {"testbed_ceph_up_s": round(up_s, 2), "by_rbd_disks": rows, "restore": restores}
        report = json.loads(run.write(out, payload, conn).read_text())
    plot(report, out / f"{NAME}.png", run_note(args.quick))
    print(json.dumps([rows, restores], indent=2))
    print(f"wrote {out / f'{NAME}.json'} and {out / f'{NAME}.png'}")


if __name__ == "__main__":
    main()
