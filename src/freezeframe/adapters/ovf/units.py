"""Numbers in a descriptor: integers and allocation units, checked before they are believed."""

from __future__ import annotations

import re
from collections.abc import Mapping

from freezeframe.errors import OvfInvalidValue

_NAMED_UNITS: Mapping[str, int] = {
    "byte": 1,
    "bytes": 1,
    "b": 1,
    "kilobyte": 2**10,
    "kilobytes": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "megabyte": 2**20,
    "megabytes": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "gigabyte": 2**30,
    "gigabytes": 2**30,
    "gb": 2**30,
    "gib": 2**30,
    "terabyte": 2**40,
    "terabytes": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}
_FACTOR = re.compile(r"^(\d{1,4})(?:\^(\d{1,3}))?$")


def parse_byte_units(units: str | None, default: int = 1) -> int:
    """Bytes per unit for a DSP0004 programmatic unit ("byte * 2^20") or a legacy name ("MegaBytes").

    Legacy names (KB/MB/GB, KiloBytes, MegaBytes...) are binary: VirtualBox and oVirt write
    "MegaBytes" for MiB of RAM, and nobody sizes a VM in decimal megabytes.
    """
    if units is None or not units.strip():
        return default
    text = re.sub(r"\s+", "", units).lower()
    if text in _NAMED_UNITS:
        return _NAMED_UNITS[text]
    parts = text.split("*")
    if parts[0] not in ("byte", "bytes"):
        raise OvfInvalidValue(f"allocation units {units!r} are not a byte unit")
    multiplier = 1
    for part in parts[1:]:
        match = _FACTOR.match(part)
        if match is None:
            raise OvfInvalidValue(f"cannot understand allocation units {units!r}")
        base = int(match.group(1))
        exponent = int(match.group(2)) if match.group(2) is not None else 1
        if base not in (2, 10) and match.group(2) is not None:
            raise OvfInvalidValue(f"allocation units {units!r}: only powers of 2 and 10 are accepted")
        if exponent > 60:
            raise OvfInvalidValue(f"allocation units {units!r} are absurdly large")
        multiplier *= base**exponent
        if multiplier > 2**60:
            raise OvfInvalidValue(f"allocation units {units!r} are absurdly large")
    return multiplier


def parse_count(value: str | None, what: str) -> int:
    """A non-negative integer of at most 20 digits; ``what`` names it in the error."""
    if value is None:
        raise OvfInvalidValue(f"{what} is missing")
    text = value.strip()
    if not re.fullmatch(r"[+]?\d{1,20}", text):
        raise OvfInvalidValue(f"{what} {value!r} is not a non-negative integer")
    return int(text)
