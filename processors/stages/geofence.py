"""geofence: LocationGeocoded -> enter/exit events -> ViewsChanged.

Events are a function of the set of stored reports, not of delivery order: checking
report r recomputes the transition at r (from its predecessor by observed_at) and at
its successor (from r), under a per-tracker lock, replacing whatever events stood at
those two instants. A late report therefore corrects its successor's event, and a
redelivery rewrites the same rows. Geofences are reloaded when their version in the
database changes, so edits apply without a restart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from processors.clock import Clock
from processors.database import Database
from processors.geofencing import GeofenceIndex, transitions
from processors.topology import NOTIFY, VIEW_REFRESH
from schemas import store
from schemas.events import LocationGeocoded, ViewsChanged
from schemas.notify import GeofenceEvent
from schemas.views import VIEW_NAMES
from streams.consumer import Context
from streams.message import Message
from streams.producer import Route


class GeofenceStage:
    def __init__(self, db: Database, routes: dict[str, Route], clock: Clock):
        self.db = db
        self.downstream = routes[VIEW_REFRESH]
        self.notify = routes[NOTIFY]
        self.clock = clock
        self._index: GeofenceIndex | None = None
        self._version: Any = None
        self.events_written = 0

    async def index(self) -> GeofenceIndex:
        version = await self.db.run(store.geofences_version)
        if self._index is None or version != self._version:
            rows = await self.db.run(store.active_geofences)
            self._index, self._version = GeofenceIndex(rows), version
        return self._index

    async def handle_batch(
        self, msgs: Sequence[Message[LocationGeocoded]], ctx: Context
    ) -> Mapping[str, BaseException] | None:
        index = await self.index()
        now = self.clock()
        payloads = [m.payload for m in msgs]
        found: list[GeofenceEvent] = []  # notify
        written, failed = await self.db.run(check_batch, index, payloads, now, found)
        self.events_written += written
        failures: dict[str, BaseException] = {msgs[i].entry_id: exc for i, exc in failed.items()}
        trackers = {p.tracker_id for i, p in enumerate(payloads) if i not in failed}
        if trackers:
            ctx.publish(
                self.downstream,
                ViewsChanged(views=list(VIEW_NAMES), changed_at=now, tracker_ids=sorted(trackers)),
            )
        # notify: each event written, keyed by its natural key (a redelivery: same ids)
        for ev in found:
            ctx.publish(self.notify, ev, partition_key=ev.tracker_id)
        return failures


def check_batch(
    session: Any,
    index: GeofenceIndex,
    items: Sequence[LocationGeocoded],
    now: datetime,
    found: list[GeofenceEvent] | None = None,
) -> tuple[int, dict[int, BaseException]]:
    """Check a batch in one transaction, each report in a savepoint so one failure does
    not fail the rest. Trackers are locked in sorted order: no deadlock between
    consumers whose batches share trackers."""
    written = 0
    failed: dict[int, BaseException] = {}
    for i in sorted(range(len(items)), key=lambda i: (items[i].tracker_id, items[i].observed_at)):
        events: list[GeofenceEvent] = []
        try:
            with session.begin_nested():
                written += check_report(session, index, items[i], now, events)
        except Exception as exc:
            failed[i] = exc
        else:
            if found is not None:
                found.extend(events)  # notify
    return written, failed


def check_report(
    session: Any,
    index: GeofenceIndex,
    g: LocationGeocoded,
    now: datetime,
    found: list[GeofenceEvent] | None = None,
) -> int:
    """Recompute the transitions at the report and at its successor; returns events stored."""
    store.lock_tracker(session, g.tracker_id)
    prev, cur, nxt = store.report_with_neighbours(session, g.tracker_id, g.observed_at)
    if cur is None:  # not stored (yet): fetch always stores before publishing
        raise LookupError(f"report {g.tracker_id}@{g.observed_at.isoformat()} is not stored")
    prev_in = index.members(prev.lat, prev.lon) if prev is not None else None
    cur_in = index.members(cur.lat, cur.lon)
    at_cur = transitions(prev_in, cur_in)
    store.replace_events_at(session, g.tracker_id, cur.observed_at, at_cur)
    _found(found, g.tracker_id, cur.observed_at, at_cur)  # notify
    written = len(at_cur)
    if nxt is not None:
        at_next = transitions(cur_in, index.members(nxt.lat, nxt.lon))
        store.replace_events_at(session, g.tracker_id, nxt.observed_at, at_next)
        _found(found, g.tracker_id, nxt.observed_at, at_next)  # notify
        written += len(at_next)
    store.mark_geofence_checked(session, [(g.tracker_id, g.observed_at)], now)
    return written


def _found(
    found: list[GeofenceEvent] | None, tracker_id: str, at: datetime, events: dict[int, str]
) -> None:
    """notify: the events just written, for the notify stage."""
    if found is not None:
        found.extend(
            GeofenceEvent(tracker_id=tracker_id, geofence_id=g, observed_at=at, kind=k)  # type: ignore[arg-type]
            for g, k in sorted(events.items())
        )
