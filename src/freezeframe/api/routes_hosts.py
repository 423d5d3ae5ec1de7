"""``/v1/hosts``: the hypervisor hosts of a multi-host deployment, as their agents last reported (admin only:
host names, URIs and free space describe the infrastructure, not a project's resources)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel

from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.api.deps import PrincipalDep, StateDep, problems

router = APIRouter(prefix="/v1", tags=["hosts"])


class HostView(BaseModel):
    name: str
    uri: str | None
    state: str
    """up, down (heartbeat stale), stopped (agent signed off) or enrolled (agent never started)."""
    last_heartbeat: datetime | None
    instance_count: int
    free_repository_bytes: int | None


@router.get("/hosts", response_model=list[HostView], responses=problems(403))
def list_hosts(state: StateDep, principal: PrincipalDep) -> list[HostView]:
    """Every enrolled host with its state, last heartbeat, instance count and free repository space."""
    principal.require_admin()
    return [
        HostView(
            name=h.name,
            uri=h.uri,
            state=h.state,
            last_heartbeat=h.last_heartbeat,
            instance_count=h.instance_count,
            free_repository_bytes=h.free_bytes,
        )
        for h in HostRegistry(state.service.catalog).hosts()
    ]
