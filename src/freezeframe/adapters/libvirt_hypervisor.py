"""The Hypervisor port on libvirt + QEMU: discovery, agent freeze/thaw, pause/resume, atomic push backup.

The point in time of every disk is fixed by one push-mode backup job (QEMU runs ``blockdev-backup`` for all
disks in one transaction), so the guest-visible window holds only the job's start; the copy runs after thaw.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import libvirt_qemu
from lxml import etree

from freezeframe.errors import (
    AgentUnavailable,
    CaptureFailed,
    HypervisorError,
    InstanceNotFound,
    InvalidRequest,
)
from freezeframe.model import BootSpec, DiskSpec, Hardware, Instance, InstanceState, NicSpec
from freezeframe.ports import CaptureTarget, ImageRef, Images, ProgressCallback

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: InstanceState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: InstanceState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTOFF: InstanceState.SHUTOFF,
}
_POLL_S = 0.05
T = TypeVar("T")

_event_loop_lock = threading.Lock()
_event_loop_started = False


def _ignore_libvirt_errors(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise typed errors instead."""


def _start_event_loop() -> None:
    """Keepalive needs a running event loop; one daemon thread serves every connection of the process."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


class LibvirtHypervisor:
    """One libvirt connection; thread-safe (libvirt client calls are)."""

    def __init__(self, uri: str, images: Images, agent_timeout_s: int = 5) -> None:
        libvirt.registerErrorHandler(_ignore_libvirt_errors, None)
        _start_event_loop()
        try:
            self.conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"cannot connect to libvirt at {uri}: {exc.get_error_message()}; is libvirtd running? "
                "(scripts/setup-host.sh starts it)"
            ) from exc
        # A dead daemon is detected in ~15 s instead of blocking a call forever.
        self.conn.setKeepAlive(5, 3)
        self.uri = uri
        self.images = images
        self.agent_timeout_s = agent_timeout_s
        self._domains: dict[str, libvirt.virDomain] = {}
        self._bounded: set[str] = set()

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()

    # ---- discovery ----------------------------------------------------------------------------------

    def domain(self, instance: Instance) -> libvirt.virDomain:
        """Cached per UUID: each lookup is a daemon round trip, and the window should hold none it can avoid."""
        dom = self._domains.get(instance.uuid)
        if dom is None:
            dom = self._domains[instance.uuid] = self._domain(instance.uuid)
        return dom

    def _domain(self, ref: str) -> libvirt.virDomain:
        try:
            if len(ref) == 36 and ref.count("-") == 4:
                return self.conn.lookupByUUIDString(ref)
            return self.conn.lookupByName(ref)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise InstanceNotFound(
                    f"no instance named or with UUID {ref!r} at {self.uri} (see `virsh list --all`)"
                ) from exc
            raise HypervisorError(f"looking up {ref!r}: {exc.get_error_message()}") from exc

    def lookup(self, ref: str) -> Instance:
        dom = self._domain(ref)
        state, reason = dom.state()
        return Instance(
            name=dom.name(),
            uuid=dom.UUIDString(),
            state=_STATES.get(state, InstanceState.OTHER),
            hardware=self._hardware(dom),
            clean_shutdown=state == libvirt.VIR_DOMAIN_SHUTOFF
            and reason in (libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN, libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN),
        )

    def list_instances(self) -> list[Instance]:
        """Every domain that still exists once read: others' domains may vanish while the list is taken."""
        found = []
        for dom in self.conn.listAllDomains():
            uuid = dom.UUIDString()
            try:
                found.append(self.lookup(uuid))
            except (InstanceNotFound, HypervisorError, libvirt.libvirtError):
                if self._still_defined(uuid):
                    raise
        return found

    def _still_defined(self, uuid: str) -> bool:
        try:
            self.conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise HypervisorError(f"looking up {uuid!r}: {exc.get_error_message()}") from exc
        return True

    @staticmethod
    def _state(dom: libvirt.virDomain) -> InstanceState:
        return _STATES.get(dom.state()[0], InstanceState.OTHER)

    def state(self, instance: Instance) -> InstanceState:
        return self._state(self.domain(instance))

    def _hardware(self, dom: libvirt.virDomain) -> Hardware:
        root = etree.fromstring(dom.XMLDesc(0).encode())
        os_el = root.find("os")
        type_el = os_el.find("type") if os_el is not None else None
        firmware = "bios"
        if os_el is not None and (os_el.get("firmware") == "efi" or os_el.find("loader") is not None):
            firmware = "efi"
        boot = BootSpec(
            firmware=firmware,
            kernel=root.findtext("os/kernel"),
            initrd=root.findtext("os/initrd"),
            cmdline=root.findtext("os/cmdline"),
            boot_devices=tuple(b.get("dev", "") for b in root.findall("os/boot")),
        )
        disks = tuple(self._disk(dom, el) for el in root.findall("devices/disk"))
        nics = tuple(self._nic(el) for el in root.findall("devices/interface"))
        metadata = root.find("metadata")
        return Hardware(
            vcpus=int(root.findtext("vcpu") or 1),
            memory_kib=int(root.findtext("memory") or 0),
            arch=type_el.get("arch", "x86_64") if type_el is not None else "x86_64",
            machine=type_el.get("machine") if type_el is not None else None,
            domain_type=root.get("type", "qemu"),
            os_type=type_el.text if type_el is not None and type_el.text else "hvm",
            boot=boot,
            disks=disks,
            nics=nics,
            description=root.findtext("description"),
            metadata_xml=etree.tostring(metadata).decode() if metadata is not None else None,
        )

    @staticmethod
    def _nic(el: etree._Element) -> NicSpec:
        mac = el.find("mac")
        model = el.find("model")
        source = el.find("source")
        return NicSpec(
            mac=mac.get("address", "") if mac is not None else "",
            model=model.get("type") if model is not None else None,
            source_type=el.get("type", "network"),
            source=(source.get("network") or source.get("bridge")) if source is not None else None,
        )

    def _disk(self, dom: libvirt.virDomain, el: etree._Element) -> DiskSpec:
        target = el.find("target")
        source = el.find("source")
        driver = el.find("driver")
        boot = el.find("boot")
        address = el.find("address")
        source_type = el.get("type", "file")
        path: str | None = None
        if source is not None:
            path = source.get("file") or source.get("dev") or source.get("name")
        dev = target.get("dev", "") if target is not None else ""
        size = 0
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        protocol = source.get("protocol") if source is not None and source_type == "network" else None
        if el.get("device", "disk") == "disk" and source_type in ("file", "block") and path:
            size = self._virtual_size(dom, dev, ImageRef(Path(path), fmt))
        elif protocol == "rbd" and dom.isActive():
            with contextlib.suppress(libvirt.libvirtError):
                size = int(dom.blockInfo(dev)[0])
        return DiskSpec(
            target=dev,
            bus=target.get("bus", "virtio") if target is not None else "virtio",
            source_path=path,
            format=fmt,
            virtual_size=size,
            source_type=source_type,
            device=el.get("device", "disk"),
            boot_order=int(boot.get("order", "0")) if boot is not None else None,
            readonly=el.find("readonly") is not None,
            shareable=el.find("shareable") is not None,
            serial=el.findtext("serial"),
            address={str(k): str(v) for k, v in address.attrib.items()} if address is not None else {},
            protocol=protocol,
        )

    def _virtual_size(self, dom: libvirt.virDomain, dev: str, image: ImageRef) -> int:
        try:
            capacity: int = dom.blockInfo(dev)[0]
            return capacity
        except libvirt.libvirtError:
            try:
                return self.images.info(image).virtual_size
            except (InvalidRequest, HypervisorError):
                # A format freezeframe does not open, or a file that is gone: the size is unknown (0). Listing
                # every instance must not fail for one broken domain; a snapshot of it fails with the reason.
                return 0

    # ---- guest agent --------------------------------------------------------------------------------

    def _bound_agent(self, instance: Instance) -> libvirt.virDomain:
        """Set the agent reply timeout once per domain, so the freeze window holds no extra round trip."""
        dom = self.domain(instance)
        if instance.uuid not in self._bounded:
            try:
                dom.agentSetResponseTimeout(self.agent_timeout_s, 0)
            except libvirt.libvirtError as exc:
                raise HypervisorError(f"cannot bound the guest-agent timeout: {exc.get_error_message()}") from exc
            self._bounded.add(instance.uuid)
        return dom

    def _agent(self, instance: Instance, what: str, call: Callable[[libvirt.virDomain], T]) -> T:
        dom = self._bound_agent(instance)
        try:
            return call(dom)
        except libvirt.libvirtError as exc:
            raise AgentUnavailable(
                f"guest agent of {instance.name} could not {what}: {exc.get_error_message()}"
            ) from exc

    def agent_command(self, instance: Instance, command: dict[str, Any]) -> Any:
        text = json.dumps(command)
        reply = self._agent(
            instance, f"answer {command['execute']}",
            lambda dom: libvirt_qemu.qemuAgentCommand(dom, text, self.agent_timeout_s, 0),
        )  # fmt: skip
        return json.loads(reply).get("return")

    def agent_ping(self, instance: Instance) -> None:
        self.agent_command(instance, {"execute": "guest-ping"})

    def freeze_status(self, instance: Instance) -> str:
        status: str = self.agent_command(instance, {"execute": "guest-fsfreeze-status"})
        return status

    def freeze(self, instance: Instance) -> int:
        return self._agent(instance, "freeze filesystems", lambda dom: int(dom.fsFreeze()))

    def thaw(self, instance: Instance) -> int:
        return self._agent(instance, "thaw filesystems", lambda dom: int(dom.fsThaw()))

    # ---- vCPUs ----------------------------------------------------------------------------------------

    def pause(self, instance: Instance) -> None:
        try:
            self.domain(instance).suspend()
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot pause {instance.name}: {exc.get_error_message()}") from exc

    def paused_by_io_error(self, instance: Instance) -> bool:
        state, reason = self.domain(instance).state()
        return bool(state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR)

    def resume(self, instance: Instance) -> None:
        dom = self.domain(instance)
        if self._state(dom) != InstanceState.PAUSED:
            return
        try:
            dom.resume()
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot resume {instance.name}: {exc.get_error_message()}") from exc

    # ---- capture ------------------------------------------------------------------------------------

    def supports_atomic_capture(self, instance: Instance) -> bool:
        """RBD volumes are snapshotted by Ceph, not by the backup job: only the other disks count here."""
        disks = [d for d in instance.hardware.disks if d.device == "disk" and d.volume is None]
        return all(d.source_type in ("file", "block") for d in disks)

    @staticmethod
    def backup_xml(instance: Instance, targets: Sequence[CaptureTarget]) -> str:
        chosen = {t.disk.target: t for t in targets}
        backup = etree.Element("domainbackup", mode="push")
        disks = etree.SubElement(backup, "disks")
        for disk in instance.hardware.disks:
            if disk.device != "disk":
                continue
            target = chosen.get(disk.target)
            if target is None:
                etree.SubElement(disks, "disk", name=disk.target, backup="no")
                continue
            el = etree.SubElement(disks, "disk", name=disk.target, backup="yes", type="file")
            if target.since is not None:
                el.set("backupmode", "incremental")
                el.set("incremental", target.since)
            etree.SubElement(el, "target", file=str(target.path))
            etree.SubElement(el, "driver", type=target.format)
        return etree.tostring(backup).decode()

    @staticmethod
    def checkpoint_xml(instance: Instance, targets: Sequence[CaptureTarget]) -> str | None:
        """The checkpoint the backup job creates in its own transaction: bitmaps on the disks that track."""
        name = next((t.checkpoint for t in targets if t.checkpoint), None)
        if name is None:
            return None
        tracked = {t.disk.target for t in targets if t.checkpoint == name}
        root = etree.Element("domaincheckpoint")
        etree.SubElement(root, "name").text = name
        disks = etree.SubElement(root, "disks")
        for disk in instance.hardware.disks:
            if disk.device == "disk":
                mode = "bitmap" if disk.target in tracked else "no"
                etree.SubElement(disks, "disk", name=disk.target, checkpoint=mode)
        return etree.tostring(root).decode()

    def start_capture(self, instance: Instance, targets: Sequence[CaptureTarget]) -> None:
        self.start_backup(instance, self.backup_xml(instance, targets), self.checkpoint_xml(instance, targets))

    def start_backup(self, instance: Instance, xml: str, checkpoint_xml: str | None = None) -> None:
        """Targets exist already (REUSE_EXTERNAL), which halves the call's time inside the window."""
        try:
            self.domain(instance).backupBegin(xml, checkpoint_xml, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
        except libvirt.libvirtError as exc:
            raise CaptureFailed(
                f"libvirt could not start the backup job of {instance.name}: {exc.get_error_message()}"
            ) from exc

    def _job(self, dom: libvirt.virDomain, flags: int = 0) -> dict[str, Any]:
        try:
            stats: dict[str, Any] = dom.jobStats(flags)
            return stats
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot read job state of {dom.name()}: {exc.get_error_message()}") from exc

    def capture_in_flight(self, instance: Instance) -> bool:
        stats = self._job(self.domain(instance))
        return bool(
            stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE
            and stats.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
        )

    def wait_capture(self, instance: Instance, progress: ProgressCallback | None, timeout_s: float = 3600) -> None:
        dom = self.domain(instance)
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self._job(dom)
            if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
                break
            if progress is not None:
                total = int(stats.get("disk_total", stats.get("data_total", 0)))
                done = int(stats.get("disk_processed", stats.get("data_processed", 0)))
                progress(done, total)
            if time.monotonic() > deadline:
                self.abort_capture(instance)
                raise CaptureFailed(f"the backup job of {instance.name} did not finish within {timeout_s:.0f} s")
            time.sleep(_POLL_S)
        done_stats = self._job(dom, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        self._wait_block_jobs_released(dom, instance)
        if done_stats.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED:
            reason = done_stats.get("errmsg") or "the backup job failed"
            raise CaptureFailed(f"copy of {instance.name}'s disks failed: {reason}")
        if progress is not None:
            total = int(done_stats.get("disk_total", done_stats.get("data_total", 0)))
            progress(total, total)

    def _wait_block_jobs_released(self, dom: libvirt.virDomain, instance: Instance, timeout_s: float = 30) -> None:
        """libvirt reports the backup job ended before it releases each disk's block job; a busy host can take
        a while. The next backupBegin would fail inside the freeze window ("has a blockjob assigned"), so the
        copy is only done once every disk is free again."""
        deadline = time.monotonic() + timeout_s
        for disk in instance.hardware.disks:
            while time.monotonic() < deadline:
                try:
                    if not dom.blockJobInfo(disk.target, 0):
                        break
                except libvirt.libvirtError:
                    break  # the disk is gone or the domain stopped: nothing left to wait for
                time.sleep(_POLL_S)

    def abort_capture(self, instance: Instance) -> None:
        dom = self.domain(instance)
        try:
            if self.capture_in_flight(instance):
                dom.abortJob()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                raise HypervisorError(f"cannot abort the backup job of {instance.name}: {exc}") from exc
        deadline = time.monotonic() + 30
        while self.capture_in_flight(instance) and time.monotonic() < deadline:
            time.sleep(_POLL_S)

    def copy_offline(
        self, instance: Instance, targets: Sequence[CaptureTarget], progress: ProgressCallback | None
    ) -> None:
        total = sum(t.disk.virtual_size for t in targets)
        done = 0
        for target in targets:
            if target.disk.source_path is None:
                raise CaptureFailed(f"disk {target.disk.target} of {instance.name} has no source to copy")
            self.images.convert(
                ImageRef(Path(target.disk.source_path), target.disk.format),
                ImageRef(target.path, target.format),
                existing=True,
            )
            done += target.disk.virtual_size
            if progress is not None:
                progress(done, total)
