"""Where a set's copy lives on a remote, and the manifest that describes it (pure: keys and dicts).

Layout under the remote's prefix::

    freezeframe-remote.json            format version; with encryption, a sealed check value (a wrong key fails here)
    sets/<set id>/<target>.qcow2       a member: zstd-compressed qcow2; an incremental one names its parent as
                                       ../<parent set id>/<target>.qcow2 (download side by side: a working chain)
    sets/<set id>/set.json             the set's record (as ``show --json``) + ``remote``: each member's object, its
                                       SHA-256, its parent set; written last, so a set is on the remote iff it is here

With encryption each object's key ends in ``.sealed`` and holds the AES-GCM form of the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from freezeframe.errors import RemoteError

MARKER = "freezeframe-remote.json"
FORMAT_VERSION = 1
SETS = "sets/"
SEALED = ".sealed"
CHECK_VALUE = b"freezeframe remote key check"


def set_prefix(set_id: str) -> str:
    return f"{SETS}{set_id}/"


def manifest_key(set_id: str, sealed: bool) -> str:
    return f"{set_prefix(set_id)}set.json{SEALED if sealed else ''}"


def member_key(set_id: str, target: str, sealed: bool) -> str:
    return f"{set_prefix(set_id)}{target}.qcow2{SEALED if sealed else ''}"


def parent_name(parent_set: str, target: str) -> str:
    """The backing file an incremental member's object names: its parent's object, downloaded beside it."""
    return f"../{parent_set}/{target}.qcow2"


def set_ids_in(keys: list[str], sealed: bool) -> list[str]:
    """The sets whose manifest is on the remote (complete copies)."""
    tail = "/set.json" + (SEALED if sealed else "")
    return sorted(k[len(SETS) : -len(tail)] for k in keys if k.startswith(SETS) and k.endswith(tail))


@dataclass(frozen=True)
class RemoteMember:
    """One member's object: its key, the SHA-256 of its (unsealed) qcow2, and the set its layer builds on."""

    target: str
    key: str
    sha256: str
    size: int
    parent_set: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "sha256": self.sha256, "size": self.size, "parent_set": self.parent_set}


def remote_members(manifest: dict[str, Any], where: str) -> dict[str, RemoteMember]:
    """The ``remote.members`` section of a manifest read back from a remote (untrusted: every field checked)."""
    try:
        section = manifest["remote"]["members"]
        found = {}
        for target, entry in section.items():
            parent = entry.get("parent_set")
            found[str(target)] = RemoteMember(
                str(target), str(entry["key"]), str(entry["sha256"]), int(entry["size"]),
                None if parent is None else str(parent),
            )  # fmt: skip
        return found
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RemoteError(f"{where}: the manifest has no usable 'remote.members' section ({exc})") from exc
