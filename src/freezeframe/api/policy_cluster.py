"""Policies in a multi-host deployment: ticks through the job engine, runs on the instance's host.

- The tick: a procrastinate periodic task (``freezeframe.policy_tick``, every ``FREEZEFRAME_POLICY_TICK_S``
  seconds, default 15) on the control queue that every agent serves. procrastinate's periodic deferrer makes one
  queue job per tick time whichever agents (scheduler replicas) are running (a unique row per tick in
  ``procrastinate_periodic_defers``), and its ``queueing_lock`` keeps at most one tick waiting. No procrastinate
  ``lock``: a tick job left ``doing`` by a killed agent would block every later tick. Two tick bodies may overlap
  (two agents, consecutive ticks); that is safe because the body claims each due policy tick in the catalog
  (compare-and-set on its last tick: the authoritative once-only rule, also across restarts) before it submits.
- The run: a job of kind ``policy`` submitted with ``ClusterJobs.submit`` - job row, route and queue row on the
  queue of the host that runs the instance (a group policy's: the one host that runs every member), in one
  transaction, refused while another job of the instance (group) is queued or running. A refused tick (instance
  busy, host down, instance gone) is recorded as ``skipped`` with the reason.
- After downtime only the latest missed tick of a policy runs, once (``ops/policies.due_tick``); procrastinate
  itself defers no tick job older than its ``max_delay`` after a restart.
- The agent of that host runs the job (``run_on_host``): the policy's run in its own service (local libvirt and
  repository), and records its host as the home of every set the policy made there.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from datetime import datetime
from typing import Any

import procrastinate

from freezeframe.adapters.host_registry import HostRecord, HostRegistry
from freezeframe.adapters.job_queue import CONTROL_QUEUE
from freezeframe.adapters.service_store import Job
from freezeframe.api.cluster import ClusterJobs, Inventory
from freezeframe.api.jobs import JobContext, JobSpec
from freezeframe.api.policy_scheduler import TICK_ENV
from freezeframe.errors import InstanceNotFound, InvalidRequest, WrongHost
from freezeframe.ops.policies import POLICY_KEY
from freezeframe.ports.groups import Groups
from freezeframe.ports.policies import Policy
from freezeframe.scheduling import JOB_KIND, Policies, lock_key
from freezeframe.service import Freezeframe
from freezeframe.validation import validate_int

log = logging.getLogger("freezeframe.policies")
TICK_TASK = "freezeframe.policy_tick"


def tick_cron() -> str:
    """procrastinate's cron (seconds in the 6th field) for ``FREEZEFRAME_POLICY_TICK_S`` (1-59 s, default 15)."""
    text = os.environ.get(TICK_ENV)
    seconds = validate_int(text, TICK_ENV, 1, 59) if text else 15
    return f"* * * * * */{seconds}"


class ClusterPolicies:
    """Start due policy ticks as jobs routed to the host of their instance (or group)."""

    def __init__(self, policies: Policies, cluster: ClusterJobs, inventory: Inventory, groups: Groups) -> None:
        self.policies = policies
        self.cluster = cluster
        self.inventory = inventory
        self.groups = groups

    def tick(self, now: datetime | None = None) -> list[str]:
        """Submit every due policy once (claimed in the catalog first); returns the jobs started."""
        return self.policies.start_due(lambda state, tick: self.submit(state.policy, tick.isoformat()).id, now)

    def submit(self, policy: Policy, tick: str | None = None, token_id: str | None = None) -> Job:
        """A run of ``policy`` queued on its host (``InstanceBusy``/``HostUnavailable`` when it cannot be)."""
        host, instance_uuid = self.route(policy)
        request: dict[str, Any] = {"policy": policy.name} | ({"tick": tick} if tick else {})
        spec = JobSpec(
            kind=JOB_KIND, lock_key=lock_key(policy, instance_uuid or ""), project=None, request=request,
            token_id=token_id, instance_uuid=instance_uuid, instance_name=policy.instance,
        )  # fmt: skip
        return self.cluster.submit(spec, host)

    def route(self, policy: Policy) -> tuple[HostRecord, str | None]:
        """The host that runs the instance (and its UUID); for a group, the one host that runs every member."""
        if policy.instance is not None:
            instance = self.inventory.instance(policy.instance)
            return self.inventory.host_of(instance), instance.uuid
        assert policy.group is not None
        members = self.groups.get_group(policy.group).members
        hosts = {self.inventory.registry.locate(m.instance_uuid)[0].name: m for m in members}
        if len(hosts) != 1:
            raise InvalidRequest(
                f"group {policy.group} spans hosts {', '.join(sorted(hosts)) or '(none)'}; a group policy runs on "
                "the one host that runs every member of its group"
            )
        return self.inventory.registry.host(next(iter(hosts))), None


def register_policy_ticks(
    app: procrastinate.App, scheduler: Callable[[], ClusterPolicies], cron: str | None = None
) -> None:
    """The periodic tick task on ``app`` (an agent's, or any worker serving the control queue)."""

    @app.periodic(cron=cron or tick_cron(), periodic_id="policies")
    @app.task(name=TICK_TASK, queue=CONTROL_QUEUE, queueing_lock=TICK_TASK)
    async def policy_tick(timestamp: int) -> None:
        started = await asyncio.to_thread(scheduler().tick)
        if started:
            log.info("policy tick %s started jobs %s", timestamp, ", ".join(started))


def run_on_host(service: Freezeframe, registry: HostRegistry, host: str, ctx: JobContext, job: Job) -> dict[str, Any]:
    """An agent's body of a ``policy`` job: the run here, then this host recorded as home of the sets it made."""
    name = str(job.request.get("policy"))
    if job.instance_uuid:
        try:
            service.instance(job.instance_uuid)
        except InstanceNotFound:
            raise WrongHost(f"instance {job.instance_name} does not run on host {host}; it was moved") from None
    ctx.phase("running")
    try:
        return service.policies.execute(name, ctx.id).to_dict()
    finally:
        for made in service.catalog.list_sets(metadata={POLICY_KEY: name}):
            if registry.set_host(made.id) is None:
                registry.record_set(made.id, host)
