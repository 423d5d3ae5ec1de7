"""The freezeframe ProductSection: the snapshot set's facts as OVF properties, written and read back.

Other tools ignore a ProductSection of a class they do not know; we read ours back on import to
rebuild the exact machine (``hardware.json``) and to keep the set's and members' metadata.
Both directions live here so that the keys cannot drift apart. See docs/ovf.md.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

from lxml import etree

from freezeframe.adapters.ovf.model import (
    FREEZEFRAME_CLASS,
    FREEZEFRAME_SECTION_VERSION,
    FreezeframeInfo,
    FreezeframeMember,
    OvfDisk,
)
from freezeframe.adapters.ovf.safexml import DescriptorReader
from freezeframe.adapters.ovf.units import parse_count
from freezeframe.errors import OvfInvalidValue, RecordInvalid
from freezeframe.model import Hardware, Member, SnapshotSet
from freezeframe.serialize import hardware_from_dict, hardware_to_dict

MAX_JSON_DEPTH = 32  # hardware.json nests 3 levels; deep nesting is an attack on the JSON parser's recursion


def portable_hardware(hw: Hardware) -> Hardware:
    """The machine without this host's file system: a package leaves the host. Disks keep no source path; a direct
    kernel boot keeps the kernel's and initrd's file names only (an import looks them up in its boot directories)."""

    def base(path: str | None) -> str | None:
        return posixpath.basename(path) or None if path else None

    boot = replace(hw.boot, kernel=base(hw.boot.kernel), initrd=base(hw.boot.initrd))
    return replace(hw, boot=boot, disks=tuple(replace(d, source_path=None) for d in hw.disks))


def freezeframe_properties(
    snapshot_set: SnapshotSet, disks: Sequence[OvfDisk], members: Mapping[str, Member]
) -> list[tuple[str, str]]:
    """(key, value) of every property of our section, in the order they are written."""
    hw = portable_hardware(snapshot_set.hardware)
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
        ("hardware.json", json.dumps(hardware_to_dict(hw), sort_keys=True, separators=(",", ":"))),
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


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _check_json_depth(text: str, what: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH before ``json.loads`` recurses into it."""
    depth = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise OvfInvalidValue(f"{what} nests deeper than {MAX_JSON_DEPTH} levels; refused")


def _hardware(text: str) -> Hardware:
    _check_json_depth(text, "freezeframe section hardware.json")
    try:
        return hardware_from_dict(json.loads(text), "freezeframe section hardware.json")
    except RecordInvalid as exc:
        raise OvfInvalidValue(str(exc)) from exc
    except (ValueError, RecursionError) as exc:
        raise OvfInvalidValue(f"freezeframe section hardware.json is unusable: {exc}") from exc


def _member(props: Mapping[str, str], index: int) -> FreezeframeMember:
    prefix = f"member.{index}."

    def get(key: str) -> str | None:
        return props.get(prefix + key) or None

    virtual_size = get("virtual_size")
    boot_order = get("boot_order")
    return FreezeframeMember(
        index=index,
        target=props.get(prefix + "target", ""),
        bus=get("bus"),
        href=get("href"),
        format=get("format"),
        virtual_size=None if virtual_size is None else parse_count(virtual_size, prefix + "virtual_size"),
        boot_order=None if boot_order is None else parse_count(boot_order, prefix + "boot_order"),
        sha256=get("sha256"),
        metadata={k.removeprefix(prefix + "meta."): v for k, v in props.items() if k.startswith(prefix + "meta.")},
    )


def read_freezeframe(reader: DescriptorReader, vs: etree._Element) -> FreezeframeInfo | None:
    """Our ProductSection of the virtual system ``vs``; None in other tools' descriptors."""
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

    hardware_json = get("hardware.json")
    indexes = sorted({int(m.group(1)) for k in props if (m := re.match(r"member\.(\d{1,6})\.", k))})
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
        hardware=None if hardware_json is None else _hardware(hardware_json),
        set_metadata={k.removeprefix("set.meta."): v for k, v in props.items() if k.startswith("set.meta.")},
        members=tuple(_member(props, index) for index in indexes),
        properties=props,
    )
