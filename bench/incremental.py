"""Incremental sets against full sets of the same guest, same run: bytes written, time, freeze window.

A guest with 3 disks fills half of each with random file data (``dd if=/dev/urandom`` inside the guest). Then for
each change rate (0.1 %, 1 %, 10 % of the data), repeated: a full set (``--mode full``), the guest rewrites that
share of its data in distinct random 64 KiB blocks (``dd conv=notrunc`` + ``sync``), an incremental set
(``--mode auto`` over the full one). Recorded per set: wall time of the whole call, freeze window, and the bytes
the members' own files take; for the incremental, against the bytes the guest changed.

    .venv/bin/python bench/incremental.py             # 3 x 256 MiB disks, half full, 3 repeats
    .venv/bin/python bench/incremental.py --disk-mib 4096   # the issue's 4 GiB disks
    .venv/bin/python bench/incremental.py --quick     # smoke run: 3 x 64 MiB, temp dir
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
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
from freezeframe.config import Settings
from freezeframe.flow import SnapshotRequest
from freezeframe.model import SnapshotSet
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import build_guest
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance

TARGETS = ("vda", "vdb", "vdc")
RATES = (0.001, 0.01, 0.1)
BLOCK = 64 * 1024


@dataclass(frozen=True)
class Sizes:
    disk: int
    repeats: int

    @property
    def fill(self) -> int:
        return self.disk // 2


def _exec(inst: TestInstance, script: str, timeout_s: float = 900) -> None:
    code, out, err = inst.guest_exec(["sh", "-c", script], timeout_s=timeout_s)
    if code != 0:
        raise RuntimeError(f"guest script failed ({code}): {out} {err}")


def _fill(inst: TestInstance, sizes: Sizes) -> None:
    blocks = sizes.fill // BLOCK
    for t in TARGETS:
        _exec(inst, f"dd if=/dev/urandom of=/mnt/{t}/fill bs=64k count={blocks} 2>/dev/null && sync")


def _change(inst: TestInstance, sizes: Sizes, rate: float, rng: random.Random) -> int:
    """Rewrite ``rate`` of each disk's data in distinct random blocks; the bytes changed in all."""
    blocks = sizes.fill // BLOCK
    count = max(1, round(blocks * rate))
    for t in TARGETS:
        seeks = " ".join(str(s) for s in rng.sample(range(blocks), count))
        _exec(inst, f"for s in {seeks}; do dd if=/dev/urandom of=/mnt/{t}/fill bs=64k count=1 seek=$s "
                    "conv=notrunc 2>/dev/null || exit 1; done; sync")  # fmt: skip
    return count * BLOCK * len(TARGETS)


def _written(s: SnapshotSet) -> int:
    return sum(int(m.metadata.get("freezeframe.bytes_written", "0")) for m in s.members)


def _timed_set(ff: Freezeframe, inst: TestInstance, mode: str) -> tuple[SnapshotSet, float]:
    started = time.monotonic()
    taken = ff.snapshot(SnapshotRequest(instance=inst.uuid, mode=mode))
    return taken, time.monotonic() - started


def measure(conn: Any, sizes: Sizes, tmp: Path) -> dict[str, Any]:
    rng = random.Random(2026)
    disks = [DiskRequest(sizes.disk) for _ in TARGETS]
    rows: list[dict[str, Any]] = []
    with running_instance(conn, disks=disks, workload="idle", workdir=tmp / "guest") as inst:
        _fill(inst, sizes)
        with Freezeframe.open(Settings(home=tmp / "home", agent_timeout_s=5)) as ff:
            warm_up, _ = _timed_set(ff, inst, "full")  # the fill's dirty data is flushed here, not in a measured set
            ff.lifecycle.delete(warm_up.id)
            for rate in RATES:
                for _ in range(sizes.repeats):
                    full, full_s = _timed_set(ff, inst, "full")
                    changed = _change(inst, sizes, rate, rng)
                    incr, incr_s = _timed_set(ff, inst, "auto")
                    kinds = {m.metadata.get("freezeframe.kind") for m in incr.members}
                    if kinds != {"incremental"}:
                        raise RuntimeError(f"expected incremental members, got {kinds}: {incr.members}")
                    rows.append({
                        "rate": rate, "changed_bytes": changed,
                        "full": {"s": round(full_s, 3), "freeze_ms": full.freeze_window_ms, "bytes": _written(full)},
                        "incremental": {"s": round(incr_s, 3), "freeze_ms": incr.freeze_window_ms,
                                        "bytes": _written(incr)},
                    })  # fmt: skip
                    ff.lifecycle.delete(incr.id)
                    ff.lifecycle.delete(full.id)
    return {"sizes": {"disk_bytes": sizes.disk, "data_bytes_per_disk": sizes.fill, "disks": len(TARGETS)},
            "rows": rows, "by_rate": _by_rate(rows)}  # fmt: skip


