"""geofence: LocationGeocoded -> fix verdicts, enter/exit events -> ViewsChanged.

A batch is checked set-based (:func:`check_batch`, a constant number of statements):
its trackers are locked in key order, each tracker's window of stored reports is read
in one query, the rules of :mod:`processors.crossings` run in memory (geometry
vectorised over the batch), and verdicts, states, checked marks and events are
written in one UPDATE, one DELETE and one INSERT. Events stay a pure function of the
stored history: a late or repeated report recomputes from the accepted report before
it forward, until the stored state agrees again. If the batch fails (a bad row), each
report is checked again on its own, each in a fresh transaction, so only the bad one
fails. A batch of 100 reports or more is checked as two groups of whole trackers, in
two transactions at once, so that one group's evaluation (Python) overlaps the other's
statements (PostgreSQL). Geofences are reloaded when their version in the database
changes; after a change each tracker's history is evaluated again, with the fences in
force.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from processors.clock import Clock
from processors.crossings import (
    OK,
    REASONS,
    Kind,
    Rules,
    StoredFix,
    Window,
    evaluate,
    from_us,
    state_prefix,
    to_us,
)
from processors.database import Database, DatabaseUnavailable
from processors.geofencing import GeofenceIndex
from processors.topology import NOTIFY, VIEW_REFRESH
from schemas import geofence_defs, geofence_store
from schemas.events import LocationGeocoded, ViewsChanged
from schemas.notify import GeofenceEvent
from schemas.views import VIEW_NAMES
from streams.consumer import Context
from streams.message import Message
from streams.producer import Route

log = logging.getLogger("trackstream.geofence")

LOOKAHEAD = 1  # reports read past a tracker's last one in the batch (more if needed)
PARTS = 2  # transactions a large batch is checked in, concurrently
MIN_PART = 50  # reports per part at least (a smaller batch is one part)


@dataclass
class BatchResult:
    """What :func:`check_batch` did: events written (the recomputed windows' events, as
    ``(tracker, geofence, at, kind)``: what to notify, again on a redelivery), the events
    that did not exist before, fixes newly rejected per reason, and the batch items that
    failed."""

    written: int = 0
    events: list[tuple[str, int, datetime, str]] = field(default_factory=list)
    new_events: list[tuple[str, int, datetime, str]] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    failed: dict[int, BaseException] = field(default_factory=dict)
    stale: bool = False  # the fences changed: reload them and check again

    def add(self, other: BatchResult, positions: Sequence[int]) -> None:
        """Adds the result of checking items ``positions`` (by index into ``other``)."""
        self.written += other.written
        self.events += other.events
        self.new_events += other.new_events
        self.rejected.update(other.rejected)
        self.failed.update({positions[i]: exc for i, exc in other.failed.items()})


class GeofenceStage:
    batch_size = 500  # entries per read unless TRACKSTREAM_BATCH_SIZE is set

    def __init__(
        self,
        db: Database,
        routes: dict[str, Route],
        clock: Clock,
        rules: Rules | None = None,
        registry: CollectorRegistry | None = None,
    ):
        self.db = db
        self.downstream = routes[VIEW_REFRESH]
        self.notify = routes[NOTIFY]
        self.clock = clock
        self.rules = rules or Rules()
        self._index: GeofenceIndex | None = None
        self._version: Any = None
        self.events_written = 0
        self.rejected: Counter[str] = Counter()
        self._rejected_metric = PromCounter(
            "trackstream_fixes_rejected_total",
            "Location reports rejected before geofencing, by reason",
            ["reason"],
            registry=registry if registry is not None else CollectorRegistry(),
        )
        for reason in REASONS:
            self._rejected_metric.labels(reason)

    async def index(self) -> GeofenceIndex:
        version = await self.db.run(geofence_defs.geofences_version)
        if self._index is None or version != self._version:
            rows = await self.db.run(geofence_defs.active_geofences)
            self._index, self._version = GeofenceIndex(rows), version
        return self._index

    async def handle_batch(
        self, msgs: Sequence[Message[LocationGeocoded]], ctx: Context
    ) -> Mapping[str, BaseException] | None:
        index = self._index if self._index is not None else await self.index()
        now = self.clock()
        payloads = [m.payload for m in msgs]
        # a large batch is checked as PARTS groups of whole trackers, each in its own
        # transaction and thread, so that one group's evaluation (Python) overlaps the
        # other's statements (PostgreSQL) instead of waiting for them
        parts = _partition(payloads, PARTS if len(payloads) >= MIN_PART * PARTS else 1)
        done = await asyncio.gather(
            *(self._check(index, [payloads[i] for i in part], now) for part in parts),
            return_exceptions=True,
        )
        result = BatchResult()
        for part, one in zip(parts, done, strict=True):
            if isinstance(one, BaseException):
                raise one  # a transient fault: the whole batch is retried (idempotent)
            result.add(one, part)
        self.events_written += result.written
        for reason, n in result.rejected.items():
            self.rejected[reason] += n
            self._rejected_metric.labels(reason).inc(n)
        # notify: every event of the recomputed windows, not only new ones, so that a
        # redelivery after a crash between commit and publish still notifies (the notify
        # stage drops repeats by the event's natural key)
        for tracker, geofence, at, kind in result.events:
            ctx.publish(
                self.notify,
                GeofenceEvent(
                    tracker_id=tracker, geofence_id=geofence, observed_at=at, kind=cast(Kind, kind)
                ),
                partition_key=tracker,
            )
        failures: dict[str, BaseException] = {
            msgs[i].entry_id: exc for i, exc in result.failed.items()
        }
        trackers = {p.tracker_id for i, p in enumerate(payloads) if i not in result.failed}
        if trackers:
            ctx.publish(
                self.downstream,
                ViewsChanged(views=list(VIEW_NAMES), changed_at=now, tracker_ids=sorted(trackers)),
            )
        return failures

    async def _check(
        self, index: GeofenceIndex, payloads: list[LocationGeocoded], now: datetime
    ) -> BatchResult:
        """Checks reports in one transaction; if that fails for a reason other than the
        database, each one again on its own, so only the bad ones fail."""
        try:
            # the fences' version is checked in the batch's own transaction
            result = await self.db.run(check_batch, index, self.rules, payloads, now, self._version)
            if result.stale:
                index = await self.index()
                result = await self.db.run(check_batch, index, self.rules, payloads, now)
            return result
        except Exception as exc:
            if _transient(exc):
                raise  # the whole batch is retried
            log.warning("geofence batch of %d failed (%s); checking one by one", len(payloads), exc)
        result = BatchResult()
        for i, p in enumerate(payloads):
            try:  # a fresh session and transaction per report
                one = await self.db.run(check_batch, index, self.rules, [p], now)
            except Exception as one_exc:
                if _transient(one_exc):
                    raise
                result.failed[i] = one_exc
                continue
            result.add(one, [i])
        return result


def _partition(items: Sequence[LocationGeocoded], parts: int) -> list[list[int]]:
    """Indices of ``items`` in at most ``parts`` groups of about equal size, every
    tracker's reports in one group (each tracker to the smallest group so far)."""
    if parts <= 1:
        return [list(range(len(items)))]
    by_tracker: dict[str, list[int]] = {}
    for i, p in enumerate(items):
        by_tracker.setdefault(p.tracker_id, []).append(i)
    groups: list[list[int]] = [[] for _ in range(parts)]
    for indices in by_tracker.values():
        min(groups, key=len).extend(indices)
    return [g for g in groups if g]


