"""Incremental sets against full sets of the same guest, same run; virtnbdbackup on the same guest and disks.

A guest with 3 qcow2 disks, each half full of data written from the host before boot (``qemu-io``; a TCG guest
would take minutes). The guest leaves its disks raw (``ff.disks=raw``) and changes them itself with
``ff-workload rewrite``: distinct random 64 KiB blocks at random places, random content, O_DIRECT, so "bytes the
guest changed" is exact. Measured, all in one run:

- three full sets (the baseline: time, bytes, freeze window);
- incremental sets with nothing changed (the per-set fixed cost in bytes and seconds, with a step breakdown);
- for 0.1 %, 1 % and 10 % of the data changed: incremental sets (bytes written against bytes changed, time
  against the full sets', freeze window against theirs);
- the same 1 % with the writes 4 KiB off the 64 KiB clusters, and with 4 KiB writes: what the bitmap and
  cluster granularity (64 KiB, QEMU's default for qcow2) cost when the guest's writes do not match it;
- guest write throughput with 0, 1 and 2 (freezeframe's maximum) live dirty bitmaps;
- virtnbdbackup (Debian package) full and incremental backups of the same guest (time, bytes written).

    flock /work/wt/vm.lock .venv/bin/python bench/incremental.py     # the issue's 3 x 4 GiB disks, half full
    .venv/bin/python bench/incremental.py --quick                     # smoke run: 3 x 64 MiB, 2 of each, temp dir
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    GiB,
    MiB,
    Run,
    StepClock,
    add_common_args,
    libvirt_connection,
    machine_info,
    median_steps,
    output_dir,
    pyplot,
    ratio,
    replot,
    run_note,
    save_figure,
    scratch_dir,
    steps_in,
    summary,
)
from freezeframe.adapters.libvirt_checkpoints import LibvirtCheckpoints
from freezeframe.config import Settings
from freezeframe.flow import SnapshotRequest
from freezeframe.model import SnapshotSet
from freezeframe.service import Freezeframe
from freezeframe.testbed.guest import build_guest
from freezeframe.testbed.instance import DiskRequest, TestInstance, running_instance

TARGETS = ("vda", "vdb", "vdc")
RATES = (0.001, 0.01, 0.1)
BLOCK = 64 * 1024
CLUSTER = 64 * 1024
"""The qcow2 cluster size of the guest's disks and so, by QEMU's default, the dirty bitmaps' granularity."""
PROBE_BYTES = 64 * MiB
PROBE_ROUNDS = 5
LIVE_COUNTS = (0, 1, 2)
NO_CHAIN_LIMIT = 1000
STEPS: dict[str, tuple[str, ...]] = {
    "hypervisor": ("lookup", "agent_ping", "freeze", "start_capture", "thaw", "wait_capture"),
    "repository": ("prepare", "checksum", "drop_zeros", "write_manifest"),
    "catalog": ("add_set", "update_set", "list_sets"),
    "journal": ("record",),
}
TRACKING_STEPS = ("untrusted", "checkpoints", "remove")


@dataclass(frozen=True)
class Sizes:
    disk: int
    repeats: int
    probe_rounds: int = PROBE_ROUNDS

    @property
    def fill(self) -> int:
        return self.disk // 2


def _rewrite(inst: TestInstance, sizes: Sizes, share: float, seed: int, block: int = BLOCK, shift: int = 0) -> int:
    """The guest rewrites ``share`` of each disk's data; bytes it changed in all."""
    count = max(1, round(sizes.fill * share / block))
    total = 0
    for i, t in enumerate(TARGETS):
        total += _guest_rewrite(inst, t, sizes.fill, block, count, shift, seed * 10 + i)[0]
    return total


def _guest_rewrite(
    inst: TestInstance, target: str, region: int, block: int, count: int, shift: int, seed: int
) -> tuple[int, float]:
    argv = ["/bin/ff-workload", "rewrite", f"/dev/{target}", str(region), str(block), str(count), str(shift), str(seed)]
    code, out, err = inst.guest_exec(argv, timeout_s=900)
    found = re.search(r"rewrote (\d+) in (\d+) ns", out)
    if code != 0 or found is None:
        raise RuntimeError(f"guest rewrite failed ({code}): {out} {err}")
    return int(found.group(1)), int(found.group(2)) / 1e9


def _own_data(path: str) -> int:
    """Bytes of data clusters the member holds itself (not its backing files): what it writes beyond metadata."""
    argv = ["qemu-img", "map", "--output=json", "-f", "qcow2", path]
    extents = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    return sum(e["length"] for e in extents if e["depth"] == 0 and e["data"])


