"""Render the benchmark results into docs/benchmarks.md: every table, number and verdict comes from the JSON.

The document keeps its prose; the parts between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` are
replaced on every run, so re-running the benchmarks and then this script updates the document in place.

    .venv/bin/python bench/report.py                               # bench/results/*.json -> docs/benchmarks.md
    .venv/bin/python bench/report.py --results /tmp/x --doc /tmp/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import REPO_ROOT, RESULTS, MiB, ratio

WINDOW_TARGET = 1.3
STARTUP_TARGET_S = 0.3
STARTUP_TARGETS = ("--help", "list")
EXPORT_TARGET = 0.9
FF_METHODS = ("ff_crash", "ff_filesystem", "ff_application")
NAIVE_METHODS = ("naive", "naive_gap")
STEP_NAMES = {
    "freeze": "freeze (agent fsfreeze RPC)",
    "agent_timeout": "set agent timeout RPC",
    "lookup": "domain lookups",
    "journal": "journal fsync",
    "pause": "pause vCPUs",
    "backup_begin": "backupBegin",
    "resume": "resume vCPUs",
    "io_error_check": "I/O-error pause check",
    "thaw": "thaw (agent RPC)",
    "thaw_status": "thaw status check",
    "other": "other (flow's own code)",
}


# ---- formatting -------------------------------------------------------------------------------------------


def num(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "n/a"
    text = f"{float(value):,.{digits}f}"
    return f"{text} {unit}".rstrip()


def med_p95(stats: dict[str, Any] | None, digits: int = 0, scale: float = 1.0) -> str:
    if not stats or stats.get("median") is None:
        return "n/a"
    return f"{num(stats['median'] * scale, digits)} ({num(stats['p95'] * scale, digits)})"


def times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def size(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):g} GiB" if nbytes >= 1 << 30 else f"{nbytes / MiB:g} MiB"


def smoke_warning(report: dict[str, Any]) -> str:
    if report.get("mode") != "quick":
        return ""
    return (
        "> **Smoke run (`--quick`)**: reduced sizes and sample counts, made only to check that the scripts work. "
        "These are not measurements; run the full benchmarks (below) before reading anything into them.\n\n"
    )


def provenance(report: dict[str, Any]) -> str:
    load = report.get("machine", {}).get("load_average")
    end = report.get("load_average_at_end")
    others = report.get("machine", {}).get("other_running_domains")
    return (
        f"_Run {report['when']} ({report['mode']}), {num(report['duration_s'] / 60, 1)} min, "
        f"load average {load[0] if load else 'n/a'} at start and {end[0] if end else 'n/a'} at the end, "
        f"other running domains at start: {others if others is not None else 'n/a'}; "
        f"command: `{report['command']}`._\n\n"
    )


# ---- sections ------------------------------------------------------------------------------------------------


def machine_section(reports: dict[str, dict[str, Any]]) -> str:
    if not reports:
        return "_No results yet: the machine is recorded in each benchmark's JSON._"
    first = next(iter(reports.values()))["machine"]
    fs = first.get("workdir_filesystem") or {}
    mem = first.get("memory_bytes")
    rows = [
        ["CPU", f"{first.get('cpu_model') or 'n/a'}, {first.get('cpus')} cores"],
        ["memory", f"{mem / (1 << 30):.0f} GiB" if mem else "n/a"],
        ["OS", f"Debian {first.get('debian', 'n/a')}, kernel {first.get('kernel')}"],
        ["QEMU / libvirt", f"{first.get('qemu')} / libvirt {first.get('libvirt')}"],
        ["guests", "TCG (no KVM), 1 vCPU, 256 MiB, virtio disks, cache=none"],
        ["storage for disks and sets", f"{fs.get('device')} ({fs.get('fstype')}) mounted at {fs.get('mount')}"],
    ]  # fmt: skip
    runs = [
        [f"`{name}`", r["when"], r["mode"], num(r["duration_s"] / 60, 1),
         f"{(r['machine'].get('load_average') or ['n/a'])[0]} → {(r.get('load_average_at_end') or ['n/a'])[0]}",
         str(r["machine"].get("other_running_domains", "n/a"))]
        for name, r in reports.items()
    ]  # fmt: skip
    return (
        table(["", "machine"], rows)
        + "\n\n"
        + table(["benchmark", "run at (UTC)", "mode", "minutes", "load avg start → end", "other domains"], runs)
    )


def consistency_section(report: dict[str, Any] | None) -> str:
    if report is None:
        return missing("consistency")
    methods = report["methods"]
    rows = []
    for m in methods.values():
        rows.append([
            m["label"],
            f"**{m['violations']} / {m['checked']}**",
            str(m["errors"]) + (" (stopped: " + m["disabled"] + ")" if m["disabled"] else ""),
            f"{m['complete_records']} / {m['checked']}",
            med_p95(m["window_ms"]),
            med_p95(m["call_s"], 0, 1000.0),
            med_p95(m["total_s"], 0, 1000.0),
            med_p95(m["skew_ms"]),
        ])  # fmt: skip
    header = ["method", "violations / checked", "errors", "state = last record", "freeze window ms",
              "capture call ms", "until usable ms", "disk skew ms"]  # fmt: skip
    text = smoke_warning(report) + provenance(report) + table(header, rows) + "\n\n"
    text += "Median (p95) over the checked sets. " + consistency_verdict(report) + "\n\n"
    examples = [(m["label"], m["violation_examples"][0]) for m in methods.values() if m["violation_examples"]]
    if examples:
        text += "What the checker found, one example per method:\n\n"
        text += "\n".join(f"- {label}: {reason}" for label, reason in examples) + "\n\n"
    errors = [(m["label"], m["error_examples"][0]) for m in methods.values() if m["error_examples"]]
    if errors:
        text += "Errors (captures that failed; not counted either way):\n\n"
        text += "\n".join(f"- {label}: `{err}`" for label, err in errors) + "\n\n"
    work = report["workload"]
    text += (
        f"The ledger writer went from record {work['ledger_first']} to {work['ledger_last']} during the run "
        f"({'still running at the end' if work['guest_running'] else 'NOT running at the end'}). "
        f"Guest-visible stall: {next(iter(methods.values()))['stall']}.\n\n"
        f"![consistency]({image_link('consistency')})"
    )
    return text


def database_section(report: dict[str, Any] | None) -> str:
    """PostgreSQL 15 (data on vdb, WAL on vdc) under pgbench, every set judged by PostgreSQL itself."""
    if report is None:
        return missing("database")
    methods = report["methods"]
    rows = [
        [m["label"], f"**{m['violations']} / {m['checked']}**", str(m["errors"]), med_p95(m["recovery_s"], 2),
         med_p95(m["window_ms"]), med_p95(m["tps_during"], 1), med_p95(m["call_s"], 2), med_p95(m["check_s"], 1)]
        for m in methods.values()
    ]  # fmt: skip
    header = ["method", "violations / checked", "errors", "recovery s", "freeze window ms", "TPS during capture",
              "capture call s", "check s"]  # fmt: skip
    guest = report["guest"]
    text = smoke_warning(report) + provenance(report) + table(header, rows) + "\n\n"
    text += (
        f"Median (p95). Load: {report['load']}. pgbench TPS without captures (quiet seconds of the same run): "
        f"{med_p95(report['tps_quiet'], 1)}. Naive order: {report['naive_order']}, gap {report['naive_gap_s']} s. "
        f"Disks left out of the sets: {', '.join(report['excluded_disks']) or 'none'}. Guest booted in "
        f"{num(guest['boot_s'])} s; {'still running' if guest['running_at_end'] else 'NOT running'} at the end.\n\n"
    )
    examples = [(m["label"], m["violation_examples"][0]) for m in methods.values() if m["violation_examples"]]
    if examples:
        text += "What PostgreSQL said, one example per method:\n\n"
        text += "\n".join(f"- {label}: `{reason[:300]}`" for label, reason in examples) + "\n\n"
    errors = [(m["label"], m["error_examples"][0]) for m in methods.values() if m["error_examples"]]
    if errors:
        text += "Errors (captures that failed; not counted either way):\n\n"
        text += "\n".join(f"- {label}: `{err}`" for label, err in errors) + "\n\n"
    return text + f"![database]({image_link('database')})"


def consistency_verdict(report: dict[str, Any]) -> str:
    methods = report["methods"]
    ff = [methods[k] for k in FF_METHODS if k in methods]
    ff_bad = sum(m["violations"] for m in ff)
    ff_err = sum(m["errors"] for m in ff)
    parts = []
    if ff and ff_bad == 0:
        parts.append(
            f"freezeframe: **0 violations** at every level ({' + '.join(str(m['checked']) for m in ff)} sets "
            "checked" + (f"; {ff_err} captures failed" if ff_err else "") + ")."
        )
    elif ff:
        parts.append(f"freezeframe: **{ff_bad} violations** — a bug; see the examples below.")
    for key in NAIVE_METHODS:
        if key in methods:
            m = methods[key]
            rate = m["violation_rate"]
            text = f"{m['label']}: {m['violations']} of {m['checked']} sets inconsistent"
            if rate is not None:
                text += f" ({100 * rate:.0f} %)"
            skew = m["skew_ms"]["median"]
            if skew is not None:
                text += f", the state disk captured a median {num(skew)} ms after the journal disk"
            parts.append(text + ".")
    if "naive_gap" in methods:
        parts.append(f"(The small-gap variant sleeps {report['naive_gap_s']} s between the per-disk jobs.)")
    return " ".join(parts)


def window_section(report: dict[str, Any] | None) -> str:
    if report is None:
        return missing("window")
    outcomes = report["outcomes"]
    rows = []
    for o in outcomes:
        stall = o.get("stall") or {}
        rows.append([
            o["label"],
            f"{num(o['floor_median_ms'])} ({num(o['floor_p95_ms'])})",
            f"{num(o['window_median_ms'])} ({num(o['window_p95_ms'])})",
            f"**{times(o['ratio_of_medians'])}**",
            "met" if o["ratio_of_medians"] <= WINDOW_TARGET else "missed",
            med_p95(stall.get("snapshot")),
            med_p95(stall.get("floor")),
            med_p95(stall.get("quiet")),
            num(stall.get("typical_gap_ms")),
        ])  # fmt: skip
    header = ["config", "floor ms", "window ms", "window / floor", f"≤ {WINDOW_TARGET}x", "stall: snapshot ms",
              "stall: floor ms", "stall: quiet 1 s", "typical gap ms"]  # fmt: skip
    text = smoke_warning(report) + provenance(report) + table(header, rows) + "\n\n"
    text += (
        "Median (p95). Floor = bare `fsFreeze` + `fsThaw` on the same guest, alternating with the snapshots. Stall = "
        "longest gap between two heartbeat writes inside the interval (floor, the whole snapshot call, or a quiet "
        "second with nothing happening); the ledger config has no timestamps, so no stall.\n\n"
    )
    pauses = [o for o in outcomes if o.get("pause")]
    for o in pauses:
        fp, pw = summarize(o.get("floor_pause_ms", [])), summarize(o.get("pause_ms", []))
        text += (
            f"{o['label']}: vCPUs paused for {med_p95(pw)} ms inside the window, against {med_p95(fp)} ms for a "
            "bare suspend + resume.\n\n"
        )
    text += "Where the time goes, median ms of each step (exclusive of nested steps):\n\n" + steps_table(outcomes)
    text += "\n\n" + window_limits(outcomes) + "\n\n" + flatness(report)
    text += f"\n\n![window]({image_link('window')})"
    return text


def summarize(values: Sequence[float]) -> dict[str, Any] | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"median": median, "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]}


def steps_table(outcomes: Sequence[dict[str, Any]]) -> str:
    seen: set[str] = {str(k) for o in outcomes for k, v in o["steps_median_ms"].items() if v >= 0.5}
    keys = [k for k in STEP_NAMES if k in seen] + sorted(seen - STEP_NAMES.keys())
    header = ["config", "floor: freeze", "floor: thaw", *(STEP_NAMES.get(k) or k for k in keys)]
    rows = [
        [o["label"], num(o["floor_steps_median_ms"].get("freeze")), num(o["floor_steps_median_ms"].get("thaw")),
         *(num(o["steps_median_ms"].get(k)) for k in keys)]
        for o in outcomes
    ]  # fmt: skip
    return table(header, rows)


def window_limits(outcomes: Sequence[dict[str, Any]]) -> str:
    """Plain sentences from the profile: what the window spends beyond the floor, biggest first."""
    missed = [o for o in outcomes if o["ratio_of_medians"] > WINDOW_TARGET]
    if not missed:
        return f"Every configuration is within {WINDOW_TARGET}x of its floor."
    lines = [f"**Target missed** (window ≤ {WINDOW_TARGET}x the floor) in {len(missed)} of {len(outcomes)} configs:"]
    for o in missed:
        steps, floor = o["steps_median_ms"], o["floor_steps_median_ms"]
        extra: list[tuple[float, str]] = []
        for key in ("freeze", "thaw"):
            if key in steps and key in floor:
                extra.append((steps[key] - floor[key], f"{STEP_NAMES[key]} {num(steps[key])} vs {num(floor[key])}"))
        for key, value in steps.items():
            if key not in ("freeze", "thaw") and value >= 0.5:
                extra.append((value, f"{STEP_NAMES.get(key, key)} {num(value)}"))
        extra.sort(reverse=True)
        biggest = "; ".join(text for _, text in extra[:4])
        lines.append(
            f"- {o['label']}: {num(o['window_median_ms'])} ms vs floor {num(o['floor_median_ms'])} ms "
            f"(+{num(o['window_median_ms'] - o['floor_median_ms'])} ms). Largest contributors (ms, window vs floor "
            f"where both have the step): {biggest}."
        )
    return "\n".join(lines)


def flatness(report: dict[str, Any]) -> str:
    parts = []
    for key, what in (("by_disk_count", "disk count (1 → 3 → 8 disks of 64 MiB)"),
                      ("by_disk_size", "disk size (3 disks of 64 MiB → 1 GiB → 4 GiB)")):  # fmt: skip
        series = report.get(key) or {}
        if not series:
            continue
        items = list(series.items())
        window = ", ".join(f"{label} {times(v['window_vs_first'])}" for label, v in items)
        floor = ", ".join(f"{times(v['floor_vs_first'])}" for _, v in items)
        excess = ", ".join(f"{num(v['excess_over_floor_ms'])}" for _, v in items)
        parts.append(
            f"With {what}, the window relative to the first config: {window} (floor: {floor}); window minus floor: "
            f"{excess} ms."
        )
    return " ".join(parts) if parts else "Flatness: not measured in this run (needs the full configuration set)."


def throughput_section(report: dict[str, Any] | None) -> str:
    if report is None:
        return missing("throughput")
    cap, store = report["capture"], report["storage"]
    export = report["export"]
    rows = [
        ["storage: `dd` O_DIRECT sequential write", num(store["write_mib_s"]), "", ""],
        ["storage: `dd` O_DIRECT sequential read", num(store["read_mib_s"]), "", ""],
        ["storage: `dd` O_DIRECT copy (same disk)", num(store["copy_mib_s"]), "", ""],
        ["`qemu-img convert` of the live disks", num(cap["convert_mib_s"]), "1.00x",
         times(_div(cap["convert_mib_s"], store["copy_mib_s"]))],
        ["freezeframe capture: the backup copy", num(cap["copy_mib_s"]), f"**{times(cap['vs_convert'])}**",
         times(cap["vs_storage_copy"])],
        ["freezeframe capture: the whole call", num(cap["call_mib_s"]), times(cap["call_vs_convert"]),
         times(_div(cap["call_mib_s"], store["copy_mib_s"]))],
    ]  # fmt: skip
    if export.get("available"):
        for mode, what in (("copy", "qcow2 members copied as is"), ("vmdk", "converted to streamOptimized VMDK")):
            e = export[mode]
            rows += [
                [f"`qemu-img convert` of the members ({mode})", num(e["convert_mib_s"]), "1.00x",
                 times(_div(e["convert_mib_s"], store["copy_mib_s"]))],
                [f"OVA export, {what}", num(e["mib_s"]), f"**{times(e['vs_convert'])}**",
                 times(_div(e["mib_s"], store["copy_mib_s"]))],
            ]  # fmt: skip
    header = ["what", "MiB/s (median)", "vs its qemu-img convert", "vs storage copy"]
    text = smoke_warning(report) + provenance(report)
    text += (
        f"{report['disks']} disks of {size(report['disk_size_bytes'])}, each with "
        f"{size(report['filled_bytes_per_disk'])} of random data written by the guest: "
        f"{num(report['data_bytes'] / MiB)} MiB of data in all "
        f"({report['repeats']} repeat{'' if report['repeats'] == 1 else 's'}; MiB/s = data bytes / median seconds; "
        "ratios are medians of per-repeat time ratios).\n\n"
    )  # fmt: skip
    text += table(header, rows) + "\n\n"
    steps = cap["steps_median_s"]
    text += (
        f"Inside one capture call (median s): create the targets {num(steps['prepare'], 2)}, backup copy "
        f"{num(steps['copy'], 2)}, SHA-256 of the members {num(steps['checksum'], 2)}, whole call "
        f"{num(steps['call'], 2)}.\n\n"
    )
    text += throughput_verdict(report) + "\n\n" + export_profiles(report)
    text += f"![throughput]({image_link('throughput')})"
    return text


def export_profiles(report: dict[str, Any]) -> str:
    """The cProfile of one export per mode: where the writer's own thread spent its time."""
    export = report["export"]
    if not export.get("available"):
        return ""
    text = ""
    for mode in ("copy", "vmdk"):
        profile = export[mode].get("profile")
        if not profile:
            continue
        rows = [[f"`{r['function']}`", str(r["calls"]), num(r["own_s"], 2), num(r["cumulative_s"], 2)]
                for r in profile["top_by_own_time"][:6]]  # fmt: skip
        text += (
            f"Profile of one extra export ({mode}) under cProfile, {num(profile['seconds_under_profiler'], 1)} s; "
            "the functions with the most own time in the writer's thread (time in qemu-img or the hashing thread "
            "shows up as waiting):\n\n" + table(["function", "calls", "own s", "cumulative s"], rows) + "\n\n"
        )
    return text


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def throughput_verdict(report: dict[str, Any]) -> str:
    cap, export = report["capture"], report["export"]
    parts = [
        f"Capture copies at {times(cap['vs_convert'])} the speed of `qemu-img convert` of the same disks and at "
        f"{times(cap['vs_storage_copy'])} of what the storage does for a plain O_DIRECT copy."
    ]
    if not export.get("available"):
        parts.append(f"**Export was not measured**: {export.get('why')}.")
        return " ".join(parts)
    for mode in ("copy", "vmdk"):
        e = export[mode]
        ok = e["vs_convert"] is not None and e["vs_convert"] >= EXPORT_TARGET
        parts.append(
            f"Export ({mode}): {times(e['vs_convert'])} of `qemu-img convert` — target ≥ {EXPORT_TARGET}x "
            f"{'met' if ok else '**missed**'}."
        )
    return " ".join(parts)


