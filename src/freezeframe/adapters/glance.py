"""Glance (the Image service, API v2) through a keystoneauth adapter on the service user's session.

The few calls freezeframe needs, in Glance's documented shapes: create an image record (``queued``), set its
properties (JSON patch), upload its data (Glance moves it to ``saving`` while the bytes arrive, then ``active``),
download, delete, and list by property. keystoneauth finds the endpoint (the catalog's ``image`` service, or the
configured one), re-authenticates the service user when its token expires and retries connections.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from keystoneauth1 import adapter as ks_adapter
from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import session as ks_session

from freezeframe.errors import CloudServiceError, NotFound

PATCH_TYPE = "application/openstack-images-v2.1-json-patch"
CHUNK = 1024 * 1024


class Glance:
    def __init__(self, session: ks_session.Session, endpoint: str | None, region_name: str | None = None) -> None:
        """``endpoint``: Glance's URL, or None to take the ``image`` endpoint from the catalog."""
        self._api = ks_adapter.Adapter(
            session,
            service_type="image",
            interface="public",
            region_name=region_name,
            endpoint_override=f"{endpoint.rstrip('/')}/v2" if endpoint else None,
            version=None if endpoint else "2",
            connect_retries=2,
        )

    @property
    def endpoint(self) -> str:
        """Glance's root URL (no ``/v2``): where clients are told an image lives."""
        url = str(self._api.get_endpoint())
        return url.rstrip("/").removesuffix("/v2")

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._api.request(path, method, **kwargs)
        except ks_exceptions.NotFound:
            raise NotFound(f"Glance has no image at {path}") from None
        except ks_exceptions.ClientException as exc:
            raise CloudServiceError(f"Glance {method} {path}: {exc}") from exc
        return response

    def create(
        self, name: str, disk_format: str, container_format: str, owner: str | None, properties: Mapping[str, str]
    ) -> dict[str, Any]:
        """A new ``queued`` image (private to ``owner``'s project; the service user may set the owner)."""
        body: dict[str, Any] = {
            "name": name, "disk_format": disk_format, "container_format": container_format,
            "visibility": "private", **properties,
        }  # fmt: skip
        if owner:
            body["owner"] = owner
        image: dict[str, Any] = self._call("POST", "/images", json=body).json()
        return image

    def set_properties(self, image_id: str, properties: Mapping[str, str]) -> None:
        """Add or replace properties (only while the image is not yet ``active``, for the protected ones)."""
        patch = [{"op": "add", "path": f"/{key}", "value": value} for key, value in properties.items()]
        self._call("PATCH", f"/images/{image_id}", data=json.dumps(patch), headers={"Content-Type": PATCH_TYPE})

    def upload(self, image_id: str, data: IO[bytes]) -> None:
        """Stream the data; Glance is ``saving`` while it arrives and ``active`` once stored and checksummed."""
        self._call(
            "PUT", f"/images/{image_id}/file", data=iter(lambda: data.read(CHUNK), b""),
            headers={"Content-Type": "application/octet-stream"},
        )  # fmt: skip

    def download(self, image_id: str, dest: Path) -> None:
        response = self._call("GET", f"/images/{image_id}/file", stream=True)
        try:
            with dest.open("wb") as out:
                for chunk in response.iter_content(CHUNK):
                    out.write(chunk)
        finally:
            response.close()

    def get(self, image_id: str) -> dict[str, Any]:
        image: dict[str, Any] = self._call("GET", f"/images/{image_id}").json()
        return image

    def delete(self, image_id: str) -> bool:
        """False when Glance has no such image (already gone)."""
        try:
            self._call("DELETE", f"/images/{image_id}")
        except NotFound:
            return False
        return True

    def find(self, **properties: str) -> list[dict[str, Any]]:
        """Images whose properties have these values (Glance filters on any property)."""
        images: list[dict[str, Any]] = self._call("GET", "/images", params={**properties, "limit": 1000}).json()[
            "images"
        ]
        return images
