"""Judge a snapshot set of the database guest with PostgreSQL itself: crash recovery, amcheck, pgbench's sums.

The checker runs on the host, with the same Debian PostgreSQL 15 binaries as the guest (a checker guest under
TCG would take minutes per set). It works on throw-away raw copies of the set's data and WAL members (journal
replayed, loop-mounted), points the data directory's ``pg_wal`` link at the copied WAL volume, starts the server
(which runs crash recovery) and asks: did recovery succeed; does ``amcheck`` (``verify_heapam`` on every pgbench
table, ``bt_index_check`` with ``heapallindexed`` on every pgbench index) find no corruption; and do the sums of
``abalance``, ``tbalance`` and ``bbalance`` each equal the sum of ``pgbench_history.delta``. Any failure is a
violation carrying PostgreSQL's own message.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from freezeframe.testbed.database_guest import DATA_DIRECTORY, WAL_DIRECTORY
from freezeframe.testbed.ledger import ImageReadError, raw_copy

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
START_TIMEOUT_S = 300
SERVER_DIR = Path("/var/tmp/freezeframe-dbcheck")
"""Mount points, configuration, socket and log: somewhere the postgres user can reach (a test's or a bench's
temp dir is often private to root); the raw copies stay in the caller's ``tmp_dir``."""
PGBENCH_TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")
SUMS_SQL = (
    "SELECT (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts),"
    " (SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers),"
    " (SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches),"
    " (SELECT coalesce(sum(delta), 0) FROM pgbench_history),"
    " (SELECT count(*) FROM pgbench_history)"
)
HEAP_SQL = (
    "SELECT count(*) FROM (SELECT (verify_heapam(c.oid)).* FROM pg_class c"
    " WHERE c.relname IN ({tables}) AND c.relkind = 'r') AS problems"
)
INDEX_SQL = (
    "SELECT count(bt_index_check(c.oid, true)) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
    " JOIN pg_class t ON t.oid = i.indrelid WHERE t.relname IN ({tables})"
)
HEAP_DETAIL_SQL = (
    "SELECT c.relname || ' block ' || v.blkno || ': ' || v.msg FROM pg_class c, verify_heapam(c.oid) v"
    " WHERE c.relname IN ({tables}) AND c.relkind = 'r' LIMIT 3"
)


class CheckerError(RuntimeError):
    """The checker itself could not run (PostgreSQL missing, mount failed); not a verdict on the set."""


@dataclass
class DatabaseVerdict:
    """Whether the restored database is consistent, and why not (PostgreSQL's own words)."""

    ok: bool
    reason: str
    recovery_s: float | None = None
    """Server start, crash recovery included, until it accepts connections."""
    sums: dict[str, int] = field(default_factory=dict)
    history_rows: int | None = None
    check_s: float = 0.0


def _run(argv: list[str], *, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    except FileNotFoundError as exc:
        raise CheckerError(f"{argv[0]} is not installed; run scripts/setup-host.sh") from exc


def _as_postgres(*argv: str) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *argv]