def concurrency_section(report: dict[str, Any] | None) -> str:
    if report is None:
        return missing("concurrency")
    rows = [
        [f"instance {r['instance'] + 1}", med_p95(r["alone"]), med_p95(r["together"]), times(r["ratio_of_medians"]),
         med_p95(r["alone_call_s"], 1), med_p95(r["together_call_s"], 1), f"{r['violations']} / {r['checked']}",
         str(len(r["errors"]))]
        for r in report["per_instance"]
    ]  # fmt: skip
    rows.append([
        "**all**", med_p95(report["alone"]), med_p95(report["together"]), f"**{times(report['ratio_of_medians'])}**",
        "", "", f"{report['violations']} / {report['checked']}", str(report["errors"]),
    ])  # fmt: skip
    header = ["", "window alone ms", "window all at once ms", "ratio", "call alone s", "call all at once s",
              "ledger violations", "errors"]  # fmt: skip
    overlaps = report["max_windows_open_at_once"]
    text = smoke_warning(report) + provenance(report)
    text += (
        f"{report['instances']} instances of {report['disks_per_instance']} disks, {report['level']} level, "
        f"{report['rounds']} rounds. Median (p95).\n\n" + table(header, rows) + "\n\n"
        f"All at once, the windows overlapped: at most {max(overlaps) if overlaps else 'n/a'} of "
        f"{report['instances']} were open at the same moment (median round: "
        f"{sorted(overlaps)[len(overlaps) // 2] if overlaps else 'n/a'}). A concurrent round took "
        f"{med_p95(report['together_wall_s'], 1)} s in all, against {num(report['alone_sum_of_calls_s'], 1)} s for "
        f"the same snapshots one after another.\n\n"
        f"![concurrency]({image_link('concurrency')})"
    )
    return text


