"""``freezeframe list``: the newest page of sets by default, ``--all`` streamed as it is read.

A catalog may hold a million sets, so nothing here holds a whole listing: a page is one keyset query, ``--all``
walks pages of ``STREAM_BATCH`` and prints each as it arrives (``--json`` writes one JSON array, item by item).
How many more sets follow a page is counted up to ``MORE_BOUND`` (an index range scan, never the whole table);
``--count`` asks for the exact total.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from freezeframe.cli_output import Col, is_terminal, print_table, say
from freezeframe.set_query import Cursor, SetFilter, SetPage

if TYPE_CHECKING:
    from freezeframe.model import SnapshotSet

MORE_BOUND = 1000
"""The count of sets after a page stops here ("1000+ more")."""
TABLE_BATCH = 500
"""Rows per table when ``--all`` prints on a terminal (each batch is printed as soon as it is read)."""

SET_COLUMNS = (
    Col("id"),
    Col("name", wraps=True),
    Col("instance", wraps=True),
    Col("status"),
    Col("consistency", drop=1),
    Col("disks", drop=3),
    Col("freeze ms", drop=4),
    Col("created", drop=2),
)


class SetLister(Protocol):
    """What ``list`` asks of the service (``Freezeframe``)."""

    def page_sets(self, wanted: SetFilter, limit: int, cursor: Cursor | None = None) -> SetPage: ...
    def iter_sets(self, wanted: SetFilter, cursor: Cursor | None = None) -> Iterator[SnapshotSet]: ...
    def count_sets(self, wanted: SetFilter, bound: int | None = None, cursor: Cursor | None = None) -> int: ...


def list_page(service: SetLister, wanted: SetFilter, limit: int, cursor: Cursor | None, as_json: bool) -> None:
    """One page, then (on stderr, so pipes get rows only) how many follow and the option that shows them."""
    page = service.page_sets(wanted, limit, cursor)
    if as_json:
        write_json_array(page.sets)
    else:
        print_sets(page.sets)
    if page.next_cursor is not None:
        more = service.count_sets(wanted, MORE_BOUND, Cursor.decode(page.next_cursor))
        shown = f"{more}+" if more >= MORE_BOUND else str(more)
        say(f"more: {shown} older set(s); next page: --cursor {page.next_cursor} (or --all)", stderr=True)


def list_all(service: SetLister, wanted: SetFilter, cursor: Cursor | None, as_json: bool) -> None:
    """Every matching set, printed batch by batch as the catalog returns them: memory stays flat."""
    sets = service.iter_sets(wanted, cursor)
    if as_json:
        write_json_array(sets)
        return
    batch: list[SnapshotSet] = []
    for s in sets:
        batch.append(s)
        if len(batch) == TABLE_BATCH:
            print_sets(batch)
            batch = []
    if batch or not is_terminal():
        print_sets(batch)


def print_sets(sets: list[SnapshotSet]) -> None:
    rows = [_set_row(s, s.id[:8], f"{s.created_at:%Y-%m-%d %H:%M}") for s in sets]
    print_table(SET_COLUMNS, rows, [_set_row(s, s.id, s.created_at.isoformat(timespec="seconds")) for s in sets])
    sys.stdout.flush()


def write_json_array(sets: Iterable[SnapshotSet]) -> None:
    """A JSON array written item by item (``--all --json`` on a million sets never holds them all)."""
    from freezeframe.serialize import set_to_dict

    out = sys.stdout
    out.write("[")
    separator = "\n"
    for s in sets:
        item = json.dumps(set_to_dict(s, hardware=False), indent=2, sort_keys=True, default=str)
        out.write(separator + "\n".join("  " + line for line in item.splitlines()))
        separator = ",\n"
    out.write("\n]\n" if separator != "\n" else "]\n")
    out.flush()


def _set_row(s: SnapshotSet, set_id: str, created: str) -> list[str]:
    window = f"{s.freeze_window_ms:.0f}" if s.freeze_window_ms is not None else "-"
    achieved = str(s.achieved or "-")
    return [set_id, s.name, s.instance_name, str(s.status), achieved, str(len(s.members)), window, created]
