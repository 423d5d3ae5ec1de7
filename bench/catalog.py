"""The catalog at scale: listing pages, every filter, `show` by id prefix and a set insert against catalog size.

Synthetic catalogs of 10k, 100k and 1M sets (3 members each; 500 instances, 50 projects, 20 hosts, a few statuses,
backup types, kinds, groups and metadata values), on SQLite and on the PostgreSQL test bed, grown in place: rows
are bulk-loaded (executemany on SQLite, COPY on PostgreSQL) with the listing indexes dropped, then the indexes are
rebuilt and the planner's statistics refreshed (ANALYZE), as after the migration of a large catalog. Every
operation goes through ``SqlCatalog`` (the code the CLI and the API run): median and p95 of N timings, and the
peak Python memory of one more run under tracemalloc. The baseline, measured in the same run up to 100k sets, is
what the code did before issue 18: read every matching row's id, instance and metadata, filter in Python, then
load one page.

    .venv/bin/python bench/catalog.py                              # both backends; bench/results/catalog.{json,png}
    .venv/bin/python bench/catalog.py --backend postgresql         # one backend; merged into the JSON
    .venv/bin/python bench/catalog.py --quick                      # smoke run: 300 and 1k sets, temp dir
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from common import (
    COLORS,
    Run,
    add_common_args,
    load_report,
    machine_info,
    output_dir,
    pyplot,
    replot,
    run_note,
    save_figure,
    summary,
)
from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.catalog_query import encoded, page_query
from freezeframe.adapters.catalog_schema import SET_INDEXES, SETS
from freezeframe.model import SetStatus
from freezeframe.set_query import GROUP_KEY, PROJECT_KEY, Cursor, SetFilter

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (300, 1_000)
BASELINE_MAX = 100_000
"""The old full read takes tens of seconds and gigabytes at 1M sets (issue 18): measured up to 100k only."""
GOAL_MS = 50.0
PAGE = 50
REPEAT, QUICK_REPEAT = 15, 2
INSTANCES, PROJECTS, HOSTS = 500, 50, 20
T0 = datetime(2024, 1, 1, tzinfo=UTC)
STEP = timedelta(seconds=7)
META_INDEX = "ix_set_metadata_key_value_created_at_set_id"


def _hardware() -> str:
    """A three-disk instance's hardware in the serialized form (what every synthetic set records)."""
    from freezeframe.model import BootSpec, DiskSpec, Hardware
    from freezeframe.serialize import hardware_to_dict

    disks = tuple(DiskSpec(target=t, bus="virtio", source_path=f"/images/{t}.qcow2", format="qcow2",
                           virtual_size=10 << 30) for t in ("vda", "vdb", "vdc"))  # fmt: skip
    hardware = Hardware(vcpus=2, memory_kib=2 << 20, arch="x86_64", machine="pc-q35-7.2",
                        boot=BootSpec(firmware="bios"), disks=disks)  # fmt: skip
    return json.dumps(hardware_to_dict(hardware))


HARDWARE = _hardware()


# ---- synthetic rows -------------------------------------------------------------------------------------------


def instance_uuid(n: int) -> str:
    return f"{n:08x}-0000-4000-8000-{n:012x}"


