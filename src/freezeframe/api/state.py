"""What the routes stand on: one ``Freezeframe`` for the process, the job runner, and lookups that answer 404
for anything the caller's token may not see (exactly as for something that does not exist)."""

from __future__ import annotations

import fcntl
import os
import re

from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.adapters.image_records import StoredImage
from freezeframe.adapters.service_store import ImageOwners, Job, JobStore, ProjectMap, TokenStore
from freezeframe.api.access import Principal
from freezeframe.api.cloud_links import CloudLinks
from freezeframe.api.cluster import ClusterJobs, Inventory
from freezeframe.api.jobs import JobRunner, recover
from freezeframe.api.policy_scheduler import PolicyScheduler
from freezeframe.api.problems import conflict, log, not_found
from freezeframe.api.projects import ProjectResolver
from freezeframe.api.schemas import UUID_PATTERN
from freezeframe.config import Settings
from freezeframe.errors import FreezeframeError, HypervisorError, ImageNotFound, InstanceBusy, JobNotFound, NotFound
from freezeframe.model import Instance, SnapshotSet
from freezeframe.ops.compute import Visible
from freezeframe.service import Freezeframe

_UUID_RE = re.compile(UUID_PATTERN)


class AppState:
    """One ``Freezeframe`` for the process (catalog engine and libvirt connection are thread-safe)."""

    def __init__(self, settings: Settings, workers: int, shutdown_grace_s: float, multi_host: bool = False) -> None:
        self.settings = settings
        self.workers = workers
        self.shutdown_grace_s = shutdown_grace_s
        self.service = Freezeframe(settings)
        catalog = self.service.catalog
        self.jobs = JobStore(catalog)
        self.tokens = TokenStore(catalog)
        self.projects = ProjectMap(catalog)
        self.owners = ImageOwners(catalog)
        self.portable = self.service.portable
        self.cloud = CloudLinks.from_env()
        self.cluster: ClusterJobs | None = None
        self.hosts_inventory = Inventory(HostRegistry(catalog)) if multi_host else None
        self.resolver = ProjectResolver(self.inventory, self.projects)
        self.runner: JobRunner | None = None
        self.scheduler: PolicyScheduler | None = None
        self._lock_fd: int | None = None

    @property
    def inventory(self) -> Inventory | Freezeframe:
        """Where instances are looked up: the hosts' heartbeats (multi-host) or this host's libvirt."""
        return self.hosts_inventory if self.hosts_inventory is not None else self.service

    # ---- start and stop ------------------------------------------------------------------------------

    def start(self) -> None:
        """Service lock, repair, recovery of interrupted jobs, then workers: in that order, before serving.
        A multi-host API replica has none of these (the agents have): it only prepares the job queue."""
        if isinstance(self.inventory, Inventory):
            self.cluster = ClusterJobs(self.service.catalog, self.settings.catalog_url, self.inventory.registry)
            return
        self._take_service_lock()
        reports: list[str] = []
        repair_error: str | None = None
        if self.service.journal.pending():
            try:
                reports += self.service.repair()  # the journal (thaw, abort, fail the set), then the rest
            except FreezeframeError as exc:
                repair_error = str(exc)
                log.error("repair at start-up failed; run `freezeframe repair` once libvirt answers: %s", exc)
        else:
            for name, repair in (("lifecycle", self.service.lifecycle.repair), ("image store", self.portable.repair)):
                try:
                    reports += repair()
                except FreezeframeError as exc:
                    log.warning("%s repair at start-up failed (`freezeframe repair` retries it): %s", name, exc)
        for line in reports:
            log.warning("repair at start-up: %s", line)
        for job in recover(self.jobs, reports, repair_error):
            log.warning("job %s (%s) was interrupted by the previous stop; marked failed", job.id, job.kind)
        self._warm_hypervisor()
        self.runner = JobRunner(self.jobs, self.workers)
        self.scheduler = PolicyScheduler(self.service.policies, self.runner, self._instance_key)
        self.scheduler.start()

    def _instance_key(self, ref: str) -> str:
        """A policy's instance as the job lock key the snapshot API uses (its UUID), or its name if not found."""
        try:
            return self.service.instance(ref).uuid
        except FreezeframeError:
            return ref

    def _take_service_lock(self) -> None:
        path = self.settings.home / "service.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = path.read_text().strip() or "unknown"
            raise InstanceBusy(
                f"another freezeframe service (pid {holder}) already serves {self.settings.home}; "
                "stop it first or give this one another --home"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _warm_hypervisor(self) -> None:
        """Connect now so worker threads never race to open the connection; a later call retries if down."""
        try:
            _ = self.service.hypervisor
        except HypervisorError as exc:
            log.warning("libvirt is not reachable yet (%s); instance calls answer 502 until it is", exc)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        try:
            if self.runner is not None:
                left = self.runner.shutdown(self.shutdown_grace_s)
                if left:
                    log.warning("stopping with jobs still running (%s); the next start repairs them", ", ".join(left))
        finally:
            try:
                self.service.close()
            finally:
                if self._lock_fd is not None:
                    os.close(self._lock_fd)
                    self._lock_fd = None

    # ---- lookups with visibility ----------------------------------------------------------------------

    def require_runner(self) -> JobRunner:
        if self.cluster is not None:
            raise conflict("in a multi-host deployment this operation is not available through the API yet")
        if self.runner is None:
            raise conflict("the service is starting or stopping; retry in a moment")
        return self.runner

    def visible_instances(self, principal: Principal) -> list[tuple[Instance, str | None]]:
        """The instances this token may see, with their projects."""
        mapping = self.resolver.mapping_snapshot()
        found = []
        for instance in self.inventory.instances():
            project, _ = self.resolver.of_instance(instance, mapping)
            if principal.sees(project):
                found.append((instance, project))
        return found

    def instance(self, ref: str, principal: Principal) -> tuple[Instance, str | None, str]:
        if len(ref) == 36 and ref.count("-") == 4 and not _UUID_RE.match(ref.lower()):
            raise not_found(f"instance {ref!r}")
        try:
            instance = self.inventory.instance(ref.lower() if _UUID_RE.match(ref.lower()) else ref)
        except NotFound:
            raise not_found(f"instance {ref!r}") from None
        project, source = self.resolver.of_instance(instance)
        if not principal.sees(project):
            raise not_found(f"instance {ref!r}")
        return instance, project, source

    def require_free_name(self, name: str) -> None:
        """Only that the name is taken, whoever's instance holds it."""
        try:
            self.inventory.instance(name)
        except NotFound:
            return
        raise conflict(f"an instance named {name!r} already exists; choose another name")

    def snapshot_set(self, set_id: str, principal: Principal) -> tuple[SnapshotSet, str | None]:
        found = self.service.catalog.load_sets([set_id])
        if not found:
            raise not_found(f"snapshot set {set_id}")
        snapshot_set = found[0]
        project = self.resolver.of_set(snapshot_set)
        if not principal.sees(project):
            raise not_found(f"snapshot set {set_id}")
        return snapshot_set, project

    def visible_sets(self, principal: Principal) -> Visible:
        """The rule every bulk operation (rotation, prune, group delete) gets: only sets this token may see."""

        def visible(snapshot_set: SnapshotSet) -> bool:
            return principal.sees(self.resolver.of_set(snapshot_set))

        return visible

    def job(self, job_id: str, principal: Principal) -> Job:
        try:
            job = self.jobs.get(job_id)
        except JobNotFound:
            raise not_found(f"job {job_id}") from None
        if not principal.sees(job.project):
            raise not_found(f"job {job_id}")
        return job

    def image_project(self, image: StoredImage, owners: dict[str, str | None] | None = None) -> str | None:
        """Recorded at export by the service; an image the CLI exported follows its source set, if still there."""
        owners = self.owners.all() if owners is None else owners
        if image.id in owners:
            return owners[image.id]
        if image.source_set_id:
            found = self.service.catalog.load_sets([image.source_set_id])
            if found:
                return self.resolver.of_set(found[0])
        return None

    def image(self, image_id: str, principal: Principal) -> tuple[StoredImage, str | None]:
        try:
            image = self.portable.image(image_id)
        except ImageNotFound:
            raise not_found(f"image {image_id}") from None
        project = self.image_project(image)
        if image.id != image_id or not principal.sees(project):
            raise not_found(f"image {image_id}")
        return image, project