def _by_rate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    result = {}
    for rate in RATES:
        mine = [r for r in rows if r["rate"] == rate]
        inc_s, full_s = summary([r["incremental"]["s"] for r in mine]), summary([r["full"]["s"] for r in mine])
        inc_b = summary([r["incremental"]["bytes"] for r in mine])
        changed = summary([r["changed_bytes"] for r in mine])
        result[str(rate)] = {
            "incremental_s": inc_s, "full_s": full_s, "time_share": ratio(inc_s["median"], full_s["median"]),
            "incremental_bytes": inc_b, "full_bytes": summary([r["full"]["bytes"] for r in mine]),
            "changed_bytes": changed, "written_per_changed": ratio(inc_b["median"], changed["median"]),
            "incremental_freeze_ms": summary([r["incremental"]["freeze_ms"] or 0.0 for r in mine]),
            "full_freeze_ms": summary([r["full"]["freeze_ms"] or 0.0 for r in mine]),
        }  # fmt: skip
    return result


def plot(report: dict[str, Any], path: Path, note: str | None) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    rates = list(report["by_rate"])
    labels = [f"{float(r) * 100:g} %" for r in rates]
    x = range(len(rates))
    by = report["by_rate"]
    panels = [
        ("MiB written per set", "incremental_bytes", "full_bytes", "changed_bytes", 1 / MiB),
        ("seconds per set", "incremental_s", "full_s", None, 1.0),
        ("freeze window (ms)", "incremental_freeze_ms", "full_freeze_ms", None, 1.0),
    ]
    for ax, (title, inc, full, changed, scale) in zip(axes, panels, strict=True):
        width = 0.27
        ax.bar([i - width for i in x], [by[r][full]["median"] * scale for r in rates], width, label="full set")
        ax.bar(list(x), [by[r][inc]["median"] * scale for r in rates], width, label="incremental set")
        if changed:
            ax.bar([i + width for i in x], [by[r][changed]["median"] * scale for r in rates], width,
                   label="changed by the guest")  # fmt: skip
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("share of the data changed between sets")
        ax.set_title(title)
        ax.legend()
    save_figure(fig, path, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--disk-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = Sizes(64 * MiB, 1) if args.quick else Sizes(args.disk_mib * MiB, args.repeats)
    if replot(args, "incremental", plot):
        return
    out_dir = output_dir(args, "incremental")
    build_guest()
    bench = Run("incremental", args.quick)
    with libvirt_connection() as conn, scratch_dir("incremental") as tmp:
        bench.machine = machine_info(conn, tmp)
        report = measure(conn, sizes, tmp)
        json_path = bench.write(out_dir, report, conn)
    plot(report, out_dir / "incremental.png", run_note(args.quick))
    for rate, r in report["by_rate"].items():
        print(f"{float(rate) * 100:g} % changed: incremental {r['incremental_s']['median']} s vs full "
              f"{r['full_s']['median']} s ({r['time_share']}x); written/changed {r['written_per_changed']}; "
              f"freeze {r['incremental_freeze_ms']['median']} vs {r['full_freeze_ms']['median']} ms")  # fmt: skip
    print(f"wrote {json_path} and {out_dir / 'incremental.png'}")


if __name__ == "__main__":
    main()