def rows(start: int, stop: int) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]], dict[str, str]]]:
    """Set ``i``: instance i % 500, 7 s after set i-1; 2 % failed, 1 % deleting; 20 % weekly; 70 % incremental;
    metadata env (10 values), a pinned project, a group on 1 %."""
    rng = random.Random(start)
    for i in range(start, stop):
        inst = i % INSTANCES
        set_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        roll = i % 100
        status = "failed" if roll < 2 else "deleting" if roll == 2 else "available"
        meta = {"env": f"e{i % 10}", PROJECT_KEY: f"proj-{inst % PROJECTS:03d}"}
        if i % 100 == 50:
            meta[GROUP_KEY] = f"grp-{i % 1000 // 100}"
        incremental = i % 10 < 7
        member_meta = {"freezeframe.set": set_id, **({"freezeframe.kind": "incremental"} if incremental else {})}
        row = {
            "id": set_id, "name": f"set-{i}", "instance_name": f"inst-{inst:04d}",
            "instance_uuid": instance_uuid(inst), "requested": "filesystem", "achieved": "filesystem", "reason": None,
            "status": status, "created_at": T0 + i * STEP, "completed_at": T0 + i * STEP + timedelta(seconds=3),
            "freeze_window_ms": 12.5, "pause_window_ms": None, "hardware": HARDWARE, "metadata": json.dumps(meta),
            "backup_type": "weekly" if i % 5 == 0 else "daily", "error": None, "instance_state": "running",
            "project": meta[PROJECT_KEY], "kind": "incremental" if incremental else "full",
            "host": f"hv{inst % HOSTS:02d}",
        }  # fmt: skip
        members = [
            {"set_id": set_id, "target": t, "bus": "virtio", "boot_order": None, "virtual_size": 10 << 30,
             "format": "qcow2", "path": f"/repo/{set_id}/{t}.qcow2", "source_path": f"/images/{t}.qcow2",
             "sha256": "ab" * 32, "metadata": json.dumps(member_meta)}
            for t in ("vda", "vdb", "vdc")
        ]  # fmt: skip
        yield row, members, meta


SET_COLUMNS = list(next(rows(0, 1))[0])
MEMBER_COLUMNS = list(next(rows(0, 1))[1][0])


class Loader:
    """Bulk loading and index rebuilding, per backend, outside SqlCatalog (a benchmark's set-up, not its subject)."""

    def __init__(self, backend: str, url: str, dsn: str | None) -> None:
        self.backend, self.url, self.dsn = backend, url, dsn

    def _connect(self) -> Any:
        if self.backend == "sqlite":
            import sqlite3

            return sqlite3.connect(self.url.removeprefix("sqlite:///"), isolation_level=None)
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True)

    def load(self, start: int, stop: int) -> float:
        began = time.perf_counter()
        connection = self._connect()
        try:
            self._drop_indexes(connection)
            if self.backend == "sqlite":
                self._load_sqlite(connection, start, stop)
            else:
                self._load_postgresql(connection, start, stop)
            self._create_indexes(connection)
            connection.execute("ANALYZE")
        finally:
            connection.close()
        return time.perf_counter() - began

    def _drop_indexes(self, connection: Any) -> None:
        for name in [*SET_INDEXES, META_INDEX]:
            connection.execute(f"DROP INDEX IF EXISTS {name}")

    def _create_indexes(self, connection: Any) -> None:
        for name, columns in SET_INDEXES.items():
            connection.execute(f"CREATE INDEX {name} ON snapshot_sets ({', '.join(columns)})")
        connection.execute(f"CREATE INDEX {META_INDEX} ON set_metadata (key, value, created_at, set_id)")

    def _load_sqlite(self, connection: Any, start: int, stop: int) -> None:
        def stamp(value: datetime) -> str:
            return value.strftime("%Y-%m-%d %H:%M:%S.%f")

        connection.execute("PRAGMA synchronous = OFF")
        connection.execute("BEGIN")
        set_sql = f"INSERT INTO snapshot_sets ({', '.join(SET_COLUMNS)}) VALUES ({', '.join('?' * len(SET_COLUMNS))})"
        member_sql = (
            f"INSERT INTO members ({', '.join(MEMBER_COLUMNS)}) VALUES ({', '.join('?' * len(MEMBER_COLUMNS))})"
        )
        meta_sql = "INSERT INTO set_metadata (set_id, key, value, created_at) VALUES (?, ?, ?, ?)"
        for batch in _batches(rows(start, stop), 20_000):
            sets, members, metas = [], [], []
            for row, member_rows, meta in batch:
                sets.append([stamp(v) if isinstance(v, datetime) else v for v in row.values()])
                members += [list(m.values()) for m in member_rows]
                metas += [(row["id"], encoded(k), encoded(v), stamp(row["created_at"])) for k, v in meta.items()]
            connection.executemany(set_sql, sets)
            connection.executemany(member_sql, members)
            connection.executemany(meta_sql, metas)
        connection.execute("COMMIT")

    def _load_postgresql(self, connection: Any, start: int, stop: int) -> None:
        with connection.cursor() as cursor:
            copies = {
                "sets": f"COPY snapshot_sets ({', '.join(SET_COLUMNS)}) FROM STDIN",
                "members": f"COPY members ({', '.join(MEMBER_COLUMNS)}) FROM STDIN",
                "meta": "COPY set_metadata (set_id, key, value, created_at) FROM STDIN",
            }
            for batch in _batches(rows(start, stop), 50_000):
                with cursor.copy(copies["sets"]) as copy:
                    for row, _, _ in batch:
                        copy.write_row(list(row.values()))
                with cursor.copy(copies["members"]) as copy:
                    for _, member_rows, _ in batch:
                        for m in member_rows:
                            copy.write_row(list(m.values()))
                with cursor.copy(copies["meta"]) as copy:
                    for row, _, meta in batch:
                        for k, v in meta.items():
                            copy.write_row((row["id"], encoded(k), encoded(v), row["created_at"]))


