"""Keystone: a keystoneauth session of the service user, and token validation by keystonemiddleware.

keystonemiddleware's ``AuthProtocol`` is the piece every OpenStack service puts in front of its API: it validates a
token against Keystone with the service user, caches the result (``token_cache_time``) and hands the service the
token's user, project and roles. Our API is ASGI, so it is called
as a WSGI app on a request carrying only the token, whose environ it fills, not as a wrapper around our app.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3
from keystonemiddleware import auth_token
from webob import Request
from webob.exc import HTTPException

from freezeframe.cloud_settings import CloudSettings
from freezeframe.errors import CloudServiceError, NotFound

log = logging.getLogger(__name__)

ROLE_ORDER = ("admin", "member", "reader")
"""Keystone's default roles, strongest first; a token's strongest one is its freezeframe role."""


@dataclass(frozen=True)
class KeystoneIdentity:
    user_id: str
    user_name: str
    project_id: str
    project_name: str
    roles: tuple[str, ...]

    @property
    def role(self) -> str | None:
        """Our role for the token's roles (``_member_`` is the old name of ``member``); None: none of ours."""
        names = {r.lower() for r in self.roles} | ({"member"} if "_member_" in self.roles else set())
        return next((r for r in ROLE_ORDER if r in names), None)


def service_session(settings: CloudSettings) -> ks_session.Session:
    """The service user's session (password auth, project-scoped): for Glance and project look-ups."""
    auth = v3.Password(
        auth_url=settings.auth_url,
        username=settings.username,
        password=settings.password,
        project_name=settings.project_name,
        user_domain_name=settings.user_domain_name,
        project_domain_name=settings.project_domain_name,
    )
    return ks_session.Session(auth=auth)


class TokenValidator:
    """Keystone tokens in, identities out (None for an invalid or expired token)."""

    def __init__(self, settings: CloudSettings) -> None:
        conf = {
            "auth_type": "password",
            "auth_url": settings.auth_url,
            "username": settings.username,
            "password": settings.password,
            "project_name": settings.project_name,
            "user_domain_name": settings.user_domain_name,
            "project_domain_name": settings.project_domain_name,
            "www_authenticate_uri": settings.auth_url,
            "delay_auth_decision": "true",
            "include_service_catalog": "false",
            "token_cache_time": str(settings.token_cache_s),
            "log_name": "freezeframe.keystonemiddleware",
        }
        if settings.region_name:
            conf["region_name"] = settings.region_name
        # It warns that the auth plugin's options are "not known to keystonemiddleware" and then uses them.
        config_log = logging.getLogger("keystonemiddleware._common.config")
        level = config_log.level
        config_log.setLevel(logging.ERROR)
        try:
            self._middleware = auth_token.AuthProtocol(_no_app, conf)
        finally:
            config_log.setLevel(level)
        self._lock = threading.Lock()

    def validate(self, token: str) -> KeystoneIdentity | None:
        """Run the middleware on a request carrying only the token; what it leaves in the environ is the answer."""
        environ = Request.blank("/", headers={"X-Auth-Token": token}).environ
        try:
            with self._lock:  # its in-memory token cache is not documented as thread-safe
                self._middleware(environ, _ignore_start)
        except (ks_exceptions.ClientException, HTTPException) as exc:
            raise CloudServiceError(f"Keystone did not answer the token check: {exc}") from exc
        if environ.get("HTTP_X_IDENTITY_STATUS") != "Confirmed" or "keystone.token_auth" not in environ:
            return None
        access = environ["keystone.token_auth"].user
        if not access.project_id:
            return None  # unscoped or domain-scoped: no project to act in
        return KeystoneIdentity(
            user_id=access.user_id or "",
            user_name=access.username or "",
            project_id=access.project_id,
            project_name=access.project_name or "",
            roles=tuple(access.role_names),
        )


def _no_app(environ: object, start_response: Callable[[str, list[tuple[str, str]]], object]) -> list[bytes]:
    """The app behind the middleware: the answer is what the middleware put in the environ."""
    start_response("204 No Content", [])
    return []


def _ignore_start(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> None:
    """A refused token never gets here (``delay_auth_decision``); the status is not needed."""


def resolve_project(session: ks_session.Session, ref: str) -> tuple[str, str]:
    """A Keystone project by id or name -> (id, name); a name must be unique among the projects listed."""
    identity = {"service_type": "identity", "interface": "public"}
    try:
        response = session.get(f"/projects/{ref}", endpoint_filter=identity, raise_exc=False)
        if response.status_code == 200:
            found = response.json()["project"]
            return found["id"], found["name"]
        listed = session.get("/projects", params={"name": ref}, endpoint_filter=identity).json()["projects"]
    except ks_exceptions.ClientException as exc:
        raise CloudServiceError(f"Keystone did not answer the project look-up: {exc}") from exc
    if not listed:
        raise NotFound(f"Keystone has no project with id or name {ref!r}")
    if len(listed) > 1:
        domains = ", ".join(sorted(p["domain_id"] for p in listed))
        raise NotFound(f"Keystone has {len(listed)} projects named {ref!r} (domains {domains}): give the project id")
    return listed[0]["id"], listed[0]["name"]
