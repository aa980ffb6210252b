"""Time-partitioned history on PostgreSQL, and retention on both dialects.

On PostgreSQL ``location_history`` and ``geofence_events`` are range-partitioned by
``observed_at``, one partition per calendar month (UTC), named ``<table>_pYYYYMM``,
plus ``<table>_default``: a report whose month has no partition (far past, far
future) lands there and is counted (:func:`status`), never refused. The partition key
is part of each unique key: ``(tracker_id, observed_at)``, ``(id, observed_at)``.

:func:`ensure_partitions` creates the coming months ahead of time (the reconciler
calls it every round). A transaction-scoped advisory lock is the lease: a second
process that finds it taken does nothing, so processes never race to create one.
Rows that already sit in the default partition for a month being created are moved
into it in the same transaction.

:func:`prune` drops whole partitions older than the cut-off: ``DETACH PARTITION``
then ``DROP TABLE``, never a row-by-row delete of live data. PostgreSQL refuses
``DETACH ... CONCURRENTLY`` on a table that has a default partition, so the detach is
the plain one, bounded by ``lock_timeout`` (it needs the parent's exclusive lock for
a catalog change of milliseconds; a detach that cannot have it in time gives up and
is retried, so writers wait at most that long). Rows older than the cut-off in the
default partition are deleted in small batches. On SQLite (a plain table) prune is a
batched delete, each batch sized to hold the write lock about :data:`BATCH_TARGET_S`.

``latest_location`` is a table of its own and keeps every tracker's last position
whatever retention drops (see :mod:`schemas.views`). Webhook deliveries that are
finished and the delivery log follow the same cut-off.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

__all__ = [
    "AHEAD_MONTHS",
    "PARTITIONED",
    "Partition",
    "PruneResult",
    "ensure_partitions",
    "is_partitioned",
    "maintain",
    "month_start",
    "next_month",
    "parse_age",
    "partition_name",
    "partitions",
    "prune",
    "status",
]

log = logging.getLogger("trackstream.history")

PARTITIONED = ("location_history", "geofence_events")
KEY = "observed_at"
AHEAD_MONTHS = 3  # the current month and the next three exist at all times
LEASE_KEY = 0x7472_6B68  # "trkh": the advisory lock partition maintenance holds
PRUNE_KEY = 0x7472_6B70  # "trkp": the one a prune holds while it runs
LOCK_TIMEOUT_MS = 50  # how long a DDL statement may wait for its lock (writers wait too)
BATCH_TARGET_S = 0.05  # SQLite: a delete batch holds the write lock about this long
DDL_RETRIES = 20

# the tables retention also trims (plain tables, batched deletes): table -> time column
# and the condition that a row is finished with
_TRIMMED = {
    "webhook_deliveries": ("observed_at", "state <> 'pending'"),
    "webhook_attempts": ("at", "true"),
}


def month_start(at: datetime) -> datetime:
    at = at.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def next_month(start: datetime) -> datetime:
    return datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)


def partition_name(table: str, start: datetime) -> str:
    return f"{table}_p{start:%Y%m}"


def default_name(table: str) -> str:
    return f"{table}_default"


# ours: <table>_pYYYYMM; pg_partman's (schemas.partman): <table>_pYYYY_MM
_PARTITION_NAME = re.compile(rf"^({'|'.join(PARTITIONED)})_(p\d{{4}}_?\d{{2}}|default)$")


def is_partition_name(name: str | None) -> bool:
    return bool(name and _PARTITION_NAME.match(name))


def parse_age(value: str) -> timedelta:
    """``400d``, ``12w``, ``36h`` or a bare number of days, as a duration."""
    m = re.fullmatch(r"\s*(\d+)\s*([dwh]?)\s*", value or "")
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"not an age: {value!r} (use 400d, 12w or 36h)")
    n, unit = int(m.group(1)), m.group(2) or "d"
    return {"d": timedelta(days=n), "w": timedelta(weeks=n), "h": timedelta(hours=n)}[unit]


def _pg(conn: Connection | Engine) -> bool:
    return conn.dialect.name == "postgresql"


def is_partitioned(conn: Connection, table: str) -> bool:
    if not _pg(conn):
        return False
    return bool(
        conn.scalar(
            text(
                "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table p JOIN pg_class c"
                " ON c.oid = p.partrelid WHERE c.relname = :t"
                " AND c.relnamespace = current_schema()::regnamespace)"
            ),
            {"t": table},
        )
    )


@dataclass(frozen=True)
class Partition:
    """One partition (or, on SQLite, the whole table: ``start``/``end`` None)."""

    table: str
    name: str
    start: datetime | None  # None: the default partition (or SQLite's table)
    end: datetime | None
    rows: int  # exact on SQLite and for the default partition; else the planner's estimate
    bytes: int | None  # with indexes and TOAST; None on SQLite
    oldest: datetime | None = None  # SQLite and the default partition only
    newest: datetime | None = None

    @property
    def default(self) -> bool:
        return self.start is None


_PARTITIONS_SQL = text(
    "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound,"
    " CAST((regexp_match(pg_get_expr(c.relpartbound, c.oid),"
    " 'FROM \\(''([^'']+)''\\)'))[1] AS timestamptz) AS lo,"
    " CAST((regexp_match(pg_get_expr(c.relpartbound, c.oid),"
    " 'TO \\(''([^'']+)''\\)'))[1] AS timestamptz) AS hi,"
    " greatest(c.reltuples, 0)::bigint, pg_total_relation_size(c.oid)"
    " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
    " WHERE i.inhparent = CAST(:t AS regclass) ORDER BY lo NULLS FIRST"
)


def partitions(conn: Connection, table: str, *, exact: bool = False) -> list[Partition]:
    """The table's partitions by time, the default one first. On SQLite: the table as
    one. ``exact`` counts the rows of every partition (a scan each); otherwise the
    default partition's are counted and the others' estimated."""
    if not is_partitioned(conn, table):
        rows, oldest, newest = conn.execute(
            text(f"SELECT count(*), min({KEY}), max({KEY}) FROM {table}")
        ).one()
        size = None
        if _pg(conn):
            size = int(conn.scalar(text("SELECT pg_total_relation_size(:t)"), {"t": table}))
        return [Partition(table, table, None, None, int(rows), size, _ts(oldest), _ts(newest))]
    out: list[Partition] = []
    for name, bound, lo, hi, est, size in conn.execute(_PARTITIONS_SQL, {"t": table}):
        oldest = newest = None
        if bound == "DEFAULT" or exact:
            est, oldest, newest = conn.execute(
                text(f'SELECT count(*), min({KEY}), max({KEY}) FROM "{name}"')
            ).one()
        out.append(Partition(table, name, lo, hi, int(est), int(size), oldest, newest))
    return out


def _ts(value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite's text
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _lit(at: datetime) -> str:
    return f"'{at.astimezone(UTC):%Y-%m-%d %H:%M:%S}+00'"


def _lock_timeout(conn: Connection, ms: int = LOCK_TIMEOUT_MS) -> None:
    conn.execute(text(f"SET LOCAL lock_timeout = '{int(ms)}ms'"))


def create_partition(conn: Connection, table: str, start: datetime) -> str:
    """Creates the month partition of ``table`` starting at ``start`` (in the caller's
    transaction); rows of that month already in the default partition move into it.

    Created apart and then attached: ``ATTACH PARTITION`` takes only a SHARE UPDATE
    EXCLUSIVE lock on the parent (inserts go on), where ``CREATE TABLE ... PARTITION OF``
    would take an exclusive one."""
    end = next_month(start)
    name, dflt = partition_name(table, start), default_name(table)
    conn.execute(
        text(
            f'CREATE TABLE "{name}" (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS'
            " INCLUDING STORAGE)"
        )
    )
    rng = f"{KEY} >= {_lit(start)} AND {KEY} < {_lit(end)}"
    # proves the bound, so the attach does not scan the new table
    conn.execute(text(f'ALTER TABLE "{name}" ADD CONSTRAINT "{name}_bound" CHECK ({rng})'))
    has_default = conn.scalar(text("SELECT to_regclass(:d) IS NOT NULL"), {"d": dflt})
    if has_default:
        moved = conn.execute(
            text(
                f'WITH m AS (DELETE FROM "{dflt}" WHERE {rng} RETURNING *)'
                f' INSERT INTO "{name}" SELECT * FROM m'
            )
        ).rowcount
        if moved:
            log.warning("moved %d rows of %s from %s into %s", moved, table, dflt, name)
    conn.execute(
        text(
            f'ALTER TABLE {table} ATTACH PARTITION "{name}"'
            f" FOR VALUES FROM ({_lit(start)}) TO ({_lit(end)})"
        )
    )
    conn.execute(text(f'ALTER TABLE "{name}" DROP CONSTRAINT "{name}_bound"'))
    return name


def _months(first: datetime, last: datetime) -> Iterator[datetime]:
    m = month_start(first)
    while m <= last:
        yield m
        m = next_month(m)


def ensure_partitions(
    conn: Connection, now: datetime, ahead: int = AHEAD_MONTHS
) -> list[str] | None:
    """Creates the missing month partitions from ``now``'s month to ``ahead`` months
    on, for every partitioned table (in the caller's transaction). Returns the names
    created; None when another process holds the lease (it is doing this now); [] on
    SQLite or when nothing was missing."""
    if not _pg(conn):
        return []
    if not conn.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": LEASE_KEY}):
        return None
    # a lock not had in time fails the round (retried at the next: months ahead leave
    # plenty of rounds) rather than queue writers behind it
    _lock_timeout(conn)
    last = month_start(now)
    for _ in range(ahead):
        last = next_month(last)
    created: list[str] = []
    by_partman = _by_partman(conn)
    for table in PARTITIONED:
        if not is_partitioned(conn, table) or table in by_partman:
            continue
        have = {p.start for p in partitions(conn, table) if p.start is not None}
        for m in _months(now, last):
            if m not in have:
                created.append(create_partition(conn, table, m))
    if created:
        log.info("created partitions %s", ", ".join(created))
    return created


def _by_partman(conn: Connection) -> set[str]:
    """The tables whose partitions pg_partman creates and drops: ours stand aside."""
    from schemas import partman

    return set(partman.managed(conn))


def maintain(session: Session, now: datetime) -> list[str] | None:
    """:func:`ensure_partitions` in a session's transaction (``Database.run``)."""
    return ensure_partitions(session.connection(), now)


# -- retention


@dataclass
class PruneResult:
    cutoff: datetime
    dry_run: bool
    partitions: list[Partition] = field(default_factory=list)  # dropped (or to drop)
    rows: dict[str, int] = field(default_factory=dict)  # rows deleted (or to delete) by table
    seconds: float = 0.0
    longest_batch_s: float = 0.0
    busy: bool = False  # another process is pruning: nothing done
    archive: Path | None = None  # where dropped partitions are written first
    archives: list[Path] = field(default_factory=list)  # the files written


def _droppable(conn: Connection, cutoff: datetime) -> list[Partition]:
    out = []
    by_partman = _by_partman(conn)
    for table in PARTITIONED:
        if is_partitioned(conn, table) and table not in by_partman:
            out += [p for p in partitions(conn, table) if p.end is not None and p.end <= cutoff]
    return out


def _batched_delete(
    engine: Engine, table: str, where: str, params: dict[str, object], result: PruneResult
) -> int:
    """Deletes ``where`` rows from ``table`` in batches of one transaction each, sized so
    a batch takes about BATCH_TARGET_S (the write lock on SQLite is held that long)."""
    pg = _pg(engine)
    rowid = "ctid" if pg else "rowid"
    batch, total = 500, 0
    while True:
        t0 = time.perf_counter()
        with engine.begin() as conn:
            if pg:
                _lock_timeout(conn, 1000)
            n = conn.execute(
                text(
                    f"DELETE FROM {table} WHERE {rowid} IN"
                    f" (SELECT {rowid} FROM {table} WHERE {where} LIMIT {batch})"
                ),
                params,
            ).rowcount
        took = time.perf_counter() - t0
        result.longest_batch_s = max(result.longest_batch_s, took)
        total += n
        if n < batch:
            return total
        batch = max(100, min(50_000, int(batch * BATCH_TARGET_S / max(took, 1e-4))))


def _count(engine: Engine, table: str, where: str, params: dict[str, object]) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(text(f"SELECT count(*) FROM {table} WHERE {where}"), params) or 0)


