"""`freezeframe demo`: a real 3-disk guest under a cross-disk write load, snapshotted and checked."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import libvirt
import libvirt_qemu

from freezeframe.adapters import libvirt_define as ld
from freezeframe.cli_output import Col, Piece, print_table, say
from freezeframe.config import Settings
from freezeframe.flow import SnapshotRequest
from freezeframe.model import Consistency, SnapshotSet
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import build_guest
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance
from freezeframe.testbed.ledger import check_ledger

MiB = 1 << 20


def run_demo(workdir: Path | None) -> None:
    settings = Settings.from_env()
    say(("freezeframe demo", "bold"), f" — data in {settings.home}, libvirt at {settings.libvirt_uri}")
    say("building (or reusing) the cached test guest: Debian cloud kernel + busybox + qemu-guest-agent …")
    guest = build_guest()
    conn = libvirt.open(settings.libvirt_uri)
    try:
        with tempfile.TemporaryDirectory(prefix="freezeframe-demo-", dir=workdir) as tmp:
            disks = [DiskRequest(64 * MiB)] * 3
            with running_instance(
                conn, disks=disks, workload="ledger", name_prefix="ffdemo", workdir=Path(tmp), guest=guest
            ) as inst:
                _show_guest(inst)
                with Freezeframe.open(settings) as ff:
                    sets = [
                        _snapshot_and_check(ff, inst, level)
                        for level in (Consistency.CRASH, Consistency.FILESYSTEM, Consistency.APPLICATION)
                    ]
                    _restore_and_check(ff, conn, sets[-1], inst.name)
                say("removing the demo instance (its snapshot sets stay: `freezeframe list`)")
    finally:
        conn.close()


def _show_guest(inst: TestInstance) -> None:
    say("instance ", (inst.name, "bold"), f" ({inst.uuid}) running, agent ready {inst.boot_seconds:.1f} s after define")
    info = inst.agent({"execute": "guest-info"})["return"]
    say(f"guest agent answers guest-ping; qemu-ga {info['version']}")
    rows = []
    for fs in inst.agent({"execute": "guest-get-fsinfo"})["return"]:
        disk = ", ".join(d.get("dev", "?") for d in fs.get("disk", []))
        used, total = fs.get("used-bytes", 0), fs.get("total-bytes", 0)
        rows.append([fs["mountpoint"], fs["type"], disk, f"{used / MiB:.1f} / {total / MiB:.1f} MiB"])
    print_table(FS_COLUMNS, rows, rows)
    say(f"ledger workload running: record {inst.wait_for_progress()} written on vdb, then vdc, and counting")


FS_COLUMNS = (Col("guest filesystem", wraps=True), Col("type"), Col("disk"), Col("used / total"))


def _verdict(ok: bool) -> Piece:
    return ("consistent", "green") if ok else ("INCONSISTENT", "bold red")


def _snapshot_and_check(ff: Freezeframe, inst: TestInstance, level: Consistency) -> SnapshotSet:
    result = ff.snapshot(SnapshotRequest(inst.name, level, require=True, metadata={"demo": "true"}))
    paths = {m.target: Path(m.path) for m in result.members}
    verdict = check_ledger(paths["vdb"], paths["vdc"])
    window = f"{result.freeze_window_ms:.0f} ms freeze window" if result.freeze_window_ms else "no freeze (crash)"
    say(
        f"set {result.id[:8]} {result.achieved:<11} {len(result.members)} disks, {window}; ledger on the captured "
        "images: ",
        _verdict(verdict.ok),
        f" ({verdict.reason})",
    )
    if not verdict.ok:
        raise SystemExit(1)
    return result


def _restore_and_check(ff: Freezeframe, conn: libvirt.virConnect, snapshot_set: SnapshotSet, source: str) -> None:
    """The set becomes a new instance that boots and carries on the ledger from the captured state."""
    name = f"{source}-restored"
    restored = ff.lifecycle.restore(snapshot_set.id, name, start=True)
    try:
        say(f"restored set {snapshot_set.id[:8]} as instance ", (name, "bold"), " (copy-on-write over the members)")
        dom = conn.lookupByUUIDString(restored.uuid)
        deadline = time.monotonic() + 120
        while True:
            try:
                libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 5, 0)
                break
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        say(f"{name} booted and its guest agent answers; letting its ledger run on, then shutting it down")
        time.sleep(3)
        if not ld.shutdown_via_agent(dom, 60):
            raise SystemExit(f"{name} did not shut down through its agent")
        disks = {d.target: Path(d.path) for d in restored.disks}
        verdict = check_ledger(disks["vdb"], disks["vdc"])
        say("ledger on the restored instance's disks after it ran: ", _verdict(verdict.ok), f" ({verdict.reason})")
        if not verdict.ok:
            raise SystemExit(1)
    finally:
        ff.lifecycle.discard(name)
