"""The test bed itself: the guest boots, freezes, runs its workloads, and the checkers tell good from bad."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from freezeframe.testbed.domain import TestDisk, domain_xml
from freezeframe.testbed.guest import GuestImage, build_guest
from freezeframe.testbed.heartbeat import Beat, heartbeat_from_image, longest_gap, parse_heartbeat
from freezeframe.testbed.instance import DiskRequest
from freezeframe.testbed.ledger import check_ledger, judge_ledger, read_guest_file
from freezeframe.testbed.naive import backup_xml, naive_capture


def rec(i: int) -> bytes:
    return b"%019d\n" % i


def journal(first: int, last: int) -> bytes:
    return b"".join(rec(i) for i in range(first, last + 1))


# ---------------------------------------------------------------- checker logic on synthetic data


def test_ledger_equal_state_and_journal_is_ok() -> None:
    v = judge_ledger(journal(1, 500), rec(500), b"freeze i=300\nthaw i=300\n")
    assert v.ok, v.reason
    assert (v.state, v.last_journal, v.journal_records) == (500, 500, 500)
    assert v.app_events == ["freeze i=300", "thaw i=300"]


def test_ledger_journal_one_ahead_is_ok() -> None:
    v = judge_ledger(journal(1, 501), rec(500))
    assert v.ok, v.reason
    assert (v.state, v.last_journal) == (500, 501)


def test_ledger_state_ahead_is_rejected() -> None:
    v = judge_ledger(journal(1, 400), rec(700))
    assert not v.ok
    assert v.state == 700 and v.last_journal == 400
    assert "ahead of the last journal record" in v.reason


def test_ledger_journal_two_ahead_is_rejected() -> None:
    v = judge_ledger(journal(1, 502), rec(500))
    assert not v.ok
    assert "more than one ahead" in v.reason


def test_ledger_torn_trailing_record_is_ignored() -> None:
    v = judge_ledger(journal(1, 10) + b"00000000000", rec(10))
    assert v.ok, v.reason
    assert v.last_journal == 10
    assert "torn" in v.reason


def test_ledger_garbled_last_record_is_ignored_but_not_in_the_middle() -> None:
    assert judge_ledger(journal(1, 10) + b"\0" * 20, rec(10)).ok
    broken = journal(1, 5) + b"x" * 20 + journal(7, 10)
    v = judge_ledger(broken, rec(10))
    assert not v.ok and "corrupt" in v.reason


def test_ledger_gap_in_journal_is_rejected() -> None:
    v = judge_ledger(journal(1, 5) + journal(7, 8), rec(8))
    assert not v.ok and "expected 6" in v.reason


def test_ledger_missing_files_are_rejected() -> None:
    assert "journal" in judge_ledger(None, rec(1)).reason
    assert not judge_ledger(None, rec(1)).ok
    v = judge_ledger(journal(1, 3), None)
    assert not v.ok and "state" in v.reason


def test_ledger_corrupt_state_is_rejected() -> None:
    v = judge_ledger(journal(1, 3), b"garbage-garbage-xx\n\n")
    assert not v.ok and "state file is corrupt" in v.reason


def test_heartbeat_longest_gap_and_interval() -> None:
    ms = 1_000_000
    times = [0, 5, 10, 15, 1015, 1020, 1025, 1100, 1105]
    data = b"".join(b"%020d %020d\n" % (i, t * ms) for i, t in enumerate(times)) + b"0000000012 torn"
    beats = parse_heartbeat(data)
    assert [b.seq for b in beats] == list(range(9))
    whole = longest_gap(beats)
    assert whole.max_gap_ms == pytest.approx(1000.0)
    assert (whole.start_ns, whole.end_ns) == (15 * ms, 1015 * ms)
    late = longest_gap(beats, start_ns=1020 * ms)
    assert late.max_gap_ms == pytest.approx(75.0)
    early = longest_gap(beats, end_ns=12 * ms)
    assert early.max_gap_ms == pytest.approx(5.0)
    assert longest_gap([Beat(0, 1)]).beats == 0


# ---------------------------------------------------------------- XML builders


def test_domain_xml_shape(tmp_path: Path) -> None:
    guest = GuestImage(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img", key="k")
    disks = [
        TestDisk("vda", tmp_path / "a.qcow2"),
        TestDisk("vdb", tmp_path / "b.raw", "raw"),
        TestDisk("vdc", tmp_path / "c.qcow2"),
    ]
    root = etree.fromstring(
        domain_xml("fftest-x", guest, disks, "ledger", console_log=tmp_path / "console.log", nics=2).encode()
    )
    assert root.get("type") == "qemu"
    assert root.findtext("os/kernel") == str(tmp_path / "vmlinuz")
    assert "ff.workload=ledger" in (root.findtext("os/cmdline") or "")
    assert "console=ttyS0" in (root.findtext("os/cmdline") or "")
    assert [t.get("dev") for t in root.findall("devices/disk/target")] == ["vda", "vdb", "vdc"]
    assert [d.get("type") for d in root.findall("devices/disk/driver")] == ["qcow2", "raw", "qcow2"]
    assert root.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"  # type: ignore[union-attr]
    assert root.find("devices/serial/source").get("path") == str(tmp_path / "console.log")  # type: ignore[union-attr]
    assert len(root.findall("devices/interface[@type='user']/model[@type='virtio']")) == 2
    assert root.find("devices/graphics") is None
    with pytest.raises(ValueError, match="3 disks"):
        domain_xml("x", guest, disks[:2], "ledger", console_log=tmp_path / "c.log")
    with pytest.raises(ValueError, match="workload"):
        domain_xml("x", guest, disks, "bogus", console_log=tmp_path / "c.log")


def test_backup_xml_lists_only_one_disk() -> None:
    root = etree.fromstring(backup_xml("vdc", Path("/x/out.qcow2"), ["vda", "vdb", "vdc"]).encode())
    assert root.get("mode") == "push"
    got = {d.get("name"): d.get("backup") for d in root.findall("disks/disk")}
    assert got == {"vda": "no", "vdb": "no", "vdc": "yes"}
    assert root.find("disks/disk[@name='vdc']/target").get("file") == "/x/out.qcow2"  # type: ignore[union-attr]


# ---------------------------------------------------------------- image reading without a VM


def make_ext4(tmp_path: Path, name: str, files: dict[str, bytes], fmt: str = "qcow2") -> Path:
    """An ext4 image populated from a host directory (mkfs.ext4 -d), converted to ``fmt``."""
    src = tmp_path / f"{name}-tree"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    src.mkdir(exist_ok=True)
    raw = tmp_path / f"{name}.raw"
    subprocess.run(["truncate", "-s", "16M", str(raw)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(raw)], check=True)
    if fmt == "raw":
        return raw
    out = tmp_path / f"{name}.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True)
    raw.unlink()
    return out


def test_check_ledger_on_images(tmp_path: Path) -> None:
    jimg = make_ext4(
        tmp_path, "j", {"ledger/journal": journal(1, 42), "ledger/app-events": b"freeze i=40\nthaw i=40\n"}
    )
    good = make_ext4(tmp_path, "s-good", {"ledger/state": rec(41)}, fmt="raw")
    bad = make_ext4(tmp_path, "s-bad", {"ledger/state": rec(90)})
    empty = make_ext4(tmp_path, "s-empty", {"other": b"x"})
    v = check_ledger(jimg, good)
    assert v.ok and v.state == 41 and v.last_journal == 42, v.reason
    assert v.app_events == ["freeze i=40", "thaw i=40"]
    v = check_ledger(jimg, bad, tmp_dir=tmp_path)
    assert not v.ok and v.state == 90 and v.last_journal == 42
    v = check_ledger(jimg, empty)
    assert not v.ok and "/ledger/state is missing" in v.reason
    assert read_guest_file(empty, "/other") == b"x"
    with pytest.raises(FileNotFoundError):
        read_guest_file(empty, "/nope")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("ff-")]
    assert leftovers == []


def test_guest_build_is_cached(guest_image: GuestImage) -> None:
    mtime = guest_image.initrd.stat().st_mtime_ns
    again = build_guest(guest_image.initrd.parent.parent.parent)
    assert again == guest_image
    assert again.initrd.stat().st_mtime_ns == mtime


# ---------------------------------------------------------------- real guests


@pytest.mark.vm
def test_ledger_guest_freezes_thaws_and_leaves_consistent_disks(make_instance: Any) -> None:
    inst = make_instance(disks=[DiskRequest()] * 3, workload="ledger")
    print(f"boot (define to agent ready): {inst.boot_seconds:.1f} s")
    assert inst.agent({"execute": "guest-ping"}) == {"return": {}}
    code, out, _ = inst.guest_exec(["/bin/ls", "/sys/class/net"])
    assert code == 0 and "eth0" in out.split(), out

    first = inst.wait_for_progress()
    # A slow application hook: the freeze must wait for it (simulated by /run/ff-hook-delay).
    assert inst.guest_exec(["/bin/sh", "-c", "echo 1 > /run/ff-hook-delay"])[0] == 0
    started = time.monotonic()
    frozen = inst.dom.fsFreeze()
    freeze_s = time.monotonic() - started
    try:
        assert frozen == 3, f"froze {frozen} filesystems, expected vda+vdb+vdc"
        assert freeze_s >= 1.0, f"freeze took {freeze_s:.2f}s although the hook sleeps 1 s"
        assert inst.agent({"execute": "guest-fsfreeze-status"}) == {"return": "frozen"}
        paused_at = inst.ledger_progress()
        assert paused_at is not None and paused_at >= first
        assert b"ff-ledger paused i=%d" % paused_at in inst.console_bytes()
        time.sleep(1.5)
        assert inst.ledger_progress() == paused_at, "the writer kept going while frozen"
    finally:
        thawed = inst.dom.fsThaw()
    assert thawed == 3
    assert inst.agent({"execute": "guest-fsfreeze-status"}) == {"return": "thawed"}
    assert inst.guest_exec(["/bin/rm", "/run/ff-hook-delay"])[0] == 0
    after = inst.wait_for_progress(after=paused_at, timeout_s=15)
    assert after > paused_at

    code, events, _ = inst.guest_exec(["/bin/cat", "/mnt/vdb/ledger/app-events"])
    assert code == 0
    assert events.splitlines() == [f"freeze i={paused_at}", f"thaw i={paused_at}"]

    assert inst.shutdown(timeout_s=30), "guest did not power off by itself"
    verdict = check_ledger(inst.disk_path("vdb"), inst.disk_path("vdc"))
    assert verdict.ok, verdict.reason
    assert verdict.state is not None and verdict.state >= after > 0
    assert verdict.app_events == [f"freeze i={paused_at}", f"thaw i={paused_at}"]


@pytest.mark.vm
def test_naive_per_disk_capture_of_raw_disks_is_inconsistent(make_instance: Any, tmp_path: Path) -> None:
    inst = make_instance(disks=[DiskRequest(format="raw")] * 3, workload="ledger")
    inst.wait_for_progress()
    out_b, out_c = tmp_path / "naive-vdb.qcow2", tmp_path / "naive-vdc.qcow2"
    try:
        captures = naive_capture(inst.dom, [("vdb", out_b), ("vdc", out_c)], gap_s=3.0)
        assert [c.target for c in captures] == ["vdb", "vdc"]
        assert captures[1].begun_at - captures[0].begun_at >= 3.0
        verdict = check_ledger(out_b, out_c)
    finally:
        out_b.unlink(missing_ok=True)
        out_c.unlink(missing_ok=True)
    assert not verdict.ok, verdict.reason
    assert verdict.state is not None and verdict.last_journal is not None
    assert verdict.state > verdict.last_journal + 1, verdict
    assert "ahead of the last journal record" in verdict.reason

    assert inst.shutdown(timeout_s=30)
    live = check_ledger(inst.disk_path("vdb"), inst.disk_path("vdc"))
    assert live.ok and live.state is not None and live.state > verdict.state, live.reason


@pytest.mark.vm
def test_heartbeat_shows_the_freeze_as_the_longest_stall(make_instance: Any) -> None:
    inst = make_instance(disks=[DiskRequest()] * 2, workload="heartbeat")
    inst.wait_for_progress()
    time.sleep(1.0)
    offset = inst.guest_clock_offset_ns()
    freeze_start = time.time_ns() + offset
    assert inst.dom.fsFreeze() == 2
    try:
        time.sleep(1.5)
    finally:
        inst.dom.fsThaw()
    thaw_end = time.time_ns() + offset
    before = inst.heartbeat_progress() or 0
    inst.wait_for_progress(after=before, timeout_s=15)
    assert inst.shutdown(timeout_s=30)

    for target in ("vda", "vdb"):
        during = heartbeat_from_image(inst.disk_path(target), freeze_start - 10**9, thaw_end + 10**9)
        assert during.max_gap_ms >= 1400, (target, during)
        assert during.start_ns is not None and freeze_start - 10**9 <= during.start_ns <= thaw_end
        outside = heartbeat_from_image(inst.disk_path(target), end_ns=freeze_start - 10**9)
        assert outside.beats > 20 and outside.max_gap_ms < during.max_gap_ms, (target, outside)
