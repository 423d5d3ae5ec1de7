"""Describe a snapshot set as an OVF descriptor that VMware, VirtualBox, oVirt and virt-v2v accept.

One VirtualSystem (a group set: a VirtualSystemCollection of them): References and DiskSection for the
package's disk files, a NetworkSection, the
hardware as RASD Items (CPU, memory, one controller per bus as disks need them, disks, NICs), the
firmware as a VMware Config, and our ProductSection. See docs/ovf.md for the choices.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence

from lxml import etree

from freezeframe import __version__
from freezeframe.adapters.ovf.model import (
    FREEZEFRAME_CLASS,
    MAX_CAPACITY,
    NS_EPASD,
    NS_OVF1,
    NS_OVF2,
    NS_RASD,
    NS_SASD,
    NS_VMW,
    NS_VSSD,
    NS_XML,
    WRITE_FORMAT_URIS,
    OvfDisk,
)
from freezeframe.adapters.ovf.product import freezeframe_properties
from freezeframe.adapters.ovf.safexml import qname
from freezeframe.errors import OvfBuildError
from freezeframe.model import Hardware, Member, NicSpec, SnapshotSet

_SAFE_HREF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Characters XML 1.0 cannot carry at all (NUL, C0 controls but tab/newline/CR, surrogates, U+FFFE/U+FFFF).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_RASD_ORDER = (
    "Address",
    "AddressOnParent",
    "AllocationUnits",
    "AutomaticAllocation",
    "Caption",
    "Connection",
    "Description",
    "ElementName",
    "HostResource",
    "InstanceID",
    "Parent",
    "ResourceSubType",
    "ResourceType",
    "VirtualQuantity",
)

# libvirt bus -> (ResourceType, ResourceSubType, units per controller). Subtypes are space-separated
# preference lists (a KVM value first, then one VMware understands), the convention COT uses;
# virt-v2v only looks at ResourceType (5 IDE, 6 SCSI, 20 SATA). See docs/ovf.md.
_CONTROLLERS: Mapping[str, tuple[int, str, int]] = {
    "virtio": (6, "virtio lsilogic", 15),
    "scsi": (6, "virtio-scsi lsilogic", 15),
    "sata": (20, "AHCI vmware.sata.ahci", 30),
    "ide": (5, "PIIX4", 2),
}

_NIC_MODELS: Mapping[str, str] = {
    "virtio": "virtio",
    "e1000": "E1000",
    "e1000e": "E1000e",
    "vmxnet3": "VmxNet3",
    "rtl8139": "rtl8139",
    "pcnet": "PCNet32",
}

_ARCH_64 = ("x86_64", "aarch64", "ppc64", "ppc64le", "s390x", "riscv64", "loongarch64", "mips64", "mips64el")


def check_xml_text(what: str, value: str) -> None:
    """Refuse a value lxml cannot write (it would fail deep inside the export with a ValueError)."""
    bad = _NOT_XML.search(value)
    if bad is not None:
        raise OvfBuildError(
            f"{what} holds the character U+{ord(bad.group()):04X}, which an OVF descriptor (XML) cannot carry"
        )


def _network_name(nic: NicSpec) -> str:
    return nic.source or nic.source_type or "default"


def _check_disks(disks: Sequence[OvfDisk], members: Mapping[str, Member]) -> None:
    seen: set[str] = set()
    for disk in disks:
        if not _SAFE_HREF.match(disk.href) or ".." in disk.href:
            raise OvfBuildError(
                f"package file name {disk.href!r} must be 1-100 characters of letters, digits, '.', '_', '-'"
            )
        if disk.href in seen:
            raise OvfBuildError(f"package file name {disk.href!r} is used twice")
        seen.add(disk.href)
        if disk.target not in members:
            raise OvfBuildError(f"disk {disk.href!r} names target {disk.target!r}, not a member of the set")
        if disk.format not in WRITE_FORMAT_URIS:
            raise OvfBuildError(f"disk format {disk.format!r} has no OVF format URI we write")
        if not 0 < disk.capacity <= MAX_CAPACITY:
            raise OvfBuildError(f"disk {disk.href!r} capacity {disk.capacity} is out of range")
        if disk.file_size < 0 or (disk.populated_size is not None and disk.populated_size < 0):
            raise OvfBuildError(f"disk {disk.href!r} has a negative size")


def _check_texts(snapshot_set: SnapshotSet, members: Mapping[str, Member], props: Sequence[tuple[str, str]]) -> None:
    """Every text the descriptor will carry, named by what it is, before any element is built."""
    hw = snapshot_set.hardware
    texts = [
        ("instance name", snapshot_set.instance_name),
        ("hardware arch", hw.arch),
        ("hardware machine", hw.machine or ""),
        ("hardware description", hw.description or ""),
        ("firmware", hw.boot.firmware),
        *((f"disk {m.target} bus", m.bus) for m in members.values()),
        *((f"NIC {i} network", _network_name(n)) for i, n in enumerate(hw.nics)),
        *((f"NIC {i} model", n.model or "") for i, n in enumerate(hw.nics)),
        *((f"NIC {i} MAC address", n.mac or "") for i, n in enumerate(hw.nics)),
    ]
    for key, value in props:
        check_xml_text(f"property key {key!r}", key)
        check_xml_text(f"metadata/property {key!r}", value)
    for what, value in texts:
        check_xml_text(what, value)


def build_descriptor(snapshot_set: SnapshotSet, disks: Sequence[OvfDisk], ovf_version: int = 1) -> bytes:
    """Describe a snapshot set as one OVF VirtualSystem whose disks are ``disks`` (References order).

    The result validates against DSP8023 1.1.1 (``ovf_version=1``) or 2.0.1 (``ovf_version=2``).
    Prefer version 1: virt-v2v finds no disks in 2.x descriptors.
    """
    root, o = _envelope([(snapshot_set, disks)], ovf_version)
    _virtual_system(root, o, ovf_version, snapshot_set, disks, 1)
    return _serialized(root)


def build_collection_descriptor(
    name: str, systems: Sequence[tuple[SnapshotSet, Sequence[OvfDisk]]], ovf_version: int = 1
) -> bytes:
    """Describe several sets (a group set) as one VirtualSystemCollection: one VirtualSystem per set, each with
    its hardware and our ProductSection; References and DiskSection hold every system's disks, in order."""
    if not systems:
        raise OvfBuildError("a VirtualSystemCollection needs at least one set")
    ids = [s.instance_name for s, _ in systems]
    if len(set(ids)) != len(ids):
        raise OvfBuildError(f"two sets of the collection are of instances with the same name: {sorted(ids)}")
    check_xml_text("collection name", name)
    root, o = _envelope(systems, ovf_version)
    collection = etree.SubElement(root, o("VirtualSystemCollection"), {o("id"): name})
    etree.SubElement(collection, o("Info")).text = "Instances captured by freezeframe at one point in time"
    etree.SubElement(collection, o("Name")).text = name
    first = 1
    for snapshot_set, disks in systems:
        _virtual_system(collection, o, ovf_version, snapshot_set, disks, first)
        first += len(disks)
    return _serialized(root)


