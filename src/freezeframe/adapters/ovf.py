"""OVF descriptors: write ours, read ours and other tools', validate against the DMTF schema.

Export must produce something VMware, VirtualBox, oVirt and virt-v2v accept, and import must survive
whatever those tools (or an attacker) put in a descriptor. Parsing is therefore defensive: no DTD,
no entities, no network, bounded size, and every number is checked before it is believed.
See docs/ovf.md for the choices and the behaviour on real third-party samples.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from lxml import etree

from freezeframe import __version__
from freezeframe.errors import (
    OvfBuildError,
    OvfCapacityError,
    OvfError,
    OvfInvalidValue,
    OvfMalformed,
    OvfMissingReference,
    OvfNotOvf,
    OvfSchemaError,
    OvfUnsafeXml,
    OvfUnsupported,
)
from freezeframe.model import Hardware, Member, NicSpec, SnapshotSet

# --------------------------------------------------------------------------------------------- errors


# ------------------------------------------------------------------------------------------ constants

NS_OVF1 = "http://schemas.dmtf.org/ovf/envelope/1"
NS_OVF1_OVIRT = NS_OVF1 + "/"
NS_OVF2 = "http://schemas.dmtf.org/ovf/envelope/2"
NS_OVF09 = "http://www.vmware.com/schema/ovf/1/envelope"
NS_RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
NS_VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
NS_VMW = "http://www.vmware.com/schema/ovf"
NS_XSI = "http://www.w3.org/2001/XMLSchema-instance"
NS_XML = "http://www.w3.org/XML/1998/namespace"

FORMAT_URI_VMDK_STREAM = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
# oVirt's engine writes and reads this URI for qcow2 ("COW") volumes; qemu.org has no canonical one.
FORMAT_URI_QCOW2 = "http://www.gnome.org/~markmc/qcow-image-format.html"
# oVirt's URI for raw volumes.
FORMAT_URI_RAW = "http://en.wikipedia.org/wiki/Byte"

WRITE_FORMAT_URIS: Mapping[str, str] = {
    "vmdk": FORMAT_URI_VMDK_STREAM,
    "qcow2": FORMAT_URI_QCOW2,
    "raw": FORMAT_URI_RAW,
}

FREEZEFRAME_CLASS = "org.freezeframe"
FREEZEFRAME_SECTION_VERSION = "1"

MAX_CAPACITY = 64 * 2**40
MAX_MEMORY = 64 * 2**40
MAX_VCPUS = 4096
MAX_DESCRIPTOR_BYTES = 16 * 2**20

SCHEMA_FILES: Mapping[int, str] = {1: "ovf1/dsp8023_1.1.1.xsd", 2: "ovf2/dsp8023_2.0.1.xsd"}

_SAFE_HREF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class OvfDisk:
    """One disk file of a package as the descriptor describes it (sizes in bytes)."""

    target: str
    href: str
    file_size: int
    format: str
    capacity: int
    populated_size: int | None = None


@dataclass(frozen=True)
class OvfFileRef:
    """One References/File entry."""

    file_id: str
    href: str
    size: int | None


@dataclass(frozen=True)
class ImportedDisk:
    """A hard disk of the imported machine, in the order the hardware section lists it.

    ``href`` is None for a blank disk the importer must create (OVF disks without a fileRef).
    ``format`` is the qemu driver name derived from the format URI, None when unknown or blank.
    """

    disk_id: str
    href: str | None
    file_id: str | None
    file_size: int | None
    capacity: int
    populated_size: int | None
    format: str | None
    format_uri: str | None
    controller: str | None
    controller_subtype: str | None
    controller_address: str | None
    address: str | None


@dataclass(frozen=True)
class ImportedNic:
    network: str | None
    model: str | None
    mac: str | None


@dataclass(frozen=True)
class FreezeframeMember:
    """What our ProductSection recorded about one member of the set."""

    index: int
    target: str
    bus: str | None
    href: str | None
    format: str | None
    virtual_size: int | None
    boot_order: int | None
    sha256: str | None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FreezeframeInfo:
    """The freezeframe ProductSection of a descriptor we wrote."""

    set_id: str
    set_name: str | None
    instance_name: str | None
    instance_uuid: str | None
    requested: str | None
    achieved: str | None
    created_at: str | None
    backup_type: str | None
    arch: str | None
    machine: str | None
    domain_type: str | None
    firmware: str | None
    hardware: Hardware | None
    set_metadata: dict[str, str]
    members: tuple[FreezeframeMember, ...]
    properties: dict[str, str]


@dataclass(frozen=True)
class ImportedMachine:
    """The one virtual system of a descriptor, in units we can use (bytes, counts)."""

    ovf_version: int
    dialect: str
    name: str
    vcpus: int
    memory_bytes: int
    arch: str | None
    machine: str | None
    firmware: str | None
    system_type: str | None
    os_id: str | None
    os_description: str | None
    disks: tuple[ImportedDisk, ...]
    nics: tuple[ImportedNic, ...]
    networks: tuple[str, ...]
    files: tuple[OvfFileRef, ...]
    configuration: str | None
    freezeframe: FreezeframeInfo | None
    warnings: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ units

_NAMED_UNITS: Mapping[str, int] = {
    "byte": 1,
    "bytes": 1,
    "b": 1,
    "kilobyte": 2**10,
    "kilobytes": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "megabyte": 2**20,
    "megabytes": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "gigabyte": 2**30,
    "gigabytes": 2**30,
    "gb": 2**30,
    "gib": 2**30,
    "terabyte": 2**40,
    "terabytes": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}
_FACTOR = re.compile(r"^(\d{1,4})(?:\^(\d{1,3}))?$")


def parse_byte_units(units: str | None, default: int = 1) -> int:
    """Bytes per unit for a DSP0004 programmatic unit ("byte * 2^20") or a legacy name ("MegaBytes").

    Legacy names (KB/MB/GB, KiloBytes, MegaBytes...) are binary: VirtualBox and oVirt write
    "MegaBytes" for MiB of RAM, and nobody sizes a VM in decimal megabytes.
    """
    if units is None or not units.strip():
        return default
    text = re.sub(r"\s+", "", units).lower()
    if text in _NAMED_UNITS:
        return _NAMED_UNITS[text]
    parts = text.split("*")
    if parts[0] not in ("byte", "bytes"):
        raise OvfInvalidValue(f"allocation units {units!r} are not a byte unit")
    multiplier = 1
    for part in parts[1:]:
        match = _FACTOR.match(part)
        if match is None:
            raise OvfInvalidValue(f"cannot understand allocation units {units!r}")
        base = int(match.group(1))
        exponent = int(match.group(2)) if match.group(2) is not None else 1
        if base not in (2, 10) and match.group(2) is not None:
            raise OvfInvalidValue(f"allocation units {units!r}: only powers of 2 and 10 are accepted")
        if exponent > 60:
            raise OvfInvalidValue(f"allocation units {units!r} are absurdly large")
        multiplier *= base**exponent
        if multiplier > 2**60:
            raise OvfInvalidValue(f"allocation units {units!r} are absurdly large")
    return multiplier


def _int(value: str | None, what: str) -> int:
    if value is None:
        raise OvfInvalidValue(f"{what} is missing")
    text = value.strip()
    if not re.fullmatch(r"[+]?\d{1,20}", text):
        raise OvfInvalidValue(f"{what} {value!r} is not a non-negative integer")
    return int(text)


# ------------------------------------------------------------------------------------------ writing


def _q(ns: str, name: str) -> str:
    return f"{{{ns}}}{name}"


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


def _check_href(href: str) -> None:
    if not _SAFE_HREF.match(href) or ".." in href:
        raise OvfBuildError(f"package file name {href!r} must be 1-100 characters of letters, digits, '.', '_', '-'")


def _network_name(nic: NicSpec) -> str:
    return nic.source or nic.source_type or "default"


def _freezeframe_properties(
    snapshot_set: SnapshotSet, disks: Sequence[OvfDisk], members: Mapping[str, Member]
) -> list[tuple[str, str]]:
    hw = snapshot_set.hardware
    props: list[tuple[str, str]] = [
        ("format", FREEZEFRAME_SECTION_VERSION),
        ("set.id", snapshot_set.id),
        ("set.name", snapshot_set.name),
        ("set.created_at", snapshot_set.created_at.isoformat()),
        ("set.backup_type", snapshot_set.backup_type or ""),
        ("instance.name", snapshot_set.instance_name),
        ("instance.uuid", snapshot_set.instance_uuid),
        ("consistency.requested", str(snapshot_set.requested)),
        ("consistency.achieved", str(snapshot_set.achieved) if snapshot_set.achieved else ""),
        ("hardware.arch", hw.arch),
        ("hardware.machine", hw.machine or ""),
        ("hardware.domain_type", hw.domain_type),
        ("hardware.firmware", hw.boot.firmware),
        ("hardware.json", json.dumps(hw.to_dict(), sort_keys=True, separators=(",", ":"))),
    ]
    props += [(f"set.meta.{k}", v) for k, v in sorted(snapshot_set.metadata.items())]
    for index, disk in enumerate(disks):
        member = members[disk.target]
        prefix = f"member.{index}."
        props += [
            (prefix + "target", member.target),
            (prefix + "bus", member.bus),
            (prefix + "href", disk.href),
            (prefix + "format", member.format),
            (prefix + "virtual_size", str(member.virtual_size)),
            (prefix + "boot_order", "" if member.boot_order is None else str(member.boot_order)),
            (prefix + "sha256", member.sha256 or ""),
        ]
        props += [(prefix + f"meta.{k}", v) for k, v in sorted(member.metadata.items())]
    return props


def build_descriptor(snapshot_set: SnapshotSet, disks: Sequence[OvfDisk], ovf_version: int = 1) -> bytes:
    """Describe a snapshot set as one OVF VirtualSystem whose disks are ``disks`` (References order).

    The result validates against DSP8023 1.1.1 (``ovf_version=1``) or 2.0.1 (``ovf_version=2``).
    Prefer version 1: virt-v2v finds no disks in 2.x descriptors.
    """
    if ovf_version not in (1, 2):
        raise OvfBuildError(f"OVF version {ovf_version} is not supported (1 or 2)")
    ns = NS_OVF1 if ovf_version == 1 else NS_OVF2
    members = {m.target: m for m in snapshot_set.members}
    seen: set[str] = set()
    for disk in disks:
        _check_href(disk.href)
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
    hw = snapshot_set.hardware
    o = functools.partial(_q, ns)

    nsmap = {None: ns, "ovf": ns, "rasd": NS_RASD, "vssd": NS_VSSD, "vmw": NS_VMW}
    root = etree.Element(o("Envelope"), nsmap=nsmap)  # type: ignore[arg-type]
    root.set(o("version"), f"{ovf_version}.0")
    root.set(_q(NS_XML, "lang"), "en-US")

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

    networks: list[str] = []
    for nic in hw.nics:
        name = _network_name(nic)
        if name not in networks:
            networks.append(name)
    if networks:
        net_section = etree.SubElement(root, o("NetworkSection"))
        etree.SubElement(net_section, o("Info")).text = "The list of logical networks"
        for name in networks:
            net = etree.SubElement(net_section, o("Network"), {o("name"): name})
            etree.SubElement(net, o("Description")).text = f"The {name} network"

    vs = etree.SubElement(root, o("VirtualSystem"), {o("id"): snapshot_set.instance_name})
    etree.SubElement(vs, o("Info")).text = "A virtual machine captured by freezeframe"
    etree.SubElement(vs, o("Name")).text = snapshot_set.instance_name

    os_section = etree.SubElement(vs, o("OperatingSystemSection"), {o("id"): "102" if hw.arch in _ARCH_64 else "1"})
    etree.SubElement(os_section, o("Info")).text = "The kind of installed guest operating system"
    etree.SubElement(os_section, o("Description")).text = hw.description or f"Other ({hw.arch})"

    vhs = etree.SubElement(vs, o("VirtualHardwareSection"))
    etree.SubElement(vhs, o("Info")).text = f"Virtual hardware requirements ({hw.arch})"
    system = etree.SubElement(vhs, o("System"))
    for name, value in (
        ("ElementName", "Virtual Hardware Family"),
        ("InstanceID", "0"),
        ("VirtualSystemIdentifier", snapshot_set.instance_name),
        ("VirtualSystemType", f"qemu-{hw.machine}" if hw.machine else "qemu"),
    ):
        etree.SubElement(system, _q(NS_VSSD, name)).text = value

    counter = iter(range(1, 1_000_000))

    def item(fields: dict[str, str]) -> str:
        instance_id = str(next(counter))
        fields = {**fields, "InstanceID": instance_id}
        el = etree.SubElement(vhs, o("Item"))
        for name in _RASD_ORDER:
            if name in fields:
                etree.SubElement(el, _q(NS_RASD, name)).text = fields[name]
        return instance_id

    item(
        {
            "AllocationUnits": "hertz * 10^6",
            "Description": "Number of virtual CPUs",
            "ElementName": f"{hw.vcpus} virtual CPU(s)",
            "ResourceType": "3",
            "VirtualQuantity": str(hw.vcpus),
        }
    )
    memory_mib = -(-hw.memory_kib // 1024)  # virt-v2v assumes MiB whatever AllocationUnits says
    item(
        {
            "AllocationUnits": "byte * 2^20",
            "Description": "Memory size",
            "ElementName": f"{memory_mib}MB of memory",
            "ResourceType": "4",
            "VirtualQuantity": str(memory_mib),
        }
    )

    # Controllers, created as disks need them: (bus, index) -> instance id; units fill in disk order.
    controllers: dict[tuple[str, int], str] = {}
    used: dict[str, int] = {}
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
            controllers[key] = item(
                {
                    "Address": str(index),
                    "Description": f"{bus} controller",
                    "ElementName": f"{bus} controller {index}",
                    "ResourceSubType": subtype,
                    "ResourceType": str(rtype),
                }
            )
        placements.append((controllers[key], unit))
    for i, (disk, (parent, unit)) in enumerate(zip(disks, placements, strict=True), start=1):
        item(
            {
                "AddressOnParent": str(unit),
                "ElementName": f"disk {disk.target}",
                "HostResource": f"ovf:/disk/vmdisk{i}",
                "Parent": parent,
                "ResourceType": "17",
            }
        )
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
        item(fields)
    firmware = "efi" if hw.boot.firmware.lower() in ("efi", "uefi") else "bios"
    etree.SubElement(
        vhs,
        _q(NS_VMW, "Config"),
        {o("required"): "false", _q(NS_VMW, "key"): "firmware", _q(NS_VMW, "value"): firmware},
    )

    product = etree.SubElement(vs, o("ProductSection"), {o("class"): FREEZEFRAME_CLASS, o("required"): "false"})
    etree.SubElement(product, o("Info")).text = "freezeframe snapshot set metadata"
    etree.SubElement(product, o("Product")).text = "freezeframe"
    etree.SubElement(product, o("Version")).text = __version__
    for prop_key, prop_value in _freezeframe_properties(snapshot_set, disks, members):
        etree.SubElement(product, o("Property"), {o("key"): prop_key, o("type"): "string", o("value"): prop_value})

    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True))


# ------------------------------------------------------------------------------------------ validation


@functools.lru_cache(maxsize=4)
def _schema(path: Path) -> etree.XMLSchema:
    parser = etree.XMLParser(no_network=True, resolve_entities=False, load_dtd=False)
    try:
        return etree.XMLSchema(etree.parse(str(path), parser))
    except (OSError, etree.XMLSyntaxError, etree.XMLSchemaParseError) as exc:
        raise OvfError(f"cannot load the OVF schema {path}: {exc}") from exc


def schema_path(ovf_version: int, xsd_root: Path) -> Path:
    """The DSP8023 entry schema under ``xsd_root`` (the directory holding ovf1/ and ovf2/)."""
    if ovf_version not in SCHEMA_FILES:
        raise OvfError(f"no schema for OVF version {ovf_version}")
    path = xsd_root / SCHEMA_FILES[ovf_version]
    if not path.is_file() and (xsd_root / "xsd" / SCHEMA_FILES[ovf_version]).is_file():
        path = xsd_root / "xsd" / SCHEMA_FILES[ovf_version]
    return path


def validate_descriptor(xml: bytes, ovf_version: int, xsd_root: Path) -> None:
    """Raise OvfSchemaError with the schema's first message unless ``xml`` validates offline.

    The entry xsd imports common.xsd by a relative path first, so the CIM schemas' absolute
    http:// imports resolve to the already-loaded copy: nothing is fetched.
    """
    path = schema_path(ovf_version, xsd_root)
    if not path.is_file():
        raise OvfError(f"OVF schema {path} not found")
    schema = _schema(path.resolve())
    doc = _safe_parse(xml)
    if not schema.validate(doc.getroottree()):
        errors = list(cast(Iterable[etree._LogEntry], schema.error_log))
        first = errors[0] if errors else None
        where = f"line {first.line}: " if first is not None else ""
        message = first.message if first is not None else "invalid"
        raise OvfSchemaError(f"descriptor is not valid OVF {ovf_version}.x: {where}{message}")


# ------------------------------------------------------------------------------------------ parsing


def _safe_parse(xml: bytes) -> etree._Element:
    """Parse untrusted XML: refuse DTDs/entities, never touch the network, bounded size."""
    if len(xml) > MAX_DESCRIPTOR_BYTES:
        raise OvfMalformed(f"descriptor is {len(xml)} bytes; more than {MAX_DESCRIPTOR_BYTES} is not an OVF")
    head = xml.replace(b"\x00", b"")  # UTF-16 text still shows its ASCII markup this way
    if b"<!DOCTYPE" in head or b"<!ENTITY" in head:
        raise OvfUnsafeXml("descriptor declares a DOCTYPE/ENTITY; refused (entity expansion, external files)")
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        dtd_validation=False,
        remove_pis=True,
    )
    try:
        root = etree.fromstring(xml, parser)
    except etree.XMLSyntaxError as exc:
        raise OvfMalformed(f"descriptor is not well-formed XML: {exc}") from exc
    except ValueError as exc:
        raise OvfMalformed(f"descriptor cannot be parsed: {exc}") from exc
    docinfo = root.getroottree().docinfo
    if getattr(docinfo, "doctype", "") or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise OvfUnsafeXml("descriptor declares a DOCTYPE; refused")
    for node in root.iter():
        if isinstance(node, etree._Entity):
            raise OvfUnsafeXml("descriptor uses entity references; refused")
    return root


def _local(el: etree._Element) -> str:
    return etree.QName(el).localname


def _ns(el: etree._Element) -> str | None:
    return etree.QName(el).namespace


def _text(el: etree._Element | None) -> str | None:
    if el is None or el.text is None:
        return None
    text = el.text.strip()
    return text or None


class _Reader:
    """Namespace-tolerant access to one descriptor (DMTF 1.x/2.x and the oVirt dialect)."""

    def __init__(self, root: etree._Element, ns: str) -> None:
        self.root = root
        self.ns = ns

    def attr(self, el: etree._Element, name: str) -> str | None:
        value = el.get(_q(self.ns, name))
        if value is None:
            value = el.get(name)
        return value

    def kind(self, el: etree._Element) -> str:
        """Section/content kind: the element name, or the xsi:type of a generic Section/Content."""
        name = _local(el)
        if name in ("Section", "Content"):
            xsi_type = el.get(_q(NS_XSI, "type")) or ""
            xsi_type = xsi_type.rsplit(":", 1)[-1]
            return xsi_type.removesuffix("_Type") or name
        return name

    def children(self, el: etree._Element, name: str | None = None) -> Iterator[etree._Element]:
        for child in el:
            if not isinstance(child.tag, str):
                continue
            if _ns(child) not in (self.ns, None):
                continue
            if name is None or self.kind(child) == name:
                yield child

    def child(self, el: etree._Element, name: str) -> etree._Element | None:
        return next(self.children(el, name), None)


_CONFIG_SPLIT = re.compile(r"\s+")


def _in_configuration(reader: _Reader, el: etree._Element, configuration: str | None) -> bool:
    wanted = reader.attr(el, "configuration")
    if wanted is None or configuration is None:
        return True
    return configuration in _CONFIG_SPLIT.split(wanted.strip())


def _item_fields(el: etree._Element) -> dict[str, str]:
    fields: dict[str, str] = {}
    for child in el:
        if isinstance(child.tag, str):
            value = _text(child)
            name = _local(child)
            if value is not None and name not in fields:
                fields[name] = value
    return fields


def _controller_kind(resource_type: int, subtype: str | None) -> str:
    tokens = (subtype or "").lower().split()
    first = tokens[0] if tokens else ""
    if resource_type == 5:
        return "ide"
    if resource_type == 6:
        if first in ("virtio", "virtio-scsi"):
            return first
        return "scsi"
    if resource_type == 20:
        if any("ahci" in t or "sata" in t for t in tokens):
            return "sata"
        if any("nvme" in t for t in tokens):
            return "nvme"
        if first == "virtio":
            return "virtio"
        return "other"
    return {7: "fc", 8: "iscsi", 9: "ib", 23: "usb"}.get(resource_type, "other")


_OVIRT_INTERFACES: Mapping[str, str] = {
    "virtio": "virtio",
    "virtio_scsi": "virtio-scsi",
    "ide": "ide",
    "sata": "sata",
    "spapr_vscsi": "scsi",
}


def format_from_uri(uri: str | None) -> str | None:
    """qemu driver name for an OVF disk format URI; None when we do not know the format."""
    if not uri:
        return None
    low = uri.lower()
    if "vmdk" in low:
        return "vmdk"
    if "qcow" in low:
        return "qcow2"
    if low.rstrip("/").endswith("wiki/byte") or low.endswith("#raw") or low == "raw":
        return "raw"
    if "vhdx" in low:
        return "vhdx"
    if "vhd" in low or "bb676673" in low:
        return "vpc"
    if "vdi" in low or "virtualbox" in low:
        return "vdi"
    return None


def _resolve_property(reader: _Reader, vs: etree._Element, key: str, configuration: str | None) -> str:
    for section in reader.children(vs, "ProductSection"):
        for prop in reader.children(section, "Property"):
            if reader.attr(prop, "key") == key and _in_configuration(reader, prop, configuration):
                value = reader.attr(prop, "value")
                if value is not None:
                    return value
    raise OvfInvalidValue(f"capacity refers to property ${{{key}}} which has no value")


def _capacity(
    reader: _Reader, disk: etree._Element, vs: etree._Element, configuration: str | None, disk_id: str
) -> tuple[int, int | None]:
    raw = reader.attr(disk, "capacity")
    if raw is not None:
        match = re.fullmatch(r"\s*\$\{([^}]+)\}\s*", raw)
        if match:
            raw = _resolve_property(reader, vs, match.group(1), configuration)
    if raw is not None and re.fullmatch(r"\s*-\d+\s*", raw):
        raise OvfCapacityError(f"disk {disk_id!r} capacity {raw.strip()} is not positive")
    quantity = _int(raw, f"disk {disk_id!r} capacity")
    units = parse_byte_units(reader.attr(disk, "capacityAllocationUnits"))
    capacity = quantity * units
    if capacity <= 0:
        raise OvfCapacityError(f"disk {disk_id!r} capacity is {capacity} bytes; it must be positive")
    if capacity > MAX_CAPACITY:
        raise OvfCapacityError(f"disk {disk_id!r} capacity {capacity} bytes is more than 64 TiB; refused as absurd")
    populated_raw = reader.attr(disk, "populatedSize")
    populated = None if populated_raw is None else _int(populated_raw, f"disk {disk_id!r} populatedSize")
    if populated is not None and populated > capacity:
        raise OvfCapacityError(
            f"disk {disk_id!r} capacity {capacity} bytes is smaller than its populated size {populated}"
        )
    return capacity, populated


def _pick_configuration(reader: _Reader, root: etree._Element, wanted: str | None) -> str | None:
    section = reader.child(root, "DeploymentOptionSection")
    if section is None:
        if wanted is not None:
            raise OvfInvalidValue(f"configuration {wanted!r} requested but the descriptor has none")
        return None
    ids = [reader.attr(c, "id") for c in reader.children(section, "Configuration")]
    ids_known = [i for i in ids if i]
    if wanted is not None:
        if wanted not in ids_known:
            raise OvfInvalidValue(f"configuration {wanted!r} is not one of {ids_known}")
        return wanted
    for conf in reader.children(section, "Configuration"):
        if (reader.attr(conf, "default") or "").strip().lower() in ("true", "1"):
            return reader.attr(conf, "id")
    return ids_known[0] if ids_known else None


def _parse_freezeframe(reader: _Reader, vs: etree._Element) -> FreezeframeInfo | None:
    section = next(
        (s for s in reader.children(vs, "ProductSection") if reader.attr(s, "class") == FREEZEFRAME_CLASS),
        None,
    )
    if section is None:
        return None
    props: dict[str, str] = {}
    for prop in reader.children(section, "Property"):
        key = reader.attr(prop, "key")
        if key is not None:
            props[key] = reader.attr(prop, "value") or ""
    if "set.id" not in props:
        raise OvfInvalidValue("freezeframe section has no set.id")

    def get(key: str) -> str | None:
        return props.get(key) or None

    hardware = None
    if get("hardware.json"):
        try:
            hardware = Hardware.from_dict(json.loads(props["hardware.json"]))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise OvfInvalidValue(f"freezeframe section hardware.json is unusable: {exc}") from exc
    members: list[FreezeframeMember] = []
    indexes = sorted({int(m.group(1)) for k in props if (m := re.match(r"member\.(\d{1,6})\.", k))})
    for index in indexes:
        prefix = f"member.{index}."
        virtual_size = get(prefix + "virtual_size")
        boot_order = get(prefix + "boot_order")
        members.append(
            FreezeframeMember(
                index=index,
                target=props.get(prefix + "target", ""),
                bus=get(prefix + "bus"),
                href=get(prefix + "href"),
                format=get(prefix + "format"),
                virtual_size=None if virtual_size is None else _int(virtual_size, prefix + "virtual_size"),
                boot_order=None if boot_order is None else _int(boot_order, prefix + "boot_order"),
                sha256=get(prefix + "sha256"),
                metadata={
                    k.removeprefix(prefix + "meta."): v for k, v in props.items() if k.startswith(prefix + "meta.")
                },
            )
        )
    return FreezeframeInfo(
        set_id=props["set.id"],
        set_name=get("set.name"),
        instance_name=get("instance.name"),
        instance_uuid=get("instance.uuid"),
        requested=get("consistency.requested"),
        achieved=get("consistency.achieved"),
        created_at=get("set.created_at"),
        backup_type=get("set.backup_type"),
        arch=get("hardware.arch"),
        machine=get("hardware.machine"),
        domain_type=get("hardware.domain_type"),
        firmware=get("hardware.firmware"),
        hardware=hardware,
        set_metadata={k.removeprefix("set.meta."): v for k, v in props.items() if k.startswith("set.meta.")},
        members=tuple(members),
        properties=props,
    )


def _envelope_version(root: etree._Element) -> tuple[str, int, str]:
    if not isinstance(root.tag, str) or _local(root) != "Envelope":
        raise OvfNotOvf(f"root element is {root.tag!r}, not an OVF Envelope")
    ns = _ns(root) or ""
    if ns == NS_OVF1:
        return ns, 1, "dmtf"
    if ns == NS_OVF1_OVIRT:
        return ns, 1, "ovirt"
    if ns == NS_OVF2:
        return ns, 2, "dmtf"
    if ns == NS_OVF09:
        raise OvfUnsupported(
            "pre-standard VMware OVF 0.9 (namespace http://www.vmware.com/schema/ovf/1/envelope); "
            "convert it to OVF 1.x first (e.g. ovftool or cot)"
        )
    raise OvfNotOvf(f"Envelope in namespace {ns!r} is not a DMTF OVF envelope")


def parse_descriptor(xml: bytes, configuration: str | None = None) -> ImportedMachine:
    """Read one virtual system out of an OVF descriptor, ours or another tool's.

    ``configuration`` picks a DeploymentOptionSection configuration; the default one otherwise.
    A VirtualSystemCollection is accepted only when it holds exactly one VirtualSystem.
    """
    root = _safe_parse(xml)
    ns, version, dialect = _envelope_version(root)
    reader = _Reader(root, ns)
    warnings: list[str] = []

    refs_el = reader.child(root, "References")
    files: dict[str, OvfFileRef] = {}
    by_href: dict[str, OvfFileRef] = {}
    if refs_el is not None:
        for file_el in reader.children(refs_el, "File"):
            file_id = reader.attr(file_el, "id")
            href = reader.attr(file_el, "href")
            if not file_id or not href:
                raise OvfInvalidValue("a References/File lacks ovf:id or ovf:href")
            if file_id in files:
                raise OvfInvalidValue(f"file id {file_id!r} is declared twice")
            size_raw = reader.attr(file_el, "size")
            size = None if size_raw is None else _int(size_raw, f"size of file {href!r}")
            file_ref_entry = OvfFileRef(file_id=file_id, href=href, size=size)
            files[file_id] = file_ref_entry
            by_href[href] = file_ref_entry

    configuration = _pick_configuration(reader, root, configuration)

    content = [c for c in reader.children(root) if reader.kind(c) in ("VirtualSystem", "VirtualSystemCollection")]
    if not content:
        raise OvfUnsupported("descriptor has no VirtualSystem")
    vs = content[0]
    if reader.kind(vs) == "VirtualSystemCollection":
        systems = [c for c in vs.iter() if isinstance(c.tag, str) and reader.kind(c) == "VirtualSystem"]
        if len(systems) != 1:
            raise OvfUnsupported(
                f"VirtualSystemCollection with {len(systems)} virtual systems; freezeframe imports one "
                "machine per package: split the package first"
            )
        vs = systems[0]
        warnings.append("VirtualSystemCollection with a single VirtualSystem: imported that system")

    name = _text(reader.child(vs, "Name")) or reader.attr(vs, "id") or "imported"

    disk_section = reader.child(root, "DiskSection")
    disk_els: dict[str, etree._Element] = {}
    if disk_section is not None:
        for declared in reader.children(disk_section, "Disk"):
            declared_id = reader.attr(declared, "diskId")
            if not declared_id:
                raise OvfInvalidValue("a DiskSection/Disk lacks ovf:diskId")
            disk_els[declared_id] = declared

    networks: list[str] = []
    net_section = reader.child(root, "NetworkSection")
    if net_section is not None:
        networks = [n for n in (reader.attr(e, "name") for e in reader.children(net_section, "Network")) if n]

    os_el = reader.child(vs, "OperatingSystemSection")
    os_id = reader.attr(os_el, "id") if os_el is not None else None
    os_description = _text(reader.child(os_el, "Description")) if os_el is not None else None

    hardware_sections = list(reader.children(vs, "VirtualHardwareSection"))
    if not hardware_sections:
        raise OvfUnsupported(f"virtual system {name!r} has no VirtualHardwareSection")
    if len(hardware_sections) > 1:
        warnings.append(f"{len(hardware_sections)} VirtualHardwareSections: used the first")
    vhs = hardware_sections[0]
    system_el = reader.child(vhs, "System")
    system_type = None
    if system_el is not None:
        for child in system_el:
            if isinstance(child.tag, str) and _local(child) == "VirtualSystemType":
                system_type = _text(child)

    # An Item for the chosen configuration replaces a generic Item with the same InstanceID
    # (VMware and COT write a default CPU/memory Item, then per-configuration overrides).
    items: list[dict[str, str]] = []
    generic_position: dict[str, int] = {}
    for el in vhs:
        if not isinstance(el.tag, str) or _local(el) not in ("Item", "StorageItem", "EthernetPortItem"):
            continue
        if not _in_configuration(reader, el, configuration):
            continue
        if (reader.attr(el, "bound") or "normal") != "normal":
            continue
        fields = _item_fields(el)
        instance_id = fields.get("InstanceID") or fields.get("InstanceId") or ""
        if reader.attr(el, "configuration") is None:
            if instance_id:
                generic_position[instance_id] = len(items)
            items.append(fields)
        elif instance_id in generic_position:
            items[generic_position.pop(instance_id)] = fields
        else:
            items.append(fields)

    def rtype(fields: Mapping[str, str]) -> int | None:
        value = fields.get("ResourceType")
        if value is None or not value.isdigit():
            return None
        return int(value)

    by_instance: dict[str, dict[str, str]] = {}
    for fields in items:
        item_id = fields.get("InstanceID") or fields.get("InstanceId")
        if item_id:
            by_instance[item_id] = fields

    vcpus = 1
    cpu_items = [f for f in items if rtype(f) == 3]
    if cpu_items:
        cpu = cpu_items[0]
        if "VirtualQuantity" in cpu:
            vcpus = _int(cpu["VirtualQuantity"], "CPU VirtualQuantity")
        elif "num_of_sockets" in cpu:
            vcpus = _int(cpu["num_of_sockets"], "num_of_sockets") * _int(
                cpu.get("cpu_per_socket", "1"), "cpu_per_socket"
            )
    else:
        warnings.append("no CPU item: assumed 1 vCPU")
    if not 0 < vcpus <= MAX_VCPUS:
        raise OvfInvalidValue(f"{vcpus} vCPUs is out of range (1-{MAX_VCPUS})")

    mem_items = [f for f in items if rtype(f) == 4]
    if not mem_items:
        raise OvfInvalidValue(f"virtual system {name!r} has no memory item (ResourceType 4)")
    memory_bytes = _int(mem_items[0].get("VirtualQuantity"), "memory VirtualQuantity") * parse_byte_units(
        mem_items[0].get("AllocationUnits"), default=2**20
    )
    if not 0 < memory_bytes <= MAX_MEMORY:
        raise OvfInvalidValue(f"memory of {memory_bytes} bytes is out of range")

    disks: list[ImportedDisk] = []
    used_disks: set[str] = set()
    for fields in items:
        if rtype(fields) != 17:
            continue
        host = fields.get("HostResource")
        if not host:
            raise OvfMissingReference(f"disk item {fields.get('ElementName', '?')!r} has no HostResource")
        match = re.fullmatch(r"(?:ovf:)?/disk/(.+)", host)
        disk_el: etree._Element | None = None
        if match:
            disk_el = disk_els.get(match.group(1))
        elif dialect == "ovirt":
            disk_el = disk_els.get(host) or next(
                (d for d in disk_els.values() if reader.attr(d, "fileRef") == host), None
            )
        elif re.fullmatch(r"(?:ovf:)?/file/.+", host):
            raise OvfUnsupported(f"disk backed directly by a file ({host}) is not supported")
        if disk_el is None:
            raise OvfMissingReference(f"disk item refers to {host!r}, which is not in the DiskSection")
        disk_id = reader.attr(disk_el, "diskId") or host
        if disk_id in used_disks:
            raise OvfInvalidValue(f"disk {disk_id!r} is attached twice")
        used_disks.add(disk_id)
        capacity, populated = _capacity(reader, disk_el, vs, configuration, disk_id)
        file_ref = reader.attr(disk_el, "fileRef")
        ref: OvfFileRef | None = None
        if file_ref:
            ref = files.get(file_ref) or (by_href.get(file_ref) if dialect == "ovirt" else None)
            if ref is None:
                raise OvfMissingReference(f"disk {disk_id!r} refers to file {file_ref!r}, not in References")
        format_uri = reader.attr(disk_el, "format")
        disk_format = format_from_uri(format_uri) if ref is not None else None
        volume_format = (reader.attr(disk_el, "volume-format") or "").upper()
        if dialect == "ovirt" and volume_format in ("COW", "RAW"):
            disk_format = "qcow2" if volume_format == "COW" else "raw"
        if ref is not None and disk_format is None:
            warnings.append(f"disk {disk_id!r}: unknown format URI {format_uri!r}")
        controller = subtype = controller_address = None
        parent = fields.get("Parent")
        parent_fields = by_instance.get(parent) if parent else None
        if parent_fields is not None:
            parent_type = rtype(parent_fields)
            subtype = parent_fields.get("ResourceSubType")
            controller = _controller_kind(parent_type if parent_type is not None else -1, subtype)
            controller_address = parent_fields.get("Address")
        elif dialect == "ovirt":
            interface = (reader.attr(disk_el, "disk-interface") or "").lower()
            controller = _OVIRT_INTERFACES.get(interface, interface or None)
        elif parent:
            raise OvfMissingReference(f"disk {disk_id!r} sits on controller {parent!r}, which does not exist")
        disks.append(
            ImportedDisk(
                disk_id=disk_id,
                href=ref.href if ref else None,
                file_id=ref.file_id if ref else None,
                file_size=ref.size if ref else None,
                capacity=capacity,
                populated_size=populated,
                format=disk_format,
                format_uri=format_uri,
                controller=controller,
                controller_subtype=subtype,
                controller_address=controller_address,
                address=fields.get("AddressOnParent"),
            )
        )

    nics = tuple(
        ImportedNic(
            network=f.get("Connection"), model=f.get("ResourceSubType"), mac=f.get("Address") or f.get("MACAddress")
        )
        for f in items
        if rtype(f) == 10
    )
    for nic in nics:
        if nic.network is not None and networks and nic.network not in networks:
            warnings.append(f"NIC connected to {nic.network!r}, which the NetworkSection does not list")

    firmware = None
    for el in vhs:
        if (
            isinstance(el.tag, str)
            and _ns(el) == NS_VMW
            and _local(el) == "Config"
            and el.get(_q(NS_VMW, "key")) == "firmware"
        ):
            firmware = el.get(_q(NS_VMW, "value"))

    info = _parse_freezeframe(reader, vs)
    arch = machine = None
    if info is not None:
        arch, machine = info.arch, info.machine
        firmware = info.firmware or firmware

    return ImportedMachine(
        ovf_version=version,
        dialect=dialect,
        name=name,
        vcpus=vcpus,
        memory_bytes=memory_bytes,
        arch=arch,
        machine=machine,
        firmware=firmware,
        system_type=system_type,
        os_id=os_id,
        os_description=os_description,
        disks=tuple(disks),
        nics=nics,
        networks=tuple(networks),
        files=tuple(files.values()),
        configuration=configuration,
        freezeframe=info,
        warnings=tuple(warnings),
    )
