"""Response bodies from domain objects: the serialised forms of ``freezeframe.serialize``, minus host paths for
anyone but an admin, plus what only the service knows (the project, a job's problem type)."""

from __future__ import annotations

from typing import Any

from freezeframe.adapters.image_records import StoredImage
from freezeframe.adapters.service_store import FAILED, Job
from freezeframe.api.problems import TYPE_BASE, describe, redact
from freezeframe.api.schemas import (
    HardwareView,
    ImageMachine,
    ImageView,
    InstanceRef,
    InstanceView,
    JobError,
    JobView,
    ProgressView,
    SetDetail,
    SetView,
)
from freezeframe.model import Instance, SnapshotSet
from freezeframe.serialize import hardware_summary, instance_to_dict, set_to_dict


def _hide_disk_sources(disks: list[dict[str, Any]], admin: bool) -> list[dict[str, Any]]:
    return [d if admin else {**d, "source": None} for d in disks]


def _set_fields(s: SnapshotSet, project: str | None, admin: bool) -> dict[str, Any]:
    record = set_to_dict(s, hardware=False)
    record["project"] = project
    record["error"] = redact(s.error) if s.error else None
    record["members"] = [m if admin else {**m, "path": None} for m in record["members"]]
    return record


def set_view(s: SnapshotSet, project: str | None, admin: bool) -> SetView:
    return SetView.model_validate(_set_fields(s, project, admin))


def set_detail(s: SnapshotSet, project: str | None, admin: bool) -> SetDetail:
    hardware = hardware_summary(s.hardware)
    hardware["disks"] = _hide_disk_sources(hardware["disks"], admin)
    fields = _set_fields(s, project, admin)
    return SetDetail.model_validate({**fields, "hardware": HardwareView.model_validate(hardware)})


def instance_view(instance: Instance, project: str | None, admin: bool) -> InstanceView:
    record = instance_to_dict(instance)
    record["disks"] = _hide_disk_sources(record["disks"], admin)
    return InstanceView.model_validate({**record, "project": project})


def job_view(job: Job) -> JobView:
    error = None
    if job.state == FAILED:
        slug = job.error_type or "operation-failed"
        status, title = describe(slug)
        error = JobError(type=TYPE_BASE + slug, title=title, status=status, detail=redact(job.error or title))
    total = job.progress_total
    return JobView(
        id=job.id,
        kind=job.kind,
        state=job.state,  # type: ignore[arg-type]
        project=job.project,
        instance=InstanceRef(name=job.instance_name or "", uuid=job.instance_uuid) if job.instance_uuid else None,
        set_id=job.set_id,
        image_id=job.image_id,
        request=job.request,
        progress=ProgressView(
            phase=job.phase,
            done=job.progress_done,
            total=total,
            fraction=round(job.progress_done / total, 4) if total else (1.0 if job.state == "succeeded" else None),
        ),
        result=job.result,
        error=error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def image_view(image: StoredImage, project: str | None, admin: bool) -> ImageView:
    summary = image.summary
    return ImageView(
        id=image.id,
        name=image.name,
        status=image.status,
        project=project,
        set_id=image.source_set_id,
        format="ova",
        disk_format=summary.disk_format,
        ovf_version=summary.ovf_version,
        size=image.size,
        sha256=image.sha256,
        created_at=image.created_at,
        machine=ImageMachine(
            name=summary.machine_name,
            vcpus=summary.vcpus,
            memory_bytes=summary.memory_bytes,
            arch=summary.arch,
            firmware=summary.firmware,
            disks=len(summary.disks),
            nics=len(summary.nics),
        ),
        location=image.location if admin else None,
    )
