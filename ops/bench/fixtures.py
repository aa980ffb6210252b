"""Bench and test fixtures written straight to the database, bypassing the stages.

Like every store, the functions take a session first and do not commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import cast

from sqlalchemy import Table, delete
from sqlalchemy.orm import Session

from schemas.sql import dialect_insert
from schemas.tables import GeofenceEventRow, utcnow

__all__ = ["EVENT_KINDS", "replace_events_at"]

EVENT_KINDS = ("enter", "exit")

_events = cast(Table, GeofenceEventRow.__table__)


def replace_events_at(
    session: Session, tracker_id: str, observed_at: datetime, events: Mapping[int, str]
) -> None:
    """Makes the tracker's events at ``observed_at`` exactly ``events``
    (geofence id -> "enter" | "exit"): others at that instant are deleted, these upserted."""
    for gid, kind in events.items():
        if kind not in EVENT_KINDS:
            raise ValueError(f"event kind must be 'enter' or 'exit', not {kind!r} (geofence {gid})")
    stale = delete(_events).where(
        _events.c.tracker_id == tracker_id, _events.c.observed_at == observed_at
    )
    if events:
        stale = stale.where(_events.c.geofence_id.not_in(list(events)))
    session.execute(stale)
    if not events:
        return
    now = utcnow()
    stmt = dialect_insert(session, _events).values(
        [
            {
                "tracker_id": tracker_id,
                "geofence_id": int(gid),
                "observed_at": observed_at,
                "kind": kind,
                "created_at": now,
            }
            for gid, kind in sorted(events.items())
        ]
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["tracker_id", "geofence_id", "observed_at"],
        set_={"kind": stmt.excluded.kind},
    )
    session.execute(stmt)
