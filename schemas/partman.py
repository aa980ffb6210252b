"""Handing the history's partitions to pg_partman, where the server has it.

:func:`enable` puts ``location_history`` and ``geofence_events`` under pg_partman
(``native``, monthly, ``premake`` months ahead, retention optional): the month
partitions that exist are renamed to pg_partman's names (``<table>_pYYYY_MM``), the
default partition is replaced by pg_partman's (its rows move back through the
parent, so each lands in its month or the new default) and ``create_parent`` is
called, all in one transaction that holds the parent's exclusive lock for its length
(inserts wait; milliseconds while the default partition is small). From then on
:func:`schemas.history.ensure_partitions` and :func:`schemas.history.prune` leave
those tables' partitions alone: pg_partman's ``run_maintenance`` creates and drops
them (run by its background worker, by pg_cron, or by ``trackstream history partman
--run``; it takes a lock of its own, so two runs never race). Prune still trims the
default partition's stragglers and the delivery log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, text

from schemas import history

__all__ = ["Managed", "available", "enable", "installed_schema", "managed", "run", "set_retention"]

log = logging.getLogger("trackstream.history")

SCHEMA = "partman"


class PartmanUnavailable(RuntimeError):
    """The server has no pg_partman extension to install."""


def available(conn: Connection) -> bool:
    """Whether the server can install pg_partman (its files are there)."""
    if conn.dialect.name != "postgresql":
        return False
    return bool(
        conn.scalar(
            text("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_partman')")
        )
    )


def installed_schema(conn: Connection) -> str | None:
    """The schema pg_partman is installed in, None when it is not installed here."""
    if conn.dialect.name != "postgresql":
        return None
    found = conn.scalar(
        text(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
            " WHERE e.extname = 'pg_partman'"
        )
    )
    return str(found) if found else None


@dataclass(frozen=True)
class Managed:
    table: str
    premake: int
    retention: str | None  # an interval as pg_partman stores it ('400 days'), or None


def managed(conn: Connection) -> dict[str, Managed]:
    """The history tables pg_partman manages (of the current schema), by name."""
    ext = installed_schema(conn)
    if ext is None:
        return {}
    out = {}
    rows = conn.execute(
        text(
            f'SELECT parent_table, premake, retention FROM "{ext}".part_config'
            " WHERE split_part(parent_table, '.', 1) = current_schema()"
        )
    )
    for parent, premake, retention in rows:
        table = str(parent).split(".", 1)[1]
        if table in history.PARTITIONED:
            out[table] = Managed(table, int(premake), retention)
    return out


def _interval(days: int | None) -> str | None:
    return None if days is None else f"{int(days)} days"


def set_retention(conn: Connection, retention_days: int | None) -> None:
    """pg_partman's retention for the managed tables: partitions that end more than
    this long ago are detached and dropped by its maintenance (None: keep all)."""
    ext = installed_schema(conn)
    if ext is None:
        return
    conn.execute(
        text(
            f'UPDATE "{ext}".part_config SET retention = :r, retention_keep_table = false,'
            " infinite_time_partitions = true"
            " WHERE split_part(parent_table, '.', 1) = current_schema()"
            " AND split_part(parent_table, '.', 2) = ANY(:tables)"
        ),
        {"r": _interval(retention_days), "tables": list(history.PARTITIONED)},
    )


def enable(
    engine: Engine, *, retention_days: int | None = None, premake: int = history.AHEAD_MONTHS
) -> list[str]:
    """Puts the history tables under pg_partman (see the module's text). Returns the
    tables newly handed over ([] when all were already). Raises PartmanUnavailable
    when the server has no pg_partman."""
    if premake < 1:
        raise ValueError(f"premake must be at least 1, not {premake}")
    done: list[str] = []
    with engine.begin() as conn:
        if not available(conn):
            raise PartmanUnavailable(
                "the server has no pg_partman extension (Debian: postgresql-15-partman)"
            )
        # our own maintenance waits for this (same lease), so it never sees half a switch
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": history.LEASE_KEY})
        ext = installed_schema(conn)
        if ext is None:
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"'))
            conn.execute(text(f'CREATE EXTENSION pg_partman SCHEMA "{SCHEMA}"'))
            ext = SCHEMA
        have = managed(conn)
        schema = str(conn.scalar(text("SELECT current_schema()")))
        for table in history.PARTITIONED:
            if table in have or not history.is_partitioned(conn, table):
                continue
            _hand_over(conn, ext, schema, table, premake)
            done.append(table)
        set_retention(conn, retention_days)
    if done:
        log.info("pg_partman now manages %s", ", ".join(done))
    return done


def _hand_over(conn: Connection, ext: str, schema: str, table: str, premake: int) -> None:
    conn.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
    parts = history.partitions(conn, table)
    months = [p for p in parts if p.start is not None]
    for p in months:
        assert p.start is not None
        name = f"{table}_p{p.start:%Y_%m}"  # pg_partman's monthly names
        if p.name != name:
            conn.execute(text(f'ALTER TABLE "{p.name}" RENAME TO "{name}"'))
    dflt = history.default_name(table)
    old = None
    if conn.scalar(text("SELECT to_regclass(:d) IS NOT NULL"), {"d": dflt}):
        old = f"{dflt}_handover"
        conn.execute(text(f'ALTER TABLE {table} DETACH PARTITION "{dflt}"'))
        conn.execute(text(f'ALTER TABLE "{dflt}" RENAME TO "{old}"'))
    # create_parent makes the default partition only when it creates a month, so it
    # starts after the newest month there is; the ones before it are kept by name
    start = history.month_start(datetime.now(UTC))
    if months:
        newest = max(p.start for p in months if p.start is not None)
        start = max(start, history.next_month(newest))
    ok = conn.scalar(
        text(
            f"SELECT \"{ext}\".create_parent(:parent, :col, 'native', 'monthly',"
            " p_premake := :premake, p_start_partition := :start, p_jobmon := false)"
        ),
        {
            "parent": f"{schema}.{table}",
            "col": history.KEY,
            "premake": premake,
            "start": start.strftime("%Y-%m-%d %H:%M:%S+00"),
        },
    )
    if not ok or not conn.scalar(text("SELECT to_regclass(:d) IS NOT NULL"), {"d": dflt}):
        raise RuntimeError(f"pg_partman's create_parent did not set up {table}")
    if old is not None:
        moved = conn.execute(text(f'INSERT INTO {table} SELECT * FROM "{old}"')).rowcount
        conn.execute(text(f'DROP TABLE "{old}"'))
        if moved:
            log.info("%s: %d rows of the old default partition routed again", table, moved)


def run(engine: Engine) -> None:
    """One round of pg_partman's maintenance (creation ahead, retention) for the
    managed history tables: what its background worker or a cron job does."""
    with engine.begin() as conn:
        ext = installed_schema(conn)
        if ext is None:
            raise PartmanUnavailable("pg_partman is not installed in this database")
        for table in managed(conn):
            schema = conn.scalar(text("SELECT current_schema()"))
            conn.execute(
                text(f'SELECT "{ext}".run_maintenance(:p, p_jobmon := false, p_analyze := false)'),
                {"p": f"{schema}.{table}"},
            )
