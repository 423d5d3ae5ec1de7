"""A read-only Image service view of snapshot sets at ``/v2/images`` (Glance v2 shapes: list, show).

Clients read the image a createImage/createBackup made from the Image service (``--wait`` polls its status). With
no Glance, this view answers for the sets a token may see; an image whose job has not recorded its set yet is
``queued``, one whose job failed first is ``killed``, one whose job still runs (rotation) is ``saving``: ``active``
means the whole request is done, as clients that wait and then act again expect.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from freezeframe.adapters.service_store import FAILED, SUCCEEDED, Job
from freezeframe.api.deps import PrincipalDep, StateDep
from freezeframe.api.nova import NovaFault, base_url, image_versions_document
from freezeframe.api.nova_views import image_view, queued_image
from freezeframe.api.state import AppState
from freezeframe.model import SnapshotSet

router = APIRouter(tags=["images (Glance view)"])
_KINDS = ("snapshot", "backup")


@router.get("/v2", include_in_schema=False)
@router.get("/v2/", include_in_schema=False)
def image_versions(request: Request) -> JSONResponse:
    return JSONResponse(image_versions_document(request), status_code=200)


def _images(state: AppState, principal: PrincipalDep, base: str) -> list[dict[str, Any]]:
    """Every visible set, and every visible snapshot job whose set is not recorded (yet: a succeeded job's set that
    is gone was deleted, e.g. rotated out); newest first."""
    visible = state.visible_sets(principal)
    sets: list[SnapshotSet] = [s for s in state.service.catalog.list_sets() if visible(s)]
    known = {s.id for s in sets}
    busy = {j.set_id for j in state.jobs.unfinished() if j.set_id}
    views = []
    for s in sets:
        view = image_view(s, state.resolver.of_set(s), base)
        if s.id in busy and view["status"] == "active":
            view["status"] = "saving"  # its job still rotates: done (and the server free) when the job is
        views.append((s.created_at, view))
    for job in state.jobs.query(principal.visible_projects()):
        if job.kind in _KINDS and job.set_id and job.set_id not in known and job.state != SUCCEEDED:
            views.append((job.created_at, _pending(job)))
    views.sort(key=lambda pair: pair[0], reverse=True)
    return [v for _, v in views]


def _pending(job: Job) -> dict[str, Any]:
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
    images = _images(state, principal, base_url(request))
    images = [i for i in images if (name is None or i["name"] == name) and (status is None or i["status"] == status)]
    if marker is not None:
        ids = [i["id"] for i in images]
        if marker not in ids:
            raise NovaFault(400, f"marker {marker[:64]} could not be found")
        images = images[ids.index(marker) + 1 :]
    limit = max(1, min(limit, 1000))
    body: dict[str, Any] = {"images": images[:limit], "first": "/v2/images", "schema": "/v2/schemas/images"}
    if len(images) > limit:
        body["next"] = f"/v2/images?limit={limit}&marker={images[limit - 1]['id']}"
    return JSONResponse(body)


@router.get("/v2/images/{image_id}", include_in_schema=False)
def show_image(image_id: str, request: Request, state: StateDep, principal: PrincipalDep) -> JSONResponse:
    for image in _images(state, principal, base_url(request)):
        if image["id"] == image_id:
            return JSONResponse(image)
    raise NovaFault(404, f"No image found with ID {image_id[:64]}")
