"""libvirt domain XML for the test guest: TCG, direct kernel boot, virtio disks, guest agent, console log."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from freezeframe.testbed.guest import GuestImage

WORKLOADS = ("idle", "ledger", "heartbeat", "link-send", "link-recv")
LINK_PORT = "ff.link"
"""The virtio-serial port of the two-instance ledger (``link-send`` / ``link-recv``)."""
DISK_FORMATS = ("qcow2", "raw")
# Quiet and skip slow probes: every console byte and every legacy-device probe costs time under TCG.
# pci=noacpi alone cut the virtio probe from ~2.3 s to ~0.3 s (ACPI interrupt-link setup is slow under TCG).
KERNEL_ARGS = (
    "console=ttyS0",
    "quiet",
    "pci=noacpi",
    "loglevel=3",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "tsc=reliable",
    "no_timer_check",
    "mitigations=off",
    "nokaslr",
    "random.trust_cpu=on",
    "cryptomgr.notests",
    "noreplace-smp",
)


@dataclass(frozen=True)
class TestDisk:
    """One disk file of a test domain, attached as virtio ``target`` (vda, vdb, ...)."""

    __test__ = False  # not a pytest test class

    target: str
    path: Path
    format: str = "qcow2"
    rbd: RbdDisk | None = None
    """An RBD image instead of the file (``path`` is then unused)."""


@dataclass(frozen=True)
class GuestLink:
    """One end of a virtio-serial link between two guests, joined on the host by a UNIX socket: the guest that
    starts first listens (``bind``), the other connects to the same path (``connect``)."""

    socket: Path
    mode: str

    def __post_init__(self) -> None:
        if self.mode not in ("bind", "connect"):
            raise ValueError(f"link mode must be bind or connect, not {self.mode!r}")


def _link_channel(devices: etree._Element, link: GuestLink) -> None:
    channel = etree.SubElement(devices, "channel", type="unix")
    etree.SubElement(channel, "source", mode=link.mode, path=str(link.socket))
    etree.SubElement(channel, "target", type="virtio", name=LINK_PORT)


@dataclass(frozen=True)
class RbdDisk:
    """Where a test disk lives in the Ceph test bed and how QEMU authenticates (a libvirt secret)."""

    volume: str
    """``POOL/IMAGE``"""
    mon_host: str
    user: str
    secret_uuid: str


def disk_target(index: int) -> str:
    """vda, vdb, ... vdz: the names the guest's init mounts at /mnt/<target>."""
    if not 0 <= index < 26:
        raise ValueError(f"the test guest supports up to 26 disks, not {index + 1}")
    return "vd" + chr(ord("a") + index)


def domain_xml(
    name: str,
    guest: GuestImage,
    disks: Sequence[TestDisk],
    workload: str,
    memory_mib: int = 256,
    vcpus: int = 1,
    *,
    console_log: Path,
    nics: int = 1,
    disk_cache: str = "none",
    description: str = "freezeframe test bed guest",
    extra_cmdline: Sequence[str] = (),
    link: GuestLink | None = None,
) -> str:
    """The domain definition; ``disk_cache='none'`` needs O_DIRECT on the disks' filesystem.

    ``extra_cmdline=["ff.debug"]`` makes the guest's init print timed boot stages on the console.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; expected one of {', '.join(WORKLOADS)}")
    if workload == "ledger" and len(disks) < 3:
        raise ValueError("the ledger workload needs 3 disks: vda (root), vdb (journal), vdc (state)")
    root = etree.Element("domain", type="qemu")
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "description").text = description
    etree.SubElement(root, "memory", unit="MiB").text = str(memory_mib)
    etree.SubElement(root, "vcpu").text = str(vcpus)

    os_el = etree.SubElement(root, "os")
    etree.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    etree.SubElement(os_el, "kernel").text = str(guest.kernel)
    etree.SubElement(os_el, "initrd").text = str(guest.initrd)
    etree.SubElement(os_el, "cmdline").text = " ".join((*KERNEL_ARGS, f"ff.workload={workload}", *extra_cmdline))

    features = etree.SubElement(root, "features")
    etree.SubElement(features, "acpi")  # poweroff needs ACPI
    etree.SubElement(features, "apic")
    etree.SubElement(root, "clock", offset="utc")
    etree.SubElement(root, "on_poweroff").text = "destroy"
    etree.SubElement(root, "on_reboot").text = "restart"
    etree.SubElement(root, "on_crash").text = "destroy"

    devices = etree.SubElement(root, "devices")
    seen: set[str] = set()
    for disk in disks:
        if disk.format not in DISK_FORMATS:
            raise ValueError(f"disk {disk.target}: format must be qcow2 or raw, not {disk.format!r}")
        if disk.target in seen:
            raise ValueError(f"disk target {disk.target} used twice")
        seen.add(disk.target)
        if disk.rbd is not None:
            _rbd_disk(devices, disk.target, disk.rbd)
            continue
        el = etree.SubElement(devices, "disk", type="file", device="disk")
        etree.SubElement(el, "driver", name="qemu", type=disk.format, cache=disk_cache, discard="unmap")
        etree.SubElement(el, "source", file=str(disk.path))
        etree.SubElement(el, "target", dev=disk.target, bus="virtio")

    for _ in range(nics):
        nic = etree.SubElement(devices, "interface", type="user")
        etree.SubElement(nic, "model", type="virtio")

    channel = etree.SubElement(devices, "channel", type="unix")
    etree.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    if link is not None:
        _link_channel(devices, link)

    serial = etree.SubElement(devices, "serial", type="file")
    etree.SubElement(serial, "source", path=str(console_log))
    etree.SubElement(serial, "target", port="0")
    console = etree.SubElement(devices, "console", type="file")
    etree.SubElement(console, "source", path=str(console_log))
    etree.SubElement(console, "target", type="serial", port="0")

    rng = etree.SubElement(devices, "rng", model="virtio")
    etree.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    etree.SubElement(devices, "controller", type="usb", model="none")
    etree.SubElement(devices, "memballoon", model="none")
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def _rbd_disk(devices: etree._Element, target: str, rbd: RbdDisk) -> None:
    el = etree.SubElement(devices, "disk", type="network", device="disk")
    etree.SubElement(el, "driver", name="qemu", type="raw", cache="none")
    auth = etree.SubElement(el, "auth", username=rbd.user)
    etree.SubElement(auth, "secret", type="ceph", uuid=rbd.secret_uuid)
    source = etree.SubElement(el, "source", protocol="rbd", name=rbd.volume)
    host, _, port = rbd.mon_host.rpartition(":")
    etree.SubElement(source, "host", name=host, port=port)
    etree.SubElement(el, "target", dev=target, bus="virtio")
