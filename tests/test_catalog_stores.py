"""The adapters that keep rows beside the sets (jobs, tokens, project mapping, image owners, restores, stored
images) and concurrent writers, on SQLite and on the PostgreSQL test bed."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.image_records import ImageRecords
from freezeframe.adapters.restore_log import RestoreLog
from freezeframe.adapters.service_store import (
    QUEUED,
    RUNNING,
    SUCCEEDED,
    ImageOwners,
    Job,
    JobStore,
    ProjectMap,
    TokenStore,
)
from freezeframe.errors import ImageNotFound, JobNotFound
from freezeframe.model import RestoreRecord
from freezeframe.ports import ImageSummary, StoredImage
from pg_helpers import catalog_url, pg_server, pg_url
from test_catalog import make_set, member

__all__ = ["catalog_url", "pg_server", "pg_url"]  # fixtures

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[SqlCatalog]:
    with SqlCatalog(catalog_url) as cat:
        yield cat


def job(job_id: str, created: datetime, project: str = "alpha") -> Job:
    return Job(id=job_id, kind="snapshot", state=QUEUED, project=project, lock_key="instance:x",
               request={"name": "n"}, created_at=created)  # fmt: skip


def test_jobs_round_trip_query_and_update(catalog: SqlCatalog) -> None:
    jobs = JobStore(catalog)
    jobs.add(job("j1", T0))
    jobs.add(job("j2", T0 + timedelta(minutes=1), project="beta"))
    jobs.update("j1", state=RUNNING, progress_done=5, progress_total=10, phase="copying")
    got = jobs.get("j1")
    assert (got.state, got.progress_done, got.phase, got.request) == (RUNNING, 5, "copying", {"name": "n"})
    assert [j.id for j in jobs.query()] == ["j2", "j1"]
    assert [j.id for j in jobs.query(projects=["beta"])] == ["j2"]
    assert [j.id for j in jobs.query(state=RUNNING)] == ["j1"]
    assert [j.id for j in jobs.unfinished()] == ["j1", "j2"]
    jobs.update("j1", state=SUCCEEDED, result={"set_id": "s"})
    assert jobs.get("j1").result == {"set_id": "s"} and [j.id for j in jobs.unfinished()] == ["j2"]
    with pytest.raises(JobNotFound):
        jobs.get("nope")


def test_tokens_authenticate_and_revoke(catalog: SqlCatalog) -> None:
    tokens = TokenStore(catalog)
    issued = tokens.create("member", "alpha", "ci")
    found = tokens.authenticate(issued.secret)
    assert found is not None and (found.project, found.role) == ("alpha", "member")
    assert tokens.authenticate(issued.secret + "x") is None
    first = tokens.revoke(issued.token.id).revoked_at
    assert tokens.authenticate(issued.secret) is None
    assert tokens.revoke(issued.token.id).revoked_at == first  # idempotent
    assert [t.id for t in tokens.all(include_revoked=False)] == []


def test_project_map_and_image_owners_upsert(catalog: SqlCatalog) -> None:
    projects = ProjectMap(catalog)
    projects.assign("u1", "web", "alpha")
    projects.assign("u1", "web-renamed", "beta")  # same key: one row, updated
    assert projects.get("u1") == "beta"
    assert [(a.instance_name, a.project) for a in projects.all().values()] == [("web-renamed", "beta")]
    assert projects.unassign("u1") and not projects.unassign("u1")
    owners = ImageOwners(catalog)
    owners.record("i1", "alpha", None)
    owners.record("i1", "beta", "s1")
    assert owners.all() == {"i1": "beta"}
    owners.forget("i1")
    assert owners.all() == {}


def test_restore_log(catalog: SqlCatalog) -> None:
    s = make_set()
    catalog.add_set(s)
    log = RestoreLog(catalog)
    log.add([RestoreRecord(s.id, "clone", "vda", "/p/vda.qcow2", "cow", T0),
             RestoreRecord(s.id, "clone", "sdb", "/p/sdb.qcow2", "full", T0)])  # fmt: skip
    log.bind_uuid("clone", "uuid-1")
    assert [(r.target, r.instance_uuid) for r in log.for_set(s.id)] == [("vda", "uuid-1"), ("sdb", "uuid-1")]
    assert len(log.for_instance("uuid-1")) == 2 and len(log.for_instance("clone")) == 2
    first = log.all()[0]
    assert first.id is not None
    log.remove_ids([first.id])
    assert [r.target for r in log.all()] == ["sdb"]
    log.remove_instance("clone")
    assert log.all() == []


def test_image_records(catalog: SqlCatalog) -> None:
    records = ImageRecords(catalog, "file:///images")
    summary = ImageSummary(machine_name="web", vcpus=1, memory_bytes=2**30, ovf_version=2, disk_format="vmdk")
    image = StoredImage(
        id="abcd1234-0000-0000-0000-000000000000", name="web-image", filename="web.ova", store="file:///images",
        size=5 * 2**40, sha256="ab" * 32, created_at=T0, summary=summary,
    )  # fmt: skip
    records.add(image)
    assert records.find("ABCD1") == image and records.find("web-image") == image
    records.mark(image.id, "deleting")
    assert [i.status for i in records.all()] == ["deleting"] and records.all(status="available") == []
    assert ImageRecords(catalog, "file:///elsewhere").ids() == set()
    records.remove(image.id)
    with pytest.raises(ImageNotFound):
        records.find(image.id)


# -- concurrent writers --------------------------------------------------------------------------------------


def _writer(url: str, barrier: Any, worker: int, count: int) -> None:
    """One agent: adds sets, assigns one shared instance, moves one shared job along."""
    barrier.wait(timeout=120)
    with SqlCatalog(url) as cat:
        projects, jobs = ProjectMap(cat), JobStore(cat)
        for n in range(count):
            cat.add_set(make_set(f"w{worker}-{n}", created_at=T0 + timedelta(seconds=n)))
            projects.assign("shared-instance", f"w{worker}", f"p{worker}")
            jobs.update("shared-job", progress_done=n)


def test_processes_writing_concurrently_lose_nothing(catalog: SqlCatalog, catalog_url: str) -> None:
    JobStore(catalog).add(job("shared-job", T0))
    ctx = multiprocessing.get_context("spawn")
    workers, count = 4, 15
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_writer, args=(catalog_url, barrier, w, count)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * workers
    names = sorted(s.name for s in catalog.list_sets())
    assert names == sorted(f"w{w}-{n}" for w in range(workers) for n in range(count))
    assert all(len(s.members) == 2 for s in catalog.list_sets())
    assert len(ProjectMap(catalog).all()) == 1
    assert JobStore(catalog).get("shared-job").progress_done == count - 1


def test_threads_updating_one_set_leave_one_writers_members(catalog: SqlCatalog) -> None:
    """Every update replaces the row and its members in one transaction: the final members are all from the
    writer whose row won, never a mix or a duplicate."""
    s = make_set()
    catalog.add_set(s)
    errors: list[Exception] = []

    def write(worker: int) -> None:
        try:
            for n in range(10):
                mine = make_set(f"t{worker}-{n}", set_id=s.id)
                mine.members = [member(s.id, t, sha256=f"{worker:02d}" * 32) for t in ("vda", "vdb", "vdc")]
                catalog.update_set(mine)
        except Exception as exc:  # noqa: BLE001 - collected, and the test asserts there are none
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    final = catalog.get_set(s.id)
    winner = int(final.name[1 : final.name.index("-")])
    assert [m.target for m in final.members] == ["vda", "vdb", "vdc"]
    assert {m.sha256 for m in final.members} == {f"{winner:02d}" * 32}
