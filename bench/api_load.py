"""Load on the HTTP service: many concurrent clients listing and showing snapshot sets while snapshots run.

A real ``freezeframe serve`` (subprocess, 2 job workers) over a real guest: a booted 3-disk guest under the ledger
workload in the full run, a shut-off 1-disk domain (offline copies, no boot) with ``--quick``. The catalog is
seeded with sets first; then ``--clients`` clients (each its own connection) loop "list a page of sets, show one
of them" for ``--duration`` seconds while one more client keeps createBackup jobs (rotation 3) running on the
guest. Reports latency (median, p95, p99) per operation, throughput, errors (any non-200 or transport error is
one) and the snapshots completed meanwhile. Exits non-zero on any error.

    .venv/bin/python bench/api_load.py            # full run, writes bench/results/api_load.json
    .venv/bin/python bench/api_load.py --quick    # smoke run (10 clients, 8 s, no boot), writes to a temp dir
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common import MiB, Run, add_common_args, libvirt_connection, machine_info, output_dir, scratch_dir
from freezeframe.testbed.api_server import ServerProcess, cli, issue_token, running_server
from freezeframe.testbed.guest import build_guest
from freezeframe.testbed.instance import DiskRequest, running_instance


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency_summary(ms: list[float], seconds: float) -> dict[str, Any]:
    def r(value: float | None) -> float | None:
        return None if value is None else round(value, 2)

    return {
        "n": len(ms),
        "per_second": round(len(ms) / seconds, 1) if seconds else None,
        "median_ms": r(statistics.median(ms)) if ms else None,
        "p95_ms": r(percentile(ms, 0.95)),
        "p99_ms": r(percentile(ms, 0.99)),
        "max_ms": r(max(ms)) if ms else None,
    }


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"list": [], "show": []})
    errors: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        if len(self.errors) < 50:
            self.errors.append(what)
        else:
            self.errors.append("...")


@contextmanager
def offline_domain(conn: Any, workdir: Path) -> Iterator[str]:
    """A defined, never started domain with one small disk: snapshots copy it offline (quick mode)."""
    name = f"ffbench-api-{uuid.uuid4().hex[:8]}"
    disk = workdir / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(16 * MiB)], check=True)
    xml = (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
        "</devices></domain>"
    )
    dom = conn.defineXML(xml)
    try:
        yield name
    finally:
        dom.undefine()
        disk.unlink(missing_ok=True)


def backup(server: ServerProcess, client: httpx.Client, instance: str, backup_type: str, rotation: int) -> float:
    """One createBackup through the API, waited for; returns its seconds."""
    started = time.monotonic()
    body = {"createBackup": {"name": f"{backup_type}-{uuid.uuid4().hex[:6]}", "backup_type": backup_type,
                             "rotation": rotation}}  # fmt: skip
    response = client.post(f"/v1/servers/{instance}/action", json=body)
    if response.status_code != 202:
        raise RuntimeError(f"createBackup answered {response.status_code}: {response.text}")
    job = server.wait_job(client, response.json()["id"], timeout_s=600)
    if job["state"] != "succeeded":
        raise RuntimeError(f"createBackup job failed: {job['error']}")
    return time.monotonic() - started


def snapshot_driver(
    server: ServerProcess, token: str, instance: str, stop: threading.Event, seconds: list[float], tally: Tally
) -> None:
    """Keeps one snapshot job after another running until ``stop``."""
    with server.client(token, timeout=120) as client:
        while not stop.is_set():
            try:
                seconds.append(backup(server, client, instance, "load", 3))
            except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:
                tally.error(f"snapshot: {exc}")
                time.sleep(1)


async def reader(url: str, token: str, show_ids: list[str], deadline: float, tally: Tally, seed: int) -> None:
    """One client: list a page of sets, show one of the seeded sets, again, until the deadline."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as client:
        while time.monotonic() < deadline:
            for op, path, params in (
                ("list", "/v1/snapshot-sets", {"limit": 20}),
                ("show", f"/v1/snapshot-sets/{rng.choice(show_ids)}", None),
            ):
                started = time.perf_counter()
                try:
                    response = await client.get(path, params=params)
                except httpx.HTTPError as exc:
                    tally.error(f"{op}: {type(exc).__name__}: {exc}")
                    continue
                elapsed_ms = (time.perf_counter() - started) * 1000
                if response.status_code != 200:
                    tally.error(f"{op}: {response.status_code} {response.text[:200]}")
                    continue
                tally.latencies[op].append(elapsed_ms)


