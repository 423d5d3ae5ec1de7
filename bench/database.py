"""The headline with a real database: N sets per method of a PostgreSQL 15 guest (data directory on vdb, WAL on
vdc) under pgbench load, each judged by PostgreSQL itself (crash recovery, amcheck, pgbench's balance sums).

Methods, interleaved sample by sample so that machine noise hits all alike:

- naive: the WAL volume, then the data volume, each captured by its own backup job, one after the other, guest
  not frozen (what per-volume snapshot calls give);
- freezeframe at crash, filesystem and application level (the application level's fsfreeze hook runs a
  CHECKPOINT before the freeze).

Measured per method: violations / N, recovery time of the restored database (server start with crash recovery
until it accepts connections), freeze window, and pgbench's TPS during the captures against TPS in quiet periods
(no capture, no check running) of the same run.

    .venv/bin/python bench/database.py             # full run: N=50 per method, bench/results/database.*
    .venv/bin/python bench/database.py --quick     # smoke run: N=2, temp dir
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import libvirt

from common import (
    COLORS,
    GuestClock,
    Run,
    add_common_args,
    libvirt_connection,
    machine_info,
    output_dir,
    pyplot,
    replot,
    run_note,
    save_figure,
    scratch_dir,
    summary,
)
from freezeframe.config import Settings
from freezeframe.errors import FreezeframeError
from freezeframe.flow import SnapshotRequest
from freezeframe.incremental import FULL
from freezeframe.model import Consistency
from freezeframe.service import Freezeframe
from freezeframe.testbed.database_check import DatabaseVerdict, check_database
from freezeframe.testbed.database_guest import build_database_guest
from freezeframe.testbed.database_instance import (
    pgbench_progress,
    running_database,
    wait_for_pgbench,
)
from freezeframe.testbed.instance import TestInstance
from freezeframe.testbed.naive import naive_capture

MAX_CONSECUTIVE_ERRORS = 3
FREEZE_CAP_S = 60.0
"""A generous cap: the guest's fsfreeze hook (CHECKPOINT) and freeze run on a TCG vCPU pgbench keeps saturated."""
QUIET_S = 20.0
"""Seconds of undisturbed pgbench before and after the samples: the TPS baseline."""
EXCLUDED = ("vda",)
"""The root disk is left out of the sets here (``exclude_disks``): it is ~0.5 GiB the checker never reads, and
copying it 200 times would not fit the run in the time available; tests/test_database.py includes it."""


@dataclass
class Sample:
    ok: bool | None
    """The checker's verdict; None when the capture failed (recorded, not counted either way)."""
    reason: str
    recovery_s: float | None = None
    check_s: float | None = None
    window_ms: float | None = None
    call_s: float | None = None
    skew_ms: float | None = None
    """naive: time between the WAL volume's and the data volume's capture instants."""
    span: tuple[float, float] | None = None
    """Host wall-clock (time.time) interval of the capture call, for TPS during the capture."""
    history_rows: int | None = None
    error: str | None = None


@dataclass
class Context:
    inst: TestInstance
    ff: Freezeframe
    workdir: Path
    naive_gap_s: float


@dataclass
class Method:
    key: str
    label: str
    description: str
    take: Callable[[Context, int], Sample]
    samples: list[Sample] = field(default_factory=list)
    disabled: str | None = None
    consecutive_errors: int = 0


def _verdict_sample(verdict: DatabaseVerdict, **timing: Any) -> Sample:
    return Sample(ok=verdict.ok, reason=verdict.reason, recovery_s=verdict.recovery_s, check_s=verdict.check_s,
                  history_rows=verdict.history_rows, **timing)  # fmt: skip


def _naive(ctx: Context, i: int) -> Sample:
    outs = [("vdc", ctx.workdir / f"naive-{i}-wal.qcow2"), ("vdb", ctx.workdir / f"naive-{i}-data.qcow2")]
    try:
        t0, started = time.time(), time.monotonic()
        captures = naive_capture(ctx.inst.dom, outs, gap_s=ctx.naive_gap_s)
        call_s, t1 = time.monotonic() - started, time.time()
        verdict = check_database(outs[1][1], outs[0][1], tmp_dir=ctx.workdir)
    finally:
        for _, path in outs:
            path.unlink(missing_ok=True)
    skew = (captures[1].begun_at - captures[0].begun_at) * 1000
    return _verdict_sample(verdict, call_s=round(call_s, 3), skew_ms=round(skew, 1), span=(t0, t1))