def _ddl(engine: Engine, sql: str) -> None:
    """One DDL statement under a short lock_timeout, retried while the lock is busy."""
    for attempt in range(DDL_RETRIES):
        try:
            with engine.begin() as conn:
                _lock_timeout(conn)
                conn.execute(text(sql))
            return
        except Exception as exc:
            if "lock timeout" not in str(exc) or attempt == DDL_RETRIES - 1:
                raise
            time.sleep(0.05 * (attempt + 1))  # writers get the table between tries


def _detach_and_drop(engine: Engine, p: Partition, archive: Path | None = None) -> Path | None:
    """Detaches ``p``, writes it to ``archive`` (if given) and drops it. When the
    archive cannot be written the partition is attached again, untouched, and the
    error raised. Returns the archive's path."""
    _ddl(engine, f'ALTER TABLE {p.table} DETACH PARTITION "{p.name}"')
    path = None
    if archive is not None:  # detached: nobody writes to it while it is copied
        from schemas import archive as arch

        try:
            path = arch.write(engine, p.table, p, archive)
        except BaseException:
            assert p.start is not None and p.end is not None
            rng = f"{KEY} >= {_lit(p.start)} AND {KEY} < {_lit(p.end)}"
            with engine.begin() as conn:  # the constraint spares the attach its scan
                conn.execute(
                    text(f'ALTER TABLE "{p.name}" ADD CONSTRAINT "{p.name}_bound" CHECK ({rng})')
                )
            _ddl(
                engine,
                f'ALTER TABLE {p.table} ATTACH PARTITION "{p.name}"'
                f" FOR VALUES FROM ({_lit(p.start)}) TO ({_lit(p.end)})",
            )
            with engine.begin() as conn:
                conn.execute(text(f'ALTER TABLE "{p.name}" DROP CONSTRAINT "{p.name}_bound"'))
            raise
    with engine.begin() as conn:
        conn.execute(text(f'DROP TABLE "{p.name}"'))
    return path


