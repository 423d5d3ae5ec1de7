"""Read a VirtualHardwareSection: CPUs, memory, disks on their controllers, NICs and firmware.

Tools disagree on almost everything here (units, generic vs. per-configuration Items, oVirt's own
attributes), so each value is taken from the most specific place that has it and checked before use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from lxml import etree

from freezeframe.adapters.ovf.model import (
    MAX_CAPACITY,
    MAX_MEMORY,
    MAX_VCPUS,
    NS_VMW,
    ImportedDisk,
    ImportedNic,
    OvfFileRef,
    format_from_uri,
)
from freezeframe.adapters.ovf.safexml import DescriptorReader, local_name, namespace, qname, text_of
from freezeframe.adapters.ovf.units import parse_byte_units, parse_count
from freezeframe.errors import OvfCapacityError, OvfInvalidValue, OvfMissingReference, OvfUnsupported

_OVIRT_INTERFACES: Mapping[str, str] = {
    "virtio": "virtio",
    "virtio_scsi": "virtio-scsi",
    "ide": "ide",
    "sata": "sata",
    "spapr_vscsi": "scsi",
}

Fields = Mapping[str, str]


@dataclass(frozen=True)
class DescriptorContext:
    """What the hardware reader needs from the rest of the descriptor."""

    reader: DescriptorReader
    dialect: str
    vs: etree._Element
    configuration: str | None
    disk_elements: Mapping[str, etree._Element]
    files: Mapping[str, OvfFileRef]
    files_by_href: Mapping[str, OvfFileRef]


@dataclass(frozen=True)
class VirtualHardware:
    system_type: str | None
    vcpus: int
    memory_bytes: int
    disks: tuple[ImportedDisk, ...]
    nics: tuple[ImportedNic, ...]
    firmware: str | None


def _rtype(fields: Fields) -> int | None:
    value = fields.get("ResourceType")
    if value is None or not value.isdigit():
        return None
    return int(value)


def _item_fields(el: etree._Element) -> dict[str, str]:
    fields: dict[str, str] = {}
    for child in el:
        if isinstance(child.tag, str):
            value = text_of(child)
            name = local_name(child)
            if value is not None and name not in fields:
                fields[name] = value
    return fields


def _items(ctx: DescriptorContext, vhs: etree._Element) -> list[dict[str, str]]:
    """The Items in force for the configuration, in document order.

    An Item for the chosen configuration replaces a generic Item with the same InstanceID
    (VMware and COT write a default CPU/memory Item, then per-configuration overrides).
    """
    reader = ctx.reader
    items: list[dict[str, str]] = []
    generic_position: dict[str, int] = {}
    for el in vhs:
        if not isinstance(el.tag, str) or local_name(el) not in ("Item", "StorageItem", "EthernetPortItem"):
            continue
        if not reader.in_configuration(el, ctx.configuration):
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
    return items


def _vcpus(items: list[dict[str, str]], warnings: list[str]) -> int:
    vcpus = 1
    cpu_items = [f for f in items if _rtype(f) == 3]
    if cpu_items:
        cpu = cpu_items[0]
        if "VirtualQuantity" in cpu:
            vcpus = parse_count(cpu["VirtualQuantity"], "CPU VirtualQuantity")
        elif "num_of_sockets" in cpu:
            vcpus = parse_count(cpu["num_of_sockets"], "num_of_sockets") * parse_count(
                cpu.get("cpu_per_socket", "1"), "cpu_per_socket"
            )
    else:
        warnings.append("no CPU item: assumed 1 vCPU")
    if not 0 < vcpus <= MAX_VCPUS:
        raise OvfInvalidValue(f"{vcpus} vCPUs is out of range (1-{MAX_VCPUS})")
    return vcpus


def _memory_bytes(items: list[dict[str, str]], name: str) -> int:
    mem_items = [f for f in items if _rtype(f) == 4]
    if not mem_items:
        raise OvfInvalidValue(f"virtual system {name!r} has no memory item (ResourceType 4)")
    memory_bytes = parse_count(mem_items[0].get("VirtualQuantity"), "memory VirtualQuantity") * parse_byte_units(
        mem_items[0].get("AllocationUnits"), default=2**20
    )
    if not 0 < memory_bytes <= MAX_MEMORY:
        raise OvfInvalidValue(f"memory of {memory_bytes} bytes is out of range")
    return memory_bytes


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


def _resolve_property(ctx: DescriptorContext, key: str) -> str:
    reader = ctx.reader
    for section in reader.children(ctx.vs, "ProductSection"):
        for prop in reader.children(section, "Property"):
            if reader.attr(prop, "key") == key and reader.in_configuration(prop, ctx.configuration):
                value = reader.attr(prop, "value")
                if value is not None:
                    return value
    raise OvfInvalidValue(f"capacity refers to property ${{{key}}} which has no value")


def _capacity(ctx: DescriptorContext, disk: etree._Element, disk_id: str) -> tuple[int, int | None]:
    reader = ctx.reader
    raw = reader.attr(disk, "capacity")
    if raw is not None:
        match = re.fullmatch(r"\s*\$\{([^}]+)\}\s*", raw)
        if match:
            raw = _resolve_property(ctx, match.group(1))
    if raw is not None and re.fullmatch(r"\s*-\d+\s*", raw):
        raise OvfCapacityError(f"disk {disk_id!r} capacity {raw.strip()} is not positive")
    quantity = parse_count(raw, f"disk {disk_id!r} capacity")
    units = parse_byte_units(reader.attr(disk, "capacityAllocationUnits"))
    capacity = quantity * units
    if capacity <= 0:
        raise OvfCapacityError(f"disk {disk_id!r} capacity is {capacity} bytes; it must be positive")
    if capacity > MAX_CAPACITY:
        raise OvfCapacityError(f"disk {disk_id!r} capacity {capacity} bytes is more than 64 TiB; refused as absurd")
    populated_raw = reader.attr(disk, "populatedSize")
    populated = None if populated_raw is None else parse_count(populated_raw, f"disk {disk_id!r} populatedSize")
    if populated is not None and populated > capacity:
        raise OvfCapacityError(
            f"disk {disk_id!r} capacity {capacity} bytes is smaller than its populated size {populated}"
        )
    return capacity, populated


def _disk_element(ctx: DescriptorContext, host: str) -> etree._Element:
    """The DiskSection/Disk a disk Item's HostResource names (``ovf:/disk/ID``; oVirt: id or file)."""
    match = re.fullmatch(r"(?:ovf:)?/disk/(.+)", host)
    disk_el: etree._Element | None = None
    if match:
        disk_el = ctx.disk_elements.get(match.group(1))
    elif ctx.dialect == "ovirt":
        disk_el = ctx.disk_elements.get(host) or next(
            (d for d in ctx.disk_elements.values() if ctx.reader.attr(d, "fileRef") == host), None
        )
    elif re.fullmatch(r"(?:ovf:)?/file/.+", host):
        raise OvfUnsupported(f"disk backed directly by a file ({host}) is not supported")
    if disk_el is None:
        raise OvfMissingReference(f"disk item refers to {host!r}, which is not in the DiskSection")
    return disk_el


