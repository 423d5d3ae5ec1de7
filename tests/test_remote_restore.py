"""Off-site copies and policies on a real guest (one ledger guest for the module).

Disaster recovery: a chain of sets copied to radosgw, the home deleted, then ``remote scan`` and
``restore --from --start`` on a new home bring the instance back and its ledger holds. Policies: ``serve`` runs a
short-interval policy on time, copying and pruning."""

from __future__ import annotations

import itertools
import re
import shutil
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from freezeframe import wiring
from freezeframe.adapters import libvirt_define as ld
from freezeframe.adapters.service_store import JobStore
from freezeframe.config import Settings
from freezeframe.flow import SnapshotRequest
from freezeframe.model import Consistency, SetStatus
from freezeframe.ops.policies import POLICY_KEY
from freezeframe.testbed.api_server import issue_token, running_server
from freezeframe.testbed.guest import GuestImage
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance
from freezeframe.testbed.ledger import check_ledger
from freezeframe.testbed.radosgw import S3Access
from remote_helpers import bucket_url

pytestmark = pytest.mark.vm

MiB = 1 << 20
_PROGRESS = re.compile(rb"ff-ledger (?:paused |resumed )?i=(\d+)")
_START = re.compile(rb"ff-ledger start i=(\d+)")


@pytest.fixture(scope="module")
def ledger_guest(
    libvirt_conn: Any, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestInstance]:
    workdir = tmp_path_factory.mktemp("ffs3-guest")
    disks = [DiskRequest(64 * MiB), DiskRequest(64 * MiB), DiskRequest(64 * MiB)]
    with running_instance(libvirt_conn, disks=disks, workload="ledger", workdir=workdir, guest=guest_image,
                          name_prefix="ffs3") as inst:  # fmt: skip
        yield inst


def _last(pattern: re.Pattern[bytes], console: Path) -> int | None:
    found = pattern.findall(console.read_bytes()) if console.exists() else []
    return int(found[-1]) if found else None


def _wait_past(console: Path, after: int, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = _last(_PROGRESS, console)
        if now is not None and now > after:
            return now
        time.sleep(0.5)
    raise AssertionError(f"the restored guest's ledger did not pass {after}: {console.read_text()[-800:]}")


def test_restore_from_a_remote_after_the_home_is_lost_boots_and_the_ledger_holds(
    ledger_guest: TestInstance, s3: S3Access, tmp_path: Path, libvirt_conn: Any
) -> None:
    url = bucket_url()
    lost = tmp_path / "lost-home"
    with wiring.open_service(Settings(home=lost, agent_timeout_s=5)) as ff:
        first = ff.snapshot(SnapshotRequest(ledger_guest.name, Consistency.FILESYSTEM, require=True))
        time.sleep(2)  # the ledger moves on: the second set's incremental members hold new clusters
        second = ff.snapshot(SnapshotRequest(ledger_guest.name, Consistency.FILESYSTEM, require=True))
        kinds = {m.metadata.get("freezeframe.kind") for m in second.members}
        assert "incremental" in kinds, [m.metadata for m in second.members]
        ff.offsite.add_remote("offsite", url, s3.s3_endpoint)
        report = ff.offsite.copy(second.id, "offsite")
        assert report.sets_copied == [first.id, second.id]
        verdict = check_ledger(Path(ff.show(second.id).members[1].path), Path(ff.show(second.id).members[2].path))
        assert verdict.ok and verdict.state is not None, verdict
    shutil.rmtree(lost)  # repository, catalog, journal: all gone

    home = tmp_path / "new-home"
    options = wiring.LifecycleOptions(boot_timeout_s=120)
    with wiring.open_service(Settings(home=home, agent_timeout_s=5), options) as ff:
        ff.offsite.add_remote("offsite", url, s3.s3_endpoint)
        assert {s.id for s in ff.offsite.scan("offsite")} == {first.id, second.id}
        name = "ffs3-recovered"
        try:
            result = ff.offsite.restore(second.id, "offsite", name, start=True)
            assert result.started and [d.target for d in result.disks] == ["vda", "vdb", "vdc"]
            restored = ff.show(second.id)
            assert restored.hardware == second.hardware
            console = ff.parts.instances_dir / name / "console.log"
            progressed = _wait_past(console, verdict.state)
            assert _last(_START, console) == (verdict.last_journal or 0) + 1, "it did not boot from the set's data"
            dom = libvirt_conn.lookupByName(name)
            assert ld.shutdown_via_agent(dom, 60), "the recovered guest did not shut down through its agent"
            disks = {d.target: d.path for d in result.disks}
            after = check_ledger(Path(disks["vdb"]), Path(disks["vdc"]))
            assert after.ok and after.state is not None and after.state >= progressed, after
        finally:
            ff.lifecycle.discard(name)


def test_a_policy_in_serve_snapshots_copies_and_prunes_on_time(
    ledger_guest: TestInstance, s3: S3Access, tmp_path: Path
) -> None:
    """``freezeframe serve`` runs a 10-second policy (the shortest allowed) on the ledger guest: each tick one job,
    the sets copied to radosgw, keep-last 2 locally and keep-last 1 on the remote; three runs are enough to see
    both prunes."""
    home = tmp_path / "policy-home"
    with wiring.open_service(Settings(home=home, agent_timeout_s=5)) as ff:
        ff.offsite.add_remote("pol", bucket_url(), s3.s3_endpoint)
        ff.policies.create("often", ledger_guest.name, every="10s", cron=None, keep={"last": 2}, copy_to="pol",
                           remote_keep={"last": 1})  # fmt: skip
    token = issue_token(home, "admin")
    started = time.monotonic()
    with running_server(home, env={"FREEZEFRAME_POLICY_TICK_S": "1"}) as server, server.client(token) as client:
        done: list[dict[str, Any]] = []
        while len(done) < 3:
            assert time.monotonic() - started < 240, f"only {len(done)} policy runs finished: {server.log_tail()}"
            jobs = client.get("/v1/jobs", params={"kind": "policy"}).json()["items"]
            assert not [j for j in jobs if j["state"] == "failed"], [(j["error_type"], j["error"]) for j in jobs]
            done = [j for j in jobs if j["state"] == "succeeded"]
            time.sleep(1)
        view = client.get("/v1/policies/often").json()
        if view["last_outcome"] == "skipped":  # a tick came while the previous run still worked on the instance
            assert "still running" in view["last_error"], view
        else:
            assert view["last_outcome"] == "succeeded" and view["last_error"] is None, view
    with wiring.open_service(Settings(home=home, agent_timeout_s=5)) as ff:
        jobs = [j for j in JobStore(ff.catalog).query(kind="policy") if j.state == "succeeded"]
        ticks = sorted(datetime.fromisoformat(j.request["tick"]) for j in jobs)
        assert len(set(ticks)) == len(ticks), "a tick ran twice"
        assert all((b - a).total_seconds() >= 10 for a, b in itertools.pairwise(ticks))
        mine = ff.list_sets(metadata={POLICY_KEY: "often"}, status=SetStatus.AVAILABLE)
        assert len(mine) == 2, [s.id for s in mine]  # keep-last 2: the others were pruned
        assert {s.id for s in ff.offsite.scan("pol")} == {mine[0].id}  # keep-last 1 on the remote
        assert len(jobs) >= 3