def _archive_default(
    engine: Engine, table: str, params: dict[str, object], archive: Path, result: PruneResult
) -> int:
    """The default partition's rows older than the cut-off, written to ``archive`` and
    deleted in one REPEATABLE READ transaction: exactly the rows written go (a report
    stored meanwhile is not in the snapshot, so it stays)."""
    from schemas import archive as arch

    dflt = default_name(table)
    where = f"{KEY} < :cutoff"
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            n = int(conn.scalar(text(f'SELECT count(*) FROM "{dflt}" WHERE {where}'), params) or 0)
            if not n:
                return 0
            stamp = result.cutoff.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
            path = arch.write_rows(
                conn, table, dflt, None, archive, name=f"{dflt}-before-{stamp}",
                where=where, params=params,
            )  # fmt: skip
            result.archives.append(path)
            conn.execute(text(f'DELETE FROM "{dflt}" WHERE {where}'), params)
    return n


def prune(
    engine: Engine, cutoff: datetime, *, dry_run: bool = False, archive: Path | None = None
) -> PruneResult:
    """Drops history older than ``cutoff``: whole partitions on PostgreSQL (those that
    end at or before it), batched deletes elsewhere (SQLite's tables, the default
    partition's stragglers, finished webhook deliveries and the delivery log).

    ``archive``: a directory; each partition is written there as Parquet
    (:mod:`schemas.archive`) before it is dropped, and so are the default partition's
    old rows before they are deleted. A write that fails drops nothing more: that
    partition is attached again and the error raised. PostgreSQL only."""
    if archive is not None and not _pg(engine):
        raise ValueError("--archive needs PostgreSQL (SQLite's history is not partitioned)")
    result = PruneResult(cutoff, dry_run, archive=archive)
    if not _pg(engine) or dry_run:
        return _prune(engine, result)
    with engine.connect() as lease:  # a session lock: the prune spans transactions
        if not lease.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": PRUNE_KEY}):
            lease.rollback()
            result.busy = True
            return result
        lease.commit()
        try:
            return _prune(engine, result)
        finally:
            lease.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PRUNE_KEY})
            lease.commit()


