"""PostgreSQL: ``location_history`` and ``geofence_events`` become range-partitioned by
``observed_at``, one partition a month (UTC) and a default partition; SQLite keeps
plain tables (nothing to do).

The conversion copies each table into its partitioned twin, with downtime for
writers: the old table is locked EXCLUSIVE (reads go on, writes wait) for the copy,
the index builds and the foreign key check, then swapped in under an ACCESS
EXCLUSIVE lock. Columns, defaults, checks, indexes and foreign keys are taken from
the table as it is (whatever columns other migrations added); the primary key and
the unique keys gain ``observed_at`` where they lack it (PostgreSQL requires the
partition key in them). Months with data in the last five years get a partition, as
do the current month and the next three; older rows go to the default partition.

Revision ID: 0011
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime

from alembic import op
from sqlalchemy import Connection, text

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("location_history", "geofence_events")
KEY = "observed_at"
AHEAD_MONTHS = 3
PAST_YEARS = 5


def _month(at: datetime) -> datetime:
    at = at.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def _next(m: datetime) -> datetime:
    return datetime(m.year + m.month // 12, m.month % 12 + 1, 1, tzinfo=UTC)


def _lit(at: datetime) -> str:
    return f"'{at:%Y-%m-%d %H:%M:%S}+00'"


def _with_key(definition: str) -> str:
    """``PRIMARY KEY (id)`` -> ``PRIMARY KEY (id, observed_at)``; unchanged if there."""
    m = re.match(r"^(PRIMARY KEY|UNIQUE) \((.*)\)(.*)$", definition)
    if not m or KEY in [c.strip() for c in m.group(2).split(",")]:
        return definition
    return f"{m.group(1)} ({m.group(2)}, {KEY}){m.group(3)}"


def _without_key(definition: str) -> str:
    """The primary key back to ``(id)`` (the unique keys had observed_at already)."""
    if definition.startswith("PRIMARY KEY"):
        return definition.replace(f", {KEY})", ")")
    return definition


def _shape(conn: Connection, table: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """The table's keys and foreign keys (name, type, definition; primary key first) and
    its other indexes' definitions."""
    referenced = conn.scalar(
        text("SELECT count(*) FROM pg_constraint WHERE confrelid = CAST(:t AS regclass)"),
        {"t": table},
    )
    if referenced:
        raise RuntimeError(f"{table} is referenced by a foreign key: cannot convert it")
    constraints = [
        (n, t, d)
        for n, t, d in conn.execute(
            text(
                "SELECT conname, contype, pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conrelid = CAST(:t AS regclass) AND contype IN ('p', 'u', 'f')"
                " ORDER BY contype = 'p' DESC, contype = 'u' DESC, conname"
            ),
            {"t": table},
        )
    ]
    indexes = list(
        conn.scalars(
            text(
                "SELECT pg_get_indexdef(indexrelid) FROM pg_index"
                " WHERE indrelid = CAST(:t AS regclass) AND indexrelid NOT IN"
                " (SELECT conindid FROM pg_constraint WHERE conrelid = CAST(:t AS regclass))"
                " ORDER BY indexrelid"
            ),
            {"t": table},
        )
    )
    return constraints, indexes


def _swap(
    conn: Connection, table: str, create_suffix: str, fix: object, partitions: list[datetime]
) -> None:
    constraints, indexes = _shape(conn, table)
    seq = conn.scalar(text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table})
    new = f"{table}__new"
    conn.execute(
        text(
            f"CREATE TABLE {new} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
            f" INCLUDING STORAGE INCLUDING COMMENTS){create_suffix}"
        )
    )
    if create_suffix:
        conn.execute(text(f"CREATE TABLE {table}_default PARTITION OF {new} DEFAULT"))
        for m in partitions:
            conn.execute(
                text(
                    f"CREATE TABLE {table}_p{m:%Y%m} PARTITION OF {new}"
                    f" FOR VALUES FROM ({_lit(m)}) TO ({_lit(_next(m))})"
                )
            )
    conn.execute(text(f"INSERT INTO {new} SELECT * FROM {table}"))
    if seq:
        conn.execute(text(f"ALTER SEQUENCE {seq} OWNED BY {new}.id"))
    conn.execute(text(f"DROP TABLE {table}"))
    conn.execute(text(f"ALTER TABLE {new} RENAME TO {table}"))
    for name, _kind, definition in constraints:
        conn.execute(text(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {fix(definition)}'))  # type: ignore[operator]
    for definition in indexes:
        conn.execute(text(definition))
    conn.execute(text(f"ANALYZE {table}"))


def _months(conn: Connection, table: str) -> list[datetime]:
    now = datetime.now(UTC)
    since = datetime(now.year - PAST_YEARS, now.month, 1, tzinfo=UTC)
    found = {
        _month(m)
        for m in conn.scalars(
            text(
                f"SELECT DISTINCT date_trunc('month', {KEY} AT TIME ZONE 'UTC')"
                f" AT TIME ZONE 'UTC' FROM {table} WHERE {KEY} >= :since"
            ),
            {"since": since},
        )
    }
    m = _month(now)
    for _ in range(AHEAD_MONTHS + 1):
        found.add(m)
        m = _next(m)
    return sorted(found)


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    for table in TABLES:
        partitioned = conn.scalar(
            text(
                "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table"
                " WHERE partrelid = CAST(:t AS regclass))"
            ),
            {"t": table},
        )
        if partitioned:
            continue
        conn.execute(text(f"LOCK TABLE {table} IN EXCLUSIVE MODE"))
        _swap(conn, table, f" PARTITION BY RANGE ({KEY})", _with_key, _months(conn, table))


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    for table in TABLES:
        conn.execute(text(f"LOCK TABLE {table} IN EXCLUSIVE MODE"))
        _swap(conn, table, "", _without_key, [])
