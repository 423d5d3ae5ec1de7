"""``/v1/policies``: scheduled snapshot, copy and prune policies (admin tokens: a policy acts on any instance).
Each run is a job (``kind: policy``); a policy's last job, outcome and error are in its view."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, Field

from freezeframe.adapters.group_records import SqlGroups
from freezeframe.api.deps import PrincipalDep, StateDep, accepted, problems
from freezeframe.api.jobs import JobContext, JobSpec
from freezeframe.api.policy_cluster import ClusterPolicies
from freezeframe.api.schemas import NAME_PATTERN, JobView
from freezeframe.ports.policies import PolicyState
from freezeframe.scheduling import JOB_KIND, lock_key

router = APIRouter(prefix="/v1")
TAGS: list[str | Enum] = ["policies"]
PolicyName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=63, description="policy name")]


class Keep(BaseModel):
    last: int = Field(default=0, ge=0, le=100000)
    hourly: int = Field(default=0, ge=0, le=100000)
    daily: int = Field(default=0, ge=0, le=100000)
    weekly: int = Field(default=0, ge=0, le=100000)
    monthly: int = Field(default=0, ge=0, le=100000)
    yearly: int = Field(default=0, ge=0, le=100000)


class PolicyRequest(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, max_length=63)
    instance: str | None = Field(default=None, pattern=NAME_PATTERN, max_length=63)
    group: str | None = Field(default=None, pattern=NAME_PATTERN, max_length=63, description="instead of instance")
    every: str | None = Field(default=None, max_length=16, description="30m, 1h, 1d …")
    cron: str | None = Field(default=None, max_length=100, description="cron expression (UTC)")
    consistency: str = Field(default="filesystem", max_length=16)
    mode: str = Field(default="auto", max_length=16)
    keep: Keep = Keep()
    copy_to: str | None = Field(default=None, pattern=NAME_PATTERN, max_length=63)
    remote_keep: Keep = Keep()


class PolicyView(BaseModel):
    name: str
    instance: str | None
    group: str | None
    schedule: str
    consistency: str
    mode: str
    keep: Keep
    copy_to: str | None
    remote_keep: Keep
    paused: bool
    created_at: str
    last_tick: str | None
    last_job_id: str | None
    last_outcome: str | None
    last_error: str | None


def policy_view(state: PolicyState) -> PolicyView:
    p = state.policy
    return PolicyView(
        name=p.name, instance=p.instance, group=p.group, schedule=p.schedule, consistency=p.consistency, mode=p.mode,
        keep=Keep(**p.keep.to_dict()), copy_to=p.copy_to, remote_keep=Keep(**p.remote_keep.to_dict()),
        paused=state.paused, created_at=state.created_at.isoformat(),
        last_tick=state.last_tick.isoformat() if state.last_tick else None, last_job_id=state.last_job_id,
        last_outcome=state.last_outcome, last_error=state.last_error,
    )  # fmt: skip


@router.get("/policies", response_model=list[PolicyView], tags=TAGS, responses=problems(403))
def list_policies(state: StateDep, principal: PrincipalDep) -> list[PolicyView]:
    principal.require_admin()
    return [policy_view(s) for s in state.service.policies.all()]


@router.post("/policies", status_code=201, response_model=PolicyView, tags=TAGS, responses=problems(403, 404))
def create_policy(body: PolicyRequest, state: StateDep, principal: PrincipalDep) -> PolicyView:
    principal.require_admin()
    if body.group is not None:
        state.service.groups.show(body.group)
    if body.copy_to is not None:
        state.service.offsite.remote(body.copy_to)
    created = state.service.policies.create(
        body.name, body.instance, group=body.group, every=body.every, cron=body.cron, consistency=body.consistency,
        mode=body.mode, keep=body.keep.model_dump(), copy_to=body.copy_to, remote_keep=body.remote_keep.model_dump(),
    )  # fmt: skip
    return policy_view(created)


@router.get("/policies/{name}", response_model=PolicyView, tags=TAGS, responses=problems(403, 404))
def show_policy(name: PolicyName, state: StateDep, principal: PrincipalDep) -> PolicyView:
    principal.require_admin()
    return policy_view(state.service.policies.get(name))


@router.delete("/policies/{name}", status_code=204, tags=TAGS, responses=problems(403, 404))
def delete_policy(name: PolicyName, state: StateDep, principal: PrincipalDep) -> Response:
    principal.require_admin()
    state.service.policies.remove(name)
    return Response(status_code=204)


@router.post("/policies/{name}/pause", response_model=PolicyView, tags=TAGS, responses=problems(403, 404))
def pause_policy(name: PolicyName, state: StateDep, principal: PrincipalDep) -> PolicyView:
    principal.require_admin()
    return policy_view(state.service.policies.pause(name))


@router.post("/policies/{name}/resume", response_model=PolicyView, tags=TAGS, responses=problems(403, 404))
def resume_policy(name: PolicyName, state: StateDep, principal: PrincipalDep) -> PolicyView:
    principal.require_admin()
    return policy_view(state.service.policies.pause(name, paused=False))


@router.post(
    "/policies/{name}/run",
    status_code=202,
    response_model=JobView,
    tags=TAGS,
    responses=problems(403, 404, 409, 503),
)
def run_policy(name: PolicyName, response: Response, state: StateDep, principal: PrincipalDep) -> JobView:
    """Run now, as a job on the instance's (or group's) lock (409 while another job works on it); with several
    hosts, queued on the host that runs the instance (503 while that host is down)."""
    principal.require_admin()
    policy = state.service.policies.get(name).policy
    if state.cluster is not None and state.hosts_inventory is not None:
        groups = SqlGroups(state.service.catalog)
        routed = ClusterPolicies(state.service.policies, state.cluster, state.hosts_inventory, groups)
        return accepted(response, routed.submit(policy, token_id=principal.token_id))
    runner = state.require_runner()
    target = policy.instance or ""
    key = state.scheduler.instance_key(target) if state.scheduler else target

    def run(ctx: JobContext) -> dict[str, Any]:
        ctx.phase("running")
        return state.service.policies.execute(name, ctx.id).to_dict()

    spec = JobSpec(kind=JOB_KIND, lock_key=lock_key(policy, key), project=None, request={"policy": name},
                   token_id=principal.token_id, instance_name=policy.instance)  # fmt: skip
    return accepted(response, runner.submit(spec, run))
