"""Group window: how long the guests of a consistency group are held (first freeze to last thaw) for 2, 4 and 8
instances, against the single-instance window and the bare freeze/thaw floor, same guests, same run.

Eight small guests boot (one 32 MiB disk each, idle). Each round measures, in this order so machine noise hits all
alike: the bare floor on one guest (freeze + thaw straight on the domain), the same for 2, 4 and 8 guests at once (the
floor of a group of that size), a filesystem-level set of one guest, and a filesystem-level group set of 2, 4 and
8 of them.
The target: the group window stays within 1.3x the single-instance window.

    .venv/bin/python bench/group_window.py            # full run, writes bench/results/group_window.json + .png
    .venv/bin/python bench/group_window.py --quick    # smoke run (2 and 4 instances, 2 rounds), to a temp dir
"""

from __future__ import annotations

import argparse
import contextlib
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
from freezeframe.config import Settings
from freezeframe.flow import SnapshotRequest
from freezeframe.group_flow import GroupRequest, in_parallel
from freezeframe.model import Consistency, Instance
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import build_guest
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance

NAME = "group_window"
TARGET = 1.3


def _floor_ms(ff: Freezeframe, instances: Sequence[Instance]) -> float:
    """Bare freeze then thaw of every instance at once, straight on the domains: what any group window costs."""
    hv = ff.hypervisor
    started = time.perf_counter()
    in_parallel([lambda i=i: hv.freeze(i) for i in instances])
    in_parallel([lambda i=i: hv.thaw(i) for i in instances])
    return (time.perf_counter() - started) * 1000.0


def _round(ff: Freezeframe, guests: Sequence[TestInstance], sizes: Sequence[int], data: dict[str, list[float]]) -> None:
    instances = [ff.hypervisor.lookup(g.name) for g in guests]
    for n in (1, *sizes):
        data[f"floor_{n}"].append(_floor_ms(ff, instances[:n]))
    single = ff.snapshot(SnapshotRequest(guests[0].name, Consistency.FILESYSTEM, mode="full"))
    data["single"].append(single.freeze_window_ms or 0.0)
    ff.lifecycle.delete(single.id)
    for n in sizes:
        view = ff.groups.snapshot(GroupRequest(f"g{n}", Consistency.FILESYSTEM))
        data[f"group_{n}"].append(view.group_set.window_ms or 0.0)
        data[f"group_{n}_slowest_member"].append(max(s.freeze_window_ms or 0.0 for s in view.sets))
        ff.groups.delete_set(view.group_set.id)


def measure(conn: Any, tmp: Path, sizes: Sequence[int], rounds: int) -> dict[str, Any]:
    image = build_guest()
    with contextlib.ExitStack() as stack:
        boot = [DiskRequest(32 * MiB)]
        guests = [
            stack.enter_context(running_instance(conn, disks=boot, workload="idle", name_prefix="ffgrpbench",
                                                 workdir=tmp / "guests", guest=image, memory_mib=192))
            for _ in range(max(sizes))
        ]  # fmt: skip
        with wiring.open_service(Settings(home=tmp / "home", agent_timeout_s=5)) as ff:
            for n in sizes:
                ff.groups.create(f"g{n}", [g.name for g in guests[:n]])
            data: dict[str, list[float]] = {
                k: [] for k in ("floor_1", *(f"floor_{n}" for n in sizes), "single",
                                *(f"group_{n}" for n in sizes), *(f"group_{n}_slowest_member" for n in sizes))
            }  # fmt: skip
            _round(ff, guests, sizes, {k: [] for k in data})  # warm-up: first calls pay for connections and caches
            for _ in range(rounds):
                _round(ff, guests, sizes, data)
    stats = {k: summary(v) for k, v in data.items()}
    single = stats["single"]["median"]
    return {
        "instances": list(sizes),
        "rounds": rounds,
        "samples_ms": data,
        "stats_ms": stats,
        "group_vs_single": {str(n): ratio(stats[f"group_{n}"]["median"], single) for n in sizes},
        "group_vs_floor_of_n": {
            str(n): ratio(stats[f"group_{n}"]["median"], stats[f"floor_{n}"]["median"]) for n in sizes
        },
        "single_vs_floor_1": ratio(single, stats["floor_1"]["median"]),
        "group_above_floor_ms": {
            str(n): round(stats[f"group_{n}"]["median"] - stats[f"floor_{n}"]["median"], 1) for n in sizes
        },
        "single_above_floor_ms": round(single - stats["floor_1"]["median"], 1),
        "target": TARGET,
    }


def plot(report: dict[str, Any], path: Path, note: str | None) -> None:
    plt = pyplot()
    stats = report["stats_ms"]
    sizes = report["instances"]
    fig, ax = plt.subplots(figsize=(8.0, 4.0))
    labels = ["floor 1", "single", *(x for n in sizes for x in (f"floor {n}", f"group {n}"))]
    keys = ["floor_1", "single", *(x for n in sizes for x in (f"floor_{n}", f"group_{n}"))]
    medians = [stats[k]["median"] or 0 for k in keys]
    p95s = [stats[k]["p95"] or 0 for k in keys]
    ax.bar(range(len(keys)), medians, label="median")
    ax.scatter(range(len(keys)), p95s, color="black", marker="_", s=200, label="p95")
    ax.axhline(TARGET * (stats["single"]["median"] or 0), color="red", linestyle="--", label=f"{TARGET}x single")
    ax.set_xticks(range(len(keys)), labels)
    ax.set_ylabel("ms the guests are held")
    ax.set_title("Group window (filesystem level) vs single-instance window and bare floor")
    ax.legend()
    save_figure(fig, path, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    if replot(args, NAME, plot):
        return
    out = output_dir(args, NAME)
    bench = Run(NAME, args.quick)
    sizes, rounds = ((2, 4), 2) if args.quick else ((2, 4, 8), 10)
    with libvirt_connection() as conn, scratch_dir(NAME) as tmp:
        bench.machine = machine_info(conn, tmp)
        payload = measure(conn, tmp, sizes, rounds)
        json_path = bench.write(out, payload, conn)
    plot(payload, out / f"{NAME}.png", run_note(args.quick))
    print({k: v["median"] for k, v in payload["stats_ms"].items()})
    print(f"group/single: {payload['group_vs_single']}; wrote {json_path} and {out / f'{NAME}.png'}")


if __name__ == "__main__":
    main()
