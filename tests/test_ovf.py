"""OVF descriptors: what we write validates and round-trips; what others wrote is parsed or refused clearly."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from lxml import etree

from freezeframe.adapters.ovf import (
    FORMAT_URI_QCOW2,
    FORMAT_URI_VMDK_STREAM,
    MAX_DESCRIPTOR_BYTES,
    NS_OVF1,
    NS_OVF2,
    NS_RASD,
    OvfDisk,
    build_descriptor,
    parse_byte_units,
    parse_descriptor,
    validate_descriptor,
)
from freezeframe.adapters.ovf.product import portable_hardware
from freezeframe.errors import (
    InvalidRequest,
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
from freezeframe.model import (
    BootSpec,
    Consistency,
    DiskSpec,
    Hardware,
    Member,
    NicSpec,
    SetStatus,
    SnapshotSet,
)
from freezeframe.serialize import hardware_to_dict

PROJECT = Path(__file__).resolve().parents[1]
# ../shared next to the project (a clone), or two levels up (a git worktree under wt/).
SHARED = next(
    (p / "shared" / "ovf" for p in (PROJECT.parent, PROJECT.parent.parent) if (p / "shared" / "ovf").is_dir()),
    PROJECT.parent / "shared" / "ovf",
)
SAMPLES = SHARED / "samples"
XSD = SHARED / "xsd"
SET_ID = "0b6f3a8e-5d7c-4c1e-9a57-2f1d8e3c4b5a"
GiB = 2**30
MiB = 2**20


def need_shared() -> None:
    if not (XSD / "ovf1" / "dsp8023_1.1.1.xsd").is_file():
        pytest.skip(f"shared OVF reference material not found at {SHARED} (schemas and third-party samples)")


def make_set(buses: tuple[str, ...] = ("virtio", "sata"), memory_kib: int = 2 * 1024 * 1024) -> SnapshotSet:
    targets = {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd"}
    disks: list[DiskSpec] = []
    members: list[Member] = []
    for i, bus in enumerate(buses):
        target = f"{targets.get(bus, 'xd')}{chr(ord('a') + i)}"
        size = (i + 1) * GiB
        disks.append(
            DiskSpec(target=target, bus=bus, source_path=f"/images/{target}.qcow2", format="qcow2", virtual_size=size)
        )
        members.append(
            Member(
                set_id=SET_ID,
                target=target,
                bus=bus,
                boot_order=1 if i == 0 else None,
                virtual_size=size,
                format="qcow2",
                path=f"/sets/{SET_ID}/{target}.qcow2",
                sha256="ab" * 32 if i == 0 else None,
                metadata={"freezeframe.set": SET_ID, "note": f'disk <{i}> & "quoted"'},
            )
        )
    hw = Hardware(
        vcpus=3,
        memory_kib=memory_kib,
        arch="x86_64",
        machine="pc-q35-7.2",
        boot=BootSpec(firmware="uefi", boot_devices=("hd",)),
        disks=tuple(disks),
        nics=(
            NicSpec(mac="52:54:00:12:34:56", model="virtio", source_type="network", source="default"),
            NicSpec(mac="52:54:00:65:43:21", model="e1000", source_type="bridge", source="br-lan"),
        ),
    )
    return SnapshotSet(
        id=SET_ID,
        name="nightly",
        instance_name="web01",
        instance_uuid="6f1c2b7e-8a6d-4f0e-b1a3-9c0d2e4f6a8b",
        requested=Consistency.APPLICATION,
        status=SetStatus.AVAILABLE,
        created_at=datetime(2024, 11, 27, 12, 0, 0, 123456, tzinfo=UTC),
        hardware=hw,
        achieved=Consistency.FILESYSTEM,
        members=members,
        metadata={"owner": "ops", "ticket": "OPS-1"},
        backup_type="full",
    )


def disks_for(snapshot_set: SnapshotSet, fmt: str = "vmdk") -> list[OvfDisk]:
    return [
        OvfDisk(
            target=m.target,
            href=f"web01-{m.target}.{fmt}",
            file_size=123_456 + i,
            format=fmt,
            capacity=m.virtual_size,
            populated_size=MiB * (i + 1),
        )
        for i, m in enumerate(snapshot_set.members)
    ]


# ------------------------------------------------------------------------------------------ writing


@pytest.mark.parametrize("version", [1, 2])
def test_descriptors_we_write_validate_against_the_dmtf_schema(version: int) -> None:
    need_shared()
    snapshot_set = make_set(("virtio", "scsi", "sata", "ide"))
    xml = build_descriptor(snapshot_set, disks_for(snapshot_set), ovf_version=version)
    validate_descriptor(xml, version, XSD)
    root = etree.fromstring(xml)
    assert root.tag == f"{{http://schemas.dmtf.org/ovf/envelope/{version}}}Envelope"


@pytest.mark.parametrize("version", [1, 2])
def test_schema_validation_reports_the_schema_message(version: int) -> None:
    need_shared()
    snapshot_set = make_set()
    xml = build_descriptor(snapshot_set, disks_for(snapshot_set), ovf_version=version)
    broken = re.sub(rb"<Info>Virtual disk information</Info>", b"", xml, count=1)
    with pytest.raises(OvfSchemaError, match=r"line \d+: .*Disk"):
        validate_descriptor(broken, version, XSD)
    other = build_descriptor(snapshot_set, disks_for(snapshot_set), ovf_version=3 - version)
    with pytest.raises(OvfSchemaError, match="No matching global declaration"):
        validate_descriptor(other, version, XSD)


def test_descriptor_carries_what_importers_read() -> None:
    snapshot_set = make_set(("virtio", "scsi", "sata", "ide"))
    root = etree.fromstring(build_descriptor(snapshot_set, disks_for(snapshot_set, "qcow2")))
    ns = {"ovf": NS_OVF1, "rasd": NS_RASD}
    disk = root.find("ovf:DiskSection/ovf:Disk", ns)
    assert disk is not None
    assert disk.get(f"{{{NS_OVF1}}}capacityAllocationUnits") == "byte"
    assert disk.get(f"{{{NS_OVF1}}}format") == FORMAT_URI_QCOW2
    items = root.findall("ovf:VirtualSystem/ovf:VirtualHardwareSection/ovf:Item", ns)
    by_type: dict[str, list[etree._Element]] = {}
    for item in items:
        by_type.setdefault(item.findtext("rasd:ResourceType", namespaces=ns) or "", []).append(item)
    assert by_type["3"][0].findtext("rasd:VirtualQuantity", namespaces=ns) == "3"
    assert by_type["4"][0].findtext("rasd:AllocationUnits", namespaces=ns) == "byte * 2^20"
    assert by_type["4"][0].findtext("rasd:VirtualQuantity", namespaces=ns) == "2048"
    # virtio and virtio-scsi on SCSI HBAs (6), SATA on 20, IDE on 5: what virt-v2v and VMware map.
    subtypes = sorted(i.findtext("rasd:ResourceSubType", namespaces=ns) or "" for i in by_type["6"])
    assert subtypes == ["virtio lsilogic", "virtio-scsi lsilogic"]
    assert [i.findtext("rasd:ResourceSubType", namespaces=ns) for i in by_type["20"]] == ["AHCI vmware.sata.ahci"]
    assert len(by_type["5"]) == 1
    hosts = [i.findtext("rasd:HostResource", namespaces=ns) for i in by_type["17"]]
    assert hosts == ["ovf:/disk/vmdisk1", "ovf:/disk/vmdisk2", "ovf:/disk/vmdisk3", "ovf:/disk/vmdisk4"]
    assert [i.findtext("rasd:Connection", namespaces=ns) for i in by_type["10"]] == ["default", "br-lan"]
    assert [i.findtext("rasd:Address", namespaces=ns) for i in by_type["10"]] == [
        "52:54:00:12:34:56",
        "52:54:00:65:43:21",
    ]
    system_type = root.findtext(
        "ovf:VirtualSystem/ovf:VirtualHardwareSection/ovf:System/{*}VirtualSystemType", namespaces=ns
    )
    assert system_type == "qemu-pc-q35-7.2"
    assert "vmx" not in (system_type or "")


@pytest.mark.parametrize("version", [1, 2])
def test_round_trip_keeps_hardware_disks_nics_and_metadata(version: int) -> None:
    snapshot_set = make_set(("virtio", "sata", "ide"))
    disks = disks_for(snapshot_set)
    machine = parse_descriptor(build_descriptor(snapshot_set, disks, ovf_version=version))
    assert machine.ovf_version == version
    assert machine.name == "web01"
    assert machine.vcpus == 3
    assert machine.memory_bytes == 2 * GiB
    assert machine.arch == "x86_64"
    assert machine.machine == "pc-q35-7.2"
    assert machine.firmware == "uefi"
    assert [d.href for d in machine.disks] == [d.href for d in disks]
    assert [d.capacity for d in machine.disks] == [GiB, 2 * GiB, 3 * GiB]
    assert [d.populated_size for d in machine.disks] == [MiB, 2 * MiB, 3 * MiB]
    assert [d.file_size for d in machine.disks] == [123_456, 123_457, 123_458]
    assert [d.format for d in machine.disks] == ["vmdk", "vmdk", "vmdk"]
    assert [d.format_uri for d in machine.disks] == [FORMAT_URI_VMDK_STREAM] * 3
    assert [d.controller for d in machine.disks] == ["virtio", "sata", "ide"]
    assert [d.address for d in machine.disks] == ["0", "0", "0"]
    assert [(n.network, n.mac) for n in machine.nics] == [
        ("default", "52:54:00:12:34:56"),
        ("br-lan", "52:54:00:65:43:21"),
    ]
    assert machine.networks == ("default", "br-lan")
    info = machine.freezeframe
    assert info is not None
    assert info.set_id == SET_ID
    assert info.set_name == "nightly"
    assert info.instance_name == "web01"
    assert info.instance_uuid == snapshot_set.instance_uuid
    assert info.requested == "application"
    assert info.achieved == "filesystem"
    assert info.backup_type == "full"
    assert datetime.fromisoformat(info.created_at or "") == snapshot_set.created_at
    assert info.set_metadata == {"owner": "ops", "ticket": "OPS-1"}
    assert info.hardware == portable_hardware(snapshot_set.hardware)
    assert [m.target for m in info.members] == [m.target for m in snapshot_set.members]
    assert [m.href for m in info.members] == [d.href for d in disks]
    assert [m.metadata for m in info.members] == [m.metadata for m in snapshot_set.members]
    assert [m.boot_order for m in info.members] == [1, None, None]
    assert info.members[0].sha256 == "ab" * 32
    assert machine.warnings == ()


@pytest.mark.parametrize("version", [1, 2])
def test_no_host_path_leaves_the_host(version: int) -> None:
    """Disk sources, kernel and initrd are this host's file system: the descriptor keeps file names only."""
    snapshot_set = make_set()
    boot = BootSpec(firmware="bios", kernel="/var/lib/ff/guest/vmlinuz-6.1", initrd="/var/lib/ff/guest/initrd.gz")
    snapshot_set.hardware = replace(snapshot_set.hardware, boot=boot)
    xml = build_descriptor(snapshot_set, disks_for(snapshot_set), version)
    assert b"/images/" not in xml and b"/var/lib/ff" not in xml and b"/sets/" not in xml
    info = parse_descriptor(xml).freezeframe
    assert info is not None and info.hardware is not None
    assert (info.hardware.boot.kernel, info.hardware.boot.initrd) == ("vmlinuz-6.1", "initrd.gz")
    assert [d.source_path for d in info.hardware.disks] == [None, None]


