"""Running qemu-img for the OVA writer and reader: argument lists, a timeout, one-line errors."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from freezeframe.errors import OvaError

QEMU_TIMEOUT = 600.0
NOT_INSTALLED = "qemu-img is not installed (package qemu-utils)"


def run_qemu_img(args: Sequence[str], timeout: float = QEMU_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``qemu-img ARGS``; every image it opens must be pinned by the caller (``-f`` or a ``json:`` driver)."""
    try:
        return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise OvaError(NOT_INSTALLED) from exc


def stderr_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The last lines of qemu-img's complaint, joined on one line."""
    lines = [line.strip() for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
    return "; ".join(lines[-3:]) or f"exit status {proc.returncode}"
