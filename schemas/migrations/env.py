"""Alembic environment: runs on the connection :func:`schemas.db.upgrade` hands over, or
(alembic CLI) on ``-x url=...`` / ``TRACKSTREAM_DATABASE_URL`` / ``sqlalchemy.url``.

Concurrent upgrades are serialised: an advisory lock on PostgreSQL, the write lock
(``BEGIN IMMEDIATE``) on SQLite; the second one finds the schema current and does nothing.
"""

from __future__ import annotations

import os
from typing import Any

from alembic import context
from sqlalchemy import Connection, text

from schemas.db import include_object, make_engine
from schemas.tables import Base

config = context.config
target_metadata = Base.metadata
MIGRATION_LOCK = 0x7472_6B73  # "trks"


def _url() -> Any:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    url = (
        url
        or os.environ.get("TRACKSTREAM_DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise RuntimeError("no database URL: pass -x url=... or set TRACKSTREAM_DATABASE_URL")
    return url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_object=include_object,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # SQLite's DDL is transactional too (we issue BEGIN IMMEDIATE ourselves): one
        # transaction for the whole upgrade, so a concurrent upgrade waits for all of
        # it instead of starting between two revisions and running them again
        transactional_ddl=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=str(_url()),
        target_metadata=target_metadata,
        literal_binds=True,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