def startup_section(report: dict[str, Any] | None) -> str:
    if report is None:
        return missing("startup")
    rows = [
        [f"`{' '.join(w['argv'])}`", num(w["summary"]["median"], 3), num(w["summary"]["p95"], 3),
         num(w["summary"]["min"], 3), num(w["summary"]["max"], 3)]
        for w in report["wall"].values()
    ]  # fmt: skip
    text = smoke_warning(report) + provenance(report)
    text += (
        f"{report['runs']} runs of each command, interleaved, after one warm-up run each; code measured: "
        f"`{report['src']}`.\n\n" + table(["command", "median s", "p95 s", "min s", "max s"], rows) + "\n\n"
    )
    imports = report["imports"]
    summary_rows = [[f"`freezeframe {name}`", num(i["total_ms"]), str(i["modules_imported"]),
                     ", ".join(f"{p['package']} {num(p['cumulative_ms'])}" for p in i["packages"][:4])]
                    for name, i in imports.items()]  # fmt: skip
    text += "Imports, from one run under `python -X importtime` (ms, nested imports included):\n\n"
    text += table(["command", "import ms", "modules", "largest third-party packages (ms)"], summary_rows) + "\n\n"
    pulls = [[f"`{p['module']}`", p["package"], num(p["cumulative_ms"])] for p in imports["list"]["pulled_in_by"][:8]]
    if pulls:
        text += "Which module pulls in each third-party package, for `freezeframe list`:\n\n"
        text += table(["module", "imports", "ms"], pulls) + "\n\n"
    return text + f"![startup]({image_link('startup')})"