def test_ovf2_uses_ethernet_port_and_storage_items_after_the_items() -> None:
    snapshot_set = make_set(("virtio", "sata"))
    root = etree.fromstring(build_descriptor(snapshot_set, disks_for(snapshot_set), 2))
    vhs = root.find(f".//{{{NS_OVF2}}}VirtualHardwareSection")
    assert vhs is not None
    kinds = [etree.QName(el).localname for el in vhs if etree.QName(el).localname.endswith("Item")]
    assert kinds == ["Item"] * 4 + ["EthernetPortItem"] * 2 + ["StorageItem"] * 2  # cpu, mem, 2 controllers
    sasd = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData"
    hosts = [el.text for el in vhs.iter(f"{{{sasd}}}HostResource")]
    assert hosts == ["ovf:/disk/vmdisk1", "ovf:/disk/vmdisk2"]
    machine = parse_descriptor(build_descriptor(snapshot_set, disks_for(snapshot_set), 2))
    assert [d.controller for d in machine.disks] == ["virtio", "sata"]
    assert [n.network for n in machine.nics] == ["default", "br-lan"]


def test_controllers_fill_units_and_skip_the_scsi_hba_unit() -> None:
    snapshot_set = make_set(("virtio",) * 9 + ("ide",) * 3)
    machine = parse_descriptor(build_descriptor(snapshot_set, disks_for(snapshot_set)))
    virtio = [d for d in machine.disks if d.controller == "virtio"]
    assert [d.address for d in virtio] == ["0", "1", "2", "3", "4", "5", "6", "8", "9"]
    assert {d.controller_address for d in virtio} == {"0"}
    ide = [(d.controller_address, d.address) for d in machine.disks if d.controller == "ide"]
    assert ide == [("0", "0"), ("0", "1"), ("1", "0")]


