"""The PostgreSQL database a multi-host test bed shares (catalog + job queue), on the PostgreSQL test bed.

Its own database (``ffhosts``) on the server of ``testbed.postgres``, reached through the server's UNIX socket:
the agents live in network namespaces with nothing but their own loopback, and a socket in the file system is
the one way in that needs no address at all. ``up`` keeps the database of a test bed already up (its jobs, sets
and hosts), and makes a fresh one otherwise.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from freezeframe.testbed.hosts import load_state
from freezeframe.testbed.postgres import Server

DATABASE = "ffhosts"


def socket_url(socket_dir: str, port: int, user: str, database: str) -> str:
    return f"postgresql+psycopg://{user}@/{database}?host={socket_dir}&port={port}"


def catalog_url(root: Path) -> str:
    """The URL of the test bed's database (started, and created if this test bed has none yet)."""
    server = Server()
    info = server.up()
    url = socket_url(info.socket_dir, info.port, info.user, DATABASE)
    previous = load_state(root)
    if previous is None or previous.catalog_url != url:
        server.create_database(DATABASE)
    return url


@contextlib.contextmanager
def private_server() -> Iterator[tuple[Server, str]]:
    """A PostgreSQL server of its own (tests and benchmarks that restart it disturb nobody), and its socket URL.

    Its directory is under /var/tmp: the ``postgres`` user must reach it, which a 0700 temp dir would forbid.
    """
    from freezeframe.testbed.api_server import free_port

    root = Path(tempfile.mkdtemp(prefix="ffhosts-pg-", dir="/var/tmp"))
    server = Server(root=root, tcp_port=free_port())
    try:
        info = server.up()
        yield server, socket_url(info.socket_dir, info.port, info.user, info.database)
    finally:
        server.down()
        shutil.rmtree(root, ignore_errors=True)
