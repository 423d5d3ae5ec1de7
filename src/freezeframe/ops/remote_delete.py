"""Deleting copies on a remote without breaking chains.

An incremental copy's object names its parent's object as backing file, so a parent must stay while any copy
building on it remains. Deleting such a parent only marks it (``sets/<id>/deleted``): scans skip it, its data stays,
and it goes with the last copy that needs it (the cascade in ``removable``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from freezeframe.errors import SetNotFound
from freezeframe.ops import remote_layout as layout
from freezeframe.ops.copy import RemoteHandle, check_marker
from freezeframe.ports import Catalog
from freezeframe.ports.remote import RemoteRegistry


def deleted_key(set_id: str) -> str:
    return f"{layout.set_prefix(set_id)}deleted"


def removable(parents: Mapping[str, Set[str]], deleted: Set[str]) -> list[str]:
    """The deleted sets no remaining set builds on, directly or through other kept sets (repeated until stable)."""
    alive = set(parents)
    gone: list[str] = []
    changed = True
    while changed:
        changed = False
        needed = {p for s in alive for p in parents.get(s, set())}
        for set_id in sorted(alive & set(deleted)):
            if set_id not in needed:
                alive.discard(set_id)
                gone.append(set_id)
                changed = True
    return gone


@dataclass
class DeleteOutcome:
    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"deleted": self.deleted, "kept": self.kept}


class RemoteDeleter:
    def __init__(
        self, catalog: Catalog, registry: RemoteRegistry, open_store: Callable[[str], RemoteHandle],
        manifest: Callable[[RemoteHandle, str], dict[str, Any]],
    ) -> None:  # fmt: skip
        self.catalog = catalog
        self.registry = registry
        self.open_store = open_store
        self.manifest = manifest

    def delete(self, set_ref: str, remote_name: str) -> DeleteOutcome:
        remote = self.open_store(remote_name)
        check_marker(remote)
        try:
            set_id = self.catalog.get_set(set_ref).id
        except SetNotFound:
            set_id = set_ref
        keys = remote.store.keys(layout.SETS)
        on_remote = layout.set_ids_in(keys, remote.sealed)
        if set_id not in on_remote:
            raise SetNotFound(f"set {set_ref} has no copy on remote {remote.spec.name}")
        remote.store.put_bytes(deleted_key(set_id), b"", {})
        deleted = {s for s in on_remote if deleted_key(s) in keys} | {set_id}
        parents = {s: self._parents(remote, s) for s in on_remote}
        outcome = DeleteOutcome()
        for gone in removable(parents, deleted):
            for key in remote.store.keys(layout.set_prefix(gone)):
                if key != deleted_key(gone):
                    remote.store.delete(key)
            remote.store.delete(deleted_key(gone))  # last: an interrupted delete is finished by the next one
            self.registry.forget_copy(gone, remote.spec.name)
            outcome.deleted.append(gone)
        outcome.kept = sorted(deleted - set(outcome.deleted))
        return outcome

    def _parents(self, remote: RemoteHandle, set_id: str) -> set[str]:
        members = layout.remote_members(self.manifest(remote, set_id), f"remote {remote.spec.name} set {set_id}")
        return {m.parent_set for m in members.values() if m.parent_set is not None}
