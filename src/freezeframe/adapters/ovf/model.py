"""What an OVF descriptor says, in units we can use: the values the writer takes and the reader returns.

Also the names both sides share: namespaces, disk format URIs and the limits past which a value is absurd.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from freezeframe.model import Hardware

NS_OVF1 = "http://schemas.dmtf.org/ovf/envelope/1"
NS_OVF1_OVIRT = NS_OVF1 + "/"
NS_OVF2 = "http://schemas.dmtf.org/ovf/envelope/2"
NS_OVF09 = "http://www.vmware.com/schema/ovf/1/envelope"
NS_RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
NS_EPASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData"
NS_SASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData"
"""OVF 2 puts NICs in ``EthernetPortItem`` (EPASD) and disks in ``StorageItem`` (SASD) elements."""
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
