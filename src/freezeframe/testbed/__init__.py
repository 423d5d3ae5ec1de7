"""Test bed: a tiny real guest (TCG) with qemu-ga and checkable workloads, and tools to judge its disks.

Only tests and benchmarks use this package; nothing in the product imports it.
"""

from __future__ import annotations

from freezeframe.testbed.domain import TestDisk, domain_xml
from freezeframe.testbed.guest import GuestImage, build_guest
from freezeframe.testbed.heartbeat import HeartbeatGap, heartbeat_from_image, longest_gap, parse_heartbeat
from freezeframe.testbed.instance import DiskRequest, TestbedError, TestInstance, running_instance
from freezeframe.testbed.ledger import LedgerVerdict, check_ledger, judge_ledger, read_guest_file, read_guest_files
from freezeframe.testbed.naive import DiskCapture, naive_capture

__all__ = [
    "DiskCapture",
    "DiskRequest",
    "GuestImage",
    "HeartbeatGap",
    "LedgerVerdict",
    "TestDisk",
    "TestInstance",
    "TestbedError",
    "build_guest",
    "check_ledger",
    "domain_xml",
    "heartbeat_from_image",
    "judge_ledger",
    "longest_gap",
    "naive_capture",
    "parse_heartbeat",
    "read_guest_file",
    "read_guest_files",
    "running_instance",
]
