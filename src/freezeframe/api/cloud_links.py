"""The service's links to a cloud's Keystone and Glance (both optional, from ``CloudSettings``), and the principal a
Keystone token stands for.

A Keystone token's project is the Keystone project **id** (names can repeat across domains and be renamed), so an
instance belongs to a Keystone project when it is assigned its id (``freezeframe project assign`` resolves a name).
Its role is the strongest of Keystone's default roles it carries: ``admin`` (every project, as Nova's admin),
``member``, ``reader``; a token with none of them is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from freezeframe.adapters.glance import Glance
from freezeframe.adapters.keystone import TokenValidator, service_session
from freezeframe.api.access import Principal
from freezeframe.api.problems import forbidden, unauthorized
from freezeframe.cloud_settings import CloudSettings

KEYSTONE_TOKEN_PREFIX = "ks-"
"""``Principal.token_id`` of a Keystone caller: ``ks-`` and the first 29 characters of the user id (jobs record who
asked in 32 characters; Keystone's ids are 32 hex digits, our tokens' 16)."""


@dataclass(frozen=True)
class CloudLinks:
    settings: CloudSettings | None = None
    keystone: TokenValidator | None = None
    glance: Glance | None = None

    @classmethod
    def from_env(cls) -> CloudLinks:
        settings = CloudSettings.from_env()
        if settings is None:
            return cls()
        glance = None
        if settings.glance:
            endpoint = None if settings.glance == "catalog" else settings.glance
            glance = Glance(service_session(settings), endpoint, settings.region_name)
        return cls(settings, TokenValidator(settings), glance)


def keystone_principal(validator: TokenValidator, token: str) -> Principal:
    identity = validator.validate(token)
    if identity is None:
        raise unauthorized("the token is unknown, revoked or expired (checked with Keystone)")
    role = identity.role
    if role is None:
        raise forbidden(
            f"the token's roles ({', '.join(identity.roles) or 'none'}) include none of admin, member, reader"
        )
    return Principal(KEYSTONE_TOKEN_PREFIX + identity.user_id[:29], role, identity.project_id)
