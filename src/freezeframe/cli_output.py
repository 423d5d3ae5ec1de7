"""How the CLI prints: user text as data, tables that never cut an id, plain rows for pipes, progress bars.

Set names, metadata, descriptions, image names and libvirt's instance names come from users (also through the
HTTP API). Printed as Rich markup, ``[/x]`` would crash a listing and ``[link=…]`` or an escape sequence would
reach the admin's terminal. So every console here has markup, emoji and highlighting off, styled pieces are
``rich.text.Text`` spans, and every piece of text is ``clean``-ed of control characters first.

Rich is imported only when something is printed to a terminal: ``--help`` and piped output never load it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from freezeframe.ports import ProgressCallback

_ESCAPE_SEQUENCE = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor movement, erase
    r"|\][^\x07\x1b]*(?:\x07|\x1b\\|$)"  # OSC: window titles, hyperlinks
    r"|[PX^_][^\x1b]*(?:\x1b\\|$)"  # DCS, SOS, PM, APC strings
    r"|[ -/]*[0-~])?"  # two-character sequences (and a lone ESC)
)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""C0 (but tab and newline), DEL, C1, and the bidi overrides that make a terminal show text out of order."""
_LINE_BREAKS = re.compile(r"[\t\n]+")

Piece = str | tuple[str, str]
"""A piece of a line: text, or ``(text, style)`` for a styled span (the style is ours, never user text)."""


def clean(text: object) -> str:
    """``text`` without escape sequences and control characters (tab and newline stay)."""
    return _CONTROL.sub("", _ESCAPE_SEQUENCE.sub("", str(text)))


def one_line(text: object) -> str:
    """``clean`` and on one line: tabs and newlines become spaces (table cells, tab-separated rows, errors)."""
    return _LINE_BREAKS.sub(" ", clean(text)).strip()


def console(stderr: bool = False) -> Console:
    """A console that prints data as data; made per use so COLUMNS and TTY_COMPATIBLE are read when it prints."""
    from rich.console import Console

    return Console(stderr=stderr, markup=False, emoji=False, highlight=False, soft_wrap=True)


def is_terminal(stderr: bool = False) -> bool:
    """Whether the stream is a terminal, as Rich decides it (``TTY_COMPATIBLE=1`` or ``FORCE_COLOR`` force one)."""
    forced = os.environ.get("TTY_COMPATIBLE", "")
    if forced in ("0", "1"):
        return forced == "1"
    if os.environ.get("FORCE_COLOR"):
        return True
    stream = sys.stderr if stderr else sys.stdout
    return stream.isatty()


def text(*pieces: Piece) -> Text:
    """One ``Text`` from literal pieces, each cleaned; never parsed as markup."""
    from rich.text import Text

    line = Text()
    for piece in pieces:
        value, style = (piece, "") if isinstance(piece, str) else piece
        line.append(clean(value), style=style)
    return line


def say(*pieces: Piece, stderr: bool = False) -> None:
    """Print one line made of ``pieces``: styled on a terminal, plain text elsewhere (no Rich import)."""
    if not is_terminal(stderr):
        stream = sys.stderr if stderr else sys.stdout
        stream.write("".join(clean(p if isinstance(p, str) else p[0]) for p in pieces) + "\n")
        return
    console(stderr).print(text(*pieces))


# ---- tables --------------------------------------------------------------------------------------------------

GAP = 2
"""Spaces between two columns."""
MIN_WRAPPED = 10
"""Narrowest a wrapping column gets before droppable columns are left out."""


@dataclass(frozen=True)
class Col:
    header: str
    wraps: bool = False
    """A long value continues on the next line (names); other columns are never cut and never wrapped."""
    drop: int = 0
    """When the terminal is too narrow for every column: 0 never left out, else the highest number goes first."""


def _plain(piece: Piece) -> str:
    return piece if isinstance(piece, str) else piece[0]


def fit(cols: Sequence[Col], rows: Sequence[Sequence[Piece]], width: int) -> list[int | None] | None:
    """Column widths for ``width`` terminal cells (None: column left out), or None if even the least does not fit."""
    from rich.cells import cell_len

    natural = [max([cell_len(c.header), *(cell_len(_plain(r[i])) for r in rows)]) for i, c in enumerate(cols)]
    kept = list(range(len(cols)))
    while True:
        fixed = sum(natural[i] for i in kept if not cols[i].wraps)
        wrapped = [i for i in kept if cols[i].wraps]
        room = width - fixed - GAP * (len(kept) - 1)
        widths: dict[int, int] = {i: min(natural[i], MIN_WRAPPED) for i in wrapped}
        if room >= sum(widths.values()):
            spare = room - sum(widths.values())
            while spare > 0 and any(widths[i] < natural[i] for i in wrapped):
                widest = max(wrapped, key=lambda i: natural[i] - widths[i])
                widths[widest] += 1
                spare -= 1
            return [(widths.get(i, natural[i]) if i in kept else None) for i in range(len(cols))]
        droppable = [i for i in kept if cols[i].drop]
        if not droppable:
            return None
        kept.remove(max(droppable, key=lambda i: cols[i].drop))


def print_table(cols: Sequence[Col], rows: Sequence[Sequence[Piece]], plain_rows: Sequence[Sequence[str]]) -> None:
    """``rows`` as an aligned table on a terminal; ``plain_rows`` tab-separated in a pipe or a too-narrow terminal.

    Tab-separated rows have no header and no styling; each field is on one line (``cut -f``, ``awk -F'\\t'``).
    """
    rows = [[_one_line_piece(cell) for cell in row] for row in rows]
    widths = fit(cols, rows, console().width) if is_terminal() else None
    if widths is None:
        print_plain_rows(plain_rows)
        return
    from rich.table import Column, Table

    kept = [i for i, w in enumerate(widths) if w is not None]
    columns = [
        Column(cols[i].header, width=widths[i], no_wrap=not cols[i].wraps, overflow="fold", header_style="bold")
        for i in kept
    ]
    table = Table(*columns, box=None, pad_edge=False, padding=(0, 1), show_header=True)
    for row in rows:
        table.add_row(*(text(row[i]) for i in kept))
    console().print(table)


def _one_line_piece(piece: Piece) -> Piece:
    return one_line(piece) if isinstance(piece, str) else (one_line(piece[0]), piece[1])


def print_fields(fields: Sequence[tuple[str, Piece | Sequence[Piece]]]) -> None:
    """``key: value`` lines with the values aligned; a value that is a list prints one item per indented line."""
    pad = max((len(key) for key, _ in fields), default=0) + 2
    for key, value in fields:
        if isinstance(value, (str, tuple)):
            say((f"{key}:", "bold"), " " * (pad - len(key) - 1), value)
            continue
        say((f"{key}:", "bold"))
        for item in value:
            say("  ", item)


def print_plain_rows(rows: Sequence[Sequence[str]]) -> None:
    sys.stdout.write("".join("\t".join(one_line(cell) or "-" for cell in row) + "\n" for row in rows))


# ---- progress ----------------------------------------------------------------------------------------------


@contextmanager
def progress_bar(enabled: bool, label: str) -> Iterator[ProgressCallback | None]:
    """A progress bar on stderr for a copy a person waits for; only when stdout and stderr are terminals.

    Never in pipes, logs or ``--json`` runs: there the callback is None and the operation reports nothing.
    """
    if not enabled or not is_terminal() or not is_terminal(stderr=True):
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update
