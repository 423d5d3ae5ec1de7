"""Read the virtual system(s) out of an OVF descriptor, ours or another tool's (or an attacker's).

The envelope (OVF 1.x, 2.x or the oVirt dialect), References, DiskSection, NetworkSection, the
deployment configuration and the virtual system are read here; the hardware section and our
ProductSection have readers of their own. Parsing is defensive (``safexml``): no DTD, no entities,
no network, bounded size, and every number is checked before it is believed.
"""

from __future__ import annotations

from dataclasses import replace

from lxml import etree

from freezeframe.adapters.ovf.hardware import DescriptorContext, read_hardware
from freezeframe.adapters.ovf.model import NS_OVF09, NS_OVF1, NS_OVF1_OVIRT, NS_OVF2, ImportedMachine, OvfFileRef
from freezeframe.adapters.ovf.product import read_freezeframe
from freezeframe.adapters.ovf.safexml import DescriptorReader, local_name, namespace, safe_parse, text_of
from freezeframe.adapters.ovf.units import parse_count
from freezeframe.errors import OvfInvalidValue, OvfNotOvf, OvfRejected, OvfUnsupported


def _envelope_version(root: etree._Element) -> tuple[str, int, str]:
    if not isinstance(root.tag, str) or local_name(root) != "Envelope":
        raise OvfNotOvf(f"root element is {root.tag!r}, not an OVF Envelope")
    ns = namespace(root) or ""
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


def _references(reader: DescriptorReader) -> dict[str, OvfFileRef]:
    files: dict[str, OvfFileRef] = {}
    refs_el = reader.child(reader.root, "References")
    if refs_el is None:
        return files
    for file_el in reader.children(refs_el, "File"):
        file_id = reader.attr(file_el, "id")
        href = reader.attr(file_el, "href")
        if not file_id or not href:
            raise OvfInvalidValue("a References/File lacks ovf:id or ovf:href")
        if file_id in files:
            raise OvfInvalidValue(f"file id {file_id!r} is declared twice")
        size_raw = reader.attr(file_el, "size")
        size = None if size_raw is None else parse_count(size_raw, f"size of file {href!r}")
        files[file_id] = OvfFileRef(file_id=file_id, href=href, size=size)
    return files


def _pick_configuration(reader: DescriptorReader, wanted: str | None) -> str | None:
    section = reader.child(reader.root, "DeploymentOptionSection")
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


def _content(reader: DescriptorReader) -> etree._Element:
    content = [
        c for c in reader.children(reader.root) if reader.kind(c) in ("VirtualSystem", "VirtualSystemCollection")
    ]
    if not content:
        raise OvfUnsupported("descriptor has no VirtualSystem")
    return content[0]


def _systems_of(reader: DescriptorReader, collection: etree._Element) -> list[etree._Element]:
    """The VirtualSystems of a collection; nested collections are refused."""
    if any(reader.kind(c) == "VirtualSystemCollection" for c in reader.children(collection)):
        raise OvfUnsupported("a VirtualSystemCollection inside another one is not supported")
    return [c for c in reader.children(collection) if reader.kind(c) == "VirtualSystem"]


def _virtual_system(reader: DescriptorReader, warnings: list[str]) -> etree._Element:
    vs = _content(reader)
    if reader.kind(vs) == "VirtualSystemCollection":
        systems = [c for c in vs.iter() if isinstance(c.tag, str) and reader.kind(c) == "VirtualSystem"]
        if len(systems) != 1:
            raise OvfUnsupported(
                f"VirtualSystemCollection with {len(systems)} virtual systems (a group set?): import it with "
                "`freezeframe import FILE.ova --as-prefix P`, one instance per system"
            )
        vs = systems[0]
        warnings.append("VirtualSystemCollection with a single VirtualSystem: imported that system")
    return vs


def _disk_elements(reader: DescriptorReader) -> dict[str, etree._Element]:
    disk_els: dict[str, etree._Element] = {}
    disk_section = reader.child(reader.root, "DiskSection")
    if disk_section is not None:
        for declared in reader.children(disk_section, "Disk"):
            declared_id = reader.attr(declared, "diskId")
            if not declared_id:
                raise OvfInvalidValue("a DiskSection/Disk lacks ovf:diskId")
            disk_els[declared_id] = declared
    return disk_els


def _networks(reader: DescriptorReader) -> tuple[str, ...]:
    net_section = reader.child(reader.root, "NetworkSection")
    if net_section is None:
        return ()
    return tuple(n for n in (reader.attr(e, "name") for e in reader.children(net_section, "Network")) if n)


