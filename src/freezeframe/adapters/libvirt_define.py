"""Build a libvirt domain from a snapshot set's recorded ``Hardware`` and define, start and remove it.

Restore (and verify's throw-away clone) rebuild the machine from what the set recorded, not from the
original domain's XML: the original may be gone, and what is rebuilt must be exactly what the set says
(vCPUs, memory, architecture, machine, boot method, disks in order with bus/target/boot order, NICs on the
same networks with new MACs, description and ``<metadata>``). A guest-agent channel is always added, since
freezeframe's later operations depend on it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
from lxml import etree

from freezeframe.errors import HypervisorError, InstanceNotFound, InvalidRequest
from freezeframe.model import DiskSpec, Hardware, NicSpec

AGENT_CHANNEL = "org.qemu.guest_agent.0"
UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)
NIC_TYPES = ("network", "bridge", "user")
"""NIC kinds whose source the set records completely enough to rebuild."""
_X86 = ("x86_64", "i686")
log = logging.getLogger(__name__)
_SAFE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=True)


@dataclass(frozen=True)
class DefinedDisk:
    """A disk of the domain to build: where the recorded disk's data now lives."""

    spec: DiskSpec
    path: Path
    format: str


@dataclass(frozen=True)
class RbdAccess:
    """How QEMU reaches RBD images: the monitors and the cephx user whose key a libvirt secret holds."""

    hosts: tuple[tuple[str, str], ...]
    user: str
    secret_uuid: str | None


RBD_PREFIX = "rbd:"


def check_nics(conn: libvirt.virConnect, nics: Sequence[NicSpec]) -> None:
    """Every network/bridge the NICs need must exist (and a network be active) before anything is made."""
    for nic in nics:
        if nic.source_type not in NIC_TYPES:
            raise InvalidRequest(
                f"NIC {nic.mac} is of type {nic.source_type!r}, which the set does not record enough about to "
                f"rebuild (supported: {', '.join(NIC_TYPES)})"
            )
        if nic.source_type == "network":
            if not nic.source:
                raise InvalidRequest(f"NIC {nic.mac} names no libvirt network")
            try:
                net = conn.networkLookupByName(nic.source)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                    raise InvalidRequest(
                        f"libvirt network {nic.source!r} (NIC {nic.mac} of the set) does not exist; define it "
                        "(`virsh net-define`) and start it, then restore again"
                    ) from exc
                raise HypervisorError(f"looking up network {nic.source!r}: {exc.get_error_message()}") from exc
            if not net.isActive():
                raise InvalidRequest(
                    f"libvirt network {nic.source!r} exists but is not active; `virsh net-start {nic.source}`"
                )
        elif nic.source_type == "bridge" and (not nic.source or not Path("/sys/class/net", nic.source).exists()):
            raise InvalidRequest(f"host bridge {nic.source!r} (NIC {nic.mac} of the set) does not exist")


