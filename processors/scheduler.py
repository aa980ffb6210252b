"""The scheduler: picks due trackers fairly and publishes fetch batches, never more
than the fetch stage can absorb.

Each tick, under a Redis lease lock (``SET NX PX`` + fencing number):

1. **Backpressure.** It reads the fetch stage's backlog (undelivered + pending
   entries of its streams, ``XINFO``/``XPENDING``) and publishes only up to a bound:
   what the location API's rate limit can fetch in ``fetch_backlog_s``
   (``source_rate_per_s x fetch_backlog_s`` requests, at least one). During an outage
   the backlog stays at the bound instead of growing by a fleet every interval.
2. **Most overdue first.** It reserves due trackers (active, in their production run,
   neither reserved nor fetched within ``min_fetch_interval_s``), least recently
   reserved or fetched first, by setting ``last_processed_at`` in the same transaction
   (rows locked on PostgreSQL, the write lock taken on SQLite), so two schedulers cannot
   pick the same tracker. A batch lost on the way is harmless: the reservation expires
   after the interval and the tracker is picked again. A request that waited too long
   is re-validated by the fetch stage (:mod:`processors.revalidate`).
3. **Demand vs capacity.** It compares what the fleet needs (every in-run tracker once
   per ``min_fetch_interval_s``) with what the rate limit allows, logs when that changes
   (``slow``: each tracker comes round less often than the floor; ``overloaded``: a
   round of the fleet takes longer than ``max_tracker_age_s``, the 12-hour guarantee
   cannot hold) and leaves a report in Redis, read by ``status`` and the exporter.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from processors.clock import Clock
from processors.database import Database
from schemas import schedule
from schemas.events import FetchRequested
from streams.connection import Client, translate
from streams.lock import LeaseLock
from streams.monitor import stream_status
from streams.producer import Producer, Route

log = logging.getLogger("trackstream.scheduler")

OK, SLOW, OVERLOADED = "ok", "slow", "overloaded"


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the fetch stage can do: the location API's shared rate limit."""

    calls_per_s: float
    batch_trackers: int
    backlog_s: float  # the backlog bound, in seconds of fetching

    @property
    def trackers_per_s(self) -> float:
        return self.calls_per_s * self.batch_trackers

    @property
    def backlog_bound(self) -> int:
        """Fetch requests allowed to be outstanding (undelivered or pending)."""
        return max(1, math.floor(self.calls_per_s * self.backlog_s))


@dataclass(frozen=True, slots=True)
class SchedulerReport:
    """One tick's picture, as left in Redis for ``trackstream status``."""

    at: str
    in_run: int
    due: int
    backlog: int
    backlog_bound: int
    scheduled: int
    demand_per_s: float  # trackers/s for every in-run tracker once per interval
    capacity_per_s: float  # trackers/s the rate limit allows
    cycle_s: float  # expected time between two fetches of one tracker
    level: str  # ok | slow | overloaded

    def summary(self) -> str:
        text = (
            f"{self.in_run} trackers in run, {self.due} due; demand {self.demand_per_s:.2f}/s vs "
            f"capacity {self.capacity_per_s:.2f}/s, each tracker every ~{_duration(self.cycle_s)}; "
            f"fetch backlog {self.backlog}/{self.backlog_bound} requests"
        )
        return f"{self.level}: {text}"


