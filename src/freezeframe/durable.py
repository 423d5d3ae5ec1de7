"""Small file primitives that survive a crash: fsync, atomic replace, streaming SHA-256."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 4 << 20
"""Read size for streaming work: large enough for throughput, small enough to bound memory."""


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Readers see the old content or the new, never a torn file, even across a power cut."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with path.open("rb") as handle:
        while n := handle.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()