def _transient(exc: BaseException) -> bool:
    """A database that is away or busy, not a bad row: retry the batch as a whole
    (:meth:`processors.database.Database.run` decides, as for every stage)."""
    return isinstance(exc, DatabaseUnavailable)


def check_batch(
    session: Any,
    index: GeofenceIndex,
    rules: Rules,
    items: Sequence[LocationGeocoded],
    now: datetime,
    fences_version: Any = None,
) -> BatchResult:
    """Checks a batch of reports in the caller's transaction (see the module docstring).
    With ``fences_version``: first makes sure the fences are still that version, else
    returns a result marked ``stale`` having done nothing."""
    result = BatchResult()
    if fences_version is not None and geofence_defs.geofences_version(session) != fences_version:
        result.stale = True
        return result
    wanted: dict[tuple[str, datetime], list[int]] = {}
    spans: dict[str, tuple[datetime, datetime]] = {}
    for i, g in enumerate(items):
        wanted.setdefault((g.tracker_id, g.observed_at), []).append(i)
        lo, hi = spans.get(g.tracker_id, (g.observed_at, g.observed_at))
        spans[g.tracker_id] = (min(lo, g.observed_at), max(hi, g.observed_at))
    geofence_store.lock_trackers(session, list(spans))
    prefix = state_prefix(index, rules)
    loaded = geofence_store.load_windows(session, spans, prefix, LOOKAHEAD)
    outcomes = _evaluate(index, rules, loaded, spans)
    again = [o.tracker_id for o in outcomes if not o.converged and loaded[o.tracker_id].truncated]
    if again:  # the stored states did not agree within the lookahead: read to the end
        more = geofence_store.load_windows(
            session, {t: spans[t] for t in again}, prefix, lookahead=None
        )
        outcomes = [o for o in outcomes if o.tracker_id not in more]
        outcomes += _evaluate(index, rules, more, spans)

    statuses: list[geofence_store.StatusRow] = []
    windows: list[tuple[str, datetime | None, datetime | None]] = []
    events: list[geofence_store.EventRow] = []
    found: set[tuple[str, datetime]] = set()
    for o in outcomes:
        lo_at = from_us(o.lo_us) if o.lo_us is not None else None
        windows.append((o.tracker_id, lo_at, from_us(o.hi_us) if o.hi_us is not None else None))
        for fix, status, state, evs in o.results:
            key = (o.tracker_id, fix.observed_at)
            checked = key in wanted
            if checked:
                found.add(key)
            if checked or (fix.status is not None and (fix.status, fix.state) != (status, state)):
                assert fix.id is not None
                statuses.append(
                    geofence_store.StatusRow(fix.id, status, state, checked, fix.observed_at)
                )
                if status != OK and fix.status != status:
                    result.rejected[status] += 1
            for gid, at_us, kind in evs:
                events.append(
                    geofence_store.EventRow(
                        o.tracker_id, gid, from_us(at_us), kind, fix.observed_at
                    )
                )
    for key, idx in wanted.items():
        if key not in found:  # fetch always stores before publishing
            for i in idx:
                result.failed[i] = LookupError(
                    f"report {key[0]}@{key[1].isoformat()} is not stored"
                )
    deleted = geofence_store.save(
        session, statuses, windows, events, [int(g) for g in index.ids], now
    )
    before = set(deleted)
    result.written = len(events)
    result.events = [(e.tracker_id, e.geofence_id, e.observed_at, e.kind) for e in events]
    result.new_events = [e for e in result.events if e not in before]
    return result


def _evaluate(
    index: GeofenceIndex,
    rules: Rules,
    loaded: Mapping[str, geofence_store.TrackerWindow],
    spans: Mapping[str, tuple[datetime, datetime]],
) -> list[Any]:
    windows = []
    for tracker, w in loaded.items():
        fixes = [
            StoredFix(obs, lat, lon, acc, fetched, status=status, state=state, id=row_id)
            for row_id, _, obs, lat, lon, acc, fetched, status, state, *_ in w.rows
        ]
        stop_after = to_us(spans[tracker][1])
        windows.append(Window(tracker, fixes, anchored=w.anchored, stop_after_us=stop_after))
    return evaluate(index, rules, windows)
