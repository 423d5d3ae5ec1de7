"""Freeze window of filesystem-level sets against the floor (bare freeze + thaw), same guest, same run; and the
stall the guest itself sees (heartbeat workload: the longest gap between its writes around each operation).

For each configuration a real guest boots under write load; floor and snapshot measurements alternate so that
machine noise hits both alike, each followed by a quiet second that measures the gaps the guest sees anyway.
Reports medians and p95, the ratio of medians, and where the time inside the window goes (each step timed).

    .venv/bin/python bench/window.py            # full run, writes bench/results/window.json + window.png
    .venv/bin/python bench/window.py --quick    # smoke run (the test suite uses it), writes to a temp dir
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    COLORS,
    GiB,
    GuestClock,
    MiB,
    Run,
    StepClock,
    add_common_args,
    libvirt_connection,
    machine_info,
    median_steps,
    output_dir,
    p95,
    pyplot,
    ratio,
    replot,
    run_note,
    save_figure,
    scratch_dir,
    steps_in,
    summary,
)
from freezeframe.config import Settings
from freezeframe.flow import SnapshotRequest
from freezeframe.model import Consistency
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import build_guest
from freezeframe.testbed.heartbeat import LOG_PATH, Beat, longest_gap, parse_heartbeat
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance
from freezeframe.testbed.ledger import read_guest_file

QUIET_S = 1.0
"""After each operation: a second in which nothing happens, to see the gaps the guest has anyway."""
SETTLE_S = 0.3
# (object, method, step) wrapped to time each step of the window; nested calls are attributed to themselves.
HYPERVISOR_STEPS = (
    ("domain", "lookup"),
    ("_bound_agent", "agent_timeout"),
    ("freeze", "freeze"),
    ("pause", "pause"),
    ("start_capture", "backup_begin"),
    ("resume", "resume"),
    ("paused_by_io_error", "io_error_check"),
    ("thaw", "thaw"),
    ("freeze_status", "thaw_status"),
)
WINDOW_START = ("freeze", "pause")
WINDOW_END = ("thaw", "thaw_status", "resume")
"""The window opens with the first freeze/pause and closes with the last thaw (+ status check) or resume."""
STEP_ORDER = ("freeze", "agent_timeout", "lookup", "journal", "pause", "backup_begin", "resume", "io_error_check",
              "thaw", "thaw_status")  # fmt: skip


@dataclass
class Config:
    label: str
    disks: int
    size: int
    workload: str
    samples: int
    pause: bool = False


@dataclass
class Outcome:
    label: str
    disks: int
    size_bytes: int
    workload: str
    pause: bool
    samples: int
    floor_ms: list[float]
    window_ms: list[float]
    floor_median_ms: float
    floor_p95_ms: float
    window_median_ms: float
    window_p95_ms: float
    ratio_of_medians: float
    boot_s: float
    snapshot_call_s: list[float] = field(default_factory=list)
    floor_pause_ms: list[float] = field(default_factory=list)
    pause_ms: list[float] = field(default_factory=list)
    steps_median_ms: dict[str, float] = field(default_factory=dict)
    floor_steps_median_ms: dict[str, float] = field(default_factory=dict)
    stall: dict[str, Any] | None = None
    """Heartbeat configs: longest gap (ms) between the guest's writes per floor / snapshot / quiet interval."""
    stall_note: str | None = None


@dataclass
class _Intervals:
    """Host realtime (ns) of each operation, translated to guest time when the stall is computed."""

    floor: list[tuple[int, int, GuestClock]] = field(default_factory=list)
    snapshot: list[tuple[int, int, GuestClock]] = field(default_factory=list)
    quiet: list[tuple[int, int, GuestClock]] = field(default_factory=list)


def _floor(inst: TestInstance, pause: bool) -> tuple[float, float | None, dict[str, float]]:
    """Bare freeze (+ suspend/resume) + thaw straight on the domain: what any snapshot must at least cost."""
    dom = inst.dom
    started = time.monotonic()
    dom.fsFreeze()
    frozen = time.monotonic()
    pause_ms = None
    try:
        if pause:
            dom.suspend()
            dom.resume()
            pause_ms = (time.monotonic() - frozen) * 1000
    finally:
        thaw_start = time.monotonic()
        dom.fsThaw()
    ended = time.monotonic()
    steps = {"freeze": (frozen - started) * 1000, "thaw": (ended - thaw_start) * 1000}
    return (ended - started) * 1000, pause_ms, steps