def incremental_section(report: dict[str, Any] | None) -> str:
    if report is None:
        return missing("incremental")
    sizes, s = report["sizes"], report["summary"]
    text = smoke_warning(report) + provenance(report)
    text += (
        f"{sizes['disks']} qcow2 disks of {num(sizes['disk_bytes'] / MiB)} MiB, "
        f"{num(sizes['data_bytes_per_disk'] / MiB)} MiB of data written on each from the host; the guest changes "
        "a share of it in distinct random blocks (`ff-workload rewrite`, O_DIRECT); an incremental set over the "
        "previous set; full sets of the same guest "
        "in the same run are the baseline (medians; p95 in the JSON).\n\n"
    )
    full_s = s["full_s"]["median"]
    text += (
        f"Full set: {num(full_s, 2)} s, {num(s['full_bytes']['median'] / MiB)} MiB, freeze window "
        f"{num(s['full_freeze_ms']['median'])} ms. Incremental with nothing changed (the fixed cost per set): "
        f"{num(s['empty_incremental_s']['median'], 2)} s, {num(s['empty_incremental_bytes']['median'] / MiB, 2)} MiB."
        "\n\n"
    )
    rows = []
    for label, r in s["cases"].items():
        rows.append([
            label, num(r["changed_bytes"]["median"] / MiB, 1), num(r["incremental_bytes"]["median"] / MiB, 1),
            num(r["written_per_changed"], 2), num(r.get("data_per_changed"), 2),
            num(r["incremental_s"]["median"], 2), num(r["time_share"], 3), num(r["incremental_freeze_ms"]["median"]),
        ])  # fmt: skip
    header = ["guest changed", "changed MiB", "incremental MiB", "written / changed",
              "data clusters / changed", "incremental s", "time / full set", "freeze ms"]  # fmt: skip
    text += table(header, rows) + "\n\n"
    tp = report["throughput"]
    text += (
        "Guest write throughput (random 64 KiB O_DIRECT writes) by live dirty bitmaps per disk: "
        + ", ".join(f"{t['live_bitmaps']}: {num(t['mib_per_s']['median'], 1)} MiB/s" for t in tp)
        + ".\n\n"
    )
    peer = report.get("virtnbdbackup")
    if peer:
        inc_case = s["cases"].get("1 %", {})
        text += table(
            ["same guest, same run", "full s", "full MiB", "incremental (1 %) s", "incremental (1 %) MiB"],
            [
                ["freezeframe", num(full_s, 2), num(s["full_bytes"]["median"] / MiB),
                 num(inc_case.get("incremental_s", {}).get("median"), 2),
                 num((inc_case.get("incremental_bytes", {}).get("median") or 0) / MiB, 1)],
                [f"virtnbdbackup {peer['version']}", num(peer["full"]["s"], 2), num(peer["full"]["bytes"] / MiB),
                 num(peer["inc"]["s"], 2), num(peer["inc"]["bytes"] / MiB, 1)],
            ],
        ) + "\n\n"  # fmt: skip
    return text + f"![incremental]({image_link('incremental')})"


