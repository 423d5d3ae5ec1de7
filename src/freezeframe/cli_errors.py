"""Run the `freezeframe` command so that whatever goes wrong is one line on stderr and a specific exit code.

Usage errors exit 2, like any Unix tool; a ``FreezeframeError`` exits with its own code; an ``OSError`` that
escapes (an unusable ``--home``) and anything unexpected exit 1. A traceback appears only with
``FREEZEFRAME_DEBUG=1``. The installed Typer vendors its own click (``typer._click``); its exceptions all derive
from ``typer.TyperException``, ``typer.Exit`` and ``typer.Abort``, which is what is caught here.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError

from freezeframe.cli_output import one_line
from freezeframe.errors import FreezeframeError

PROG = "freezeframe"
USAGE_EXIT = 2
FAILURE_EXIT = 1
INTERRUPTED_EXIT = 130
BROKEN_PIPE_EXIT = 141
"""128 + SIGPIPE, what a shell reports for a process whose reader went away (``freezeframe list | head -1``)."""
DEBUG_ENV = "FREEZEFRAME_DEBUG"
COMPLETE_ENV = "_FREEZEFRAME_COMPLETE"


class _CleanFormatter(logging.Formatter):
    """Log records quote user text too: one line each, no control characters."""

    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record))


def configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_CleanFormatter("freezeframe: %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def fail(message: str) -> None:
    sys.stderr.write(one_line(message) + "\n")
    sys.stderr.flush()


def run(command: Any, args: Sequence[str] | None = None) -> int:
    """Parse ``args`` and run the command; return the exit code (never raises, never prints a traceback)."""
    if os.environ.get(COMPLETE_ENV):
        return int(command.main(prog_name=PROG) or 0)  # the shell-completion protocol: Typer answers and exits
    argv = list(sys.argv[1:] if args is None else args)
    try:
        with command.make_context(PROG, argv) as ctx:
            command.invoke(ctx)
        return 0
    except typer.Exit as exc:
        return int(exc.exit_code)
    except NoArgsIsHelpError as exc:
        sys.stderr.write(exc.ctx.get_help() + "\n" if exc.ctx is not None else str(exc) + "\n")
        return USAGE_EXIT
    except UsageError as exc:
        fail(_usage_line(exc))
        return USAGE_EXIT
    except typer.TyperException as exc:
        fail(f"{PROG}: error: {exc.format_message()}")
        return int(exc.exit_code) or FAILURE_EXIT
    except FreezeframeError as exc:
        fail(f"{PROG}: error: {exc}")
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt, EOFError) as exc:
        reason = exc.__cause__ if isinstance(exc, typer.Abort) else exc
        fail(f"{PROG}: {reason if isinstance(reason, KeyboardInterrupt) and str(reason) else 'interrupted'}")
        return INTERRUPTED_EXIT
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE_EXIT
    except OSError as exc:
        fail(f"{PROG}: error: {_describe_os_error(exc)}")
        return FAILURE_EXIT
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, and the traceback on request
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        fail(f"{PROG}: internal error: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)")
        return FAILURE_EXIT


def _usage_line(exc: UsageError) -> str:
    path = exc.ctx.command_path if exc.ctx is not None else PROG
    return f"{PROG}: usage error: {exc.format_message().rstrip('.')}; see '{path} --help'"


def _describe_os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename is not None else ""
    return f"{where}{exc.strerror or exc}"


def _silence_stdout() -> None:
    """The reader is gone: point stdout at /dev/null so the interpreter's final flush does not complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