def test_memory_not_a_whole_mib_is_rounded_up_but_kept_exact_in_our_section() -> None:
    snapshot_set = make_set(memory_kib=1024 * 1024 + 4)
    machine = parse_descriptor(build_descriptor(snapshot_set, disks_for(snapshot_set)))
    assert machine.memory_bytes == GiB + MiB
    assert machine.freezeframe is not None and machine.freezeframe.hardware is not None
    assert machine.freezeframe.hardware.memory_kib == 1024 * 1024 + 4


def test_build_refuses_inconsistent_input() -> None:
    snapshot_set = make_set()
    good = disks_for(snapshot_set)
    with pytest.raises(OvfBuildError, match="not a member"):
        build_descriptor(snapshot_set, [OvfDisk("vdz", "x.vmdk", 1, "vmdk", GiB)])
    with pytest.raises(OvfBuildError, match="file name"):
        build_descriptor(snapshot_set, [OvfDisk("vda", "../x.vmdk", 1, "vmdk", GiB)])
    with pytest.raises(OvfBuildError, match="used twice"):
        build_descriptor(snapshot_set, [good[0], good[0]])
    with pytest.raises(OvfBuildError, match="format"):
        build_descriptor(snapshot_set, [OvfDisk("vda", "x.vhd", 1, "vpc", GiB)])
    with pytest.raises(OvfBuildError, match="version"):
        build_descriptor(snapshot_set, good, ovf_version=3)
    assert issubclass(OvfBuildError, InvalidRequest)