def _prune(engine: Engine, result: PruneResult) -> PruneResult:
    cutoff, dry_run = result.cutoff, result.dry_run
    t0 = time.perf_counter()
    params: dict[str, object] = {"cutoff": cutoff if _pg(engine) else _sqlite_ts(cutoff)}
    with engine.connect() as conn:
        result.partitions = _droppable(conn, cutoff)
        targets: list[tuple[str, str]] = []
        archived_defaults: list[str] = []
        for table in PARTITIONED:
            where = f"{KEY} < :cutoff"
            if not is_partitioned(conn, table):
                targets.append((table, where))
            elif result.archive is not None and not dry_run:
                archived_defaults.append(table)
            else:
                targets.append((default_name(table), where))
    for p in result.partitions:
        result.rows[p.table] = result.rows.get(p.table, 0) + p.rows
        if not dry_run:
            path = _detach_and_drop(engine, p, result.archive)
            if path is not None:
                result.archives.append(path)
            log.info("dropped partition %s (about %d rows)", p.name, p.rows)
    for table in archived_defaults:
        assert result.archive is not None
        n = _archive_default(engine, table, params, result.archive, result)
        if n:
            dflt = default_name(table)
            result.rows[dflt] = result.rows.get(dflt, 0) + n
    for table, (col, finished) in _TRIMMED.items():
        targets.append((table, f"{col} < :cutoff AND {finished}"))
    for table, where in targets:
        n = (
            _count(engine, table, where, params)
            if dry_run
            else _batched_delete(engine, table, where, params, result)
        )
        if n:
            result.rows[table] = result.rows.get(table, 0) + n
    result.seconds = time.perf_counter() - t0
    return result


