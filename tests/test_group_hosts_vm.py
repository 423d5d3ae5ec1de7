"""A consistency group across two hosts, on real guests: the two-instance ledger split over two namespaced hosts.

Sender A runs on ffhost1, receiver B on ffhost2 (each host its own libvirtd in its own namespaces, its own
agent); their virtio-serial link is a UNIX socket in a directory both hosts' QEMUs reach. Group snapshots go
through ``serve --multi-host``: a coordinator job on one agent, one share per host, the barrier on the
catalog's PostgreSQL. Separate snapshots of A then B must break the ledger in the same run; group sets at every
level must not. Then a host stops answering inside the group window. The test bed is the one the multi-host VM
modules share (``hosts_helpers.SharedHosts``: handed over clean, its agents restarted with this module's freeze
cap; its third host takes no part); one pair for the module.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.group_model import GROUP_SET_KEY
from freezeframe.model import Consistency, SetStatus, SnapshotSet
from freezeframe.testbed import hosts
from freezeframe.testbed.api_server import ServerProcess
from freezeframe.testbed.guest import GuestImage
from freezeframe.testbed.linked_ledger import LinkedPair, LinkVerdict, check_link, linked_pair, wait_for_records
from hosts_helpers import SharedHosts, libvirt_connection, wait_hosts_report

pytestmark = pytest.mark.vm
SETS_PER_LEVEL = 30
NAIVE_PAIRS = 5
CAP_S = 4.0
"""The agents' freeze cap here (short, so that the fault test is quick)."""


class Bed:
    def __init__(self, pair: LinkedPair, url: str, server: ServerProcess, token: str, agents: dict[str, int]) -> None:
        self.pair, self.url, self.server, self.token, self.agents = pair, url, server, token, agents

    def client(self) -> httpx.Client:
        return self.server.client(self.token)

    def sets_of(self, group_set_id: str) -> dict[str, SnapshotSet]:
        catalog = SqlCatalog(self.url)
        try:
            return {s.instance_name: s for s in catalog.list_sets(metadata={GROUP_SET_KEY: group_set_id})}
        finally:
            catalog.close()


@pytest.fixture(scope="module")
def bed(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory, shared_hosts: SharedHosts) -> Iterator[Bed]:
    workdir = tmp_path_factory.mktemp("grouphosts")
    with pytest.MonkeyPatch.context() as patch, contextlib.ExitStack() as stack:
        patch.setenv("FREEZEFRAME_FREEZE_CAP_S", str(CAP_S))
        shared = shared_hosts.for_module()
        first, second = shared.testbed().hosts[:2]
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))
        agents = pool.submit(hosts.ensure_agents, shared.root)  # beside the boot
        conn_a = stack.enter_context(libvirt_connection(first.uri))
        conn_b = stack.enter_context(libvirt_connection(second.uri))
        pair = stack.enter_context(
            linked_pair(conn_a, receiver_conn=conn_b, workdir=workdir / "pair", guest=guest_image, name_prefix="ffgh")
        )
        agents.result()
        url = shared.url
        wait_hosts_report(SqlCatalog(url), {pair.sender.name: first.name, pair.receiver.name: second.name}, 60.0)
        pids = {h.name: int(h.agent_pid or 0) for h in shared.testbed().hosts}
        beds = Bed(pair, url, shared.server, shared.token, pids)
        with beds.client() as client:
            created = client.post(
                "/v1/groups", json={"name": "pair", "instances": [pair.sender.name, pair.receiver.name]}
            )
            assert created.status_code == 201, created.text
        yield beds


def _group_snapshot(bed: Bed, client: httpx.Client, level: Consistency) -> dict[str, Any]:
    response = client.post("/v1/groups/pair/snapshots", json={"consistency": str(level)})
    assert response.status_code == 202, response.text
    return bed.server.wait_job(client, response.json()["id"], timeout_s=120)


def _snapshot(bed: Bed, client: httpx.Client, name: str) -> SnapshotSet:
    response = client.post(f"/v1/instances/{name}/snapshots", json={})
    assert response.status_code == 202, response.text
    job = bed.server.wait_job(client, response.json()["id"], timeout_s=120)
    assert job["state"] == "succeeded", job
    catalog = SqlCatalog(bed.url)
    try:
        return catalog.get_set(job["result"]["set_id"])
    finally:
        catalog.close()


def _vda(snapshot_set: SnapshotSet) -> Path:
    return Path(next(m.path for m in snapshot_set.members if m.target == "vda"))


def _verdict(bed: Bed, group_set_id: str, tmp: Path) -> LinkVerdict:
    sets = bed.sets_of(group_set_id)
    return check_link(_vda(sets[bed.pair.sender.name]), _vda(sets[bed.pair.receiver.name]), tmp_dir=tmp)


