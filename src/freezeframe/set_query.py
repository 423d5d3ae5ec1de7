"""What a listing of snapshot sets asks the catalog for: filters, a keyset cursor, one page.

Listings are filtered and paged by the catalog's database, never in Python: a catalog holds a million sets. Pages
are keyset pages: newest first by ``(created_at, id)``, and the cursor is the last row's key, so page 1000 costs
what page 1 costs and a set added meanwhile neither repeats nor skips a row. No SQL here: the catalog adapter
turns a ``SetFilter`` into indexed conditions.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from freezeframe.errors import InvalidRequest
from freezeframe.model import SetStatus, SnapshotSet

PROJECT_KEY = "freezeframe.project"
"""Set metadata pinning a set to the project it was taken under (the API writes it)."""
GROUP_KEY = "freezeframe.group"
"""Set metadata naming the consistency group a set was taken with."""
KINDS = ("full", "incremental")
"""A set is ``incremental`` when any member copies only what changed since a parent, else ``full``."""
MAX_PAGE = 1000


@dataclass(frozen=True)
class SetFilter:
    """Every filter combines with AND; None (or empty) means "any"."""

    instance: str | None = None
    """An instance name or UUID."""
    status: SetStatus | None = None
    backup_type: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    """Every KEY=VALUE must match."""
    project: str | None = None
    """Sets pinned to this project, plus the unpinned sets of ``project_instances``."""
    project_instances: tuple[str, ...] = ()
    """UUIDs of the instances now in ``project``: their sets with no pinned project belong to it too."""
    group: str | None = None
    kind: str | None = None
    host: str | None = None
    since: datetime | None = None
    """Created at or after."""
    until: datetime | None = None
    """Created before."""

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value: datetime | None = getattr(self, name)
            if value is not None and value.utcoffset() is None:
                raise InvalidRequest(f"--{name} {value.isoformat()} has no time zone; add one, e.g. Z or +00:00")
        if self.kind is not None and self.kind not in KINDS:
            raise InvalidRequest(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class Cursor:
    """The key of the last row of a page: the next page starts strictly after it."""

    created_at: datetime
    set_id: str

    def encode(self) -> str:
        raw = f"{self.created_at.astimezone(UTC).isoformat()}|{self.set_id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        """Untrusted (a URL parameter, a CLI option): anything but a cursor this module made is InvalidRequest."""
        bad = InvalidRequest(f"cursor {token[:40]!r} is not one a listing returned; start again without it")
        if len(token) > 200:
            raise bad
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            stamp, sep, set_id = raw.partition("|")
            created_at = datetime.fromisoformat(stamp)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise bad from None
        if not sep or not set_id or len(set_id) > 36 or created_at.utcoffset() is None:
            raise bad
        return cls(created_at, set_id)

    @classmethod
    def after(cls, snapshot_set: SnapshotSet) -> Cursor:
        return cls(snapshot_set.created_at, snapshot_set.id)


@dataclass(frozen=True)
class SetPage:
    sets: list[SnapshotSet]
    next_cursor: str | None
    """None on the last page."""


_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


def parse_time(value: str, what: str, now: datetime | None = None) -> datetime:
    """``--since``/``--until``: ISO 8601 (a date, or a time; UTC when it names no zone) or an age such as ``90m``,
    ``36h``, ``7d``, ``2w`` (that long before now)."""
    raw = value.strip()
    unit = _UNITS.get(raw[-1:].lower())
    if unit is not None and raw[:-1].isdigit() and len(raw) <= 10:
        return (now or datetime.now(UTC)) - int(raw[:-1]) * unit
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidRequest(
            f"{what} {value[:40]!r} is not a time: use ISO 8601 (2026-11-30, 2026-11-30T08:00:00+01:00) or an age "
            "(90m, 36h, 7d, 2w)"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.utcoffset() is None else parsed


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit {limit} is out of range: use 1 to {MAX_PAGE} (or --all to stream every set)")
    return limit