def _envelope(
    systems: Sequence[tuple[SnapshotSet, Sequence[OvfDisk]]], ovf_version: int
) -> tuple[etree._Element, Callable[[str], str]]:
    """The Envelope with References, DiskSection and NetworkSection for every system's disks and NICs."""
    if ovf_version not in (1, 2):
        raise OvfBuildError(f"OVF version {ovf_version} is not supported (1 or 2)")
    for snapshot_set, disks in systems:
        _check_disks(disks, {m.target: m for m in snapshot_set.members})
    all_disks = [d for _, disks in systems for d in disks]
    hrefs = [d.href for d in all_disks]
    if len(set(hrefs)) != len(hrefs):
        raise OvfBuildError(f"package file names are used twice: {sorted(hrefs)}")
    ns = NS_OVF1 if ovf_version == 1 else NS_OVF2
    o = functools.partial(qname, ns)
    nsmap = {None: ns, "ovf": ns, "rasd": NS_RASD, "vssd": NS_VSSD, "vmw": NS_VMW}
    if ovf_version == 2:
        nsmap |= {"epasd": NS_EPASD, "sasd": NS_SASD}
    root = etree.Element(o("Envelope"), nsmap=nsmap)  # type: ignore[arg-type]
    root.set(o("version"), f"{ovf_version}.0")
    root.set(qname(NS_XML, "lang"), "en-US")
    _references_and_disks(root, o, all_disks)
    _network_section(root, o, [nic for s, _ in systems for nic in s.hardware.nics])
    return root, o