class Scheduler:
    def __init__(
        self,
        db: Database,
        producer: Producer,
        fetch: Route,
        lock: LeaseLock | None,
        clock: Clock,
        *,
        capacity: Capacity,
        min_fetch_interval_s: int = 300,
        max_tracker_age_s: int = 43_200,
        max_batches_per_tick: int = 200,
        report_key: str | None = None,
        report_ttl_ms: int = 300_000,
        repeat_warning_s: float = 3600.0,
    ) -> None:
        self.db = db
        self.producer = producer
        self.fetch = fetch
        self.lock = lock
        self.clock = clock
        self.capacity = capacity
        self.batch_trackers = capacity.batch_trackers
        self.min_fetch_interval_s = min_fetch_interval_s
        self.max_tracker_age_s = max_tracker_age_s
        self.max_batches_per_tick = max_batches_per_tick
        self.report_key = report_key
        self.report_ttl_ms = report_ttl_ms
        self.repeat_warning_s = repeat_warning_s
        self.batches_published = 0
        self.last_report: SchedulerReport | None = None
        self._level = OK
        self._level_logged_at: datetime | None = None
        self._backlog_full = False
        self._full_warned_at: datetime | None = None

    @property
    def client(self) -> Client:
        return self.producer.client

    async def fetch_backlog(self) -> int:
        """Fetch requests not yet finished: undelivered (lag) plus pending, over every
        shard's streams (priority lane included). A stream whose group does not exist
        yet counts whole: the group will read it all."""
        total = 0
        for keys in self.fetch.all_keys():
            with translate(self.producer.url, keys.stream, keys.group):
                for stream in keys.streams():
                    st = await stream_status(self.client, stream, keys.group, now_ms=0)
                    total += (st.lag or 0) + st.pending if st.group_exists else st.length
        return total

    async def tick(self) -> list[FetchRequested]:
        """One round: returns the batches published (empty when another scheduler
        leads, nothing is due, or the fetch backlog is at its bound)."""
        if self.lock is not None and await self.lock.acquire() is None:
            return []
        now = self.clock()
        backlog = await self.fetch_backlog()
        bound = self.capacity.backlog_bound
        room = min(self.max_batches_per_tick, max(0, bound - backlog))
        load, ids = await self.db.run(self._reserve, now, room * self.batch_trackers)
        batches = [
            FetchRequested(
                batch_id=secrets.token_hex(8),
                tracker_ids=ids[i : i + self.batch_trackers],
                requested_at=now,
            )
            for i in range(0, len(ids), self.batch_trackers)
        ]
        if batches:
            await self.producer.publish(self.fetch, batches)
            self.batches_published += len(batches)
            log.info("scheduled %d trackers in %d batches", len(ids), len(batches))
        self._note_backlog(now, backlog, bound, load.due - len(ids))
        report = self._report(now, load, backlog + len(batches), len(ids))
        await self._publish_report(report)
        return batches

    def _reserve(
        self, session: Any, now: datetime, limit: int
    ) -> tuple[schedule.FleetLoad, list[str]]:
        load = schedule.fleet_load(session, now, self.min_fetch_interval_s)
        ids = schedule.reserve_due(session, now, self.min_fetch_interval_s, limit)
        return load, ids

    def _note_backlog(self, now: datetime, backlog: int, bound: int, left_due: int) -> None:
        """Says when the bound starts holding work back (at most once per
        ``repeat_warning_s``: with a slow API it fills and drains all the time)."""
        full = backlog >= bound and left_due > 0
        quiet = self._full_warned_at is not None and (
            (now - self._full_warned_at).total_seconds() < self.repeat_warning_s
        )
        if full and not self._backlog_full and not quiet:
            self._full_warned_at = now
            log.warning(
                "fetch backlog at its bound (%d >= %d requests): holding %d due trackers "
                "back until the fetch stage catches up",
                backlog,
                bound,
                left_due,
            )
        self._backlog_full = full

    def _report(
        self, now: datetime, load: schedule.FleetLoad, backlog: int, scheduled: int
    ) -> SchedulerReport:
        capacity = self.capacity.trackers_per_s
        demand = load.in_run / self.min_fetch_interval_s
        round_s = load.in_run / capacity  # fetching the whole fleet once at full speed
        cycle = max(float(self.min_fetch_interval_s), round_s)
        if round_s + self.capacity.backlog_s > self.max_tracker_age_s:
            level = OVERLOADED
        elif demand > capacity:
            level = SLOW
        else:
            level = OK
        report = SchedulerReport(
            at=now.isoformat(),
            in_run=load.in_run,
            due=load.due,
            backlog=backlog,
            backlog_bound=self.capacity.backlog_bound,
            scheduled=scheduled,
            demand_per_s=round(demand, 4),
            capacity_per_s=round(capacity, 4),
            cycle_s=round(cycle, 1),
            level=level,
        )
        self._log_level(now, report)
        self.last_report = report
        return report

    def _log_level(self, now: datetime, r: SchedulerReport) -> None:
        repeat = (
            r.level != OK
            and self._level_logged_at is not None
            and (now - self._level_logged_at).total_seconds() >= self.repeat_warning_s
        )
        if r.level == self._level and not repeat:
            return
        self._level, self._level_logged_at = r.level, now
        need = (
            f"{r.in_run} trackers in their run need {r.demand_per_s:.2f} fetches/s "
            f"(each once per {self.min_fetch_interval_s} s); the location API's rate limit "
            f"allows {r.capacity_per_s:.2f}/s"
        )
        if r.level == OVERLOADED:
            log.error(
                "location API too slow for the fleet: %s; a round of the fleet takes %s, "
                "longer than the %s guarantee, which cannot hold. Serving the most overdue "
                "first; raise source_rate_per_s or reduce the fleet",
                need,
                _duration(r.cycle_s),
                _duration(self.max_tracker_age_s),
            )
        elif r.level == SLOW:
            log.warning(
                "location API slower than the fleet: %s; each tracker is fetched about every "
                "%s instead of every %s (most overdue first; the %s guarantee holds)",
                need,
                _duration(r.cycle_s),
                _duration(self.min_fetch_interval_s),
                _duration(self.max_tracker_age_s),
            )
        else:
            log.info("location API keeps up with the fleet: %s", need)

    async def _publish_report(self, report: SchedulerReport) -> None:
        if self.report_key is None:
            return
        with translate(self.producer.url):
            await self.client.set(
                self.report_key, json.dumps(asdict(report)), px=self.report_ttl_ms
            )


async def read_report(client: Client, key: str, url: str = "") -> SchedulerReport | None:
    """The last report a scheduler left (None when none is fresh: no scheduler runs)."""
    with translate(url):
        raw = await client.get(key)
    if raw is None:
        return None
    return SchedulerReport(**json.loads(raw))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
