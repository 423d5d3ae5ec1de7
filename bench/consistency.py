"""The consistency proof: N multi-disk snapshots per method of the 3-disk ledger guest under full write load,
each judged by the ledger checker (``state <= last journal record <= state + 1`` across two disks).

Methods, interleaved sample by sample so that machine noise hits all alike:

- naive: each disk captured by its own backup job, one after another, guest not frozen (gap 0, and a variant
  with a small gap between the jobs);
- libvirt DIY, as an operator scripts it today with ``virsh`` (called as a subprocess, not re-implemented):
  ``snapshot-create-as --disk-only --atomic --quiesce --no-metadata`` (the ledger is checked on the
  pre-snapshot files that became backing files, then every disk is ``blockcommit --active --pivot``-ed back),
  and ``backup-begin`` with one job for all disks, waited for with ``domjobinfo``;
- freezeframe at crash, filesystem and application level.

    .venv/bin/python bench/consistency.py             # full run: N=100 per method, bench/results/consistency.*
    .venv/bin/python bench/consistency.py --quick     # smoke run: N=2, temp dir
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import libvirt
from lxml import etree

from common import (
    COLORS,
    MiB,
    Run,
    add_common_args,
    libvirt_connection,
    machine_info,
    output_dir,
    pyplot,
    replot,
    run,
    run_note,
    save_figure,
    scratch_dir,
    summary,
)
from freezeframe.config import Settings
from freezeframe.errors import FreezeframeError
from freezeframe.flow import SnapshotRequest
from freezeframe.model import Consistency
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import build_guest
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance
from freezeframe.testbed.ledger import LedgerVerdict, check_ledger
from freezeframe.testbed.naive import naive_capture

TARGETS = ("vda", "vdb", "vdc")
JOB_TIMEOUT_S = 300.0
MAX_CONSECUTIVE_ERRORS = 3
STALL_NOTE = (
    "not measured here: the ledger workload records no timestamps (its writer runs flat out); bench/window.py "
    "measures the guest-visible stall of freezeframe with the heartbeat workload"
)


@dataclass
class Sample:
    ok: bool | None
    """Ledger verdict; None when the capture failed or the images could not be read."""
    reason: str
    state: int | None = None
    last_journal: int | None = None
    complete_record: bool | None = None
    """state == last journal record: the writer was between record pairs (the fsfreeze hook pauses it there)."""
    window_ms: float | None = None
    """freezeframe: freeze window (filesystem/application level; crash level has none)."""
    call_s: float | None = None
    """Wall time of the capture call: naive, all its jobs; DIY, the virsh command; freezeframe, the whole call."""
    total_s: float | None = None
    """Wall time until the capture is usable and the guest back to normal (DIY snapshot: + blockcommit)."""
    skew_ms: float | None = None
    """naive: time between the journal disk's and the state disk's capture instants."""
    error: str | None = None


@dataclass
class Context:
    inst: TestInstance
    ff: Freezeframe
    workdir: Path
    uri: str
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


def _verdict_sample(verdict: LedgerVerdict, **timing: Any) -> Sample:
    return Sample(
        ok=verdict.ok,
        reason=verdict.reason,
        state=verdict.state,
        last_journal=verdict.last_journal,
        complete_record=verdict.state is not None and verdict.state == verdict.last_journal,
        **timing,
    )


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


# ---- naive ---------------------------------------------------------------------------------------------


def _naive(gap_attr: str) -> Callable[[Context, int], Sample]:
    def take(ctx: Context, i: int) -> Sample:
        gap = ctx.naive_gap_s if gap_attr == "gap" else 0.0
        outs = [(t, ctx.workdir / f"naive-{gap_attr}-{i}-{t}.qcow2") for t in TARGETS]
        try:
            started = time.monotonic()
            captures = naive_capture(ctx.inst.dom, outs, gap_s=gap, job_timeout_s=JOB_TIMEOUT_S)
            call_s = time.monotonic() - started
            begun = {c.target: c.begun_at for c in captures}
            verdict = check_ledger(outs[1][1], outs[2][1], tmp_dir=ctx.workdir)
        finally:
            _remove([p for _, p in outs])
        skew = (begun["vdc"] - begun["vdb"]) * 1000
        return _verdict_sample(verdict, call_s=round(call_s, 3), total_s=round(call_s, 3), skew_ms=round(skew, 1))

    return take


# ---- libvirt DIY -----------------------------------------------------------------------------------------


def _virsh(ctx: Context, *args: str, timeout: float = JOB_TIMEOUT_S) -> str:
    return run(["virsh", "-c", ctx.uri, *args], timeout=timeout).stdout


def _disk_sources(ctx: Context) -> dict[str, str]:
    out = _virsh(ctx, "domblklist", ctx.inst.name, "--details")
    sources = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[1] == "disk":
            sources[parts[2]] = parts[3]
    return sources


def _diy_snapshot(ctx: Context, i: int) -> Sample:
    """External disk-only snapshot of all disks (quiesced), check the old files, commit the overlays back."""
    overlays = {t: ctx.workdir / f"diy-overlay-{i}-{t}.qcow2" for t in TARGETS}
    argv = ["snapshot-create-as", ctx.inst.name, f"ffbench-{i}", "--disk-only", "--atomic", "--quiesce",
            "--no-metadata"]  # fmt: skip
    for target, overlay in overlays.items():
        argv += ["--diskspec", f"{target},snapshot=external,file={overlay}"]
    originals = ctx.inst.disk_paths
    started = time.monotonic()
    try:
        _virsh(ctx, *argv)
        call_s = time.monotonic() - started
        try:
            verdict = check_ledger(originals["vdb"], originals["vdc"], tmp_dir=ctx.workdir)
        finally:
            commit_started = time.monotonic()
            _commit_back(ctx, overlays)
            commit_s = time.monotonic() - commit_started
    finally:
        _remove(list(overlays.values()))
    return _verdict_sample(verdict, call_s=round(call_s, 3), total_s=round(call_s + commit_s, 3))


def _commit_back(ctx: Context, overlays: dict[str, Path]) -> None:
    """blockcommit every disk still on an overlay back into its original file; verify the pivot."""
    for target in TARGETS:
        if _disk_sources(ctx).get(target) == str(overlays[target]):
            _virsh(ctx, "blockcommit", ctx.inst.name, target, "--active", "--pivot", "--wait")
    sources = _disk_sources(ctx)
    wrong = {t: s for t, s in sources.items() if s != str(ctx.inst.disk_paths[t])}
    if wrong:
        raise _Fatal(f"disks still on overlays after blockcommit: {wrong}")


class _Fatal(RuntimeError):
    """The instance is no longer in a state this method can be measured in: disable the method."""


def _backup_xml(targets: dict[str, Path]) -> str:
    root = etree.Element("domainbackup", mode="push")
    disks = etree.SubElement(root, "disks")
    for target, path in targets.items():
        el = etree.SubElement(disks, "disk", name=target, backup="yes", type="file")
        etree.SubElement(el, "target", file=str(path))
        etree.SubElement(el, "driver", type="qcow2")
    return etree.tostring(root, pretty_print=True, encoding="unicode")


_JOB_TYPE = re.compile(r"^Job type:\s*(\S+)", re.MULTILINE)


def _job_type(ctx: Context, *flags: str) -> str:
    match = _JOB_TYPE.search(_virsh(ctx, "domjobinfo", ctx.inst.name, *flags, timeout=60))
    return match.group(1) if match else "unknown"


def _diy_backup(ctx: Context, i: int) -> Sample:
    """One push-mode backup job of all disks (libvirt creates the targets), polled with domjobinfo."""
    targets = {t: ctx.workdir / f"diy-backup-{i}-{t}.qcow2" for t in TARGETS}
    xml = ctx.workdir / f"diy-backup-{i}.xml"
    xml.write_text(_backup_xml(targets))
    started = time.monotonic()
    begun = False
    try:
        _virsh(ctx, "backup-begin", ctx.inst.name, str(xml))
        begun = True
        call_s = time.monotonic() - started
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while _job_type(ctx) != "None":
            if time.monotonic() > deadline:
                raise TimeoutError(f"backup job still running after {JOB_TIMEOUT_S:.0f} s")
            time.sleep(0.1)
        total_s = time.monotonic() - started
        done = _job_type(ctx, "--completed")
        if done != "Completed":
            raise RuntimeError(f"backup job ended as {done!r}")
        verdict = check_ledger(targets["vdb"], targets["vdc"], tmp_dir=ctx.workdir)
    finally:
        if begun:
            with contextlib.suppress(RuntimeError):
                if _job_type(ctx) != "None":
                    _virsh(ctx, "domjobabort", ctx.inst.name)
        _remove([xml, *targets.values()])
    return _verdict_sample(verdict, call_s=round(call_s, 3), total_s=round(total_s, 3))


# ---- freezeframe -------------------------------------------------------------------------------------------


def _freezeframe(level: Consistency) -> Callable[[Context, int], Sample]:
    def take(ctx: Context, i: int) -> Sample:
        started = time.monotonic()
        result = ctx.ff.snapshot(SnapshotRequest(ctx.inst.name, level, require=True, name=f"bench-{level}-{i}"))
        try:
            total_s = time.monotonic() - started
            members = {m.target: Path(m.path) for m in result.members}
            verdict = check_ledger(members["vdb"], members["vdc"], tmp_dir=ctx.workdir)
        finally:
            ctx.ff.repository.remove(result.id)
        return _verdict_sample(
            verdict, window_ms=result.freeze_window_ms, call_s=round(total_s, 3), total_s=round(total_s, 3)
        )

    return take


def methods() -> list[Method]:
    return [
        Method("naive", "naive, gap 0", "each disk its own backup job, one after another, guest not frozen",
               _naive("nogap")),
        Method("naive_gap", "naive, small gap", "as naive, with a short sleep between the per-disk jobs",
               _naive("gap")),
        Method("diy_snapshot", "virsh snapshot --quiesce",
               "virsh snapshot-create-as --disk-only --atomic --quiesce --no-metadata, then blockcommit --active "
               "--pivot each disk back", _diy_snapshot),
        Method("diy_backup", "virsh backup-begin", "virsh backup-begin, one push job for all disks, not quiesced",
               _diy_backup),
        Method("ff_crash", "freezeframe crash", "freezeframe snapshot --consistency crash",
               _freezeframe(Consistency.CRASH)),
        Method("ff_filesystem", "freezeframe filesystem", "freezeframe snapshot --consistency filesystem --require",
               _freezeframe(Consistency.FILESYSTEM)),
        Method("ff_application", "freezeframe application",
               "freezeframe snapshot --consistency application --require", _freezeframe(Consistency.APPLICATION)),
    ]  # fmt: skip


def _take(method: Method, ctx: Context, i: int) -> None:
    try:
        sample = method.take(ctx, i)
        method.consecutive_errors = 0
    except _Fatal as exc:
        method.disabled = str(exc)
        sample = Sample(ok=None, reason="error", error=str(exc))
    except (FreezeframeError, libvirt.libvirtError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        # Recorded (not hidden, and not counted as a verdict either way); ImageReadError is a RuntimeError.
        method.consecutive_errors += 1
        sample = Sample(ok=None, reason="error", error=f"{type(exc).__name__}: {exc}"[:600])
        if method.consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
            method.disabled = f"{MAX_CONSECUTIVE_ERRORS} errors in a row, last: {sample.error}"
    method.samples.append(sample)


def summarize(method: Method, n: int) -> dict[str, Any]:
    checked = [s for s in method.samples if s.ok is not None]
    bad = [s for s in checked if not s.ok]
    errors = [s for s in method.samples if s.ok is None]
    return {
        "label": method.label,
        "description": method.description,
        "requested": n,
        "checked": len(checked),
        "violations": len(bad),
        "errors": len(errors),
        "violation_rate": round(len(bad) / len(checked), 4) if checked else None,
        "complete_records": sum(1 for s in checked if s.complete_record),
        "window_ms": summary([s.window_ms for s in checked if s.window_ms is not None]),
        "call_s": summary([s.call_s for s in checked if s.call_s is not None]),
        "total_s": summary([s.total_s for s in checked if s.total_s is not None]),
        "skew_ms": summary([s.skew_ms for s in checked if s.skew_ms is not None]),
        "violation_examples": list(dict.fromkeys(s.reason for s in bad))[:3],
        "error_examples": list(dict.fromkeys(s.error for s in errors if s.error))[:3],
        "disabled": method.disabled,
        "stall": STALL_NOTE,
        "samples": [asdict(s) for s in method.samples],
    }


def measure(conn: Any, n: int, naive_gap_s: float, size: int, workdir: Path) -> dict[str, Any]:
    todo = methods()
    with running_instance(
        conn, disks=[DiskRequest(size)] * 3, workload="ledger", workdir=workdir / "vm", name_prefix="ffbench",
        boot_timeout_s=240,
    ) as inst, Freezeframe.open(Settings.from_env(home=workdir / "home")) as ff:  # fmt: skip
        inst.wait_for_progress(timeout_s=60)
        ctx = Context(inst, ff, workdir, Settings.from_env().libvirt_uri, naive_gap_s)
        first = inst.ledger_progress() or 0
        for i in range(n):
            for method in todo:
                if method.disabled is None:
                    _take(method, ctx, i)
            done = {m.key: len(m.samples) for m in todo}
            print(f"consistency: round {i + 1}/{n} {done}", flush=True)
        last = inst.wait_for_progress(after=first, timeout_s=60)
        alive = {"ledger_first": first, "ledger_last": last, "guest_running": inst.is_running()}
    return {
        "n": n,
        "naive_gap_s": naive_gap_s,
        "disk_size_bytes": size,
        "workload": alive,
        "methods": {m.key: summarize(m, n) for m in todo},
    }


def plot(report: dict[str, Any], path: Path, note: str | None = None) -> None:
    plt = pyplot()
    items = list(report["methods"].items())
    labels = [m["label"] for _, m in items]
    x = list(range(len(items)))
    fig, (ax, ax_time) = plt.subplots(2, 1, figsize=(max(8.0, 1.3 * len(items)), 8))
    rates = [100.0 * (m["violation_rate"] or 0.0) for _, m in items]
    colors = [COLORS["bad"] if m["violations"] else COLORS["good"] for _, m in items]
    ax.bar(x, rates, 0.6, color=colors)
    for i, (_, m) in enumerate(items):
        text = f"{m['violations']}/{m['checked']}" + (f"\n{m['errors']} err" if m["errors"] else "")
        ax.text(i, rates[i] + 1, text, ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 115)
    ax.set_xticks(x, labels, rotation=15)
    ax.set_ylabel("ledger violations, % of checked sets")
    ax.set_title(f"Multi-disk consistency under write load (3-disk ledger guest, N={report['n']} per method)")

    width = 0.27
    series = (
        ("window_ms", 1.0, COLORS["freezeframe"], "freeze window, measured inside (freezeframe)"),
        ("call_s", 1000.0, COLORS["baseline"], "wall time of the capture call (naive: all jobs; DIY: the virsh call)"),
        ("total_s", 1000.0, COLORS["floor"], "until the capture is usable (copy done; DIY snapshot: committed back)"),
    )
    for k, (key, scale, color, name) in enumerate(series):
        med = [scale * (m[key]["median"] or 0.0) for _, m in items]
        hi = [scale * (m[key]["p95"] or 0.0) - v for (_, m), v in zip(items, med, strict=True)]
        ax_time.bar([i + (k - 1) * width for i in x], med, width, yerr=[[0] * len(x), hi], capsize=3, color=color,
                    label=name)  # fmt: skip
    for i, (key, _) in enumerate(items):
        if key == "ff_crash":
            ax_time.text(i - width, 12, "no freeze", ha="center", va="bottom", fontsize=7, rotation=90)
    ax_time.set_yscale("symlog", linthresh=10)
    ax_time.set_xticks(x, labels, rotation=15)
    ax_time.set_ylabel("ms (median, whisker to p95)")
    ax_time.set_title("How long each method takes")
    ax_time.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2)
    save_figure(fig, path, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("-n", "--samples", type=int, default=100, help="snapshots per method")
    parser.add_argument("--naive-gap", type=float, default=0.1, help="seconds between per-disk jobs (variant)")
    parser.add_argument("--disk-size-mib", type=int, default=64)
    args = parser.parse_args()
    n = 2 if args.quick else args.samples
    if replot(args, "consistency", plot):
        return
    out_dir = output_dir(args, "consistency")
    build_guest()
    bench = Run("consistency", args.quick)
    with libvirt_connection() as conn, scratch_dir("consistency") as tmp:
        bench.machine = machine_info(conn, tmp)
        report = measure(conn, n, args.naive_gap, args.disk_size_mib * MiB, tmp)
        json_path = bench.write(out_dir, report, conn)
    plot(report, out_dir / "consistency.png", run_note(args.quick))
    for key, m in report["methods"].items():
        print(f"{key:>15}: {m['violations']}/{m['checked']} violations, {m['errors']} errors"
              f"{' (disabled: ' + m['disabled'] + ')' if m['disabled'] else ''}")  # fmt: skip
    print(f"wrote {json_path} and {out_dir / 'consistency.png'}")


if __name__ == "__main__":
    main()
