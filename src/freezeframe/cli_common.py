"""What every `freezeframe` command module shares: common options, reaching the service, input checks, JSON.

Importing this module must stay cheap (``--help`` loads it): the service, its adapters and Rich are imported
inside the functions that need them, when a command runs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from freezeframe.config import Settings
from freezeframe.validation import parse_metadata_items, validate_freeze_cap, validate_int, validate_name

if TYPE_CHECKING:
    from freezeframe.service import Freezeframe

ConnectOpt = Annotated[
    str | None,
    typer.Option(
        "--connect", "-c", metavar="URI", help="libvirt URI (env FREEZEFRAME_LIBVIRT_URI)", show_default=False
    ),
]
HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", metavar="DIR", help="data directory (env FREEZEFRAME_HOME)", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output (JSON on stdout)")]
ModeOpt = Annotated[
    str,
    typer.Option(
        "--mode", metavar="auto|full|incremental",
        help="auto: only changed blocks where a trustworthy parent set exists, else a full copy (with the reason)",
    ),
]  # fmt: skip
MaxChainOpt = Annotated[
    str | None, typer.Option("--max-chain", metavar="N", help="auto copies a disk in full after N incrementals (7)")
]
SetArg = Annotated[str, typer.Argument(metavar="SET", help="set id, id prefix (8 characters) or name")]
MetaOpt = Annotated[
    list[str] | None,
    typer.Option("--meta", metavar="KEY=VALUE", help="metadata on the set; repeat for more", show_default=False),
]
NameOpt = Annotated[str | None, typer.Option("--name", metavar="NAME", help="set name", show_default=False)]


def _open_freezeframe(settings: Settings) -> AbstractContextManager[Freezeframe]:
    from freezeframe.wiring import open_service

    return open_service(settings)


service_factory: Callable[[Settings], AbstractContextManager[Freezeframe]] = _open_freezeframe
"""How commands reach the service; tests put a scripted one here."""


def settings_for(home: Path | None, connect: str | None, freeze_cap_s: float | None = None) -> Settings:
    settings = Settings.from_env(home=home, libvirt_uri=connect)
    return settings if freeze_cap_s is None else replace(settings, freeze_cap_s=freeze_cap_s)


@contextmanager
def open_service(home: Path | None, connect: str | None, freeze_cap_s: float | None = None) -> Iterator[Freezeframe]:
    with service_factory(settings_for(home, connect, freeze_cap_s)) as service:
        yield service


def print_json(data: Any) -> None:
    """The machine form: JSON escapes control characters, so nothing in it can reach a terminal raw."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def parse_meta(items: list[str] | None) -> dict[str, str]:
    """``--meta KEY=VALUE`` options, held to the API's metadata rules."""
    return parse_metadata_items(list(items or []))


def check_name(value: str | None, what: str = "name") -> str | None:
    """A name the user gave (set, instance, image): the API's rule, so the CLI accepts nothing the API refuses."""
    return None if value is None else validate_name(value, what)


def freeze_cap(value: str | None) -> float | None:
    """``--freeze-cap``: finite and within bounds; the watchdog can be tuned, never switched off."""
    return None if value is None else validate_freeze_cap(value, "--freeze-cap")


def chain_options(mode: str, max_chain: str | None) -> dict[str, Any]:
    """--mode and --max-chain, checked once here (the same rules as the API's)."""
    from freezeframe.incremental import DEFAULT_MAX_CHAIN, MAX_CHAIN_LIMIT, validate_mode

    limit = DEFAULT_MAX_CHAIN if max_chain is None else validate_int(max_chain, "--max-chain", 0, MAX_CHAIN_LIMIT)
    validate_mode(mode, limit)
    return {"mode": mode, "max_chain": limit}
