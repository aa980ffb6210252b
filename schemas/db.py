"""Engines, sessions and schema migrations (alembic, shipped inside this package).

URLs: ``sqlite:///relative/or/absolute/path.db`` (the parent directory is created) and
``postgresql+psycopg://user:pass@host/db``; ``postgresql://`` and ``postgres://`` are
mapped to psycopg 3.

SQLite connections run in WAL mode with a busy timeout and foreign keys on, and every
transaction starts with ``BEGIN IMMEDIATE``: SQLite has one writer at a time anyway,
and taking the write lock up front means a read-then-write transaction can neither fail
with ``SQLITE_BUSY_SNAPSHOT`` nor interleave with another writer (so two schedulers in
two processes cannot reserve the same tracker).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

__all__ = [
    "MIGRATIONS_DIR",
    "current_revision",
    "include_object",
    "json_param",
    "make_engine",
    "normalize_url",
    "session_factory",
    "upgrade",
]

PACKAGE_DIR = Path(__file__).resolve().parent
MIGRATIONS_DIR = PACKAGE_DIR / "migrations"
ALEMBIC_INI = PACKAGE_DIR / "alembic.ini"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def json_param(rows: Iterable[Any]) -> str:
    """A batch's rows as one JSON parameter, for ``json_to_recordset`` (objects) or
    ``json_array_elements_text`` (strings) on PostgreSQL. One string is dumped at C
    speed; arrays of text and timestamps are dumped by psycopg element by element in
    Python (about 10x the client CPU for 500 rows). Datetimes become RFC 3339 (naive
    ones are taken as UTC); callers pass finite floats only (JSON has no NaN)."""
    return orjson.dumps(list(rows), option=orjson.OPT_NAIVE_UTC).decode()


def normalize_url(url: str | URL) -> URL:
    """The URL with a driver SQLAlchemy can use here (psycopg 3 for PostgreSQL)."""
    u = make_url(url) if isinstance(url, str) else url
    if u.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        u = u.set(drivername="postgresql+psycopg")
    if u.drivername == "sqlite+pysqlite":
        u = u.set(drivername="sqlite")
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"unsupported database URL {u.render_as_string(hide_password=True)!r}: "
            "use sqlite:///path.db or postgresql+psycopg://user@host/db"
        )
    return u


def _sqlite_memory(u: URL) -> bool:
    return u.database in (None, "", ":memory:") or (u.query.get("mode") == "memory")


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine for ``url``, configured for the pipeline (see the module docstring)."""
    u = normalize_url(url)
    if u.get_backend_name() == "sqlite":
        return _sqlite_engine(u, **kwargs)
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(u, **kwargs)


def _sqlite_engine(u: URL, **kwargs: Any) -> Engine:
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("check_same_thread", False)
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
    memory = _sqlite_memory(u)
    if memory:
        kwargs.setdefault("poolclass", StaticPool)
    elif u.database:
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(u, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see below)
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """For alembic autogenerate: skip the views and their tables that
    :mod:`schemas.views` owns, and the history's partitions (:mod:`schemas.history`)."""
    from schemas.history import is_partition_name
    from schemas.views import OWNED_TABLES

    if type_ == "table" and (name in OWNED_TABLES or is_partition_name(name)):
        return False
    table = getattr(obj, "table", None)
    table_name = getattr(table, "name", None) if table is not None else None
    return not (table_name in OWNED_TABLES or is_partition_name(table_name))


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (``expire_on_commit=False``)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def _alembic_config(url: str | URL) -> Any:
    from alembic.config import Config

    cfg = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.exists() else Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = normalize_url(url)
    cfg.attributes["configure_logging"] = False
    return cfg


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision`` (creating tables and views).

    Runs from the migrations shipped in this package, whatever the working directory.
    Upgrading a database that is already at ``revision`` does nothing; concurrent
    upgrades are serialised (an advisory lock on PostgreSQL, the write lock on SQLite).
    """
    from alembic import command

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            cfg = _alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
    finally:
        engine.dispose()


def current_revision(url: str | URL) -> str | None:
    """The database's alembic revision, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision shipped in the package."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