def _written(s: SnapshotSet) -> int:
    return sum(int(m.metadata.get("freezeframe.bytes_written", "0")) for m in s.members)


def _kinds(s: SnapshotSet) -> set[str]:
    return {m.metadata.get("freezeframe.kind", "") for m in s.members}


class Bench:
    def __init__(self, ff: Freezeframe, inst: TestInstance, sizes: Sizes) -> None:
        self.ff, self.inst, self.sizes = ff, inst, sizes
        self.clock = StepClock()
        self.probes = 0
        for part, methods in STEPS.items():
            for method in methods:
                self.clock.wrap(getattr(ff, part), method, f"{part}.{method}")
        for method in TRACKING_STEPS:
            self.clock.wrap(LibvirtCheckpoints, method, f"tracking.{method}")

    def take(self, mode: str) -> dict[str, Any]:
        self.clock.take()
        started = time.monotonic()
        taken = self.ff.snapshot(SnapshotRequest(instance=self.inst.uuid, mode=mode, max_chain=NO_CHAIN_LIMIT))
        seconds = time.monotonic() - started
        calls = self.clock.take()
        if mode == "auto" and _kinds(taken) != {"incremental"}:
            raise RuntimeError(f"expected incremental members: {[m.metadata for m in taken.members]}")
        order = [c.step for c in calls]
        steps = steps_in(calls, order[:1], order[-1:], list(dict.fromkeys(order))) if calls else {}
        return {"id": taken.id, "s": round(seconds, 3), "freeze_ms": taken.freeze_window_ms, "bytes": _written(taken),
                "data_bytes": sum(_own_data(m.path) for m in taken.members), "steps_ms": steps}  # fmt: skip

    def throughput(self, rounds: int) -> list[dict[str, Any]]:
        """Guest write throughput on vdb (random 64 KiB O_DIRECT writes) with 0, 1 and 2 (freezeframe's maximum)
        live dirty bitmaps per disk, in interleaved rounds so a busy moment of the host hits every count alike.
        The bitmaps are plain libvirt checkpoints (what a set leaves), made and deleted around each probe."""
        samples: dict[int, list[float]] = {live: [] for live in LIVE_COUNTS}
        self.probe()  # warm-up: the first writes after boot are slower whatever the bitmaps
        for i in range(rounds):
            for live in LIVE_COUNTS:
                xml = "<domaincheckpoint><name>bench-{}-{}</name></domaincheckpoint>"
                made = [self.inst.dom.checkpointCreateXML(xml.format(i, n), 0) for n in range(live)]
                try:
                    samples[live].append(self.probe())
                finally:
                    for checkpoint in made:
                        checkpoint.delete(0)
        return [{"live_bitmaps": live, "mib_per_s": summary(v), "samples": [round(x, 1) for x in v]}
                for live, v in samples.items()]  # fmt: skip

    def probe(self) -> float:
        self.probes += 1
        count = min(PROBE_BYTES, self.sizes.fill // 2) // BLOCK  # distinct blocks: at most half the data region
        written, seconds = _guest_rewrite(self.inst, "vdb", self.sizes.fill, BLOCK, count, 0, 900 + self.probes)
        return written / seconds / MiB


def measure(conn: Any, sizes: Sizes, tmp: Path, virtnbdbackup: bool) -> dict[str, Any]:
    disks = [DiskRequest(sizes.disk, fill_bytes=sizes.fill) for _ in TARGETS]
    started = time.monotonic()
    with running_instance(
        conn, disks=disks, workload="idle", workdir=tmp / "guest", name_prefix="ffbench-inc",
        extra_cmdline=["ff.disks=raw"], boot_timeout_s=240,
    ) as inst:  # fmt: skip
        prepared_s = time.monotonic() - started
        with Freezeframe.open(Settings(home=tmp / "home", agent_timeout_s=5)) as ff:
            bench = Bench(ff, inst, sizes)
            throughput = bench.throughput(sizes.probe_rounds)
            # Full sets are kept (deleting one with children would merge it into them).
            fulls = [bench.take("full") for _ in range(sizes.repeats - 1)]
            empty = [bench.take("auto") for _ in range(sizes.repeats)]  # nothing changed since the set before
            fulls.append(bench.take("full"))  # the head of the chain the incrementals build on
            rows = []
            cases = [(f"{r * 100:g} %", r, BLOCK, 0) for r in RATES]
            cases += [("1 %, 4 KiB off the clusters", 0.01, BLOCK, 4096), ("1 %, 4 KiB writes", 0.01, 4096, 0)]
            for n, (label, share, block, shift) in enumerate(cases):
                for i in range(sizes.repeats):
                    changed = _rewrite(inst, sizes, share, 100 * n + i, block, shift)
                    rows.append({"case": label, "share": share, "block": block, "shift": shift,
                                 "changed_bytes": changed, "incremental": bench.take("auto")})  # fmt: skip
            for s in ff.list_sets(instance=inst.uuid):  # newest first: none has children left when it goes
                ff.lifecycle.delete(s.id)
            assert not inst.dom.listAllCheckpoints(), "deleting the sets removes their checkpoints"
            peer = _virtnbdbackup(inst, sizes, tmp / "virtnbdbackup") if virtnbdbackup else None
    return {
        "sizes": {"disk_bytes": sizes.disk, "data_bytes_per_disk": sizes.fill, "disks": len(TARGETS),
                  "cluster_bytes": CLUSTER, "guest_write_bytes": BLOCK},
        "prepare_s": round(prepared_s, 1), "fulls": fulls, "empty_incrementals": empty, "rows": rows,
        "throughput": throughput, "virtnbdbackup": peer, "summary": _summarise(fulls, empty, rows, cases),
    }  # fmt: skip


def _virtnbdbackup(inst: TestInstance, sizes: Sizes, out: Path) -> dict[str, Any]:
    """Its full backup, 1 % changed the same way, its incremental: wall time and bytes its files take."""
    out.mkdir(parents=True)
    before = {c.getName() for c in inst.dom.listAllCheckpoints()}
    result: dict[str, Any] = {"version": _first_line(["virtnbdbackup", "--version"])}
    try:
        for level, share in (("full", 0.0), ("inc", 0.01)):
            changed = _rewrite(inst, sizes, share, 7000) if share else 0
            used = _du(out)
            started = time.monotonic()
            argv = ["virtnbdbackup", "-d", inst.name, "-l", level, "-o", str(out), "-n", "-S", str(out.parent)]
            proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1800)
            seconds = time.monotonic() - started
            if proc.returncode != 0:
                raise RuntimeError(f"virtnbdbackup -l {level} failed: {proc.stderr.strip()[-800:]}")
            result[level] = {"s": round(seconds, 3), "bytes": _du(out) - used, "changed_bytes": changed}
    finally:
        for cp in inst.dom.listAllCheckpoints():
            if cp.getName() not in before:
                cp.delete(0)
    return result


