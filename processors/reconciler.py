"""The reconciler: work the database shows as incomplete is published again.

A report stored but not geocoded, or geocoded but not geofence-checked, after
``grace_s`` means a message was lost (Redis lost data, or a process died between a
commit and a publish). Re-publishing is safe because every stage is idempotent.

Two guards keep it from making things worse:

- a stage that is more than ``grace_s`` behind (its oldest unfinished entry is older
  than that) is left alone: its reports are queued, not lost, and re-sending them
  would only grow the backlog;
- a report is re-sent at most ``max_republish`` times, ``grace_s`` apart. One whose
  message keeps being dead-lettered (poison) therefore stops coming back; it stays
  incomplete in the database and its dead letters say why. The count is taken in
  the transaction that selects the reports (``FOR UPDATE SKIP LOCKED``: the reconciler
  never waits for a row a stage is writing, so it is in no deadlock), before they are
  sent: a re-send is never uncounted.

It also keeps the views from staying stale: trackers checked between ``3 x grace_s``
and ``grace_s`` ago that ``latest_location`` does not show yet (their ViewsChanged
notice was lost, e.g. a commit whose acknowledgement was lost and whose entry was then
dead-lettered) get a new notice.

Each round also keeps the history's partitions ahead of time
(:func:`schemas.history.ensure_partitions`: an advisory lock is the lease, so only one
reconciler creates them) and, with ``retention_days``, prunes the history at most once
an hour (:func:`schemas.history.prune`, under a lease of its own).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from processors.clock import Clock
from processors.database import Database, DatabaseUnavailable
from processors.topology import GEOCODE, GEOFENCE, VIEW_REFRESH
from schemas import history, reconcile_store
from schemas.events import LocationGeocoded, LocationReported, ViewsChanged
from schemas.views import VIEW_NAMES
from streams.monitor import unfinished_age_ms
from streams.producer import Producer, Route

log = logging.getLogger("trackstream.reconciler")

PRUNE_EVERY_S = 3600.0


@dataclass(frozen=True)
class Round:
    """What one reconciliation round did."""

    geocode: int  # reports re-sent to geocode
    geofence: int  # reports re-sent to geofence
    skipped: tuple[str, ...] = ()  # stages left alone because they are behind
    views: int = 0  # trackers whose views were stale: notice re-sent


class Reconciler:
    def __init__(
        self,
        db: Database,
        producer: Producer,
        routes: dict[str, Route],
        clock: Clock,
        grace_s: int = 300,
        limit: int = 10_000,
        max_republish: int = 3,
        retention_days: int | None = None,
    ) -> None:
        self.db = db
        self.producer = producer
        self.routes = routes
        self.clock = clock
        self.grace_s = grace_s
        self.limit = limit
        self.max_republish = max_republish
        self.retention_days = retention_days
        self._pruned_at: float | None = None  # monotonic

    async def _behind(self, stage: str) -> bool:
        keys = self.routes[stage].keys()
        age_ms = await unfinished_age_ms(self.producer.client, keys, self.producer.url)
        if age_ms > self.grace_s * 1000:
            log.warning(
                "%s is %.0f s behind (more than reconcile_grace_s): not re-sending its work",
                stage,
                age_ms / 1000,
            )
            return True
        return False

    async def maintain(self, now: datetime) -> None:
        """Partitions ahead of time, and retention: a failure is logged, never fatal
        (the default partition takes what a missing partition would have)."""
        try:
            await self.db.run(history.maintain, now)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            log.warning("could not create the history's partitions ahead: %s", exc)
        due = self._pruned_at is None or time.monotonic() - self._pruned_at >= PRUNE_EVERY_S
        if self.retention_days is None or not due:
            return
        self._pruned_at = time.monotonic()
        cutoff = now - timedelta(days=self.retention_days)
        try:
            result = await asyncio.to_thread(history.prune, self.db.engine, cutoff)
        except Exception as exc:
            log.warning("history retention failed (retried in an hour): %s", exc)
            return
        if result.partitions or result.rows:
            log.info(
                "retention: dropped %d partitions, %s rows, older than %s",
                len(result.partitions),
                sum(result.rows.values()),
                cutoff.isoformat(),
            )

    async def run_once(self) -> Round:
        now = self.clock()
        await self.maintain(now)
        older_than = now - timedelta(seconds=self.grace_s)
        skipped = tuple([s for s in (GEOCODE, GEOFENCE) if await self._behind(s)])
        if len(skipped) == 2:
            return Round(0, 0, skipped)
        # counted before sent (one transaction): a failed send costs one of the re-sends
        not_geocoded, not_checked = await self.db.run(
            reconcile_store.claim_incomplete,
            older_than,
            self.limit,
            self.max_republish,
            now,
            geocode=GEOCODE not in skipped,
            geofence=GEOFENCE not in skipped,
        )
        box = self.producer.outbox()
        # the events are read off the stored rows: every field they carry is a column
        for r in not_geocoded:
            reported = LocationReported.model_validate(r, from_attributes=True)
            box.add(self.routes[GEOCODE], reported, partition_key=r.tracker_id)
        for r in not_checked:
            geocoded = LocationGeocoded.model_validate(r, from_attributes=True)
            box.add(self.routes[GEOFENCE], geocoded, partition_key=r.tracker_id)
        stale = await self._stale_views(now)
        if stale:
            log.warning("views stale for %d trackers: refresh notice re-sent", len(stale))
            box.add(
                self.routes[VIEW_REFRESH],
                ViewsChanged(views=list(VIEW_NAMES), changed_at=now, tracker_ids=stale),
            )
        await box.flush(self.producer.client, self.producer.url)
        if not_geocoded or not_checked:
            abandoned = await self.db.run(reconcile_store.count_abandoned, self.max_republish)
            if abandoned:
                log.error(
                    "%d reports are still unfinished after %d re-sends; their dead letters "
                    "say why (trackstream dlq list geocode / geofence)",
                    abandoned,
                    self.max_republish,
                )
        return Round(len(not_geocoded), len(not_checked), skipped, len(stale))

    async def _stale_views(self, now: datetime) -> list[str]:
        grace = timedelta(seconds=self.grace_s)
        try:
            return await self.db.run(
                reconcile_store.stale_view_trackers, now - 3 * grace, now - grace, self.limit
            )
        except DatabaseUnavailable:
            raise
        except Exception as exc:  # a missing or unpopulated view: view-refresh rebuilds it
            log.warning("could not compare the views with the history: %s", exc)
            return []