def _virtual_system(
    parent: etree._Element,
    o: Callable[[str], str],
    ovf_version: int,
    snapshot_set: SnapshotSet,
    disks: Sequence[OvfDisk],
    first: int,
) -> None:
    """One set's VirtualSystem; its disks are ``vmdisk{first}`` onwards in the DiskSection."""
    members = {m.target: m for m in snapshot_set.members}
    props = freezeframe_properties(snapshot_set, disks, members)
    _check_texts(snapshot_set, members, props)
    hw = snapshot_set.hardware
    vs = etree.SubElement(parent, o("VirtualSystem"), {o("id"): snapshot_set.instance_name})
    etree.SubElement(vs, o("Info")).text = "A virtual machine captured by freezeframe"
    etree.SubElement(vs, o("Name")).text = snapshot_set.instance_name
    os_section = etree.SubElement(vs, o("OperatingSystemSection"), {o("id"): "102" if hw.arch in _ARCH_64 else "1"})
    etree.SubElement(os_section, o("Info")).text = "The kind of installed guest operating system"
    etree.SubElement(os_section, o("Description")).text = hw.description or f"Other ({hw.arch})"
    _HardwareWriter(etree.SubElement(vs, o("VirtualHardwareSection")), o, ovf_version).write(
        snapshot_set.instance_name, hw, disks, members, first
    )

    product = etree.SubElement(vs, o("ProductSection"), {o("class"): FREEZEFRAME_CLASS, o("required"): "false"})
    etree.SubElement(product, o("Info")).text = "freezeframe snapshot set metadata"
    etree.SubElement(product, o("Product")).text = "freezeframe"
    etree.SubElement(product, o("Version")).text = __version__
    for prop_key, prop_value in props:
        etree.SubElement(product, o("Property"), {o("key"): prop_key, o("type"): "string", o("value"): prop_value})


def _serialized(root: etree._Element) -> bytes:
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True))


def _references_and_disks(root: etree._Element, o: Callable[[str], str], disks: Sequence[OvfDisk]) -> None:
    refs = etree.SubElement(root, o("References"))
    for i, disk in enumerate(disks, start=1):
        etree.SubElement(refs, o("File"), {o("href"): disk.href, o("id"): f"file{i}", o("size"): str(disk.file_size)})
    disk_section = etree.SubElement(root, o("DiskSection"))
    etree.SubElement(disk_section, o("Info")).text = "Virtual disk information"
    for i, disk in enumerate(disks, start=1):
        attrs = {
            o("capacity"): str(disk.capacity),
            o("capacityAllocationUnits"): "byte",
            o("diskId"): f"vmdisk{i}",
            o("fileRef"): f"file{i}",
            o("format"): WRITE_FORMAT_URIS[disk.format],
        }
        if disk.populated_size is not None:
            attrs[o("populatedSize")] = str(disk.populated_size)
        etree.SubElement(disk_section, o("Disk"), attrs)


def _network_section(root: etree._Element, o: Callable[[str], str], nics: Sequence[NicSpec]) -> None:
    networks: list[str] = []
    for nic in nics:
        name = _network_name(nic)
        if name not in networks:
            networks.append(name)
    if networks:
        net_section = etree.SubElement(root, o("NetworkSection"))
        etree.SubElement(net_section, o("Info")).text = "The list of logical networks"
        for name in networks:
            net = etree.SubElement(net_section, o("Network"), {o("name"): name})
            etree.SubElement(net, o("Description")).text = f"The {name} network"


