"""How long `freezeframe` takes to start: wall time of `--help`, `list` on an empty home and `--version`.

Each command runs N times in a fresh interpreter (the way the console script starts), alternating between the
commands so that machine noise hits them alike, after one warm-up run each (compiled bytecode, page cache, and
the empty home's catalog created). A bare ``python -c pass`` is measured alongside as the floor. Then one more
run of each command under ``python -X importtime`` says where the import time goes.

    .venv/bin/python bench/startup.py                       # 20 runs each; bench/results/startup.{json,png}
    .venv/bin/python bench/startup.py --quick               # smoke run: 1 run each, temp dir
    .venv/bin/python bench/startup.py --src ../other/src --out /tmp/before   # measure another checkout's code
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import (
    COLORS,
    REPO_ROOT,
    Run,
    add_common_args,
    machine_info,
    output_dir,
    pyplot,
    replot,
    run_note,
    save_figure,
    summary,
)

TARGET_S = 0.3
"""Issue 10: `--help` and `list` start in under 0.3 s."""
COMMANDS = {"--help": ["--help"], "list": ["list"], "--version": ["--version"]}
ENTRY = "from freezeframe.cli import main; main()"
"""What the installed console script does (``python -m`` would add runpy on top)."""
TOP = 12
OURS = "freezeframe"


def _env(src: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FREEZEFRAME_")}
    env.update(PYTHONPATH=str(src), FREEZEFRAME_HOME=str(home), COLUMNS="80", TTY_COMPATIBLE="0")
    return env


def _argv(args: list[str] | None) -> list[str]:
    return [sys.executable, "-c", "pass"] if args is None else [sys.executable, "-c", ENTRY, *args]


def _once(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and exit status (an older checkout may fail `--version`: it is timed all the same)."""
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, check=False, timeout=120)
    return time.perf_counter() - started, proc.returncode


def measure_wall(src: Path, home: Path, runs: int) -> dict[str, dict[str, Any]]:
    env = _env(src, home)
    cases: dict[str, list[str] | None] = {**COMMANDS, "python -c pass": None}
    for args in cases.values():
        _once(_argv(args), env)  # warm-up; also creates the empty home's catalog
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    codes: dict[str, set[int]] = {name: set() for name in cases}
    for _ in range(runs):
        for name, args in cases.items():
            elapsed, code = _once(_argv(args), env)
            seconds[name].append(elapsed)
            codes[name].add(code)
    return {
        name: {
            "argv": ["freezeframe", *args] if args is not None else ["python", "-c", "pass"],
            "exit_codes": sorted(codes[name]),
            "seconds": [round(s, 4) for s in seconds[name]],
            "summary": summary(seconds[name]),
        }
        for name, args in cases.items()
    }


def parse_importtime(stderr: str) -> list[tuple[str, int, int, int]]:
    """``-X importtime`` lines as (module, self µs, cumulative µs, nesting depth), in the order Python wrote them."""
    rows = []
    for line in stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if not line.startswith("import time:") or len(fields) != 3:
            continue
        try:
            own, cumulative = int(fields[0]), int(fields[1])
        except ValueError:
            continue  # the header line
        module = fields[2]
        depth = (len(module) - len(module.lstrip(" ")) - 1) // 2
        rows.append((module.strip(), own, cumulative, depth))
    return rows


