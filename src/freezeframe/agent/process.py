"""The agent process: guarantees first, then heartbeats and the host's job queue until SIGINT/SIGTERM.

Start-up, in this order: authenticate with the host's key (nothing runs for an agent that is not its host's);
``repair`` - the journal of a killed predecessor thaws/resumes its guest and fails the half-made set; the jobs
that predecessor was running are marked failed (interrupted) and their queue rows finished, so none is lost
silently nor run twice; sets of this host's ended jobs left ``creating`` are failed and group sets whose
coordinator died are settled (``reconcile``, again every 5 s from the heartbeat thread); then the first
heartbeat, and procrastinate's worker on ``host.<name>`` (plus the control queue). Each job runs in a worker
thread while the freeze-window watchdog of the flow keeps its guarantees there. A stop lets running jobs finish
(procrastinate's graceful stop), then signs the host off.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import procrastinate
import procrastinate.worker
import psycopg
from procrastinate import exceptions as queue_errors

from freezeframe.adapters.group_records import SqlGroups
from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.adapters.job_queue import CONTROL_QUEUE, REAP_TASK, RUN_JOB_TASK, conninfo, ensure_schema, queue_of
from freezeframe.adapters.service_store import FAILED, QUEUED, RUNNING, SUCCEEDED, JobStore
from freezeframe.agent.group_reconcile import settle_orphaned_group_sets
from freezeframe.agent.inventory import free_bytes, instance_record
from freezeframe.agent.reaper import fail_stranded, stranded_jobs
from freezeframe.agent.reconcile import fail_stale_sets
from freezeframe.agent.steady import AgentWiring
from freezeframe.agent.work import HostWork
from freezeframe.api.cluster import ClusterJobs, Inventory
from freezeframe.api.policy_cluster import ClusterPolicies, register_policy_ticks
from freezeframe.config import Settings
from freezeframe.errors import INTERRUPTED, FreezeframeError
from freezeframe.service import Freezeframe

log = logging.getLogger("freezeframe.agent")

HEARTBEAT_S = 5.0
# Every 5 s: procrastinate (croniter) reads a sixth field as the SECONDS, so "*/5 * * * * *" would be every second
# of every fifth minute.
REAP_CRON = "* * * * * */5"
RECONNECT_S = 1.0
RECONCILE_S = 5.0
"""How often the heartbeat thread looks for sets of this host left ``creating`` (one query)."""
KEY_ENV = "FREEZEFRAME_AGENT_KEY"


@dataclass(frozen=True)
class AgentConfig:
    name: str
    settings: Settings
    key: str | None
    concurrency: int = 2
    heartbeat_s: float = HEARTBEAT_S


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.service = Freezeframe(config.settings, AgentWiring(config.settings))
        self.registry = HostRegistry(self.service.catalog)
        self.work = HostWork(config.name, self.service, self.registry)
        self._stop = threading.Event()
        self._signalled = threading.Event()

    # ---- start-up -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.registry.authenticate(self.config.name, self.config.key)
        with self.service.catalog.connect("preparing the job queue", write=True) as connection:
            ensure_schema(connection)
        for line in self.service.repair():
            log.warning("repair at start-up: %s", line)
        for job_id in self._fail_interrupted_jobs():
            log.warning("job %s was interrupted when this host's previous agent stopped; marked failed", job_id)
        self.reconcile()
        self.heartbeat()

    def reconcile(self) -> None:
        """Sets of this host's ended jobs still ``creating`` (recorded half-way) are failed and their files removed;
        group sets whose coordinator died are settled (``group_reconcile``)."""
        for line in fail_stale_sets(self.service, self.registry, self.config.name):
            log.warning("reconciling: %s", line)
        for line in settle_orphaned_group_sets(self.service, self.registry, self.config.name):
            log.warning("reconciling: %s", line)

    def _fail_interrupted_jobs(self) -> list[str]:
        """Jobs this host was running when its previous agent died: the repair above released their guests."""
        store = JobStore(self.service.catalog)
        failed = []
        for job in store.unfinished():
            if job.state != RUNNING or self.registry.job_host(job.id) != self.config.name:
                continue
            detail = (
                f"interrupted: the agent of host {self.config.name} stopped while this job was running"
                + (f" (phase {job.phase})" if job.phase else "")
                + "; the guest was released and partial data removed when the agent restarted"
            )
            store.update(job.id, state=FAILED, error_type=INTERRUPTED.slug, error=detail, finished_at=datetime.now(UTC))
            failed.append(job.id)
        return failed

    # ---- heartbeats --------------------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        settings = self.config.settings
        instances = [instance_record(i) for i in self.service.instances()]
        self.registry.heartbeat(
            self.config.name, self.config.key, uri=settings.libvirt_uri, repository=str(settings.repository_dir),
            free_bytes=free_bytes(settings.repository_dir), instances=instances, agent_pid=os.getpid(),
        )  # fmt: skip

    @property
    def heartbeat_every_s(self) -> float:
        """At least three beats within the time after which the API calls the host down."""
        return min(self.config.heartbeat_s, self.registry.stale_after_s / 3)

    def _heartbeats(self) -> None:
        reconciled = time.monotonic()
        while not self._stop.wait(self.heartbeat_every_s):
            try:
                self.heartbeat()
            except FreezeframeError as exc:  # the catalog restarting, libvirt busy: the next beat retries
                log.warning("heartbeat failed (retrying in %.1f s): %s", self.heartbeat_every_s, exc)
                continue
            if time.monotonic() - reconciled < RECONCILE_S:
                continue
            reconciled = time.monotonic()
            try:
                self.reconcile()
            except FreezeframeError as exc:
                log.warning("reconciling this host's sets failed (retrying in %.0f s): %s", RECONCILE_S, exc)

    # ---- the queue -----------------------------------------------------------------------------------------------

    def queue_app(self) -> procrastinate.App:
        connector = procrastinate.PsycopgConnector(conninfo=conninfo(self.config.settings.catalog_url))
        app = procrastinate.App(connector=connector)
        work = self.work

        @app.task(name=RUN_JOB_TASK)
        async def run_job(job_id: str) -> None:
            await asyncio.to_thread(work.run, job_id)

        register_policy_ticks(app, lambda: self.policy_ticks)

        @app.periodic(cron=REAP_CRON, periodic_id="reaper")
        @app.task(name=REAP_TASK, queue=CONTROL_QUEUE, queueing_lock=REAP_TASK)
        async def reap(timestamp: int) -> None:
            await self._reap(app)

        return app

    @functools.cached_property
    def policy_ticks(self) -> ClusterPolicies:
        """Due policies started as jobs on their instances' hosts (api/policy_cluster.py), built at the first tick."""
        catalog = self.service.catalog
        cluster = ClusterJobs(catalog, self.config.settings.catalog_url, self.registry)
        return ClusterPolicies(self.service.policies, cluster, Inventory(self.registry), SqlGroups(catalog))

    def _serve_until_stopped(self) -> bool:
        """True: stopped by a signal (graceful); False: the database went away (PostgreSQL restarted)."""
        try:
            asyncio.run(self._serve_queue())
        except (queue_errors.ConnectorException, psycopg.OperationalError, OSError) as exc:
            log.warning("job queue connection failed: %s", exc)
            return False
        return self._signalled.is_set()

    async def _serve_queue(self) -> None:
        """procrastinate's worker until SIGTERM/SIGINT (graceful: running jobs finish) or until it stops itself
        because its database connection failed (then ``run`` reconnects)."""
        app = self.queue_app()
        async with app.open_async():
            await self._finish_orphaned_queue_jobs(app)
            worker = procrastinate.worker.Worker(
                app, queues=[queue_of(self.config.name), CONTROL_QUEUE], name=f"agent-{self.config.name}",
                concurrency=self.config.concurrency, install_signal_handlers=False,
            )  # fmt: skip
            loop = asyncio.get_running_loop()

            def stop() -> None:
                self._signalled.set()
                worker.stop()  # type: ignore[no-untyped-call]

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop)
            try:
                await worker.run()  # type: ignore[no-untyped-call]
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    async def _reap(self, app: procrastinate.App) -> None:
        catalog, registry = self.service.catalog, self.registry
        for job in await asyncio.to_thread(stranded_jobs, catalog, registry):
            if job.queue_job_id is not None:
                await app.job_manager.cancel_job_by_id_async(job.queue_job_id)
            await asyncio.to_thread(fail_stranded, catalog, job, registry.stale_after_s)

    async def _finish_orphaned_queue_jobs(self, app: procrastinate.App) -> None:
        """Queue rows left ``doing`` by a dead predecessor (or a lost connection): a job never claimed goes back to
        the queue (it runs once, now); a claimed one has its outcome on its row already, which closes the queue row."""
        manager, store = app.job_manager, JobStore(self.service.catalog)
        for queued in await manager.list_jobs_async(queue=queue_of(self.config.name), status="doing"):
            if queued.id is None:
                continue
            job = await asyncio.to_thread(store.get, str(queued.task_kwargs.get("job_id")))
            if job.state == QUEUED:
                await manager.retry_job_by_id_async(queued.id, retry_at=datetime.now(UTC))
                continue
            done = procrastinate.jobs.Status.SUCCEEDED if job.state == SUCCEEDED else procrastinate.jobs.Status.FAILED
            await manager.finish_job_by_id_async(queued.id, done, delete_job=False)

    def run(self) -> None:
        self.start()
        beats = threading.Thread(target=self._heartbeats, name="ff-agent-heartbeat", daemon=True)
        beats.start()
        try:
            while not self._serve_until_stopped():
                log.warning("lost the job queue's database; reconnecting in %.0f s", RECONNECT_S)
                time.sleep(RECONNECT_S)
        finally:
            self._stop.set()
            beats.join(timeout=self.config.heartbeat_s + 1)
            try:
                self.registry.sign_off(self.config.name, self.config.key)
            except FreezeframeError as exc:
                log.warning("could not sign off host %s: %s", self.config.name, exc)
            self.service.close()


def run_agent(config: AgentConfig) -> None:
    Agent(config).run()
