"""``/v1/instances``: the instances a token may see, and the admin's instance -> project mapping."""

from __future__ import annotations

from fastapi import APIRouter

from freezeframe.api.deps import InstanceId, PrincipalDep, StateDep, problems
from freezeframe.api.schemas import InstanceRef, InstanceView, ProjectAssign, ProjectView
from freezeframe.api.views import instance_view

router = APIRouter(prefix="/v1", tags=["instances"])


@router.get("/instances", response_model=list[InstanceView], responses=problems())
def list_instances(state: StateDep, principal: PrincipalDep) -> list[InstanceView]:
    """The instances libvirt has (those of the token's project; all for an admin), with their disks."""
    return [instance_view(i, project, principal.is_admin) for i, project in state.visible_instances(principal)]


@router.get("/instances/{instance_id}", response_model=InstanceView, responses=problems(404))
def get_instance(instance_id: InstanceId, state: StateDep, principal: PrincipalDep) -> InstanceView:
    instance, project, _ = state.instance(instance_id, principal)
    return instance_view(instance, project, principal.is_admin)


@router.put("/instances/{instance_id}/project", response_model=ProjectView, responses=problems(403, 404))
def assign_project(
    instance_id: InstanceId, body: ProjectAssign, state: StateDep, principal: PrincipalDep
) -> ProjectView:
    """Admin: put the instance in a project (wins over the project in the domain's metadata)."""
    principal.require_admin()
    instance, _, _ = state.instance(instance_id, principal)
    state.projects.assign(instance.uuid, instance.name, body.project)
    ref = InstanceRef(name=instance.name, uuid=instance.uuid)
    return ProjectView(instance=ref, project=body.project, source="mapping")


@router.delete("/instances/{instance_id}/project", response_model=ProjectView, responses=problems(403, 404))
def unassign_project(instance_id: InstanceId, state: StateDep, principal: PrincipalDep) -> ProjectView:
    """Admin: drop the mapping; the project in the domain's metadata (if any) applies again."""
    principal.require_admin()
    instance, _, _ = state.instance(instance_id, principal)
    state.projects.unassign(instance.uuid)
    project, source = state.resolver.of_instance(instance)
    ref = InstanceRef(name=instance.name, uuid=instance.uuid)
    return ProjectView(instance=ref, project=project, source=source)  # type: ignore[arg-type]
