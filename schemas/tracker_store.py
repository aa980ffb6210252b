"""The ``trackers`` table's writes: created or updated by external id, and marked
processed by the fetch stage.

Tracker ids here are the trackers' external ids (``"SIM-00001"``). Like every store, the
functions take a session first and do not commit (see :mod:`schemas.sql`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, text, update
from sqlalchemy.orm import Session

from schemas.db import json_param
from schemas.sql import chunks, dialect, dialect_insert
from schemas.tables import Tracker, UTCDateTime

__all__ = ["mark_processed", "upsert_trackers"]

_trackers = cast(Table, Tracker.__table__)


def upsert_trackers(session: Session, rows: Sequence[Mapping[str, Any]]) -> int:
    """Creates or updates trackers by ``external_id`` (keys: external_id, name, active,
    run_starts_at, run_ends_at; name defaults to the id, active to True, the run bounds
    to None = unbounded). Returns the number of distinct trackers written."""
    by_id: dict[str, dict[str, Any]] = {}
    for row in rows:
        ext = str(row.get("external_id") or "").strip()
        if not ext:
            raise ValueError(f"tracker without external_id: {dict(row)!r}")
        by_id[ext] = {
            "external_id": ext,
            "name": row.get("name") or ext,
            "active": bool(row.get("active", True)),
            "run_starts_at": row.get("run_starts_at"),
            "run_ends_at": row.get("run_ends_at"),
        }
    values = list(by_id.values())
    for chunk in chunks(values):
        stmt = dialect_insert(session, _trackers).values(list(chunk))
        stmt = stmt.on_conflict_do_update(
            index_elements=[_trackers.c.external_id],
            set_={c: stmt.excluded[c] for c in ("name", "active", "run_starts_at", "run_ends_at")},
        )
        session.execute(stmt)
    return len(values)


def mark_processed(session: Session, external_ids: Sequence[str], at: datetime) -> None:
    """Sets ``last_processed_at`` of these trackers to ``at``."""
    ids = sorted(set(external_ids))  # a stable order keeps row locks deadlock-free
    if not ids:
        return
    if dialect(session) == "postgresql":
        session.execute(_MARK_PROCESSED_PG, {"ids": json_param(ids), "at": at})
        return
    for chunk in chunks(ids, 5000):
        session.execute(
            update(_trackers)
            .where(_trackers.c.external_id.in_(list(chunk)))
            .values(last_processed_at=at)
        )


# ORDER BY id FOR UPDATE: rows are locked in id order (every writer of a table locks
# in id order, so writers never wait on each other in a cycle)
_MARK_PROCESSED_PG = text(
    "UPDATE trackers SET last_processed_at = :at FROM ("
    " SELECT id FROM trackers WHERE external_id IN"
    " (SELECT json_array_elements_text(CAST(:ids AS json)))"
    " ORDER BY id FOR UPDATE) AS l WHERE trackers.id = l.id"
).bindparams(bindparam("at", type_=UTCDateTime()))
