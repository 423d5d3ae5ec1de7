"""The image store: exported OVA packages kept under an id, their records in the catalog.

The proposal's "image service". A store keeps whole packages (blobs) and answers for them by id; the
records (name, source set, size, SHA-256 of the package, descriptor summary) live in the catalog's
``stored_images`` table whatever the backend, so ``images list`` needs no I/O on the blobs. The
``ImageStore`` Protocol is what the operations use: put a package (a file), get it back (as
a stream, or as a seekable local file, which import needs since qemu-img reads disks in place inside the
tar), list, find, delete, repair. ``DirectoryImageStore`` is the local backend:
``<root>/<image-id>/<file>.ova`` plus ``image.json`` (the record, so a store directory can be understood
without the catalog). An S3-compatible backend would implement the same Protocol over ``ImageRecords``
(multipart upload in ``put_file``, a ranged GET in ``get_stream``, a download to a temp file in
``local_file``). See docs/ovf.md, "Image store".
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlparse

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.image_records import (
    AVAILABLE,
    DELETING,
    STORE_ENV,
    ImageDisk,
    ImageNic,
    ImageRecords,
    ImageSummary,
    NewImage,
    StoredImage,
)
from freezeframe.durable import fsync_path, sha256_file
from freezeframe.errors import (
    FreezeframeError,
    ImageNotFound,
    ImageStoreError,
    InsufficientSpace,
    InvalidRequest,
)
from freezeframe.ports import ImageStore

RECORD_FILE = "image.json"
CHUNK = 4 * 2**20
ORPHAN_AGE_S = 600.0
"""A store folder without a catalog row is removed by repair only when older than this (a put may be
between its rename and its row insert)."""

_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}\.ova$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_PUT_DIR = re.compile(r"^\.put-([0-9a-f-]{36})-(\d+)$")
_STAGING_DIR = re.compile(r"^[0-9a-f]{12}-(\d+)$")


# ---- the port -----------------------------------------------------------------------------------------------


def check_filename(filename: str) -> None:
    if not _FILENAME.match(filename) or ".." in filename:
        raise InvalidRequest(
            f"package file name {filename!r} must be 1-100 letters, digits, '.', '_' or '-' ending in .ova"
        )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copy_sparse(source: IO[bytes], out: IO[bytes]) -> tuple[int, str]:
    """Copy with SHA-256 on the way; all-zero 4 MiB chunks become holes, so sparse packages stay small."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    zero = bytes(CHUNK)
    total = 0
    readinto = getattr(source, "readinto", None)
    while True:
        n = readinto(view) if readinto is not None else _read_into(source, view)
        if not n:
            break
        chunk = view[:n]
        digest.update(chunk)
        if n == CHUNK and chunk == zero:
            out.seek(n, os.SEEK_CUR)
        else:
            out.write(chunk)
        total += n
    out.truncate(total)
    return total, digest.hexdigest()


def _read_into(source: IO[bytes], view: memoryview) -> int:
    data = source.read(len(view))
    view[: len(data)] = data
    return len(data)


def _storage_error(what: str, exc: OSError) -> FreezeframeError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpace(f"{what}: no space left ({exc.strerror}); free space in the image store and retry")
    return ImageStoreError(f"{what}: {exc}")


