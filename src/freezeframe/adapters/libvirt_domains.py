"""The Domains port over libvirt: define a machine from a DomainPlan, start, inspect and remove it.

The XML is written by ``libvirt_define.domain_xml`` from the plan's model types; nothing above this adapter sees
XML or a ``virDomain``. Domains are named by UUID in every call, looked up fresh each time (they come and go).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
from lxml import etree

from freezeframe.adapters import libvirt_define as ld
from freezeframe.errors import HypervisorError, InvalidRequest, PreflightFailed
from freezeframe.model import NicSpec
from freezeframe.ports import DiskUser, DomainPlan, HostCapabilities

log = logging.getLogger(__name__)
SYSTEM_LOGS = Path("/var/log/libvirt/qemu")


class LibvirtDomains:
    """Over one libvirt connection (shared with the hypervisor adapter)."""

    def __init__(
        self,
        conn: libvirt.virConnect,
        uri: str,
        agent_timeout_s: int = 5,
        rbd: Callable[[], ld.RbdAccess | None] | None = None,
    ) -> None:
        self.conn = conn
        self.uri = uri
        self.agent_timeout_s = agent_timeout_s
        self.rbd = rbd
        """How restored RBD disks reach the cluster; asked only when a plan has one."""

    def _dom(self, uuid: str) -> libvirt.virDomain:
        return ld.require_domain(self.conn, uuid, uuid)

    # ---- lookups ---------------------------------------------------------------------------------------------

    def name_taken(self, name: str) -> bool:
        return ld.name_taken(self.conn, name)

    def uuid_of(self, name: str) -> str | None:
        try:
            return str(self.conn.lookupByName(name).UUIDString())
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"looking up {name!r}: {exc.get_error_message()}") from exc

    def check_nics(self, nics: Sequence[NicSpec]) -> None:
        ld.check_nics(self.conn, nics)

    def network_state(self, name: str) -> str:
        try:
            net = self.conn.networkLookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                return "missing"
            raise HypervisorError(f"looking up libvirt network {name!r}: {exc.get_error_message()}") from exc
        return "active" if net.isActive() else "inactive"

    def bridge_exists(self, name: str) -> bool:
        return bool(name) and "/" not in name and Path("/sys/class/net", name, "bridge").is_dir()

    def capabilities(self, arch: str, machine: str | None, domain_type: str) -> HostCapabilities:
        try:
            xml = self.conn.getDomainCapabilities(None, arch, machine, domain_type)
        except libvirt.libvirtError as exc:
            raise PreflightFailed(
                f"this host cannot run a {arch} guest with machine type {machine or '(default)'} under "
                f"{domain_type}: {exc.get_error_message()}"
            ) from exc
        caps = etree.fromstring(xml.encode())
        firmware = [v.text for v in caps.findall("os/enum[@name='firmware']/value")]
        efi = "efi" in firmware or caps.find("os/loader[@supported='yes']/value") is not None
        vcpu = caps.find("vcpu")
        limit = vcpu.get("max", "") if vcpu is not None else ""
        buses = frozenset(v.text for v in caps.findall("devices/disk/enum[@name='bus']/value") if v.text)
        return HostCapabilities(efi=efi, max_vcpus=int(limit) if limit.isdigit() else None, disk_buses=buses)

    def disk_sources(self, uuid: str) -> dict[str, str]:
        return ld.disk_sources(self._dom(uuid), live=False)

    def users_of(self, paths: Sequence[str]) -> dict[str, DiskUser]:
        found = ld.domains_using(self.conn, paths)
        return {
            path: DiskUser(str(dom.name()), str(dom.UUIDString()), target, bool(dom.isActive()))
            for path, (dom, target) in found.items()
        }

    # ---- life of a domain ------------------------------------------------------------------------------------

    def define(self, plan: DomainPlan) -> str:
        try:
            xml = ld.domain_xml(
                plan.name,
                plan.hardware,
                [ld.DefinedDisk(d.spec, d.path, d.format) for d in plan.disks],
                nics=plan.nics,
                domain_type=plan.domain_type,
                console_log=plan.directory / "console.log",
                rbd=self.rbd() if self.rbd and any(str(d.path).startswith(ld.RBD_PREFIX) for d in plan.disks) else None,
            )
        except ValueError as exc:  # lxml refuses text that is not XML-compatible (control characters)
            raise InvalidRequest(f"the machine {plan.name} cannot be written as a libvirt domain: {exc}") from exc
        if plan.scsi_model is not None and any(d.spec.bus == "scsi" for d in plan.disks):
            xml = _with_scsi_controller(xml, plan.scsi_model)
        return str(ld.define(self.conn, xml).UUIDString())

    def start(self, uuid: str) -> None:
        ld.start(self._dom(uuid))

    def remove(self, uuid: str) -> bool:
        return ld.remove_domain(self.conn, uuid)

    def block_pull(self, uuid: str, target: str, timeout_s: float = 3600.0) -> None:
        ld.block_pull(self._dom(uuid), target, timeout_s)

    def shutdown_via_agent(self, uuid: str, timeout_s: float) -> bool:
        return ld.shutdown_via_agent(self._dom(uuid), timeout_s)

    def guest_mounts(self, uuid: str, targets: Sequence[str]) -> dict[str, list[str]]:
        """Matched by PCI address (guest-get-fsinfo reports the controller), else by device name."""
        dom = self._dom(uuid)
        try:
            with contextlib.suppress(libvirt.libvirtError):
                dom.agentSetResponseTimeout(self.agent_timeout_s, 0)
            reply = libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-get-fsinfo"}', self.agent_timeout_s, 0)
            info: list[dict[str, Any]] = json.loads(reply).get("return") or []
        except (libvirt.libvirtError, ValueError, AttributeError) as exc:
            log.warning("guest-get-fsinfo failed: %s", exc)
            return {}
        by_pci = {pci: target for target, pci in ld.disk_pci_addresses(dom).items()}
        mounts: dict[str, list[str]] = {t: [] for t in targets}
        for fs in info:
            for disk in fs.get("disk", []):
                pci = disk.get("pci-controller", {})
                key = (int(pci.get("domain", -1)), int(pci.get("bus", -1)), int(pci.get("slot", -1)),
                       int(pci.get("function", -1)))  # fmt: skip
                target: str | None = by_pci.get(key)
                if target is None:
                    dev = Path(str(disk.get("dev", ""))).name
                    target = dev if dev in mounts else None
                if target in mounts:
                    mounts[target].append(f"{fs.get('mountpoint')} ({fs.get('type')})")
        return mounts

    def forget_log(self, name: str) -> None:
        if self.uri == "qemu:///system" and "/" not in name:  # libvirt keeps a log per domain name
            with contextlib.suppress(OSError):
                (SYSTEM_LOGS / f"{name}.log").unlink(missing_ok=True)


def _with_scsi_controller(xml: str, model: str) -> str:
    root = etree.fromstring(xml.encode())
    devices = root.find("devices")
    if devices is not None and devices.find("controller[@type='scsi']") is None:
        devices.insert(0, etree.Element("controller", type="scsi", index="0", model=model))
    return etree.tostring(root, pretty_print=True, encoding="unicode")
