"""``freezeframe list``: the newest page of sets by default, ``--all`` streamed as it is read.

A catalog may hold a million sets, so nothing here holds a whole listing: a page is one keyset query, ``--all``
walks pages of ``STREAM_BATCH`` and prints each as it arrives (``--json`` writes one JSON array, item by item).
How many more sets follow a page is counted up to ``MORE_BOUND`` (an index range scan, never the whole table);
``--count`` asks for the exact total.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from freezeframe.cli_output import Col, is_terminal, print_table, say
from freezeframe.set_query import Cursor, SetFilter, SetPage

if TYPE_CHECKING:
    from freezeframe.model import SnapshotSet
    from freezeframe.offsite import Offsite

CopiesOf = Callable[[Sequence[str]], dict[str, list[str]]]
"""The remotes holding an off-site copy of each of these sets (docs/remotes.md), asked one batch at a time."""

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


class HasOffsite(Protocol):
    @property
    def offsite(self) -> Offsite: ...


def copies_lookup(service: HasOffsite) -> CopiesOf:
    """Where each set has copies, from the catalog's copy records."""

    def copies_of(set_ids: Sequence[str]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for record in service.offsite.copies(list(set_ids)):
            found.setdefault(record.set_id, []).append(record.remote)
        return found

    return copies_of


def list_page(
    service: SetLister, wanted: SetFilter, limit: int, cursor: Cursor | None, as_json: bool, copies_of: CopiesOf
) -> None:
    """One page, then (on stderr, so pipes get rows only) how many follow and the option that shows them."""
    page = service.page_sets(wanted, limit, cursor)
    if as_json:
        write_json_array(page.sets, copies_of)
    else:
        print_sets(page.sets, copies_of)
    if page.next_cursor is not None:
        more = service.count_sets(wanted, MORE_BOUND, Cursor.decode(page.next_cursor))
        shown = f"{more}+" if more >= MORE_BOUND else str(more)
        say(f"more: {shown} older set(s); next page: --cursor {page.next_cursor} (or --all)", stderr=True)


def list_all(service: SetLister, wanted: SetFilter, cursor: Cursor | None, as_json: bool, copies_of: CopiesOf) -> None:
    """Every matching set, printed batch by batch as the catalog returns them: memory stays flat."""
    sets = service.iter_sets(wanted, cursor)
    if as_json:
        write_json_array(sets, copies_of)
        return
    printed = False
    for batch in batches(sets, TABLE_BATCH):
        print_sets(batch, copies_of)
        printed = True
    if not printed and not is_terminal():
        print_sets([], copies_of)


def batches(sets: Iterable[SnapshotSet], size: int) -> Iterator[list[SnapshotSet]]:
    batch: list[SnapshotSet] = []
    for s in sets:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def print_sets(sets: list[SnapshotSet], copies_of: CopiesOf) -> None:
    """A table; a "copies" column once any set of it has an off-site copy."""
    copies = copies_of([s.id for s in sets]) if sets else {}
    rows = [_set_row(s, s.id[:8], f"{s.created_at:%Y-%m-%d %H:%M}") for s in sets]
    plain = [_set_row(s, s.id, s.created_at.isoformat(timespec="seconds")) for s in sets]
    columns: tuple[Col, ...] = SET_COLUMNS
    if copies:
        for row, full, s in zip(rows, plain, sets, strict=True):
            row.append(",".join(copies.get(s.id, [])) or "-")
            full.append(row[-1])
        columns = (*SET_COLUMNS, Col("copies", wraps=True, drop=5))
    print_table(columns, rows, plain)
    sys.stdout.flush()


def write_json_array(sets: Iterable[SnapshotSet], copies_of: CopiesOf) -> None:
    """A JSON array written item by item (``--all --json`` on a million sets never holds them all)."""
    from freezeframe.serialize import set_to_dict

    out = sys.stdout
    out.write("[")
    separator = "\n"
    for batch in batches(sets, TABLE_BATCH):
        copies = copies_of([s.id for s in batch])
        for s in batch:
            view = {**set_to_dict(s, hardware=False), "copies": copies.get(s.id, [])}
            item = json.dumps(view, indent=2, sort_keys=True, default=str)
            out.write(separator + "\n".join("  " + line for line in item.splitlines()))
            separator = ",\n"
        out.flush()
    out.write("\n]\n" if separator != "\n" else "]\n")
    out.flush()


def _set_row(s: SnapshotSet, set_id: str, created: str) -> list[str]:
    window = f"{s.freeze_window_ms:.0f}" if s.freeze_window_ms is not None else "-"
    achieved = str(s.achieved or "-")
    return [set_id, s.name, s.instance_name, str(s.status), achieved, str(len(s.members)), window, created]