def _batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


# ---- measurements ---------------------------------------------------------------------------------------------


def operations(catalog: SqlCatalog, size: int, probe_ids: list[str], deep: Cursor) -> dict[str, Callable[[], Any]]:
    middle = T0 + (size // 2) * STEP

    def page(**kw: Any) -> Callable[[], Any]:
        return lambda: catalog.page_sets(SetFilter(**kw), PAGE)

    probes = itertools.cycle(probe_ids)
    return {
        "first page": page(),
        "deep page (90 % down)": lambda: catalog.page_sets(SetFilter(), PAGE, deep),
        "instance": page(instance="inst-0123"),
        "status (failed, 2 %)": page(status=SetStatus.FAILED),
        "backup type (weekly)": page(backup_type="weekly"),
        "metadata (env=e3)": page(metadata={"env": "e3"}),
        "project": page(project="proj-007"),
        "kind (full)": page(kind="full"),
        "host": page(host="hv05"),
        "group (0.1 %)": page(group="grp-3"),
        "time range (1 day)": page(since=middle, until=middle + timedelta(days=1)),
        "more count (≤1000)": lambda: catalog.count_sets(SetFilter(), 1000, deep),
        "show by 8-char prefix": lambda: catalog.get_set(next(probes)[:8]),
        "stream 5000 sets": lambda: sum(1 for _ in itertools.islice(catalog.iter_sets(SetFilter()), 5000)),
        "SQL only: first page": sql_only(catalog, SetFilter(), None),
        "SQL only: deep page": sql_only(catalog, SetFilter(), deep),
        "SQL only: metadata page": sql_only(catalog, SetFilter(metadata={"env": "e3"}), None),
    }


def sql_only(catalog: SqlCatalog, wanted: SetFilter, cursor: Cursor | None) -> Callable[[], Any]:
    """The page's query alone (ids of the page): what the database does, without building the sets in Python."""

    def run() -> Any:
        with catalog.connect("benchmark page query", write=False) as connection:
            return connection.execute(page_query(connection, wanted, PAGE + 1, cursor)).all()

    return run


def baseline_first_page(catalog: SqlCatalog) -> Callable[[], Any]:
    """Before issue 18: every row's id and metadata read, filtered in Python, then one page loaded."""

    def run() -> Any:
        query = select(SETS.c.id, SETS.c.instance_uuid, SETS.c.metadata).order_by(SETS.c.created_at.desc(), SETS.c.id)
        with catalog.connect("baseline listing", write=False) as connection:
            entries = [(r.id, dict(r.metadata or {})) for r in connection.execute(query)]
        matching = [i for i, meta in entries if meta.get("env") == "e3"]
        return catalog.load_sets(matching[:PAGE]), len(matching)

    return run


def timed(action: Callable[[], Any], repeat: int) -> dict[str, Any]:
    action()  # warm: plans cached, pages in the buffer cache, as for a service that runs
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        action()
        samples.append((time.perf_counter() - began) * 1000.0)
    tracemalloc.start()
    try:
        action()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"ms": summary(samples), "peak_kib": round(peak / 1024, 1)}


