"""Capture and export throughput against ``qemu-img convert`` of the same disks and the storage's own limits,
all measured in the same run.

A guest with 3 disks (1 GiB each) fills half of each with random data (``dd if=/dev/urandom`` inside the guest,
so the data is real file data, incompressible). Then, repeated and interleaved:

- capture: a freezeframe filesystem-level set of all three disks (copy time = backup job start to end; the
  whole call also creates the targets and checksums them) vs ``qemu-img convert -U -T none -t writeback`` of
  the same live disks, one after another (source read with O_DIRECT, like the guest's cache=none disks the
  backup job reads; target flushed when qemu-img closes it);
- export: an OVA of the set with ``write_ova`` (qcow2 copied as is, and converted to streamOptimized VMDK) vs
  ``qemu-img convert`` of the same member files to qcow2 / streamOptimized VMDK;
- the storage itself: ``dd`` with O_DIRECT writing, reading, and copying a file of the same size as the data.

    .venv/bin/python bench/throughput.py            # full run: 3 x 1 GiB, half full; bench/results/throughput.*
    .venv/bin/python bench/throughput.py --quick    # smoke run: 3 x 64 MiB, temp dir
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    COLORS,
    GiB,
    MiB,
    Run,
    StepClock,
    add_common_args,
    libvirt_connection,
    machine_info,
    output_dir,
    pyplot,
    ratio,
    replot,
    run,
    run_note,
    save_figure,
    scratch_dir,
    summary,
    timed_run,
)
from freezeframe.config import Settings
from freezeframe.flow import SnapshotRequest
from freezeframe.model import Consistency, SnapshotSet
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import build_guest
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance

try:
    from freezeframe.adapters.ova import OvaDiskSource, write_ova
    from freezeframe.adapters.ovf import OvfDisk, build_descriptor

    EXPORT_MISSING: str | None = None
except ImportError as exc:  # the export adapter is being written in parallel; say so instead of failing
    EXPORT_MISSING = f"freezeframe.adapters.ova.write_ova is not available: {exc}"

TARGETS = ("vda", "vdb", "vdc")


@dataclass(frozen=True)
class Sizes:
    disk: int
    fill: int
    repeats: int


def _data_bytes(image: Path) -> int:
    """Bytes qemu-img reports as data (allocated, not zero) in an image."""
    out = run(["qemu-img", "map", "-U", "--output=json", str(image)], timeout=120).stdout
    return sum(int(e["length"]) for e in json.loads(out) if e.get("data"))


def _fill(inst: TestInstance, fill_mib: int) -> float:
    """Half-fill every disk with random data from inside the guest; returns the seconds it took."""
    started = time.monotonic()
    for target in TARGETS:
        argv = ["/bin/dd", "if=/dev/urandom", f"of=/mnt/{target}/fill", "bs=1M", f"count={fill_mib}", "conv=fsync"]
        code, _, err = inst.guest_exec(argv, timeout_s=1800)
        if code != 0:
            raise RuntimeError(f"filling {target} in the guest failed ({code}): {err.strip()}")
    code, _, err = inst.guest_exec(["/bin/sync"], timeout_s=300)
    if code != 0:
        raise RuntimeError(f"sync in the guest failed: {err.strip()}")
    return time.monotonic() - started


def _convert_all(sources: Sequence[Path], out_dir: Path, args: Sequence[str], suffix: str) -> float:
    """``qemu-img convert`` each source in turn (what an operator's script does); the outputs are removed.

    ``-t writeback`` makes qemu-img flush the target when it closes it. Its default for convert does not (strace
    shows no fdatasync after the data), which would time writing into the page cache against the OVA writer,
    which fsyncs its package.
    """
    outs = [out_dir / f"convert-{i}.{suffix}" for i in range(len(sources))]
    try:
        started = time.monotonic()
        for src, dst in zip(sources, outs, strict=True):
            run(["qemu-img", "convert", "-t", "writeback", *args, str(src), str(dst)], timeout=3600)
        return time.monotonic() - started
    finally:
        for dst in outs:
            dst.unlink(missing_ok=True)


def _export(
    snapshot_set: SnapshotSet, out_dir: Path, mode: str, profiler: cProfile.Profile | None = None
) -> tuple[float, int]:
    """An OVA of the set (members copied as is, or converted to VMDK); returns (seconds, package bytes)."""
    assert EXPORT_MISSING is None
    ext = "qcow2" if mode == "copy" else "vmdk"
    sources = [
        OvaDiskSource.copy(f"bench-{m.target}.qcow2", Path(m.path), "qcow2", m.target)
        if mode == "copy"
        else OvaDiskSource.to_vmdk(f"bench-{m.target}.{ext}", Path(m.path), "qcow2", m.target)
        for m in snapshot_set.members
    ]

    def descriptor(disks: Sequence[OvfDisk]) -> bytes:
        return build_descriptor(snapshot_set, disks)

    out = out_dir / f"bench-{mode}.ova"
    try:
        started = time.monotonic()
        if profiler is None:
            result = write_ova(out, "bench.ovf", descriptor, sources)
        else:
            result = profiler.runcall(write_ova, out, "bench.ovf", descriptor, sources)
        return time.monotonic() - started, result.size
    finally:
        out.unlink(missing_ok=True)


def _profile_export(snapshot_set: SnapshotSet, out_dir: Path, mode: str, top: int = 8) -> dict[str, Any]:
    """One extra, untimed export under cProfile: where the writer's own thread spends its time.

    Work done in other processes (qemu-img) or threads (the hashing pool) shows up as waiting for them.
    """
    profiler = cProfile.Profile()
    seconds, _ = _export(snapshot_set, out_dir, mode, profiler)
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({
            "function": func if filename == "~" else f"{Path(filename).name}:{line}({func})",
            "calls": calls,
            "own_s": round(own, 3),
            "cumulative_s": round(cumulative, 3),
        })  # fmt: skip
    rows.sort(key=lambda r: r["own_s"], reverse=True)
    return {"seconds_under_profiler": round(seconds, 3), "top_by_own_time": rows[:top]}


def _dd(argv: Sequence[str]) -> float:
    return timed_run(["dd", *argv, "status=none"], timeout=3600)


def storage_limits(workdir: Path, size: int) -> dict[str, float]:
    """Sequential O_DIRECT write, read and same-disk copy of a ``size`` file: what the storage can do."""
    count = max(1, size // (4 * MiB))
    nbytes = count * 4 * MiB
    a, b = workdir / "dd-a", workdir / "dd-b"
    try:
        write_s = _dd(["if=/dev/zero", f"of={a}", "bs=4M", f"count={count}", "oflag=direct", "conv=fsync"])
        read_s = _dd([f"if={a}", "of=/dev/null", "bs=4M", "iflag=direct"])
        copy_s = _dd([f"if={a}", f"of={b}", "bs=4M", "iflag=direct", "oflag=direct", "conv=fsync"])
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)
    return {
        "bytes": nbytes,
        "write_mib_s": round(nbytes / MiB / write_s, 1),
        "read_mib_s": round(nbytes / MiB / read_s, 1),
        "copy_mib_s": round(nbytes / MiB / copy_s, 1),
    }


def _median_mib_s(nbytes: int, seconds: Sequence[float]) -> float | None:
    return round(nbytes / MiB / statistics.median(seconds), 1) if seconds else None


def _paired(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """Median of per-repeat time ratios (baseline time / freezeframe time = freezeframe's relative speed)."""
    pairs = [n / d for n, d in zip(numerators, denominators, strict=False) if d]
    return round(statistics.median(pairs), 3) if pairs else None


def measure(conn: Any, sizes: Sizes, workdir: Path) -> dict[str, Any]:
    rows: dict[str, list[float]] = {k: [] for k in (
        "capture_copy_s", "capture_call_s", "capture_checksum_s", "capture_prepare_s", "convert_s",
        "export_copy_s", "export_vmdk_s", "convert_member_qcow2_s", "convert_member_vmdk_s",
    )}  # fmt: skip
    package_bytes: dict[str, int] = {}
    profiles: dict[str, dict[str, Any]] = {}
    scratch = workdir / "scratch"
    scratch.mkdir()
    with running_instance(
        conn, disks=[DiskRequest(sizes.disk)] * 3, workload="idle", workdir=workdir / "vm", name_prefix="ffbench",
        boot_timeout_s=240, memory_mib=256,
    ) as inst, Freezeframe.open(Settings.from_env(home=workdir / "home")) as ff:  # fmt: skip
        fill_s = _fill(inst, sizes.fill // MiB)
        sources = [inst.disk_path(t) for t in TARGETS]
        data = sum(_data_bytes(p) for p in sources)
        clock = StepClock()
        clock.wrap(ff.hypervisor, "start_capture", "backup_begin")
        clock.wrap(ff.hypervisor, "wait_capture", "copy_wait")
        clock.wrap(ff.repository, "checksum", "checksum")
        clock.wrap(ff.repository, "prepare", "prepare")
        limits = storage_limits(scratch, data)
        member_bytes = 0
        for k in range(sizes.repeats):
            clock.take()
            started = time.monotonic()
            result = ff.snapshot(SnapshotRequest(inst.name, Consistency.FILESYSTEM, require=True, name=f"tp-{k}"))
            try:
                rows["capture_call_s"].append(time.monotonic() - started)
                calls = clock.take()
                begin = min(c.start for c in calls if c.step == "backup_begin")
                end = max(c.end for c in calls if c.step == "copy_wait")
                rows["capture_copy_s"].append(end - begin)
                rows["capture_checksum_s"].append(sum(c.ms for c in calls if c.step == "checksum") / 1000)
                rows["capture_prepare_s"].append(sum(c.ms for c in calls if c.step == "prepare") / 1000)
                members = [Path(m.path) for m in result.members]
                member_bytes = sum(p.stat().st_size for p in members)
                if EXPORT_MISSING is None:
                    for mode in ("copy", "vmdk"):
                        seconds, package_bytes[mode] = _export(result, scratch, mode)
                        rows[f"export_{mode}_s"].append(seconds)
                        if k == sizes.repeats - 1:
                            profiles[mode] = _profile_export(result, scratch, mode)
                rows["convert_member_qcow2_s"].append(
                    _convert_all(members, scratch, ["-f", "qcow2", "-O", "qcow2"], "qcow2")
                )
                vmdk = ["-f", "qcow2", "-O", "vmdk", "-o", "subformat=streamOptimized"]
                rows["convert_member_vmdk_s"].append(_convert_all(members, scratch, vmdk, "vmdk"))
            finally:
                ff.repository.remove(result.id)
            live = ["-U", "-T", "none", "-f", "qcow2", "-O", "qcow2"]
            rows["convert_s"].append(_convert_all(sources, scratch, live, "qcow2"))
            print(f"throughput: repeat {k + 1}/{sizes.repeats} done", flush=True)
    report = _report(sizes, data, member_bytes, fill_s, limits, rows, package_bytes)
    if report["export"].get("available"):
        for mode, profile in profiles.items():
            report["export"][mode]["profile"] = profile
    return report


def _report(
    sizes: Sizes,
    data: int,
    member_bytes: int,
    fill_s: float,
    limits: dict[str, float],
    rows: dict[str, list[float]],
    package_bytes: dict[str, int],
) -> dict[str, Any]:
    capture_mib_s = _median_mib_s(data, rows["capture_copy_s"])
    convert_mib_s = _median_mib_s(data, rows["convert_s"])
    out: dict[str, Any] = {
        "disks": len(TARGETS),
        "disk_size_bytes": sizes.disk,
        "filled_bytes_per_disk": sizes.fill,
        "repeats": sizes.repeats,
        "data_bytes": data,
        "member_file_bytes": member_bytes,
        "fill_s": round(fill_s, 1),
        "storage": limits,
        "seconds": {k: [round(v, 3) for v in vs] for k, vs in rows.items()},
        "capture": {
            "copy_mib_s": capture_mib_s,
            "call_mib_s": _median_mib_s(data, rows["capture_call_s"]),
            "convert_mib_s": convert_mib_s,
            "vs_convert": _paired(rows["convert_s"], rows["capture_copy_s"]),
            "call_vs_convert": _paired(rows["convert_s"], rows["capture_call_s"]),
            "vs_storage_copy": ratio(capture_mib_s, limits["copy_mib_s"]),
            "steps_median_s": {
                "prepare": _med(rows["capture_prepare_s"]),
                "copy": _med(rows["capture_copy_s"]),
                "checksum": _med(rows["capture_checksum_s"]),
                "call": _med(rows["capture_call_s"]),
            },
        },
    }
    if EXPORT_MISSING is not None:
        out["export"] = {"available": False, "why": EXPORT_MISSING}
        return out
    out["export"] = {
        "available": True,
        "copy": {
            "mib_s": _median_mib_s(member_bytes, rows["export_copy_s"]),
            "convert_mib_s": _median_mib_s(member_bytes, rows["convert_member_qcow2_s"]),
            "vs_convert": _paired(rows["convert_member_qcow2_s"], rows["export_copy_s"]),
            "package_bytes": package_bytes.get("copy"),
        },
        "vmdk": {
            "mib_s": _median_mib_s(member_bytes, rows["export_vmdk_s"]),
            "convert_mib_s": _median_mib_s(member_bytes, rows["convert_member_vmdk_s"]),
            "vs_convert": _paired(rows["convert_member_vmdk_s"], rows["export_vmdk_s"]),
            "package_bytes": package_bytes.get("vmdk"),
        },
    }
    return out


def _med(values: Sequence[float]) -> float | None:
    return summary(values)["median"]


def plot(report: dict[str, Any], path: Path, note: str | None = None) -> None:
    plt = pyplot()
    bars: list[tuple[str, float | None, str]] = [
        ("storage: dd write", report["storage"]["write_mib_s"], COLORS["limit"]),
        ("storage: dd read", report["storage"]["read_mib_s"], COLORS["limit"]),
        ("storage: dd copy", report["storage"]["copy_mib_s"], COLORS["limit"]),
        ("qemu-img convert\n(live disks)", report["capture"]["convert_mib_s"], COLORS["baseline"]),
        ("freezeframe capture\n(backup copy)", report["capture"]["copy_mib_s"], COLORS["freezeframe"]),
        ("freezeframe capture\n(whole call)", report["capture"]["call_mib_s"], COLORS["freezeframe"]),
    ]
    export = report["export"]
    if export.get("available"):
        bars += [
            ("qemu-img convert\n(members, qcow2)", export["copy"]["convert_mib_s"], COLORS["baseline"]),
            ("export OVA\n(qcow2 copied)", export["copy"]["mib_s"], COLORS["freezeframe"]),
            ("qemu-img convert\n(members, vmdk)", export["vmdk"]["convert_mib_s"], COLORS["baseline"]),
            ("export OVA\n(vmdk)", export["vmdk"]["mib_s"], COLORS["freezeframe"]),
        ]
    fig, ax = plt.subplots(figsize=(9.0, 1.0 + 0.45 * len(bars)))
    y = list(range(len(bars)))[::-1]
    values = [v or 0.0 for _, v, _ in bars]
    ax.barh(y, values, 0.65, color=[c for _, _, c in bars])
    for i, v in zip(y, values, strict=True):
        ax.text(v, i, f" {v:.0f}", ha="left", va="center", fontsize=8)
    ax.set_yticks(y, [label.replace("\n", " ") for label, _, _ in bars])
    ax.set_xlabel("MiB/s (median; data bytes / time)")
    ax.grid(axis="y", visible=False)
    data_mib = report["data_bytes"] / MiB
    title = f"Capture and export throughput: 3 disks, {data_mib:.0f} MiB of random data"
    if not export.get("available"):
        title += " (export: not available)"
    ax.set_title(title)
    save_figure(fig, path, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--disk-gib", type=float, default=1.0)
    args = parser.parse_args()
    if args.quick:
        sizes = Sizes(disk=64 * MiB, fill=32 * MiB, repeats=1)
    else:
        disk = int(args.disk_gib * GiB)
        sizes = Sizes(disk=disk, fill=disk // 2, repeats=args.repeats)
    if replot(args, "throughput", plot):
        return
    out_dir = output_dir(args, "throughput")
    build_guest()
    bench = Run("throughput", args.quick)
    with libvirt_connection() as conn, scratch_dir("throughput") as tmp:
        bench.machine = machine_info(conn, tmp)
        report = measure(conn, sizes, tmp)
        json_path = bench.write(out_dir, report, conn)
    plot(report, out_dir / "throughput.png", run_note(args.quick))
    cap = report["capture"]
    print(f"capture {cap['copy_mib_s']} MiB/s vs qemu-img convert {cap['convert_mib_s']} MiB/s "
          f"(x{cap['vs_convert']}); storage copy {report['storage']['copy_mib_s']} MiB/s")  # fmt: skip
    if report["export"].get("available"):
        for mode in ("copy", "vmdk"):
            e = report["export"][mode]
            print(f"export {mode}: {e['mib_s']} MiB/s vs qemu-img convert {e['convert_mib_s']} (x{e['vs_convert']})")
    else:
        print(f"export: {report['export']['why']}")
    print(f"wrote {json_path} and {out_dir / 'throughput.png'}")


if __name__ == "__main__":
    main()
