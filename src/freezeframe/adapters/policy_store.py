"""The PolicyStore port over the catalog (table ``policies``, revision 0008). ``claim_tick`` is a compare-and-set
on ``last_tick``, so two schedulers (or a scheduler and a restart) never start the same tick twice."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, update

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.catalog_schema import POLICIES
from freezeframe.errors import InvalidRequest, PolicyNotFound
from freezeframe.ports.policies import Policy, PolicyState


def _state(row: Any) -> PolicyState:
    values = dict(row._mapping)
    return PolicyState(
        policy=Policy.from_record(values["name"], dict(values["record"])), paused=bool(values["paused"]),
        created_at=values["created_at"], last_tick=values["last_tick"], last_job_id=values["last_job_id"],
        last_outcome=values["last_outcome"], last_error=values["last_error"],
    )  # fmt: skip


class CatalogPolicies:
    def __init__(self, catalog: SqlCatalog) -> None:
        self._catalog = catalog

    def add(self, policy: Policy, created_at: datetime) -> None:
        with self._catalog.connect(f"adding policy {policy.name}", write=True) as connection:
            if connection.scalar(select(POLICIES.c.name).where(POLICIES.c.name == policy.name)) is not None:
                raise InvalidRequest(f"policy {policy.name} exists already; delete it first to change it")
            connection.execute(insert(POLICIES).values(name=policy.name, record=policy.to_record(), paused=0,
                                                       created_at=created_at))  # fmt: skip

    def get(self, name: str) -> PolicyState:
        with self._catalog.connect(f"reading policy {name}", write=False) as connection:
            row = connection.execute(select(POLICIES).where(POLICIES.c.name == name)).first()
        if row is None:
            raise PolicyNotFound(f"no policy named {name}; `freezeframe policy list` shows them")
        return _state(row)

    def all(self) -> list[PolicyState]:
        with self._catalog.connect("listing policies", write=False) as connection:
            return [_state(r) for r in connection.execute(select(POLICIES).order_by(POLICIES.c.name))]

    def remove(self, name: str) -> None:
        self.get(name)
        with self._catalog.connect(f"deleting policy {name}", write=True) as connection:
            connection.execute(delete(POLICIES).where(POLICIES.c.name == name))

    def set_paused(self, name: str, paused: bool) -> None:
        self.get(name)
        with self._catalog.connect(f"pausing policy {name}", write=True) as connection:
            connection.execute(update(POLICIES).where(POLICIES.c.name == name).values(paused=int(paused)))

    def claim_tick(self, name: str, previous: datetime | None, tick: datetime) -> bool:
        condition = POLICIES.c.last_tick.is_(None) if previous is None else POLICIES.c.last_tick == previous
        with self._catalog.connect(f"starting policy {name}", write=True) as connection:
            done = connection.execute(update(POLICIES).where(POLICIES.c.name == name, condition).values(last_tick=tick))
            return bool(done.rowcount == 1)

    def record_outcome(self, name: str, job_id: str, outcome: str, error: str | None) -> None:
        with self._catalog.connect(f"recording a run of policy {name}", write=True) as connection:
            connection.execute(update(POLICIES).where(POLICIES.c.name == name).values(
                last_job_id=job_id, last_outcome=outcome, last_error=error))  # fmt: skip
