"""Jobs of a multi-host deployment that work on a set: restore on a chosen host (default: where its members are)."""

from __future__ import annotations

from freezeframe.adapters.service_store import Job
from freezeframe.api.access import Principal
from freezeframe.api.problems import conflict
from freezeframe.api.schemas import RestoreRequest
from freezeframe.api.state import AppState
from freezeframe.model import SetStatus


def submit_restore_to_host(state: AppState, principal: Principal, set_id: str, body: RestoreRequest) -> Job:
    """Queue the restore on ``body.host``'s agent, which transfers the members first if they live elsewhere."""
    principal.require_write()
    snapshot_set, project = state.snapshot_set(set_id, principal)
    if snapshot_set.status is not SetStatus.AVAILABLE:
        raise conflict(f"snapshot set {snapshot_set.id} is {snapshot_set.status}; only available sets can be restored")
    state.require_free_name(body.name)
    assert state.cluster is not None
    request = body.model_dump(mode="json")
    return state.cluster.submit_restore(snapshot_set, request, project=project, token_id=principal.token_id)
