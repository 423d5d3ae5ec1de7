"""On-disk journal of in-flight operations: what a SIGKILLed process leaves for the next one to repair."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from freezeframe.ports import JournalEntry


class FileJournal:
    """One small JSON file per instance, replaced atomically and fsynced before each guest-visible step."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, instance_uuid: str) -> Path:
        return self.directory / f"{instance_uuid}.json"

    def record(self, entry: JournalEntry) -> None:
        path = self._path(entry.instance_uuid)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        data = json.dumps(dataclasses.asdict(entry)).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def clear(self, instance_uuid: str) -> None:
        self._path(instance_uuid).unlink(missing_ok=True)

    def pending(self) -> list[JournalEntry]:
        entries = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                entries.append(JournalEntry(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return entries
