"""Load on a multi-host deployment against the embedded single-host service as the baseline, in one run.

Multi-host: 3 namespaced libvirt hosts of the test bed (own libvirtd, own agent each), a private PostgreSQL server
(catalog + procrastinate queue) and 2 ``serve --multi-host`` replicas; 12 instances, 4 per host. Baseline: one
embedded ``serve`` (SQLite, in-process workers, as many workers as the agents have together) over the same 12
instances on the machine's own libvirtd. In each mode ``--clients`` clients (split over the replicas) keep asking
for snapshots of random instances for ``--duration`` seconds; a 409 (that instance already has a job) is the
expected answer while one runs, and the client moves on. Then every accepted job is waited for.

Reported per mode: errors (any answer but 202/409, transport errors), accepted jobs, jobs lost (not finished
after the drain), jobs duplicated (more than one set recorded for one job), failed jobs, request -> job start
(median, p95), and sets per minute. The instances are shut-off domains with one 16 MiB disk (offline copies):
the point is the job path - routing, queueing, claiming, recording - not guest I/O, and twelve booted TCG guests
would measure the 2 shared cores instead.

    .venv/bin/python bench/hosts_load.py            # writes bench/results/hosts_load.json + .png
    .venv/bin/python bench/hosts_load.py --quick    # 10 clients, 10 s, to a temp dir
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from api_load import offline_domain
from common import (
    Run,
    add_common_args,
    libvirt_connection,
    machine_info,
    output_dir,
    pyplot,
    replot,
    run_note,
    save_figure,
    scratch_dir,
    summary,
)
from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.api.projects import JOB_KEY
from freezeframe.testbed import hosts as bed
from freezeframe.testbed.api_server import ServerProcess, issue_token, running_server
from freezeframe.testbed.multi_host import private_server

HOSTS, PER_HOST, AGENT_CONCURRENCY = 3, 4, 2


async def client_loop(url: str, token: str, names: list[str], deadline: float, seed: int, out: dict[str, Any]) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        while time.monotonic() < deadline:
            asked = time.time()
            try:
                response = await client.post(f"/v1/instances/{rng.choice(names)}/snapshots", json={})
            except httpx.HTTPError as exc:
                out["errors"].append(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code == 202:
                out["accepted"].append((response.json()["id"], asked))
            elif response.status_code == 409:
                out["busy"] += 1
                await asyncio.sleep(0.2)
            else:
                out["errors"].append(f"{response.status_code} {response.text[:200]}")


def drive(servers: list[ServerProcess], token: str, names: list[str], clients: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"accepted": [], "busy": 0, "errors": []}
    deadline = time.monotonic() + seconds

    async def everyone() -> None:
        await asyncio.gather(
            *(client_loop(servers[i % len(servers)].url, token, names, deadline, i, out) for i in range(clients))
        )

    started = time.time()
    asyncio.run(everyone())
    out["load_started"] = started
    return out


def drain(server: ServerProcess, token: str, accepted: list[tuple[str, float]], timeout_s: float) -> dict[str, dict]:
    finished: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    with server.client(token) as client:
        pending = [job_id for job_id, _ in accepted]
        while pending and time.monotonic() < deadline:
            still = []
            for job_id in pending:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["state"] in ("succeeded", "failed"):
                    finished[job_id] = job
                else:
                    still.append(job_id)
            pending = still
            if pending:
                time.sleep(0.5)
    return finished


def outcome(drive_out: dict[str, Any], finished: dict[str, dict[str, Any]], catalog_url: str) -> dict[str, Any]:
    asked = dict(drive_out["accepted"])
    starts = [
        datetime.fromisoformat(j["started_at"]).timestamp() - asked[i] for i, j in finished.items() if j["started_at"]
    ]
    ok = [j for j in finished.values() if j["state"] == "succeeded"]
    catalog = SqlCatalog(catalog_url)
    try:
        per_job = Counter(s.metadata.get(JOB_KEY) for s in catalog.list_sets() if s.metadata.get(JOB_KEY) in asked)
    finally:
        catalog.close()
    last = max((datetime.fromisoformat(j["finished_at"]).timestamp() for j in ok), default=drive_out["load_started"])
    minutes = max(last - drive_out["load_started"], 1e-6) / 60
    return {
        "accepted": len(asked),
        "busy_409": drive_out["busy"],
        "errors": len(drive_out["errors"]),
        "error_samples": drive_out["errors"][:5],
        "lost": len(asked) - len(finished),
        "duplicated": sum(1 for n in per_job.values() if n > 1),
        "failed": sum(1 for j in finished.values() if j["state"] == "failed"),
        "failure_samples": [j["error"] for j in finished.values() if j["state"] == "failed"][:3],
        "succeeded": len(ok),
        "request_to_start_s": summary(starts),
        "sets_per_minute": round(len(ok) / minutes, 1),
    }


@contextlib.contextmanager
def domains(conn: Any, workdir: Path, count: int) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(offline_domain(conn, workdir)) for _ in range(count)]


def embedded(args: argparse.Namespace, tmp: Path, conn: Any) -> dict[str, Any]:
    home = tmp / "embedded"
    with domains(conn, tmp, HOSTS * PER_HOST) as names:
        token = issue_token(home, "admin")
        workers = str(HOSTS * AGENT_CONCURRENCY)
        with running_server(home, args=("--workers", workers)) as server:
            out = drive([server], token, names, args.clients, args.duration)
            finished = drain(server, token, out["accepted"], args.drain)
        return outcome(out, finished, f"sqlite:///{home / 'catalog.sqlite'}")


def multi_host(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        _, url = stack.enter_context(private_server())
        env = {"FREEZEFRAME_CATALOG_URL": url}
        testbed = bed.up(HOSTS, url, tmp / "hosts")
        stack.callback(bed.down, tmp / "hosts")
        names = []
        for host in testbed.hosts:
            conn = stack.enter_context(_libvirt(host.uri))
            names += stack.enter_context(domains(conn, tmp, PER_HOST))
        _wait_reported(url, len(names))
        home = tmp / "api"
        with contextlib.ExitStack() as serving:
            token = _admin_token(home, url)
            servers = [
                serving.enter_context(running_server(home / f"replica{i}", env=env, args=("--multi-host",)))
                for i in range(2)
            ]
            out = drive(servers, token, names, args.clients, args.duration)
            finished = drain(servers[0], token, out["accepted"], args.drain)
        return outcome(out, finished, url)


def _admin_token(home: Path, url: str) -> str:
    with _env("FREEZEFRAME_CATALOG_URL", url):
        return issue_token(home, "admin")


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@contextlib.contextmanager
def _libvirt(uri: str) -> Iterator[Any]:
    import libvirt

    conn = libvirt.open(uri)
    try:
        yield conn
    finally:
        conn.close()


def _wait_reported(url: str, count: int, timeout_s: float = 60.0) -> None:
    catalog = SqlCatalog(url)
    try:
        deadline = time.monotonic() + timeout_s
        while sum(h.instance_count for h in HostRegistry(catalog).hosts() if h.state == "up") < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"the hosts did not report {count} instances in {timeout_s:.0f} s")
            time.sleep(0.5)
    finally:
        catalog.close()


def draw(report: dict[str, Any], path: Path, note: str | None) -> None:
    plt = pyplot()
    modes = report["modes"]
    labels = list(modes)
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    for offset, key in ((-0.2, "median"), (0.2, "p95")):
        values = [modes[m]["request_to_start_s"][key] or 0 for m in labels]
        left.bar([i + offset for i in range(len(labels))], values, width=0.4, label=key)
    left.set_xticks(range(len(labels)), labels)
    left.set_ylabel("request -> job start (s)")
    left.legend()
    right.bar(labels, [modes[m]["sets_per_minute"] for m in labels], color="#2ca02c")
    right.set_ylabel("sets per minute")
    fig.suptitle(f"{report['clients']} API clients for {report['load_seconds']:.0f} s, 12 instances")
    save_figure(fig, path, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--clients", type=int, default=None, help="API clients (default 50; 10 with --quick)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of load per mode (60; 10 quick)")
    parser.add_argument("--drain", type=float, default=300.0, help="seconds to wait for accepted jobs to finish")
    args = parser.parse_args()
    if replot(args, "hosts_load", draw):
        return
    args.clients = args.clients or (10 if args.quick else 50)
    args.duration = args.duration or (10.0 if args.quick else 60.0)
    out_dir = output_dir(args, "hosts_load")
    bench = Run("hosts_load", args.quick)
    with libvirt_connection() as conn, scratch_dir("hosts-load") as tmp:
        bench.machine = machine_info(conn, tmp)
        modes = {"embedded (1 host, SQLite)": embedded(args, tmp, conn), "multi-host (3 hosts)": multi_host(args, tmp)}
        report = {"clients": args.clients, "load_seconds": args.duration, "instances": HOSTS * PER_HOST,
                  "modes": modes}  # fmt: skip
        path = bench.write(out_dir, report, conn)
    draw({**report}, out_dir / "hosts_load.png", run_note(args.quick))
    for mode, r in modes.items():
        s = r["request_to_start_s"]
        print(
            f"{mode}: {r['accepted']} jobs, {r['errors']} errors, {r['lost']} lost, {r['duplicated']} duplicated, "
            f"{r['failed']} failed; request->start median {s['median']} s p95 {s['p95']} s; "
            f"{r['sets_per_minute']} sets/min"
        )
    print(f"wrote {path}")
    if any(r["errors"] or r["lost"] or r["duplicated"] for r in modes.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
