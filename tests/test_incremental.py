"""Incremental sets on a real guest: a chain equals full copies of the same instants, and faults give full members.

One guest (3 qcow2 disks, the ledger workload on vdb/vdc) serves the module. For each set of the chain the guest is
paused, the set taken, then a plain full backup job of the same paused guest is the reference: nothing can write
between the two, so they hold the same instant, and ``qemu-img compare`` must find them identical.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from freezeframe import wiring
from freezeframe.config import Settings
from freezeframe.flow import SnapshotRequest
from freezeframe.model import Member, SnapshotSet
from freezeframe.service import Freezeframe
from freezeframe.testbed.daemon import restart_libvirtd
from freezeframe.testbed.instance import DiskRequest, TestbedError, TestInstance, running_instance
from freezeframe.testbed.ledger import check_ledger

pytestmark = pytest.mark.vm

MiB = 1 << 20
DISKS = [DiskRequest(64 * MiB), DiskRequest(64 * MiB), DiskRequest(64 * MiB)]
CHAIN = 5


@pytest.fixture(scope="module")
def guest(libvirt_conn: Any, guest_image: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestInstance]:
    workdir = tmp_path_factory.mktemp("incr-guest")
    with running_instance(libvirt_conn, disks=DISKS, workload="ledger", workdir=workdir, guest=guest_image) as inst:
        yield inst


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("incr-home")


@pytest.fixture
def service(home: Path) -> Iterator[Freezeframe]:
    """One service per test, like one CLI call each: a libvirtd restart in one test leaves the next a live one."""
    with wiring.open_service(Settings(home=home, agent_timeout_s=3)) as ff:
        yield ff


def _members(s: SnapshotSet) -> dict[str, Member]:
    return {m.target: m for m in s.members}


def _snap(service: Freezeframe, inst: TestInstance, **kw: Any) -> SnapshotSet:
    """The chain limit is out of the way here (tests/test_incremental_plan.py covers it)."""
    return service.snapshot(SnapshotRequest(instance=inst.uuid, **{"max_chain": 100, **kw}))


def _guest_writes(inst: TestInstance, rng: random.Random, round_no: int) -> None:
    """Random 64 KiB rewrites of one file (some blocks several times), a new file, and a discard of an old one."""
    blocks = [rng.randrange(128) for _ in range(6)]
    blocks += blocks[:2]
    script = ["[ -f /mnt/vda/blob ] || dd if=/dev/urandom of=/mnt/vda/blob bs=64k count=128 2>/dev/null"]
    script += [f"dd if=/dev/urandom of=/mnt/vda/blob bs=64k count=1 seek={b} conv=notrunc 2>/dev/null" for b in blocks]
    script += [
        f"dd if=/dev/urandom of=/mnt/vda/junk{round_no} bs=64k count=32 2>/dev/null",
        f"rm -f /mnt/vda/junk{round_no - 1}",
        "sync",
        "fstrim /mnt/vda",
    ]
    code, out, err = inst.guest_exec(["sh", "-c", " && ".join(script)], timeout_s=60)
    assert code == 0, f"guest writes failed: {out} {err}"


def _reference(inst: TestInstance, folder: Path) -> dict[str, Path]:
    """A plain full backup job of the (paused) guest: the same instant as the set just taken."""
    folder.mkdir(parents=True, exist_ok=True)
    refs = {d.target: folder / f"{d.target}.qcow2" for d in inst.disks}
    disks = ""
    for target, path in refs.items():
        size = inst.dom.blockInfo(target)[0]  # a test before may have resized the disk
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
        disks += f"<disk name='{target}' backup='yes' type='file'><target file='{path}'/><driver type='qcow2'/></disk>"
    inst.dom.backupBegin(
        f"<domainbackup mode='push'><disks>{disks}</disks></domainbackup>",
        None,
        libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL,
    )
    while inst.dom.jobStats().get("type", 0) != libvirt.VIR_DOMAIN_JOB_NONE:
        time.sleep(0.05)
    assert inst.dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED).get("type") == libvirt.VIR_DOMAIN_JOB_COMPLETED
    return refs


def _same(member: Member, ref: Path) -> bool:
    result = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", member.path, str(ref)], capture_output=True, text=True
    )
    return result.returncode == 0


def _assert_equal_to_references(service: Freezeframe, set_id: str, refs: dict[str, Path]) -> None:
    current = service.show(set_id)
    for target, ref in refs.items():
        assert _same(_members(current)[target], ref), f"set {set_id} {target} differs from its reference"


def _assert_export_equals_references(service: Freezeframe, s: SnapshotSet, refs: dict[str, Path], out: Path) -> None:
    """An OVA of the 5th incremental holds standalone disks with the full content of that instant."""
    out.mkdir()
    result = service.portable.export(s.id, out / "set.ova")
    with tarfile.open(result.path) as tar:
        tar.extractall(out, filter="data")
    for disk in result.disks:
        extracted = out / disk.href
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(extracted)],
                                         capture_output=True, text=True, check=True).stdout)  # fmt: skip
        assert "backing-filename" not in info, f"{disk.href} is not standalone"
        assert _same(Member(s.id, disk.target, "virtio", None, 0, "qcow2", str(extracted)), refs[disk.target])


def _wait_agent(inst: TestInstance, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            inst.agent({"execute": "guest-ping"}, timeout_s=2)
            inst.wait_for_progress(timeout_s=30)
            return
        except (libvirt.libvirtError, TestbedError):
            time.sleep(0.5)
    raise AssertionError("guest agent did not come back")


def test_chain_of_incrementals_equals_full_copies_and_survives_deletes(
    guest: TestInstance, service: Freezeframe, tmp_path: Path
) -> None:
    rng = random.Random(11)
    sets: list[SnapshotSet] = []
    refs: dict[str, dict[str, Path]] = {}
    for level in range(CHAIN + 1):
        if level:
            _guest_writes(guest, rng, level)
        guest.dom.suspend()
        try:
            taken = _snap(service, guest)
            refs[taken.id] = _reference(guest, tmp_path / f"ref{level}")
        finally:
            guest.dom.resume()
        sets.append(taken)

    first = sets[0]
    assert {m.metadata["freezeframe.kind"] for m in first.members} == {"full"}
    assert all("first set" in m.metadata["freezeframe.full_reason"] for m in first.members)
    for parent, child in itertools.pairwise(sets):
        for member in child.members:
            assert member.metadata["freezeframe.kind"] == "incremental", member.metadata
            assert member.metadata["freezeframe.parent_set"] == parent.id
    # After the first round made an 8 MiB file, a round changes ~0.5 MiB of it and writes 2 MiB of new data:
    # the incremental holds that, not the 10+ MiB a full copy of vda holds by then.
    for s in sets[2:]:
        assert int(_members(s)["vda"].metadata["freezeframe.bytes_written"]) < 4 * MiB
    for s in sets:
        _assert_equal_to_references(service, s.id, refs[s.id])
        m = _members(s)
        verdict = check_ledger(Path(m["vdb"].path), Path(m["vdc"].path), tmp_dir=tmp_path)
        assert verdict.ok, f"set {s.id}: {verdict}"
    report = service.lifecycle.verify(sets[-1].id, boot=True)  # a clone of the 5th incremental boots
    assert report.ok and report.booted, report.failures
    _assert_export_equals_references(service, sets[-1], refs[sets[-1].id], tmp_path / "export")
    written = [sum(int(m.metadata["freezeframe.bytes_written"]) for m in s.members) for s in sets]
    print("bytes written per set:", written)

    # A middle set and then the chain's full head go; every remaining set reads what it read before.
    service.lifecycle.delete(sets[2].id)
    assert _members(service.show(sets[3].id))["vda"].metadata["freezeframe.parent_set"] == sets[1].id
    service.lifecycle.delete(sets[0].id)
    head = _members(service.show(sets[1].id))["vda"]
    assert head.metadata["freezeframe.kind"] == "full" and "freezeframe.parent_set" not in head.metadata
    for s in sets[1:2] + sets[3:]:
        _assert_equal_to_references(service, s.id, refs[s.id])
    assert service.lifecycle.verify(sets[3].id).ok
    names = {c.getName() for c in guest.dom.listAllCheckpoints()}
    assert f"ff-{sets[2].id}" not in names and f"ff-{sets[0].id}" not in names
    assert len(names) <= 2, names


def _reasons(s: SnapshotSet) -> dict[str, str]:
    return {m.target: m.metadata.get("freezeframe.full_reason", "") for m in s.members}


def _kinds(s: SnapshotSet) -> dict[str, str]:
    return {m.target: m.metadata["freezeframe.kind"] for m in s.members}


def _wait_shut_off(inst: TestInstance, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while inst.dom.isActive():
        assert time.monotonic() < deadline, "QEMU did not go away"
        time.sleep(0.1)


def test_untrusted_change_tracking_gives_full_members_with_reasons(
    guest: TestInstance, service: Freezeframe, libvirt_conn: Any, tmp_path: Path
) -> None:
    base = _snap(service, guest)

    # virsh destroy: libvirt stops QEMU with SIGTERM, QEMU saves the bitmaps, the next set is incremental and right.
    guest.dom.destroy()
    guest.dom.create()
    _wait_agent(guest)
    guest.dom.suspend()
    try:
        after_destroy = _snap(service, guest)
        refs = _reference(guest, tmp_path / "after-destroy")
    finally:
        guest.dom.resume()
    assert set(_kinds(after_destroy).values()) == {"incremental"}, _reasons(after_destroy)
    _assert_equal_to_references(service, after_destroy.id, refs)

    # QEMU killed (SIGKILL): the bitmaps were not saved, so every disk is copied in full, with the reason.
    pid = int(Path(f"/run/libvirt/qemu/{guest.name}.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    _wait_shut_off(guest)
    guest.dom.create()
    _wait_agent(guest)
    after_kill = _snap(service, guest)
    assert set(_kinds(after_kill).values()) == {"full"}, _reasons(after_kill)
    assert all("without saving" in r for r in _reasons(after_kill).values()), _reasons(after_kill)

    # The chain starts again from there.
    again = _snap(service, guest)
    assert set(_kinds(again).values()) == {"incremental"}
    assert base.id != again.id

    # Domain stopped, undefined and defined again: libvirt forgot the checkpoints (the bitmaps are still in the
    # images), freezeframe redefines the parent's from its records.
    xml = guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    guest.dom.destroy()
    guest.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    guest.dom = libvirt_conn.defineXML(xml)
    assert guest.dom.listAllCheckpoints() == []
    guest.dom.create()
    _wait_agent(guest)
    redefined = _snap(service, guest)
    assert set(_kinds(redefined).values()) == {"incremental"}, _reasons(redefined)
    assert f"ff-{again.id}" in {c.getName() for c in guest.dom.listAllCheckpoints()}

    # A disk resized: that disk alone is copied in full.
    guest.dom.blockResize("vdc", 80 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    resized = _snap(service, guest)
    assert _kinds(resized) == {"vda": "incremental", "vdb": "incremental", "vdc": "full"}
    assert "resized" in _reasons(resized)["vdc"]

    # The newest set deleted: the next builds on the one before (its checkpoint is still live); vdc, resized
    # since that one, is full again.
    service.lifecycle.delete(resized.id)
    after_delete = _snap(service, guest)
    assert _kinds(after_delete) == {"vda": "incremental", "vdb": "incremental", "vdc": "full"}
    assert _members(after_delete)["vda"].metadata["freezeframe.parent_set"] == redefined.id

    # A disk attached since the last set: that disk alone is full.
    extra = tmp_path / "vdd.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(extra), str(16 * MiB)], check=True)
    guest.dom.attachDeviceFlags(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{extra}'/>"
        "<target dev='vdd' bus='virtio'/></disk>",
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )
    attached = _snap(service, guest)
    assert _kinds(attached) == {"vda": "incremental", "vdb": "incremental", "vdc": "incremental", "vdd": "full"}
    assert "added since" in _reasons(attached)["vdd"]

    # An explicit full set: every member full, no reason needed.
    full = _snap(service, guest, mode="full")
    assert set(_kinds(full).values()) == {"full"} and not any(_reasons(full).values())

    # A disk's file replaced while the guest was stopped (by a copy without the bitmaps): that disk alone is full.
    guest.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
    _wait_shut_off(guest, timeout_s=60)
    vda = guest.disk_path("vda")
    copy = tmp_path / "vda-copy.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(vda), str(copy)], check=True)
    copy.replace(vda)
    guest.dom.create()
    _wait_agent(guest)
    replaced = _snap(service, guest)
    assert _kinds(replaced) == {"vda": "full", "vdb": "incremental", "vdc": "incremental"}, _reasons(replaced)
    assert "not in the image" in _reasons(replaced)["vda"]

    # A shut-off instance: full members, with the reason.
    guest.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
    _wait_shut_off(guest, timeout_s=60)
    try:
        off = _snap(service, guest)
    finally:
        guest.dom.create()
    assert set(_kinds(off).values()) == {"full"}
    assert all("shutoff" in r for r in _reasons(off).values()), _reasons(off)


def test_libvirtd_restarted_between_sets_keeps_the_chain(
    guest: TestInstance, home: Path, libvirt_conn: Any, tmp_path: Path
) -> None:
    """The daemon goes away and comes back (an upgrade, a crash) between two sets; the guest runs on. The next set
    (a new process, as a new CLI call would be) builds on the last one and equals a full copy of its instant."""
    settings = Settings(home=home, agent_timeout_s=3)
    _wait_agent(guest)  # a test before may have just started the guest again
    with wiring.open_service(settings) as ff:
        base = _snap(ff, guest)
    _guest_writes(guest, random.Random(3), 1)
    away = restart_libvirtd(settings.libvirt_uri, [libvirt_conn])
    print(f"libvirtd was away for {away:.1f} s")
    guest.dom = libvirt_conn.lookupByUUIDString(guest.uuid)
    assert guest.dom.isActive(), "the guest kept running"
    guest.wait_for_progress(timeout_s=30)
    with wiring.open_service(settings) as ff:
        guest.dom.suspend()
        try:
            after = _snap(ff, guest)
            refs = _reference(guest, tmp_path / "ref")
        finally:
            guest.dom.resume()
        qcow2 = {m.target for m in after.members if m.format == "qcow2" and m.target in refs}
        assert {t: _kinds(after)[t] for t in qcow2} == dict.fromkeys(qcow2, "incremental"), _reasons(after)
        assert {_members(after)[t].metadata["freezeframe.parent_set"] for t in qcow2} == {base.id}
        _assert_equal_to_references(ff, after.id, refs)
        m = _members(after)
        assert check_ledger(Path(m["vdb"].path), Path(m["vdc"].path), tmp_dir=tmp_path).ok


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A 128 MiB block device holding 14 MiB of data (a loop device over a sparse file), as an LVM volume is."""
    backing = tmp_path / "volume.img"
    with backing.open("wb") as f:
        f.truncate(128 * MiB)
        f.seek(40 * MiB)
        f.write(os.urandom(14 * MiB))
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True)
    try:
        yield dev.stdout.strip()
    finally:
        # Still open by QEMU until the guest goes: the kernel detaches it then (autoclear).
        subprocess.run(["losetup", "-d", dev.stdout.strip()], check=False)


def test_a_raw_block_device_member_is_as_small_as_its_data(
    guest: TestInstance, service: Freezeframe, loop_device: str
) -> None:
    """The issue's case: 128 MiB device, 14 MiB of data, and the member was 129 MiB. (The data is written from
    the host: the tiny guest's kernel does not pick up a hot-plugged disk, while QEMU's backup job reads it all.)"""
    guest.dom.attachDeviceFlags(
        f"<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='{loop_device}'/>"
        "<target dev='vdf' bus='virtio'/></disk>",
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )
    taken = _snap(service, guest)
    member = _members(taken)["vdf"]
    written = int(member.metadata["freezeframe.bytes_written"])
    print(f"member of a 128 MiB block device holding 14 MiB: {written / MiB:.1f} MiB")
    assert 14 * MiB <= written < 15 * MiB, written
    assert member.metadata["freezeframe.kind"] == "full" and member.metadata["freezeframe.full_reason"]
    same = ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", member.path, loop_device]
    assert subprocess.run(same, capture_output=True).returncode == 0, "the member holds the device's content"