# ------------------------------------------------------------------------------------------ units


@pytest.mark.parametrize(
    ("units", "expected"),
    [
        ("byte * 2^20", MiB),
        ("byte*2^30", GiB),
        ("byte * 2^10", 1024),
        ("byte", 1),
        ("bytes", 1),
        ("MegaBytes", MiB),
        ("MB", MiB),
        ("GB", GiB),
        ("GigaBytes", GiB),
        ("KiloBytes", 1024),
        ("byte * 10^3", 1000),
        ("byte * 2^10 * 2^10", MiB),
        (None, 1),
    ],
)
def test_allocation_units(units: str | None, expected: int) -> None:
    assert parse_byte_units(units) == expected


@pytest.mark.parametrize("units", ["hertz * 10^6", "byte * 2^x", "byte * 3^5", "furlongs", "byte * 2^99"])
def test_allocation_units_refused(units: str) -> None:
    with pytest.raises(OvfInvalidValue):
        parse_byte_units(units)


@pytest.mark.parametrize(
    ("units", "quantity", "expected"),
    [("byte * 2^30", "2", 2 * GiB), ("MegaBytes", "512", 512 * MiB), ("GB", "4", 4 * GiB), ("byte", "1048576", MiB)],
)
def test_memory_in_other_units(units: str, quantity: str, expected: int) -> None:
    snapshot_set = make_set()
    xml = build_descriptor(snapshot_set, disks_for(snapshot_set)).decode()
    xml = xml.replace(
        "<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>",
        f"<rasd:AllocationUnits>{units}</rasd:AllocationUnits>",
    )
    xml = xml.replace(
        "<rasd:VirtualQuantity>2048</rasd:VirtualQuantity>", f"<rasd:VirtualQuantity>{quantity}</rasd:VirtualQuantity>"
    )
    assert parse_descriptor(xml.encode()).memory_bytes == expected