def insert_cost(catalog: SqlCatalog, repeat: int) -> dict[str, Any]:
    """add_set of a new set (3 members, 3 metadata entries), then removed again so sizes stay exact."""
    from freezeframe.serialize import set_from_dict

    row, members, _ = next(rows(10**9, 10**9 + 1))
    template = {**{k: row[k] for k in ("id", "name", "status", "instance_state", "backup_type", "error")},
                "instance": {"name": row["instance_name"], "uuid": row["instance_uuid"]},
                "consistency": {"requested": "filesystem", "achieved": "filesystem", "reason": None},
                "freeze_window_ms": 12.5, "pause_window_ms": None, "created_at": row["created_at"].isoformat(),
                "completed_at": None, "metadata": {**json.loads(row["metadata"]), "ticket": "T-1"},
                "hardware": json.loads(HARDWARE),
                "members": [{**{k: m[k] for k in MEMBER_COLUMNS if k not in ("set_id", "virtual_size")},
                             "size": m["virtual_size"]} for m in members]}  # fmt: skip
    samples, added = [], []
    for _ in range(repeat + 1):
        set_id = str(uuid.uuid4())
        record = {**template, "id": set_id, "members": [{**m, "metadata": {"freezeframe.set": set_id}}
                                                        for m in template["members"]]}  # fmt: skip
        snapshot_set = set_from_dict(record)
        began = time.perf_counter()
        catalog.add_set(snapshot_set)
        samples.append((time.perf_counter() - began) * 1000.0)
        added.append(set_id)
    for set_id in added:
        catalog.delete_set(set_id)
    return {"ms": summary(samples[1:]), "peak_kib": None}


