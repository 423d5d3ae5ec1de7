"""Untrusted input, checked once at the edge: the CLI and the HTTP API call these same functions.

Names become libvirt names and directory names; metadata ends up in the catalog, in ``set.json`` and in OVF XML;
numbers steer the watchdog that keeps a guest from staying frozen. So each is held to a rule here, and every
violation is an ``InvalidRequest`` with one line that says what to type instead.
"""

from __future__ import annotations

import math
import re
import uuid as uuidlib
from collections.abc import Mapping

from freezeframe.errors import InvalidRequest

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
"""Instance, set, image names and backup types: a libvirt name and a directory name."""
PROJECT_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
META_KEY_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}"
RESERVED_META_PREFIX = "freezeframe."
MAX_META_ENTRIES = 32
MAX_META_VALUE = 1024

FREEZE_CAP_MIN_S = 0.1
FREEZE_CAP_MAX_S = 300.0
"""The watchdog can be tuned, never switched off: a cap outside this range is refused."""

_NAME = re.compile(NAME_PATTERN)
_PROJECT = re.compile(PROJECT_PATTERN)
_META_KEY = re.compile(META_KEY_PATTERN)
# XML 1.0 allows TAB, LF, CR and these ranges; everything else (NUL, other C0 controls, surrogates, U+FFFE/U+FFFF)
# cannot be written into an OVF descriptor. C1 controls and DEL are legal XML but reach terminals as escapes.
_NOT_XML_SAFE = re.compile("[^\t\n\r\u0020-\u007e\u00a0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _one_line(value: str, limit: int = 80) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def validate_name(value: str, what: str = "name") -> str:
    """1-63 letters, digits, '.', '_' or '-', starting with a letter or digit (no trailing newline)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidRequest(
            f"{what} {_one_line(str(value))} is not usable: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def validate_rbd_volume(value: str) -> str:
    """``rbd:POOL/IMAGE`` (a new RBD image named by the user) → ``POOL/IMAGE``; both parts are names, so nothing in
    them can reach qemu-img's ``:option=`` syntax or another pool's namespace."""
    text = str(value)
    pool, sep, image = text.removeprefix("rbd:").partition("/")
    if not text.startswith("rbd:") or not sep:
        raise InvalidRequest(f"{_one_line(text)} is not an RBD image: write rbd:POOL/IMAGE")
    return f"{validate_name(pool, 'RBD pool')}/{validate_name(image, 'RBD image')}"


IMPORT_STORAGES = ("file", "rbd")


def validate_import_storage(storage: str, pool: str | None) -> str | None:
    """``--storage file`` (qcow2 files in the instance's folder) or ``--storage rbd --pool P``: the RBD pool, or
    None for files."""
    if storage not in IMPORT_STORAGES:
        raise InvalidRequest(f"--storage {_one_line(str(storage))}: use one of {', '.join(IMPORT_STORAGES)}")
    if storage == "file":
        if pool is not None:
            raise InvalidRequest("--pool goes with --storage rbd")
        return None
    if not pool:
        raise InvalidRequest("--storage rbd needs --pool POOL (the Ceph pool the disks are created in)")
    return validate_name(pool, "RBD pool")


def validate_backup_type(value: str) -> str:
    return validate_name(value, "backup type")


def validate_project(value: str) -> str:
    if not isinstance(value, str) or not _PROJECT.fullmatch(value):
        raise InvalidRequest(
            f"project {_one_line(str(value))} is not usable: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def validate_uuid(value: str, what: str = "id") -> str:
    try:
        parsed = uuidlib.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise InvalidRequest(f"{what} {_one_line(str(value))} is not a UUID") from None
    if str(parsed) != value:
        raise InvalidRequest(f"{what} {_one_line(str(value))} is not a UUID in its canonical lower-case form")
    return value


def validate_text(value: str, what: str, limit: int = MAX_META_VALUE) -> str:
    """Free text a user typed (metadata values, descriptions): bounded and XML-safe, no control characters."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be text")
    if len(value) > limit:
        raise InvalidRequest(f"{what} is {len(value)} characters long; at most {limit} are allowed")
    bad = _NOT_XML_SAFE.search(value)
    if bad:
        raise InvalidRequest(
            f"{what} contains the control character U+{ord(bad.group()):04X}; only printable text, tab and newline "
            "are allowed"
        )
    return value


def validate_metadata(metadata: Mapping[str, str], *, allow_reserved: bool = False) -> dict[str, str]:
    """User metadata: bounded count, portable keys, XML-safe values; ``freezeframe.*`` keys are ours."""
    if len(metadata) > MAX_META_ENTRIES:
        raise InvalidRequest(f"{len(metadata)} metadata entries; at most {MAX_META_ENTRIES} are allowed")
    checked: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not _META_KEY.fullmatch(key):
            raise InvalidRequest(
                f"metadata key {_one_line(str(key))} is not usable: use 1-128 letters, digits, '.', '_', ':', '/' "
                "or '-', starting with a letter or digit"
            )
        if key.startswith(RESERVED_META_PREFIX) and not allow_reserved:
            raise InvalidRequest(f"metadata key {key!r}: keys starting with '{RESERVED_META_PREFIX}' are reserved")
        checked[key] = validate_text(value, f"metadata value of {key!r}")
    return checked


def parse_metadata_items(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as typed on a command line, validated like the API's metadata object."""
    metadata: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"--meta {_one_line(item)}: expected KEY=VALUE")
        metadata[key] = value
    return validate_metadata(metadata)


def validate_freeze_cap(value: float | str, source: str = "--freeze-cap") -> float:
    """The watchdog's cap in seconds: finite, within bounds. It can never be switched off."""
    try:
        cap = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{source} {_one_line(str(value))}: expected a number of seconds") from None
    if not math.isfinite(cap) or not FREEZE_CAP_MIN_S <= cap <= FREEZE_CAP_MAX_S:
        raise InvalidRequest(
            f"{source} {_one_line(str(value))}: the freeze cap must be between {FREEZE_CAP_MIN_S:g} and "
            f"{FREEZE_CAP_MAX_S:g} seconds (the watchdog cannot be switched off)"
        )
    return cap


def validate_int(value: int | str, source: str, minimum: int, maximum: int) -> int:
    """A whole number option or environment value within bounds."""
    try:
        number = int(str(value).strip(), 10)
    except ValueError:
        raise InvalidRequest(f"{source} {_one_line(str(value))}: expected a whole number") from None
    if not minimum <= number <= maximum:
        raise InvalidRequest(f"{source} {number}: must be between {minimum} and {maximum}")
    return number
