"""The ``InstanceFolders`` port: ``$FREEZEFRAME_HOME/instances/NAME/`` plus the ``restore`` marker repair reads.

The marker (``$FREEZEFRAME_HOME/lifecycle/restore-NAME.json``) is written before the folder gets any data and
learns the domain's UUID once it is defined, so that after a SIGKILL ``freezeframe repair`` removes exactly the
half-made instance (the same markers restores write; lifecycle's repair handles both).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from freezeframe.durable import write_atomically
from freezeframe.errors import InvalidRequest

FOLDER_MODE = 0o700


class DirectoryInstanceFolders:
    def __init__(self, instances_dir: Path, markers_dir: Path) -> None:
        self.instances_dir = instances_dir
        self.markers_dir = markers_dir

    def free_bytes(self) -> int:
        self.instances_dir.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
        return shutil.disk_usage(self.instances_dir).free

    def claim(self, name: str) -> Path:
        directory = self.instances_dir / name
        directory.parent.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
        try:
            directory.mkdir(mode=FOLDER_MODE)
        except FileExistsError:
            raise InvalidRequest(
                f"{directory} already exists (left by an earlier instance named {name}?); "
                "remove it or choose another name"
            ) from None
        self._mark(name, None)
        return directory

    def bind(self, name: str, uuid: str) -> None:
        self._mark(name, uuid)

    def release(self, name: str) -> None:
        self._marker(name).unlink(missing_ok=True)

    def discard(self, name: str) -> None:
        shutil.rmtree(self.instances_dir / name, ignore_errors=True)
        self._marker(name).unlink(missing_ok=True)

    def _marker(self, name: str) -> Path:
        return self.markers_dir / f"restore-{name}.json"

    def _mark(self, name: str, uuid: str | None) -> None:
        self.markers_dir.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
        data = {
            "kind": "restore",
            "pid": os.getpid(),
            "name": name,
            "dir": str(self.instances_dir / name),
            "uuid": uuid,
        }
        write_atomically(self._marker(name), json.dumps(data).encode())
