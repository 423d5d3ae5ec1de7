"""Per-instance exclusive locks: flock(2) files, released by the kernel even when the holder is SIGKILLed."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from freezeframe.errors import InstanceBusy


class FileLocks:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def hold(self, instance_uuid: str) -> Iterator[int]:
        path = self.directory / f"{instance_uuid}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise InstanceBusy(
                    f"another freezeframe operation on instance {instance_uuid} is in progress (pid {holder}); "
                    "wait for it to finish"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    @contextmanager
    def adopt(fd: int) -> Iterator[int]:
        """Keep holding a lock inherited from the parent process (flock belongs to the open file, not the pid)."""
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InstanceBusy("the inherited instance lock is held by another operation") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield fd
        finally:
            os.close(fd)
