"""Import planning: an opened package and this host's abilities in, the machine to build out. Makes nothing.

Our own package brings the machine exactly as its set recorded it (boot method, machine type, buses, targets),
checked value by value; another tool's package is mapped from its OVF hardware (BIOS unless it asks for UEFI and
the host has it). Either way the host must be able to run the result, and every NIC goes to a network or bridge
of the same name if one is here, else to user-mode networking (with a warning).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from freezeframe.errors import InvalidRequest, OvfInvalidValue, PreflightFailed
from freezeframe.model import BootSpec, DiskSpec, Hardware, NicSpec
from freezeframe.ops.import_checks import (
    ARCH_RE,
    BRIDGE_RE,
    NET_RE,
    TARGET_PREFIX,
    check_buses,
    check_disk_spec,
    check_hardware,
    check_unique_targets,
    check_vcpus,
    find_boot_file,
)
from freezeframe.ports import DeclaredDisk, HostCapabilities, OpenedPackage, ProbedDisk

IMPORTED_FORMAT = "qcow2"
FOREIGN_MACHINES = {"x86_64": "pc", "i686": "pc"}
"""i440fx: it has IDE (q35 does not) and every guest OS knows it; libvirt adds AHCI/SCSI controllers as needed."""

_FOREIGN_BUS = {"virtio": "virtio", "scsi": "scsi", "virtio-scsi": "scsi", "sata": "sata", "ide": "ide"}
_NIC_MODELS = {
    "e1000": "e1000",
    "e1000e": "e1000e",
    "vmxnet3": "vmxnet3",
    "pcnet32": "pcnet",
    "pcnet": "pcnet",
    "virtio": "virtio",
    "virtio-net": "virtio",
    "rtl8139": "rtl8139",
}


class ImportHost(Protocol):
    """What planning asks of the host (a subset of the ``Domains`` port)."""

    def capabilities(self, arch: str, machine: str | None, domain_type: str) -> HostCapabilities: ...

    def network_state(self, name: str) -> str: ...

    def bridge_exists(self, name: str) -> bool: ...


@dataclass(frozen=True)
class DiskPlan:
    spec: DiskSpec
    source: ProbedDisk | None
    """None: a blank disk of ``capacity`` bytes."""
    capacity: int
    virtual_size: int


@dataclass
class ImportPlan:
    origin: str
    """``freezeframe`` (our package: the recorded machine) or ``foreign`` (mapped from the OVF hardware)."""
    hardware: Hardware
    disks: list[DiskPlan]
    warnings: list[str]
    left_out: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Planner:
    host: ImportHost
    domain_type: str
    boot_dirs: Sequence[Path]
    network: str | None = None
    """Every NIC on this libvirt network (``--network``), checked to exist and be active first."""

    def require_network(self) -> None:
        if self.network is None:
            return
        state = self.host.network_state(self.network) if NET_RE.match(self.network) else "missing"
        if state == "missing":
            raise InvalidRequest(
                f"libvirt network {self.network!r} does not exist; define and start it (`virsh net-define`, "
                "`virsh net-start`) or leave out --network"
            )
        if state == "inactive":
            raise InvalidRequest(
                f"libvirt network {self.network!r} exists but is not active; `virsh net-start {self.network}`"
            )

    def plan(self, package: OpenedPackage, probed: Mapping[str, ProbedDisk]) -> ImportPlan:
        """``probed``: every disk file of the package as the probe accepted it, by href."""
        recorded = package.recorded
        if recorded is not None and recorded.hardware is not None:
            return self.plan_own(package, recorded.hardware, probed)
        plan = self.plan_foreign(package, probed)
        if recorded is not None:
            plan.warnings.insert(0, "the package has a freezeframe section without hardware; mapped from its OVF")
        return plan

    def plan_own(self, package: OpenedPackage, hw: Hardware, probed: Mapping[str, ProbedDisk]) -> ImportPlan:
        """Our package: the machine exactly as the set recorded it (boot method, machine type, buses, targets)."""
        assert package.recorded is not None
        warnings = list(package.warnings)
        check_hardware(hw)
        caps = self.host.capabilities(hw.arch, hw.machine, self.domain_type)
        if hw.boot.firmware == "efi" and not caps.efi:
            raise PreflightFailed(
                f"the package's machine boots with UEFI firmware, which this host's libvirt cannot provide for "
                f"{hw.arch}/{hw.machine}; install OVMF (package ovmf) and import again"
            )
        boot = replace(
            hw.boot,
            kernel=None if hw.boot.kernel is None else find_boot_file(hw.boot.kernel, "kernel", self.boot_dirs),
            initrd=None if hw.boot.initrd is None else find_boot_file(hw.boot.initrd, "initrd", self.boot_dirs),
        )
        check_vcpus(caps, hw.vcpus)
        recorded_hrefs = {m.href for m in package.recorded.members if m.href and m.target}
        own = [d for d in package.disks if d.href is not None and d.href in recorded_hrefs]
        disks = [self._own_disk(package, hw, disk, probed) for disk in own]
        taken = {d.target for d in hw.disks}
        disks += added_disks([d for d in package.disks if d not in own], taken, probed, warnings)
        specs = [d.spec for d in disks]
        check_unique_targets(specs)
        check_buses(caps, specs)
        captured = {s.target for s in specs}
        left_out = {
            d.target: (f"{d.device}: not part of a snapshot set" if d.device != "disk" else "not in the package")
            for d in hw.disks
            if d.target not in captured
        }
        nics = [self.map_nic(n.source_type, n.source, n.model, warnings) for n in hw.nics]
        if package.vcpus != hw.vcpus:
            warnings.append(
                f"the OVF hardware says {package.vcpus} vCPUs, the freezeframe section {hw.vcpus}; "
                "the section's machine is restored"
            )
        hardware = replace(hw, domain_type=self.domain_type, boot=boot, disks=tuple(specs), nics=tuple(nics))
        return ImportPlan("freezeframe", hardware, disks, warnings, left_out)

    @staticmethod
    def _own_disk(
        package: OpenedPackage, hw: Hardware, disk: DeclaredDisk, probed: Mapping[str, ProbedDisk]
    ) -> DiskPlan:
        """A disk file our section records (``plan_own`` sends the others to ``added_disks``)."""
        assert package.recorded is not None and disk.href is not None
        member = next(m for m in package.recorded.members if m.href == disk.href and m.target)
        spec = {d.target: d for d in hw.disks}.get(member.target) or DiskSpec(
            target=member.target, bus=member.bus or "virtio", source_path=None, format=IMPORTED_FORMAT,
            virtual_size=member.virtual_size or disk.capacity, boot_order=member.boot_order,
        )  # fmt: skip
        spec = replace(spec, format=IMPORTED_FORMAT, device="disk", readonly=False, shareable=False)
        check_disk_spec(spec)
        source = probed[disk.href]
        return DiskPlan(spec, source, disk.capacity, source.virtual_size)

    def plan_foreign(self, package: OpenedPackage, probed: Mapping[str, ProbedDisk]) -> ImportPlan:
        """Another tool's package: hardware mapped from the OVF, BIOS boot (UEFI if it asks and we can)."""
        warnings = list(package.warnings)
        arch = package.arch or "x86_64"
        if not ARCH_RE.match(arch):
            raise OvfInvalidValue(f"architecture {arch!r} is not one libvirt knows")
        machine = FOREIGN_MACHINES.get(arch)
        caps = self.host.capabilities(arch, machine, self.domain_type)
        firmware = "bios"
        if (package.firmware or "").lower() in ("efi", "uefi"):
            if caps.efi:
                firmware = "efi"
            else:
                warnings.append("the package asks for UEFI firmware, which this host lacks (install ovmf); BIOS used")
        check_vcpus(caps, package.vcpus)
        buses, targets = foreign_targets(package.disks, warnings)
        first_data = next((i for i, d in enumerate(package.disks) if d.href is not None), None)
        disks: list[DiskPlan] = []
        for i, disk in enumerate(package.disks):
            spec = DiskSpec(
                target=targets[i], bus=buses[i], source_path=None, format=IMPORTED_FORMAT,
                virtual_size=disk.capacity, boot_order=1 if i == first_data else None,
            )  # fmt: skip
            if disk.href is None:
                disks.append(DiskPlan(spec, None, disk.capacity, disk.capacity))
            else:
                source = probed[disk.href]
                disks.append(DiskPlan(spec, source, disk.capacity, source.virtual_size))
        check_buses(caps, [d.spec for d in disks])
        nics = [self.map_nic("network", nic.network, foreign_nic_model(nic.model, warnings), warnings)
                for nic in package.nics]  # fmt: skip
        description = f"imported by freezeframe from {package.file_name}: {package.machine_name}"
        if package.os_description:
            description += f" ({package.os_description})"
        hardware = Hardware(
            vcpus=package.vcpus,
            memory_kib=-(-package.memory_bytes // 1024),
            arch=arch,
            machine=machine,
            domain_type=self.domain_type,
            boot=BootSpec(firmware=firmware),
            disks=tuple(d.spec for d in disks),
            nics=tuple(nics),
            description=description,
        )
        return ImportPlan("foreign", hardware, disks, warnings)

    def map_nic(self, kind: str, source: str | None, model: str | None, warnings: list[str]) -> NicSpec:
        """A libvirt network of the same name if one is active here, else user-mode networking (with a warning)."""
        if self.network is not None:
            return NicSpec("", model, "network", self.network)
        if kind == "user":
            return NicSpec("", model, "user", None)
        label = f"NIC on {source!r}" if source else "NIC without a network"
        if kind == "bridge":
            if source and BRIDGE_RE.match(source) and self.host.bridge_exists(source):
                return NicSpec("", model, "bridge", source)
            warnings.append(f"{label}: no such host bridge here; it uses user-mode networking instead")
            return NicSpec("", model, "user", None)
        if kind != "network":
            warnings.append(f"{label}: interfaces of type {kind!r} are not rebuilt; it uses user-mode networking")
            return NicSpec("", model, "user", None)
        if source and NET_RE.match(source):
            state = self.host.network_state(source)
            if state == "active":
                return NicSpec("", model, "network", source)
            why = "is not active (`virsh net-start`)" if state == "inactive" else "does not exist here"
            warnings.append(
                f"{label}: libvirt network {source!r} {why}; it uses user-mode networking instead "
                "(or import with --network NAME)"
            )
        else:
            warnings.append(f"{label}: no usable libvirt network name; it uses user-mode networking instead")
        return NicSpec("", model, "user", None)


def added_disks(
    added: Sequence[DeclaredDisk], taken: set[str], probed: Mapping[str, ProbedDisk], warnings: list[str]
) -> list[DiskPlan]:
    """Disks another tool added to one of our packages (``cot add-disk``): not in our section, so mapped like a
    foreign package's, on targets the recorded machine does not use, after its own disks."""
    if not added:
        return []
    buses, _ = foreign_targets(added, warnings)
    plans: list[DiskPlan] = []
    for disk, bus in zip(added, buses, strict=True):
        prefix = TARGET_PREFIX[bus]
        n = 0
        while prefix + _letters(n) in taken:
            n += 1
        target = prefix + _letters(n)
        taken.add(target)
        spec = DiskSpec(target=target, bus=bus, source_path=None, format=IMPORTED_FORMAT, virtual_size=disk.capacity)
        check_disk_spec(spec)
        what = f"disk file {disk.href!r}" if disk.href else f"blank disk {disk.disk_id!r}"
        warnings.append(
            f"{what} is not in the package's freezeframe section (added by another tool?): attached as {target} "
            f"on {bus}"
        )
        if disk.href is None:
            plans.append(DiskPlan(spec, None, disk.capacity, disk.capacity))
        else:
            source = probed[disk.href]
            plans.append(DiskPlan(spec, source, disk.capacity, source.virtual_size))
    return plans


def foreign_nic_model(model: str | None, warnings: list[str]) -> str:
    key = (model or "").lower().split()[0] if (model or "").strip() else ""
    mapped = _NIC_MODELS.get(key)
    if mapped is None:
        mapped = "e1000"
        if key:
            warnings.append(f"NIC model {model!r} has no QEMU equivalent; an e1000 is attached instead")
    return mapped


def _letters(n: int) -> str:
    """0 -> a, 25 -> z, 26 -> aa: libvirt's disk target suffixes."""
    return (_letters(n // 26 - 1) if n >= 26 else "") + chr(ord("a") + n % 26)


def _num(value: str | None) -> int:
    return int(value) if value is not None and value.strip().isdigit() and len(value.strip()) <= 6 else 0


def foreign_targets(disks: Sequence[DeclaredDisk], warnings: list[str]) -> tuple[list[str], list[str]]:
    """(bus, target) per disk: buses from the OVF controllers, targets in controller/unit order per bus."""
    buses: list[str] = []
    for disk in disks:
        bus = _FOREIGN_BUS.get(disk.controller or "")
        if bus is None:
            warnings.append(
                f"disk {disk.disk_id}: controller {disk.controller or '(none)'} has no libvirt equivalent here; "
                "it is attached as virtio"
            )
            bus = "virtio"
        buses.append(bus)
    if buses.count("ide") > 4:
        warnings.append(f"{buses.count('ide')} IDE disks do not fit on 2 IDE channels; they are attached as SATA")
        buses = ["sata" if b == "ide" else b for b in buses]
    rank = {"virtio": 0, "scsi": 0, "ide": 0, "sata": 1, "usb": 2}
    order = sorted(
        range(len(disks)),
        key=lambda i: (
            TARGET_PREFIX[buses[i]], rank[buses[i]], _num(disks[i].controller_address), _num(disks[i].address), i,
        ),
    )  # fmt: skip
    targets = [""] * len(disks)
    counters: dict[str, int] = {}
    for i in order:
        prefix = TARGET_PREFIX[buses[i]]
        targets[i] = prefix + _letters(counters.get(prefix, 0))
        counters[prefix] = counters.get(prefix, 0) + 1
    return buses, targets
