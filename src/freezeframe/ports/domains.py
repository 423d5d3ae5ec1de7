"""Defining, starting and removing libvirt domains from a structured plan: the core never sees XML."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from freezeframe.model import (
    DiskSpec,
    Hardware,
    NicSpec,
)


@dataclass(frozen=True)
class DomainDisk:
    """A disk of a domain to build: the recorded disk, and where its data now lives."""

    spec: DiskSpec
    path: Path
    format: str


@dataclass(frozen=True)
class DomainPlan:
    """A machine to define, in model terms; the adapter writes the hypervisor's own description of it."""

    name: str
    hardware: Hardware
    """vCPUs, memory, architecture, machine, boot method, description and metadata, NICs."""
    disks: tuple[DomainDisk, ...]
    directory: Path
    """The instance's folder (its serial console log goes there)."""
    nics: tuple[NicSpec, ...] | None = None
    """None: the hardware's NICs (with new MACs); ``()``: no network."""
    domain_type: str = "qemu"
    scsi_model: str | None = None
    """SCSI controller model to add when a disk is on the scsi bus (None: the hypervisor's default)."""


@dataclass(frozen=True)
class DiskUser:
    """A defined domain whose disk is a given file."""

    instance_name: str
    instance_uuid: str
    target: str
    active: bool


@dataclass(frozen=True)
class HostCapabilities:
    """What this host offers a guest of one architecture / machine type / domain type."""

    efi: bool
    max_vcpus: int | None
    disk_buses: frozenset[str]
    """Empty: not reported (anything goes)."""


class Domains(Protocol):
    """Defining, starting, inspecting and removing whole domains (restore, verify, import)."""

    def name_taken(self, name: str) -> bool: ...

    def uuid_of(self, name: str) -> str | None:
        """The UUID of the domain called ``name``, None if there is none."""

    def check_nics(self, nics: Sequence[NicSpec]) -> None:
        """Raise InvalidRequest unless every network/bridge the NICs need exists (and a network is active)."""

    def network_state(self, name: str) -> str:
        """``active``, ``inactive`` or ``missing``."""

    def bridge_exists(self, name: str) -> bool: ...

    def capabilities(self, arch: str, machine: str | None, domain_type: str) -> HostCapabilities:
        """Raise PreflightFailed when the host cannot run such a guest at all."""

    def define(self, plan: DomainPlan) -> str:
        """Define (not start) the domain; return its new UUID."""

    def start(self, uuid: str) -> None: ...

    def remove(self, uuid: str) -> bool:
        """Destroy if running, undefine (with its NVRAM); False if there was no such domain. Idempotent."""

    def disk_sources(self, uuid: str) -> dict[str, str]:
        """target -> source file of each file-backed disk of the domain's persistent definition."""

    def users_of(self, paths: Sequence[str]) -> dict[str, DiskUser]:
        """path (as given) -> the defined domain using it as a disk."""

    def block_pull(self, uuid: str, target: str, timeout_s: float = 3600.0) -> None:
        """Copy the backing data into a running domain's top image and wait for it."""

    def shutdown_via_agent(self, uuid: str, timeout_s: float) -> bool:
        """Power off through the guest agent (filesystems unmounted); True if it stopped in time."""

    def guest_mounts(self, uuid: str, targets: Sequence[str]) -> dict[str, list[str]]:
        """target -> mount points the guest agent reports on that disk (``/ (ext4)``); {} if it cannot tell."""

    def forget_log(self, name: str) -> None:
        """Drop the log the hypervisor keeps per domain name (for throw-away domains)."""