async def load(url: str, token: str, show_ids: list[str], clients: int, duration_s: float, tally: Tally) -> float:
    started = time.monotonic()
    deadline = started + duration_s
    await asyncio.gather(*(reader(url, token, show_ids, deadline, tally, seed=i) for i in range(clients)))
    return time.monotonic() - started


def measure(args: argparse.Namespace, conn: Any, tmp: Path) -> dict[str, Any]:
    home = tmp / "home"
    with contextmanager_for_instance(args, conn, tmp) as instance:
        assigned = cli(home, "project", "assign", instance, "bench")
        if assigned.returncode != 0:
            raise RuntimeError(f"project assign failed: {assigned.stderr}")
        with running_server(home, args=("--workers", "2")) as server:
            member = issue_token(home, "member", "bench")
            seeded: list[str] = []
            seed_seconds: list[float] = []
            with server.client(member, timeout=120) as client:
                for _ in range(args.sets):
                    seed_seconds.append(backup(server, client, instance, "seed", args.sets))
                listed = client.get("/v1/snapshot-sets", params={"backup_type": "seed", "limit": 500}).json()
                seeded = [s["id"] for s in listed["items"]]
            print(f"seeded {len(seeded)} sets (median {statistics.median(seed_seconds):.1f} s each)", flush=True)
            tally = Tally()
            stop = threading.Event()
            snapshot_seconds: list[float] = []
            driver = threading.Thread(
                target=snapshot_driver, args=(server, member, instance, stop, snapshot_seconds, tally), daemon=True
            )
            driver.start()
            try:
                elapsed = asyncio.run(load(server.url, member, seeded, args.clients, args.duration, tally))
            finally:
                stop.set()
                driver.join(timeout=600)
            server_log = server.log_tail(20)
    result = {
        "config": {
            "clients": args.clients,
            "duration_s": args.duration,
            "seeded_sets": len(seeded),
            "instance": "booted 3x64 MiB guest, ledger workload" if not args.quick else "shut-off 1x16 MiB domain",
            "job_workers": 2,
        },
        "elapsed_s": round(elapsed, 2),
        "operations": {op: latency_summary(ms, elapsed) for op, ms in tally.latencies.items()},
        "all_requests": latency_summary([x for ms in tally.latencies.values() for x in ms], elapsed),
        "snapshots_during_load": {
            "completed": len(snapshot_seconds),
            "median_s": round(statistics.median(snapshot_seconds), 2) if snapshot_seconds else None,
        },
        "errors": len(tally.errors),
        "error_samples": tally.errors[:20],
    }
    if tally.errors:
        result["server_log_tail"] = server_log
    return result


@contextmanager
def contextmanager_for_instance(args: argparse.Namespace, conn: Any, tmp: Path) -> Iterator[str]:
    if args.quick:
        with offline_domain(conn, tmp) as name:
            yield name
        return
    disks = [DiskRequest(64 * MiB)] * 3
    with running_instance(conn, disks=disks, workload="ledger", workdir=tmp / "vm", guest=build_guest()) as inst:
        yield inst.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (default 50; 10 with --quick)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of load (default 60; 8 with --quick)")
    parser.add_argument("--sets", type=int, default=None, help="sets seeded before the load (default 20; 3 quick)")
    args = parser.parse_args()
    args.clients = args.clients or (10 if args.quick else 50)
    args.duration = args.duration or (8.0 if args.quick else 60.0)
    args.sets = args.sets or (3 if args.quick else 20)
    out_dir = output_dir(args, "api_load")
    bench = Run("api_load", args.quick)
    with libvirt_connection() as conn, scratch_dir("api-load") as tmp:
        bench.machine = machine_info(conn, tmp)
        result = measure(args, conn, tmp)
        path = bench.write(out_dir, result, conn)
    ops = result["operations"]
    print(
        f"{args.clients} clients, {result['elapsed_s']} s: list p95 {ops['list']['p95_ms']} ms "
        f"({ops['list']['n']}), show p95 {ops['show']['p95_ms']} ms ({ops['show']['n']}), "
        f"all p95 {result['all_requests']['p95_ms']} ms at {result['all_requests']['per_second']} req/s; "
        f"{result['snapshots_during_load']['completed']} snapshots meanwhile; {result['errors']} errors"
    )
    print(f"wrote {path}")
    if result["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
