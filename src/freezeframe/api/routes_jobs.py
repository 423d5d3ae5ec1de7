"""``/v1/jobs``: the state, progress, result or error of the long operations a token may see."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from freezeframe.api.deps import JobId, Limit, Offset, PrincipalDep, StateDep, page, problems
from freezeframe.api.schemas import JobPage, JobView
from freezeframe.api.views import job_view

router = APIRouter(prefix="/v1", tags=["jobs"])


@router.get("/jobs", response_model=JobPage, responses=problems())
def list_jobs(
    state: StateDep,
    principal: PrincipalDep,
    job_state: Annotated[str | None, Query(alias="state", pattern="^(queued|running|succeeded|failed)$")] = None,
    kind: Annotated[str | None, Query(pattern="^[a-z]{1,32}$")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> JobPage:
    jobs = state.jobs.query(projects=principal.visible_projects(), state=job_state, kind=kind)
    chunk, next_offset = page(jobs, limit, offset)
    items = [job_view(j) for j in chunk]
    return JobPage(items=items, total=len(jobs), limit=limit, offset=offset, next_offset=next_offset)


@router.get("/jobs/{job_id}", response_model=JobView, responses=problems(404))
def get_job(job_id: JobId, state: StateDep, principal: PrincipalDep) -> JobView:
    """State, progress (bytes copied), result (e.g. the set id) or error of a job."""
    return job_view(state.job(job_id, principal))