@pytest.mark.parametrize(
    ("capacity", "units", "expected"),
    [("50", "byte * 2^30", 50 * GiB), ("30", "byte * 2^20", 30 * MiB), ("8589934592", None, 8 * GiB)],
)
def test_capacity_units(capacity: str, units: str | None, expected: int) -> None:
    snapshot_set = make_set(("virtio",))
    xml = build_descriptor(snapshot_set, disks_for(snapshot_set)).decode()
    unit_attr = f'ovf:capacityAllocationUnits="{units}"' if units else ""
    xml = re.sub(
        r'ovf:capacity="\d+" ovf:capacityAllocationUnits="byte"', f'ovf:capacity="{capacity}" {unit_attr}', xml
    )
    xml = re.sub(r'ovf:populatedSize="\d+"', "", xml)
    assert parse_descriptor(xml.encode()).disks[0].capacity == expected


# ------------------------------------------------------------------------------------------ samples

# Every third-party descriptor and what importing it must do: None = parsed (with these facts) or an error type.
SAMPLE_EXPECTATIONS: dict[str, tuple[type[OvfError] | None, dict[str, object]]] = {
    "cot__input.ovf": (None, {"vcpus": 4, "memory": 4 * GiB, "disks": [("input.vmdk", GiB, "scsi")], "nics": 3}),
    "cot__ubuntu.2.0.ovf": (
        None,
        {
            "vcpus": 1,
            "memory": 512 * MiB,
            "disks": [("ubuntu.2.0-disk1.vmdk", 8 * GiB, "sata")],
            "nics": 1,
            "version": 2,
        },
    ),
    "cot__v0.9.ovf": (OvfUnsupported, {"match": "0.9"}),
    "cot__vmware.ovf": (None, {"vcpus": 2, "memory": 1536 * MiB, "disks": [("input.vmdk", GiB, "virtio")], "nics": 4}),
    "glance__testserver.ovf": (
        None,
        {"vcpus": 1, "memory": 512 * MiB, "disks": [("testserver-disk1.vmdk", 8 * GiB, "sata")], "nics": 1},
    ),
    "govmomi__esxvmovf-25262174.ovf": (
        None,
        {"vcpus": 2, "memory": 8 * GiB, "disks": [("disk-0.vmdk", 32 * GiB, "scsi")], "nics": 1, "firmware": "efi"},
    ),
    "govmomi__multiple_disks.ovf": (
        None,
        {
            "vcpus": 2,
            "memory": 64 * MiB,
            "disks": [
                ("disk0.vmdk", 40 * GiB, "scsi"),
                ("disk1.vmdk", 50 * GiB, "scsi"),
                ("disk2.vmdk", 100 * GiB, "scsi"),
                (None, 20 * GiB, "scsi"),
            ],
            "nics": 1,
            "configuration": "large",
        },
    ),
    "govmomi__ttylinux-pc_i486-16.1_from_ova.ovf": (
        None,
        {"vcpus": 1, "memory": 32 * MiB, "disks": [("ttylinux-pc_i486-16.1-disk1.vmdk", 30 * MiB, "ide")], "nics": 1},
    ),
    "govmomi__ttylinux.ovf": (
        None,
        {"vcpus": 1, "memory": 32 * MiB, "disks": [("ttylinux-pc_i486-16.1-disk1.vmdk", 30 * MiB, "ide")], "nics": 1},
    ),
    "govmomi__virtualsystemcollection.ovf": (OvfMalformed, {"match": "not a valid URI"}),
    "virtv2v__test-i-ova-snapshots.ovf": (
        None,
        {"vcpus": 1, "memory": GiB, "disks": [("disk1.vmdk", 50 * GiB, "scsi")], "nics": 1},
    ),
    "virtv2v__test-i-ova-two-disks.ovf": (
        None,
        {
            "vcpus": 1,
            "memory": GiB,
            "disks": [("disk1.vmdk", 50 * GiB, "scsi"), ("disk2.vmdk", 450 * GiB, "scsi")],
            "nics": 1,
        },
    ),
    "virtv2v__test-i-ova.ovf": (
        None,
        {"vcpus": 1, "memory": 2 * GiB, "disks": [("test-ova.vmdk", 32 * GiB, "scsi")], "nics": 1},
    ),
    "virtv2v__test-o-ovirt.ovf": (OvfInvalidValue, {"match": "#SIZE#"}),
}


