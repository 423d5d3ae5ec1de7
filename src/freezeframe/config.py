"""Where freezeframe keeps its data and how it reaches libvirt; read from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URI = "qemu:///system"


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
    capture_timeout_s: float = 3600.0

    @classmethod
    def from_env(cls, home: Path | None = None, libvirt_uri: str | None = None) -> Settings:
        return cls(
            home=home or default_home(),
            libvirt_uri=libvirt_uri or os.environ.get("FREEZEFRAME_LIBVIRT_URI", DEFAULT_URI),
            freeze_cap_s=float(os.environ.get("FREEZEFRAME_FREEZE_CAP_S", "10")),
            agent_timeout_s=int(os.environ.get("FREEZEFRAME_AGENT_TIMEOUT_S", "5")),
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