def domain_xml(
    name: str,
    hardware: Hardware,
    disks: Sequence[DefinedDisk],
    *,
    nics: Sequence[NicSpec] | None = None,
    domain_type: str = "qemu",
    console_log: Path | None = None,
    rbd: RbdAccess | None = None,
) -> str:
    """The domain XML; ``nics=None`` takes the recorded NICs, ``[]`` builds one without network.

    No ``<mac>`` is written, so libvirt gives every NIC a new address; no ``<uuid>``, so it gets a new one.
    """
    root = etree.Element("domain", type=domain_type)
    etree.SubElement(root, "name").text = name
    if hardware.description is not None:
        etree.SubElement(root, "description").text = hardware.description
    if hardware.metadata_xml:
        root.append(_metadata(hardware.metadata_xml))
    etree.SubElement(root, "memory", unit="KiB").text = str(hardware.memory_kib)
    etree.SubElement(root, "vcpu").text = str(hardware.vcpus)

    os_el = etree.SubElement(root, "os")
    if hardware.boot.firmware == "efi":
        os_el.set("firmware", "efi")
    type_el = etree.SubElement(os_el, "type", arch=hardware.arch)
    if hardware.machine:
        type_el.set("machine", hardware.machine)
    type_el.text = hardware.os_type
    for tag in ("kernel", "initrd", "cmdline"):
        value = getattr(hardware.boot, tag)
        if value is not None:
            etree.SubElement(os_el, tag).text = value
    # libvirt refuses <os><boot> together with per-device boot order.
    if not any(d.spec.boot_order for d in disks):
        for dev in hardware.boot.boot_devices:
            if dev:
                etree.SubElement(os_el, "boot", dev=dev)

    if hardware.arch in _X86:
        features = etree.SubElement(root, "features")
        etree.SubElement(features, "acpi")  # guest-initiated power-off needs ACPI
        etree.SubElement(features, "apic")
    etree.SubElement(root, "clock", offset="utc")
    etree.SubElement(root, "on_poweroff").text = "destroy"
    etree.SubElement(root, "on_reboot").text = "restart"
    etree.SubElement(root, "on_crash").text = "destroy"

    devices = etree.SubElement(root, "devices")
    for disk in disks:
        if str(disk.path).startswith(RBD_PREFIX):
            el = _rbd_disk(devices, str(disk.path)[len(RBD_PREFIX) :], rbd)
        else:
            el = etree.SubElement(devices, "disk", type="file", device="disk")
            etree.SubElement(el, "driver", name="qemu", type=disk.format)
            etree.SubElement(el, "source", file=str(disk.path))
        etree.SubElement(el, "target", dev=disk.spec.target, bus=disk.spec.bus)
        if disk.spec.boot_order:
            etree.SubElement(el, "boot", order=str(disk.spec.boot_order))
        if disk.spec.serial:
            etree.SubElement(el, "serial").text = disk.spec.serial
    for nic in hardware.nics if nics is None else nics:
        if nic.source_type not in NIC_TYPES:
            raise InvalidRequest(f"NIC {nic.mac}: type {nic.source_type!r} cannot be rebuilt")
        el = etree.SubElement(devices, "interface", type=nic.source_type)
        if nic.source_type in ("network", "bridge") and nic.source:
            etree.SubElement(el, "source", {nic.source_type: nic.source})
        if nic.model:
            etree.SubElement(el, "model", type=nic.model)
    channel = etree.SubElement(devices, "channel", type="unix")
    etree.SubElement(channel, "target", type="virtio", name=AGENT_CHANNEL)
    if console_log is not None:
        serial = etree.SubElement(devices, "serial", type="file")
        etree.SubElement(serial, "source", path=str(console_log))
        etree.SubElement(serial, "target", port="0")
        console = etree.SubElement(devices, "console", type="file")
        etree.SubElement(console, "source", path=str(console_log))
        etree.SubElement(console, "target", type="serial", port="0")
    else:
        etree.SubElement(devices, "serial", type="pty")
    rng = etree.SubElement(devices, "rng", model="virtio")
    etree.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def _rbd_disk(devices: etree._Element, volume: str, rbd: RbdAccess | None) -> etree._Element:
    """``<disk type='network'>`` over an RBD image (a restored clone), with cephx through the libvirt secret."""
    if rbd is None:
        raise InvalidRequest(f"disk rbd:{volume} needs the Ceph settings (FREEZEFRAME_CEPH_CONF, _USER, _SECRET_UUID)")
    el = etree.SubElement(devices, "disk", type="network", device="disk")
    etree.SubElement(el, "driver", name="qemu", type="raw", cache="none")
    if rbd.secret_uuid:
        auth = etree.SubElement(el, "auth", username=rbd.user)
        etree.SubElement(auth, "secret", type="ceph", uuid=rbd.secret_uuid)
    source = etree.SubElement(el, "source", protocol="rbd", name=volume)
    for host, port in rbd.hosts:
        etree.SubElement(source, "host", name=host, port=port)
    return el


def _metadata(xml: str) -> etree._Element:
    try:
        element = etree.fromstring(xml.encode(), _SAFE_PARSER)
    except etree.XMLSyntaxError as exc:
        raise InvalidRequest(f"the set's recorded <metadata> is not valid XML ({exc}); it cannot be restored") from exc
    if element.tag != "metadata":
        wrapper = etree.Element("metadata")
        wrapper.append(element)
        return wrapper
    return element


def name_taken(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise HypervisorError(f"looking up {name!r}: {exc.get_error_message()}") from exc
    return True


def define(conn: libvirt.virConnect, xml: str) -> libvirt.virDomain:
    try:
        return conn.defineXML(xml)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"libvirt refused the restored domain: {exc.get_error_message()}") from exc


def start(dom: libvirt.virDomain) -> None:
    try:
        dom.create()
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"{dom.name()} was defined but did not start: {exc.get_error_message()}") from exc


