"""Jobs routed to a host that stopped answering fail quickly and clearly; other hosts carry on.

Every agent serves the control queue, on which procrastinate defers this task every 5 s (its periodic deferrer
makes one job per tick, whichever agent wins): the jobs whose host's heartbeat is stale are marked failed with
``HostUnavailable``, and their queue rows that no worker fetched are cancelled, so they never run later by
surprise when the host comes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.host_registry import DOWN, HostRegistry
from freezeframe.adapters.service_store import FAILED, JobStore
from freezeframe.errors import HostUnavailable


@dataclass(frozen=True)
class Stranded:
    job_id: str
    host: str
    queue_job_id: int | None


def stranded_jobs(catalog: SqlCatalog, registry: HostRegistry) -> list[Stranded]:
    """Unfinished jobs routed to hosts that are down (heartbeat stale)."""
    down = {h.name for h in registry.hosts() if h.state == DOWN}
    if not down:
        return []
    found = []
    for job in JobStore(catalog).unfinished():
        route = registry.job_route(job.id)
        if route is not None and route[0] in down:
            found.append(Stranded(job.id, route[0], route[1]))
    return found


def fail_stranded(catalog: SqlCatalog, job: Stranded, stale_after_s: float) -> None:
    detail = (
        f"host {job.host} stopped answering (no heartbeat for over {stale_after_s:.0f} s); this job did not "
        "complete there - submit it again when the host is back, or restore the instance elsewhere"
    )
    store = JobStore(catalog)
    store.update(job.job_id, state=FAILED, error_type=HostUnavailable.slug, error=detail, finished_at=datetime.now(UTC))
