"""Instance-level snapshots of real running guests (libvirt + QEMU under TCG, real qemu-guest-agent).

The ledger workload writes record i to a journal on vdb, then i to a state file on vdc, as fast as it can: any
point-in-time image of both satisfies state <= last_journal <= state + 1. Every set taken here is checked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from freezeframe import wiring
from freezeframe.config import Settings
from freezeframe.errors import ConsistencyUnavailable, FreezeWindowExceeded, RepositoryFull
from freezeframe.flow import FlowSettings, SnapshotRequest
from freezeframe.model import Consistency, InstanceState, SetStatus, SnapshotSet
from freezeframe.service import Freezeframe
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance
from freezeframe.testbed.ledger import check_ledger
from freezeframe.testbed.naive import naive_capture

pytestmark = pytest.mark.vm

MiB = 1 << 20
SETS_PER_LEVEL = int(os.environ.get("FREEZEFRAME_TEST_SETS_PER_LEVEL", "30"))
LEDGER_DISKS = [DiskRequest(64 * MiB), DiskRequest(64 * MiB), DiskRequest(64 * MiB)]


@pytest.fixture(scope="module")
def ledger_guest(
    libvirt_conn: Any, guest_image: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestInstance]:
    workdir = tmp_path_factory.mktemp("ledger-guest")
    with running_instance(
        libvirt_conn, disks=LEDGER_DISKS, workload="ledger", workdir=workdir, guest=guest_image
    ) as inst:
        yield inst


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Freezeframe]:
    with wiring.open_service(Settings(home=tmp_path / "ffhome", agent_timeout_s=3)) as ff:
        yield ff


def _member(snapshot_set: SnapshotSet, target: str) -> Path:
    return Path(next(m.path for m in snapshot_set.members if m.target == target))


def _assert_guest_alive(inst: TestInstance) -> None:
    """Running, thawed, and the workload still makes progress."""
    assert inst.dom.state()[0] == 1, "guest is not running"
    assert inst.agent({"execute": "guest-fsfreeze-status"})["return"] == "thawed"
    before = inst.progress()
    inst.wait_for_progress(after=before, timeout_s=20)


def _cli(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {**os.environ, "FREEZEFRAME_HOME": str(home), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "freezeframe.cli", *args], env=full_env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def _wait_frozen(inst: TestInstance, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if inst.agent({"execute": "guest-fsfreeze-status"})["return"] == "frozen":
            return
        time.sleep(0.05)
    raise AssertionError("guest never became frozen")


@pytest.mark.parametrize("level", list(Consistency))
def test_every_set_passes_the_ledger_check(
    level: Consistency, ledger_guest: TestInstance, service: Freezeframe
) -> None:
    windows = []
    for _ in range(SETS_PER_LEVEL):
        result = service.snapshot(SnapshotRequest(ledger_guest.name, level, require=True))
        assert result.status is SetStatus.AVAILABLE
        assert result.achieved is level
        assert [m.target for m in result.members] == ["vda", "vdb", "vdc"]
        assert all(m.metadata["freezeframe.set_uuid"] == result.id for m in result.members)
        verdict = check_ledger(_member(result, "vdb"), _member(result, "vdc"))
        assert verdict.ok, f"{level} set {result.id}: {verdict.reason}"
        assert verdict.state is not None and verdict.state > 0
        if level is Consistency.APPLICATION:
            # The application's hook stopped the writer at a complete record and logged it on its own disk.
            assert verdict.state == verdict.last_journal, verdict
            assert verdict.app_events and verdict.app_events[-1] == f"freeze i={verdict.state}", verdict.app_events
        if level is Consistency.CRASH:
            assert result.freeze_window_ms is None
        else:
            assert result.freeze_window_ms is not None
            windows.append(result.freeze_window_ms)
        service.repository.remove(result.id)
    if windows:
        print(f"{level}: freeze window median {sorted(windows)[len(windows) // 2]:.1f} ms over {len(windows)} sets")
    # No overlays left on the instance: it still runs on its original disk files.
    sources = [d.source_path for d in service.instance(ledger_guest.name).hardware.disks]
    assert sources == [str(d.path) for d in ledger_guest.disks]
    _assert_guest_alive(ledger_guest)


def test_naive_one_disk_at_a_time_capture_breaks_the_ledger(ledger_guest: TestInstance, tmp_path: Path) -> None:
    """The check above is shown able to fail: single-volume snapshots taken one after another."""
    violations = 0
    for i in range(3):
        journal, state = tmp_path / f"j{i}.qcow2", tmp_path / f"s{i}.qcow2"
        naive_capture(ledger_guest.dom, [("vdb", journal), ("vdc", state)], gap_s=1.0)
        verdict = check_ledger(journal, state)
        violations += not verdict.ok
        if not verdict.ok:
            assert verdict.state is not None and verdict.last_journal is not None
            assert verdict.state > verdict.last_journal + 1, verdict
    assert violations == 3


def test_shown_in_the_cli_as_json(ledger_guest: TestInstance, tmp_path: Path) -> None:
    home = tmp_path / "cli-home"
    proc = _cli(home, "snapshot", ledger_guest.name, "--json", "--meta", "owner=qa")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    created = json.loads(stdout)
    proc = _cli(home, "show", created["id"][:8], "--json")
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    shown = json.loads(stdout)
    for key in ("id", "name", "status", "instance", "consistency", "freeze_window_ms", "pause_window_ms",
                "created_at", "members"):  # fmt: skip
        assert key in shown
    assert shown["status"] == "available" and shown["instance"]["uuid"] == ledger_guest.uuid
    assert shown["consistency"] == {"requested": "filesystem", "achieved": "filesystem", "reason": None}
    assert shown["metadata"] == {"owner": "qa"}
    assert {m["target"] for m in shown["members"]} == {"vda", "vdb", "vdc"}
    for member in shown["members"]:
        assert member["metadata"]["freezeframe.set_uuid"] == shown["id"]
        assert len(member["sha256"]) == 64 and Path(member["path"]).is_file()
        assert member["size"] == 64 * MiB and member["format"] == "qcow2"
    proc = _cli(home, "list", "--instance", ledger_guest.name, "--json")
    stdout, _ = proc.communicate(timeout=60)
    assert [s["id"] for s in json.loads(stdout)] == [shown["id"]]
    proc = _cli(home, "snapshot", "no-such-instance-xyz")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "no instance named" in stderr and "Traceback" not in stderr


def test_sigkill_inside_the_window_is_repaired(ledger_guest: TestInstance, tmp_path: Path) -> None:
    home = tmp_path / "kill-home"
    proc = _cli(home, "snapshot", ledger_guest.name, env={"FREEZEFRAME_FAULT_HOLD_IN_WINDOW_S": "60",
                                                          "FREEZEFRAME_FREEZE_CAP_S": "120"})  # fmt: skip
    try:
        _wait_frozen(ledger_guest)
    finally:
        proc.kill()
        proc.wait()
    assert ledger_guest.agent({"execute": "guest-fsfreeze-status"})["return"] == "frozen"
    repair = _cli(home, "repair")
    stdout, stderr = repair.communicate(timeout=120)
    assert repair.returncode == 0, stderr
    assert "thawed" in stdout and "failed" in stdout
    _assert_guest_alive(ledger_guest)
    with wiring.open_service(Settings(home=home)) as ff:
        (failed,) = ff.list_sets()
        assert failed.status is SetStatus.FAILED and "interrupted" in (failed.error or "")
        assert not ff.repository.exists(failed.id)
        assert ff.journal.pending() == []


def test_sigkill_is_repaired_by_the_next_snapshot(ledger_guest: TestInstance, tmp_path: Path) -> None:
    home = tmp_path / "kill2-home"
    proc = _cli(home, "snapshot", ledger_guest.name, "--pause",
                env={"FREEZEFRAME_FAULT_HOLD_IN_WINDOW_S": "60", "FREEZEFRAME_FREEZE_CAP_S": "120"})  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while ledger_guest.dom.state()[0] != 3 and time.monotonic() < deadline:  # paused inside the freeze
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert ledger_guest.dom.state()[0] == 3
    with wiring.open_service(Settings(home=home)) as ff:
        result = ff.snapshot(SnapshotRequest(ledger_guest.name))
        assert result.status is SetStatus.AVAILABLE
        assert check_ledger(_member(result, "vdb"), _member(result, "vdc")).ok
        statuses = sorted(str(s.status) for s in ff.list_sets())
        assert statuses == ["available", "failed"]
    _assert_guest_alive(ledger_guest)


def test_sigterm_inside_the_window_thaws_then_fails_the_set(ledger_guest: TestInstance, tmp_path: Path) -> None:
    home = tmp_path / "term-home"
    proc = _cli(home, "snapshot", ledger_guest.name, env={"FREEZEFRAME_FAULT_HOLD_IN_WINDOW_S": "3"})
    _wait_frozen(ledger_guest)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    _assert_guest_alive(ledger_guest)
    with wiring.open_service(Settings(home=home)) as ff:
        (failed,) = ff.list_sets()
        assert failed.status is SetStatus.FAILED and not ff.repository.exists(failed.id)
        assert ff.journal.pending() == []


def test_watchdog_caps_the_window(ledger_guest: TestInstance, service: Freezeframe) -> None:
    flow = service.flow()
    flow.settings = FlowSettings(freeze_cap_s=1.0, hold_in_window_s=6.0)
    seen: list[str] = []
    running = threading.Event()
    running.set()

    def watch() -> None:
        while running.is_set():
            seen.append(ledger_guest.agent({"execute": "guest-fsfreeze-status"})["return"])
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(FreezeWindowExceeded):
            flow.snapshot(SnapshotRequest(ledger_guest.name))
    finally:
        running.clear()
        watcher.join()
    # thawed at the cap, while the flow itself was still held inside the window
    assert "frozen" in seen
    after_freeze = seen[seen.index("frozen") :]
    assert after_freeze.count("thawed") >= 15, f"not thawed long before the held flow woke up: {seen}"
    _assert_guest_alive(ledger_guest)
    (failed,) = service.list_sets()
    assert failed.status is SetStatus.FAILED and not service.repository.exists(failed.id)


def test_two_snapshots_at_once_one_is_refused(ledger_guest: TestInstance, tmp_path: Path) -> None:
    home = tmp_path / "busy-home"
    env = {"FREEZEFRAME_FAULT_HOLD_IN_WINDOW_S": "8"}
    first = _cli(home, "snapshot", ledger_guest.name, env=env)
    _wait_frozen(ledger_guest)
    second = _cli(home, "snapshot", ledger_guest.name)
    _, err2 = second.communicate(timeout=60)
    _, err1 = first.communicate(timeout=120)
    assert first.returncode == 0, err1
    assert second.returncode == 4 and "in progress" in err2
    with wiring.open_service(Settings(home=home)) as ff:
        assert [s.status for s in ff.list_sets()] == [SetStatus.AVAILABLE]
    _assert_guest_alive(ledger_guest)


def test_repository_full_during_copy(ledger_guest: TestInstance, tmp_path: Path) -> None:
    mountpoint = tmp_path / "small-repo"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mountpoint)], check=True)
    try:
        os.environ["FREEZEFRAME_REPOSITORY"] = str(mountpoint)
        with wiring.open_service(Settings(home=tmp_path / "full-home")) as ff:
            flow = ff.flow()
            flow.settings = FlowSettings(hold_in_window_s=3)

            filled: list[int] = []

            def fill_once_targets_exist() -> None:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not any(mountpoint.glob("*/vdc.qcow2")):
                    time.sleep(0.01)
                chunk = b"\xff" * (1 << 20)
                with (mountpoint / "filler").open("wb", buffering=0) as handle:
                    try:
                        while handle.write(chunk):
                            pass
                    except OSError:
                        filled.append(handle.tell())

            filler_thread = threading.Thread(target=fill_once_targets_exist)
            filler_thread.start()
            with pytest.raises(RepositoryFull, match="filled up during the copy"):
                flow.snapshot(SnapshotRequest(ledger_guest.name))
            filler_thread.join()
            assert filled, "the filler never reached ENOSPC"
            (failed,) = ff.list_sets()
            assert failed.status is SetStatus.FAILED and failed.members == []
            assert [p.name for p in mountpoint.iterdir()] == ["filler"], "partial member files left behind"
            assert ff.journal.pending() == []
    finally:
        os.environ.pop("FREEZEFRAME_REPOSITORY", None)
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    _assert_guest_alive(ledger_guest)


def test_agent_hanging_in_its_freeze_hook_is_thawed(ledger_guest: TestInstance, service: Freezeframe) -> None:
    """The app hook sleeps past the agent timeout: the freeze lands late, and we still thaw it."""
    code, _, err = ledger_guest.guest_exec(["/bin/sh", "-c", "echo 6 > /run/ff-hook-delay"])
    assert code == 0, err
    try:
        result = service.snapshot(SnapshotRequest(ledger_guest.name, Consistency.APPLICATION))
    finally:
        ledger_guest.guest_exec(["/bin/rm", "-f", "/run/ff-hook-delay"], timeout_s=60)
    assert result.status is SetStatus.AVAILABLE
    assert result.achieved is Consistency.CRASH and "freeze failed" in (result.reason or "")
    assert check_ledger(_member(result, "vdb"), _member(result, "vdc")).ok
    _assert_guest_alive(ledger_guest)
    ledger_guest.guest_exec(["/bin/sh", "-c", "echo 6 > /run/ff-hook-delay"])
    try:
        with pytest.raises(ConsistencyUnavailable):
            service.snapshot(SnapshotRequest(ledger_guest.name, Consistency.FILESYSTEM, require=True))
    finally:
        ledger_guest.guest_exec(["/bin/rm", "-f", "/run/ff-hook-delay"], timeout_s=60)
    _assert_guest_alive(ledger_guest)


def test_paused_instance_is_captured_and_stays_paused(ledger_guest: TestInstance, service: Freezeframe) -> None:
    ledger_guest.dom.suspend()
    try:
        with pytest.raises(ConsistencyUnavailable, match="paused"):
            service.snapshot(SnapshotRequest(ledger_guest.name, require=True))
        assert service.list_sets() == []
        result = service.snapshot(SnapshotRequest(ledger_guest.name))
        assert ledger_guest.dom.state()[0] == 3, "a paused instance must stay paused"
        assert result.achieved is Consistency.CRASH and "paused" in (result.reason or "")
        assert result.instance_state is InstanceState.PAUSED
        assert check_ledger(_member(result, "vdb"), _member(result, "vdc")).ok
    finally:
        ledger_guest.dom.resume()
    _assert_guest_alive(ledger_guest)


def test_agent_missing_falls_back_or_fails_with_require(libvirt_conn: Any, guest_image: Any, tmp_path: Path,
                                                        service: Freezeframe) -> None:  # fmt: skip
    with running_instance(libvirt_conn, disks=LEDGER_DISKS, workload="ledger", workdir=tmp_path / "noagent",
                          guest=guest_image) as inst:  # fmt: skip
        code, _, _ = inst.guest_exec(["/bin/sh", "-c", "(sleep 1; killall qemu-ga) >/dev/null 2>&1 &"])
        assert code == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                inst.agent({"execute": "guest-ping"}, timeout_s=2)
            except Exception:  # noqa: BLE001 - any failure means the agent is gone, which is what we wait for
                break
            time.sleep(0.5)
        xml_before = inst.dom.XMLDesc(0)
        with pytest.raises(ConsistencyUnavailable, match="agent"):
            service.snapshot(SnapshotRequest(inst.name, Consistency.FILESYSTEM, require=True))
        assert inst.dom.XMLDesc(0) == xml_before and inst.dom.state()[0] == 1
        assert service.list_sets() == []
        result = service.snapshot(SnapshotRequest(inst.name, Consistency.FILESYSTEM))
        assert result.achieved is Consistency.CRASH and "agent" in (result.reason or "")
        assert check_ledger(_member(result, "vdb"), _member(result, "vdc")).ok
        before = inst.progress()
        inst.wait_for_progress(after=before, timeout_s=20)
        # shut off (destroyed: not a clean shutdown) is copied as is and recorded as crash
        inst.dom.destroy()
        off = service.snapshot(SnapshotRequest(inst.name))
        assert off.status is SetStatus.AVAILABLE and off.achieved is Consistency.CRASH
        assert off.instance_state is InstanceState.SHUTOFF
        assert check_ledger(_member(off, "vdb"), _member(off, "vdc")).ok


def test_shut_off_instance_is_captured_as_is(libvirt_conn: Any, guest_image: Any, tmp_path: Path,
                                             service: Freezeframe) -> None:  # fmt: skip
    with running_instance(libvirt_conn, disks=LEDGER_DISKS, workload="ledger", workdir=tmp_path / "off",
                          guest=guest_image) as inst:  # fmt: skip
        assert inst.shutdown(timeout_s=60)
        result = service.snapshot(SnapshotRequest(inst.name, Consistency.APPLICATION))
        assert result.status is SetStatus.AVAILABLE
        assert result.achieved is Consistency.APPLICATION and "shut off" in (result.reason or "")
        verdict = check_ledger(_member(result, "vdb"), _member(result, "vdc"))
        assert verdict.ok and verdict.state is not None and verdict.state > 0


def test_no_wait_returns_after_the_window_and_completes_in_the_background(
    ledger_guest: TestInstance, tmp_path: Path
) -> None:
    home = tmp_path / "nowait-home"
    proc = _cli(home, "snapshot", ledger_guest.name, "--no-wait", "--json")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    started = json.loads(stdout)
    assert started["status"] == "creating" and started["consistency"]["achieved"] == "filesystem"
    assert started["freeze_window_ms"] is not None
    deadline = time.monotonic() + 120
    with wiring.open_service(Settings(home=home)) as ff:
        while ff.show(started["id"]).status is SetStatus.CREATING and time.monotonic() < deadline:
            time.sleep(0.2)
        done = ff.show(started["id"])
        assert done.status is SetStatus.AVAILABLE, done.error
        assert check_ledger(_member(done, "vdb"), _member(done, "vdc")).ok
        deadline = time.monotonic() + 30
        while ff.journal.pending() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ff.journal.pending() == []
    _assert_guest_alive(ledger_guest)
