"""``freezeframe testbed postgres up|down|status``: a real server from Debian's package, loopback only."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from pathlib import Path

import psycopg
import pytest

from cli_helpers import run_cli
from freezeframe.testbed.instance import TestbedError
from freezeframe.testbed.postgres import Server


def test_up_twice_is_the_same_server_and_down_removes_it() -> None:
    """A private server (own directory and port), so the shared one the other tests use is left alone; under
    /var/tmp because the ``postgres`` user cannot enter pytest's root-only tmp_path."""
    root = Path(tempfile.mkdtemp(prefix="freezeframe-pg-test-", dir="/var/tmp"))
    root.chmod(0o755)
    server = Server(root / "pg", tcp_port=54339)
    try:
        first = server.up()
        assert server.up() == first  # idempotent
        dsn = first.url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn) as connection:
            assert connection.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
            assert connection.execute("SELECT current_user, current_database()").fetchone() == ("freezeframe",) * 2
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(dsn.replace(first.password, "wrong"))
        url = server.create_database("ff_scratch")
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as connection:
            assert connection.execute("SELECT current_database()").fetchone() == ("ff_scratch",)
        with pytest.raises(TestbedError, match="not a database name"):
            server.create_database("bad; DROP")
        server.down()
        assert not (root / "pg").exists() and server.status()["running"] is False
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", 54339)) != 0
    finally:
        server.down()
        shutil.rmtree(root, ignore_errors=True)


def test_cli_prints_url_and_env(capsys: pytest.CaptureFixture[str]) -> None:
    up = run_cli(capsys, "testbed", "postgres", "up", "--json")
    assert up.code == 0, up.err
    info = json.loads(up.out)
    assert info["url"].startswith("postgresql+psycopg://freezeframe:") and info["port"] == 54329
    assert info["env"] == {"FREEZEFRAME_CATALOG_URL": info["url"]} and Path(info["state_dir"]).is_dir()
    status = run_cli(capsys, "testbed", "postgres", "status", "--json")
    assert status.code == 0 and json.loads(status.out)["healthy"] is True
