"""Run every benchmark, one after another, into one results folder; then render the docs with bench/report.py.

    .venv/bin/python bench/run_all.py                 # full run into bench/results/ (hours; see docs/benchmarks.md)
    .venv/bin/python bench/run_all.py --quick         # smoke run into a temp dir (a few minutes)
    .venv/bin/python bench/run_all.py --only window --only throughput
    .venv/bin/python bench/report.py                  # tables and numbers in docs/benchmarks.md from the JSON

Each benchmark runs as its own process (a failure in one does not stop the others; the exit status says
whether all succeeded). ``run_all.json`` in the results folder records each one's exit status and duration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from common import BENCH_DIR, RESULTS

BENCHMARKS = (
    "consistency",
    "window",
    "throughput",
    "concurrency",
    "startup",
    "incremental",
    "catalog",
    "rbd_window",
)
LONGEST_FIRST = (
    "rbd_window", "concurrency", "throughput", "incremental", "consistency", "catalog", "window", "startup",
)  # fmt: skip
"""Start order when several run at once (smoke runs): the longest first, so none is left running alone at the end."""


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run of every benchmark")
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default bench/results; temp dir with --quick)"
    )
    parser.add_argument("--only", action="append", choices=BENCHMARKS, default=[], help="run only these (repeatable)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="benchmarks at once (smoke runs only: they disturb each other's numbers)"
    )
    args = parser.parse_args()
    if args.jobs > 1 and not args.quick:
        parser.error("--jobs > 1 only with --quick: concurrent benchmarks disturb each other's measurements")
    out: Path = args.out or (Path(tempfile.mkdtemp(prefix="ffbench-all-")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in BENCHMARKS if not args.only or n in args.only]
    started = time.monotonic()
    status: dict[str, dict[str, object]] = {}
    pending = sorted(names, key=LONGEST_FIRST.index) if args.jobs > 1 else list(names)
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                name = pending.pop(0)
                argv = [sys.executable, str(BENCH_DIR / f"{name}.py"), "--out", str(out)]
                if args.quick:
                    argv.append("--quick")
                print(f"run_all: {' '.join(argv)}", flush=True)
                # Own process group: a terminal's Ctrl-C reaches only us, and we pass it on exactly once.
                running[name] = (subprocess.Popen(argv, process_group=0), time.monotonic())
            for name, (proc, began) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[name]
                status[name] = {"returncode": code, "seconds": round(time.monotonic() - began, 1)}
                print(f"run_all: {name} exited {code} after {status[name]['seconds']} s", flush=True)
            time.sleep(0.5)
    except KeyboardInterrupt:
        # Each benchmark removes its guests and files when interrupted: pass the interrupt on and wait for that.
        for proc, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        for name, (proc, _) in running.items():
            proc.wait()
            status[name] = {"returncode": proc.returncode, "seconds": None}
        raise
    summary = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "seconds": round(time.monotonic() - started, 1),
        "benchmarks": status,
    }
    (out / "run_all.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [n for n, s in status.items() if s["returncode"] != 0]
    print(f"run_all: {len(names) - len(failed)}/{len(names)} succeeded in {summary['seconds']} s; results in {out}")
    if not args.quick and not failed:
        print("run_all: now render the docs: .venv/bin/python bench/report.py")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
