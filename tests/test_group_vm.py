"""Consistency groups on real guests: the two-instance ledger (testbed/linked_ledger.py) judges every capture.

Two guests joined by a virtio-serial link keep ``B.last <= A.last <= B.last + 1`` at every instant. Separate
snapshots of A then B must break it (the oracle can fail); group sets at every level must not. Then the faults:
a hung agent in one member, a killed freezeframe inside the group window, an instance shut down between prepare
and freeze. The two guests are booted once for the module.
"""

from __future__ import annotations

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
from freezeframe.adapters.group_records import SqlGroups
from freezeframe.config import Settings
from freezeframe.errors import ConsistencyUnavailable, FreezeframeError
from freezeframe.flow import SnapshotRequest
from freezeframe.flow_steps import PreparedMember
from freezeframe.group_flow import GroupFlow, GroupRequest
from freezeframe.model import Consistency, SetStatus, SnapshotSet
from freezeframe.ops.groups import GroupSetView
from freezeframe.service import Freezeframe
from freezeframe.testbed.instance import TestInstance
from freezeframe.testbed.linked_ledger import LinkedPair, LinkVerdict, check_link, linked_pair, wait_for_records

pytestmark = pytest.mark.vm
SETS_PER_LEVEL = 30
NAIVE_PAIRS = 5


@pytest.fixture(scope="module")
def pair(libvirt_conn: Any, guest_image: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LinkedPair]:
    with linked_pair(libvirt_conn, workdir=tmp_path_factory.mktemp("linked"), guest=guest_image) as linked:
        yield linked


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("group-home")


@pytest.fixture(scope="module")
def ff(home: Path, pair: LinkedPair) -> Iterator[Freezeframe]:
    with wiring.open_service(Settings(home=home, agent_timeout_s=3)) as service:
        service.groups.create("pair", [pair.sender.name, pair.receiver.name])
        yield service


def _vda(snapshot_set: SnapshotSet) -> Path:
    return Path(next(m.path for m in snapshot_set.members if m.target == "vda"))


def _verdict(view: GroupSetView, pair: LinkedPair, tmp: Path) -> LinkVerdict:
    by_name = {s.instance_name: s for s in view.sets}
    return check_link(_vda(by_name[pair.sender.name]), _vda(by_name[pair.receiver.name]), tmp_dir=tmp)


def _thawed_and_running(inst: TestInstance) -> bool:
    return bool(inst.dom.state()[0] == 1 and inst.agent({"execute": "guest-fsfreeze-status"})["return"] == "thawed")


def _assert_released(pair: LinkedPair) -> None:
    assert _thawed_and_running(pair.sender) and _thawed_and_running(pair.receiver)
    wait_for_records(pair, 2)


def _assert_nothing_left(ff: Freezeframe, before: set[str]) -> None:
    new_sets = [s for s in ff.list_sets() if s.id not in before]
    assert new_sets and all(s.status is SetStatus.FAILED and not ff.repository.exists(s.id) for s in new_sets)
    assert ff.journal.pending() == []
    assert ff.groups.list_sets()[0].status is SetStatus.FAILED


def test_separate_snapshots_break_the_ledger_and_group_sets_never_do(
    pair: LinkedPair, ff: Freezeframe, tmp_path: Path
) -> None:
    naive = []
    for _ in range(NAIVE_PAIRS):
        a = ff.snapshot(SnapshotRequest(pair.sender.name, Consistency.FILESYSTEM))
        b = ff.snapshot(SnapshotRequest(pair.receiver.name, Consistency.FILESYSTEM))
        naive.append(check_link(_vda(a), _vda(b), tmp_dir=tmp_path))
    broken = [v for v in naive if not v.ok]
    print(f"naive separate snapshots: {len(broken)}/{len(naive)} violate the two-instance ledger")
    assert broken, f"the oracle never failed on separate snapshots: {[v.reason for v in naive]}"
    for level in Consistency:
        verdicts, windows = [], []
        for _ in range(SETS_PER_LEVEL):
            view = ff.groups.snapshot(GroupRequest("pair", level))
            assert view.group_set.status is SetStatus.AVAILABLE and view.group_set.achieved is level
            verdicts.append(_verdict(view, pair, tmp_path))
            windows.append(view.group_set.window_ms or 0.0)
        bad = [v.reason for v in verdicts if not v.ok]
        progress = sorted({v.sender_last for v in verdicts})
        print(f"{level}: {len(verdicts)} group sets, {len(bad)} violations, sender at {progress[0]}..{progress[-1]}, "
              f"group window median {sorted(windows)[len(windows) // 2]:.0f} ms")  # fmt: skip
        assert bad == [], f"{level}: group sets broke the ledger: {bad[:3]}"
        assert len(progress) > SETS_PER_LEVEL // 2, "the ledger barely moved between group sets: a weak test"
    _assert_released(pair)