def rbd_window_section(report: dict[str, Any] | None) -> str:
    """Freeze window with N RBD disks against the floor and Nova-style sequential snapshots; restore clone vs copy."""
    if report is None:
        return missing("rbd_window")
    text = smoke_warning(report) + provenance(report)
    text += (
        "Filesystem-level sets of a TCG guest with a qcow2 root file and N RBD data disks on the one-node memstore "
        "test bed; floor, set and sequential snapshots alternate; median (p95) ms.\n\n"
    )
    rows = [
        [
            str(r["rbd_disks"]), med_p95(r["floor_ms"]), med_p95(r["window_ms"]), num(r["ratio_of_medians"], 2),
            med_p95(r["per_rbd_snapshot_ms"]), med_p95(r["sequential_no_freeze_ms"]),
        ]
        for r in report["by_rbd_disks"]
    ]  # fmt: skip
    header = ["RBD disks", "bare freeze+thaw (floor)", "freezeframe window", "window / floor",
              "each RBD snapshot in the window", "Nova-style sequential snapshots, no freeze"]  # fmt: skip
    text += table(header, rows)
    restores = report.get("restore") or []
    if restores:
        text += (
            "\n\nRestoring one RBD member whose image is fully written: an RBD clone (what `restore` makes), the "
            "clone flattened (`restore --full`), and `qemu-img convert` of the snapshot to a local qcow2 file; "
            "median (p95) ms.\n\n"
        )
        rows = [
            [
                size(r["size_bytes"]), med_p95(r["clone_ms"]), med_p95(r["clone_flatten_ms"]),
                med_p95(r["qemu_img_copy_ms"]), times(r["copy_per_clone"]),
            ]
            for r in restores
        ]  # fmt: skip
        text += table(["image", "clone", "clone + flatten", "qemu-img copy", "copy / clone"], rows)
    return text + f"\n\n![rbd_window]({image_link('rbd_window')})"


