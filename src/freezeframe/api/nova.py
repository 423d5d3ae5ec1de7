"""What makes the ``/v2.1`` surface look like Nova to its clients: version documents, microversions, error bodies.

keystoneauth's discovery (openstacksdk, the openstack client) reads ``GET /`` (every version, with links) and
``GET /v2.1`` (one version); novaclient and the SDK pick a microversion from ``min_version``/``version`` and send
it in ``X-OpenStack-Nova-API-Version`` / ``OpenStack-API-Version: compute X``. Errors on this surface (and on the
read-only image view) are Nova's ``{"itemNotFound": {"code": 404, "message": …}}``: novaclient reads nothing else.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

MIN_VERSION = (2, 1)
MAX_VERSION = (2, 96)
IMAGE_ID_IN_BODY = (2, 45)
"""From 2.45 createImage/createBackup answer ``{"image_id": …}`` and no ``Location``."""
EMBEDDED_FLAVOR = (2, 47)
VERSION_HEADERS = ("x-openstack-nova-api-version", "openstack-api-version")
NOVA_PREFIX = "/v2.1"
IMAGE_PREFIX = "/v2"
_UPDATED = "2013-07-23T11:33:21Z"

_FAULTS = {
    400: "badRequest", 401: "unauthorized", 403: "forbidden", 404: "itemNotFound", 405: "badMethod",
    406: "notAcceptable", 409: "conflictingRequest", 413: "overLimit", 415: "badMediaType", 422: "badRequest",
    429: "overLimit", 501: "notImplemented", 503: "serviceUnavailable",
}  # fmt: skip


class NovaFault(Exception):
    """A fault the Nova surface decided on (status + message), rendered in Nova's shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def microversion(request: Request) -> tuple[int, int]:
    """The requested compute microversion: 2.1 when none is asked, ``latest`` the newest; out of range: 406."""
    raw = request.headers.get("openstack-api-version")
    if raw:
        service, _, value = raw.strip().partition(" ")
        raw = value.strip() if service.lower() == "compute" else None
    raw = raw or request.headers.get("x-openstack-nova-api-version")
    if not raw:
        return MIN_VERSION
    if raw.strip().lower() == "latest":
        return MAX_VERSION
    match = re.fullmatch(r"\s*(\d{1,3})\.(\d{1,4})\s*", raw)
    if match is None:
        raise NovaFault(400, f"Invalid API version request string: {raw[:40]}")
    version = (int(match.group(1)), int(match.group(2)))
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise NovaFault(
            406,
            f"Version {text(version)} is not supported by the API. Minimum is {text(MIN_VERSION)} and maximum is "
            f"{text(MAX_VERSION)}.",
        )
    return version


def version_headers(version: tuple[int, int]) -> dict[str, str]:
    return {
        "OpenStack-API-Version": f"compute {text(version)}",
        "X-OpenStack-Nova-API-Version": text(version),
        "Vary": "OpenStack-API-Version, X-OpenStack-Nova-API-Version",
    }


def _v21(base: str) -> dict[str, Any]:
    return {
        "id": "v2.1",
        "status": "CURRENT",
        "version": text(MAX_VERSION),
        "min_version": text(MIN_VERSION),
        "updated": _UPDATED,
        "links": [{"rel": "self", "href": f"{base}{NOVA_PREFIX}/"}],
    }


def versions_document(request: Request) -> dict[str, Any]:
    """``GET /``: the compute versions this endpoint serves (Nova's shape)."""
    return {"versions": [_v21(base_url(request))]}


def version_document(request: Request) -> dict[str, Any]:
    """``GET /v2.1``: the one version, with its media type."""
    version = _v21(base_url(request))
    version["links"].append({"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"})
    version["media-types"] = [
        {"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2.1"}
    ]
    return {"version": version}


def image_versions_document(request: Request) -> dict[str, Any]:
    """``GET /v2``: the read-only image view as Glance's version list (what image discovery reads)."""
    link = [{"rel": "self", "href": f"{base_url(request)}{IMAGE_PREFIX}/"}]
    return {"versions": [{"id": "v2.0", "status": "CURRENT", "links": link}]}


def on_surface(request: Request) -> bool:
    """Whether a request is for the Nova surface or the image view (their errors take Nova's shape)."""
    path = request.url.path
    return path == "/" or any(path == p or path.startswith(p + "/") for p in (NOVA_PREFIX, IMAGE_PREFIX))


def fault_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    name = _FAULTS.get(status, "computeFault" if status >= 500 else "badRequest")
    return JSONResponse(
        status_code=400 if status == 422 else status,
        content={name: {"code": 400 if status == 422 else status, "message": message}},
        headers=headers,
    )


async def handle_nova_fault(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NovaFault)
    return fault_response(exc.status, exc.message)
