"""Partitions of the history written to Parquet before a prune drops them, and read back.

:func:`write` copies one table (a detached partition) to ``DIR/<partition>.parquet``:
written to a temporary name, fsynced, its row count checked against the table's, then
renamed into place, so a file under the final name is whole. The file's metadata
names the history table and the month. :func:`restore` inserts a file's rows into
that table again with their ids, ``ON CONFLICT DO NOTHING``: the natural keys make it
idempotent (a row already there, or restored twice, is skipped). The month's partition
is created again when it is missing (unless pg_partman manages the table: then the rows
land in the default partition, counted by ``history status``).

Needs pyarrow (``pip install 'trackstream[archive]'``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, text

from schemas import history

__all__ = ["ArchiveError", "Restored", "require_pyarrow", "restore", "write", "write_rows"]

BATCH_ROWS = 50_000
META_TABLE = b"trackstream.table"
META_START = b"trackstream.start"  # ISO time, or empty for the default partition
META_ROWS = b"trackstream.rows"


class ArchiveError(RuntimeError):
    """An archive could not be written or read: the message says which file and why."""


def require_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:  # pragma: no cover - the [archive] extra is missing
        raise ArchiveError("archiving needs pyarrow: pip install 'trackstream[archive]'") from None
    return pyarrow


def _columns(conn: Connection, table: str) -> list[tuple[str, str]]:
    rows = conn.execute(
        text(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
            " WHERE a.attrelid = CAST(:t AS regclass) AND a.attnum > 0 AND NOT a.attisdropped"
            " ORDER BY a.attnum"
        ),
        {"t": f'"{table}"'},
    )
    return [(str(n), str(t)) for n, t in rows]


def _arrow_type(pa: Any, pg_type: str) -> Any:
    if pg_type in ("integer", "smallint"):
        return pa.int32()
    if pg_type == "bigint":
        return pa.int64()
    if pg_type in ("double precision", "real"):
        return pa.float64()
    if pg_type == "boolean":
        return pa.bool_()
    if pg_type == "timestamp with time zone":
        return pa.timestamp("us", tz="UTC")
    if pg_type == "text" or pg_type.startswith("character varying"):
        return pa.string()
    raise ArchiveError(f"no Parquet type for a column of type {pg_type}")


def write(engine: Engine, table: str, partition: history.Partition, directory: Path) -> Path:
    """Writes the rows of ``partition`` (a table, attached or detached) to
    ``directory/<name>.parquet``; returns the path. Raises ArchiveError when the file
    cannot be written whole (nothing is left under the final name then)."""
    with engine.connect() as conn:
        return write_rows(conn, table, partition.name, partition.start, directory)


def write_rows(
    conn: Connection,
    table: str,
    source: str,
    start: datetime | None,
    directory: Path,
    *,
    name: str | None = None,
    where: str = "true",
    params: dict[str, object] | None = None,
) -> Path:
    """Writes the ``where`` rows of the table ``source`` (in ``conn``'s snapshot) to
    ``directory/<name or source>.parquet``, as :func:`write` does."""
    pa = require_pyarrow()
    name = name or source
    final = directory / f"{name}.parquet"
    tmp = directory / f".{name}.parquet.tmp"
    written = 0
    try:
        directory.mkdir(parents=True, exist_ok=True)
        cols = _columns(conn, source)
        schema = pa.schema(
            [pa.field(n, _arrow_type(pa, t)) for n, t in cols],
            metadata={
                META_TABLE: table.encode(),
                META_START: (start.isoformat() if start else "").encode(),
            },
        )
        names = ", ".join(f'"{n}"' for n, _ in cols)
        select = text(f'SELECT {names} FROM "{source}" WHERE {where} ORDER BY id')
        result = conn.execute(
            select.execution_options(stream_results=True, yield_per=BATCH_ROWS), params or {}
        )
        with result, pa.parquet.ParquetWriter(str(tmp), schema, compression="zstd") as out:
            for chunk in result.partitions(BATCH_ROWS):
                arrays = [
                    pa.array([r[i] for r in chunk], type=schema.field(i).type)
                    for i in range(len(cols))
                ]
                out.write_table(pa.Table.from_arrays(arrays, schema=schema))
                written += len(chunk)
        expect = conn.scalar(text(f'SELECT count(*) FROM "{source}" WHERE {where}'), params or {})
        if pa.parquet.ParquetFile(str(tmp)).metadata.num_rows != written or written != expect:
            raise ArchiveError(f"{final}: wrote {written} rows of {expect}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except ArchiveError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise ArchiveError(f"archive {final} not written: {exc}") from exc
    return final


@dataclass(frozen=True)
class Restored:
    path: Path
    table: str
    rows: int  # in the file
    inserted: int  # not there before


def _read(path: Path) -> tuple[Any, str, datetime | None]:
    pa = require_pyarrow()
    try:
        pf = pa.parquet.ParquetFile(str(path))
    except Exception as exc:
        raise ArchiveError(f"{path}: not a Parquet file: {exc}") from None
    meta = pf.schema_arrow.metadata or {}
    table = meta.get(META_TABLE, b"").decode()
    if table not in history.PARTITIONED:
        raise ArchiveError(f"{path}: not a trackstream history archive (no table in its metadata)")
    start = meta.get(META_START, b"").decode()
    return pf, table, datetime.fromisoformat(start).astimezone(UTC) if start else None


def _batches(pf: Any) -> Iterator[list[dict[str, Any]]]:
    for batch in pf.iter_batches(batch_size=5_000):
        yield batch.to_pylist()


def restore(engine: Engine, paths: list[Path]) -> list[Restored]:
    """Inserts each file's rows into its history table again (idempotent). All files
    are checked before any row is written; each file is one transaction."""
    opened = [(p, *_read(p)) for p in paths]
    out = []
    for path, pf, table, start in opened:
        inserted = rows = 0
        with engine.begin() as conn:
            if start is not None and history.is_partitioned(conn, table):
                from schemas import partman

                have = {p.start for p in history.partitions(conn, table)}
                if start not in have and table not in partman.managed(conn):
                    history.create_partition(conn, table, start)
            names = list(pf.schema_arrow.names)
            cols = ", ".join(f'"{n}"' for n in names)
            values = ", ".join(f":{n}" for n in names)
            stmt = text(f"INSERT INTO {table} ({cols}) VALUES ({values}) ON CONFLICT DO NOTHING")
            max_id = 0
            for chunk in _batches(pf):
                inserted += conn.execute(stmt, chunk).rowcount
                rows += len(chunk)
                max_id = max(max_id, *(r["id"] for r in chunk))
            seq = conn.scalar(text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table})
            if max_id and seq:  # new rows' ids stay above the restored ones
                conn.execute(
                    text(f"SELECT setval(:s, GREATEST(:m, (SELECT last_value FROM {seq})))"),
                    {"s": seq, "m": max_id},
                )
        out.append(Restored(path, table, rows, inserted))
    return out
