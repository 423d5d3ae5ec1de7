"""``/v1/images``: the image store's OVA packages a token may see; download, delete, import as a job."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from freezeframe.api.deps import ImageId, Limit, Offset, PrincipalDep, StateDep, accepted, page, problems
from freezeframe.api.jobs import JobContext, JobSpec
from freezeframe.api.problems import conflict, redact
from freezeframe.api.schemas import ImagePage, ImageView, ImportRequest, JobView
from freezeframe.api.views import image_view

router = APIRouter(prefix="/v1", tags=["images"])


@router.get("/images", response_model=ImagePage, responses=problems())
def list_images(state: StateDep, principal: PrincipalDep, limit: Limit = 50, offset: Offset = 0) -> ImagePage:
    """The image store's packages this token may see, newest first."""
    owners = state.owners.all()
    visible = []
    for image in state.portable.images():
        project = state.image_project(image, owners)
        if principal.sees(project):
            visible.append((image, project))
    chunk, next_offset = page(visible, limit, offset)
    return ImagePage(
        items=[image_view(i, p, principal.is_admin) for i, p in chunk],
        total=len(visible),
        limit=limit,
        offset=offset,
        next_offset=next_offset,
    )


@router.get("/images/{image_id}", response_model=ImageView, responses=problems(404))
def get_image(image_id: ImageId, state: StateDep, principal: PrincipalDep) -> ImageView:
    image, project = state.image(image_id, principal)
    return image_view(image, project, principal.is_admin)


@router.get(
    "/images/{image_id}/file",
    response_class=StreamingResponse,
    responses={
        200: {"description": "the OVA package", "content": {"application/x-tar": {}}},
        **problems(404, 409),
    },
)
def download_image(image_id: ImageId, state: StateDep, principal: PrincipalDep) -> StreamingResponse:
    """The OVA itself (a tar: descriptor, SHA-256 manifest, disks), streamed from the image store."""
    image, _ = state.image(image_id, principal)
    store = state.portable.store

    def chunks() -> Iterator[bytes]:
        with store.get_stream(image.id) as stream:
            while chunk := stream.read(1 << 20):
                yield chunk

    headers = {"Content-Disposition": f'attachment; filename="{image.filename}"', "Content-Length": str(image.size)}
    return StreamingResponse(chunks(), media_type="application/x-tar", headers=headers)


@router.delete("/images/{image_id}", status_code=204, responses=problems(403, 404, 409))
def delete_image(image_id: ImageId, state: StateDep, principal: PrincipalDep) -> Response:
    """Remove the package from the image store (refused while an import reads it)."""
    principal.require_write()
    image, _ = state.image(image_id, principal)
    running = state.require_runner().active_job(f"image:{image.id}")
    if running is not None:
        raise conflict(f"image {image.id} is in use by job {running}; wait for it to finish", job_id=running)
    state.portable.delete_image(image.id)
    state.owners.forget(image.id)
    return Response(status_code=204)


@router.post(
    "/images/{image_id}/import",
    status_code=202,
    response_model=JobView,
    responses=problems(400, 403, 404, 409, 413),
)
def import_image(
    image_id: ImageId, body: ImportRequest, response: Response, state: StateDep, principal: PrincipalDep
) -> JobView:
    """A new instance (in the image's project) from the OVA: its disks copied out, the domain defined."""
    principal.require_write()
    image, project = state.image(image_id, principal)
    runner = state.require_runner()
    state.require_free_name(body.name)

    def run(ctx: JobContext) -> dict[str, Any]:
        ctx.phase("importing")
        made = state.portable.import_package(
            image.id, body.name, start=body.start, progress=ctx.progress, storage=body.storage, pool=body.pool
        )
        if project is not None:
            state.projects.assign(made.uuid, made.name, project)
        return {
            "instance": {"name": made.name, "uuid": made.uuid},
            "origin": made.origin,
            "disks": [d.target for d in made.disks],
            "started": made.started,
            "warnings": [redact(w) for w in made.warnings],
            "left_out": {k: redact(v) for k, v in made.left_out.items()},
        }

    spec = JobSpec(
        kind="import", lock_key=f"image:{image.id}", project=project, request=body.model_dump(mode="json"),
        token_id=principal.token_id, set_id=image.source_set_id, image_id=image.id,
    )  # fmt: skip
    return accepted(response, runner.submit(spec, run))
