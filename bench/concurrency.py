"""Several instances snapshotted at once: each one's freeze window when all go together vs when it goes alone.

Four 3-disk ledger guests run under write load. Each round snapshots every instance alone (one after another)
and then all of them at once (one thread per instance, each with its own ``Freezeframe`` service on a shared
home, released together by a barrier); the order of the two phases alternates between rounds. Every set taken
concurrently is also judged by the ledger checker.

    .venv/bin/python bench/concurrency.py            # full run: 4 instances, 10 rounds; bench/results/concurrency.*
    .venv/bin/python bench/concurrency.py --quick    # smoke run: 2 instances, 1 round, temp dir
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from common import (
    COLORS,
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
    run_note,
    save_figure,
    scratch_dir,
    span_of,
    summary,
)
from freezeframe.config import Settings
from freezeframe.errors import FreezeframeError
from freezeframe.flow import SnapshotRequest
from freezeframe.model import Consistency, SnapshotSet
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import build_guest
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance
from freezeframe.testbed.ledger import check_ledger

SETTLE_S = 0.5


@dataclass
class Guest:
    inst: TestInstance
    ff: Freezeframe
    clock: StepClock
    alone_ms: list[float] = field(default_factory=list)
    together_ms: list[float] = field(default_factory=list)
    alone_call_s: list[float] = field(default_factory=list)
    together_call_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    checked: int = 0


@dataclass
class Shot:
    window_ms: float | None
    call_s: float
    span: tuple[float, float] | None
    """(freeze start, thaw confirmed) on time.monotonic, to see how far the windows overlapped."""
    error: str | None = None


def _snapshot(guest: Guest, level: Consistency, check: bool, workdir: Path) -> Shot:
    guest.clock.take()
    started = time.monotonic()
    try:
        result: SnapshotSet = guest.ff.snapshot(SnapshotRequest(guest.inst.name, level, require=True))
    except (FreezeframeError, libvirt.libvirtError, OSError) as exc:
        return Shot(None, time.monotonic() - started, None, f"{type(exc).__name__}: {exc}"[:400])
    call_s = time.monotonic() - started
    try:
        calls = guest.clock.take()
        span = span_of(calls, ("freeze",), ("thaw", "thaw_status"))
        if check:
            members = {m.target: Path(m.path) for m in result.members}
            verdict = check_ledger(members["vdb"], members["vdc"], tmp_dir=workdir)
            guest.checked += 1
            if not verdict.ok:
                guest.violations.append(verdict.reason)
    finally:
        guest.ff.repository.remove(result.id)
    return Shot(result.freeze_window_ms, call_s, span)


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    """How many windows were open at the same moment, at most."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = now = 0
    for _, delta in events:
        now += delta
        best = max(best, now)
    return best


def measure(conn: Any, count: int, rounds: int, level: Consistency, workdir: Path) -> dict[str, Any]:
    home = workdir / "home"
    overlaps: list[int] = []
    together_wall: list[float] = []
    with contextlib.ExitStack() as stack:
        guests = []
        for i in range(count):
            inst = stack.enter_context(
                running_instance(
                    conn, disks=[DiskRequest(64 * MiB)] * 3, workload="ledger", workdir=workdir / f"vm{i}",
                    name_prefix="ffbench", boot_timeout_s=240,
                )
            )  # fmt: skip
            ff = stack.enter_context(Freezeframe.open(Settings.from_env(home=home)))
            clock = StepClock()
            clock.wrap(ff.hypervisor, "freeze", "freeze")
            clock.wrap(ff.hypervisor, "thaw", "thaw")
            clock.wrap(ff.hypervisor, "freeze_status", "thaw_status")  # older flows confirm the thaw
            guests.append(Guest(inst, ff, clock))
        for guest in guests:
            guest.inst.wait_for_progress(timeout_s=60)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=count, thread_name_prefix="ffbench"))
        for r in range(rounds):
            phases = ("alone", "together") if r % 2 == 0 else ("together", "alone")
            for phase in phases:
                if phase == "alone":
                    for guest in guests:
                        shot = _snapshot(guest, level, False, workdir)
                        _record(guest, shot, alone=True)
                        time.sleep(SETTLE_S)
                else:
                    barrier = threading.Barrier(count)

                    def together(guest: Guest, barrier: threading.Barrier = barrier) -> Shot:
                        barrier.wait(timeout=120)
                        return _snapshot(guest, level, True, workdir)

                    started = time.monotonic()
                    shots = list(pool.map(together, guests))
                    together_wall.append(round(time.monotonic() - started, 3))
                    for guest, shot in zip(guests, shots, strict=True):
                        _record(guest, shot, alone=False)
                    overlaps.append(_max_overlap([s.span for s in shots if s.span is not None]))
                    time.sleep(SETTLE_S)
            print(f"concurrency: round {r + 1}/{rounds} done", flush=True)
        running = [g.inst.is_running() for g in guests]
    return _report(guests, level, rounds, overlaps, together_wall, running)