def import_costs(rows: list[tuple[str, int, int, int]]) -> dict[str, Any]:
    """Where the import time goes: per third-party package, per module that pulls one in, per module's own time."""
    by_package: dict[str, int] = defaultdict(int)
    pulled_in: dict[tuple[str, str], int] = defaultdict(int)
    # Python writes a module's line after its children's; walking backwards, a parent comes before its children.
    parents: list[tuple[int, str]] = []
    for module, _own, cumulative, depth in reversed(rows):
        while parents and parents[-1][0] >= depth:
            parents.pop()
        package = module.split(".")[0]
        parent = parents[-1][1] if parents else ""
        if package != parent.split(".")[0] and package != OURS and package not in sys.stdlib_module_names:
            by_package[package] += cumulative
            pulled_in[(parent or "(a function, at run time)", package)] += cumulative
        parents.append((depth, module))
    total = sum(cumulative for _m, _o, cumulative, depth in rows if depth == 0)
    packages = sorted(by_package.items(), key=lambda kv: -kv[1])[:TOP]
    pulls = sorted(pulled_in.items(), key=lambda kv: -kv[1])[:TOP]
    modules = sorted(rows, key=lambda r: -r[1])[:TOP]
    return {
        "total_ms": round(total / 1000, 1),
        "modules_imported": len(rows),
        "packages": [{"package": p, "cumulative_ms": round(us / 1000, 1)} for p, us in packages],
        "pulled_in_by": [{"module": m, "package": p, "cumulative_ms": round(us / 1000, 1)} for (m, p), us in pulls],
        "modules_by_self_time": [{"module": m, "self_ms": round(o / 1000, 1)} for m, o, _c, _d in modules],
    }


def measure_imports(src: Path, home: Path) -> dict[str, dict[str, Any]]:
    env = _env(src, home)
    result = {}
    for name, args in COMMANDS.items():
        argv = [sys.executable, "-X", "importtime", "-c", ENTRY, *args]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=120)
        result[name] = import_costs(parse_importtime(proc.stderr))
    return result


def plot(report: dict[str, Any], path: Path, note: str | None) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.3]})
    names = list(report["wall"])
    medians = [report["wall"][n]["summary"]["median"] for n in names]
    p95s = [report["wall"][n]["summary"]["p95"] for n in names]
    errors = [[0] * len(names), [max(0.0, p - m) for p, m in zip(p95s, medians, strict=True)]]
    colors = [COLORS["floor"] if n.startswith("python") else COLORS["freezeframe"] for n in names]
    left.bar(names, medians, yerr=errors, capsize=4, color=colors)
    left.axhline(report["target_s"], color=COLORS["limit"], linestyle="--", label=f"target {report['target_s']} s")
    left.set_ylabel("seconds (median, bar to p95)")
    left.set_title(f"start-up wall time, {report['runs']} runs each")
    left.legend()
    costs = report["imports"]["list"]["packages"][:10]
    right.barh([c["package"] for c in costs][::-1], [c["cumulative_ms"] for c in costs][::-1],
               color=COLORS["baseline"])  # fmt: skip
    right.set_xlabel("ms (cumulative, nested imports included)")
    right.set_title("import time of `freezeframe list` by third-party package")
    save_figure(fig, path, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--runs", type=int, default=20, help="runs of each command")
    parser.add_argument("--src", type=Path, default=REPO_ROOT / "src", help="the freezeframe code to measure")
    args = parser.parse_args()
    if replot(args, "startup", plot):
        return
    runs = 1 if args.quick else args.runs
    out_dir = output_dir(args, "startup")
    bench = Run("startup", args.quick)
    with tempfile.TemporaryDirectory(prefix="ffbench-startup-") as tmp:
        home = Path(tmp) / "home"
        bench.machine = machine_info(None, Path(tmp))
        src = args.src.resolve()
        report = {
            "runs": runs,
            "target_s": TARGET_S,
            "src": os.path.relpath(src, REPO_ROOT) if src.is_relative_to(REPO_ROOT) else str(src),
            "wall": measure_wall(src, home, runs),
            "imports": measure_imports(src, home),
        }
    json_path = bench.write(out_dir, report)
    plot(report, out_dir / "startup.png", run_note(args.quick))
    for name, value in report["wall"].items():
        print(f"{name}: median {value['summary']['median']} s, p95 {value['summary']['p95']} s")
    print(f"wrote {json_path} and {out_dir / 'startup.png'}")


if __name__ == "__main__":
    main()
