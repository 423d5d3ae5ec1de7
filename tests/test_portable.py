"""Export, image store, import: sets leave as OVA packages and come back as instances.

Three parts. Synthetic sets (qemu-io patterns, domains defined but not booted) pin down the rebuilt hardware,
the data round trip, the store and every failure path. Hostile and third-party packages go through the import
operation and the `import` command: each is imported or refused with a specific one-line error, and nothing is
left in libvirt or on disk. The ``vm`` part exports a real 3-disk set taken under the ledger workload, imports
it with --start (qcow2 and vmdk packages) and checks that the imported guest boots and its ledger holds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from freezeframe import wiring
from freezeframe.adapters import libvirt_define as ld
from freezeframe.adapters.image_store import DirectoryImageStore, open_image_store
from freezeframe.adapters.ova import qemu_json_for
from freezeframe.errors import (
    HypervisorError,
    ImageNotFound,
    InvalidRequest,
    OvaDigestMismatch,
    PreflightFailed,
)
from freezeframe.model import (
    BootSpec,
    Hardware,
    SetStatus,
)
from freezeframe.ops.common import Holds
from freezeframe.ops.import_plan import Planner
from freezeframe.ports import HostCapabilities, ImageRef
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import GuestImage
from portable_support import (
    OVA_SAMPLES,
    PREFIX,
    MiB,
    Pt,
    assert_nothing_left,
    check_package,
    cli_app,
    cli_env,
    disk_rows,
    domain_exists,
    foreign_package,
    qemu_img,
    rewrite_package,
    run_cli,
    same_data,
    synthetic_hardware,
    synthetic_set,
    xml_of,
)

# ---- synthetic sets: export layout, round trip, hardware, failures ------------------------------------


@pytest.mark.parametrize(("disk_format", "ovf_version"), [("qcow2", 1), ("vmdk", 2)])
def test_export_then_import_rebuilds_the_machine_and_its_data(
    ff: Freezeframe, pt: Pt, guest_image: GuestImage, tmp_path: Path, disk_format: str, ovf_version: int
) -> None:
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 0x11, "sda": 0x22, "hdb": 0x33})
    calls: list[tuple[int, int]] = []
    out = tmp_path / "out" / "origin.ova"
    out.parent.mkdir()
    result = pt.export(
        s.name, out, disk_format=disk_format, ovf_version=ovf_version, progress=lambda d, t: calls.append((d, t))
    )
    assert result.path == str(out) and out.stat().st_size == result.size
    assert [d.target for d in result.disks] == ["vda", "sda", "hdb"]
    assert all(d.format == disk_format for d in result.disks)
    assert calls and calls[-1][0] == calls[-1][1]
    assert sorted(p.name for p in out.parent.iterdir()) == ["origin.ova"], "temporary files were left"
    assert out.stat().st_mode & 0o777 == 0o600, "a package holds guest disks: its owner's only"
    package = check_package(out, ovf_version)
    assert package.machine.ovf_version == ovf_version
    assert [d.name for d in package.disks] == [f"origin_vm-{t}.{disk_format}" for t in ("vda", "sda", "hdb")]
    for disk, member in zip(package.disks, s.members, strict=True):
        assert same_data(qemu_json_for(disk), member.path), f"{disk.name} differs from member {member.target}"

    imported = pt.import_package(out, f"{PREFIX}rt-{disk_format}")
    assert imported.origin == "freezeframe" and not imported.started
    assert imported.direct_kernel_boot and imported.machine == "pc"
    assert imported.left_out == {"hdc": "cdrom: not part of a snapshot set"}
    root = xml_of(ff.hypervisor.conn, imported.name)
    assert root.get("type") == "qemu"
    assert root.findtext("vcpu") == "2" and int(root.findtext("memory") or 0) == 192 * 1024
    type_el = root.find("os/type")
    assert type_el is not None and (type_el.get("machine") or "").startswith("pc")
    assert root.findtext("os/kernel") == str(guest_image.kernel)
    assert root.findtext("os/initrd") == str(guest_image.initrd)
    assert root.findtext("os/cmdline") == "console=ttyS0 ff.workload=idle"
    assert root.findtext("description") == "exported by the portable tests"
    assert disk_rows(root) == [("vda", "virtio", "1"), ("sda", "scsi", None), ("hdb", "ide", None)]
    assert root.findtext("devices/disk/serial") == "ROOT"
    assert root.find("devices/controller[@type='scsi'][@model='virtio-scsi']") is not None
    nics = root.findall("devices/interface")
    assert [n.get("type") for n in nics] == ["user"]
    assert (pt.instances_dir / imported.name).stat().st_mode & 0o777 == 0o700
    for disk, member in zip(imported.disks, s.members, strict=True):
        assert Path(disk.path).stat().st_mode & 0o777 == 0o600, f"{disk.path} is readable by others"
        assert Path(disk.path).parent == pt.instances_dir / imported.name
        info = json.loads(qemu_img("info", "--output=json", disk.path).stdout)
        assert info["format"] == "qcow2" and "backing-filename" not in info
        assert same_data(disk.path, member.path), f"{disk.target} differs from its member"
    ff.lifecycle.discard(imported.name)
    assert_nothing_left(pt, imported.name)


def test_sparse_disks_stay_small(ff: Freezeframe, pt: Pt, guest_image: GuestImage, tmp_path: Path) -> None:
    hw = synthetic_hardware(guest_image, size=1024 * MiB)
    s = synthetic_set(ff, hw, {"vda": 0x5A}, size=1024 * MiB)
    for fmt in ("qcow2", "vmdk"):
        result = pt.export(s.id, tmp_path / f"sparse-{fmt}.ova", disk_format=fmt)
        assert result.disks[0].capacity == 1024 * MiB
        assert result.allocated < 8 * MiB, f"{fmt}: a 1 GiB disk with 1 MiB of data took {result.allocated} bytes"


def test_export_refusals(ff: Freezeframe, pt: Pt, guest_image: GuestImage, tmp_path: Path) -> None:
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 1})
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    out = tmp_path / "x.ova"
    out.write_bytes(b"precious")
    with pytest.raises(InvalidRequest, match="already exists; use --force"):
        pt.export(s.id, out)
    assert out.read_bytes() == b"precious"
    result = pt.export(s.id, out, force=True)
    assert out.stat().st_size == result.size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ova"], "the replaced file left a temporary"
    with pytest.raises(InvalidRequest, match="is a directory"):
        pt.export(s.id, tmp_path)
    with pytest.raises(InvalidRequest, match="does not exist"):
        pt.export(s.id, tmp_path / "nowhere" / "x.ova")
    with pytest.raises(InvalidRequest, match="--disk-format"):
        pt.export(s.id, tmp_path / "y.ova", disk_format="vhd")
    with pytest.raises(InvalidRequest, match="--ovf-version"):
        pt.export(s.id, tmp_path / "y.ova", ovf_version=3)
    s.status = SetStatus.FAILED
    ff.catalog.update_set(s)
    with pytest.raises(InvalidRequest, match="failed; only available sets can be exported"):
        pt.export(s.id, tmp_path / "y.ova")
    with pytest.raises(InvalidRequest, match="failed; only available sets"):
        pt.export_to_store(s.id)
    assert not (tmp_path / "y.ova").exists()
    # The CLI refuses contradictory options before touching anything.
    runner = CliRunner()
    home = ["--home", str(ff.settings.home)]
    for args in (["export", s.id, *home], ["export", s.id, "-o", "a.ova", "--to-store", *home],
                 ["export", s.id, "-o", "a.ova", "--name", "n", *home]):  # fmt: skip
        bad = runner.invoke(cli_app(), args)
        assert isinstance(bad.exception, InvalidRequest), bad.output


def test_image_store_round_trip_through_the_cli(
    ff: Freezeframe, pt: Pt, guest_image: GuestImage, tmp_path: Path
) -> None:
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 0x41, "sda": 0x42}, name="nightly")
    runner = CliRunner()
    home = ["--home", str(ff.settings.home)]
    app = cli_app()
    args = ["export", s.id, "--to-store", "--name", "golden", "--disk-format", "vmdk", "--json", *home]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    exported = json.loads(ok.output)
    image = exported["image"]
    assert image["name"] == "golden" and image["source_set_id"] == s.id
    root = ff.settings.home / "images"
    package = root / image["id"] / image["filename"]
    assert package.is_file() and (root / image["id"] / "image.json").is_file()
    assert image["size"] == package.stat().st_size
    assert image["sha256"] == hashlib.sha256(package.read_bytes()).hexdigest()
    summary = image["summary"]
    assert (summary["vcpus"], summary["memory_bytes"], summary["ovf_version"], summary["disk_format"]) == (
        2, 192 * MiB, 1, "vmdk",
    )  # fmt: skip
    assert [(d["target"], d["capacity"]) for d in summary["disks"]] == [("vda", 8 * MiB), ("sda", 8 * MiB)]
    assert [(n["network"], n["model"]) for n in summary["nics"]] == [("user", "virtio")]
    assert not any((root / ".staging").iterdir()), "the export's staging folder was left"

    listed = json.loads(runner.invoke(app, ["images", "list", "--json", *home]).output)
    assert [i["id"] for i in listed] == [image["id"]]
    shown = runner.invoke(app, ["images", "show", image["id"][:8], "--json", *home])
    assert json.loads(shown.output) == image
    human = runner.invoke(app, ["images", "show", "golden", *home])
    assert human.exit_code == 0 and image["sha256"] in human.output and "vda" in human.output
    table = runner.invoke(app, ["images", "list", *home])
    assert table.exit_code == 0 and "golden" in table.output

    # Import by id: the store's record and the package digests are checked, the data is the set's.
    imported = pt.import_package(image["id"], f"{PREFIX}from-store")
    assert imported.image_id == image["id"] and imported.origin == "freezeframe"
    for disk, member in zip(imported.disks, s.members, strict=True):
        assert same_data(disk.path, member.path)
    ff.lifecycle.discard(imported.name)

    # Deleting is refused while an import reads the image; the record and data go together.
    with Holds(ff.locks).hold(f"image-{image['id']}", "test"):
        busy = runner.invoke(app, ["images", "delete", image["id"], *home])
        assert busy.exception is not None and "in use" in str(busy.exception)
    gone = runner.invoke(app, ["images", "delete", "golden", "--json", *home])
    assert gone.exit_code == 0 and json.loads(gone.output)["deleted"] == image["id"]
    assert not (root / image["id"]).exists()
    assert json.loads(runner.invoke(app, ["images", "list", "--json", *home]).output) == []
    with pytest.raises(ImageNotFound, match="no stored image matches"):
        pt.image(image["id"])
    missing = runner.invoke(app, ["import", "golden", "--as", f"{PREFIX}nope", *home])
    assert isinstance(missing.exception, ImageNotFound) and "no file of that name" in str(missing.exception)


def test_store_integrity_and_repair(ff: Freezeframe, pt: Pt, guest_image: GuestImage, tmp_path: Path) -> None:
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 7})
    stored = pt.export_to_store(s.id)
    assert stored.image is not None
    image = stored.image
    assert image.name == s.name and Path(image.location).is_file()
    # A package changed in the store is refused before anything is made.
    package = Path(image.location)
    data = bytearray(package.read_bytes())
    data[-2000] ^= 0xFF
    package.write_bytes(bytes(data))
    with pytest.raises(OvaDigestMismatch, match="changed or damaged in the store"):
        pt.import_package(image.id, f"{PREFIX}tampered")
    assert_nothing_left(pt, f"{PREFIX}tampered")
    # Leftovers of killed processes go; an interrupted delete is finished.
    store = pt.store
    assert isinstance(store, DirectoryImageStore)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (store.root / ".staging" / f"{'0' * 12}-{dead.pid}").mkdir(parents=True)
    (store.root / f".put-{uuid.uuid4()}-{dead.pid}").mkdir()
    store.records.mark(image.id, "deleting")
    reports = pt.repair()
    assert len(reports) == 3, reports
    assert not (store.root / image.id).exists()
    assert sorted(p.name for p in store.root.iterdir()) == [".staging"]
    assert not any((store.root / ".staging").iterdir())
    assert pt.images() == []
    # The store location is configurable; other backends are named and refused clearly.
    other = open_image_store(ff.settings.home, ff.catalog, f"file://{tmp_path / 'elsewhere'}")
    assert isinstance(other, DirectoryImageStore) and other.root == tmp_path / "elsewhere"
    with pytest.raises(InvalidRequest, match="not available yet"):
        open_image_store(ff.settings.home, ff.catalog, "s3://bucket/images")


def test_import_failures_leave_nothing_behind(
    ff: Freezeframe, pt: Pt, guest_image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = ff.hypervisor.conn
    s = synthetic_set(ff, synthetic_hardware(guest_image), {"vda": 1, "sda": 2, "hdb": 3})
    ova = tmp_path / "good.ova"
    pt.export(s.id, ova)

    taken = pt.import_package(ova, f"{PREFIX}taken")
    with pytest.raises(InvalidRequest, match=f"^an instance named '{PREFIX}taken' already exists; choose another"):
        pt.import_package(ova, f"{PREFIX}taken")
    assert domain_exists(conn, f"{PREFIX}taken") and (pt.instances_dir / taken.name).is_dir()
    with pytest.raises(InvalidRequest, match="not usable"):
        pt.import_package(ova, "../escape")

    leftover = pt.instances_dir / f"{PREFIX}leftover"
    leftover.mkdir()
    (leftover / "keep").write_text("mine")
    with pytest.raises(InvalidRequest, match="already exists"):
        pt.import_package(ova, f"{PREFIX}leftover")
    assert (leftover / "keep").read_text() == "mine"
    shutil.rmtree(leftover)

    with pytest.raises(InvalidRequest, match="ff-no-such-net"):
        pt.import_package(ova, f"{PREFIX}nonet", network="ff-no-such-net")
    assert_nothing_left(pt, f"{PREFIX}nonet")

    # Start fails after the disks were made and the domain defined: all of it is undone.
    def refuse(dom: Any) -> None:
        raise HypervisorError(f"{dom.name()} was defined but did not start: test")

    monkeypatch.setattr(ld, "start", refuse)
    with pytest.raises(HypervisorError, match="did not start"):
        pt.import_package(ova, f"{PREFIX}nostart", start=True)
    assert_nothing_left(pt, f"{PREFIX}nostart")
    monkeypatch.undo()

    # The second disk's conversion fails: the first one's file goes with the folder.
    real_convert = ff.images.convert
    count = 0

    def flaky(source: ImageRef, target: ImageRef, **kwargs: Any) -> None:
        nonlocal count
        count += 1
        if count == 2:
            raise HypervisorError(f"copying {source.path} to {target.path} failed: injected")
        real_convert(source, target, **kwargs)

    monkeypatch.setattr(ff.images, "convert", flaky)
    with pytest.raises(HypervisorError, match="injected"):
        pt.import_package(ova, f"{PREFIX}halfway")
    assert_nothing_left(pt, f"{PREFIX}halfway")
    monkeypatch.undo()

    # Our own package names files to boot (by file name: no host path leaves the host) and a machine type:
    # checked before anything is made. (Absolute paths of older packages: tests/test_ops_import.py.)
    cases: list[tuple[Hardware, type[Exception], str]] = [
        (
            replace(s.hardware, boot=BootSpec(kernel="/nonexistent/vmlinuz-not-here")),
            PreflightFailed,
            "no directory an import may boot from",
        ),
        (replace(s.hardware, machine="pc-i440fx-99.9"), PreflightFailed, "machine type pc-i440fx-99.9"),
    ]
    for i, (hardware, error, match) in enumerate(cases):
        path = tmp_path / f"bad-{i}.ova"
        pt.export(synthetic_set(ff, hardware, {"vda": 1}).id, path)
        with pytest.raises(error, match=match):
            pt.import_package(path, f"{PREFIX}bad-{i}")
        assert_nothing_left(pt, f"{PREFIX}bad-{i}")
    # The section is not signed: someone who re-writes the manifest can put anything in it.
    edited = rewrite_package(
        tmp_path, ova, b"&quot;vcpus&quot;:2", b"&quot;vcpus&quot;:&quot;2; rm -rf /&quot;", "edited.ova"
    )
    with pytest.raises(InvalidRequest, match=r"(?i)vcpus"):
        pt.import_package(edited, f"{PREFIX}edited")
    assert_nothing_left(pt, f"{PREFIX}edited")
    # The boot-file check looks at the content too, wherever the allowed directories are.
    fake = tmp_path / "boot" / "vmlinuz"
    fake.parent.mkdir()
    fake.write_bytes(b"not a kernel" * 100)
    fake_hw = Hardware(**{**vars(s.hardware), "boot": BootSpec(kernel=str(fake))})
    pt.export(synthetic_set(ff, fake_hw, {"vda": 1}).id, tmp_path / "fake.ova")
    permissive = wiring.portable(ff, boot_dirs=[fake.parent])
    with pytest.raises(InvalidRequest, match="does not look like a kernel"):
        permissive.import_package(tmp_path / "fake.ova", f"{PREFIX}fake")
    assert_nothing_left(pt, f"{PREFIX}fake")


# ---- third-party packages ------------------------------------------------------------------------------------

SAMPLE_EXPECTATIONS: dict[str, tuple[int, str]] = {
    "cot_ubuntu2.0.ova": (0, "imported"),
    "glance__testserver.ova": (3, "is 4 bytes: too small to be a vmdk image"),
    "govmomi__ttylinux-pc_i486-16.1.ova": (3, "Invalid footer"),
}


def test_every_sample_ova_has_an_expectation() -> None:
    if not OVA_SAMPLES.is_dir():
        pytest.skip(f"shared OVA samples not found at {OVA_SAMPLES}")
    assert sorted(p.name for p in OVA_SAMPLES.glob("*.ova")) == sorted(SAMPLE_EXPECTATIONS)


@pytest.mark.parametrize("sample", sorted(SAMPLE_EXPECTATIONS))
def test_sample_ovas_through_the_import_command(
    sample: str, ff: Freezeframe, pt: Pt, guest_image: GuestImage, libvirt_conn: Any
) -> None:
    path = OVA_SAMPLES / sample
    if not path.is_file():
        pytest.skip(f"shared OVA sample {path} not found")
    name = f"{PREFIX}sample-{sample.split('_')[0]}"
    code, expected = SAMPLE_EXPECTATIONS[sample]
    done = run_cli(["import", str(path), "--as", name], cli_env(ff.settings.home, guest_image))
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    if code != 0:
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], done.stderr
        assert_nothing_left(pt, name)
        return
    assert f"instance {name}" in done.stdout and "(foreign)" in done.stdout
    assert "libvirt network 'NAT' does not exist here; it uses user-mode networking" in done.stderr
    root = xml_of(libvirt_conn, name)
    assert root.get("type") == "qemu"
    assert root.findtext("vcpu") == "1" and int(root.findtext("memory") or 0) == 512 * 1024
    type_el = root.find("os/type")
    assert type_el is not None and (type_el.get("machine") or "").startswith("pc")
    assert root.find("os/kernel") is None and root.find("os").get("firmware") is None  # type: ignore[union-attr]
    assert disk_rows(root) == [("sda", "sata", "1")]
    nic = root.find("devices/interface")
    assert nic is not None and nic.get("type") == "user"
    assert nic.find("model").get("type") == "e1000"  # type: ignore[union-attr]
    disk = pt.instances_dir / name / "sda.qcow2"
    info = json.loads(qemu_img("info", "--output=json", str(disk)).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 8 * 2**30
    assert disk.stat().st_blocks * 512 < 16 * MiB, "the empty 8 GiB disk was not kept sparse"
    ff.lifecycle.discard(name)
    assert_nothing_left(pt, name)


def test_foreign_package_hardware_is_mapped(ff: Freezeframe, pt: Pt, tmp_path: Path, libvirt_conn: Any) -> None:
    package, sources = foreign_package(tmp_path, "VM Network")
    result = pt.import_package(package, f"{PREFIX}foreign")
    assert result.origin == "foreign" and result.vcpus == 3 and result.memory_kib == 1024 * 1024
    assert result.firmware == "efi" and result.machine == "pc" and not result.direct_kernel_boot
    assert any("'VM Network' does not exist here" in w for w in result.warnings), result.warnings
    root = xml_of(libvirt_conn, result.name)
    # Targets follow controller/unit addresses, whatever the item order; the descriptor's first disk boots.
    assert [(d.target, d.bus) for d in result.disks] == [
        ("sda", "scsi"),
        ("hda", "ide"),
        ("sdc", "scsi"),
        ("sdb", "scsi"),
    ]
    assert sorted(disk_rows(root)) == [("hda", "ide", None), ("sda", "scsi", "1"), ("sdb", "scsi", None),
                                       ("sdc", "scsi", None)]  # fmt: skip
    assert root.find("devices/controller[@type='scsi'][@model='virtio-scsi']") is not None
    assert root.find("os").get("firmware") == "efi"  # type: ignore[union-attr]
    nic = root.find("devices/interface")
    assert nic is not None and nic.get("type") == "user" and nic.find("model").get("type") == "vmxnet3"  # type: ignore[union-attr]
    by_target = {d.target: d for d in result.disks}
    assert same_data(by_target["sda"].path, sources["vmdisk1"])
    assert same_data(by_target["sdb"].path, sources["vmdisk2"])
    assert same_data(by_target["hda"].path, sources["vmdisk3"])
    assert by_target["sdc"].source == "blank"
    scratch = json.loads(qemu_img("info", "--output=json", by_target["sdc"].path).stdout)
    assert scratch["virtual-size"] == 4 * MiB
    ff.lifecycle.discard(result.name)
    assert_nothing_left(pt, result.name)


def test_nics_go_to_a_network_of_the_same_name_when_there_is_one(
    ff: Freezeframe, pt: Pt, tmp_path: Path, libvirt_conn: Any
) -> None:
    """An active network is used as is; an inactive one falls back with a warning, and --network must be usable."""

    class Host:
        def capabilities(self, arch: str, machine: str | None, domain_type: str) -> HostCapabilities:
            return HostCapabilities(efi=False, max_vcpus=None, disk_buses=frozenset())

        def network_state(self, name: str) -> str:
            return "active"

        def bridge_exists(self, name: str) -> bool:
            return False

    warnings: list[str] = []
    nic = Planner(Host(), "qemu", []).map_nic("network", "backend", "e1000", warnings)
    assert (nic.source_type, nic.source, nic.model, warnings) == ("network", "backend", "e1000", [])

    name = f"{PREFIX}net-{uuid.uuid4().hex[:6]}"
    net = libvirt_conn.networkDefineXML(f"<network><name>{name}</name><bridge name='ffptbr{name[-4:]}'/></network>")
    try:
        package, _ = foreign_package(tmp_path, name)
        with pytest.raises(InvalidRequest, match="is not active"):
            pt.import_package(package, f"{PREFIX}on-net", network=name)
        assert_nothing_left(pt, f"{PREFIX}on-net")
        result = pt.import_package(package, f"{PREFIX}on-net")
        assert any(f"{name!r} is not active" in w for w in result.warnings), result.warnings
        ff.lifecycle.discard(result.name)
    finally:
        net.undefine()