def test_every_sample_has_an_expectation() -> None:
    need_shared()
    assert sorted(p.name for p in SAMPLES.glob("*.ovf")) == sorted(SAMPLE_EXPECTATIONS)


@pytest.mark.parametrize("name", sorted(SAMPLE_EXPECTATIONS))
def test_third_party_samples(name: str) -> None:
    need_shared()
    error, facts = SAMPLE_EXPECTATIONS[name]
    xml = (SAMPLES / name).read_bytes()
    if error is not None:
        with pytest.raises(error, match=re.escape(str(facts["match"]))) as caught:
            parse_descriptor(xml)
        assert isinstance(caught.value, InvalidRequest)
        return
    machine = parse_descriptor(xml)
    assert machine.vcpus == facts["vcpus"]
    assert machine.memory_bytes == facts["memory"]
    assert [(d.href, d.capacity, d.controller) for d in machine.disks] == facts["disks"]
    assert all(d.format == "vmdk" for d in machine.disks if d.href is not None)
    assert len(machine.nics) == facts["nics"]
    assert machine.ovf_version == facts.get("version", 1)
    if "configuration" in facts:
        assert machine.configuration == facts["configuration"]
    if "firmware" in facts:
        assert machine.firmware == facts["firmware"]
    assert machine.freezeframe is None


def test_deployment_option_can_be_chosen() -> None:
    need_shared()
    small = parse_descriptor((SAMPLES / "cot__input.ovf").read_bytes(), configuration="1CPU-1GB-1NIC")
    assert (small.vcpus, small.memory_bytes, len(small.nics)) == (1, GiB, 1)
    tiny = parse_descriptor((SAMPLES / "govmomi__multiple_disks.ovf").read_bytes(), configuration="small")
    assert [(d.disk_id, d.capacity) for d in tiny.disks] == [
        ("system_small", 30 * GiB),
        ("data_small", 30 * GiB),
        ("scratch_small", 10 * GiB),
    ]
    with pytest.raises(OvfInvalidValue, match="configuration"):
        parse_descriptor((SAMPLES / "cot__input.ovf").read_bytes(), configuration="nope")


def test_ovirt_dialect_once_its_placeholders_are_filled() -> None:
    need_shared()
    xml = (SAMPLES / "virtv2v__test-o-ovirt.ovf").read_text()
    xml = xml.replace("#SIZE#", "536870912")
    machine = parse_descriptor(xml.encode())
    assert machine.dialect == "ovirt"
    assert machine.vcpus == 1
    assert machine.memory_bytes == GiB
    assert [(d.href, d.capacity, d.format, d.controller) for d in machine.disks] == [
        ("#DISK_ID#/#VOL_ID#", 512 * MiB, "raw", "virtio")
    ]
    assert [(n.network, n.mac) for n in machine.nics] == [("default", "00:11:22:33:44:55")]