def _first_line(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (proc.stdout or proc.stderr).strip().splitlines()[0]


def _du(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def _summarise(
    fulls: list[dict[str, Any]], empty: list[dict[str, Any]], rows: list[dict[str, Any]], cases: list[Any]
) -> dict[str, Any]:
    full_s = summary([f["s"] for f in fulls])
    result: dict[str, Any] = {
        "full_s": full_s,
        "full_bytes": summary([f["bytes"] for f in fulls]),
        "full_freeze_ms": summary([f["freeze_ms"] or 0.0 for f in fulls]),
        "full_steps_ms": median_steps([f["steps_ms"] for f in fulls]),
        "empty_incremental_s": summary([e["s"] for e in empty]),
        "empty_incremental_bytes": summary([e["bytes"] for e in empty]),
        "empty_incremental_steps_ms": median_steps([e["steps_ms"] for e in empty]),
        "cases": {},
    }
    metadata = result["empty_incremental_bytes"]["median"] or 0
    for label, *_ in cases:
        mine = [r for r in rows if r["case"] == label]
        inc_s = summary([r["incremental"]["s"] for r in mine])
        inc_b = summary([r["incremental"]["bytes"] for r in mine])
        changed = summary([r["changed_bytes"] for r in mine])
        result["cases"][label] = {
            "incremental_s": inc_s, "time_share": ratio(inc_s["median"], full_s["median"]),
            "incremental_bytes": inc_b, "changed_bytes": changed,
            "written_per_changed": ratio(inc_b["median"], changed["median"]),
            "written_beyond_metadata_per_changed": ratio((inc_b["median"] or 0) - metadata, changed["median"]),
            "data_bytes": summary([r["incremental"]["data_bytes"] for r in mine]),
            "data_per_changed": ratio(summary([r["incremental"]["data_bytes"] for r in mine])["median"],
                                      changed["median"]),
            "incremental_freeze_ms": summary([r["incremental"]["freeze_ms"] or 0.0 for r in mine]),
            "incremental_steps_ms": median_steps([r["incremental"]["steps_ms"] for r in mine]),
        }  # fmt: skip
    return result


def plot(report: dict[str, Any], path: Path, note: str | None) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    s = report["summary"]
    labels = list(s["cases"])
    x = list(range(len(labels)))
    short = [label.replace(", 4 KiB off the clusters", "\nshifted 4K").replace(", 4 KiB writes", "\n4K writes")
             for label in labels]  # fmt: skip
    ax = axes[0]
    ax.bar([i - 0.2 for i in x], [s["cases"][c]["changed_bytes"]["median"] / MiB for c in labels], 0.4,
           label="changed by the guest")  # fmt: skip
    ax.bar([i + 0.2 for i in x], [s["cases"][c]["incremental_bytes"]["median"] / MiB for c in labels], 0.4,
           label="incremental set wrote")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks(x, short, fontsize=7)
    ax.set_title(f"MiB per set (full: {s['full_bytes']['median'] / MiB:.0f} MiB)")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.bar(x, [s["cases"][c]["incremental_s"]["median"] for c in labels], 0.5, label="incremental set")
    ax.axhline(s["full_s"]["median"], color="C3", label="full set")
    ax.axhline(s["empty_incremental_s"]["median"], color="C2", linestyle=":", label="incremental, nothing changed")
    peer = report.get("virtnbdbackup")
    if peer:
        ax.axhline(peer["full"]["s"], color="C4", linestyle="--", label="virtnbdbackup full")
        ax.axhline(peer["inc"]["s"], color="C5", linestyle="-.", label="virtnbdbackup inc (1 %)")
    ax.set_xticks(x, short, fontsize=7)
    ax.set_title("seconds per set")
    ax.legend(fontsize=6)
    ax = axes[2]
    ax.bar(x, [s["cases"][c]["incremental_freeze_ms"]["median"] for c in labels], 0.5, label="incremental set")
    ax.axhline(s["full_freeze_ms"]["median"], color="C3", label="full set")
    ax.set_xticks(x, short, fontsize=7)
    ax.set_title("freeze window (ms)")
    ax.legend(fontsize=7)
    ax = axes[3]
    tp = report["throughput"]
    ax.bar([str(t["live_bitmaps"]) for t in tp], [t["mib_per_s"]["median"] for t in tp], 0.5)
    ax.set_xlabel("live dirty bitmaps per disk")
    ax.set_title("guest write MiB/s (64 KiB random)")
    save_figure(fig, path, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--disk-gib", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-virtnbdbackup", action="store_true", help="skip the peer's backups")
    args = parser.parse_args()
    sizes = Sizes(64 * MiB, 2, probe_rounds=1) if args.quick else Sizes(int(args.disk_gib * GiB), args.repeats)
    if replot(args, "incremental", plot):
        return
    if not args.no_virtnbdbackup and shutil.which("virtnbdbackup") is None:
        raise SystemExit("virtnbdbackup is missing: run scripts/setup-host.sh (or pass --no-virtnbdbackup)")
    out_dir = output_dir(args, "incremental")
    build_guest()
    bench = Run("incremental", args.quick)
    with libvirt_connection() as conn, scratch_dir("incremental") as tmp:
        bench.machine = machine_info(conn, tmp)
        report = measure(conn, sizes, tmp, not args.no_virtnbdbackup)
        json_path = bench.write(out_dir, report, conn)
    plot(report, out_dir / "incremental.png", run_note(args.quick))
    s = report["summary"]
    print(f"full: {s['full_s']['median']} s, {s['full_bytes']['median'] / MiB:.0f} MiB, "
          f"freeze {s['full_freeze_ms']['median']} ms; nothing changed: {s['empty_incremental_s']['median']} s, "
          f"{s['empty_incremental_bytes']['median'] / MiB:.2f} MiB")  # fmt: skip
    for label, r in s["cases"].items():
        print(f"{label}: incremental {r['incremental_s']['median']} s ({r['time_share']}x full); written/changed "
              f"{r['written_per_changed']}; freeze {r['incremental_freeze_ms']['median']} ms")  # fmt: skip
    throughput = [(t["live_bitmaps"], t["mib_per_s"]["median"]) for t in report["throughput"]]
    print("throughput MiB/s by live bitmaps:", throughput)
    print("virtnbdbackup:", report["virtnbdbackup"])
    print(f"wrote {json_path} and {out_dir / 'incremental.png'}")


if __name__ == "__main__":
    main()