def test_group_sets_across_two_hosts_keep_the_ledger_and_separate_snapshots_break_it(bed: Bed, tmp_path: Path) -> None:
    pair = bed.pair
    with bed.client() as client, concurrent.futures.ThreadPoolExecutor(2) as judges:
        naive = [
            check_link(_vda(_snapshot(bed, client, pair.sender.name)), _vda(_snapshot(bed, client, pair.receiver.name)),
                       tmp_dir=tmp_path)
            for _ in range(NAIVE_PAIRS)
        ]  # fmt: skip
        broken = [v for v in naive if not v.ok]
        print(f"two hosts, naive separate snapshots: {len(broken)}/{len(naive)} violate the two-instance ledger")
        assert broken, f"the oracle never failed on separate snapshots: {[v.reason for v in naive]}"
        for level in Consistency:
            verdicts, windows, spent = [], [], []
            for _ in range(SETS_PER_LEVEL):
                started = time.monotonic()
                job = _group_snapshot(bed, client, level)
                spent.append(time.monotonic() - started)
                assert job["state"] == "succeeded", job
                result = job["result"]
                assert result["status"] == "available" and result["consistency"] == str(level)
                assert sorted(result["hosts"]) == ["ffhost1", "ffhost2"]
                verdicts.append(judges.submit(_verdict, bed, result["group_set_id"], tmp_path))
                windows.append(result["window_ms"] or 0.0)
            judged = [v.result() for v in verdicts]  # read while the next group sets were taken
            bad = [v.reason for v in judged if not v.ok]
            progress = sorted({v.sender_last for v in judged})
            median = sorted(windows)[len(windows) // 2]
            print(f"two hosts, {level}: {len(judged)} group sets, {len(bad)} violations, sender at "
                  f"{progress[0]}..{progress[-1]}, window median {median:.0f} ms, "
                  f"job median {sorted(spent)[len(spent) // 2]:.1f} s")  # fmt: skip
            assert bad == [], f"{level}: group sets across hosts broke the ledger: {bad[:3]}"
            assert len(progress) > SETS_PER_LEVEL // 2, "the ledger barely moved between group sets: a weak test"
    wait_for_records(pair, 2)


def _fsfreeze_status(inst: Any) -> str | None:
    try:
        return str(inst.agent({"execute": "guest-fsfreeze-status"}, timeout_s=2)["return"])
    except Exception:  # noqa: BLE001 - a busy agent is not an answer; ask again
        return None


def _wait_status(inst: Any, status: str, timeout_s: float) -> float:
    """Poll until the guest reports ``status``; the monotonic time it first did."""
    deadline = time.monotonic() + timeout_s
    while _fsfreeze_status(inst) != status:
        assert time.monotonic() < deadline, f"{inst.name} never reported {status} within {timeout_s:.0f} s"
        time.sleep(0.05)
    return time.monotonic()


def test_a_host_that_stops_answering_in_the_group_window_holds_no_guest_past_the_cap(bed: Bed) -> None:
    """ffhost2's agent is stopped (SIGSTOP) while the sender on ffhost1 is frozen and the receiver's freeze is
    still under way (its hook sleeps 2 s): ffhost1 waits for ffhost2 at most until its cap, thaws the sender and
    fails the group set. A stopped agent cannot thaw its own guest; the moment it runs again, its watchdog (past
    the cap) does, and its share finds the abort and fails its set. Nothing is left half-made."""
    pair, stopped = bed.pair, bed.agents["ffhost2"]
    code, _, err = pair.receiver.guest_exec(["/bin/sh", "-c", "echo 2 > /run/ff-hook-delay"])
    assert code == 0, err
    resumed: float | None = None
    try:
        with bed.client() as client:
            response = client.post("/v1/groups/pair/snapshots", json={"consistency": "filesystem"})
            assert response.status_code == 202, response.text
            frozen_at = _wait_status(pair.sender, "frozen", 60)
            os.kill(stopped, signal.SIGSTOP)
            thawed_at = _wait_status(pair.sender, "thawed", CAP_S + 10)
            time.sleep(1.0)
            os.kill(stopped, signal.SIGCONT)
            resumed = time.monotonic()
            receiver_thawed = _wait_status(pair.receiver, "thawed", 30)
            job = bed.server.wait_job(client, response.json()["id"], timeout_s=120)
    finally:
        if resumed is None:
            os.kill(stopped, signal.SIGCONT)
        pair.receiver.guest_exec(["/bin/rm", "-f", "/run/ff-hook-delay"], timeout_s=60)
    held = thawed_at - frozen_at
    print(
        f"host stopped in the window: sender held {held:.2f} s (cap {CAP_S} s); receiver thawed "
        f"{receiver_thawed - resumed:.2f} s after its agent ran again; job {job['state']}: {job.get('error')}"
    )
    assert held < CAP_S + 1.5, f"the sender stayed frozen {held:.1f} s with a {CAP_S} s cap"
    assert receiver_thawed - resumed < 3.0
    assert job["state"] == "failed", job
    group_set = _last_group_set(bed)
    assert group_set["status"] == "failed" and group_set["error"], group_set
    deadline = time.monotonic() + 60
    while True:  # the stopped host's share fails its set once it runs again
        sets = bed.sets_of(group_set["id"])
        if len(sets) == 2 and all(s.status is SetStatus.FAILED for s in sets.values()):
            break
        assert time.monotonic() < deadline, {n: s.status for n, s in sets.items()}
        time.sleep(0.5)
    assert all(not m.path or not Path(m.path).exists() for s in sets.values() for m in s.members)
    wait_for_records(pair, 2)


def _last_group_set(bed: Bed) -> dict[str, Any]:
    with bed.client() as client:
        response = client.get("/v1/group-sets", params={"group": "pair"})
        assert response.status_code == 200, response.text
        newest: dict[str, Any] = response.json()[0]
        return newest
