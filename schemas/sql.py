"""SQL helpers the stores share: the session's dialect, its upsert-capable INSERT,
chunks of rows per statement, and an ``IN`` list with one statement text.

The stores (``tracker_store``, ``report_store``, ``reconcile_store``, ``geofence_defs``,
``schedule``, ``source_store``) take a :class:`~sqlalchemy.orm.Session` first and do not
commit: the caller's transaction does (``processors.database.Database.run`` runs one
function per transaction). Every write is idempotent on a natural key, with
dialect-aware upserts (``INSERT ... ON CONFLICT``) on PostgreSQL and SQLite alike, so
redeliveries and replays rewrite the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import String, Table, any_, bindparam
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

__all__ = ["CHUNK", "chunks", "dialect", "dialect_insert", "in_list"]

CHUNK = 500  # rows per multi-row statement (well under both dialects' parameter limits)

T = TypeVar("T")


def dialect(session: Session) -> str:
    """``"postgresql"`` or ``"sqlite"``."""
    return session.get_bind().dialect.name


def dialect_insert(session: Session, table: Table) -> Any:
    """The dialect's ``INSERT`` (both have ``on_conflict_do_*``)."""
    return pg_insert(table) if dialect(session) == "postgresql" else sqlite_insert(table)


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def in_list(session: Session, column: Any, values: Sequence[str]) -> Any:
    """``column IN values`` with one statement text whatever the count: ``= ANY(array)``
    on PostgreSQL (compiled and prepared once), an expanding IN on SQLite."""
    if dialect(session) == "postgresql":
        return column == any_(bindparam("ids", list(values), type_=ARRAY(String)))
    return column.in_(list(values))