def s3_copy_section(report: dict[str, Any] | None) -> str:
    """Off-site copies (bench/s3_copy.py): upload throughput, incremental bytes sent, peak memory."""
    if report is None:
        return missing("s3_copy")
    tp = report["throughput"]
    text = smoke_warning(report) + provenance(report)
    text += (
        f"Upload of one {num(tp['object_bytes'] / MiB)} MiB object to radosgw (memstore OSD), {tp['repeats']} "
        "alternating rounds, MiB/s median (p95): freezeframe's multipart upload against boto3's `upload_file` of the "
        "same bytes and against reading the file (the storage read limit).\n\n"
    )
    labels = {"read": "read the staged file", "boto3_upload_file": "boto3 upload_file", "freezeframe": "freezeframe"}
    rows = [[label, med_p95(tp["mib_per_s"][key], 1)] for key, label in labels.items()]
    text += table(["", "MiB/s"], rows)
    cpu = tp.get("client_cpu_s_per_gib")
    if cpu is not None:
        text += (
            f"\n\nClient CPU per GiB uploaded (this process, all threads), median (p95): freezeframe "
            f"{med_p95(cpu['freezeframe'], 2)} s, boto3 upload_file {med_p95(cpu['boto3_upload_file'], 2)} s "
            "(freezeframe hashes every byte twice: the SHA-256 kept with the object, the MD5 of each part)."
        )
    text += (
        f"\n\nfreezeframe / boto3: **{num(tp['ours_vs_boto3'], 2)}**; freezeframe / read limit: "
        f"{num(tp['ours_vs_read'], 3)}.\n\nIncremental copy (a full set copied first, then a child with N MiB of "
        "random data changed):\n\n"
    )
    inc = [[num(r["changed_bytes"] / MiB), num(r["incremental_sent"] / MiB, 2), num(r["sent_per_changed"], 2),
            num(r["full_sent"] / MiB, 1), num(r["incremental_s"], 2)] for r in report["incremental"]]  # fmt: skip
    text += table(["changed MiB", "sent MiB", "sent / changed", "full copy sent MiB", "incremental copy s"], inc)
    text += "\n\nPeak memory of `freezeframe copy` (own process; largest child, qemu-img):\n\n"
    mem = [[f"{r['virtual_bytes'] / (1024 * MiB):g} GiB", num(r["data_bytes"] / MiB), num(r["stored_bytes"] / MiB),
            num(r["copy_s"], 1), num(r["peak_rss_mib"], 1), num(r["peak_child_rss_mib"], 1)]
           for r in report["peak_memory"]]  # fmt: skip
    text += table(["member", "data MiB", "stored MiB", "copy s", "peak RSS MiB", "peak child RSS MiB"], mem)
    return text + f"\n\n![s3_copy]({image_link('s3_copy')})"


def group_window_section(report: dict[str, Any] | None) -> str:
    """Consistency groups (bench/group_window.py): the group window against one instance's and the bare floor."""
    if report is None:
        return missing("group_window")
    stats = report["stats_ms"]
    sizes = report["instances"]
    text = smoke_warning(report) + provenance(report)
    text += (
        f"{report['rounds']} rounds; each round: bare freeze+thaw of 1, {', '.join(map(str, sizes))} guests at "
        "once, one filesystem-level set of one guest, then one group set of each size (the window: first freeze "
        "to last thaw).\n\n"
    )
    single = stats["single"]["median"]
    rows = [["bare floor, 1 guest", med_p95(stats["floor_1"]), times(ratio(stats["floor_1"]["median"], single)), "-"],
            ["single-instance window", med_p95(stats["single"]), "1.00x",
             f"+{num(report['single_above_floor_ms'], 0)}"]]  # fmt: skip
    for n in sizes:
        rows.append([f"bare floor, {n} guests at once", med_p95(stats[f"floor_{n}"]),
                     times(ratio(stats[f"floor_{n}"]["median"], single)), "-"])  # fmt: skip
        rows.append(
            [
                f"group window, {n} instances",
                med_p95(stats[f"group_{n}"]),
                times(report["group_vs_single"][str(n)]),
                f"+{num(report['group_above_floor_ms'][str(n)], 0)}",
            ]
        )
    return (
        text
        + table(["what", "median / p95 ms", "vs single", "ms above its floor"], rows)
        + f"\n\n![group window]({image_link('group_window')})"
    )


CATALOG_ROWS = ("first page", "deep page (90 % down)", "metadata (env=e3)", "show by 8-char prefix", "insert a set",
                "SQL only: first page", "SQL only: deep page", "stream 5000 sets")  # fmt: skip


def catalog_section(report: dict[str, Any] | None) -> str:
    """Per backend: each operation's median (p95) ms and peak KiB against catalog size, and the verdict."""
    if report is None:
        return missing("catalog")
    text = smoke_warning(report) + provenance(report)
    text += (
        f"Pages of {report['page_size']} sets, {report['repeat']} timings per operation after a warm-up; "
        "median (p95) ms, then the peak Python memory of one more run (KiB). The baseline is the listing before "
        "issue 18 (every row read, the metadata filter in Python), up to 100k sets.\n\n"
    )
    for backend, data in report["backends"].items():
        sizes = sorted(data["sizes"], key=int)
        names = list(data["sizes"][sizes[-1]]["ops"])
        names += [n for n in data["sizes"][sizes[0]]["ops"] if n not in names]
        rows = []
        for name in names:
            cells = [name]
            for size in sizes:
                op = data["sizes"][size]["ops"].get(name)
                cells.append("—" if op is None else f"{med_p95(op['ms'], 1)} / {num(op['peak_kib'])} KiB")
            rows.append(cells)
        loads = ", ".join(f"{int(s):,}: {num(data['sizes'][s]['load_s'])} s" for s in sizes)
        server = ", ".join(f"{k} {v}" for k, v in data["server"].items())
        text += f"**{backend}** ({server}; run {data.get('when', '?')}; bulk load {loads})\n\n"
        text += table(["operation", *(f"{int(s):,} sets" for s in sizes)], rows) + "\n\n"
    return text + f"![catalog]({image_link('catalog')})"


