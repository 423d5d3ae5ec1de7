"""A real PostgreSQL server for tests, the multi-host test bed and benchmarks, from Debian's ``postgresql`` package.

``initdb`` in a private directory (``FREEZEFRAME_PG_TESTBED_DIR``, default ``/var/tmp/freezeframe-pg``), started by
hand with ``pg_ctl`` (these machines have no service manager), owned by the ``postgres`` OS user when run as root
(initdb refuses root). It listens on loopback only (``127.0.0.1``, port ``FREEZEFRAME_PG_TESTBED_PORT``, default
54329) and on a socket in its own ``run`` directory; the Debian cluster on 5432, if any, is not touched.
Authentication: the socket trusts its users (only root and ``postgres`` can open the directory); TCP asks for a
password (SCRAM). A role and database ``freezeframe`` are made with a random password kept in ``testbed.json``
(mode 0600). ``up`` on a running server returns in milliseconds; ``down`` stops it and removes the directory.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from freezeframe.testbed.instance import TestbedError

STATE_ENV = "FREEZEFRAME_PG_TESTBED_DIR"
PORT_ENV = "FREEZEFRAME_PG_TESTBED_PORT"
DEFAULT_STATE = Path("/var/tmp/freezeframe-pg")
DEFAULT_PORT = 54329
HOST = "127.0.0.1"
ROLE = "freezeframe"
DATABASE = "freezeframe"
SUPERUSER = "postgres"
BIN_DIR = Path("/usr/lib/postgresql/15/bin")
_TIMEOUT_S = 60.0
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

SERVER_SETTINGS = {
    "listen_addresses": f"'{HOST}'",
    "max_connections": "200",  # agents, API replicas and job workers of the multi-host test bed
    "shared_buffers": "256MB",
    "log_min_messages": "warning",
    "logging_collector": "off",
}


@dataclass(frozen=True)
class PostgresTestbed:
    """What a client needs: ``--json`` prints these fields plus ``env``."""

    url: str
    """SQLAlchemy URL of the ``freezeframe`` database as the ``freezeframe`` role over TCP."""
    host: str
    port: int
    database: str
    user: str
    password: str
    socket_dir: str
    state_dir: str

    def env(self) -> dict[str, str]:
        """The settings with which freezeframe uses this server as its catalog."""
        return {"FREEZEFRAME_CATALOG_URL": self.url}

    def url_for(self, database: str) -> str:
        """The URL of another database on this server (``Server.create_database`` makes one)."""
        return _url(self.user, self.password, self.host, self.port, database)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "env": self.env()}


def _url(user: str, password: str, host: str, port: int, database: str) -> str:
    return f"postgresql+psycopg://{user}:{quote(password, safe='')}@{host}:{port}/{database}"


def state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE)


def port() -> int:
    raw = os.environ.get(PORT_ENV)
    if not raw:
        return DEFAULT_PORT
    if not raw.isdigit() or not 1024 <= int(raw) <= 65535:
        raise TestbedError(f"{PORT_ENV}={raw!r} is not a port between 1024 and 65535")
    return int(raw)


class Server:
    """One PostgreSQL cluster under one state directory."""

    def __init__(self, root: Path | None = None, tcp_port: int | None = None) -> None:
        self.root = root or state_dir()
        self.port = tcp_port or port()
        self.data = self.root / "data"
        self.run_dir = self.root / "run"
        self.log = self.root / "postgres.log"
        self.info_file = self.root / "testbed.json"

    # ---- status ------------------------------------------------------------------------------------------

    def info(self) -> PostgresTestbed | None:
        try:
            return PostgresTestbed(**json.loads(self.info_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def running(self) -> bool:
        """The postmaster of this data directory is alive (``pg_ctl status``)."""
        if not (self.data / "PG_VERSION").exists():
            return False
        done = self._pg(["pg_ctl", "status", "-D", str(self.data)], check=False)
        return done.returncode == 0

    def healthy(self) -> bool:
        """Running, and the freezeframe role reaches its database over TCP."""
        info = self.info()
        if info is None or not self.running():
            return False
        try:
            import psycopg

            with psycopg.connect(self._dsn(info), connect_timeout=5) as connection:
                connection.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def status(self) -> dict[str, Any]:
        info = self.info()
        return {
            "state_dir": str(self.root),
            "port": self.port,
            "running": self.running(),
            "healthy": self.healthy(),
            "url": info.url if info is not None else None,
        }

    # ---- up / down ---------------------------------------------------------------------------------------

    def up(self) -> PostgresTestbed:
        """Idempotent: a healthy server is left alone; a stopped one is started; a missing one is made."""
        info = self.info()
        if info is not None and self.healthy():
            return info
        if not (self.data / "PG_VERSION").exists():
            shutil.rmtree(self.root, ignore_errors=True)
            self._initdb()
        if not self.running():
            self._start()
        return self._ensure_role_and_database(info)

    def down(self) -> None:
        """Stop the server (fast shutdown: clients are disconnected) and remove its directory."""
        if self.running():
            self._pg(["pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60"])
        shutil.rmtree(self.root, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start again, keeping the data: for tests of clients that must reconnect."""
        self._pg(["pg_ctl", "restart", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "-l", str(self.log)])

    # ---- databases for tests -------------------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """A new empty database owned by the freezeframe role (dropped first if it exists); its URL."""
        info = self._require_info()
        self._check_name(name)
        with self._admin() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            connection.execute(f'CREATE DATABASE "{name}" OWNER "{info.user}" TEMPLATE template0')
        return info.url_for(name)

    def drop_database(self, name: str) -> None:
        self._check_name(name)
        with self._admin() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # ---- building ------------------------------------------------------------------------------------------

    def _initdb(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        for directory in (self.data, self.run_dir):
            directory.mkdir(mode=0o700)
            self._own(directory)
        self._pg(["initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth-local=trust",
                  "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions"])  # fmt: skip
        settings = {**SERVER_SETTINGS, "port": str(self.port), "unix_socket_directories": f"'{self.run_dir}'"}
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# written by `freezeframe testbed postgres up`\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        (self.data / "pg_hba.conf").write_text(
            "# written by `freezeframe testbed postgres up`: socket for root/postgres, loopback TCP with a password\n"
            "local all all trust\n"
            f"host all all {HOST}/32 scram-sha-256\n"
        )
        self._own(self.data / "pg_hba.conf")

    def _start(self) -> None:
        self.log.touch()
        self._own(self.log)
        self._pg(["pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60"])

    def _ensure_role_and_database(self, previous: PostgresTestbed | None) -> PostgresTestbed:
        password = previous.password if previous is not None else secrets.token_urlsafe(24)
        with self._admin() as connection:
            exists = connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            # The role may create databases: the multi-host test bed and tests make their own.
            connection.execute(f"{verb} ROLE {ROLE} LOGIN CREATEDB PASSWORD '{password}'")
            if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
                connection.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE} TEMPLATE template0")
        info = PostgresTestbed(
            url=_url(ROLE, password, HOST, self.port, DATABASE), host=HOST, port=self.port, database=DATABASE,
            user=ROLE, password=password, socket_dir=str(self.run_dir), state_dir=str(self.root),
        )  # fmt: skip
        fd = os.open(self.info_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(info), out, indent=2)
        return info

    def _require_info(self) -> PostgresTestbed:
        info = self.info()
        if info is None or not self.running():
            raise TestbedError(f"the PostgreSQL test bed in {self.root} is down; run `freezeframe testbed postgres up`")
        return info

    @staticmethod
    def _check_name(name: str) -> None:
        if not _NAME.match(name) or name in ("postgres", "template0", "template1", DATABASE):
            raise TestbedError(f"{name!r} is not a database name tests may create (lowercase letters, digits, _)")

    def _admin(self) -> Any:
        """A superuser connection over the private socket, autocommit (CREATE DATABASE needs it)."""
        import psycopg

        try:
            return psycopg.connect(
                host=str(self.run_dir), port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True,
                connect_timeout=10,
            )  # fmt: skip
        except psycopg.Error as exc:
            raise TestbedError(f"cannot reach the PostgreSQL test bed on {self.run_dir}: {exc}") from exc

    def _dsn(self, info: PostgresTestbed) -> str:
        return f"host={info.host} port={info.port} dbname={info.database} user={info.user} password={info.password}"

    # ---- processes -----------------------------------------------------------------------------------------

    def _as_user(self) -> str | None:
        """Run the server as ``postgres`` when we are root (initdb and postgres refuse root)."""
        return SUPERUSER if os.geteuid() == 0 else None

    def _own(self, path: Path) -> None:
        user = self._as_user()
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _pg(self, args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        program = BIN_DIR / args[0]
        if not program.exists():
            raise TestbedError(f"{program} not found: run scripts/setup-host.sh (it installs Debian's postgresql)")
        try:
            done = subprocess.run(
                [str(program), *args[1:]], capture_output=True, text=True, timeout=_TIMEOUT_S, check=False,
                user=self._as_user(), cwd="/",
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise TestbedError(f"{args[0]} did not finish within {_TIMEOUT_S:.0f} s (log: {self.log})") from exc
        if check and done.returncode != 0:
            detail = (done.stderr or done.stdout).strip()[-600:]
            raise TestbedError(f"{' '.join(args[:2])} failed: {detail} (log: {self.log})")
        return done
