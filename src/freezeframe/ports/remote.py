"""Off-site copies: an object store (one bucket and prefix), the registry of remotes and copies, and the packer that
turns a member into the compressed image a remote keeps.

The copy, scan and fetch operations (``ops/copy.py``, ``ops/remote_fetch.py``) use only these; one adapter per
outside system implements them (boto3 for S3, qemu-img for packing, the catalog for the registry).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from freezeframe.model import Member
from freezeframe.ports.images import ImageRef

PartCallback = Callable[[int, int], None]
"""(bytes done, bytes total) of one transfer."""


@dataclass(frozen=True)
class RemoteSpec:
    """A named remote: where copies go. Credentials are never here: boto3's chain finds them (environment,
    ``~/.aws/credentials``, ``AWS_PROFILE``…); ``key_file`` names the encryption key's file, not the key."""

    name: str
    bucket: str
    prefix: str
    endpoint: str | None
    region: str | None
    key_file: str | None = None
    created_at: datetime | None = None

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def encrypted(self) -> bool:
        return self.key_file is not None


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    metadata: dict[str, str]


@dataclass(frozen=True)
class SentObject:
    """What one upload did: bytes actually sent (parts already there are not sent again) and the verified digest."""

    key: str
    size: int
    bytes_sent: int
    parts_reused: int
    sha256: str


class ObjectStore(Protocol):
    """One bucket and prefix of an S3-compatible store; keys are relative to the prefix.

    Errors: RemoteError (unreachable, refused, digest mismatch after upload or download).
    """

    def ensure_bucket(self) -> None: ...

    def head(self, key: str) -> StoredObject | None: ...

    def keys(self, under: str) -> list[str]: ...

    def put_bytes(self, key: str, data: bytes, metadata: dict[str, str]) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def upload(
        self, key: str, path: Path, metadata: dict[str, str], progress: PartCallback | None = None,
        sha256: str | None = None,
    ) -> SentObject:  # fmt: skip
        """Multipart, a bounded number of parts in memory; resumes an upload of the same file interrupted earlier
        (parts already on the store, checked by their MD5, are not sent again); verified after completion.
        ``sha256``: the file's SHA-256 if the caller computed it already (else the store reads the file for it)."""

    def download(self, key: str, path: Path, progress: PartCallback | None = None) -> None: ...

    def delete(self, key: str) -> None: ...


class Sealer(Protocol):
    """Client-side encryption, chunk by chunk (AES-GCM); ``label`` (the object's key) is authenticated with the
    data. Opening with a wrong key raises DecryptionFailed."""

    def seal(self, plain: Path, sealed: Path, label: str) -> None: ...

    def open(self, sealed: Path, plain: Path, label: str) -> None: ...

    def seal_bytes(self, data: bytes, label: str) -> bytes: ...

    def open_bytes(self, data: bytes, label: str) -> bytes: ...


class MemberPacker(Protocol):
    """Turns a member's image into the compressed qcow2 a remote keeps (zstd), readable by qemu-img after download."""

    def pack(self, source: ImageRef, dst: Path, over: ImageRef | None, backing_name: str | None) -> None:
        """With ``over`` (the parent member's image): only the clusters ``source``'s own layer holds, its backing
        file then named ``backing_name`` (relative: ``../<parent set>/<target>.qcow2``)."""

    def sha256(self, path: Path) -> str: ...


class ChangePacker(Protocol):
    """A backend-native member (an RBD snapshot) as the changes since an earlier snapshot of the same volume."""

    def pack_changes(self, member: Member, since: Member, dst: Path, backing_name: str) -> int:
        """A zstd qcow2 at ``dst`` holding what changed since ``since``, its backing file named ``backing_name``;
        returns the bytes of guest data written."""


@dataclass(frozen=True)
class CopyRecord:
    set_id: str
    remote: str
    copied_at: datetime
    bytes_sent: int
    stored_bytes: int


class RemoteRegistry(Protocol):
    """Remotes and the copies each set has (in the catalog)."""

    def add(self, spec: RemoteSpec) -> None: ...

    def get(self, name: str) -> RemoteSpec: ...

    def all(self) -> list[RemoteSpec]: ...

    def remove(self, name: str) -> None: ...

    def record_copy(self, record: CopyRecord) -> None: ...

    def forget_copy(self, set_id: str, remote: str) -> None: ...

    def copies(self, set_ids: Sequence[str] | None = None) -> list[CopyRecord]: ...


StoreFactory = Callable[[RemoteSpec], ObjectStore]
SealerFactory = Callable[[RemoteSpec], Sealer | None]