def catalog_verdicts(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for backend, v in report["verdict"].items():
        rows.append([f"catalog ({backend}): every page ≤ {report['goal_ms']:g} ms at {v['largest']:,} sets (p95)",
                     f"slowest: {v['slowest_page']} {num(v['slowest_page_p95_ms'], 1)} ms",
                     "met" if v["every_page_within_goal"] else "**missed**"])  # fmt: skip
        inserts = list(v["insert_median_ms"].items())
        rows.append([f"catalog ({backend}): insert cost flat",
                     " → ".join(f"{int(k):,}: {num(ms, 1)} ms" for k, ms in inserts),
                     "met" if inserts[-1][1] <= 2 * inserts[0][1] else "**missed**"])  # fmt: skip
        rows.append([f"catalog ({backend}): memory flat with catalog size",
                     f"peak grows {times(v['peak_kib_growth'])} from {v['peak_kib_from']:,} sets",
                     "met" if v["peak_kib_growth"] <= 1.5 else "**missed**"])  # fmt: skip
    return rows


DATABASE_N = 50


def database_verdicts(report: dict[str, Any] | None) -> list[list[str]]:
    """Issue 19's targets: N >= 50 per method, freezeframe never breaks PostgreSQL, the naive capture does."""
    if report is None:
        return []
    methods = report["methods"]
    ours = [m for key, m in methods.items() if key.startswith("ff_")]
    bad, checked = sum(m["violations"] for m in ours), sum(m["checked"] for m in ours)
    fewest = min(m["checked"] for m in methods.values())
    rows = [[f"PostgreSQL: freezeframe 0 violations at every level, N ≥ {DATABASE_N} per method",
             f"{bad} in {checked} sets (fewest checked in a method: {fewest})",
             "met" if ours and checked and not bad and fewest >= DATABASE_N else "**missed**"]]  # fmt: skip
    naive = methods.get("naive")
    if naive:
        rows.append(["PostgreSQL: naive per-volume capture > 0 violations",
                     f"{naive['violations']} / {naive['checked']}",
                     "met" if naive["violations"] > 0 else "**missed**"])  # fmt: skip
    return rows


def verdict_section(reports: dict[str, dict[str, Any]]) -> str:
    """The acceptance targets, each with the measured number and met / missed."""
    rows: list[list[str]] = []
    cons = reports.get("consistency")
    if cons:
        methods = cons["methods"]
        bad = {k: methods[k]["violations"] for k in FF_METHODS if k in methods}
        checked = sum(methods[k]["checked"] for k in FF_METHODS if k in methods)
        rows.append(["freezeframe: 0 ledger violations at every level", f"{sum(bad.values())} in {checked} sets",
                     "met" if bad and not any(bad.values()) and checked else "**missed**"])  # fmt: skip
        naive = [methods[k] for k in NAIVE_METHODS if k in methods]
        rows.append(["naive per-disk capture: > 0 violations",
                     ", ".join(f"{m['violations']} / {m['checked']}" for m in naive),
                     "met" if naive and all(m["violations"] > 0 for m in naive) else "**missed**"])  # fmt: skip
    rows += database_verdicts(reports.get("database"))
    win = reports.get("window")
    if win:
        worst = max(win["outcomes"], key=lambda o: o["ratio_of_medians"])
        rows.append([f"window ≤ {WINDOW_TARGET}x the floor",
                     f"worst {worst['label']}: {times(worst['ratio_of_medians'])}",
                     "met" if worst["ratio_of_medians"] <= WINDOW_TARGET else "**missed**"])  # fmt: skip
        for key, what in (("by_disk_count", "disk count"), ("by_disk_size", "disk size")):
            series = list((win.get(key) or {}).items())
            if series:
                # Flat = the window grows no faster than the floor does (more filesystems take longer to freeze).
                def excess(item: tuple[str, dict[str, Any]]) -> float:
                    v = item[1]
                    return (v["window_vs_first"] or 0.0) / max(1.0, v["floor_vs_first"] or 1.0)

                label, worst = max(series[1:] or series, key=excess)
                flat = excess((label, worst)) <= WINDOW_TARGET
                rows.append([f"window flat with {what} (grows no faster than the floor, within {WINDOW_TARGET}x)",
                             f"{label} vs {series[0][0]}: window {times(worst['window_vs_first'])}, "
                             f"floor {times(worst['floor_vs_first'])}",
                             "met" if flat else "**missed**"])  # fmt: skip
    tp = reports.get("throughput")
    if tp:
        export = tp["export"]
        if export.get("available"):
            for mode in ("copy", "vmdk"):
                r = export[mode]["vs_convert"]
                rows.append([f"export ({mode}) ≥ {EXPORT_TARGET}x qemu-img convert", times(r),
                             "met" if r is not None and r >= EXPORT_TARGET else "**missed**"])  # fmt: skip
        else:
            rows.append([f"export ≥ {EXPORT_TARGET}x qemu-img convert", "not measured", export.get("why", "")])
    conc = reports.get("concurrency")
    if conc:
        rows.append(["concurrent snapshots stay consistent", f"{conc['violations']} / {conc['checked']} violations",
                     "met" if conc["checked"] and not conc["violations"] else "**missed**"])  # fmt: skip
    group = reports.get("group_window")
    if group:
        for n, value in group["group_vs_single"].items():
            floor = ratio(group["stats_ms"][f"floor_{n}"]["median"], group["stats_ms"]["single"]["median"])
            met = value is not None and value <= WINDOW_TARGET
            rows.append([f"group window ≤ {WINDOW_TARGET}x the single-instance window ({n} instances)",
                         f"{times(value)} (bare freeze/thaw of {n} guests alone: {times(floor)})",
                         "met" if met else "**missed**"])  # fmt: skip
    start = reports.get("startup")
    if start:
        for name in STARTUP_TARGETS:
            stats = start["wall"][name]["summary"]
            met = stats["median"] is not None and stats["median"] < start["target_s"]
            rows.append([f"`freezeframe {name}` starts in < {start['target_s']} s (median)",
                         f"{num(stats['median'], 2)} s (p95 {num(stats['p95'], 2)} s)",
                         "met" if met else "**missed**"])  # fmt: skip
    if reports.get("catalog"):
        rows += catalog_verdicts(reports["catalog"])
    rows += incremental_verdicts(reports.get("incremental"))
    if not rows:
        return "_No results yet: run `.venv/bin/python bench/run_all.py`, then `bench/report.py`._"
    smoke = any(r.get("mode") == "quick" for r in reports.values())
    note = smoke_warning({"mode": "quick"}) if smoke else ""
    return note + table(["target", "measured", "verdict"], rows)


def hosts_load_section(report: dict[str, Any] | None) -> str:
    """Multi-host deployment vs the embedded service, same load, same run (bench/hosts_load.py)."""
    if report is None:
        return missing("hosts_load")
    rows = []
    for mode, r in report["modes"].items():
        s = r["request_to_start_s"]
        rows.append([
            mode, str(r["accepted"]), str(r["errors"]), str(r["lost"]), str(r["duplicated"]), str(r["failed"]),
            num(s["median"], 2, "s"), num(s["p95"], 2, "s"), num(r["sets_per_minute"], 1),
        ])  # fmt: skip
    header = ["mode", "jobs", "errors", "lost", "duplicated", "failed", "request→start median", "p95", "sets/min"]
    return "\n".join([
        smoke_warning(report) + provenance(report),
        f"{report['clients']} API clients for {report['load_seconds']:.0f} s on {report['instances']} instances.",
        "",
        table(header, rows),
        "",
        f"![hosts load]({image_link('hosts_load')})",
    ])  # fmt: skip


def incremental_verdicts(report: dict[str, Any] | None) -> list[list[str]]:
    """Issue 11's goals, on the guest's 64 KiB writes at 0.1, 1 and 10 % (the granularity cases explain, not judge)."""
    if report is None or "summary" not in report:
        return []
    s = report["summary"]
    rows = []
    for label in ("0.1 %", "1 %", "10 %"):
        r = s["cases"].get(label)
        if r is None:
            continue
        data = r.get("data_per_changed") or r["written_beyond_metadata_per_changed"]
        rows.append([f"incremental writes ≤ 1.1x what changed + metadata ({label})",
                     f"{num(data, 3)}x data ({num(r['written_per_changed'], 2)}x with metadata)",
                     "met" if data is not None and data <= 1.1 else "**missed**"])  # fmt: skip
    one = s["cases"].get("1 %")
    if one:
        share = one["time_share"]
        verdict = "met" if share is not None and share <= 0.03 else "**missed**"
        rows.append(["incremental ≤ 3 % of a full set's time (1 % changed)",
                     f"{num(share * 100 if share else None, 1)} % ({num(one['incremental_s']['median'], 2)} s vs "
                     f"{num(s['full_s']['median'], 1)} s)", verdict])  # fmt: skip
    freeze = max(s["cases"][c]["incremental_freeze_ms"]["median"] or 0.0 for c in s["cases"])
    full = s["full_freeze_ms"]["median"] or 0.0
    rows.append(["incremental freeze window no longer than a full set's (median)",
                 f"worst {num(freeze)} ms vs {num(full)} ms", "met" if freeze <= full else "**missed**"])  # fmt: skip
    return rows


def missing(name: str) -> str:
    where = os.path.relpath(_results_dir, REPO_ROOT) if _results_dir.is_relative_to(REPO_ROOT) else _results_dir
    return (
        f"_No `{name}.json` in `{where}` yet: run `.venv/bin/python bench/{name}.py` (or `bench/run_all.py`), "
        "then `bench/report.py`._"
    )


# ---- the document ------------------------------------------------------------------------------------------------

_results_dir = RESULTS
_doc_path = REPO_ROOT / "docs" / "benchmarks.md"


def image_link(name: str) -> str:
    return os.path.relpath(_results_dir / f"{name}.png", _doc_path.parent)


REPORTS = (
    "consistency",
    "database",
    "window",
    "throughput",
    "concurrency",
    "startup",
    "incremental",
    "rbd_window",
    "s3_copy",
    "group_window",
    "catalog",
    "hosts_load",
)
"""The bench/results/NAME.json files a section is rendered from."""


def load(results: Path) -> dict[str, dict[str, Any]]:
    reports = {}
    for name in REPORTS:
        path = results / f"{name}.json"
        if path.is_file():
            reports[name] = json.loads(path.read_text())
    return reports


def render(doc: str, reports: dict[str, dict[str, Any]]) -> str:
    sections: dict[str, Callable[[], str]] = {
        "verdicts": lambda: verdict_section(reports),
        "machine": lambda: machine_section(reports),
        "consistency": lambda: consistency_section(reports.get("consistency")),
        "database": lambda: database_section(reports.get("database")),
        "window": lambda: window_section(reports.get("window")),
        "throughput": lambda: throughput_section(reports.get("throughput")),
        "concurrency": lambda: concurrency_section(reports.get("concurrency")),
        "startup": lambda: startup_section(reports.get("startup")),
        "incremental": lambda: incremental_section(reports.get("incremental")),
        "rbd_window": lambda: rbd_window_section(reports.get("rbd_window")),
        "s3_copy": lambda: s3_copy_section(reports.get("s3_copy")),
        "group_window": lambda: group_window_section(reports.get("group_window")),
        "catalog": lambda: catalog_section(reports.get("catalog")),
        "hosts_load": lambda: hosts_load_section(reports.get("hosts_load")),
    }
    for name, build in sections.items():
        pattern = re.compile(rf"(<!-- report:{name} -->).*?(<!-- /report:{name} -->)", re.DOTALL)
        if not pattern.search(doc):
            raise SystemExit(f"the document has no <!-- report:{name} --> ... <!-- /report:{name} --> block")
        body = build()
        doc = pattern.sub(lambda m, body=body: f"{m.group(1)}\n{body}\n{m.group(2)}", doc)  # type: ignore[misc]
    return doc


def main() -> int:
    global _results_dir, _doc_path
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--doc", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    _results_dir, _doc_path = args.results.resolve(), args.doc.resolve()
    reports = load(_results_dir)
    if not reports:
        print(f"warning: no benchmark JSON in {_results_dir}; every section says so", file=sys.stderr)
    _doc_path.write_text(render(_doc_path.read_text(), reports))
    print(f"rendered {', '.join(reports) or 'nothing'} from {_results_dir} into {_doc_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
