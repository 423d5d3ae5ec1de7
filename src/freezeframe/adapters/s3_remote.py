"""The ObjectStore port over boto3 (any S3-compatible store; tested against Ceph's radosgw).

Uploads are multipart, read part by part from the file and sent 4 at a time (so at most 4 parts, 64 MiB, are in
memory whatever the object's size), each part sent with its Content-MD5
so the store rejects a damaged part. The upload id and part size are kept in a sidecar file next to the staged file
(``<file>.upload.json``): a process killed mid-upload leaves it, and the next upload of the same file lists the
parts already there, checks each one's MD5 against the local bytes and sends only the others. After completion the
object's ETag is compared with the multipart ETag computed locally (MD5 of the parts' MD5s); the SHA-256 of the
whole file, read once before the upload, is kept in the object's metadata and returned for the manifest.
Downloads stream to a file and check the SHA-256 recorded in the object's metadata.

Credentials come from boto3's own chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
``~/.aws/credentials``…); nothing here stores them.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from freezeframe.durable import sha256_file
from freezeframe.errors import RemoteError
from freezeframe.ports.remote import PartCallback, RemoteSpec, SentObject, StoredObject

MIN_PART = 16 * 1024 * 1024
PARALLEL_PARTS = 4
"""Parts sent at once (boto3's client is thread-safe); memory holds at most this many parts."""
MAX_PARTS = 9000
SHA_KEY = "ff-sha256"
"""Object metadata (``x-amz-meta-ff-sha256``): SHA-256 of the object's bytes, checked after every download."""
_READ = 1024 * 1024


def part_size_for(size: int) -> int:
    """16 MiB parts, larger for objects over ~140 GiB so no upload needs more than MAX_PARTS parts."""
    size_mib = -(-size // MAX_PARTS)
    return max(MIN_PART, -(-size_mib // _READ) * _READ)


@contextmanager
def _errors(action: str) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise RemoteError(f"{action}: {error.get('Code', '?')} {error.get('Message', '')}".strip()) from exc
    except BotoCoreError as exc:
        raise RemoteError(f"{action}: {exc}") from exc


def _not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    return str(exc.response.get("Error", {}).get("Code")) in {"404", "NoSuchKey", "NoSuchUpload", "NotFound"}


class S3Store:
    """One remote's bucket and prefix."""

    def __init__(self, spec: RemoteSpec) -> None:
        import boto3
        from botocore.config import Config

        self.spec = spec
        config = Config(
            # boto3 >= 1.36 adds CRC checksums by default, which older S3-compatible stores reject; MD5 is enough.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        )
        with _errors(f"remote {spec.name}"):
            self.client: Any = boto3.client("s3", endpoint_url=spec.endpoint, region_name=spec.region or "us-east-1",
                                            config=config)  # fmt: skip

    def _key(self, key: str) -> str:
        return f"{self.spec.prefix.rstrip('/')}/{key}" if self.spec.prefix else key

    def _where(self, key: str) -> str:
        return f"{self.spec.url.rstrip('/')}/{key}"

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        with _errors(f"remote {self.spec.name}: bucket {self.spec.bucket}"):
            try:
                self.client.head_bucket(Bucket=self.spec.bucket)
            except ClientError as exc:
                if not _not_found(exc):
                    raise
                self.client.create_bucket(Bucket=self.spec.bucket)

    def head(self, key: str) -> StoredObject | None:
        from botocore.exceptions import ClientError

        with _errors(f"reading {self._where(key)}"):
            try:
                found = self.client.head_object(Bucket=self.spec.bucket, Key=self._key(key))
            except ClientError as exc:
                if _not_found(exc):
                    return None
                raise
        return StoredObject(key, int(found["ContentLength"]), dict(found.get("Metadata", {})))

    def keys(self, under: str) -> list[str]:
        found: list[str] = []
        strip = len(self._key(""))
        with _errors(f"listing {self._where(under)}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.spec.bucket,
                                                                          Prefix=self._key(under))  # fmt: skip
            for page in pages:
                found += [str(item["Key"])[strip:] for item in page.get("Contents", [])]
        return found

    def put_bytes(self, key: str, data: bytes, metadata: dict[str, str]) -> None:
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        meta = {**metadata, SHA_KEY: hashlib.sha256(data).hexdigest()}
        with _errors(f"writing {self._where(key)}"):
            self.client.put_object(Bucket=self.spec.bucket, Key=self._key(key), Body=data, ContentMD5=md5,
                                   Metadata=meta)  # fmt: skip

    def get_bytes(self, key: str) -> bytes:
        with _errors(f"reading {self._where(key)}"):
            found = self.client.get_object(Bucket=self.spec.bucket, Key=self._key(key))
            data: bytes = found["Body"].read()
        expected = found.get("Metadata", {}).get(SHA_KEY)
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise RemoteError(f"{self._where(key)} does not match its recorded SHA-256: the copy is damaged")
        return data

    def delete(self, key: str) -> None:
        with _errors(f"deleting {self._where(key)}"):
            self.client.delete_object(Bucket=self.spec.bucket, Key=self._key(key))

    # ---- multipart upload -----------------------------------------------------------------------------------

    def upload(
        self, key: str, path: Path, metadata: dict[str, str], progress: PartCallback | None = None,
        sha256: str | None = None,
    ) -> SentObject:  # fmt: skip
        size = path.stat().st_size
        part_size = part_size_for(size)
        sha = sha256 or sha256_file(path)
        sidecar = path.with_name(path.name + ".upload.json")
        state = {"key": key, "size": size, "part": part_size, "sha256": sha}
        with _errors(f"uploading {self._where(key)}"):
            upload_id, there = self._resume(sidecar, state)
            if upload_id is None:
                created = self.client.create_multipart_upload(Bucket=self.spec.bucket, Key=self._key(key),
                                                              Metadata={**metadata, SHA_KEY: sha})  # fmt: skip
                upload_id = str(created["UploadId"])
                sidecar.write_text(json.dumps({**state, "upload_id": upload_id}))
            sent, reused, parts, md5s = self._send_parts(key, path, upload_id, part_size, there, progress)
            self.client.complete_multipart_upload(Bucket=self.spec.bucket, Key=self._key(key), UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})  # fmt: skip
            self._check_etag(key, md5s, len(parts))
        sidecar.unlink(missing_ok=True)
        return SentObject(key, size, sent, reused, sha)

    def _resume(self, sidecar: Path, state: dict[str, Any]) -> tuple[str | None, dict[int, str]]:
        """The upload a killed run left for this very file (same key, size, part size and SHA-256), and the ETags
        of its parts already on the store."""
        from botocore.exceptions import ClientError

        try:
            left = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            return None, {}
        if any(left.get(k) != v for k, v in state.items()) or "upload_id" not in left:
            return None, {}
        upload_id, key = str(left["upload_id"]), str(state["key"])
        there: dict[int, str] = {}
        try:
            pages = self.client.get_paginator("list_parts").paginate(Bucket=self.spec.bucket, Key=self._key(key),
                                                                     UploadId=upload_id)  # fmt: skip
            for page in pages:
                there.update({int(p["PartNumber"]): str(p["ETag"]).strip('"') for p in page.get("Parts", [])})
        except ClientError as exc:
            if _not_found(exc):
                return None, {}
            raise
        return upload_id, there

    def _send_parts(
        self, key: str, path: Path, upload_id: str, part_size: int, there: dict[int, str], progress: PartCallback | None
    ) -> tuple[int, int, list[dict[str, Any]], bytes]:
        """Send the parts not already there; returns bytes sent, parts reused, the part list and their MD5s.

        Each part's MD5 is computed by the thread that sends it (hashlib releases the GIL), so hashing overlaps
        the other parts' network time instead of stalling the reading loop; only a resumed upload hashes a part
        here first, to tell whether the store holds it already."""
        digests: dict[int, bytes] = {}
        sent = reused = done = 0
        total = path.stat().st_size
        in_flight: deque[tuple[int, int, Future[bytes]]] = deque()

        def settle(limit: int) -> None:
            nonlocal sent, done
            while len(in_flight) > limit:
                number, size, future = in_flight.popleft()
                digests[number] = future.result()
                sent += size
                done += size
                if progress is not None:
                    progress(done, total)

        with path.open("rb") as source, ThreadPoolExecutor(PARALLEL_PARTS, thread_name_prefix="ff-s3-part") as pool:
            number = 1
            while chunk := source.read(part_size):
                known = hashlib.md5(chunk).digest() if number in there else None
                if known is not None and there[number] == known.hex():
                    digests[number] = known
                    reused += 1
                    done += len(chunk)
                else:
                    settle(PARALLEL_PARTS - 1)  # at most PARALLEL_PARTS parts in memory
                    future = pool.submit(self._send_part, key, upload_id, number, chunk, known)
                    in_flight.append((number, len(chunk), future))
                number += 1
            settle(0)
        if not digests:  # an empty file still needs one (empty) part
            self.client.upload_part(Bucket=self.spec.bucket, Key=self._key(key), UploadId=upload_id, PartNumber=1,
                                    Body=b"")  # fmt: skip
            digests[1] = hashlib.md5(b"").digest()
        order = sorted(digests)
        parts = [{"PartNumber": n, "ETag": digests[n].hex()} for n in order]
        return sent, reused, parts, b"".join(digests[n] for n in order)

    def _send_part(self, key: str, upload_id: str, number: int, chunk: bytes, digest: bytes | None) -> bytes:
        """One part with its Content-MD5 (the store checks it); returns the MD5, which its ETag must equal."""
        md5 = digest if digest is not None else hashlib.md5(chunk).digest()
        answer = self.client.upload_part(
            Bucket=self.spec.bucket, Key=self._key(key), UploadId=upload_id, PartNumber=number, Body=chunk,
            ContentMD5=base64.b64encode(md5).decode(),
        )  # fmt: skip
        if str(answer["ETag"]).strip('"') != md5.hex():
            raise RemoteError(f"{self._where(key)}: the store's ETag of part {number} is not its MD5")
        return md5

    def _check_etag(self, key: str, md5s: bytes, count: int) -> None:
        """The multipart ETag is MD5(concatenated part MD5s)-N: computed here from the local bytes."""
        expected = f"{hashlib.md5(md5s).hexdigest()}-{count}"
        found = self.client.head_object(Bucket=self.spec.bucket, Key=self._key(key))
        if str(found["ETag"]).strip('"') != expected:
            raise RemoteError(f"{self._where(key)}: digest after upload {found['ETag']} is not {expected}")

    # ---- download ----------------------------------------------------------------------------------------------

    def download(self, key: str, path: Path, progress: PartCallback | None = None) -> None:
        whole = hashlib.sha256()
        with _errors(f"downloading {self._where(key)}"):
            found = self.client.get_object(Bucket=self.spec.bucket, Key=self._key(key))
            total, done = int(found["ContentLength"]), 0
            with path.open("wb") as sink:
                for chunk in found["Body"].iter_chunks(_READ):
                    sink.write(chunk)
                    whole.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        expected = found.get("Metadata", {}).get(SHA_KEY)
        if expected is not None and whole.hexdigest() != expected:
            path.unlink(missing_ok=True)
            raise RemoteError(f"{self._where(key)} does not match its recorded SHA-256: the copy is damaged")
