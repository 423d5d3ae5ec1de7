"""Named holds over the instance locks: the set, name and image locks exports, imports and deletes take."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from freezeframe.errors import InstanceBusy
from freezeframe.ports import InstanceLocks


class NamedHolds:
    """``hold("set-ID", "set nightly")``: the lock of ``key``, refused with a message naming ``what``."""

    def __init__(self, locks: InstanceLocks) -> None:
        self.locks = locks

    @contextlib.contextmanager
    def hold(self, key: str, what: str) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.locks.hold(key))
            except InstanceBusy:
                raise InstanceBusy(
                    f"{what} is in use by another freezeframe operation; wait for it to finish"
                ) from None
            yield
