"""Changed-block tracking: the hypervisor's checkpoints (persistent dirty bitmaps in the disk images)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

from freezeframe.model import Instance


class ChangeTracking(Protocol):
    """Checkpoints named by freezeframe (``ff-<set id>``); a checkpoint is created by the capture itself
    (``CaptureTarget.checkpoint``), in the same transaction that fixes the set's point in time."""

    def untrusted(
        self, instance: Instance, checkpoint: str, created_at: datetime, targets: Sequence[str]
    ) -> Mapping[str, str]:
        """target -> why an incremental from ``checkpoint`` could miss writes, for each such target.

        A checkpoint libvirt lost while its bitmaps are intact is redefined from our records first; an empty
        answer means every target's bitmap has recorded every write since the checkpoint.
        """

    def checkpoints(self, instance: Instance) -> list[str]:
        """Names of freezeframe's checkpoints of the instance."""

    def remove(self, instance: Instance, checkpoint: str) -> None:
        """Delete the checkpoint and its bitmaps (idempotent)."""