def lookup_uuid(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise HypervisorError(f"looking up {uuid}: {exc.get_error_message()}") from exc


def remove_domain(conn: libvirt.virConnect, uuid: str) -> bool:
    """Destroy (if running) and undefine; True if the domain existed. Idempotent, for cleanup paths."""
    dom = lookup_uuid(conn, uuid)
    if dom is None:
        return False
    with contextlib.suppress(libvirt.libvirtError):  # already stopped
        if dom.isActive():
            dom.destroy()
    try:
        dom.undefineFlags(UNDEFINE_FLAGS)
    except libvirt.libvirtError:
        try:
            dom.undefine()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise HypervisorError(f"cannot undefine {uuid}: {exc.get_error_message()}") from exc
    return True


def wait_shutoff(dom: libvirt.virDomain, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if not dom.isActive():
                return True
        except libvirt.libvirtError:
            return True
        time.sleep(0.1)
    return False


def shutdown_via_agent(dom: libvirt.virDomain, timeout_s: float) -> bool:
    """Ask the guest agent to power off (the guest unmounts its filesystems); True if it stopped in time.

    A busy guest's agent may miss libvirt's response timeout, so the request is repeated until the deadline.
    """
    deadline = time.monotonic() + timeout_s
    last: libvirt.libvirtError | None = None
    while time.monotonic() < deadline:
        try:
            if not dom.isActive():
                return True
            dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
            return wait_shutoff(dom, max(0.0, deadline - time.monotonic()))
        except libvirt.libvirtError as exc:
            last = exc
            time.sleep(1.0)
    log.warning("%s did not power off through its agent within %.0f s (%s)", dom.name(), timeout_s, last)
    return False


def disk_sources(dom: libvirt.virDomain, live: bool = True) -> dict[str, str]:
    """target -> source file of every file-backed disk, and ``rbd:POOL/IMAGE`` of every RBD disk, as the domain
    currently uses them."""
    flags = 0 if live else libvirt.VIR_DOMAIN_XML_INACTIVE
    root = etree.fromstring(dom.XMLDesc(flags).encode())
    found: dict[str, str] = {}
    for el in root.findall("devices/disk"):
        target, source = el.find("target"), el.find("source")
        if target is not None and source is not None and source.get("file"):
            found[target.get("dev", "")] = str(source.get("file"))
        elif target is not None and source is not None and source.get("protocol") == "rbd" and source.get("name"):
            found[target.get("dev", "")] = f"{RBD_PREFIX}{source.get('name')}"
    return found


def disk_pci_addresses(dom: libvirt.virDomain) -> dict[str, tuple[int, int, int, int]]:
    """target -> PCI (domain, bus, slot, function) from the live XML, to match guest-get-fsinfo disks."""
    root = etree.fromstring(dom.XMLDesc(0).encode())
    found: dict[str, tuple[int, int, int, int]] = {}
    for el in root.findall("devices/disk"):
        target, address = el.find("target"), el.find("address")
        if target is None or address is None or address.get("type") != "pci":
            continue
        domain, bus, slot, function = (int(address.get(k, "0"), 0) for k in ("domain", "bus", "slot", "function"))
        found[target.get("dev", "")] = (domain, bus, slot, function)
    return found


def block_pull(dom: libvirt.virDomain, target: str, timeout_s: float = 3600.0) -> None:
    """Copy the backing data into a running domain's top image (``virsh blockpull``) and wait for it."""
    try:
        dom.blockPull(target, 0, 0)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot start blockpull of {dom.name()}:{target}: {exc.get_error_message()}") from exc
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            info: dict[str, Any] = dom.blockJobInfo(target, 0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"blockpull of {dom.name()}:{target}: {exc.get_error_message()}") from exc
        if not info:
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(libvirt.libvirtError):
                dom.blockJobAbort(target, 0)
            raise HypervisorError(f"blockpull of {dom.name()}:{target} did not finish within {timeout_s:.0f} s")
        time.sleep(0.1)


def domains_using(conn: libvirt.virConnect, paths: Sequence[str]) -> dict[str, tuple[libvirt.virDomain, str]]:
    """path -> (domain, disk target) for every defined domain whose disk source is one of ``paths``."""
    wanted = {str(Path(p).resolve()): p for p in paths}
    found: dict[str, tuple[libvirt.virDomain, str]] = {}
    try:
        domains = conn.listAllDomains()
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot list domains: {exc.get_error_message()}") from exc
    for dom in domains:
        try:
            sources = disk_sources(dom, live=bool(dom.isActive()))
        except libvirt.libvirtError:
            continue  # undefined meanwhile
        for target, source in sources.items():
            original = wanted.get(str(Path(source).resolve()))
            if original is not None:
                found[original] = (dom, target)
    return found


def require_domain(conn: libvirt.virConnect, uuid: str, name: str) -> libvirt.virDomain:
    dom = lookup_uuid(conn, uuid)
    if dom is None:
        raise InstanceNotFound(f"instance {name} ({uuid}) is no longer defined in libvirt")
    return dom
