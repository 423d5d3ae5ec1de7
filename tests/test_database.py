"""The headline proven with a real database: PostgreSQL 15 with its data directory on vdb and its WAL on vdc,
pgbench (TPC-B-like) running, every set judged by PostgreSQL's own crash recovery, amcheck and pgbench's sums.

Naive per-volume captures (WAL volume, then data volume, each its own backup job, guest not frozen) are judged
by the same checker in the same module and must produce violations: the proof that the checker can fail.
Statistics (N >= 50 per method) live in bench/database.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from freezeframe import wiring
from freezeframe.config import Settings
from freezeframe.flow import SnapshotRequest
from freezeframe.incremental import FULL
from freezeframe.model import Consistency
from freezeframe.service import Freezeframe
from freezeframe.testbed.database_check import DatabaseVerdict, check_database, inspect_database
from freezeframe.testbed.database_guest import DatabaseGuestImage, build_database_guest
from freezeframe.testbed.database_instance import (
    guest_sql,
    pgbench_progress,
    running_database,
    wait_for_database,
    wait_for_pgbench,
)
from freezeframe.testbed.instance import TestInstance
from freezeframe.testbed.naive import naive_capture

pytestmark = pytest.mark.vm

SETS_PER_LEVEL = 1
NAIVE_ATTEMPTS = 3
FREEZE_CAP_S = 60.0
"""A generous cap: the guest's fsfreeze hook (CHECKPOINT) and freeze run on a TCG vCPU pgbench keeps saturated."""
NAIVE_GAP_S = 10.0
"""Seconds between the WAL volume's and the data volume's capture (per-volume API calls are seconds apart): longer
than the guest's checkpoint cycle (harshen_load), so the data volume's pg_control names a checkpoint the captured
WAL does not hold. With a 1 s gap, 4 of 4 naive captures passed in one run (bench/database.py gives the rate)."""


@pytest.fixture(scope="module")
def db_image() -> DatabaseGuestImage:
    return build_database_guest()


@pytest.fixture(scope="module")
def db_guest(
    libvirt_conn: Any, db_image: DatabaseGuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestInstance]:
    with running_database(libvirt_conn, db_image, workdir=tmp_path_factory.mktemp("db-guest")) as inst:
        yield inst


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Freezeframe]:
    home = tmp_path_factory.mktemp("db-ffhome")
    with wiring.open_service(Settings(home=home, agent_timeout_s=60, freeze_cap_s=FREEZE_CAP_S)) as ff:
        yield ff


def _judge_set(ff: Freezeframe, inst: TestInstance, level: Consistency, name: str, tmp: Path) -> DatabaseVerdict:
    result = ff.snapshot(SnapshotRequest(inst.name, level, require=True, name=name, mode=FULL))
    try:
        members = {m.target: Path(m.path) for m in result.members}
        assert set(members) == {"vda", "vdb", "vdc"}
        assert all(m.set_id == result.id for m in result.members)
        return check_database(members["vdb"], members["vdc"], tmp_dir=tmp)
    finally:
        ff.repository.remove(result.id)


@pytest.mark.parametrize("level", [Consistency.CRASH, Consistency.FILESYSTEM, Consistency.APPLICATION])
def test_every_set_recovers_passes_amcheck_and_keeps_the_pgbench_sums(
    db_guest: TestInstance, service: Freezeframe, level: Consistency, tmp_path: Path
) -> None:
    for i in range(SETS_PER_LEVEL):
        before = wait_for_pgbench(db_guest)
        verdict = _judge_set(service, db_guest, level, f"db-{level}-{i}", tmp_path)
        print(f"{level} set {i}: {verdict.reason} (recovery {verdict.recovery_s} s, check {verdict.check_s} s)")
        assert verdict.ok, f"{level} set {i}: {verdict.reason}"
        assert verdict.history_rows, "the set holds no pgbench transaction: the load was not running"
        wait_for_pgbench(db_guest, timeout_s=60, after=before)  # the guest kept committing afterwards


def test_naive_per_volume_capture_breaks_postgresql(db_guest: TestInstance, tmp_path: Path) -> None:
    reasons: list[str] = []
    for i in range(NAIVE_ATTEMPTS):
        wait_for_pgbench(db_guest)
        outs = [("vdc", tmp_path / f"naive-{i}-wal.qcow2"), ("vdb", tmp_path / f"naive-{i}-data.qcow2")]
        try:
            naive_capture(db_guest.dom, outs, gap_s=NAIVE_GAP_S)
            verdict = check_database(outs[1][1], outs[0][1], tmp_dir=tmp_path)
        finally:
            for _, path in outs:
                path.unlink(missing_ok=True)
        print(f"naive {i}: ok={verdict.ok} {verdict.reason}")
        if not verdict.ok:
            reasons.append(verdict.reason)
            break
    assert reasons, f"{NAIVE_ATTEMPTS} naive WAL-then-data captures all passed the checker"


def test_a_set_restored_as_a_new_instance_recovers_in_its_own_guest(
    libvirt_conn: Any, db_guest: TestInstance, service: Freezeframe, tmp_path: Path
) -> None:
    """The set becomes a new instance (root, data and WAL volumes): its PostgreSQL runs crash recovery in the new
    guest and comes up; amcheck and pgbench's balance sums are judged there, by that server."""
    wait_for_pgbench(db_guest)
    result = service.snapshot(
        SnapshotRequest(db_guest.name, Consistency.APPLICATION, require=True, name="db-restore", mode=FULL)
    )
    name = f"{db_guest.name}-restored"
    restored = service.lifecycle.restore(result.id, name, start=True)
    try:
        assert sorted(d.target for d in restored.disks) == ["vda", "vdb", "vdc"]
        guest = TestInstance(name, restored.uuid, libvirt_conn.lookupByName(name), [], tmp_path / "no-console",
                             "pgbench", agent_timeout_s=60)  # fmt: skip
        up_s = wait_for_database(guest)
        verdict = inspect_database(guest_sql(guest), recovery_s=None)
        print(f"restored instance: PostgreSQL up {up_s:.0f} s after start; {verdict.reason}")
        assert verdict.ok, verdict.reason
        assert verdict.history_rows, "the restored database holds no pgbench transaction"
    finally:
        service.lifecycle.discard(name)
        service.lifecycle.delete(result.id)


def test_guest_is_thawed_and_pgbench_still_commits(db_guest: TestInstance) -> None:
    assert db_guest.agent({"execute": "guest-fsfreeze-status"})["return"] == "thawed"
    last = pgbench_progress(db_guest)[-1][0]
    wait_for_pgbench(db_guest, timeout_s=60, after=last)