class DirectoryImageStore:
    """``<root>/<image-id>/<file>.ova`` + ``image.json``; staging and half-written folders are dot-folders."""

    def __init__(self, root: Path, catalog: SqlCatalog) -> None:
        self.root = root.absolute()
        self.uri = self.root.as_uri()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImageStoreError(
                f"cannot create the image store {self.root}: {exc}; set {STORE_ENV} to a writable directory"
            ) from exc
        self.records = ImageRecords(catalog, self.uri)

    # -- writing ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self, filename: str) -> Iterator[Path]:
        check_filename(filename)
        directory = self.root / ".staging" / f"{uuidlib.uuid4().hex[:12]}-{os.getpid()}"
        directory.mkdir(parents=True)
        try:
            yield directory / filename
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def put_file(self, path: Path, new: NewImage) -> StoredImage:
        check_filename(new.filename)
        if not path.is_file():
            raise ImageStoreError(f"{path} is not a file; nothing was stored")
        staged = self.root / ".staging" in path.absolute().parents

        def fill(dst: Path) -> tuple[int, str]:
            if staged:
                path.rename(dst)  # same filesystem: no copy
                return dst.stat().st_size, sha256_file(dst)
            with path.open("rb") as source, dst.open("xb") as out:
                result = _copy_sparse(source, out)
                out.flush()
                os.fsync(out.fileno())
            return result

        return self._put(new, fill)

    def _put(self, new: NewImage, fill: Callable[[Path], tuple[int, str]]) -> StoredImage:
        """Fill a dot-folder, write image.json, rename it to the id, then add the row; undo on any failure."""
        image_id = str(uuidlib.uuid4())
        work = self.root / f".put-{image_id}-{os.getpid()}"
        final = self.root / image_id
        renamed = False
        try:
            work.mkdir()
            size, sha256 = fill(work / new.filename)
            image = StoredImage(
                id=image_id,
                name=new.name,
                filename=new.filename,
                store=self.uri,
                size=size,
                sha256=sha256,
                created_at=datetime.now(UTC),
                summary=new.summary,
                source_set_id=new.source_set_id,
                location=str(final / new.filename),
            )
            record = work / RECORD_FILE
            record.write_text(json.dumps(image.to_dict(), indent=2, sort_keys=True))
            fsync_path(record)
            fsync_path(work / new.filename)
            fsync_path(work)
            work.rename(final)
            renamed = True
            fsync_path(self.root)
            self.records.add(image)
        except OSError as exc:
            shutil.rmtree(final if renamed else work, ignore_errors=True)
            raise _storage_error(f"storing image {new.name!r} in {self.root}", exc) from exc
        except BaseException:
            shutil.rmtree(final if renamed else work, ignore_errors=True)
            raise
        return image

    # -- reading ------------------------------------------------------------------------------------------

    def _with_location(self, image: StoredImage) -> StoredImage:
        return StoredImage(**{**vars(image), "location": str(self.root / image.id / image.filename)})

    def find(self, ref: str) -> StoredImage:
        return self._with_location(self.records.find(ref))

    def list_images(self) -> list[StoredImage]:
        return [self._with_location(i) for i in self.records.all(status=AVAILABLE)]

    def _package_path(self, image_id: str) -> Path:
        image = self.records.find(image_id)
        if image.status != AVAILABLE:
            raise InvalidRequest(f"image {image.id} ({image.name}) is {image.status}; it cannot be read")
        path = self.root / image.id / image.filename
        if not path.is_file():
            raise ImageStoreError(
                f"image {image.id} ({image.name}) has no data at {path}; delete it with "
                f"`freezeframe images delete {image.id}`"
            )
        return path

    @contextlib.contextmanager
    def get_stream(self, image_id: str) -> Iterator[IO[bytes]]:
        with self._package_path(image_id).open("rb") as stream:
            yield stream

    @contextlib.contextmanager
    def local_file(self, image_id: str) -> Iterator[Path]:
        yield self._package_path(image_id)

    # -- deleting and repair ------------------------------------------------------------------------------

    def delete(self, image_id: str) -> StoredImage:
        image = self.find(image_id)
        if image.status != DELETING:
            self.records.mark(image.id, DELETING)
        self._remove_data(image.id)
        self.records.remove(image.id)
        return image

    def _remove_data(self, image_id: str) -> None:
        folder = self.root / image_id
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ImageStoreError(
                f"could not remove {folder} ({exc}); image {image_id} stays 'deleting' until a later delete or "
                "`freezeframe repair` removes it"
            ) from exc

    def repair(self) -> list[str]:
        reports: list[str] = []
        for image in self.records.all(status=DELETING):
            self._remove_data(image.id)
            self.records.remove(image.id)
            reports.append(f"image {image.id} ({image.name}): finished an interrupted delete")
        staging = self.root / ".staging"
        for folder in sorted(staging.iterdir()) if staging.is_dir() else []:
            match = _STAGING_DIR.match(folder.name)
            if match and not _pid_alive(int(match.group(1))):
                shutil.rmtree(folder, ignore_errors=True)
                reports.append(f"removed {folder}, left by an interrupted export")
        known = self.records.ids()
        now = time.time()
        for folder in sorted(self.root.iterdir()):
            match = _PUT_DIR.match(folder.name)
            if match and not _pid_alive(int(match.group(2))):
                shutil.rmtree(folder, ignore_errors=True)
                reports.append(f"removed {folder}, a package an interrupted store left half-written")
            elif (
                _UUID.match(folder.name)
                and folder.is_dir()
                and folder.name not in known
                and now - folder.stat().st_mtime > ORPHAN_AGE_S
            ):
                shutil.rmtree(folder, ignore_errors=True)
                reports.append(f"removed {folder}: a stored package without a catalog record")
        for image in self.records.all(status=AVAILABLE):
            if not (self.root / image.id / image.filename).is_file():
                reports.append(
                    f"image {image.id} ({image.name}) has no data in {self.root}; "
                    f"`freezeframe images delete {image.id}` forgets it"
                )
        return reports


def open_image_store(home: Path, catalog: SqlCatalog, spec: str | None = None) -> ImageStore:
    """The store ``FREEZEFRAME_IMAGE_STORE`` names: a directory path or ``file://`` URL; default ``home/images``."""
    spec = spec if spec is not None else os.environ.get(STORE_ENV, "")
    if not spec.strip():
        return DirectoryImageStore(home / "images", catalog)
    parsed = urlparse(spec)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidRequest(f"{STORE_ENV}={spec!r}: file URLs must name a local path (file:///path)")
        return DirectoryImageStore(Path(unquote(parsed.path)), catalog)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise InvalidRequest(
            f"{STORE_ENV}={spec!r}: store kind {parsed.scheme!r} is not available yet; use a directory path "
            "or a file:// URL"
        )
    return DirectoryImageStore(Path(spec), catalog)


__all__ = [
    "AVAILABLE",
    "DELETING",
    "STORE_ENV",
    "DirectoryImageStore",
    "ImageDisk",
    "ImageNic",
    "ImageNotFound",
    "ImageRecords",
    "ImageStore",
    "ImageStoreError",
    "ImageSummary",
    "NewImage",
    "StoredImage",
    "check_filename",
    "open_image_store",
]