def parse_descriptor(xml: bytes, configuration: str | None = None) -> ImportedMachine:
    """Read one virtual system out of an OVF descriptor, ours or another tool's.

    ``configuration`` picks a DeploymentOptionSection configuration; the default one otherwise.
    A VirtualSystemCollection is accepted only when it holds exactly one VirtualSystem.
    """
    envelope = _Envelope(xml, configuration)
    warnings: list[str] = []
    vs = _virtual_system(envelope.reader, warnings)
    return envelope.machine(vs, warnings, envelope.files)


def parse_collection(xml: bytes) -> tuple[ImportedMachine, ...]:
    """Every virtual system of a VirtualSystemCollection (a group set's package), each read as
    ``parse_descriptor`` reads one, with only the files its own disks reference.

    Refused: no collection, an empty or nested one, two systems with one id, a disk file two systems share, a
    referenced file no system uses; a system that cannot be read is named in the error.
    """
    envelope = _Envelope(xml, None)
    reader = envelope.reader
    collection = _content(reader)
    if reader.kind(collection) != "VirtualSystemCollection":
        raise OvfUnsupported("the package holds one virtual system, not a collection: import it with --as NAME")
    systems = _systems_of(reader, collection)
    if not systems:
        raise OvfInvalidValue("the VirtualSystemCollection holds no VirtualSystem")
    machines: list[ImportedMachine] = []
    for vs in systems:
        label = reader.attr(vs, "id") or text_of(reader.child(vs, "Name")) or f"#{len(machines) + 1}"
        try:
            machine = envelope.machine(vs, [], envelope.files)
        except OvfRejected as exc:
            raise type(exc)(f"virtual system {label!r}: {exc}") from None
        hrefs = {d.href for d in machine.disks if d.href is not None}
        files = {k: ref for k, ref in envelope.files.items() if ref.href in hrefs}
        machines.append(replace(machine, files=tuple(files.values())))
    _check_systems(reader, systems, machines, envelope.files)
    return tuple(machines)


def _check_systems(
    reader: DescriptorReader,
    systems: list[etree._Element],
    machines: list[ImportedMachine],
    files: dict[str, OvfFileRef],
) -> None:
    ids = [reader.attr(vs, "id") for vs in systems]
    if len(set(ids)) != len(ids):
        raise OvfInvalidValue(f"two virtual systems of the collection share an id: {ids}")
    owner: dict[str, str] = {}
    for vs_id, machine in zip(ids, machines, strict=True):
        for ref in machine.files:
            if ref.href in owner:
                raise OvfInvalidValue(
                    f"virtual systems {owner[ref.href]!r} and {vs_id!r} both use disk file {ref.href!r}"
                )
            owner[ref.href] = str(vs_id)
    unused = [ref.href for ref in files.values() if ref.href not in owner]
    if unused:
        raise OvfInvalidValue(f"the collection references files no virtual system uses: {', '.join(unused)}")


class _Envelope:
    """The parts of a descriptor every virtual system shares: References, DiskSection, networks, configuration."""

    def __init__(self, xml: bytes, configuration: str | None) -> None:
        root = safe_parse(xml)
        ns, self.version, self.dialect = _envelope_version(root)
        self.reader = DescriptorReader(root, ns)
        self.files = _references(self.reader)
        self.configuration = _pick_configuration(self.reader, configuration)
        self.disk_elements = _disk_elements(self.reader)
        self.networks = _networks(self.reader)

    def machine(self, vs: etree._Element, warnings: list[str], files: dict[str, OvfFileRef]) -> ImportedMachine:
        reader = self.reader
        name = text_of(reader.child(vs, "Name")) or reader.attr(vs, "id") or "imported"
        os_el = reader.child(vs, "OperatingSystemSection")
        os_id = reader.attr(os_el, "id") if os_el is not None else None
        os_description = text_of(reader.child(os_el, "Description")) if os_el is not None else None
        ctx = DescriptorContext(
            reader=reader,
            dialect=self.dialect,
            vs=vs,
            configuration=self.configuration,
            disk_elements=self.disk_elements,
            files=files,
            files_by_href={ref.href: ref for ref in files.values()},
        )
        hardware = read_hardware(ctx, name, self.networks, warnings)
        info = read_freezeframe(reader, vs)
        arch = machine = None
        firmware = hardware.firmware
        if info is not None:
            arch, machine = info.arch, info.machine
            firmware = info.firmware or firmware
        return ImportedMachine(
            ovf_version=self.version,
            dialect=self.dialect,
            name=name,
            vcpus=hardware.vcpus,
            memory_bytes=hardware.memory_bytes,
            arch=arch,
            machine=machine,
            firmware=firmware,
            system_type=hardware.system_type,
            os_id=os_id,
            os_description=os_description,
            disks=hardware.disks,
            nics=hardware.nics,
            networks=self.networks,
            files=tuple(files.values()),
            configuration=self.configuration,
            freezeframe=info,
            warnings=tuple(warnings),
        )
