"""A real 3-disk set taken under the ledger workload leaves as an OVA (qcow2 and vmdk) and comes back: the imported
guest boots and its ledger holds; the store round trip of the same set."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from freezeframe.adapters import libvirt_define as ld
from freezeframe.adapters.ova import qemu_json_for
from freezeframe.config import Settings
from freezeframe.errors import (
    FreezeframeError,
)
from freezeframe.flow import SnapshotRequest
from freezeframe.model import (
    Consistency,
    SnapshotSet,
)
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import GuestImage
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance
from freezeframe.testbed.ledger import check_ledger
from portable_support import (
    _LEDGER_RE,
    PREFIX,
    MiB,
    Pt,
    assert_nothing_left,
    check_package,
    cli_env,
    disk_rows,
    domain_exists,
    guest_boot_dirs,
    qemu_img,
    remove_everything,
    run_cli,
    same_data,
    xml_of,
)

# ---- real guests ------------------------------------------------------------------------------------------

LEDGER_DISKS = [DiskRequest(64 * MiB), DiskRequest(64 * MiB), DiskRequest(64 * MiB)]


@pytest.fixture(scope="module")
def ledger_vm(
    libvirt_conn: Any, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestInstance]:
    workdir = tmp_path_factory.mktemp("portable-guest")
    with running_instance(
        libvirt_conn, disks=LEDGER_DISKS, workload="ledger", workdir=workdir, guest=guest_image,
        name_prefix="ffpt", vcpus=2, memory_mib=288,
    ) as inst:  # fmt: skip
        yield inst


@pytest.fixture(scope="module")
def shared(
    ledger_vm: TestInstance, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Pt, SnapshotSet]]:
    """One filesystem-consistent 3-disk set of the ledger guest, shared by the VM tests (one home)."""
    home = tmp_path_factory.mktemp("portable-home")
    with Freezeframe.open(Settings(home=home, agent_timeout_s=5)) as service:
        portable = Pt(service, guest_boot_dirs(guest_image))
        try:
            s = service.snapshot(SnapshotRequest(ledger_vm.name, Consistency.FILESYSTEM, require=True))
            yield portable, s
        finally:
            remove_everything(portable)


def wait_agent(pt: Pt, name: str, timeout_s: float = 180) -> float:
    started = time.monotonic()
    hypervisor = pt.service.hypervisor
    while True:
        try:
            hypervisor.agent_ping(hypervisor.lookup(name))
            return time.monotonic() - started
        except FreezeframeError:
            if time.monotonic() - started > timeout_s:
                raise
            time.sleep(0.5)


def ledger_progress(console: Path) -> int | None:
    found = _LEDGER_RE.findall(console.read_bytes()) if console.exists() else []
    return int(found[-1]) if found else None


def ledger_start(console: Path) -> int | None:
    found = re.findall(rb"ff-ledger start i=(\d+)", console.read_bytes()) if console.exists() else []
    return int(found[-1]) if found else None


def wait_ledger(console: Path, after: int, timeout_s: float = 90) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = ledger_progress(console)
        if now is not None and now > after:
            return now
        time.sleep(0.3)
    raise AssertionError(f"the imported guest's ledger did not pass {after}: {console.read_text()[-800:]}")


def boot_and_check(pt: Pt, s: SnapshotSet, name: str, disks: dict[str, str], ledger_vm: TestInstance) -> None:
    """The imported guest answers its agent, resumes the ledger, shuts down cleanly, and its ledger holds."""
    conn = pt.service.hypervisor.conn
    took = wait_agent(pt, name)
    members = {m.target: m.path for m in s.members}
    before = check_ledger(Path(members["vdb"]), Path(members["vdc"]))
    assert before.ok and before.state is not None, before
    root = xml_of(conn, name)
    assert root.findtext("vcpu") == str(s.hardware.vcpus) == "2"
    assert int(root.findtext("memory") or 0) == s.hardware.memory_kib == 288 * 1024
    assert [r[0] for r in disk_rows(root)] == [d.target for d in s.hardware.disks] == ["vda", "vdb", "vdc"]
    assert [r[1] for r in disk_rows(root)] == ["virtio"] * 3
    assert root.findtext("os/cmdline") == s.hardware.boot.cmdline
    console = pt.instances_dir / name / "console.log"
    progressed = wait_ledger(console, before.state)
    assert ledger_start(console) == (before.last_journal or 0) + 1, "it did not boot from the set's data"
    dom = conn.lookupByName(name)
    assert ld.shutdown_via_agent(dom, 90), "the imported guest did not shut down through its agent"
    after = check_ledger(Path(disks["vdb"]), Path(disks["vdc"]))
    assert after.ok, after
    assert after.state is not None and after.state >= progressed > before.state
    print(f"{name}: agent {took:.1f}s after start, ledger {before.state} -> {after.state}")


@pytest.mark.vm
def test_export_and_import_of_a_real_set_boots(
    shared: tuple[Pt, SnapshotSet], ledger_vm: TestInstance, tmp_path: Path
) -> None:
    pt, s = shared
    assert [m.target for m in s.members] == ["vda", "vdb", "vdc"]
    out = tmp_path / "ledger.ova"
    result = pt.export(s.id, out)
    data = sum(Path(m.path).stat().st_size for m in s.members)
    started = time.monotonic()
    for m in s.members:
        shutil.copyfile(m.path, tmp_path / f"copy-{m.target}")
    copy_s = time.monotonic() - started
    print(
        f"export qcow2: {result.size / MiB:.1f} MiB package in {result.seconds:.2f}s "
        f"({data / MiB / max(result.seconds, 1e-3):.0f} MiB/s of member files); plain copy {copy_s:.2f}s"
    )
    check_package(out, 1)
    name = f"{PREFIX}ledger-qcow2"
    imported = pt.import_package(out, name, start=True)
    assert imported.started and imported.origin == "freezeframe" and imported.direct_kernel_boot
    boot_and_check(pt, s, name, {d.target: d.path for d in imported.disks}, ledger_vm)
    pt.service.lifecycle.discard(name)
    assert_nothing_left(pt, name)


@pytest.mark.vm
def test_vmdk_export_and_import_through_the_command_boots(
    shared: tuple[Pt, SnapshotSet], ledger_vm: TestInstance, guest_image: GuestImage, tmp_path: Path
) -> None:
    pt, s = shared
    out = tmp_path / "ledger-vmdk.ova"
    env = cli_env(pt.service.settings.home, guest_image)
    done = run_cli(["export", s.id, "-o", str(out), "--disk-format", "vmdk", "--ovf-version", "2", "--json"], env)
    assert done.returncode == 0, done.stderr
    exported = json.loads(done.stdout)
    started = time.monotonic()
    for m in s.members:
        argv = ["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", m.path, str(tmp_path / f"{m.target}.vmdk")]
        assert qemu_img(*argv).returncode == 0
    reference = time.monotonic() - started
    data = sum(m.virtual_size for m in s.members)
    print(
        f"export vmdk: {exported['seconds']:.2f}s for {data / MiB:.0f} MiB of disks "
        f"({data / MiB / max(exported['seconds'], 1e-3):.0f} MiB/s) vs qemu-img convert alone {reference:.2f}s"
    )
    package = check_package(out, 2)
    for disk, member in zip(package.disks, s.members, strict=True):
        assert disk.format == "vmdk" and same_data(qemu_json_for(disk), member.path)
    name = f"{PREFIX}ledger-vmdk"
    done = run_cli(["import", str(out), "--as", name, "--start", "--json"], env)
    assert done.returncode == 0, done.stderr
    imported = json.loads(done.stdout)
    assert imported["started"] and imported["origin"] == "freezeframe"
    boot_and_check(pt, s, name, {d["target"]: d["path"] for d in imported["disks"]}, ledger_vm)
    pt.service.lifecycle.discard(name)
    assert_nothing_left(pt, name)


@pytest.mark.vm
def test_store_round_trip_of_the_real_set(
    shared: tuple[Pt, SnapshotSet], guest_image: GuestImage, libvirt_conn: Any
) -> None:
    pt, s = shared
    env = cli_env(pt.service.settings.home, guest_image)
    done = run_cli(["export", s.name, "--to-store", "--name", "ledger-golden", "--json"], env)
    assert done.returncode == 0, done.stderr
    image = json.loads(done.stdout)["image"]
    listed = json.loads(run_cli(["images", "list", "--json"], env).stdout)
    assert image["id"] in [i["id"] for i in listed]
    shown = json.loads(run_cli(["images", "show", image["id"], "--json"], env).stdout)
    assert shown["source_set_id"] == s.id and shown["sha256"] == image["sha256"]
    assert [d["target"] for d in shown["summary"]["disks"]] == ["vda", "vdb", "vdc"]
    name = f"{PREFIX}ledger-store"
    done = run_cli(["import", image["id"], "--as", name, "--json"], env)
    assert done.returncode == 0, done.stderr
    imported = json.loads(done.stdout)
    assert imported["image_id"] == image["id"] and not imported["started"]
    members = {m.target: m.path for m in s.members}
    for disk in imported["disks"]:
        assert same_data(disk["path"], members[disk["target"]])
    pt.service.lifecycle.discard(name)
    assert not domain_exists(libvirt_conn, name)
    done = run_cli(["images", "delete", image["id"]], env)
    assert done.returncode == 0, done.stderr
    assert image["id"] not in [i["id"] for i in json.loads(run_cli(["images", "list", "--json"], env).stdout)]
    assert not (pt.service.settings.home / "images" / image["id"]).exists()
