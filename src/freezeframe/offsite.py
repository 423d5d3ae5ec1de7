"""Off-site copies as the Python API: remotes, ``copy``, ``scan`` and ``restore --from``. A thin façade like
``lifecycle.py``; ``wiring.py`` builds it (``service.offsite``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from freezeframe.model import SnapshotSet
from freezeframe.ops.copy import Copier, CopyReport
from freezeframe.ops.remote_delete import DeleteOutcome, RemoteDeleter
from freezeframe.ops.remote_fetch import RemoteSets
from freezeframe.ops.remotes import remote_spec
from freezeframe.ports.remote import CopyRecord, PartCallback, RemoteRegistry, RemoteSpec

if TYPE_CHECKING:
    from freezeframe.lifecycle import Lifecycle
    from freezeframe.ops.restore import RestoreResult


class Offsite:
    def __init__(
        self,
        registry: RemoteRegistry,
        copier: Copier,
        fetcher: RemoteSets,
        deleter: RemoteDeleter,
        lifecycle: Callable[[], Lifecycle],
    ) -> None:
        self.registry = registry
        self.copier = copier
        self.fetcher = fetcher
        self.deleter = deleter
        self._lifecycle = lifecycle

    def add_remote(
        self, name: str, url: str, endpoint: str | None, region: str | None = None, key_file: str | None = None
    ) -> RemoteSpec:
        spec = remote_spec(name, url, endpoint, region, key_file)
        self.registry.add(spec)
        return self.registry.get(spec.name)

    def remotes(self) -> list[RemoteSpec]:
        return self.registry.all()

    def remote(self, name: str) -> RemoteSpec:
        return self.registry.get(name)

    def remove_remote(self, name: str) -> None:
        """Forgets the remote (and the catalog's records of copies there); the copies stay on the store."""
        self.registry.remove(name)

    def copies(self, set_ids: Sequence[str] | None = None) -> list[CopyRecord]:
        return self.registry.copies(set_ids)

    def copy(self, set_ref: str, remote: str, progress: PartCallback | None = None) -> CopyReport:
        return self.copier.copy(set_ref, remote, progress)

    def scan(self, remote: str) -> list[SnapshotSet]:
        return self.fetcher.scan(remote)

    def fetch(self, set_ref: str, remote: str, progress: PartCallback | None = None) -> SnapshotSet:
        return self.fetcher.fetch(set_ref, remote, progress)

    def delete_copy(self, set_ref: str, remote: str) -> DeleteOutcome:
        return self.deleter.delete(set_ref, remote)

    def restore(self, set_ref: str, remote: str, name: str, *, start: bool = False) -> RestoreResult:
        """Fetch the set (and the sets it builds on) into the repository, then restore it as usual."""
        fetched = self.fetch(set_ref, remote)
        return self._lifecycle().restore(fetched.id, name, start=start)
