"""The policy scheduler inside ``freezeframe serve``: a thread that, every ``FREEZEFRAME_POLICY_TICK_S`` seconds
(default 15), starts each due policy as a job on the service's job runner.

- One run per tick: a tick is claimed in the catalog (compare-and-set on the policy's last tick) before its job is
  submitted, so a tick starts once even across restarts; after downtime only the latest missed tick runs.
- Never two at once for one instance: the job's lock key is the instance's (``instance:<uuid>``, the same key the
  snapshot API uses; a group policy's: ``group:<name>``, as ``group snapshot`` jobs); a tick that finds it busy
  is recorded as ``skipped`` with the reason.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime

from freezeframe.api.jobs import JobContext, JobRunner, JobSpec
from freezeframe.api.problems import ApiProblem
from freezeframe.errors import FreezeframeError, InstanceBusy
from freezeframe.ports.policies import PolicyState
from freezeframe.scheduling import JOB_KIND, SKIPPED, Policies, lock_key

log = logging.getLogger("freezeframe.policies")
TICK_ENV = "FREEZEFRAME_POLICY_TICK_S"
__all__ = ["SKIPPED", "TICK_ENV", "PolicyScheduler"]


class PolicyScheduler:
    def __init__(self, policies: Policies, runner: JobRunner, instance_key: Callable[[str], str]) -> None:
        self.policies = policies
        self.runner = runner
        self.instance_key = instance_key
        self.interval_s = float(os.environ.get(TICK_ENV) or 15)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ff-policy-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except FreezeframeError as exc:  # the catalog was busy or down: the next tick retries
                log.warning("policy scheduler: %s", exc)
            except Exception:  # the thread's boundary: a bug is logged and the scheduler keeps ticking
                log.exception("policy scheduler: unexpected error; retrying at the next tick")

    def tick(self, now: datetime | None = None) -> list[str]:
        """Submit every due policy once; returns the jobs started."""
        return self.policies.start_due(self._submit, now)

    def _submit(self, state: PolicyState, tick: datetime) -> str:
        policy = state.policy
        spec = JobSpec(
            kind=JOB_KIND, lock_key=lock_key(policy, self.instance_key(policy.instance or "")), project=None,
            request={"policy": policy.name, "tick": tick.isoformat()}, instance_name=policy.instance,
        )  # fmt: skip
        try:
            return self.runner.submit(spec, self._job(policy.name)).id
        except ApiProblem as exc:
            raise InstanceBusy(exc.detail) from None

    def _job(self, name: str) -> Callable[[JobContext], dict[str, object]]:
        def run(ctx: JobContext) -> dict[str, object]:
            report = self.policies.execute(name, ctx.id)
            if report.set_id is not None:
                ctx.attach(set_id=report.set_id)
            return report.to_dict()

        return run
