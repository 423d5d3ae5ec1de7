"""A read-only Image service view of snapshot sets at ``/v2/images`` (Glance v2 shapes: list, show).

Clients read the image a createImage/createBackup made from the Image service (``--wait`` polls its status). With
no Glance, this view answers for the sets a token may see; an image whose job has not recorded its set yet is
``queued``, one whose job failed first is ``killed``, one whose job still runs (rotation) is ``saving``: ``active``
means the whole request is done, as clients that wait and then act again expect.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from freezeframe.adapters.service_store import FAILED, SUCCEEDED, Job
from freezeframe.api.deps import PrincipalDep, StateDep
from freezeframe.api.nova import NovaFault, base_url, image_versions_document
from freezeframe.api.nova_views import image_view, queued_image
from freezeframe.api.state import AppState
from freezeframe.model import SnapshotSet
from freezeframe.set_query import Cursor, SetFilter

router = APIRouter(tags=["images (Glance view)"])
_KINDS = ("snapshot", "backup")


@router.get("/v2", include_in_schema=False)
@router.get("/v2/", include_in_schema=False)
def image_versions(request: Request) -> JSONResponse:
    return JSONResponse(image_versions_document(request), status_code=200)


_Keyed = tuple[datetime, str, dict[str, Any]]
"""An image with its listing key (created_at, id)."""


def _busy(state: AppState) -> set[str]:
    return {j.set_id for j in state.jobs.unfinished() if j.set_id}


def _set_image(state: AppState, s: SnapshotSet, base: str, busy: set[str]) -> dict[str, Any]:
    view = image_view(s, state.resolver.of_set(s), base)
    if s.id in busy and view["status"] == "active":
        view["status"] = "saving"  # its job still rotates: done (and the server free) when the job is
    return view


def _pending(state: AppState, principal: PrincipalDep) -> list[_Keyed]:
    """Visible snapshot jobs whose set is not recorded (yet: a succeeded job's set that is gone was deleted, e.g.
    rotated out): few, read whole. Keyed like the sets, by (created_at, id)."""
    jobs = [j for j in state.jobs.query(principal.visible_projects()) if j.kind in _KINDS and j.set_id]
    jobs = [j for j in jobs if j.state != SUCCEEDED]
    recorded = {s.id for s in state.service.catalog.load_sets([j.set_id for j in jobs if j.set_id])}
    return [(j.created_at, j.set_id, _queued(j)) for j in jobs if j.set_id and j.set_id not in recorded]


def _images(
    state: AppState, principal: PrincipalDep, base: str, wanted: SetFilter, after: tuple[datetime, str] | None
) -> Iterator[dict[str, Any]]:
    """Visible images newest first, from ``after`` on: the sets streamed from the catalog (filtered and paged in
    the database) merged with the pending jobs' images."""
    busy = _busy(state)
    cursor = Cursor(*after) if after is not None else None

    def from_sets() -> Iterator[_Keyed]:
        for s in state.service.catalog.iter_sets(wanted, cursor):
            yield s.created_at, s.id, _set_image(state, s, base, busy)

    pending = [p for p in _pending(state, principal) if after is None or p[:2] < after]
    pending.sort(key=lambda item: item[:2], reverse=True)
    for _, _, view in heapq.merge(from_sets(), pending, key=lambda item: item[:2], reverse=True):
        yield view


def _visible(state: AppState, principal: PrincipalDep) -> SetFilter | None:
    """The sets a token may see, as a catalog filter; None when it sees none. (An image's name is its display
    name, which may come from metadata: that filter stays on the streamed views.)"""
    if principal.is_admin:
        return SetFilter()
    if principal.project is None:
        return None
    return SetFilter(project=principal.project, project_instances=state.resolver.instances_of(principal.project))


def _queued(job: Job) -> dict[str, Any]:
    request = job.request
    args = next((v for k, v in request.items() if k in ("createImage", "createBackup")), request)
    name = args.get("name") if isinstance(args, dict) else None
    assert job.set_id is not None
    return queued_image(job.set_id, str(name or job.set_id), job.project, job.created_at, job.state == FAILED)


@router.get("/v2/images", include_in_schema=False)
def list_images(
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    name: str | None = None,
    status: str | None = None,
    limit: int = 25,
    marker: str | None = None,
) -> JSONResponse:
    limit = max(1, min(limit, 1000))
    wanted = _visible(state, principal)
    after = None
    if marker is not None:
        found = _find(state, principal, marker, base_url(request))
        if found is None:
            raise NovaFault(400, f"marker {marker[:64]} could not be found")
        after = found[0], found[1]
    images: list[dict[str, Any]] = []
    if wanted is not None:
        for image in _images(state, principal, base_url(request), wanted, after):
            if (name is None or image["name"] == name) and (status is None or image["status"] == status):
                images.append(image)
                if len(images) > limit:
                    break
    body: dict[str, Any] = {"images": images[:limit], "first": "/v2/images", "schema": "/v2/schemas/images"}
    if len(images) > limit:
        body["next"] = f"/v2/images?limit={limit}&marker={images[limit - 1]['id']}"
    return JSONResponse(body)


def _find(state: AppState, principal: PrincipalDep, image_id: str, base: str) -> _Keyed | None:
    """A visible image by id: its set (one primary-key read) or a pending job's image."""
    found = state.service.catalog.load_sets([image_id]) if len(image_id) <= 64 else []
    for s in found:
        if principal.sees(state.resolver.of_set(s)):
            return s.created_at, s.id, _set_image(state, s, base, _busy(state))
    return next((p for p in _pending(state, principal) if p[1] == image_id), None)


@router.get("/v2/images/{image_id}", include_in_schema=False)
def show_image(image_id: str, request: Request, state: StateDep, principal: PrincipalDep) -> JSONResponse:
    found = _find(state, principal, image_id, base_url(request))
    if found is None:
        raise NovaFault(404, f"No image found with ID {image_id[:64]}")
    return JSONResponse(found[2])
