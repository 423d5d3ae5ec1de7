"""Import planning and building, driven through scripted packages, images and domains (no QEMU, no libvirt).

They pin the guarantees of ``freezeframe.ops.import_build``: every disk is probed before anything is converted or
measured, every image handed to the image tool has its format pinned, and a failure at any step (conversion,
define, start, no space, an interrupt) leaves no disk, no folder, no marker and no domain.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from fakes import MemoryRestores
from freezeframe.adapters.locks import FileLocks
from freezeframe.errors import (
    HypervisorError,
    InstanceBusy,
    InsufficientSpace,
    InvalidRequest,
    OvaUnsafeDisk,
    OvfInvalidValue,
    PreflightFailed,
)
from freezeframe.model import BootSpec, DiskSpec, Hardware, NicSpec
from freezeframe.ops.common import Holds, Markers
from freezeframe.ops.import_build import Importer
from freezeframe.ops.import_plan import foreign_targets
from freezeframe.ops.instances import InstanceBuilder
from freezeframe.ports import (
    DeclaredDisk,
    DeclaredNic,
    DomainPlan,
    HostCapabilities,
    ImageRef,
    OpenedPackage,
    PackageFile,
    ProbedDisk,
    ProgressCallback,
    RecordedMember,
    RecordedSet,
    StoredImage,
)

MiB = 1 << 20
UUID = "0b0e0f00-1111-2222-3333-444455556666"


# ---- scripted adapters ----------------------------------------------------------------------------------------


@dataclass
class ScriptedPackages:
    package: OpenedPackage
    path: Path
    refuse: dict[str, Exception] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def write(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("an import never writes a package")

    def open(self, path: Path) -> OpenedPackage:
        self.calls.append(f"open {path.name}")
        return self.package

    def probe(self, file: PackageFile) -> ProbedDisk:
        self.calls.append(f"probe {file.name}")
        if file.name in self.refuse:
            raise self.refuse[file.name]
        image = ImageRef(self.path, "qcow2", offset=1536, size=8 * MiB, backing=False)
        return ProbedDisk(file.name, 8 * MiB, image)

    def sha256(self, path: Path) -> str:
        return "0" * 64


@dataclass
class ScriptedImages:
    """Makes real (tiny) files so that 'nothing left behind' is checked on disk."""

    calls: list[str] = field(default_factory=list)
    fail_convert_at: int | None = None
    interrupt_convert_at: int | None = None
    need: int = MiB
    sources: list[ImageRef] = field(default_factory=list)

    def create(self, path: Path, fmt: str, size: int | None = None, **_: object) -> None:
        self.calls.append(f"create {path.name}")
        path.write_bytes(b"blank")

    def convert(
        self, source: ImageRef, target: ImageRef, *, progress: ProgressCallback | None = None, **_: object
    ) -> None:
        self.calls.append(f"convert {target.path.name}")
        self.sources.append(source)
        count = sum(c.startswith("convert") for c in self.calls)
        target.path.write_bytes(b"partial")
        if count == self.fail_convert_at:
            raise HypervisorError(f"copying {source.path} to {target.path} failed: injected")
        if count == self.interrupt_convert_at:
            raise KeyboardInterrupt
        if progress is not None:
            progress(4 * MiB, 8 * MiB)
            progress(8 * MiB, 8 * MiB)

    def resize(self, path: Path, fmt: str, size: int) -> None:
        self.calls.append(f"resize {path.name} {size}")

    def measure(self, source: ImageRef, target_format: str) -> int:
        self.calls.append("measure")
        self.sources.append(source)
        return self.need


@dataclass
class ScriptedDomains:
    taken: set[str] = field(default_factory=set)
    networks: dict[str, str] = field(default_factory=dict)
    caps: HostCapabilities = field(default_factory=lambda: HostCapabilities(True, 64, frozenset()))
    define_fails: bool = False
    start_fails: bool = False
    defined: dict[str, DomainPlan] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def name_taken(self, name: str) -> bool:
        return name in self.taken or any(p.name == name for p in self.defined.values())

    def uuid_of(self, name: str) -> str | None:
        return next((uuid for uuid, plan in self.defined.items() if plan.name == name), None)

    def disk_sources(self, uuid: str) -> dict[str, str]:
        return {d.spec.target: str(d.path) for d in self.defined[uuid].disks}

    def network_state(self, name: str) -> str:
        return self.networks.get(name, "missing")

    def bridge_exists(self, name: str) -> bool:
        return False

    def capabilities(self, arch: str, machine: str | None, domain_type: str) -> HostCapabilities:
        if machine == "pc-i440fx-99.9":
            raise PreflightFailed(f"this host cannot run a {arch} guest with machine type {machine}")
        return self.caps

    def define(self, plan: DomainPlan) -> str:
        self.calls.append(f"define {plan.name}")
        if self.define_fails:
            raise HypervisorError("libvirt refused the domain: injected")
        self.defined[UUID] = plan
        return UUID

    def start(self, uuid: str) -> None:
        self.calls.append("start")
        if self.start_fails:
            raise HypervisorError("defined but did not start: injected")

    def remove(self, uuid: str) -> bool:
        self.calls.append("remove")
        return self.defined.pop(uuid, None) is not None


class NoStore:
    uri = "none:"

    def find(self, ref: str) -> StoredImage:
        from freezeframe.errors import ImageNotFound

        raise ImageNotFound(f"no stored image matches {ref!r}")


# ---- packages ----------------------------------------------------------------------------------------------


def own_hardware(**changes: object) -> Hardware:
    hw = Hardware(
        vcpus=2,
        memory_kib=262144,
        arch="x86_64",
        machine="pc",
        boot=BootSpec(boot_devices=("hd",)),
        disks=(
            DiskSpec("vda", "virtio", "/images/root.qcow2", "qcow2", 8 * MiB, boot_order=1),
            DiskSpec("sda", "scsi", "/images/data.qcow2", "qcow2", 16 * MiB),
            DiskSpec("hdc", "ide", "/images/install.iso", "raw", 0, device="cdrom", readonly=True),
        ),
        nics=(NicSpec("52:54:00:00:00:01", "virtio", "network", "ff-test-net"),),
    )
    return Hardware(**{**vars(hw), **changes})


def file_of(name: str, tmp_path: Path) -> PackageFile:
    return PackageFile(name)


def own_package(tmp_path: Path, hardware: Hardware | None = None) -> OpenedPackage:
    hw = hardware or own_hardware()
    return OpenedPackage(
        file_name="p.ova",
        machine_name="origin",
        vcpus=hw.vcpus,
        memory_bytes=hw.memory_kib * 1024,
        arch="x86_64",
        firmware=None,
        os_description=None,
        disks=(DeclaredDisk("vda", "p-vda.qcow2", 8 * MiB), DeclaredDisk("sda", "p-sda.qcow2", 16 * MiB)),
        nics=(DeclaredNic("ff-test-net", "virtio"),),
        files={"p-vda.qcow2": file_of("p-vda.qcow2", tmp_path), "p-sda.qcow2": file_of("p-sda.qcow2", tmp_path)},
        recorded=RecordedSet(
            hw,
            (
                RecordedMember("p-vda.qcow2", "vda", "virtio", 8 * MiB, 1),
                RecordedMember("p-sda.qcow2", "sda", "scsi", 16 * MiB, None),
            ),
        ),
    )


def foreign_package(tmp_path: Path) -> OpenedPackage:
    return OpenedPackage(
        file_name="appliance.ova",
        machine_name="appliance",
        vcpus=4,
        memory_bytes=512 * MiB,
        arch=None,
        firmware="efi",
        os_description="Debian",
        disks=(
            DeclaredDisk("d1", "disk1.vmdk", 8 * MiB, "scsi", "0", "1"),
            DeclaredDisk("d0", "disk0.vmdk", 8 * MiB, "scsi", "0", "0"),
            DeclaredDisk("blank", None, 4 * MiB, "ide", "1", "0"),
        ),
        nics=(DeclaredNic("VM Network", "VmxNet3"), DeclaredNic("nat", "SomeCard 2000")),
        files={"disk1.vmdk": file_of("disk1.vmdk", tmp_path), "disk0.vmdk": file_of("disk0.vmdk", tmp_path)},
        recorded=None,
    )


@dataclass
class World:
    tmp_path: Path
    packages: ScriptedPackages
    images: ScriptedImages
    domains: ScriptedDomains
    importer: Importer
    package_file: Path

    def run(self, name: str = "copy", **kwargs: object) -> object:
        return self.importer.import_package(self.package_file, name, **kwargs)  # type: ignore[arg-type]

    def assert_nothing_left(self, name: str = "copy") -> None:
        assert not self.domains.defined, "a domain was left defined"
        assert not (self.tmp_path / "instances" / name).exists(), "the instance folder was left"
        markers = self.tmp_path / "markers"
        assert not markers.exists() or not any(markers.iterdir()), "a marker was left"


def world(tmp_path: Path, package: OpenedPackage | None = None, **domains: object) -> World:
    packages = ScriptedPackages(package or own_package(tmp_path), tmp_path / "p.ova")
    images = ScriptedImages()
    scripted = ScriptedDomains(networks={"ff-test-net": "active"}, **domains)  # type: ignore[arg-type]
    holds = Holds(FileLocks(tmp_path / "locks"))
    builder = InstanceBuilder(lambda: scripted, Markers(tmp_path / "markers"), MemoryRestores(), holds)  # type: ignore[arg-type,return-value]
    importer = Importer(
        packages, NoStore(), images, scripted, builder, holds, tmp_path / "instances", boot_dirs=[tmp_path / "boot"]
    )  # type: ignore[arg-type]
    package_file = tmp_path / "p.ova"
    package_file.write_bytes(b"scripted")
    return World(tmp_path, packages, images, scripted, importer, package_file)


# ---- the good path -------------------------------------------------------------------------------------------


def test_own_package_is_rebuilt_as_recorded(tmp_path: Path) -> None:
    w = world(tmp_path)
    seen: list[tuple[int, int]] = []
    result = w.importer.import_package(w.package_file, "copy", start=True, progress=lambda d, t: seen.append((d, t)))
    plan = w.domains.defined[UUID]
    assert [(d.spec.target, d.spec.bus, d.spec.boot_order) for d in plan.disks] == [
        ("vda", "virtio", 1), ("sda", "scsi", None),
    ]  # fmt: skip
    assert plan.scsi_model == "virtio-scsi" and plan.directory == tmp_path / "instances" / "copy"
    assert [n.source for n in plan.hardware.nics] == ["ff-test-net"]
    assert result.origin == "freezeframe" and result.started and result.uuid == UUID
    assert result.left_out == {"hdc": "cdrom: not part of a snapshot set"}
    assert w.domains.calls == ["define copy", "start"]
    # sda was declared 16 MiB but holds 8 MiB: grown to the declared capacity after conversion.
    assert "resize sda.qcow2 16777216" in w.images.calls
    assert seen[-1] == (16 * MiB, 16 * MiB) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert not any((tmp_path / "markers").iterdir()), "the marker outlived a complete import"
    folder = tmp_path / "instances" / "copy"
    assert folder.stat().st_mode & 0o777 == 0o700
    assert sorted((p.name, p.stat().st_mode & 0o777) for p in folder.iterdir()) == [
        ("sda.qcow2", 0o600), ("vda.qcow2", 0o600),
    ]  # fmt: skip


def test_a_disk_another_tool_added_to_our_package_is_mapped_generically(tmp_path: Path) -> None:
    """``cot add-disk`` adds a file our section does not list: attached on a free target, with a warning."""
    package = own_package(tmp_path)
    extra = DeclaredDisk("vmdisk3", "added.vmdk", 4 * MiB, "virtio")
    package = replace(
        package, disks=(*package.disks, extra), files={**package.files, "added.vmdk": PackageFile("added.vmdk")}
    )
    w = world(tmp_path, package)
    result = w.run()
    plan = w.domains.defined[UUID]
    assert [(d.spec.target, d.spec.bus) for d in plan.disks] == [("vda", "virtio"), ("sda", "scsi"), ("vdb", "virtio")]
    assert any("'added.vmdk' is not in the package's freezeframe section" in m and "vdb" in m
               for m in result.warnings)  # type: ignore[attr-defined]  # fmt: skip
    assert "probe added.vmdk" in w.packages.calls


def test_a_recorded_kernel_file_name_is_found_in_the_boot_directories(tmp_path: Path) -> None:
    boot_dir = tmp_path / "boot"
    boot_dir.mkdir()
    (boot_dir / "vmlinuz").write_bytes(b"\x7fELF" + bytes(0x240))
    (boot_dir / "initrd.gz").write_bytes(b"\x1f\x8b" + bytes(16))
    hw = own_hardware(boot=BootSpec(kernel="vmlinuz", initrd="initrd.gz", cmdline="console=ttyS0"))
    w = world(tmp_path, own_package(tmp_path, hw))
    w.run()
    boot = w.domains.defined[UUID].hardware.boot
    assert (boot.kernel, boot.initrd) == (str(boot_dir / "vmlinuz"), str(boot_dir / "initrd.gz"))


def test_a_recorded_kernel_file_name_missing_here_is_refused(tmp_path: Path) -> None:
    w = world(tmp_path, own_package(tmp_path, own_hardware(boot=BootSpec(kernel="vmlinuz-9.9"))))
    with pytest.raises(PreflightFailed, match="no directory an import may boot from"):
        w.run()
    w.assert_nothing_left()


@pytest.mark.parametrize(
    ("kernel", "error", "match"),
    [
        ("/nonexistent/vmlinuz", PreflightFailed, "this host has no such file"),
        ("/etc/passwd", InvalidRequest, "outside the directories an import may boot from"),
    ],
)
def test_an_absolute_kernel_path_of_an_older_package_is_checked_where_it_is(
    tmp_path: Path, kernel: str, error: type[Exception], match: str
) -> None:
    (tmp_path / "boot").mkdir()
    w = world(tmp_path, own_package(tmp_path, own_hardware(boot=BootSpec(kernel=kernel))))
    with pytest.raises(error, match=match):
        w.run()
    w.assert_nothing_left()


def test_every_disk_is_probed_before_anything_reads_it_and_formats_are_pinned(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.run()
    order = w.packages.calls + w.images.calls
    assert order[:3] == ["open p.ova", "probe p-vda.qcow2", "probe p-sda.qcow2"]
    assert w.images.calls[0] == "measure", "space is measured only after every probe"
    assert all(ref.format == "qcow2" and not ref.backing for ref in w.images.sources)


def test_foreign_package_is_mapped(tmp_path: Path) -> None:
    w = world(tmp_path, foreign_package(tmp_path))
    result = w.run()
    plan = w.domains.defined[UUID]
    assert [(d.spec.target, d.spec.bus, d.spec.boot_order) for d in plan.disks] == [
        ("sdb", "scsi", 1), ("sda", "scsi", None), ("hda", "ide", None),
    ]  # fmt: skip
    assert plan.hardware.boot.firmware == "efi" and plan.hardware.machine == "pc"
    assert [(n.model, n.source_type) for n in plan.hardware.nics] == [("vmxnet3", "user"), ("e1000", "user")]
    assert any("no QEMU equivalent" in w for w in result.warnings)  # type: ignore[attr-defined]
    assert "create hda.qcow2" in w.images.calls


def test_foreign_targets_follow_controller_and_unit_order() -> None:
    warnings: list[str] = []
    disks = [DeclaredDisk(f"d{i}", None, MiB, "ide", str(i // 2), str(i % 2)) for i in range(5)]
    buses, targets = foreign_targets(disks, warnings)
    assert buses == ["sata"] * 5 and targets == ["sda", "sdb", "sdc", "sdd", "sde"]
    assert "do not fit on 2 IDE channels" in warnings[0]


# ---- refusals before anything is made ---------------------------------------------------------------------


def test_name_conflict_says_only_that_the_name_is_taken(tmp_path: Path) -> None:
    w = world(tmp_path, taken={"copy"})
    with pytest.raises(InvalidRequest) as caught:
        w.run()
    assert str(caught.value) == "an instance named 'copy' already exists; choose another name with --as"
    assert w.packages.calls == [] and w.images.calls == []
    w.assert_nothing_left()


@pytest.mark.parametrize("name", ["../escape", "a b", "copy\n", "", "x" * 64])
def test_unusable_names_are_refused(tmp_path: Path, name: str) -> None:
    w = world(tmp_path)
    with pytest.raises(InvalidRequest, match="not usable"):
        w.run(name)
    assert w.packages.calls == []


def test_hostile_disk_is_refused_before_any_image_call(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.packages.refuse["p-sda.qcow2"] = OvaUnsafeDisk("'p-sda.qcow2' names a file outside the package; refused")
    with pytest.raises(OvaUnsafeDisk, match="outside the package"):
        w.run()
    assert w.images.calls == [], "the image tool opened package data before every disk passed the probe"
    w.assert_nothing_left()


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"vcpus": "2; rm -rf /"}, OvfInvalidValue, "vCPUs"),
        ({"machine": "pc-i440fx-99.9"}, PreflightFailed, "machine type pc-i440fx-99.9"),
        ({"boot": BootSpec(kernel="/nonexistent/vmlinuz")}, PreflightFailed, "no such file"),
        ({"boot": BootSpec(kernel="/etc/passwd")}, InvalidRequest, "outside the directories"),
        ({"metadata_xml": "<!DOCTYPE x>"}, OvfInvalidValue, "DOCTYPE"),
        ({"vcpus": 128}, PreflightFailed, "allows 64"),
    ],
)
def test_recorded_hardware_is_checked_before_anything_is_made(
    tmp_path: Path, changes: Mapping[str, object], error: type[Exception], match: str
) -> None:
    w = world(tmp_path, own_package(tmp_path, own_hardware(**changes)))
    with pytest.raises(error, match=match):
        w.run()
    assert w.images.calls == [] and w.domains.calls == []
    w.assert_nothing_left()


def test_efi_without_firmware_is_refused_for_our_package(tmp_path: Path) -> None:
    caps = HostCapabilities(efi=False, max_vcpus=None, disk_buses=frozenset({"virtio", "scsi"}))
    w = world(tmp_path, own_package(tmp_path, own_hardware(boot=BootSpec(firmware="efi"))), caps=caps)
    with pytest.raises(PreflightFailed, match="install OVMF"):
        w.run()
    w.assert_nothing_left()


def test_missing_network_is_refused(tmp_path: Path) -> None:
    w = world(tmp_path)
    with pytest.raises(InvalidRequest, match="ff-no-such-net"):
        w.run(network="ff-no-such-net")
    assert w.packages.calls == []


def test_no_space_makes_nothing(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.images.need = 1 << 60
    with pytest.raises(InsufficientSpace, match="free space and retry"):
        w.run()
    assert not any(c.startswith(("convert", "create")) for c in w.images.calls)
    w.assert_nothing_left()


def test_leftover_folder_is_never_reused(tmp_path: Path) -> None:
    w = world(tmp_path)
    leftover = tmp_path / "instances" / "copy"
    leftover.mkdir(parents=True)
    (leftover / "keep").write_text("mine")
    with pytest.raises(InvalidRequest, match="already exists"):
        w.run()
    assert (leftover / "keep").read_text() == "mine" and w.images.calls == ["measure", "measure"]


def test_busy_name_is_refused(tmp_path: Path) -> None:
    w = world(tmp_path)
    with Holds(FileLocks(tmp_path / "locks")).name("copy"), pytest.raises(InstanceBusy):
        w.run()
    w.assert_nothing_left()


# ---- failures in the middle: nothing is left behind ----------------------------------------------------------


def test_second_conversion_fails(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.images.fail_convert_at = 2
    with pytest.raises(HypervisorError, match="injected"):
        w.run()
    assert w.domains.calls == []
    w.assert_nothing_left()


def test_define_fails(tmp_path: Path) -> None:
    w = world(tmp_path, define_fails=True)
    with pytest.raises(HypervisorError, match="refused"):
        w.run()
    w.assert_nothing_left()


def test_start_fails_after_define(tmp_path: Path) -> None:
    w = world(tmp_path, start_fails=True)
    with pytest.raises(HypervisorError, match="did not start"):
        w.run(start=True)
    assert w.domains.calls == ["define copy", "start", "remove"]
    w.assert_nothing_left()


def test_interrupt_during_conversion(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.images.interrupt_convert_at = 1
    with pytest.raises(KeyboardInterrupt):
        w.run()
    w.assert_nothing_left()


def test_the_name_is_free_again_after_a_failure(tmp_path: Path) -> None:
    w = world(tmp_path, define_fails=True)
    with pytest.raises(HypervisorError):
        w.run()
    w.domains.define_fails = False
    assert w.run().name == "copy"  # type: ignore[attr-defined]


# ---- a stored image as the source ------------------------------------------------------------------------


@dataclass
class OneImageStore:
    image: StoredImage
    local: Path
    uri: str = "file:///scripted"

    def find(self, ref: str) -> StoredImage:
        return self.image

    @contextlib.contextmanager
    def local_file(self, image_id: str) -> Iterator[Path]:
        yield self.local


def test_a_changed_stored_image_is_refused(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from freezeframe.errors import OvaDigestMismatch
    from freezeframe.ports import ImageSummary

    w = world(tmp_path)
    summary = ImageSummary("m", 1, MiB, 1, "qcow2")
    image = StoredImage("img-1", "golden", "p.ova", "file:///s", 8, "f" * 64, datetime.now(UTC), summary)
    w.importer.store = OneImageStore(image, w.package_file)  # type: ignore[assignment]
    with pytest.raises(OvaDigestMismatch, match="changed or damaged in the store"):
        w.importer.import_package("golden", "copy")
    assert w.packages.calls == []
    w.assert_nothing_left()


# ---- the OVA adapter: what planning reads, and the only readable form of a disk ---------------------------------


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed (qemu-utils)")
def test_ova_adapter_opens_and_probes_a_package(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from freezeframe.adapters.ovf.product import portable_hardware
    from freezeframe.adapters.packages import OvaPackages
    from freezeframe.model import Consistency, Member, SetStatus, SnapshotSet
    from freezeframe.ports import PackageSource

    member = tmp_path / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(member), "8M"], check=True)
    hw = own_hardware()
    s = SnapshotSet(
        id="5e7a0000-0000-0000-0000-000000000001", name="nightly", instance_name="origin", instance_uuid=UUID,
        requested=Consistency.CRASH, status=SetStatus.AVAILABLE, created_at=datetime.now(UTC), hardware=hw,
        members=[Member("5e7a0000-0000-0000-0000-000000000001", "vda", "virtio", 1, 8 * MiB, "qcow2", str(member))],
    )  # fmt: skip
    ova = tmp_path / "p.ova"
    OvaPackages().write(ova, s, "p.ovf", [PackageSource("p-vda.qcow2", ImageRef(member, "qcow2"), "vda")], 1, None)
    opened = OvaPackages().open(ova)
    assert opened.recorded is not None and opened.recorded.hardware == portable_hardware(hw)
    assert [(m.href, m.target) for m in opened.recorded.members] == [("p-vda.qcow2", "vda")]
    assert [(d.href, d.capacity) for d in opened.disks] == [("p-vda.qcow2", 8 * MiB)]
    probed = OvaPackages().probe(opened.files["p-vda.qcow2"])
    assert probed.virtual_size == 8 * MiB
    assert probed.image.path == ova and probed.image.format == "qcow2" and not probed.image.backing
    assert probed.image.offset > 0 and probed.image.size is not None and probed.image.size % 512 == 0
