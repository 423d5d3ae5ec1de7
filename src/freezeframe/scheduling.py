"""Policies as the Python API (``service.policies``): create, list, pause, delete, run now, and what is due.

Every run is a job row (``jobs`` table, kind ``policy``) with its outcome; the policy's row keeps the last job, its
outcome and error (``policy show``, ``GET /v1/policies/NAME``). ``freezeframe serve`` runs due policies through
its job runner (api/policy_scheduler.py); ``policy run`` runs one in the calling process.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from freezeframe.adapters.service_store import FAILED, RUNNING, SUCCEEDED, Job, JobStore
from freezeframe.errors import FreezeframeError, category
from freezeframe.ops.policies import PolicyRun, RunReport, due_tick, new_policy
from freezeframe.ports.policies import Policy, PolicyState, PolicyStore

JOB_KIND = "policy"
SKIPPED = "skipped"
"""The outcome of a tick that found its target busy (or its host down): recorded, not retried."""


def lock_key(policy: Policy, instance_uuid: str) -> str:
    """The job lock a run holds: the instance's (the key the snapshot API uses), or the group's (the key of
    ``group snapshot`` jobs), so a policy's run never overlaps another job on the same target."""
    return f"group:{policy.group}" if policy.group is not None else f"instance:{instance_uuid}"


def _now() -> datetime:
    return datetime.now(UTC)


class Policies:
    def __init__(self, store: PolicyStore, jobs: JobStore, run: Callable[[], PolicyRun]) -> None:
        self.store = store
        self.jobs = jobs
        self._run = run

    def create(self, name: str, instance: str | None, **options: Any) -> PolicyState:
        policy = new_policy(name, instance, **options)
        self.store.add(policy, _now())
        return self.store.get(policy.name)

    def all(self) -> list[PolicyState]:
        return self.store.all()

    def get(self, name: str) -> PolicyState:
        return self.store.get(name)

    def remove(self, name: str) -> None:
        self.store.remove(name)

    def pause(self, name: str, paused: bool = True) -> PolicyState:
        self.store.set_paused(name, paused)
        return self.store.get(name)

    def due(self, now: datetime | None = None) -> list[tuple[PolicyState, datetime]]:
        """Policies with a tick to run now (the latest passed one: missed ticks are not replayed)."""
        moment = now or _now()
        found = []
        for state in self.store.all():
            tick = due_tick(state, moment)
            if tick is not None:
                found.append((state, tick))
        return found

    def claim(self, state: PolicyState, tick: datetime) -> bool:
        """Start ``tick`` once, whoever else looks at the same policy."""
        return self.store.claim_tick(state.policy.name, state.last_tick, tick)

    def start_due(self, submit: Callable[[PolicyState, datetime], str], now: datetime | None = None) -> list[str]:
        """Claim each due tick once, then ``submit`` its run (returns the job id). Whoever else ticks at the same
        time loses the claim; a submit refused with a ``FreezeframeError`` (the instance busy, its host down) is
        recorded on the policy as a skipped tick. Returns the jobs started."""
        started = []
        for state, tick in self.due(now):
            if not self.claim(state, tick):
                continue
            try:
                started.append(submit(state, tick))
            except FreezeframeError as exc:
                detail = f"tick {tick.isoformat()} skipped: {exc}"
                self.store.record_outcome(state.policy.name, "", SKIPPED, detail)
        return started

    def execute(self, name: str, job_id: str) -> RunReport:
        """One run; its outcome lands on the policy's row, and failures propagate to the caller's job."""
        policy = self.store.get(name).policy
        try:
            report = self._run().run(policy)
        except Exception as exc:
            detail = str(exc) if isinstance(exc, FreezeframeError) else f"{type(exc).__name__}: {exc}"
            self.store.record_outcome(name, job_id, FAILED, detail)
            raise
        self.store.record_outcome(name, job_id, SUCCEEDED, None)
        return report

    def run_now(self, name: str) -> tuple[Job, RunReport | None]:
        """``policy run``: a job row around one run in this process; returns the finished job."""
        policy = self.store.get(name).policy
        job = Job(
            id=str(uuid.uuid4()), kind=JOB_KIND, state=RUNNING, project=None,
            lock_key=lock_key(policy, policy.instance or ""), request={"policy": name}, created_at=_now(),
            instance_name=policy.instance, started_at=_now(),
        )  # fmt: skip
        self.jobs.add(job)
        try:
            report = self.execute(name, job.id)
        except FreezeframeError as exc:
            self.jobs.update(job.id, state=FAILED, error_type=category(exc).slug, error=str(exc), finished_at=_now())
            return self.jobs.get(job.id), None
        self.jobs.update(job.id, state=SUCCEEDED, set_id=report.set_id, result=report.to_dict(), finished_at=_now())
        return self.jobs.get(job.id), report
