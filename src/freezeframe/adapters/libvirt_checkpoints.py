"""The ChangeTracking port on libvirt checkpoints and QEMU's persistent dirty bitmaps.

libvirt keeps a checkpoint's record in its own metadata and the change tracking itself in a qcow2 bitmap of the
same name. Either can be lost on its own: the record when the domain is undefined and defined again, the bitmap
when QEMU is killed (it is then loaded ``inconsistent``). A lost record is redefined from ours and validated by
libvirt against the images; a lost or inconsistent bitmap makes the member full.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import libvirt
import libvirt_qemu
from lxml import etree

from freezeframe.errors import HypervisorError
from freezeframe.model import Instance

log = logging.getLogger(__name__)
PREFIX = "ff-"
_REDEFINE = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE


class LibvirtCheckpoints:
    def __init__(self, domain_of: Callable[[Instance], libvirt.virDomain]) -> None:
        """``domain_of(instance)`` gives the libvirt domain (the hypervisor adapter's cached lookup)."""
        self.domain_of = domain_of

    def untrusted(
        self, instance: Instance, checkpoint: str, created_at: datetime, targets: Sequence[str]
    ) -> dict[str, str]:
        dom = self.domain_of(instance)
        if not checkpoint:
            return {t: "the parent set recorded no checkpoint" for t in targets}
        if checkpoint not in self._names(dom):
            try:
                dom.checkpointCreateXML(self._redefinition(instance, checkpoint, created_at, targets), _REDEFINE)
                log.info("checkpoint %s of %s was redefined from freezeframe's records", checkpoint, instance.name)
            except libvirt.libvirtError as exc:
                lost = f"checkpoint {checkpoint} is gone from libvirt and cannot be redefined"
                return dict.fromkeys(targets, f"{lost} ({exc.get_error_message()})")
        bitmaps = self._bitmaps(dom)
        reasons = {}
        for target in targets:
            distrust = _distrust(checkpoint, bitmaps.get(target, {}).get(checkpoint))
            if distrust:
                reasons[target] = f"disk {target}: {distrust}"
        return reasons

    def checkpoints(self, instance: Instance) -> list[str]:
        return [n for n in self._names(self.domain_of(instance)) if n.startswith(PREFIX)]

    def remove(self, instance: Instance, checkpoint: str) -> None:
        dom = self.domain_of(instance)
        try:
            found = dom.checkpointLookupByName(checkpoint)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT, libvirt.VIR_ERR_NO_DOMAIN):
                return
            raise HypervisorError(f"cannot find checkpoint {checkpoint}: {exc.get_error_message()}") from exc
        try:
            found.delete(0)
        except libvirt.libvirtError as exc:
            # A bitmap QEMU lost (killed) cannot be removed; what is left is libvirt's record of it.
            log.warning("checkpoint %s: %s; removing libvirt's record only", checkpoint, exc.get_error_message())
            try:
                found.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            except libvirt.libvirtError as again:
                raise HypervisorError(f"cannot delete checkpoint {checkpoint}: {again.get_error_message()}") from exc

    # ---- reading -----------------------------------------------------------------------------------------

    @staticmethod
    def _names(dom: libvirt.virDomain) -> list[str]:
        try:
            return [c.getName() for c in dom.listAllCheckpoints()]
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot list the checkpoints of {dom.name()}: {exc.get_error_message()}") from exc

    @staticmethod
    def _redefinition(instance: Instance, checkpoint: str, created_at: datetime, targets: Sequence[str]) -> str:
        root = etree.Element("domaincheckpoint")
        etree.SubElement(root, "name").text = checkpoint
        etree.SubElement(root, "creationTime").text = str(int(created_at.timestamp()))
        disks = etree.SubElement(root, "disks")
        for disk in instance.hardware.disks:
            if disk.device != "disk":
                continue
            if disk.target in targets:
                etree.SubElement(disks, "disk", name=disk.target, checkpoint="bitmap", bitmap=checkpoint)
            else:
                etree.SubElement(disks, "disk", name=disk.target, checkpoint="no")
        return etree.tostring(root).decode()

    def _bitmaps(self, dom: libvirt.virDomain) -> dict[str, dict[str, dict[str, Any]]]:
        """target -> bitmap name -> QEMU's view of it (recording, persistent, busy, inconsistent)."""
        try:
            xml = etree.fromstring(dom.XMLDesc(0).encode())
            query = json.dumps({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
            nodes = json.loads(libvirt_qemu.qemuMonitorCommand(dom, query, 0)).get("return", [])
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot read the dirty bitmaps of {dom.name()}: {exc.get_error_message()}") from exc
        by_file = {n.get("file"): n for n in nodes if n.get("drv") == "qcow2"}
        result: dict[str, dict[str, dict[str, Any]]] = {}
        for el in xml.findall("devices/disk"):
            target, source = el.find("target"), el.find("source")
            if target is None or source is None:
                continue
            node = by_file.get(source.get("file") or source.get("dev"), {})
            result[target.get("dev", "")] = {b["name"]: b for b in node.get("dirty-bitmaps", [])}
        return result


def _distrust(name: str, bitmap: dict[str, Any] | None) -> str | None:
    if bitmap is None:
        return (
            f"bitmap {name} is not in the image: QEMU stopped without saving it (killed or crashed), or the disk "
            "was replaced, or the bitmap removed"
        )
    if bitmap.get("inconsistent"):
        return f"bitmap {name} is inconsistent: QEMU stopped without saving it (killed or crashed)"
    if not bitmap.get("persistent", False):
        return f"bitmap {name} is not persistent"
    if bitmap.get("busy"):
        return f"bitmap {name} is in use by another job"
    if not bitmap.get("recording", False):
        return f"bitmap {name} is not recording writes"
    return None
