"""The scheduler: picks eligible trackers fairly and publishes fetch batches.

Each tick, under a Redis lease lock (``SET NX PX`` + fencing number), it selects
trackers that are active, inside their production run and not fetched for
``min_fetch_interval_s`` — never-fetched first, then oldest ``last_processed_at`` —
and reserves them by setting ``last_processed_at`` in the same transaction (rows are
locked on PostgreSQL, the write lock is taken first on SQLite), so two schedulers
cannot pick the same tracker. A batch lost on the way is harmless: the reservation
expires after the interval and the tracker is picked again.
"""

from __future__ import annotations

import logging
import secrets
from datetime import datetime
from typing import Any

from processors.clock import Clock
from processors.database import Database
from schemas import store
from schemas.events import FetchRequested
from streams.lock import LeaseLock
from streams.producer import Producer, Route

log = logging.getLogger("trackstream.scheduler")


class Scheduler:
    def __init__(
        self,
        db: Database,
        producer: Producer,
        fetch: Route,
        lock: LeaseLock | None,
        clock: Clock,
        *,
        batch_trackers: int = 64,
        min_fetch_interval_s: int = 300,
        max_batches_per_tick: int = 200,
    ) -> None:
        self.db = db
        self.producer = producer
        self.fetch = fetch
        self.lock = lock
        self.clock = clock
        self.batch_trackers = batch_trackers
        self.min_fetch_interval_s = min_fetch_interval_s
        self.max_batches_per_tick = max_batches_per_tick
        self.batches_published = 0

    async def tick(self) -> list[FetchRequested]:
        """One round: returns the batches published (empty when another scheduler leads)."""
        if self.lock is not None and await self.lock.acquire() is None:
            return []
        now = self.clock()
        ids = await self.db.run(self._reserve, now)
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
        return batches

    def _reserve(self, session: Any, now: datetime) -> list[str]:
        ids = store.eligible_trackers(
            session,
            now,
            min_interval_s=self.min_fetch_interval_s,
            limit=self.batch_trackers * self.max_batches_per_tick,
            lock=True,
        )
        store.mark_processed(session, ids, now)
        return ids
