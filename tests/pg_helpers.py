"""The PostgreSQL test bed for tests: one server (idempotent ``up``), one database per test session, one schema per
test (a schema is made in milliseconds, a database in about a second).

``catalog_url`` is the fixture catalog tests are parametrized over: ``sqlite`` (a file in the test's tmp_path)
and ``postgresql`` (a fresh schema, reached through ``search_path``). Import it (and ``pg_server``) into a module.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from freezeframe.testbed.postgres import PostgresTestbed, Server

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresTestbed]:
    """The test bed, and a database of this session's own (several sessions may share the server)."""
    server = Server()
    info = server.up()
    name = f"ff_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    url = server.create_database(name)
    try:
        yield PostgresTestbed(**{**vars(info), "url": url, "database": name})
    finally:
        server.drop_database(name)


def schema_url(info: PostgresTestbed, schema: str) -> str:
    """The session database with ``schema`` first on the search path: an empty catalog of its own."""
    return f"{info.url}?options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_url(pg_server: PostgresTestbed) -> Iterator[str]:
    """A fresh, empty schema in the session's database; dropped after the test."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    dsn = pg_server.url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    try:
        yield schema_url(pg_server, schema)
    finally:
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=BACKENDS)
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty catalog on each backend: a SQLite file, then a PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'home' / 'catalog.sqlite'}"
    url: str = request.getfixturevalue("pg_url")
    return url
