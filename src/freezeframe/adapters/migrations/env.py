"""Alembic environment for the catalog.

SqlCatalog runs this programmatically (no alembic.ini) and hands over its own connection
through ``config.attributes["connection"]`` so migrations share the catalog's engine settings.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool, text

from freezeframe.adapters.catalog_schema import METADATA

PG_MIGRATION_LOCK = 0x66726565_7A65
"""Advisory lock key: serialises concurrent upgrades of one PostgreSQL catalog."""


def _run(connection: Connection) -> None:
    # Batch mode lets later revisions ALTER tables on SQLite, which cannot alter in place.
    context.configure(connection=connection, target_metadata=METADATA, render_as_batch=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # SQLite is guarded by a file lock in SqlCatalog; PostgreSQL needs its own guard.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
        context.run_migrations()


def run() -> None:
    config = context.config
    if context.is_offline_mode():
        context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=METADATA, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url or pass a connection in config.attributes['connection']")
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


run()
