"""Freeze window of filesystem-level sets against the floor (bare freeze + thaw), same guest, same run.

For each configuration a real guest boots under write load; floor and snapshot measurements alternate so that
machine noise hits both alike. Reports medians and p95, and the ratio of medians.

    .venv/bin/python bench/window.py            # full run, writes bench/results/window.json + window.png
    .venv/bin/python bench/window.py --quick    # smoke run (the test suite uses it), writes to a temp dir
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import libvirt

from freezeframe.config import Settings
from freezeframe.flow import SnapshotRequest
from freezeframe.model import Consistency
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import build_guest
from freezeframe.testbed.instance import DiskRequest, running_instance

MiB = 1 << 20
GiB = 1 << 30
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Config:
    label: str
    disks: int
    size: int
    workload: str
    samples: int


@dataclass
class Outcome:
    label: str
    disks: int
    size_bytes: int
    workload: str
    samples: int
    floor_ms: list[float]
    window_ms: list[float]
    floor_median_ms: float
    floor_p95_ms: float
    window_median_ms: float
    window_p95_ms: float
    ratio_of_medians: float
    boot_s: float


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def measure(conn: libvirt.virConnect, config: Config, workdir: Path, home: Path) -> Outcome:
    disks = [DiskRequest(config.size)] * config.disks
    with running_instance(conn, disks=disks, workload=config.workload, workdir=workdir, name_prefix="ffbench") as inst:
        inst.wait_for_progress(timeout_s=60)
        with Freezeframe.open(Settings(home=home)) as ff:
            floors, windows = [], []
            for _ in range(config.samples):
                started = time.monotonic()
                inst.dom.fsFreeze()
                inst.dom.fsThaw()
                floors.append((time.monotonic() - started) * 1000)
                result = ff.snapshot(SnapshotRequest(inst.name, Consistency.FILESYSTEM, require=True))
                assert result.freeze_window_ms is not None
                windows.append(result.freeze_window_ms)
                ff.repository.remove(result.id)
                time.sleep(0.2)
    floor_median, window_median = statistics.median(floors), statistics.median(windows)
    return Outcome(
        label=config.label, disks=config.disks, size_bytes=config.size, workload=config.workload,
        samples=config.samples, floor_ms=floors, window_ms=windows,
        floor_median_ms=floor_median, floor_p95_ms=p95(floors),
        window_median_ms=window_median, window_p95_ms=p95(windows),
        ratio_of_medians=window_median / floor_median, boot_s=inst.boot_seconds,
    )  # fmt: skip


def plot(outcomes: list[Outcome], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [o.label for o in outcomes]
    x = range(len(outcomes))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(outcomes)), 4.5))
    width = 0.38
    floor = [o.floor_median_ms for o in outcomes]
    window = [o.window_median_ms for o in outcomes]
    floor_err = [[0] * len(outcomes), [o.floor_p95_ms - o.floor_median_ms for o in outcomes]]
    window_err = [[0] * len(outcomes), [o.window_p95_ms - o.window_median_ms for o in outcomes]]
    ax.bar([i - width / 2 for i in x], floor, width, yerr=floor_err, capsize=3, label="floor: bare freeze+thaw")
    ax.bar([i + width / 2 for i in x], window, width, yerr=window_err, capsize=3, label="freezeframe window")
    for i, o in enumerate(outcomes):
        ax.text(i + width / 2, o.window_median_ms, f"{o.ratio_of_medians:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels, rotation=15)
    ax.set_ylabel("ms (median, whisker to p95)")
    ax.set_title("Filesystem-level freeze window vs floor (TCG guest under write load)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: one small config, 2 samples")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    if args.quick:
        configs = [Config("3x64 MiB ledger", 3, 64 * MiB, "ledger", 2)]
    else:
        n = args.samples
        configs = [
            Config("3x64 MiB ledger", 3, 64 * MiB, "ledger", n),
            Config("1x64 MiB", 1, 64 * MiB, "heartbeat", n),
            Config("3x64 MiB", 3, 64 * MiB, "heartbeat", n),
            Config("8x64 MiB", 8, 64 * MiB, "heartbeat", n),
            Config("3x1 GiB", 3, GiB, "heartbeat", n),
            Config("3x4 GiB", 3, 4 * GiB, "heartbeat", n),
        ]
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="ffbench-")) if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_guest()
    conn = libvirt.open(Settings.from_env().libvirt_uri)
    outcomes = []
    try:
        with tempfile.TemporaryDirectory(prefix="ffbench-window-") as tmp:
            for i, config in enumerate(configs):
                outcome = measure(conn, config, Path(tmp) / f"vm{i}", Path(tmp) / "home")
                outcomes.append(outcome)
                print(
                    f"{config.label:>18}: window median {outcome.window_median_ms:7.1f} ms p95 "
                    f"{outcome.window_p95_ms:7.1f} | floor median {outcome.floor_median_ms:7.1f} ms p95 "
                    f"{outcome.floor_p95_ms:7.1f} | ratio {outcome.ratio_of_medians:.2f}",
                    flush=True,
                )
    finally:
        conn.close()
    report = {
        "benchmark": "window",
        "when": datetime.now(UTC).isoformat(),
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform(), "accel": "tcg"},
        "outcomes": [asdict(o) for o in outcomes],
    }
    (out_dir / "window.json").write_text(json.dumps(report, indent=2))
    plot(outcomes, out_dir / "window.png")
    print(f"wrote {out_dir / 'window.json'} and {out_dir / 'window.png'}")


if __name__ == "__main__":
    main()