def measure(catalog: SqlCatalog, size: int, repeat: int) -> dict[str, Any]:
    with catalog.connect("probing", write=False) as connection:
        probe_ids = [r.id for r in connection.execute(select(SETS.c.id).order_by(SETS.c.created_at).limit(200))]
        deep_row = connection.execute(
            select(SETS.c.id, SETS.c.created_at).order_by(SETS.c.created_at).offset(size // 10).limit(1)
        ).one()
    deep = Cursor(deep_row.created_at, deep_row.id)
    results = {
        name: timed(action, min(3, repeat) if name.startswith("stream") else repeat)
        for name, action in operations(catalog, size, probe_ids, deep).items()
    }
    results["insert a set"] = insert_cost(catalog, repeat)
    if size <= BASELINE_MAX:
        results["baseline: metadata page, filtered in Python"] = timed(baseline_first_page(catalog), 1)
    return results


# ---- backends -------------------------------------------------------------------------------------------------


def run_backend(backend: str, sizes: tuple[int, ...], repeat: int, workdir: Path) -> dict[str, Any]:
    dsn = None
    if backend == "sqlite":
        url = f"sqlite:///{workdir / 'catalog.sqlite'}"
        server_info: dict[str, Any] = {"sqlite": __import__("sqlite3").sqlite_version}
    else:
        from freezeframe.testbed.postgres import Server

        server = Server()
        info = server.up()
        url = server.create_database("ff_bench_catalog")
        dsn = url.replace("postgresql+psycopg://", "postgresql://")
        server_info = {"postgresql": "15", "url": info.url_for("ff_bench_catalog").split("@")[-1]}
    SqlCatalog(url).close()  # the schema, by the migrations
    loader = Loader(backend, url, dsn)
    per_size: dict[str, Any] = {}
    have = 0
    try:
        for size in sizes:
            load_s = loader.load(have, size)
            have = size
            with SqlCatalog(url) as catalog:
                per_size[str(size)] = {"load_s": round(load_s, 1), "ops": measure(catalog, size, repeat)}
            medians = ", ".join(f"{k} {r['ms']['median']:.1f} ms" for k, r in per_size[str(size)]["ops"].items())
            print(f"{backend} {size}: loaded in {load_s:.0f} s; {medians}", flush=True)
    finally:
        if backend == "postgresql":
            server.drop_database("ff_bench_catalog")
    return {"server": server_info, "sizes": per_size}


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """Pages at the largest size against the 50 ms goal; insert and memory growth from smallest to largest."""
    out: dict[str, Any] = {}
    for backend, data in report["backends"].items():
        sizes = sorted(data["sizes"], key=int)
        small, large = data["sizes"][sizes[0]]["ops"], data["sizes"][sizes[-1]]["ops"]
        middle = data["sizes"][sizes[len(sizes) // 2]]["ops"]
        not_pages = ("baseline", "insert", "stream", "SQL")
        pages = {k: v["ms"]["p95"] for k, v in large.items() if not k.startswith(not_pages)}
        out[backend] = {
            "largest": int(sizes[-1]),
            "slowest_page_p95_ms": max(pages.values()),
            "slowest_page": max(pages, key=lambda k: pages[k]),
            "every_page_within_goal": max(pages.values()) <= GOAL_MS,
            "insert_median_ms": {sizes[0]: small["insert a set"]["ms"]["median"],
                                 sizes[-1]: large["insert a set"]["ms"]["median"]},
            # From the middle size up: at 10k some filters match fewer sets than a page (a smaller answer).
            "peak_kib_growth": round(max((large[k]["peak_kib"] or 0) / max(middle[k]["peak_kib"] or 1, 1)
                                         for k in large if large[k]["peak_kib"] and k in middle
                                         and not k.startswith("baseline")), 2),
            "peak_kib_from": int(sizes[len(sizes) // 2]),
        }  # fmt: skip
    return out


def draw(report: dict[str, Any], path: Path, note: str | None) -> None:
    plt = pyplot()
    backends = list(report["backends"])
    fig, axes = plt.subplots(1, len(backends), figsize=(6 * len(backends), 4.5), squeeze=False)
    for ax, backend in zip(axes[0], backends, strict=True):
        data = report["backends"][backend]["sizes"]
        sizes = sorted(data, key=int)
        names = list(data[sizes[-1]]["ops"])
        names += [n for n in data[sizes[0]]["ops"] if n not in names]
        palette = plt.get_cmap("tab20")
        for n, name in enumerate(names):
            xs = [int(s) for s in sizes if name in data[s]["ops"]]
            ys = [data[s]["ops"][name]["ms"]["median"] for s in sizes if name in data[s]["ops"]]
            style: dict[str, Any] = {"color": palette(n % 20), "marker": "os^vD"[n % 5]}
            if name.startswith("SQL only"):
                style["linestyle"] = ":"
            if name.startswith("baseline"):
                style = {"color": COLORS["baseline"], "linewidth": 2.5, "marker": "X"}
            ax.plot(xs, ys, label=name, **style)
        ax.axhline(GOAL_MS, color=COLORS["limit"], linestyle="--", label="goal: 50 ms")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sets in the catalog")
        ax.set_ylabel("median ms")
        ax.set_title(backend)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path, note)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args()
    if replot(args, "catalog", draw):
        return 0
    out = output_dir(args, "catalog")
    sizes, repeat = (QUICK_SIZES, QUICK_REPEAT) if args.quick else (SIZES, REPEAT)
    run = Run("catalog", args.quick, machine=machine_info())
    previous = out / "catalog.json"
    backends: dict[str, Any] = load_report(previous)["backends"] if previous.exists() and not args.quick else {}
    for backend in ("sqlite", "postgresql") if args.backend == "both" else (args.backend,):
        with tempfile.TemporaryDirectory(prefix="ffbench-catalog-", dir="/var/tmp") as workdir:
            backends[backend] = {**run_backend(backend, sizes, repeat, Path(workdir)), "when": run.when}
    report = {"backends": backends, "page_size": PAGE, "goal_ms": GOAL_MS, "repeat": repeat}
    report["verdict"] = verdict(report)
    path = run.write(out, report)
    draw(load_report(path), out / "catalog.png", run_note(args.quick))
    print(f"wrote {path}")
    print(json.dumps(report["verdict"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