def test_virtual_system_collection() -> None:
    need_shared()
    fixed = (SAMPLES / "govmomi__virtualsystemcollection.ovf").read_bytes().replace(b"cim2608 schema", b"cim-schema")
    with pytest.raises(OvfUnsupported, match="2 virtual systems"):
        parse_descriptor(fixed)
    snapshot_set = make_set(("virtio",))
    xml = build_descriptor(snapshot_set, disks_for(snapshot_set)).decode()
    xml = xml.replace("<VirtualSystem ", '<VirtualSystemCollection ovf:id="c"><Info>one</Info><VirtualSystem ')
    xml = xml.replace("</VirtualSystem>", "</VirtualSystem></VirtualSystemCollection>")
    machine = parse_descriptor(xml.encode())
    assert machine.name == "web01"
    assert machine.warnings and "VirtualSystemCollection" in machine.warnings[0]


# ------------------------------------------------------------------------------------------ hostile input

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><References/>&lol9;</Envelope>
"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE Envelope [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><References/><Name>&xxe;</Name></Envelope>
"""


def test_billion_laughs_is_refused() -> None:
    with pytest.raises(OvfUnsafeXml, match="DOCTYPE"):
        parse_descriptor(BILLION_LAUGHS)


def test_external_entity_is_refused() -> None:
    with pytest.raises(OvfUnsafeXml):
        parse_descriptor(EXTERNAL_ENTITY)


def test_doctype_hidden_in_utf16_is_refused() -> None:
    with pytest.raises(OvfUnsafeXml):
        parse_descriptor(
            EXTERNAL_ENTITY.replace(b'version="1.0"', b'version="1.0" encoding="UTF-16"').decode().encode("utf-16")
        )


@pytest.mark.parametrize(
    ("xml", "error"),
    [
        (b"<html><body>hello</body></html>", OvfNotOvf),
        (b'<Envelope xmlns="urn:other"><References/></Envelope>', OvfNotOvf),
        (b"<Envelope", OvfMalformed),
        (b"", OvfMalformed),
        (b'<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><References/></Envelope>', OvfUnsupported),
        (b"<a>" + b" " * (MAX_DESCRIPTOR_BYTES + 1) + b"</a>", OvfMalformed),
    ],
)
def test_non_ovf_documents_are_refused(xml: bytes, error: type[OvfError]) -> None:
    with pytest.raises(error):
        parse_descriptor(xml)


def _our_xml() -> str:
    snapshot_set = make_set(("virtio",))
    return build_descriptor(snapshot_set, disks_for(snapshot_set)).decode()


@pytest.mark.parametrize(
    ("capacity", "populated", "match"),
    [
        (str(65 * 2**40), None, "64 TiB"),
        ("0", None, "positive"),
        ("-5", None, "not positive"),
        (str(GiB), str(2 * GiB), "smaller than its populated size"),
    ],
)
def test_absurd_capacities_are_refused(capacity: str, populated: str | None, match: str) -> None:
    xml = re.sub(r'ovf:capacity="\d+"', f'ovf:capacity="{capacity}"', _our_xml())
    xml = re.sub(r'ovf:populatedSize="\d+"', f'ovf:populatedSize="{populated}"' if populated else "", xml)
    with pytest.raises(OvfCapacityError, match=match):
        parse_descriptor(xml.encode())


def test_missing_references_are_refused() -> None:
    xml = _our_xml()
    with pytest.raises(OvfMissingReference, match="not in References"):
        parse_descriptor(xml.replace('ovf:fileRef="file1"', 'ovf:fileRef="file9"').encode())
    with pytest.raises(OvfMissingReference, match="not in the DiskSection"):
        parse_descriptor(xml.replace("ovf:/disk/vmdisk1", "ovf:/disk/vmdisk9").encode())
    with pytest.raises(OvfMissingReference, match="controller"):
        parse_descriptor(re.sub(r"<rasd:Parent>\d+</rasd:Parent>", "<rasd:Parent>99</rasd:Parent>", xml).encode())


def test_bad_numbers_are_refused() -> None:
    xml = _our_xml()
    with pytest.raises(OvfInvalidValue, match="vCPUs"):
        parse_descriptor(
            xml.replace(
                "<rasd:VirtualQuantity>3</rasd:VirtualQuantity>", "<rasd:VirtualQuantity>0</rasd:VirtualQuantity>"
            ).encode()
        )
    with pytest.raises(OvfInvalidValue, match="not a non-negative integer"):
        parse_descriptor(xml.replace('ovf:size="123456"', 'ovf:size="12x"').encode())
    with pytest.raises(OvfInvalidValue, match="byte unit"):
        parse_descriptor(xml.replace("byte * 2^20", "hertz * 10^6").encode())


def _with_hardware_json(value: str) -> bytes:
    """Our descriptor with the freezeframe section's hardware.json replaced (XML-escaped) by ``value``."""
    xml = _our_xml()
    escaped = value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    replaced, count = re.subn(
        r'(ovf:key="hardware\.json" ovf:type="string" ovf:value=")[^"]*(")', lambda m: m[1] + escaped + m[2], xml
    )
    assert count == 1
    return replaced.encode()


