"""The one plain-dict form of a snapshot set, its members, its hardware and an instance.

``--json``, the HTTP API, the catalog's structured columns, ``set.json`` and the OVF ``freezeframe`` section all
write and read sets through these functions, so a field added to the model is added here once. Reading is
strict: an unknown status or consistency, a missing field or a value of the wrong type raises ``RecordInvalid``
with one line naming the field, never a ``KeyError`` or ``ValueError`` from deep inside.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from freezeframe.errors import RecordInvalid
from freezeframe.incremental import PARENT_KEY, REASON_KEY, WRITTEN_KEY, kind_of
from freezeframe.model import (
    BootSpec,
    Consistency,
    DiskSpec,
    Hardware,
    Instance,
    InstanceState,
    Member,
    NicSpec,
    SetStatus,
    SnapshotSet,
)

E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T")


# ---- writing -------------------------------------------------------------------------------------------------


def member_to_dict(member: Member) -> dict[str, Any]:
    return {
        "target": member.target,
        "bus": member.bus,
        "boot_order": member.boot_order,
        "size": member.virtual_size,
        "format": member.format,
        "path": member.path,
        "storage": member.store,
        "source": member.path,
        "source_path": member.source_path,
        "sha256": member.sha256,
        "metadata": dict(member.metadata),
        **chain_fields(member),
    }


def chain_fields(member: Member) -> dict[str, Any]:
    """What the member is in a chain of incremental sets (kept in its metadata, shown as fields)."""
    written = member.metadata.get(WRITTEN_KEY)
    fields: dict[str, Any] = {
        "kind": kind_of(member),
        "parent_set": member.metadata.get(PARENT_KEY),
        "bytes_written": int(written) if written and written.isdigit() else None,
    }
    if REASON_KEY in member.metadata:
        fields["full_reason"] = member.metadata[REASON_KEY]
    return fields


def hardware_to_dict(hardware: Hardware) -> dict[str, Any]:
    """Every field of the recorded machine (what restore and export rebuild from)."""
    return dataclasses.asdict(hardware)


def set_to_dict(snapshot_set: SnapshotSet, *, hardware: bool = True) -> dict[str, Any]:
    s = snapshot_set
    record: dict[str, Any] = {
        "id": s.id,
        "name": s.name,
        "status": str(s.status),
        "instance": {"name": s.instance_name, "uuid": s.instance_uuid},
        "instance_state": str(s.instance_state) if s.instance_state else None,
        "consistency": {
            "requested": str(s.requested),
            "achieved": str(s.achieved) if s.achieved else None,
            "reason": s.reason,
        },
        "freeze_window_ms": s.freeze_window_ms,
        "pause_window_ms": s.pause_window_ms,
        "created_at": s.created_at.isoformat(),
        "completed_at": s.completed_at.isoformat() if s.completed_at else None,
        "backup_type": s.backup_type,
        "metadata": dict(s.metadata),
        "error": s.error,
        "members": [member_to_dict(m) for m in s.members],
    }
    if hardware:
        record["hardware"] = hardware_to_dict(s.hardware)
    return record


def disk_to_dict(disk: DiskSpec) -> dict[str, Any]:
    """A disk as people and clients see it (the full record is in ``hardware_to_dict``)."""
    return {
        "target": disk.target,
        "device": disk.device,
        "bus": disk.bus,
        "format": disk.format,
        "source": disk.source_path,
        "size": disk.virtual_size,
        "readonly": disk.readonly,
        "shareable": disk.shareable,
    }


def hardware_summary(hardware: Hardware) -> dict[str, Any]:
    """The machine as people and clients see it: sizes, firmware, disks and networks."""
    return {
        "vcpus": hardware.vcpus,
        "memory_kib": hardware.memory_kib,
        "arch": hardware.arch,
        "machine": hardware.machine,
        "firmware": hardware.boot.firmware,
        "disks": [disk_to_dict(d) for d in hardware.disks],
        "nics": [{"model": n.model, "source_type": n.source_type, "source": n.source} for n in hardware.nics],
    }


def instance_to_dict(instance: Instance) -> dict[str, Any]:
    return {
        "name": instance.name,
        "uuid": instance.uuid,
        "state": str(instance.state),
        "vcpus": instance.hardware.vcpus,
        "memory_kib": instance.hardware.memory_kib,
        "disks": [disk_to_dict(d) for d in instance.hardware.disks],
    }


# ---- reading -------------------------------------------------------------------------------------------------


def _field(record: Mapping[str, Any], key: str, kind: Any, what: str, optional: bool) -> Any:
    if not isinstance(record, Mapping):
        raise RecordInvalid(f"{what}: expected an object, found {type(record).__name__}")
    if key not in record:
        raise RecordInvalid(f"{what}: field {key!r} is missing")
    value = record[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise RecordInvalid(f"{what}: field {key!r} must be a number, not {value!r}")
    if not isinstance(value, kind):
        raise RecordInvalid(f"{what}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _req(record: Mapping[str, Any], key: str, kind: Any, what: str) -> Any:
    return _field(record, key, kind, what, optional=False)


def _opt(record: Mapping[str, Any], key: str, kind: Any, what: str) -> Any:
    return _field(record, key, kind, what, optional=True) if key in record else None


def _enum(cls: type[E], value: Any, what: str) -> E:
    try:
        return cls(value)
    except ValueError:
        known = ", ".join(str(m.value) for m in cls)
        raise RecordInvalid(f"{what}: {str(value)[:40]!r} is not one of {known}") from None


def _time(value: Any, what: str) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(str(value))
        except ValueError:
            raise RecordInvalid(f"{what}: {str(value)[:40]!r} is not an ISO 8601 time") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _strings(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise RecordInvalid(f"{what}: metadata must map text to text")
    return dict(value)


def member_from_dict(record: Mapping[str, Any], set_id: str) -> Member:
    what = f"set {set_id}: member"
    target = _req(record, "target", str, what)
    what = f"set {set_id}: member {target}"
    return Member(
        set_id=set_id,
        target=target,
        bus=_req(record, "bus", str, what),
        boot_order=_opt(record, "boot_order", int, what),
        virtual_size=_req(record, "size", int, what),
        format=_req(record, "format", str, what),
        path=_req(record, "path", str, what),
        source_path=_opt(record, "source_path", str, what),
        sha256=_opt(record, "sha256", str, what),
        metadata=_strings(record.get("metadata"), what),
    )


def _build(factory: Callable[..., T], fields: Mapping[str, Any], what: str) -> T:
    try:
        return factory(**fields)
    except TypeError as exc:
        raise RecordInvalid(f"{what}: {exc}") from None


def hardware_from_dict(record: Any, what: str = "hardware") -> Hardware:
    if not isinstance(record, Mapping):
        raise RecordInvalid(f"{what}: expected an object, found {type(record).__name__}")
    data = dict(record)
    boot = data.pop("boot", None) or {}
    disks = data.pop("disks", None) or []
    nics = data.pop("nics", None) or []
    if not isinstance(boot, Mapping) or not isinstance(disks, list | tuple) or not isinstance(nics, list | tuple):
        raise RecordInvalid(f"{what}: boot must be an object, disks and nics lists")
    boot_spec = _build(BootSpec, {**boot, "boot_devices": tuple(boot.get("boot_devices") or ())}, f"{what} boot")
    disk_specs = tuple(_build(DiskSpec, d if isinstance(d, Mapping) else {}, f"{what} disk") for d in disks)
    nic_specs = tuple(_build(NicSpec, n if isinstance(n, Mapping) else {}, f"{what} nic") for n in nics)
    hardware = _build(Hardware, {**data, "boot": boot_spec, "disks": disk_specs, "nics": nic_specs}, what)
    for name, kind in (("vcpus", int), ("memory_kib", int), ("arch", str)):
        if not isinstance(getattr(hardware, name), kind):
            raise RecordInvalid(f"{what}: field {name!r} has the wrong type")
    return hardware


def set_from_dict(record: Mapping[str, Any]) -> SnapshotSet:
    """The inverse of ``set_to_dict`` (``hardware`` is required: a set without it cannot be restored)."""
    set_id = _req(record, "id", str, "snapshot set")
    what = f"set {set_id}"
    instance = _req(record, "instance", Mapping, what)
    consistency = _req(record, "consistency", Mapping, what)
    achieved = _opt(consistency, "achieved", str, f"{what} consistency")
    state = _opt(record, "instance_state", str, what)
    completed = _opt(record, "completed_at", (str, datetime), what)
    members = _req(record, "members", list, what)
    return SnapshotSet(
        id=set_id,
        name=_req(record, "name", str, what),
        instance_name=_req(instance, "name", str, f"{what} instance"),
        instance_uuid=_req(instance, "uuid", str, f"{what} instance"),
        requested=_enum(Consistency, _req(consistency, "requested", str, what), f"{what} requested consistency"),
        status=_enum(SetStatus, _req(record, "status", str, what), f"{what} status"),
        created_at=_time(_req(record, "created_at", (str, datetime), what), f"{what} created_at"),
        hardware=hardware_from_dict(_req(record, "hardware", Mapping, what), f"{what} hardware"),
        achieved=_enum(Consistency, achieved, f"{what} achieved consistency") if achieved is not None else None,
        reason=_opt(consistency, "reason", str, f"{what} consistency"),
        completed_at=_time(completed, f"{what} completed_at") if completed is not None else None,
        freeze_window_ms=_opt(record, "freeze_window_ms", (int, float), what),
        pause_window_ms=_opt(record, "pause_window_ms", (int, float), what),
        members=[member_from_dict(m, set_id) for m in members],
        metadata=_strings(record.get("metadata"), what),
        backup_type=_opt(record, "backup_type", str, what),
        error=_opt(record, "error", str, what),
        instance_state=_enum(InstanceState, state, f"{what} instance state") if state is not None else None,
    )