def _freezeframe(level: Consistency) -> Callable[[Context, int], Sample]:
    def take(ctx: Context, i: int) -> Sample:
        t0, started = time.time(), time.monotonic()
        request = SnapshotRequest(ctx.inst.name, level, require=True, name=f"db-{level}-{i}", mode=FULL,
                                  exclude_disks=EXCLUDED)  # fmt: skip
        result = ctx.ff.snapshot(request)
        call_s, t1 = time.monotonic() - started, time.time()
        try:
            members = {m.target: Path(m.path) for m in result.members}
            verdict = check_database(members["vdb"], members["vdc"], tmp_dir=ctx.workdir)
        finally:
            ctx.ff.repository.remove(result.id)
        return _verdict_sample(verdict, window_ms=result.freeze_window_ms, call_s=round(call_s, 3), span=(t0, t1))

    return take


def methods() -> list[Method]:
    return [
        Method("naive", "naive per volume", "WAL volume then data volume, each its own backup job, not frozen",
               _naive),
        Method("ff_crash", "freezeframe crash", "freezeframe snapshot --consistency crash",
               _freezeframe(Consistency.CRASH)),
        Method("ff_filesystem", "freezeframe filesystem", "freezeframe snapshot --consistency filesystem --require",
               _freezeframe(Consistency.FILESYSTEM)),
        Method("ff_application", "freezeframe application",
               "freezeframe snapshot --consistency application --require (hook: CHECKPOINT before the freeze)",
               _freezeframe(Consistency.APPLICATION)),
    ]  # fmt: skip


