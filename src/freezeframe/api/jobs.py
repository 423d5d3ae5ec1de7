"""Background jobs: a bounded pool of worker threads, one job per instance (or set, or image) at a time.

Every job is a catalog row from the moment it is accepted, so a client can read its outcome after the service
restarted. Workers are daemon threads: a stop that does not wait for them (SIGKILL, or a copy longer than the
shutdown grace) leaves rows in ``queued``/``running`` and a journal entry, and the next start marks those jobs
failed after ``Freezeframe.repair()`` has thawed the guest and removed the partial data (``recover``).
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from freezeframe.adapters.service_store import FAILED, QUEUED, RUNNING, SUCCEEDED, Job, JobStore
from freezeframe.api.problems import classify, conflict, log
from freezeframe.errors import INTERRUPTED, FreezeframeError

PROGRESS_EVERY_S = 0.5


def _now() -> datetime:
    return datetime.now(UTC)


class JobContext:
    """What a running job may tell its row: phase, progress (throttled), the set or image it made."""

    def __init__(self, store: JobStore, job: Job) -> None:
        self.store = store
        self.job = job
        self._last = 0.0

    @property
    def id(self) -> str:
        return self.job.id

    def phase(self, phase: str) -> None:
        self.job.phase = phase
        self.store.update(self.job.id, phase=phase)

    def progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last < PROGRESS_EVERY_S and done < total:
            return
        self._last = now
        self.job.progress_done, self.job.progress_total = done, total
        self.store.update(self.job.id, progress_done=done, progress_total=total)

    def attach(self, *, set_id: str | None = None, image_id: str | None = None) -> None:
        values: dict[str, Any] = {}
        if set_id is not None and set_id != self.job.set_id:
            self.job.set_id = values["set_id"] = set_id
        if image_id is not None and image_id != self.job.image_id:
            self.job.image_id = values["image_id"] = image_id
        if values:
            self.store.update(self.job.id, **values)


JobFunction = Callable[[JobContext], dict[str, Any]]


@dataclass(frozen=True)
class JobSpec:
    kind: str
    lock_key: str
    project: str | None
    request: dict[str, Any]
    token_id: str | None = None
    instance_uuid: str | None = None
    instance_name: str | None = None
    set_id: str | None = None
    image_id: str | None = None


class JobRunner:
    """Accept jobs (409 when their key is busy), run them on ``workers`` threads, record every transition."""

    def __init__(self, store: JobStore, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError("at least one worker is needed")
        self.store = store
        self._queue: queue.Queue[tuple[Job, JobFunction] | None] = queue.Queue()
        self._active: dict[str, str] = {}
        self._lock = threading.Lock()
        self._accepting = True
        self._threads = [
            threading.Thread(target=self._work, name=f"ff-job-worker-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def active_job(self, lock_key: str) -> str | None:
        with self._lock:
            return self._active.get(lock_key)

    def submit(self, spec: JobSpec, fn: JobFunction) -> Job:
        job = Job(
            id=str(uuid.uuid4()),
            kind=spec.kind,
            state=QUEUED,
            project=spec.project,
            lock_key=spec.lock_key,
            request=spec.request,
            created_at=_now(),
            instance_uuid=spec.instance_uuid,
            instance_name=spec.instance_name,
            set_id=spec.set_id,
            image_id=spec.image_id,
            token_id=spec.token_id,
            server_pid=os.getpid(),
        )
        with self._lock:
            if not self._accepting:
                raise conflict("the service is shutting down; retry against the restarted service")
            running = self._active.get(spec.lock_key)
            if running is not None:
                raise conflict(
                    f"job {running} is still running on this {spec.lock_key.split(':')[0]}; wait for it to finish",
                    job_id=running,
                )
            self.store.add(job)
            self._active[spec.lock_key] = job.id
        self._queue.put((job, fn))
        return job

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, fn = item
            try:
                self._run(job, fn)
            finally:
                with self._lock:
                    if self._active.get(job.lock_key) == job.id:
                        del self._active[job.lock_key]

    def _run(self, job: Job, fn: JobFunction) -> None:
        job.started_at = _now()
        try:
            self.store.update(job.id, state=RUNNING, started_at=job.started_at, server_pid=os.getpid())
        except FreezeframeError as exc:
            record_failure(self.store, job, exc)
            return
        execute(self.store, job, fn)

    def shutdown(self, grace_s: float) -> list[str]:
        """Stop accepting, fail queued jobs, wait up to ``grace_s`` for running ones; return those still running."""
        with self._lock:
            self._accepting = False
        dropped: list[Job] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                dropped.append(item[0])
        for job in dropped:
            with self._lock:
                self._active.pop(job.lock_key, None)
            try:
                self.store.update(
                    job.id, state=FAILED, error_type=INTERRUPTED.slug,
                    error="the service stopped before this job started; submit it again", finished_at=_now(),
                )  # fmt: skip
            except FreezeframeError:
                log.exception("could not record that job %s was dropped", job.id)
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + grace_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return sorted(self._active.values())


def execute(store: JobStore, job: Job, fn: JobFunction) -> None:
    """Run a job already marked running and record its outcome: the one job boundary of every runner."""
    ctx = JobContext(store, job)
    try:
        result = fn(ctx)
    except Exception as exc:  # noqa: BLE001 - the job boundary: every failure is recorded (and logged)
        record_failure(store, job, exc)
        return
    try:
        store.update(job.id, state=SUCCEEDED, result=result, phase="done", finished_at=_now())
    except FreezeframeError as exc:
        log.exception("job %s finished but could not be recorded", job.id)
        record_failure(store, job, exc)


def record_failure(store: JobStore, job: Job, exc: BaseException) -> None:
    """The row keeps what a client may see (problem slug, redacted detail); the log keeps the rest."""
    error_id = uuid.uuid4().hex[:12]
    c = classify(exc, error_id)
    if c.status >= 500:
        log.error("job %s (%s) failed, error id %s: %s", job.id, job.kind, error_id, exc, exc_info=exc)
    else:
        log.info("job %s (%s) failed: %s", job.id, job.kind, exc)
    try:
        store.update(job.id, state=FAILED, error_type=c.slug, error=c.detail, finished_at=_now())
    except FreezeframeError:
        log.exception("could not record the failure of job %s", job.id)


def recover(store: JobStore, reports: list[str], repair_error: str | None = None) -> list[Job]:
    """At start-up (service lock held, repair done): every unfinished job belonged to a process that is gone."""
    failed = []
    summary = "; ".join(reports)
    if repair_error is None:
        outcome = "the guest was released and partial data removed on restart" + (f" ({summary})" if summary else "")
    else:
        outcome = f"repair on restart failed ({repair_error}); run `freezeframe repair` once libvirt answers"
    for job in store.unfinished():
        detail = (
            f"interrupted: the service stopped while this job was {job.state}"
            + (f" (phase {job.phase})" if job.phase else "")
            + f"; {outcome}"
        )
        store.update(job.id, state=FAILED, error_type=INTERRUPTED.slug, error=detail, finished_at=_now())
        job.state, job.error_type, job.error = FAILED, INTERRUPTED.slug, detail
        failed.append(job)
    return failed