@contextlib.contextmanager
def _mounted(raw: Path, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    proc = _run(["mount", "-t", "ext4", "-o", "loop,noatime", str(raw), str(where)])
    if proc.returncode != 0:
        raise CheckerError(f"mount {raw}: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        _run(["umount", "-d", str(where)])


def check_database(data_image: Path, wal_image: Path, *, tmp_dir: Path | None = None) -> DatabaseVerdict:
    """The verdict on one set's data and WAL members (qcow2 or raw images; never modified)."""
    if not (PG_BIN / "postgres").is_file():
        raise CheckerError(f"PostgreSQL 15 is not installed in {PG_BIN}; run scripts/setup-host.sh")
    started = time.monotonic()
    SERVER_DIR.mkdir(mode=0o755, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ff-dbcheck-", dir=SERVER_DIR))
    work.chmod(0o755)
    try:
        try:
            with (
                raw_copy(data_image, tmp_dir=tmp_dir) as data_raw,
                raw_copy(wal_image, tmp_dir=tmp_dir) as wal_raw,
                _mounted(data_raw, work / "data") as data,
                _mounted(wal_raw, work / "wal") as wal,
            ):
                verdict = _judge(data, wal, work)
        except ImageReadError as exc:
            verdict = DatabaseVerdict(False, f"volume unreadable: {exc}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    verdict.check_s = round(time.monotonic() - started, 3)
    return verdict


def _judge(data: Path, wal: Path, work: Path) -> DatabaseVerdict:
    datadir = data / DATA_DIRECTORY
    waldir = wal / WAL_DIRECTORY
    if not (datadir / "PG_VERSION").is_file():
        return DatabaseVerdict(False, f"no PostgreSQL data directory at /{DATA_DIRECTORY} on the data volume")
    if not waldir.is_dir():
        return DatabaseVerdict(False, f"no /{WAL_DIRECTORY} directory on the WAL volume")
    # The copy moved hosts: its pg_wal link must name where the WAL volume is mounted here, and the guest's lock
    # file (a pid of the guest) means nothing on this host. Owners: the host's postgres user.
    (datadir / "pg_wal").unlink(missing_ok=True)
    (datadir / "pg_wal").symlink_to(waldir)
    (datadir / "postmaster.pid").unlink(missing_ok=True)
    for tree in (datadir, waldir):
        _run(["chown", "-R", f"{PG_USER}:{PG_USER}", str(tree)])
    conf = _write_config(work, datadir)
    log = work / "server.log"
    log.touch()
    shutil.chown(log, PG_USER, PG_USER)
    t0 = time.monotonic()
    start = _run(_as_postgres(str(PG_BIN / "pg_ctl"), "start", "-w", "-t", str(START_TIMEOUT_S), "-D", str(conf),
                              "-l", str(log)), timeout=START_TIMEOUT_S + 30)  # fmt: skip
    recovery_s = round(time.monotonic() - t0, 3)
    try:
        if start.returncode != 0:
            why = _server_errors(log) or (start.stderr.strip() or start.stdout.strip())[-600:]
            return DatabaseVerdict(False, f"crash recovery failed: {why}", recovery_s)
        return inspect_database(lambda sql: _psql(work / "sock", sql), recovery_s)
    finally:
        _run(_as_postgres(str(PG_BIN / "pg_ctl"), "stop", "-m", "immediate", "-w", "-D", str(conf)))


def _write_config(work: Path, datadir: Path) -> Path:
    """A private configuration (the guest's lives on its root disk): socket only, fsync off (a throw-away copy)."""
    conf = work / "conf"
    sock = work / "sock"
    for d in (conf, sock):
        d.mkdir()
        shutil.chown(d, PG_USER, PG_USER)
    (conf / "pg_hba.conf").write_text("local all all trust\n")
    (conf / "pg_ident.conf").write_text("")
    (conf / "postgresql.conf").write_text(
        f"data_directory = '{datadir}'\n"
        f"hba_file = '{conf / 'pg_hba.conf'}'\n"
        f"ident_file = '{conf / 'pg_ident.conf'}'\n"
        f"unix_socket_directories = '{sock}'\n"
        "listen_addresses = ''\nport = 5432\nfsync = off\nshared_buffers = 32MB\nmax_connections = 10\n"
        "jit = off\nautovacuum = off\nlogging_collector = off\n"
    )
    for f in conf.iterdir():
        shutil.chown(f, PG_USER, PG_USER)
    return conf


def _server_errors(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()
    bad = [ln for ln in lines if any(k in ln for k in ("PANIC", "FATAL", "ERROR"))]
    return " | ".join((bad or lines)[-3:])[:600]


def _psql(sock: Path, sql: str) -> tuple[bool, str]:
    proc = _run(_as_postgres(str(PG_BIN / "psql"), "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-h", str(sock),
                             "-d", "postgres", "-c", sql), timeout=300)  # fmt: skip
    if proc.returncode != 0:
        return False, proc.stderr.strip()[-600:]
    return True, proc.stdout.strip()


SqlRunner = Callable[[str], tuple[bool, str]]
"""Runs one SQL statement against the recovered database: (succeeded, its output or PostgreSQL's error)."""


def inspect_database(run_sql: SqlRunner, recovery_s: float | None) -> DatabaseVerdict:
    """amcheck and pgbench's balance sums on a database that has come up (on this host, or in a restored guest)."""
    tables = ", ".join(f"'{t}'" for t in PGBENCH_TABLES)
    ok, out = run_sql("CREATE EXTENSION IF NOT EXISTS amcheck")
    if not ok:
        return DatabaseVerdict(False, f"CREATE EXTENSION amcheck: {out}", recovery_s)
    ok, out = run_sql(HEAP_SQL.format(tables=tables))
    if not ok:
        return DatabaseVerdict(False, f"verify_heapam: {out}", recovery_s)
    if out != "0":
        _, detail = run_sql(HEAP_DETAIL_SQL.format(tables=tables))
        return DatabaseVerdict(False, f"verify_heapam found {out} problems: {detail}", recovery_s)
    ok, out = run_sql(INDEX_SQL.format(tables=tables))
    if not ok:
        return DatabaseVerdict(False, f"bt_index_check: {out}", recovery_s)
    ok, out = run_sql(SUMS_SQL)
    if not ok:
        return DatabaseVerdict(False, f"sums: {out}", recovery_s)
    accounts, tellers, branches, history, rows = (int(v) for v in out.split("|"))
    sums = {"abalance": accounts, "tbalance": tellers, "bbalance": branches, "delta": history}
    if not accounts == tellers == branches == history:
        return DatabaseVerdict(False, f"pgbench sums differ: {sums}", recovery_s, sums, rows)
    return DatabaseVerdict(True, f"recovered; amcheck clean; sums equal ({history}, {rows} history rows)",
                           recovery_s, sums, rows)  # fmt: skip