def _stall(beats: list[Beat], intervals: _Intervals) -> dict[str, Any]:
    """Longest gap per interval; operations are widened and quiet seconds narrowed by the clock uncertainty."""

    def gaps(items: list[tuple[int, int, GuestClock]], widen: bool) -> list[float]:
        out = []
        for start, end, clock in items:
            margin = clock.uncertainty_ns + 20_000_000
            lo, hi = clock.to_guest(start), clock.to_guest(end)
            lo, hi = (lo - margin, hi + margin) if widen else (lo + margin, hi - margin)
            gap = longest_gap(beats, lo, hi)
            if gap.beats > 1:
                out.append(round(gap.max_gap_ms, 3))
        return out

    floor, snapshot, quiet = gaps(intervals.floor, True), gaps(intervals.snapshot, True), gaps(intervals.quiet, False)
    all_gaps = [(b.realtime_ns - a.realtime_ns) / 1e6 for a, b in itertools.pairwise(beats)]
    return {
        "floor_ms": floor,
        "snapshot_ms": snapshot,
        "quiet_ms": quiet,
        "floor": summary(floor),
        "snapshot": summary(snapshot),
        "quiet": summary(quiet),
        "typical_gap_ms": round(sorted(all_gaps)[len(all_gaps) // 2], 3) if all_gaps else None,
        "beats": len(beats),
        "clock_uncertainty_ms": round(max(c.uncertainty_ns for _, _, c in intervals.snapshot) / 1e6, 3)
        if intervals.snapshot
        else None,
    }


def measure(conn: Any, config: Config, workdir: Path, home: Path) -> Outcome:
    disks = [DiskRequest(config.size)] * config.disks
    heartbeat = config.workload == "heartbeat"
    intervals = _Intervals()
    with running_instance(
        conn, disks=disks, workload=config.workload, workdir=workdir, name_prefix="ffbench", boot_timeout_s=240
    ) as inst:
        inst.wait_for_progress(timeout_s=60)
        with Freezeframe.open(Settings.from_env(home=home)) as ff:
            clock = StepClock()
            for method, step in HYPERVISOR_STEPS:
                clock.wrap(ff.hypervisor, method, step)
            clock.wrap(ff.journal, "record", "journal")
            floors, windows, calls, floor_pauses, pauses = [], [], [], [], []
            steps, floor_steps = [], []
            for _ in range(config.samples):
                # The guest clock is read again before every operation: under TCG it stands still while the vCPUs
                # are paused, so after a pause the offset to the host's clock has changed.
                guest_clock = GuestClock.measure(inst) if heartbeat else GuestClock(0, 0)
                started = time.time_ns()
                floor_ms, floor_pause_ms, floor_step = _floor(inst, config.pause)
                intervals.floor.append((started, time.time_ns(), guest_clock))
                floors.append(floor_ms)
                floor_steps.append(floor_step)
                if floor_pause_ms is not None:
                    floor_pauses.append(floor_pause_ms)
                time.sleep(SETTLE_S)

                guest_clock = GuestClock.measure(inst) if heartbeat else guest_clock
                clock.take()
                started, call_started = time.time_ns(), time.monotonic()
                request = SnapshotRequest(inst.name, Consistency.FILESYSTEM, require=True, pause_vcpus=config.pause)
                result = ff.snapshot(request)
                calls.append(round(time.monotonic() - call_started, 3))
                intervals.snapshot.append((started, time.time_ns(), guest_clock))
                ff.repository.remove(result.id)
                assert result.freeze_window_ms is not None
                windows.append(result.freeze_window_ms)
                if result.pause_window_ms is not None:
                    pauses.append(result.pause_window_ms)
                steps.append(steps_in(clock.take(), WINDOW_START, WINDOW_END, STEP_ORDER))

                guest_clock = GuestClock.measure(inst) if heartbeat else guest_clock
                started = time.time_ns()
                time.sleep(QUIET_S)
                intervals.quiet.append((started, time.time_ns(), guest_clock))
        stall, note = None, None
        if heartbeat:
            clean = inst.shutdown(timeout_s=60)
            log = read_guest_file(inst.disk_path("vda"), LOG_PATH, tmp_dir=workdir)
            stall = _stall(parse_heartbeat(log), intervals)
            notes = []
            if config.pause:
                notes.append(
                    "the guest's clock stands still while its vCPUs are paused (TCG), so the stall excludes the "
                    "pause itself: see pause_ms"
                )
            if not clean:
                notes.append("guest did not power off cleanly; the last beats before destroy may be missing")
            note = "; ".join(notes) or None
        else:
            note = f"{config.workload} workload writes no timestamps: the guest-visible stall is not measured here"
    floor_median, window_median = _median(floors), _median(windows)
    return Outcome(
        label=config.label, disks=config.disks, size_bytes=config.size, workload=config.workload,
        pause=config.pause, samples=config.samples, floor_ms=floors, window_ms=windows,
        floor_median_ms=floor_median, floor_p95_ms=p95(floors),
        window_median_ms=window_median, window_p95_ms=p95(windows),
        ratio_of_medians=round(window_median / floor_median, 3), boot_s=inst.boot_seconds,
        snapshot_call_s=calls, floor_pause_ms=floor_pauses, pause_ms=pauses,
        steps_median_ms=median_steps(steps), floor_steps_median_ms=median_steps(floor_steps),
        stall=stall, stall_note=note,
    )  # fmt: skip


def _median(values: list[float]) -> float:
    return float(summary(values)["median"] or 0.0)


def plot(outcomes: list[Outcome], path: Path, note: str | None = None) -> None:
    plt = pyplot()
    labels = [o.label for o in outcomes]
    x = list(range(len(outcomes)))
    fig, (ax, ax_stall, ax_steps) = plt.subplots(3, 1, figsize=(max(8.0, 1.6 * len(outcomes)), 11))
    width = 0.38

    floor = [o.floor_median_ms for o in outcomes]
    window = [o.window_median_ms for o in outcomes]
    floor_err = [[0] * len(outcomes), [o.floor_p95_ms - o.floor_median_ms for o in outcomes]]
    window_err = [[0] * len(outcomes), [o.window_p95_ms - o.window_median_ms for o in outcomes]]
    ax.bar([i - width / 2 for i in x], floor, width, yerr=floor_err, capsize=3, color=COLORS["floor"],
           label="floor: bare freeze+thaw")  # fmt: skip
    ax.bar([i + width / 2 for i in x], window, width, yerr=window_err, capsize=3, color=COLORS["freezeframe"],
           label="freezeframe window")  # fmt: skip
    for i, o in enumerate(outcomes):
        ax.text(i + width / 2, o.window_p95_ms, f"{o.ratio_of_medians:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.25 * max([*(o.window_p95_ms for o in outcomes), *(o.floor_p95_ms for o in outcomes), 1.0]))
    ax.set_xticks(x, labels, rotation=12)
    ax.set_ylabel("ms (median, whisker to p95)")
    ax.set_title("Filesystem-level freeze window vs floor (TCG guest under write load)")
    ax.legend(loc="upper left")

    with_stall = [(i, o) for i, o in enumerate(outcomes) if o.stall]
    third = 0.27
    for k, (kind, color, name) in enumerate(
        (("quiet", COLORS["quiet"], "nothing happening (1 s)"), ("floor", COLORS["floor"], "bare freeze+thaw"),
         ("snapshot", COLORS["freezeframe"], "whole freezeframe snapshot call"))
    ):  # fmt: skip
        med = [float(o.stall[kind]["median"] or 0) if o.stall else 0.0 for _, o in with_stall]
        hi = [
            float(o.stall[kind]["p95"] or 0) - m if o.stall else 0.0 for (_, o), m in zip(with_stall, med, strict=True)
        ]
        ax_stall.bar([i + (k - 1) * third for i, _ in with_stall], med, third, yerr=[[0] * len(med), hi], capsize=3,
                     color=color, label=name)  # fmt: skip
    for i, o in enumerate(outcomes):
        if not o.stall:
            ax_stall.text(i, 0, "not measured\n(no timestamps)", ha="center", va="bottom", fontsize=7)
    ax_stall.set_xticks(x, labels, rotation=12)
    ax_stall.set_ylabel("longest gap between guest writes, ms")
    ax_stall.set_title("Guest-visible stall (heartbeat workload; ledger config not measured)")
    ax_stall.legend(loc="upper left")

    cmap = plt.get_cmap("tab20")
    steps = [s for s in (*STEP_ORDER, "other") if any(o.steps_median_ms.get(s, 0.0) >= 0.5 for o in outcomes)]
    color_of = {step: cmap(k % 20) for k, step in enumerate(steps)}
    # Left, narrow: the floor's own two steps; right: every step inside the freezeframe window.
    for series, offset, bar_width, hatch in (("floor", -0.22, 0.22, "//"), ("window", 0.14, 0.46, None)):
        bottoms = [0.0] * len(outcomes)
        for step in steps:
            if series == "floor":
                values = [o.floor_steps_median_ms.get(step, 0.0) for o in outcomes]
            else:
                values = [o.steps_median_ms.get(step, 0.0) for o in outcomes]
            if not any(values):
                continue
            ax_steps.bar([i + offset for i in x], values, bar_width, bottom=bottoms, color=color_of[step],
                         hatch=hatch, edgecolor="white", label=step if series == "window" else None)  # fmt: skip
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax_steps.set_xticks(x, labels, rotation=12)
    ax_steps.set_ylabel("ms (median of each step)")
    ax_steps.set_title("Where the time goes: floor's steps (hatched, left) vs each step inside the window (right)")
    ax_steps.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path, note)


def configs_for(args: argparse.Namespace) -> list[Config]:
    if args.quick:
        return [Config("3x64 MiB", 3, 64 * MiB, "heartbeat", 2)]
    n = args.samples
    return [
        Config("3x64 MiB ledger", 3, 64 * MiB, "ledger", n),
        Config("1x64 MiB", 1, 64 * MiB, "heartbeat", n),
        Config("3x64 MiB", 3, 64 * MiB, "heartbeat", n),
        Config("8x64 MiB", 8, 64 * MiB, "heartbeat", n),
        Config("3x1 GiB", 3, GiB, "heartbeat", n),
        Config("3x4 GiB", 3, 4 * GiB, "heartbeat", n),
        Config("3x64 MiB +pause", 3, 64 * MiB, "heartbeat", n, pause=True),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--samples", type=int, default=30, help="snapshots (and floors) per configuration")
    parser.add_argument("--only", action="append", default=[], help="run only configs with this label (repeatable)")
    args = parser.parse_args()
    if replot(args, "window", lambda report, path, note: plot([Outcome(**o) for o in report["outcomes"]], path, note)):
        return
    out_dir = output_dir(args, "window")
    configs = [c for c in configs_for(args) if not args.only or c.label in args.only]
    build_guest()
    bench = Run("window", args.quick)
    outcomes = []
    with libvirt_connection() as conn, scratch_dir("window") as tmp:
        bench.machine = machine_info(conn, tmp)
        for i, config in enumerate(configs):
            outcome = measure(conn, config, tmp / f"vm{i}", tmp / "home")
            outcomes.append(outcome)
            stall = ""
            if outcome.stall:
                stall = (
                    f" | stall median {outcome.stall['snapshot']['median']} ms "
                    f"(floor {outcome.stall['floor']['median']}, quiet {outcome.stall['quiet']['median']})"
                )
            print(
                f"{config.label:>18}: window median {outcome.window_median_ms:7.1f} ms p95 "
                f"{outcome.window_p95_ms:7.1f} | floor median {outcome.floor_median_ms:7.1f} ms p95 "
                f"{outcome.floor_p95_ms:7.1f} | ratio {outcome.ratio_of_medians:.2f}{stall}",
                flush=True,
            )
        json_path = bench.write(out_dir, {"outcomes": [asdict(o) for o in outcomes], **_flatness(outcomes)}, conn)
    plot(outcomes, out_dir / "window.png", run_note(args.quick))
    print(f"wrote {json_path} and {out_dir / 'window.png'}")


def _flatness(outcomes: list[Outcome]) -> dict[str, Any]:
    """Does the window grow with disk count or size? Compared by ratio to the smallest config of each series."""
    by_label = {o.label: o for o in outcomes}

    def series(labels: list[str]) -> dict[str, Any]:
        present = [by_label[label] for label in labels if label in by_label]
        if len(present) < 2:
            return {}
        base = present[0]
        return {
            o.label: {
                "window_vs_first": ratio(o.window_median_ms, base.window_median_ms),
                "floor_vs_first": ratio(o.floor_median_ms, base.floor_median_ms),
                "excess_over_floor_ms": round(o.window_median_ms - o.floor_median_ms, 3),
            }
            for o in present
        }

    return {
        "by_disk_count": series(["1x64 MiB", "3x64 MiB", "8x64 MiB"]),
        "by_disk_size": series(["3x64 MiB", "3x1 GiB", "3x4 GiB"]),
    }


if __name__ == "__main__":
    main()
