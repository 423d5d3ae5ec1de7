"""The one place that builds objects: adapters plugged into the flow and the operations, for one home.

The CLI, the HTTP API, the agent and the tests all start here::

    with wiring.open_service(Settings.from_env()) as ff:   # a Freezeframe façade
        ff.snapshot(SnapshotRequest("vm1"))
        ff.lifecycle.restore(set_id, "vm1-copy")

Nothing is built before it is used, and nothing heavy is imported at module import time: a catalog-only command
(``freezeframe list``) opens the catalog and never imports libvirt, lxml or the OVF/OVA code; libvirt is
connected on the first call that needs it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freezeframe.config import Settings
from freezeframe.errors import PreflightFailed
from freezeframe.flow import FlowSettings, SnapshotFlow, SnapshotRequest
from freezeframe.model import SnapshotSet
from freezeframe.ports import ProgressCallback
from freezeframe.service import Freezeframe

if TYPE_CHECKING:
    from freezeframe.adapters.catalog import SqlCatalog
    from freezeframe.adapters.host_fs import HostTools
    from freezeframe.adapters.journal import FileJournal
    from freezeframe.adapters.libvirt_checkpoints import LibvirtCheckpoints
    from freezeframe.adapters.libvirt_domains import LibvirtDomains
    from freezeframe.adapters.libvirt_hypervisor import LibvirtHypervisor
    from freezeframe.adapters.locks import FileLocks
    from freezeframe.adapters.qemu_img import QemuImg
    from freezeframe.adapters.rbd_volumes import RbdVolumes
    from freezeframe.adapters.remote_registry import CatalogRemotes
    from freezeframe.adapters.repository import DirectoryRepository
    from freezeframe.adapters.restore_log import RestoreLog
    from freezeframe.lifecycle import Lifecycle
    from freezeframe.offsite import Offsite
    from freezeframe.ops.common import Holds, Markers, Stores
    from freezeframe.ops.copy import RemoteHandle
    from freezeframe.ops.groups import GroupOps
    from freezeframe.ops.instances import InstanceBuilder
    from freezeframe.ops.restore import Restore
    from freezeframe.portable import Portable
    from freezeframe.ports import Catalog, ImageStore
    from freezeframe.scheduling import Policies

FAULT_HOLD_ENV = "FREEZEFRAME_FAULT_HOLD_IN_WINDOW_S"


@dataclass(frozen=True)
class LifecycleOptions:
    domain_type: str = "qemu"
    """Restored and verify domains run under TCG by default (``qemu``); ``kvm`` where the host has it."""
    boot_timeout_s: float = 180.0
    shutdown_timeout_s: float = 60.0


def make_private(home: Path) -> None:
    """Guests' disks are in here: no other local account may read them (issue 17).

    The home becomes 0700 even when an older version made it 0755, and the process umask becomes 077 so that
    every file made from now on - catalog, members, journals, qemu-img outputs, packages - is 0600.
    """
    os.umask(0o077)
    try:
        if home.stat().st_mode & 0o077:
            home.chmod(0o700)
    except PermissionError:
        raise PreflightFailed(f"freezeframe home {home} is readable by others and cannot be made private") from None


def open_home(home: Path) -> None:
    """Create the home (0700) if needed and prove it takes files; one clear error line if it cannot."""
    hint = "point --home or FREEZEFRAME_HOME at a directory freezeframe may write"
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise PreflightFailed(f"freezeframe home {home} is not a directory; {hint}") from None
    except OSError as exc:
        raise PreflightFailed(f"freezeframe home {home} cannot be created ({exc.strerror}); {hint}") from None
    if not home.is_dir():
        raise PreflightFailed(f"freezeframe home {home} is not a directory; {hint}")
    make_private(home)
    try:
        fd, probe = tempfile.mkstemp(prefix=".ff-probe-", dir=home)
        os.close(fd)
        Path(probe).unlink()
    except OSError as exc:
        raise PreflightFailed(f"freezeframe home {home} is not usable ({exc.strerror}); {hint}") from None


class Wiring:
    """Every object of one freezeframe home, each built on first use and closed by ``close``."""

    def __init__(self, settings: Settings, options: LifecycleOptions | None = None) -> None:
        open_home(settings.home)
        self.settings = settings
        self.options = options or LifecycleOptions()
        self._hypervisor: LibvirtHypervisor | None = None

    def close(self) -> None:
        if self._hypervisor is not None:
            self._hypervisor.close()
            self._hypervisor = None
        if "volumes" in self.__dict__:
            self.volumes.close()  # the Ceph connection, kept open across operations
        if "catalog" in self.__dict__:
            self.catalog.close()

    # ---- adapters ----------------------------------------------------------------------------------------

    @cached_property
    def catalog(self) -> SqlCatalog:
        from freezeframe.adapters.catalog import SqlCatalog

        return SqlCatalog(self.settings.catalog_url)

    @cached_property
    def restores(self) -> RestoreLog:
        from freezeframe.adapters.restore_log import RestoreLog

        return RestoreLog(self.catalog)

    @cached_property
    def images(self) -> QemuImg:
        from freezeframe.adapters.qemu_img import QemuImg

        return QemuImg()

    @cached_property
    def repository(self) -> DirectoryRepository:
        from freezeframe.adapters.repository import DirectoryRepository

        return DirectoryRepository(self.settings.repository_dir, self.images)

    @cached_property
    def stores(self) -> Stores:
        """The store of each kind of member: ``file`` (a qcow2 in the repository), ``rbd`` (a Ceph snapshot)."""
        from freezeframe.adapters.rbd_members import RbdMembers
        from freezeframe.adapters.repository import FileMembers
        from freezeframe.ops.common import Stores

        files, rbd = FileMembers(self.images), RbdMembers(self.volumes)
        return Stores({files.kind: files, rbd.kind: rbd})

    @cached_property
    def volumes(self) -> RbdVolumes:
        """Ceph RBD volumes (``FREEZEFRAME_CEPH_*``); connects only when a set has RBD disks."""
        from freezeframe.adapters.rbd_volumes import RbdVolumes

        return RbdVolumes()

    @cached_property
    def journal(self) -> FileJournal:
        from freezeframe.adapters.journal import FileJournal

        return FileJournal(self.settings.journal_dir)

    @cached_property
    def locks(self) -> FileLocks:
        from freezeframe.adapters.locks import FileLocks

        return FileLocks(self.settings.locks_dir)

    @cached_property
    def host_fs(self) -> HostTools:
        from freezeframe.adapters.host_fs import HostTools

        return HostTools()

    @property
    def hypervisor(self) -> LibvirtHypervisor:
        """Connected on first use, so catalog-only commands work without libvirt."""
        if self._hypervisor is None:
            from freezeframe.adapters.libvirt_hypervisor import LibvirtHypervisor

            self._hypervisor = LibvirtHypervisor(self.settings.libvirt_uri, self.images, self.settings.agent_timeout_s)
        return self._hypervisor

    @cached_property
    def domains(self) -> LibvirtDomains:
        from freezeframe.adapters.libvirt_define import RbdAccess
        from freezeframe.adapters.libvirt_domains import LibvirtDomains

        def rbd() -> RbdAccess:
            s = self.volumes.settings
            return RbdAccess(self.volumes.mon_hosts(), s.user, s.secret_uuid)

        return LibvirtDomains(self.hypervisor.conn, self.settings.libvirt_uri, self.settings.agent_timeout_s, rbd)

    # ---- the snapshot flow ---------------------------------------------------------------------------------

    def flow(self) -> SnapshotFlow:
        hold = float(os.environ.get(FAULT_HOLD_ENV, "0"))
        return SnapshotFlow(
            self.hypervisor,
            self.catalog,
            self.repository,
            self.journal,
            self.locks,
            FlowSettings(freeze_cap_s=self.settings.freeze_cap_s, hold_in_window_s=hold),
            self.volumes,
            self.tracking,
        )

    @property
    def tracking(self) -> LibvirtCheckpoints:
        from freezeframe.adapters.libvirt_checkpoints import LibvirtCheckpoints

        return LibvirtCheckpoints(self.hypervisor.domain)

    def snapshot(self, request: SnapshotRequest, progress: ProgressCallback | None = None) -> SnapshotSet:
        """A set, waited for: what revert (its safety set) and backup take."""
        return self.flow().snapshot(request, progress)

    # ---- lifecycle operations --------------------------------------------------------------------------------

    @cached_property
    def holds(self) -> Holds:
        from freezeframe.ops.common import Holds

        return Holds(self.locks)

    @cached_property
    def markers(self) -> Markers:
        from freezeframe.ops.common import Markers

        return Markers(self.settings.home / "lifecycle")

    @property
    def instances_dir(self) -> Path:
        return self.settings.home / "instances"

    @property
    def verify_dir(self) -> Path:
        return self.settings.home / "verify"

    @cached_property
    def builder(self) -> InstanceBuilder:
        from freezeframe.ops.instances import InstanceBuilder

        return InstanceBuilder(lambda: self.domains, self.markers, self.restores, self.holds, self.stores)

    @cached_property
    def lifecycle(self) -> Lifecycle:
        from freezeframe.lifecycle import Lifecycle
        from freezeframe.ops.retention import Retention
        from freezeframe.ops.revert import Revert
        from freezeframe.ops.verify import Verify

        o = self.options
        restore = self.restore_over(self.catalog)
        revert = Revert(
            self.catalog, lambda: self.hypervisor, self.snapshot, self.stores, self.images, self.holds, self.markers
        )
        retention = Retention(
            self.catalog, self.repository, self.stores, self.images, lambda: self.domains, self.restores,
            lambda: self.hypervisor, self.snapshot, self.holds, (self.instances_dir, self.verify_dir),
            lambda: self.tracking,
        )  # fmt: skip
        verify = Verify(
            self.catalog, self.repository, self.stores, self.images, self.host_fs, lambda: self.hypervisor,
            lambda: self.domains, self.builder, self.holds, self.verify_dir, domain_type=o.domain_type,
            boot_timeout_s=o.boot_timeout_s, shutdown_timeout_s=o.shutdown_timeout_s,
        )  # fmt: skip
        return Lifecycle(restore, revert, retention, verify, self.builder, self.restores)

    def restore_over(self, catalog: Catalog) -> Restore:
        """Restore reading sets from ``catalog`` (the agent's view of a set whose members it transferred)."""
        from freezeframe.ops.restore import Restore

        return Restore(
            catalog, self.stores, self.images, lambda: self.domains, self.restores, self.builder, self.holds,
            self.instances_dir, domain_type=self.options.domain_type,
        )  # fmt: skip

    def portable(self, service: Freezeframe) -> Portable:
        return portable(service)

    # ---- off-site copies (issue 15) ----------------------------------------------------------------------------

    @cached_property
    def remotes(self) -> CatalogRemotes:
        from freezeframe.adapters.remote_registry import CatalogRemotes

        return CatalogRemotes(self.catalog)

    def open_remote(self, name: str) -> RemoteHandle:
        """A remote's S3 store (boto3) and, with a key file, its AES-GCM sealer."""
        from freezeframe.adapters.s3_remote import S3Store
        from freezeframe.adapters.sealing import AesGcmSealer
        from freezeframe.ops.copy import RemoteHandle

        spec = self.remotes.get(name)
        sealer = AesGcmSealer(Path(spec.key_file)) if spec.key_file else None
        return RemoteHandle(spec, S3Store(spec), sealer)

    @cached_property
    def offsite(self) -> Offsite:
        from freezeframe.adapters.rbd_diff_pack import RbdDiffPacker
        from freezeframe.adapters.remote_pack import QemuPacker
        from freezeframe.offsite import Offsite
        from freezeframe.ops.copy import Copier
        from freezeframe.ops.remote_delete import RemoteDeleter
        from freezeframe.ops.remote_fetch import RemoteSets

        packer = QemuPacker()
        staging = self.settings.home / "staging"
        changes = RbdDiffPacker(self.volumes)
        copier = Copier(self.catalog, self.stores, packer, self.remotes, self.open_remote, self.holds, staging, changes)
        fetcher = RemoteSets(
            self.catalog, self.repository, self.repository.member_path, packer, self.remotes, self.open_remote
        )
        deleter = RemoteDeleter(self.catalog, self.remotes, self.open_remote, fetcher.manifest)
        return Offsite(self.remotes, copier, fetcher, deleter, lambda: self.lifecycle)

    @cached_property
    def policies(self) -> Policies:
        """Policies over the catalog; a run snapshots through the flow, copies and prunes through ``offsite``."""
        from freezeframe.adapters.policy_store import CatalogPolicies
        from freezeframe.adapters.service_store import JobStore
        from freezeframe.ops.policies import GroupRuns, PolicyRun, RemoteCopies
        from freezeframe.scheduling import Policies

        def manifests(remote: str) -> list[dict[str, Any]]:
            handle = self.open_remote(remote)
            ids = [c.set_id for c in self.remotes.copies() if c.remote == remote]
            return [self.offsite.fetcher.manifest(handle, i) for i in ids]

        def run() -> PolicyRun:
            offsite, groups = self.offsite, self.group_ops
            remote = RemoteCopies(offsite.copy, manifests, offsite.delete_copy)
            group_sets = lambda name: [groups.show_set(g.id) for g in groups.list_sets(name)]  # noqa: E731
            group_runs = GroupRuns(groups.snapshot, group_sets, groups.delete_set)
            return PolicyRun(self.catalog, self.restores, self.snapshot, self.lifecycle.delete, remote, group_runs)

        return Policies(CatalogPolicies(self.catalog), JobStore(self.catalog), run)

    # ---- consistency groups (issue 14) -----------------------------------------------------------------------

    @cached_property
    def group_ops(self) -> GroupOps:
        from freezeframe.adapters.group_records import SqlGroups
        from freezeframe.group_flow import GroupFlow
        from freezeframe.ops.groups import GroupOps

        groups = SqlGroups(self.catalog)
        flow = lambda: GroupFlow(self.flow(), groups)  # noqa: E731 - built per operation, like flow()
        return GroupOps(groups, self.catalog, lambda: self.hypervisor, flow, lambda: self.lifecycle)


# ---- export / import / image store: the "port" helper's section (its construction replaces this body) --------


def portable(service: Freezeframe, *, boot_dirs: Sequence[Path] | None = None) -> Portable:
    """Export, the image store and import over the service's parts, each built on first use (listing images needs
    no libvirt connection); ``boot_dirs`` overrides ``FREEZEFRAME_BOOT_DIRS``."""
    from freezeframe.adapters.image_store import open_image_store
    from freezeframe.adapters.packages import OvaPackages
    from freezeframe.ops.export import Exporter
    from freezeframe.ops.images import StoredImages
    from freezeframe.ops.import_build import Importer
    from freezeframe.portable import Portable
    from freezeframe.volume_members import volume_images

    parts = service.parts
    packages = OvaPackages()
    opened: list[ImageStore] = []

    def image_store() -> ImageStore:
        """``FREEZEFRAME_IMAGE_STORE``, default ``$FREEZEFRAME_HOME/images``."""
        if not opened:
            opened.append(open_image_store(parts.settings.home, parts.catalog))
        return opened[0]

    def importer() -> Importer:
        return Importer(
            packages, image_store(), parts.images, parts.domains, parts.builder, parts.holds, parts.instances_dir,
            domain_type=parts.options.domain_type,
            boot_dirs=boot_dirs if boot_dirs is not None else boot_dirs_from_env(parts.settings.home),
            volume_images=lambda: volume_images(parts.stores.by_kind),
        )  # fmt: skip

    return Portable(
        lambda: Exporter(parts.catalog, parts.stores, packages, image_store(), parts.holds, parts.images),
        importer,
        lambda: StoredImages(image_store(), parts.holds),
        lambda: service.groups,
    )


def boot_dirs_from_env(home: Path) -> list[Path]:
    """Where an imported package may boot a kernel/initrd from: ``FREEZEFRAME_BOOT_DIRS`` (os.pathsep-separated),
    else the usual boot directories and the home."""
    from freezeframe.ops.import_checks import BOOT_DIRS_ENV, DEFAULT_BOOT_DIRS

    env = os.environ.get(BOOT_DIRS_ENV)
    listed = env.split(os.pathsep) if env else [*DEFAULT_BOOT_DIRS, str(home)]
    return [Path(p) for p in listed if p.strip()]


# ---- entry points -------------------------------------------------------------------------------------------


def build(settings: Settings, options: LifecycleOptions | None = None) -> Freezeframe:
    """The façade over a new set of objects for ``settings``; close it with ``close()``."""
    return Freezeframe(settings, Wiring(settings, options))


@contextlib.contextmanager
def open_service(settings: Settings | None = None, options: LifecycleOptions | None = None) -> Iterator[Freezeframe]:
    service = build(settings or Settings.from_env(), options)
    try:
        yield service
    finally:
        service.close()