def test_a_member_whose_freeze_hook_hangs_falls_back_and_stays_consistent(
    pair: LinkedPair, ff: Freezeframe, tmp_path: Path
) -> None:
    """The receiver's fsfreeze hook sleeps past the agent timeout: that member falls back to crash level (paused),
    the sender stays frozen meanwhile, and the cut is still common to both."""
    receiver = pair.receiver
    code, _, err = receiver.guest_exec(["/bin/sh", "-c", "echo 6 > /run/ff-hook-delay"])
    assert code == 0, err
    before = {s.id for s in ff.list_sets()}
    try:
        view = ff.groups.snapshot(GroupRequest("pair", Consistency.FILESYSTEM))
        with pytest.raises(ConsistencyUnavailable, match=receiver.name):
            ff.groups.snapshot(GroupRequest("pair", Consistency.FILESYSTEM, require=True))
    finally:
        receiver.guest_exec(["/bin/rm", "-f", "/run/ff-hook-delay"], timeout_s=60)
    by_name = {s.instance_name: s for s in view.sets}
    assert by_name[receiver.name].achieved is Consistency.CRASH
    assert "freeze failed" in (by_name[receiver.name].reason or "")
    assert by_name[pair.sender.name].achieved is Consistency.FILESYSTEM
    assert view.group_set.achieved is Consistency.CRASH
    assert _verdict(view, pair, tmp_path).ok
    failed = [s for s in ff.list_sets() if s.id not in before and s.status is SetStatus.FAILED]
    assert len(failed) == 2 and not any(ff.repository.exists(s.id) for s in failed)
    _assert_released(pair)


def _frozen_spans(inst: TestInstance, stop: threading.Event, spans: list[float]) -> None:
    """How long the guest stayed frozen, as its agent reports it every 0.1 s."""
    since: float | None = None
    while not stop.is_set():
        try:
            frozen = inst.agent({"execute": "guest-fsfreeze-status"}, timeout_s=2)["return"] == "frozen"
        except Exception:  # noqa: BLE001 - a busy agent is not an answer; keep polling
            continue
        now = time.monotonic()
        if frozen and since is None:
            since = now
        if not frozen and since is not None:
            spans.append(now - since)
            since = None
        time.sleep(0.1)


def test_the_group_watchdog_thaws_every_guest_at_the_cap(pair: LinkedPair, home: Path) -> None:
    """The receiver's hook hangs for 12 s; with a 4 s cap the sender must be thawed at the cap, not after 12 s."""
    receiver, cap = pair.receiver, 4.0
    code, _, err = receiver.guest_exec(["/bin/sh", "-c", "echo 12 > /run/ff-hook-delay"])
    assert code == 0, err
    spans: list[float] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_frozen_spans, args=(pair.sender, stop, spans))
    watcher.start()
    try:
        with wiring.open_service(Settings(home=home, agent_timeout_s=3, freeze_cap_s=cap)) as ff:
            before = {s.id for s in ff.list_sets()}
            with pytest.raises(FreezeframeError, match="cap"):
                ff.groups.snapshot(GroupRequest("pair", Consistency.FILESYSTEM))
            _assert_nothing_left(ff, before)
    finally:
        stop.set()
        watcher.join()
        receiver.guest_exec(["/bin/rm", "-f", "/run/ff-hook-delay"], timeout_s=60)
    print(f"sender frozen for {spans} s with a {cap} s cap")
    assert spans and max(spans) < cap + 1.5, f"the sender stayed frozen {max(spans or [0]):.1f} s"
    _assert_released(pair)