def _record(guest: Guest, shot: Shot, alone: bool) -> None:
    if shot.error is not None:
        guest.errors.append(("alone: " if alone else "together: ") + shot.error)
        return
    if shot.window_ms is not None:
        (guest.alone_ms if alone else guest.together_ms).append(shot.window_ms)
    (guest.alone_call_s if alone else guest.together_call_s).append(round(shot.call_s, 3))


def _report(
    guests: list[Guest],
    level: Consistency,
    rounds: int,
    overlaps: list[int],
    together_wall: list[float],
    running: list[bool],
) -> dict[str, Any]:
    per_instance = []
    for i, g in enumerate(guests):
        alone, together = summary(g.alone_ms), summary(g.together_ms)
        per_instance.append({
            "instance": i,
            "alone_ms": g.alone_ms,
            "together_ms": g.together_ms,
            "alone": alone,
            "together": together,
            "ratio_of_medians": ratio(together["median"], alone["median"]),
            "alone_call_s": summary(g.alone_call_s),
            "together_call_s": summary(g.together_call_s),
            "errors": g.errors,
            "checked": g.checked,
            "violations": len(g.violations),
            "violation_examples": g.violations[:3],
        })  # fmt: skip
    all_alone = [v for g in guests for v in g.alone_ms]
    all_together = [v for g in guests for v in g.together_ms]
    alone_calls = [v for g in guests for v in g.alone_call_s]
    return {
        "instances": len(guests),
        "rounds": rounds,
        "level": str(level),
        "disks_per_instance": 3,
        "per_instance": per_instance,
        "alone": summary(all_alone),
        "together": summary(all_together),
        "ratio_of_medians": ratio(summary(all_together)["median"], summary(all_alone)["median"]),
        "max_windows_open_at_once": overlaps,
        "together_wall_s": summary(together_wall),
        "alone_sum_of_calls_s": round(statistics.median(alone_calls) * len(guests), 3) if alone_calls else None,
        "errors": sum(len(g.errors) for g in guests),
        "checked": sum(g.checked for g in guests),
        "violations": sum(len(g.violations) for g in guests),
        "guests_running_at_end": running,
    }


def plot(report: dict[str, Any], path: Path, note: str | None = None) -> None:
    plt = pyplot()
    rows = report["per_instance"]
    x = list(range(len(rows)))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(rows)), 4.6))
    for offset, key, color, name in ((-width / 2, "alone", COLORS["floor"], "alone"),
                                     (width / 2, "together", COLORS["freezeframe"], "all at once")):  # fmt: skip
        med = [r[key]["median"] or 0.0 for r in rows]
        hi = [(r[key]["p95"] or 0.0) - m for r, m in zip(rows, med, strict=True)]
        ax.bar([i + offset for i in x], med, width, yerr=[[0] * len(x), hi], capsize=3, color=color, label=name)
    for i, r in enumerate(rows):
        if r["ratio_of_medians"] is not None:
            top = r["together"]["p95"] or 0.0
            ax.text(i + width / 2, top, f"{r['ratio_of_medians']:.2f}x", ha="center", va="bottom", fontsize=8)
    tops = [r[k]["p95"] or 0.0 for r in rows for k in ("alone", "together")]
    ax.set_ylim(0, 1.3 * max([*tops, 1.0]))
    ax.set_xticks(x, [f"instance {r['instance'] + 1}" for r in rows])
    ax.set_ylabel("freeze window, ms (median, whisker to p95)")
    ax.set_title(
        f"{report['instances']} instances snapshotted at once vs alone\n({report['level']} level, "
        f"{report['rounds']} rounds; ledger violations {report['violations']}/{report['checked']})"
    )
    ax.legend(loc="upper center", ncol=2)
    save_figure(fig, path, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if replot(args, "concurrency", plot):
        return
    count, rounds = (2, 1) if args.quick else (args.instances, args.rounds)
    out_dir = output_dir(args, "concurrency")
    build_guest()
    bench = Run("concurrency", args.quick)
    with libvirt_connection() as conn, scratch_dir("concurrency") as tmp:
        bench.machine = machine_info(conn, tmp)
        report = measure(conn, count, rounds, Consistency.FILESYSTEM, tmp)
        json_path = bench.write(out_dir, report, conn)
    plot(report, out_dir / "concurrency.png", run_note(args.quick))
    print(f"alone median {report['alone']['median']} ms, together {report['together']['median']} ms "
          f"(x{report['ratio_of_medians']}); {report['errors']} errors, "
          f"{report['violations']}/{report['checked']} ledger violations")  # fmt: skip
    print(f"wrote {json_path} and {out_dir / 'concurrency.png'}")


if __name__ == "__main__":
    main()
