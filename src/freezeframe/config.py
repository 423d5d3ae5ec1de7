"""Where freezeframe keeps its data and how it reaches libvirt; read from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from freezeframe.validation import validate_freeze_cap, validate_int

DEFAULT_URI = "qemu:///system"
AGENT_TIMEOUT_MIN_S = 1
AGENT_TIMEOUT_MAX_S = 300


def _env(name: str) -> str | None:
    """An environment variable; set but empty counts as unset."""
    return os.environ.get(name) or None


def default_home() -> Path:
    if env := os.environ.get("FREEZEFRAME_HOME"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/freezeframe")
    return Path.home() / ".local" / "share" / "freezeframe"


@dataclass(frozen=True)
class Settings:
    home: Path
    libvirt_uri: str = DEFAULT_URI
    freeze_cap_s: float = 10.0
    """Hard cap on the freeze/pause window; past it the watchdog thaws/resumes and fails the set."""
    agent_timeout_s: int = 5
    """Bounded wait for each guest-agent call (libvirt agent response timeout)."""

    @classmethod
    def from_env(cls, home: Path | None = None, libvirt_uri: str | None = None) -> Settings:
        """Settings from FREEZEFRAME_* variables; a value that is not a usable number is an ``InvalidRequest``."""
        cap = _env("FREEZEFRAME_FREEZE_CAP_S")
        timeout = _env("FREEZEFRAME_AGENT_TIMEOUT_S")
        return cls(
            home=home or default_home(),
            libvirt_uri=libvirt_uri or _env("FREEZEFRAME_LIBVIRT_URI") or DEFAULT_URI,
            freeze_cap_s=10.0 if cap is None else validate_freeze_cap(cap, "FREEZEFRAME_FREEZE_CAP_S"),
            agent_timeout_s=5
            if timeout is None
            else validate_int(timeout, "FREEZEFRAME_AGENT_TIMEOUT_S", AGENT_TIMEOUT_MIN_S, AGENT_TIMEOUT_MAX_S),
        )

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def repository_dir(self) -> Path:
        return Path(os.environ.get("FREEZEFRAME_REPOSITORY", str(self.home / "repository")))

    @property
    def catalog_url(self) -> str:
        return os.environ.get("FREEZEFRAME_CATALOG_URL", f"sqlite:///{self.home / 'catalog.sqlite'}")

    @property
    def journal_dir(self) -> Path:
        return self.home / "journal"

    @property
    def locks_dir(self) -> Path:
        return self.home / "locks"