@pytest.mark.parametrize(
    "nested",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 100_000 + "1" + "}" * 100_000,
        "[" * 100_000,
        '{"vcpus": 1, "x": ' + "[" * 33 + "]" * 33 + "}",
    ],
    ids=["lists-100k", "objects-100k", "unclosed-100k", "33-levels"],
)
def test_deeply_nested_hardware_json_is_refused_in_one_line(nested: str) -> None:
    with pytest.raises(OvfInvalidValue, match=r"hardware\.json nests deeper than 32 levels") as caught:
        parse_descriptor(_with_hardware_json(nested))
    assert "\n" not in str(caught.value)


def test_brackets_inside_json_strings_do_not_count_as_nesting() -> None:
    hw = hardware_to_dict(make_set(("virtio",)).hardware)
    hw["description"] = "[" * 1000 + '{"' + "\\" * 10
    info = parse_descriptor(_with_hardware_json(json.dumps(hw))).freezeframe
    assert info is not None and info.hardware is not None
    assert info.hardware.description == hw["description"]
    with pytest.raises(OvfInvalidValue, match=r"hardware\.json is unusable"):
        parse_descriptor(_with_hardware_json('{"vcpus": '))


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x1b", "\x7f\x00", "\ufffe", "\uffff", "\ud800"])
@pytest.mark.parametrize("where", ["set.meta.owner", "member.0.meta.note", "set.name", "instance.name"])
def test_values_xml_cannot_carry_are_refused_by_name(char: str, where: str) -> None:
    snapshot_set = make_set(("virtio",))
    bad = f"a{char}b"
    if where == "set.meta.owner":
        snapshot_set.metadata["owner"] = bad
    elif where == "member.0.meta.note":
        snapshot_set.members[0].metadata["note"] = bad
    elif where == "set.name":
        snapshot_set.name = bad
    else:
        snapshot_set.instance_name = bad
    with pytest.raises(OvfBuildError, match=re.escape(where) + r".* U\+[0-9A-F]{4}") as caught:
        build_descriptor(snapshot_set, disks_for(snapshot_set))
    assert isinstance(caught.value, InvalidRequest)
    assert "\n" not in str(caught.value)


def test_metadata_keys_xml_cannot_carry_are_refused() -> None:
    snapshot_set = make_set(("virtio",))
    snapshot_set.metadata["bad\x00key"] = "v"
    with pytest.raises(OvfBuildError, match="property key"):
        build_descriptor(snapshot_set, disks_for(snapshot_set))


def test_xml_safe_unusual_text_is_written_and_read_back() -> None:
    snapshot_set = make_set(("virtio",))
    text = "tab\tnewline\ncr\r emoji \U0001f600 bmp-end \ufffd <&>\"'"
    snapshot_set.metadata["owner"] = text
    machine = parse_descriptor(build_descriptor(snapshot_set, disks_for(snapshot_set)))
    assert machine.freezeframe is not None
    assert machine.freezeframe.set_metadata["owner"].replace("\r", "") == text.replace("\r", "")


def test_deeply_nested_xml_is_refused_in_one_line() -> None:
    xml = f'<Envelope xmlns="{NS_OVF1}">'.encode() + b"<a>" * 100_000 + b"</a>" * 100_000 + b"</Envelope>"
    with pytest.raises(OvfMalformed, match="Excessive depth") as caught:
        parse_descriptor(xml)
    assert "\n" not in str(caught.value)
