"""Shared pieces of the benchmarks: statistics, the JSON report, the machine they ran on, timing, plotting.

Every benchmark script imports this module by name (``from common import ...``): a script's own folder is on
``sys.path`` when it runs, so ``.venv/bin/python bench/window.py`` finds it without ``bench`` being a package.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt

from freezeframe.config import Settings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from freezeframe.testbed.instance import TestInstance

MiB = 1 << 20
GiB = 1 << 30
BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
REPO_ROOT = BENCH_DIR.parent


# ---- statistics ---------------------------------------------------------------------------------------


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile (with few samples it is the largest or second largest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """median, p95, min, max and count; all None (count 0) for no values, so a report never crashes on them."""
    if not values:
        return {"n": 0, "median": None, "p95": None, "min": None, "max": None}
    return {
        "n": len(values),
        "median": round(statistics.median(values), 3),
        "p95": round(p95(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


# ---- command line and output ----------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smoke run: smallest configuration, fewest samples")
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default bench/results; a temp dir with --quick)"
    )
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON already in --out")


def replot(args: argparse.Namespace, name: str, draw: Callable[[dict[str, Any], Path, str | None], None]) -> bool:
    """With ``--replot``: redraw ``<out>/<name>.png`` from ``<out>/<name>.json`` and return True."""
    if not args.replot:
        return False
    out: Path = args.out or RESULTS
    report = load_report(out / f"{name}.json")
    draw(report, out / f"{name}.png", run_note(report.get("mode") == "quick"))
    print(f"redrew {out / f'{name}.png'}")
    return True


def output_dir(args: argparse.Namespace, prefix: str) -> Path:
    """``--out`` if given; else bench/results, or a fresh temp dir for a smoke run (never overwrite results)."""
    out: Path = args.out or (Path(tempfile.mkdtemp(prefix=f"ffbench-{prefix}-")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _first_line(argv: Sequence[str]) -> str | None:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _mem_total_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def _filesystem_of(path: Path) -> dict[str, str] | None:
    """The mount (device, fstype) holding ``path``: where the disk images and captured sets live."""
    target = path.resolve()
    best: tuple[str, str, str] | None = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            device, mount, fstype = parts[0], parts[1], parts[2]
            if (target == Path(mount) or Path(mount) in target.parents) and (best is None or len(mount) > len(best[1])):
                best = (device, mount, fstype)
    if best is None:
        return None
    return {"device": best[0], "mount": best[1], "fstype": best[2]}


def running_domains(conn: Any) -> list[str]:
    """Names of the domains running right now (other agents' test guests are noise worth recording)."""
    try:
        return sorted(d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
    except libvirt.libvirtError:
        return []


def machine_info(conn: Any | None = None, workdir: Path | None = None) -> dict[str, Any]:
    """What the numbers mean nothing without: CPU, memory, software versions, storage, and how busy it was."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_bytes": _mem_total_bytes(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "qemu_img": _first_line(["qemu-img", "--version"]),
        "libvirt": _first_line(["virsh", "--version"]),
        "accel": "tcg",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "workdir_filesystem": _filesystem_of(workdir or Path(tempfile.gettempdir())),
    }
    with contextlib.suppress(OSError):
        info["debian"] = Path("/etc/debian_version").read_text().strip()
    if conn is not None:
        info["other_running_domains"] = len(running_domains(conn))
    return info


def _repo_relative(path: str) -> str:
    try:
        return str(Path(path).absolute().relative_to(REPO_ROOT))
    except ValueError:
        return path


def command_line() -> list[str]:
    """This process's command line as someone would type it in the repository: ``.venv/bin/python bench/x.py``."""
    return [_repo_relative(sys.executable), _repo_relative(sys.argv[0]), *sys.argv[1:]]


@dataclass
class Run:
    """One benchmark run: when it started, how it was invoked, the machine; ``write`` adds the results."""

    name: str
    quick: bool
    started: float = field(default_factory=time.monotonic)
    when: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    argv: list[str] = field(default_factory=lambda: command_line())
    machine: dict[str, Any] = field(default_factory=dict)

    def write(self, out_dir: Path, payload: dict[str, Any], conn: Any | None = None) -> Path:
        """``<out>/<name>.json``, written atomically, with the machine's load at the end of the run too."""
        report = {
            "benchmark": self.name,
            "mode": "quick" if self.quick else "full",
            "when": self.when,
            "duration_s": round(time.monotonic() - self.started, 1),
            "command": " ".join(self.argv),
            "machine": self.machine,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "other_running_domains_at_end": len(running_domains(conn)) if conn is not None else None,
            **payload,
        }
        path = out_dir / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        tmp.replace(path)
        return path


def load_report(path: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(path.read_text())
    return report


@contextlib.contextmanager
def libvirt_connection() -> Iterator[Any]:
    conn = libvirt.open(Settings.from_env().libvirt_uri)
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temp folder on the same filesystem as /tmp (disk images, captured sets), always removed."""
    path = Path(tempfile.mkdtemp(prefix=f"ffbench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(argv: Sequence[str], *, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    """Run a command (argument list, never a shell); raise with its stderr if it fails."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc


def timed_run(argv: Sequence[str], *, timeout: float = 600.0) -> float:
    """Seconds the command took (wall clock)."""
    started = time.monotonic()
    run(argv, timeout=timeout)
    return time.monotonic() - started


# ---- timing inside the product ------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    step: str
    start: float
    end: float
    thread: int

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000.0


class StepClock:
    """Wraps named methods of objects to record when each call started and ended (time.monotonic).

    Used to see where the time inside the freeze window goes without changing the product: the benchmark
    wraps e.g. the hypervisor adapter's ``freeze``, ``start_capture`` and ``thaw`` on the service's instance
    (and the helpers they call, so that time spent in a nested wrapped call is attributed to it, not its caller).
    """

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def wrap(self, obj: object, method: str, step: str | None = None) -> bool:
        """Time every call of ``obj.method`` as ``step``; False (nothing wrapped) if there is no such method."""
        original: Callable[..., Any] | None = getattr(obj, method, None)
        if original is None:
            return False
        name = step or method

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return original(*args, **kwargs)
            finally:
                call = Call(name, started, time.monotonic(), threading.get_ident())
                with self._lock:
                    self.calls.append(call)

        setattr(obj, method, timed)
        return True

    def take(self) -> list[Call]:
        """The calls recorded since the last ``take``."""
        with self._lock:
            calls, self.calls = self.calls, []
        return calls


def _exclusive_ms(calls: Sequence[Call]) -> list[float]:
    """Each call's own time: its duration minus that of the wrapped calls directly nested in it."""
    own = [c.ms for c in calls]
    for i, inner in enumerate(calls):
        parents = [
            j
            for j, outer in enumerate(calls)
            if j != i and outer.thread == inner.thread and outer.start <= inner.start and inner.end <= outer.end
        ]
        if parents:
            closest = min(parents, key=lambda j: calls[j].end - calls[j].start)
            own[closest] -= inner.ms
    return own


def span_of(calls: Sequence[Call], start_steps: Sequence[str], end_steps: Sequence[str]) -> tuple[float, float] | None:
    """From the start of the first call of any ``start_steps`` to the end of the last call of any ``end_steps``."""
    starts = [c.start for c in calls if c.step in start_steps]
    ends = [c.end for c in calls if c.step in end_steps]
    if not starts or not ends:
        return None
    return min(starts), max(ends)


def steps_in(
    calls: Sequence[Call], start_steps: Sequence[str], end_steps: Sequence[str], order: Sequence[str]
) -> dict[str, float]:
    """Exclusive milliseconds per step inside ``span_of(calls, start_steps, end_steps)``, plus 'other'.

    'other' is the part of that span no wrapped call covers (the flow's own bookkeeping, Python, locks).
    """
    span = span_of(calls, start_steps, end_steps)
    if span is None:
        return {}
    begin, finish = span
    inside = [c for c in calls if c.start >= begin and c.end <= finish]
    own = _exclusive_ms(inside)
    out = {step: round(sum(ms for c, ms in zip(inside, own, strict=True) if c.step == step), 3) for step in order}
    out["other"] = round((finish - begin) * 1000.0 - sum(out.values()), 3)
    return out


def median_steps(samples: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-step medians over samples (each step's own median, so they need not add up to the total's)."""
    keys: list[str] = []
    for sample in samples:
        keys.extend(k for k in sample if k not in keys)
    return {k: round(statistics.median([s.get(k, 0.0) for s in samples]), 3) for k in keys if samples}


# ---- the guest's clock (heartbeat timestamps are guest time) ---------------------------------------------


@dataclass(frozen=True)
class GuestClock:
    """Guest realtime minus host realtime, and how uncertain that is (half the agent round trip)."""

    offset_ns: int
    uncertainty_ns: int

    @classmethod
    def measure(cls, inst: TestInstance) -> GuestClock:
        best: GuestClock | None = None
        for _ in range(3):  # the agent round trip under TCG varies; keep the tightest of a few
            before = time.time_ns()
            offset = inst.guest_clock_offset_ns()
            rtt = time.time_ns() - before
            if best is None or rtt // 2 < best.uncertainty_ns:
                best = cls(offset, rtt // 2)
        assert best is not None
        return best

    def to_guest(self, host_ns: int) -> int:
        return host_ns + self.offset_ns


# ---- plots ------------------------------------------------------------------------------------------------

COLORS = {
    "floor": "#8c8c8c",
    "freezeframe": "#1f77b4",
    "baseline": "#ff7f0e",
    "bad": "#d62728",
    "good": "#2ca02c",
    "quiet": "#c7c7c7",
    "limit": "#9467bd",
}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend with the benchmarks' common style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.grid": True,
            "axes.axisbelow": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "legend.fontsize": 8,
            "legend.frameon": False,
        }
    )
    return plt


def save_figure(fig: Figure, path: Path, note: str | None = None) -> None:
    """Save as PNG; ``note`` (e.g. 'quick smoke run') is stamped in the corner so no one mistakes it."""
    plt = pyplot()
    if note:
        fig.text(0.995, 0.005, note, ha="right", va="bottom", fontsize=7, color="#a00000")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_note(quick: bool) -> str | None:
    return "quick smoke run: sizes and sample counts reduced, not a measurement" if quick else None
