"""Jobs of a multi-host deployment that work on a set: restore on a chosen host (default: where its members are);
verify, revert and delete on the host whose repository holds its members - the API runs none of them itself."""

from __future__ import annotations

from typing import Any

from freezeframe.adapters.service_store import Job
from freezeframe.api.access import Principal
from freezeframe.api.problems import conflict
from freezeframe.api.schemas import RestoreRequest
from freezeframe.api.set_jobs import ON_MEMBERS_HOST
from freezeframe.api.state import AppState
from freezeframe.errors import InstanceNotFound
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


def submit_to_members_host(
    state: AppState, principal: Principal, set_id: str, kind: str, request: dict[str, Any]
) -> Job:
    """Queue ``kind`` (verify, revert or delete) on the agent of the host holding the set's members.

    A revert is locked on the instance (as its snapshots are) and needs the instance on that same host; the
    others are locked on the set, as restore is. Exactly once like every host job (``HostWork.run`` claims it)."""
    assert kind in ON_MEMBERS_HOST and state.cluster is not None
    principal.require_write()
    snapshot_set, project = state.snapshot_set(set_id, principal)
    if kind == "delete" and snapshot_set.status is SetStatus.CREATING:
        raise conflict(f"snapshot set {snapshot_set.id} is still being created; wait for its job to finish")
    if kind != "delete" and snapshot_set.status is not SetStatus.AVAILABLE:
        raise conflict(f"snapshot set {snapshot_set.id} is {snapshot_set.status}; only available sets can be used")
    host = state.cluster.members_host(snapshot_set)
    lock_key = None
    if kind == "revert":
        lock_key = f"instance:{snapshot_set.instance_uuid}"
        try:
            runs_on = state.cluster.registry.locate(snapshot_set.instance_uuid)[0].name
        except InstanceNotFound:
            raise conflict(
                f"no host runs instance {snapshot_set.instance_name} any more; restore the set instead"
            ) from None
        if runs_on != host:
            raise conflict(
                f"instance {snapshot_set.instance_name} runs on host {runs_on} but the set's members are on {host}; "
                "restore the set instead (POST .../restore with host)"
            )
    return state.cluster.submit_on_set(
        kind, snapshot_set, request, host, project=project, token_id=principal.token_id, lock_key=lock_key
    )
