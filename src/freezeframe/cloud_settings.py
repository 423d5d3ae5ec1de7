"""How freezeframe reaches a cloud's Keystone and Glance; read from the environment, all optional.

Without ``FREEZEFRAME_KEYSTONE_URL`` nothing here is used: our own tokens, the read-only image view. With it,
Keystone tokens are validated (keystonemiddleware) by a service user, and with ``FREEZEFRAME_GLANCE_URL`` (an
endpoint, or ``catalog`` to take the ``image`` endpoint from the service user's catalog) the results of
createImage/createBackup become Glance images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from freezeframe.errors import InvalidRequest


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


@dataclass(frozen=True)
class CloudSettings:
    auth_url: str
    """Keystone's v3 endpoint, e.g. ``http://127.0.0.1:5000/v3``."""
    username: str
    password: str
    project_name: str = "service"
    user_domain_name: str = "Default"
    project_domain_name: str = "Default"
    region_name: str | None = None
    glance: str | None = None
    """None: no Glance; ``catalog``: the catalog's ``image`` endpoint; else the endpoint itself."""
    token_cache_s: int = 300
    """How long keystonemiddleware keeps a validated token (its ``token_cache_time``)."""

    @classmethod
    def from_env(cls) -> CloudSettings | None:
        auth_url = _env("FREEZEFRAME_KEYSTONE_URL")
        if auth_url is None:
            if _env("FREEZEFRAME_GLANCE_URL"):
                raise InvalidRequest("FREEZEFRAME_GLANCE_URL needs FREEZEFRAME_KEYSTONE_URL (Glance checks tokens)")
            return None
        username = _env("FREEZEFRAME_KEYSTONE_USERNAME")
        password = _env("FREEZEFRAME_KEYSTONE_PASSWORD")
        if not username or not password:
            raise InvalidRequest(
                "FREEZEFRAME_KEYSTONE_URL is set: give the service user in FREEZEFRAME_KEYSTONE_USERNAME and "
                "FREEZEFRAME_KEYSTONE_PASSWORD"
            )
        return cls(
            auth_url=auth_url.rstrip("/"),
            username=username,
            password=password,
            project_name=_env("FREEZEFRAME_KEYSTONE_PROJECT", "service") or "service",
            user_domain_name=_env("FREEZEFRAME_KEYSTONE_USER_DOMAIN", "Default") or "Default",
            project_domain_name=_env("FREEZEFRAME_KEYSTONE_PROJECT_DOMAIN", "Default") or "Default",
            region_name=_env("FREEZEFRAME_KEYSTONE_REGION"),
            glance=_env("FREEZEFRAME_GLANCE_URL"),
        )

    def env(self) -> dict[str, str]:
        """The variables that give these settings back (for a ``freezeframe serve`` the test bed starts)."""
        pairs = {
            "FREEZEFRAME_KEYSTONE_URL": self.auth_url,
            "FREEZEFRAME_KEYSTONE_USERNAME": self.username,
            "FREEZEFRAME_KEYSTONE_PASSWORD": self.password,
            "FREEZEFRAME_KEYSTONE_PROJECT": self.project_name,
            "FREEZEFRAME_KEYSTONE_USER_DOMAIN": self.user_domain_name,
            "FREEZEFRAME_KEYSTONE_PROJECT_DOMAIN": self.project_domain_name,
            "FREEZEFRAME_KEYSTONE_REGION": self.region_name or "",
            "FREEZEFRAME_GLANCE_URL": self.glance or "",
        }
        return {k: v for k, v in pairs.items() if v}