class _HardwareWriter:
    """The VirtualHardwareSection: Items numbered in the order they are written.

    OVF 1.x: every device is a RASD ``Item`` (controllers, disks, NICs). OVF 2: NICs are ``EthernetPortItem``
    (EPASD) and disks ``StorageItem`` (SASD), after the Items as the schema orders them, which is where 2.x
    readers (COT, VMware) look for them."""

    def __init__(self, vhs: etree._Element, o: Callable[[str], str], ovf_version: int = 1) -> None:
        self.vhs = vhs
        self.o = o
        self.ovf_version = ovf_version
        self.next_id = 1

    def item(self, fields: dict[str, str], kind: str = "Item") -> str:
        """``kind``: Item, or (OVF 2) EthernetPortItem / StorageItem."""
        ns = {"Item": NS_RASD, "EthernetPortItem": NS_EPASD, "StorageItem": NS_SASD}[kind]
        instance_id = str(self.next_id)
        self.next_id += 1
        fields = {**fields, "InstanceID": instance_id}
        el = etree.SubElement(self.vhs, self.o(kind))
        for name in _RASD_ORDER:  # alphabetical: the order of the RASD, EPASD and SASD schemas alike
            if name in fields:
                etree.SubElement(el, qname(ns, name)).text = fields[name]
        return instance_id

    def write(
        self, instance_name: str, hw: Hardware, disks: Sequence[OvfDisk], members: Mapping[str, Member], first: int = 1
    ) -> None:
        o = self.o
        etree.SubElement(self.vhs, o("Info")).text = f"Virtual hardware requirements ({hw.arch})"
        system = etree.SubElement(self.vhs, o("System"))
        for name, value in (
            ("ElementName", "Virtual Hardware Family"),
            ("InstanceID", "0"),
            ("VirtualSystemIdentifier", instance_name),
            ("VirtualSystemType", f"qemu-{hw.machine}" if hw.machine else "qemu"),
        ):
            etree.SubElement(system, qname(NS_VSSD, name)).text = value
        self.item(
            {
                "AllocationUnits": "hertz * 10^6",
                "Description": "Number of virtual CPUs",
                "ElementName": f"{hw.vcpus} virtual CPU(s)",
                "ResourceType": "3",
                "VirtualQuantity": str(hw.vcpus),
            }
        )
        memory_mib = -(-hw.memory_kib // 1024)  # virt-v2v assumes MiB whatever AllocationUnits says
        self.item(
            {
                "AllocationUnits": "byte * 2^20",
                "Description": "Memory size",
                "ElementName": f"{memory_mib}MB of memory",
                "ResourceType": "4",
                "VirtualQuantity": str(memory_mib),
            }
        )
        disk_items = self._controllers(disks, members, first)
        if self.ovf_version == 1:
            self._disks(disk_items)
            self._nics(hw)
        else:
            self._nics(hw)
            self._disks(disk_items)
        firmware = "efi" if hw.boot.firmware.lower() in ("efi", "uefi") else "bios"
        etree.SubElement(
            self.vhs,
            qname(NS_VMW, "Config"),
            {o("required"): "false", qname(NS_VMW, "key"): "firmware", qname(NS_VMW, "value"): firmware},
        )

    def _controllers(self, disks: Sequence[OvfDisk], members: Mapping[str, Member], first: int) -> list[dict[str, str]]:
        """Controllers, created as disks need them: (bus, index) -> instance id; units fill in disk order.
        Returns the disks' fields, written by ``_disks``."""
        controllers: dict[tuple[str, int], str] = {}
        used: dict[str, int] = {}
        per_type: dict[int, int] = {}  # Address counts per ResourceType: virtio and SCSI HBAs are both type 6
        placements: list[tuple[str, int]] = []
        for disk in disks:
            bus = members[disk.target].bus
            rtype, subtype, per_controller = _CONTROLLERS.get(bus, (20, bus, 30))
            slot = used.get(bus, 0)
            used[bus] = slot + 1
            index, unit = divmod(slot, per_controller)
            if rtype == 6 and unit >= 7:
                unit += 1  # VMware reserves SCSI unit 7 for the HBA
            key = (bus, index)
            if key not in controllers:
                address = per_type.get(rtype, 0)
                per_type[rtype] = address + 1
                controllers[key] = self.item(
                    {
                        "Address": str(address),
                        "Description": f"{bus} controller",
                        "ElementName": f"{bus} controller {index}",
                        "ResourceSubType": subtype,
                        "ResourceType": str(rtype),
                    }
                )
            placements.append((controllers[key], unit))
        return [
            {
                "AddressOnParent": str(unit),
                "ElementName": f"disk {disk.target}",
                "HostResource": f"ovf:/disk/vmdisk{i}",
                "Parent": parent,
                "ResourceType": "17",
            }
            for i, (disk, (parent, unit)) in enumerate(zip(disks, placements, strict=True), start=first)
        ]

    def _disks(self, disk_items: Sequence[dict[str, str]]) -> None:
        for fields in disk_items:
            self.item(fields, "Item" if self.ovf_version == 1 else "StorageItem")

    def _nics(self, hw: Hardware) -> None:
        for i, nic in enumerate(hw.nics):
            fields = {
                "AutomaticAllocation": "true",
                "Connection": _network_name(nic),
                "ElementName": f"ethernet{i}",
                "ResourceSubType": _NIC_MODELS.get((nic.model or "").lower(), nic.model or "E1000"),
                "ResourceType": "10",
            }
            if nic.mac:
                fields["Address"] = nic.mac
            self.item(fields, "Item" if self.ovf_version == 1 else "EthernetPortItem")
