"""The benchmarks keep working: ``bench/run_all.py --quick`` writes every JSON and PNG, and the report renders.

Only structure is checked, never speed (the machine running the tests is busy); but a freezeframe set that
fails the ledger check is a bug wherever it shows up, so that is asserted too.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMON_KEYS = {"benchmark", "mode", "when", "duration_s", "command", "machine", "load_average_at_end"}
EXPECTED_KEYS = {
    "consistency": {"n", "naive_gap_s", "workload", "methods"},
    "window": {"outcomes", "by_disk_count", "by_disk_size"},
    "throughput": {"data_bytes", "storage", "seconds", "capture", "export"},
    "concurrency": {"instances", "per_instance", "alone", "together", "ratio_of_medians", "violations", "checked"},
    "startup": {"runs", "target_s", "src", "wall", "imports"},
    "incremental": {"sizes", "rows", "summary", "fulls", "empty_incrementals", "throughput", "virtnbdbackup"},
    "catalog": {"backends", "page_size", "goal_ms", "repeat", "verdict"},
    "rbd_window": {"testbed_ceph_up_s", "by_rbd_disks", "restore"},
}
METHODS = {"naive", "naive_gap", "diy_snapshot", "diy_backup", "ff_crash", "ff_filesystem", "ff_application"}
METHOD_KEYS = {"label", "checked", "violations", "errors", "window_ms", "call_s", "total_s", "samples"}
OUTCOME_KEYS = {"label", "floor_median_ms", "window_median_ms", "ratio_of_medians", "steps_median_ms", "stall"}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-quick")
    # Two at a time keeps the smoke run near three minutes; --quick numbers are not measurements anyway.
    argv = [sys.executable, str(BENCH / "run_all.py"), "--quick", "--jobs", "2", "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=780)
    except subprocess.TimeoutExpired:
        # SIGINT lets every benchmark remove its guests and files; only then give up on it.
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"run_all --quick did not finish in 13 minutes:\n{output[-4000:]}")
    assert proc.returncode == 0, f"run_all --quick failed:\n{output[-6000:]}"
    return out


def _load(out: Path, name: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    return report


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300, (path, pixels.shape)
    assert float(pixels[..., :3].std()) > 0.01, f"{path} is blank"


@pytest.mark.vm
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_quick_run_writes_json_and_png(quick_results: Path, name: str) -> None:
    report = _load(quick_results, name)
    assert COMMON_KEYS | EXPECTED_KEYS[name] <= report.keys(), sorted(report.keys())
    assert report["benchmark"] == name and report["mode"] == "quick"
    assert report["machine"]["accel"] == "tcg" and report["machine"]["cpus"]
    _assert_png(quick_results / f"{name}.png")


@pytest.mark.vm
@pytest.mark.timeout(1200)
def test_quick_run_contents(quick_results: Path) -> None:
    status = json.loads((quick_results / "run_all.json").read_text())
    assert {n: s["returncode"] for n, s in status["benchmarks"].items()} == dict.fromkeys(EXPECTED_KEYS, 0)

    methods = _load(quick_results, "consistency")["methods"]
    assert methods.keys() == METHODS
    for key, method in methods.items():
        assert method.keys() >= METHOD_KEYS, (key, sorted(method))
        assert method["checked"] + method["errors"] == len(method["samples"]) > 0, (key, method["error_examples"])
    for key in ("ff_crash", "ff_filesystem", "ff_application"):
        assert methods[key]["errors"] == 0, methods[key]["error_examples"]
        assert methods[key]["violations"] == 0, methods[key]["violation_examples"]
    assert methods["ff_filesystem"]["window_ms"]["median"] is not None

    outcomes = _load(quick_results, "window")["outcomes"]
    assert outcomes and all(o.keys() >= OUTCOME_KEYS for o in outcomes)
    heartbeat = [o for o in outcomes if o["workload"] == "heartbeat"]
    assert heartbeat and all(o["stall"]["snapshot"]["n"] > 0 for o in heartbeat)
    assert all(o["steps_median_ms"].get("freeze") and o["steps_median_ms"].get("backup_begin") for o in outcomes)

    throughput = _load(quick_results, "throughput")
    assert throughput["capture"]["copy_mib_s"] and throughput["capture"]["convert_mib_s"]
    assert throughput["storage"]["read_mib_s"] and throughput["storage"]["copy_mib_s"]
    if throughput["export"]["available"]:
        assert throughput["export"]["copy"]["mib_s"] and throughput["export"]["vmdk"]["mib_s"]
    else:
        assert "write_ova" in throughput["export"]["why"]

    concurrency = _load(quick_results, "concurrency")
    assert concurrency["errors"] == 0 and concurrency["violations"] == 0 and concurrency["checked"] > 0
    assert all(r["together"]["n"] > 0 and r["alone"]["n"] > 0 for r in concurrency["per_instance"])


@pytest.mark.vm
@pytest.mark.timeout(1200)
def test_report_renders_every_section(quick_results: Path, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    shutil.copyfile(ROOT / "docs" / "benchmarks.md", doc)
    argv = [sys.executable, str(BENCH / "report.py"), "--results", str(quick_results), "--doc", str(doc)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    text = doc.read_text()
    assert "No results yet" not in text
    assert "Smoke run (`--quick`)" in text
    for name in EXPECTED_KEYS:  # what run_all ran; s3_copy, group_window and hosts_load run on their own
        assert f"_No `{name}.json`" not in text and f"![{name}](" in text, name
