"""On-disk journal of in-flight operations: what a SIGKILLed process leaves for the next one to repair."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from freezeframe.durable import write_atomically
from freezeframe.ports import JournalEntry


class FileJournal:
    """One small JSON file per instance, replaced atomically and fsynced before each guest-visible step."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, instance_uuid: str) -> Path:
        return self.directory / f"{instance_uuid}.json"

    def record(self, entry: JournalEntry) -> None:
        write_atomically(self._path(entry.instance_uuid), json.dumps(dataclasses.asdict(entry)).encode())

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