def _cli(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {**os.environ, "FREEZEFRAME_HOME": str(home), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "freezeframe.cli", *args], env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def test_a_killed_freezeframe_inside_the_group_window_is_repaired(pair: LinkedPair, home: Path) -> None:
    hold = {"FREEZEFRAME_FAULT_HOLD_IN_WINDOW_S": "60", "FREEZEFRAME_FREEZE_CAP_S": "120"}
    proc = _cli(home, "snapshot", "--group", "pair", env=hold)
    try:
        deadline = time.monotonic() + 60
        while not all(i.agent({"execute": "guest-fsfreeze-status"})["return"] == "frozen" for i in
                      (pair.sender, pair.receiver)):  # fmt: skip
            assert time.monotonic() < deadline, "the group window never froze both guests"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    repair = _cli(home, "repair")
    out, err = repair.communicate(timeout=120)
    assert repair.returncode == 0, err
    assert out.count("thawed") == 2 and "group set" in out, out
    with wiring.open_service(Settings(home=home)) as ff:
        group_set = ff.groups.list_sets()[0]
        assert group_set.status is SetStatus.FAILED and "interrupted" in (group_set.error or "")
        view = ff.groups.show_set(group_set.id)
        assert len(view.sets) == 2 and all(s.status is SetStatus.FAILED for s in view.sets)
        assert not any(ff.repository.exists(s.id) for s in view.sets) and ff.journal.pending() == []
    _assert_released(pair)


def test_restore_a_group_set_as_new_instances(pair: LinkedPair, ff: Freezeframe, tmp_path: Path) -> None:
    view = ff.groups.snapshot(GroupRequest("pair", Consistency.CRASH, name="to-restore"))
    results = ff.groups.restore("to-restore", "r-")
    try:
        assert sorted(r.name for r in results) == sorted(f"r-{i.name}" for i in (pair.sender, pair.receiver))
        assert {r.set_id for r in results} == {s.id for s in view.sets}
        assert all(len(r.disks) == 1 and Path(r.disks[0].path).exists() for r in results)
    finally:
        for r in results:
            ff.lifecycle.discard(r.name)
    ff.groups.delete_set(view.group_set.id)
    assert all(s.id not in {x.id for x in ff.list_sets()} for s in view.sets)


def test_a_group_set_exported_as_one_ova_comes_back_with_its_common_cut(
    pair: LinkedPair, ff: Freezeframe, guest_image: Any, tmp_path: Path
) -> None:
    """Export of a live group set (one VirtualSystemCollection OVA), import --as-prefix: the imported disks hold
    the same ledger cut as the group set's own images, and it is consistent."""
    view = ff.groups.snapshot(GroupRequest("pair", Consistency.FILESYSTEM, name="to-export"))
    portable = wiring.portable(ff, boot_dirs=[guest_image.kernel.parent])
    portable.export_group_set("to-export", tmp_path / "pair.ova", disk_format="vmdk", ovf_version=2)
    imported = portable.import_collection(tmp_path / "pair.ova", "ffx-")
    try:
        vda = {r.name: Path(next(d.path for d in r.disks if d.target == "vda")) for r in imported}
        after = check_link(vda[f"ffx-{pair.sender.name}"], vda[f"ffx-{pair.receiver.name}"], tmp_dir=tmp_path)
        before = _verdict(view, pair, tmp_path)
        assert after.ok and (after.sender_last, after.receiver_last) == (before.sender_last, before.receiver_last)
    finally:
        for r in imported:
            ff.lifecycle.discard(r.name)
    ff.groups.delete_set(view.group_set.id)


def test_an_instance_shut_down_between_prepare_and_freeze(pair: LinkedPair, ff: Freezeframe) -> None:
    """Last in the module: the receiver is destroyed after every member was prepared, before the window."""
    flow = ff.flow()
    group_flow = GroupFlow(flow, SqlGroups(ff.catalog))
    prepare_targets = flow.prepare_targets
    prepared: list[str] = []

    def then_stop_the_receiver(member: PreparedMember) -> None:
        prepare_targets(member)
        prepared.append(member.instance.name)
        if len(prepared) == 2:
            pair.receiver.dom.destroy()

    flow.prepare_targets = then_stop_the_receiver  # type: ignore[method-assign]
    before = {s.id for s in ff.list_sets()}
    with pytest.raises(FreezeframeError):
        group_flow.snapshot(GroupRequest("pair", Consistency.FILESYSTEM))
    assert not pair.receiver.dom.isActive()
    assert _thawed_and_running(pair.sender)
    _assert_nothing_left(ff, before)