def _take(method: Method, ctx: Context, i: int) -> None:
    try:
        wait_for_pgbench(ctx.inst, timeout_s=120)
        sample = method.take(ctx, i)
        method.consecutive_errors = 0
    except (FreezeframeError, libvirt.libvirtError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        method.consecutive_errors += 1
        sample = Sample(ok=None, reason="error", error=f"{type(exc).__name__}: {exc}"[:600])
        if method.consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
            method.disabled = f"{MAX_CONSECUTIVE_ERRORS} errors in a row, last: {sample.error}"
    method.samples.append(sample)


def _tps_in(progress: list[tuple[float, float]], spans: list[tuple[float, float]], offset_s: float) -> list[float]:
    """pgbench's per-second TPS for the seconds overlapping any host-time span (a line at t covers (t-1, t])."""
    guest = [(a + offset_s, b + offset_s) for a, b in spans]
    return [tps for t, tps in progress if any(t - 1 < b and t > a for a, b in guest)]


def summarize(method: Method, n: int, progress: list[tuple[float, float]], offset_s: float) -> dict[str, Any]:
    checked = [s for s in method.samples if s.ok is not None]
    bad = [s for s in checked if not s.ok]
    errors = [s for s in method.samples if s.ok is None]
    during = _tps_in(progress, [s.span for s in checked if s.span is not None], offset_s)
    return {
        "label": method.label,
        "description": method.description,
        "requested": n,
        "checked": len(checked),
        "violations": len(bad),
        "errors": len(errors),
        "violation_rate": round(len(bad) / len(checked), 4) if checked else None,
        "recovery_s": summary([s.recovery_s for s in checked if s.recovery_s is not None]),
        "check_s": summary([s.check_s for s in checked if s.check_s is not None]),
        "window_ms": summary([s.window_ms for s in checked if s.window_ms is not None]),
        "call_s": summary([s.call_s for s in checked if s.call_s is not None]),
        "skew_ms": summary([s.skew_ms for s in checked if s.skew_ms is not None]),
        "tps_during": summary(during),
        "violation_examples": list(dict.fromkeys(s.reason for s in bad))[:3],
        "error_examples": list(dict.fromkeys(s.error for s in errors if s.error))[:3],
        "disabled": method.disabled,
        "samples": [asdict(s) for s in method.samples],
    }


def _quiet(seconds: float) -> tuple[float, float]:
    t0 = time.time()
    time.sleep(seconds)
    return t0, time.time()


def measure(conn: Any, n: int, naive_gap_s: float, workdir: Path, budget_s: float | None) -> dict[str, Any]:
    todo = methods()
    image = build_database_guest()
    boot_started = time.monotonic()
    with running_database(conn, image, workdir=workdir / "vm", name_prefix="ffbench-db") as inst, \
            Freezeframe.open(replace(Settings.from_env(home=workdir / "home"), freeze_cap_s=FREEZE_CAP_S,
                                     agent_timeout_s=60)) as ff:  # fmt: skip
        boot_s = time.monotonic() - boot_started
        clock = GuestClock.measure(inst)
        offset_s = clock.offset_ns / 1e9
        ctx = Context(inst, ff, workdir, naive_gap_s)
        quiet = [_quiet(QUIET_S)]
        started = time.monotonic()
        rounds = 0
        for i in range(n):
            if budget_s is not None and time.monotonic() - started > budget_s:
                print(f"database: time budget of {budget_s:.0f} s spent after {i} rounds", flush=True)
                break
            for method in todo:
                if method.disabled is None:
                    _take(method, ctx, i)
            rounds = i + 1
            bad = {m.key: sum(1 for s in m.samples if s.ok is False) for m in todo}
            print(f"database: round {rounds}/{n} violations {bad} ({time.monotonic() - started:.0f} s)", flush=True)
        quiet.append(_quiet(QUIET_S))
        progress = pgbench_progress(inst)
        baseline = _tps_in(progress, quiet, offset_s)
        running = inst.is_running()
    return {
        "n": n,
        "rounds": rounds,
        "naive_gap_s": naive_gap_s,
        "naive_order": "WAL volume (vdc) first, then data volume (vdb)",
        "load": "pgbench -c 4 -j 1 (scale 1) plus a CHECKPOINT every 2 s and prompt page-cache writeback",
        "excluded_disks": list(EXCLUDED),
        "guest": {
            "key": image.key,
            "boot_s": round(boot_s, 1),
            "clock_offset_ms": round(offset_s * 1000, 1),
            "running_at_end": running,
            "pgbench_seconds": len(progress),
        },
        "tps_quiet": summary(baseline),
        "methods": {m.key: summarize(m, n, progress, offset_s) for m in todo},
    }


def plot(report: dict[str, Any], path: Path, note: str | None = None) -> None:
    plt = pyplot()
    items = list(report["methods"].items())
    labels = [m["label"] for _, m in items]
    x = list(range(len(items)))
    fig, (ax, ax_rec, ax_tps) = plt.subplots(3, 1, figsize=(8.5, 10))
    rates = [100.0 * (m["violation_rate"] or 0.0) for _, m in items]
    ax.bar(x, rates, 0.6, color=[COLORS["bad"] if m["violations"] else COLORS["good"] for _, m in items])
    for i, (_, m) in enumerate(items):
        ax.text(i, rates[i] + 1, f"{m['violations']}/{m['checked']}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 115)
    ax.set_xticks(x, labels)
    ax.set_ylabel("violations, % of checked sets")
    ax.set_title(f"PostgreSQL 15 (data on vdb, WAL on vdc) under pgbench: recovery + amcheck + sums, "
                 f"N={report['rounds']} per method")  # fmt: skip

    for key, scale, offset, color, name in (
        ("recovery_s", 1.0, -0.2, COLORS["baseline"], "recovery time, s"),
        ("window_ms", 0.001, 0.2, COLORS["freezeframe"], "freeze window, s"),
    ):
        med = [scale * (m[key]["median"] or 0.0) for _, m in items]
        hi = [scale * (m[key]["p95"] or 0.0) - v for (_, m), v in zip(items, med, strict=True)]
        ax_rec.bar([i + offset for i in x], med, 0.4, yerr=[[0] * len(x), hi], capsize=3, color=color, label=name)
    ax_rec.set_xticks(x, labels)
    ax_rec.set_ylabel("seconds (median, whisker to p95)")
    ax_rec.set_title("Crash recovery of the restored database, and the guest's freeze window")
    ax_rec.legend()

    quiet = report["tps_quiet"]["median"] or 0.0
    med = [m["tps_during"]["median"] or 0.0 for _, m in items]
    ax_tps.bar(x, med, 0.6, color=COLORS["freezeframe"], label="TPS in the seconds of a capture (median)")
    ax_tps.axhline(quiet, color=COLORS["floor"], linestyle="--", label=f"TPS without captures (median {quiet:.0f})")
    ax_tps.set_xticks(x, labels)
    ax_tps.set_ylabel("pgbench TPS (guest)")
    ax_tps.set_title("What the guest sees: pgbench throughput during the capture")
    ax_tps.legend(loc="lower right")
    save_figure(fig, path, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("-n", "--samples", type=int, default=50, help="sets per method")
    parser.add_argument("--naive-gap", type=float, default=1.0, help="seconds between the naive per-volume jobs")
    parser.add_argument("--budget-min", type=float, default=None, help="stop starting rounds after this long")
    args = parser.parse_args()
    n = 2 if args.quick else args.samples
    if replot(args, "database", plot):
        return
    out_dir = output_dir(args, "database")
    bench = Run("database", args.quick)
    budget = args.budget_min * 60 if args.budget_min else None
    with libvirt_connection() as conn, scratch_dir("database") as tmp:
        bench.machine = machine_info(conn, tmp)
        report = measure(conn, n, args.naive_gap, tmp, budget)
        json_path = bench.write(out_dir, report, conn)
    plot(report, out_dir / "database.png", run_note(args.quick))
    for key, m in report["methods"].items():
        print(f"{key:>15}: {m['violations']}/{m['checked']} violations, {m['errors']} errors, recovery "
              f"{m['recovery_s']['median']} s, TPS during {m['tps_during']['median']}")  # fmt: skip
    print(f"TPS quiet {report['tps_quiet']['median']}; wrote {json_path} and {out_dir / 'database.png'}")


if __name__ == "__main__":
    main()