def _sqlite_ts(at: datetime) -> str:
    # the format UTCDateTime stores on SQLite (naive UTC text)
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


@dataclass(frozen=True)
class Status:
    partitions: list[Partition]
    retention_days: int | None
    next_drop: list[Partition]  # what retention drops next (now, or at the next month)
    next_drop_at: datetime | None  # when that happens (None: no retention, or nothing)
    partman: dict[str, str | None] = field(default_factory=dict)  # table -> its retention


def status(
    engine: Engine, now: datetime, retention_days: int | None, *, exact: bool = False
) -> Status:
    """Every partition of the history tables with its size, and what retention drops
    next: the partitions already past the cut-off, or else the oldest one and when it
    will be."""
    from schemas import partman as pm

    with engine.connect() as conn:
        parts = [p for t in PARTITIONED for p in partitions(conn, t, exact=exact)]
        by_partman = {t: m.retention for t, m in pm.managed(conn).items()}
    nxt: list[Partition] = []
    at = None
    if retention_days is not None:
        cutoff = now - timedelta(days=retention_days)
        ranged = [p for p in parts if p.end is not None]
        nxt = [p for p in ranged if p.end is not None and p.end <= cutoff]
        if nxt:
            at = now
        elif ranged:
            first_end = min(p.end for p in ranged if p.end is not None)
            nxt = [p for p in ranged if p.end == first_end]
            at = first_end + timedelta(days=retention_days)
    return Status(parts, retention_days, nxt, at, by_partman)


def default_rows(conn: Connection) -> dict[str, int]:
    """Rows in each table's default partition (reports no month partition takes)."""
    out = {}
    for table in PARTITIONED:
        if is_partitioned(conn, table):
            out[table] = int(conn.scalar(text(f'SELECT count(*) FROM "{default_name(table)}"')))
    return out


def partition_sizes(conn: Connection) -> Sequence[Partition]:
    return [p for t in PARTITIONED for p in partitions(conn, t)]
