"""No set half-recorded by a database outage, in milliseconds: the agent's catalog writes are retried while the
connection is lost (and only then), a retried insert whose first attempt committed is done, and the reconciler
fails this host's sets left ``creating`` by ended jobs - and nothing else. On a SQLite catalog, no guest, no
PostgreSQL (``test_hosts_offline.py`` restarts a real PostgreSQL under load)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_errors

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.host_registry import HostRegistry
from freezeframe.adapters.service_store import FAILED, QUEUED, RUNNING, Job, JobStore
from freezeframe.agent import steady
from freezeframe.agent.reconcile import fail_stale_sets
from freezeframe.agent.steady import AgentWiring, SteadyCatalog, SteadyJobStore, outlast_outage
from freezeframe.api.projects import JOB_KEY
from freezeframe.config import Settings
from freezeframe.errors import CatalogError
from freezeframe.model import Consistency, Hardware, SetStatus, SnapshotSet
from freezeframe.ports import JournalEntry
from freezeframe.service import Freezeframe


def lost(what: str = "server closed the connection unexpectedly") -> CatalogError:
    error = CatalogError(f"catalog failed: {what}")
    error.__cause__ = sa_errors.OperationalError("SELECT 1", {}, Exception(what))
    return error


def refused() -> CatalogError:
    error = CatalogError("catalog refused it")
    error.__cause__ = sa_errors.IntegrityError("INSERT", {}, Exception("duplicate key"))
    return error


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steady, "FIRST_PAUSE_S", 0.001)
    monkeypatch.setattr(steady, "LONGEST_PAUSE_S", 0.002)


def test_a_lost_connection_is_retried_until_the_database_answers() -> None:
    answers: list[CatalogError | str] = [lost(), lost(), "written"]

    def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, CatalogError):
            raise answer
        return answer

    assert outlast_outage(call, "writing") == "written"
    assert answers == []


def test_a_refused_statement_is_not_retried_and_an_endless_outage_fails_clearly() -> None:
    calls = []

    def refuse() -> None:
        calls.append(1)
        raise refused()

    with pytest.raises(CatalogError, match="refused"):
        outlast_outage(refuse, "writing")
    assert calls == [1]

    def down() -> None:
        raise lost()

    with pytest.raises(CatalogError, match=r"stayed unreachable for over 0 s while recording set s1"):
        outlast_outage(down, "recording set s1", outage_s=0.05)


def a_set(job_id: str | None, status: SetStatus = SetStatus.CREATING) -> SnapshotSet:
    return SnapshotSet(
        id=str(uuid.uuid4()), name=f"s-{uuid.uuid4().hex[:6]}", instance_name="web",
        instance_uuid=str(uuid.uuid4()), requested=Consistency.CRASH, status=status, created_at=datetime.now(UTC),
        hardware=Hardware(vcpus=1, memory_kib=65536, arch="x86_64", machine=None),
        metadata={JOB_KEY: job_id} if job_id else {},
    )  # fmt: skip


def test_a_retried_write_whose_first_attempt_committed_is_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = SteadyCatalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    try:
        committed_then_cut = {"add_set": 1, "update_set": 1, "claim": 1}
        for name, owner in (("add_set", SqlCatalog), ("update_set", SqlCatalog), ("claim", JobStore)):
            real = getattr(owner, name)

            def once_lost(self: object, *args: object, _real: object = real, _name: str = name) -> object:
                result = _real(self, *args)  # type: ignore[operator]
                if committed_then_cut[_name]:
                    committed_then_cut[_name] -= 1
                    raise lost("connection cut before the commit was acknowledged")
                return result

            monkeypatch.setattr(owner, name, once_lost)
        made = a_set("job-1")
        catalog.add_set(made)  # the retry finds its own row instead of refusing a duplicate
        made.status = SetStatus.AVAILABLE
        catalog.update_set(made)
        assert catalog.get_set(made.id).status is SetStatus.AVAILABLE
        store = SteadyJobStore(catalog)
        job = Job(id="job-1", kind="snapshot", state=QUEUED, project=None, lock_key="instance:u",
                  request={}, created_at=datetime.now(UTC))  # fmt: skip
        store.add(job)
        claimed = store.claim("job-1", os.getpid())  # the retry recognises its own claim: the job is not lost
        assert claimed is not None and claimed.state == RUNNING
        assert store.claim("job-1", os.getpid() + 1) is None  # another delivery still claims nothing
        assert committed_then_cut == {"add_set": 0, "update_set": 0, "claim": 0}
    finally:
        catalog.close()


@pytest.fixture
def agent_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Freezeframe]:
    monkeypatch.delenv("FREEZEFRAME_CATALOG_URL", raising=False)
    monkeypatch.delenv("FREEZEFRAME_REPOSITORY", raising=False)
    settings = Settings(home=tmp_path / "home")
    service = Freezeframe(settings, AgentWiring(settings))
    try:
        yield service
    finally:
        service.close()


def test_the_reconciler_fails_only_this_hosts_sets_whose_job_ended(agent_service: Freezeframe) -> None:
    catalog, parts = agent_service.catalog, agent_service.parts
    registry, store = HostRegistry(catalog), JobStore(catalog)
    sets: dict[str, SnapshotSet] = {}
    for case, host, state in (
        ("ended here", "h1", FAILED), ("running here", "h1", RUNNING), ("ended elsewhere", "h2", FAILED),
        ("journaled here", "h1", FAILED), ("finished here", "h1", "succeeded"),
    ):  # fmt: skip
        job = Job(id=str(uuid.uuid4()), kind="snapshot", state=state, project=None, lock_key=f"i:{case}",
                  request={}, created_at=datetime.now(UTC))  # fmt: skip
        store.add(job)
        registry.route(job.id, host)
        made = a_set(job.id, SetStatus.AVAILABLE if case == "finished here" else SetStatus.CREATING)
        catalog.add_set(made)
        parts.repository.set_dir(made.id).mkdir(parents=True)
        sets[case] = made
    without_job = a_set(None)
    catalog.add_set(without_job)
    journaled = sets["journaled here"]
    parts.journal.record(JournalEntry(journaled.instance_uuid, "web", journaled.id, os.getpid(), "copying"))

    reports = fail_stale_sets(agent_service, registry, "h1")

    states = {case: catalog.get_set(s.id).status for case, s in sets.items()}
    assert states == {
        "ended here": SetStatus.FAILED, "running here": SetStatus.CREATING, "ended elsewhere": SetStatus.CREATING,
        "journaled here": SetStatus.CREATING, "finished here": SetStatus.AVAILABLE,
    }  # fmt: skip
    assert catalog.get_set(without_job.id).status is SetStatus.CREATING
    failed = catalog.get_set(sets["ended here"].id)
    assert failed.error is not None and "interrupted" in failed.error and "h1" in failed.error
    assert not parts.repository.set_dir(failed.id).exists()
    assert parts.repository.set_dir(sets["running here"].id).exists()
    assert len(reports) == 1 and sets["ended here"].id in reports[0]
    assert fail_stale_sets(agent_service, registry, "h1") == []  # nothing left to do


def test_the_reconciler_leaves_a_set_whose_instance_is_locked(agent_service: Freezeframe) -> None:
    catalog, parts = agent_service.catalog, agent_service.parts
    registry, store = HostRegistry(catalog), JobStore(catalog)
    job = Job(id=str(uuid.uuid4()), kind="snapshot", state=FAILED, project=None, lock_key="i:x",
              request={}, created_at=datetime.now(UTC))  # fmt: skip
    store.add(job)
    registry.route(job.id, "h1")
    made = a_set(job.id)
    catalog.add_set(made)
    with parts.locks.hold(made.instance_uuid):
        assert fail_stale_sets(agent_service, registry, "h1") == []
    assert catalog.get_set(made.id).status is SetStatus.CREATING
    assert len(fail_stale_sets(agent_service, registry, "h1")) == 1
    assert catalog.get_set(made.id).status is SetStatus.FAILED
