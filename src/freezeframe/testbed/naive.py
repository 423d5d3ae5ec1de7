"""What a user of single-volume snapshots gets: each disk captured on its own, one after the other.

The guest is not frozen and the disks are captured at different instants, so a multi-disk application (the
ledger) ends up with images that contradict each other. Tests use this as the negative control.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
from lxml import etree


class NaiveCaptureError(RuntimeError):
    """A per-disk backup job could not be started or did not complete."""


@dataclass(frozen=True)
class DiskCapture:
    target: str
    path: Path
    begun_at: float
    """time.time() right after backupBegin returned: the capture's point in time."""
    finished_at: float


def _domain_disks(dom: Any) -> list[str]:
    root = etree.fromstring(dom.XMLDesc(0).encode())
    return [str(t.get("dev")) for t in root.findall("./devices/disk[@device='disk']/target")]


def backup_xml(target: str, out_path: Path, all_targets: Sequence[str], fmt: str = "qcow2") -> str:
    """A push-mode backup of one disk; every other disk is explicitly ``backup='no'``."""
    root = etree.Element("domainbackup", mode="push")
    disks = etree.SubElement(root, "disks")
    for dev in all_targets:
        if dev == target:
            el = etree.SubElement(disks, "disk", name=dev, backup="yes", type="file")
            etree.SubElement(el, "target", file=str(out_path))
            etree.SubElement(el, "driver", type=fmt)
        else:
            etree.SubElement(disks, "disk", name=dev, backup="no")
    return etree.tostring(root, encoding="unicode")


def _wait_job(dom: Any, target: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
        if time.monotonic() > deadline:
            dom.abortJob()
            raise NaiveCaptureError(f"backup of {target} still running after {timeout_s}s; aborted")
        time.sleep(0.05)
    stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    if stats.get("type") not in (None, libvirt.VIR_DOMAIN_JOB_COMPLETED):
        raise NaiveCaptureError(f"backup of {target} did not complete: {stats}")


def naive_capture(
    dom: Any,
    disk_targets: Sequence[tuple[str, Path]],
    gap_s: float,
    *,
    fmt: str = "qcow2",
    job_timeout_s: float = 120.0,
) -> list[DiskCapture]:
    """Capture each (target, out_path) with its own backup job, ``gap_s`` apart, guest not frozen."""
    all_targets = _domain_disks(dom)
    captures: list[DiskCapture] = []
    for n, (target, out_path) in enumerate(disk_targets):
        if target not in all_targets:
            raise NaiveCaptureError(f"domain has no disk {target} (has {', '.join(all_targets)})")
        if n > 0 and gap_s > 0:
            time.sleep(gap_s)
        capacity = dom.blockInfo(target)[0]
        proc = subprocess.run(
            ["qemu-img", "create", "-q", "-f", fmt, str(out_path), str(capacity)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise NaiveCaptureError(f"qemu-img create {out_path}: {proc.stderr.strip()}")
        try:
            dom.backupBegin(
                backup_xml(target, out_path, all_targets, fmt), None, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL
            )
        except libvirt.libvirtError as exc:
            raise NaiveCaptureError(f"backupBegin for {target} failed: {exc}") from exc
        begun = time.time()
        _wait_job(dom, target, job_timeout_s)
        captures.append(DiskCapture(target, out_path, begun, time.time()))
    return captures