def _controller(
    ctx: DescriptorContext, fields: Fields, by_instance: Mapping[str, Fields], disk_el: etree._Element, disk_id: str
) -> tuple[str | None, str | None, str | None]:
    """(controller kind, ResourceSubType, controller address) of the disk's parent Item."""
    parent = fields.get("Parent")
    parent_fields = by_instance.get(parent) if parent else None
    if parent_fields is not None:
        parent_type = _rtype(parent_fields)
        subtype = parent_fields.get("ResourceSubType")
        kind = _controller_kind(parent_type if parent_type is not None else -1, subtype)
        return kind, subtype, parent_fields.get("Address")
    if ctx.dialect == "ovirt":
        interface = (ctx.reader.attr(disk_el, "disk-interface") or "").lower()
        return _OVIRT_INTERFACES.get(interface, interface or None), None, None
    if parent:
        raise OvfMissingReference(f"disk {disk_id!r} sits on controller {parent!r}, which does not exist")
    return None, None, None


def _disk(
    ctx: DescriptorContext, fields: Fields, by_instance: Mapping[str, Fields], used: set[str], warnings: list[str]
) -> ImportedDisk:
    reader = ctx.reader
    host = fields.get("HostResource")
    if not host:
        raise OvfMissingReference(f"disk item {fields.get('ElementName', '?')!r} has no HostResource")
    disk_el = _disk_element(ctx, host)
    disk_id = reader.attr(disk_el, "diskId") or host
    if disk_id in used:
        raise OvfInvalidValue(f"disk {disk_id!r} is attached twice")
    used.add(disk_id)
    capacity, populated = _capacity(ctx, disk_el, disk_id)
    file_ref = reader.attr(disk_el, "fileRef")
    ref: OvfFileRef | None = None
    if file_ref:
        ref = ctx.files.get(file_ref) or (ctx.files_by_href.get(file_ref) if ctx.dialect == "ovirt" else None)
        if ref is None:
            raise OvfMissingReference(f"disk {disk_id!r} refers to file {file_ref!r}, not in References")
    format_uri = reader.attr(disk_el, "format")
    disk_format = format_from_uri(format_uri) if ref is not None else None
    volume_format = (reader.attr(disk_el, "volume-format") or "").upper()
    if ctx.dialect == "ovirt" and volume_format in ("COW", "RAW"):
        disk_format = "qcow2" if volume_format == "COW" else "raw"
    if ref is not None and disk_format is None:
        warnings.append(f"disk {disk_id!r}: unknown format URI {format_uri!r}")
    controller, subtype, controller_address = _controller(ctx, fields, by_instance, disk_el, disk_id)
    return ImportedDisk(
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


def _firmware(vhs: etree._Element) -> str | None:
    firmware = None
    for el in vhs:
        if (
            isinstance(el.tag, str)
            and namespace(el) == NS_VMW
            and local_name(el) == "Config"
            and el.get(qname(NS_VMW, "key")) == "firmware"
        ):
            firmware = el.get(qname(NS_VMW, "value"))
    return firmware


def read_hardware(ctx: DescriptorContext, name: str, networks: tuple[str, ...], warnings: list[str]) -> VirtualHardware:
    """The first VirtualHardwareSection of the virtual system, for the chosen configuration."""
    reader = ctx.reader
    sections = list(reader.children(ctx.vs, "VirtualHardwareSection"))
    if not sections:
        raise OvfUnsupported(f"virtual system {name!r} has no VirtualHardwareSection")
    if len(sections) > 1:
        warnings.append(f"{len(sections)} VirtualHardwareSections: used the first")
    vhs = sections[0]
    system_type = None
    system_el = reader.child(vhs, "System")
    if system_el is not None:
        for child in system_el:
            if isinstance(child.tag, str) and local_name(child) == "VirtualSystemType":
                system_type = text_of(child)

    items = _items(ctx, vhs)
    by_instance = {item_id: f for f in items if (item_id := f.get("InstanceID") or f.get("InstanceId"))}
    vcpus = _vcpus(items, warnings)
    memory_bytes = _memory_bytes(items, name)
    used: set[str] = set()
    disks = tuple(_disk(ctx, f, by_instance, used, warnings) for f in items if _rtype(f) == 17)
    nics = tuple(
        ImportedNic(
            network=f.get("Connection"), model=f.get("ResourceSubType"), mac=f.get("Address") or f.get("MACAddress")
        )
        for f in items
        if _rtype(f) == 10
    )
    for nic in nics:
        if nic.network is not None and networks and nic.network not in networks:
            warnings.append(f"NIC connected to {nic.network!r}, which the NetworkSection does not list")
    return VirtualHardware(system_type, vcpus, memory_bytes, disks, nics, _firmware(vhs))
