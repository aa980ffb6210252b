"""Fetch-time re-validation: a request may have waited in the stream for a long time
(an outage, a slow API), so just before the source is called its trackers are checked
against the database again. Trackers claimed by another request within
``min_fetch_interval_s``, or outside their production run now, are dropped from the
call and counted; the rest are claimed for this request (:func:`schemas.schedule.claim_fetch`).

A retry of the same request (after a failed call) is admitted again; once its fetch
succeeded (the fetch stage marks its trackers fetched in the transaction that stores
the reports, :func:`schemas.schedule.mark_fetched`) it is not.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.orm import Session

from processors.clock import Clock
from processors.database import Database
from schemas import report_store, schedule
from schemas.events import FetchRequested

Positions = dict[str, datetime | None]  # tracker -> its latest stored report's time

log = logging.getLogger("trackstream.fetch")

REASONS = ("too_soon", "outside_run")


class FetchRevalidator:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        min_fetch_interval_s: float,
        registry: CollectorRegistry | None = None,
        future_tolerance_s: float | None = None,
    ) -> None:
        self.future_tolerance_s = future_tolerance_s
        self.db = db
        self.clock = clock
        self.min_fetch_interval_s = min_fetch_interval_s
        self.dropped = dict.fromkeys(REASONS, 0)
        self._counter = (
            Counter(
                "trackstream_fetch_trackers_dropped",
                "Trackers dropped from a fetch request at fetch time, by reason "
                "(too_soon: fetched within min_fetch_interval_s; outside_run)",
                ["reason"],
                registry=registry,
            )
            if registry is not None
            else None
        )
        if self._counter is not None:
            for reason in REASONS:
                self._counter.labels(reason)

    async def admit(self, request: FetchRequested) -> tuple[FetchRequested, Positions] | None:
        """The request with only the trackers that may be fetched now (claimed for it),
        and where fetching them starts (:func:`schemas.report_store.fetch_positions`, read in
        the claim's transaction); None when none may be fetched."""
        claim, positions = await self.db.run(
            _claim_and_positions,
            request.tracker_ids,
            request.batch_id,
            self.clock(),
            self.min_fetch_interval_s,
            self.future_tolerance_s,
        )
        for reason, ids in (("too_soon", claim.too_soon), ("outside_run", claim.outside_run)):
            if not ids:
                continue
            self.dropped[reason] += len(ids)
            if self._counter is not None:
                self._counter.labels(reason).inc(len(ids))
        if claim.too_soon or claim.outside_run:
            log.info(
                "request %s: dropped %d tracker(s) fetched within %g s, %d outside their run",
                request.batch_id,
                len(claim.too_soon),
                self.min_fetch_interval_s,
                len(claim.outside_run),
            )
        if not claim.admitted:
            return None
        if claim.admitted != list(request.tracker_ids):
            request = request.model_copy(update={"tracker_ids": claim.admitted})
        return request, positions


def _claim_and_positions(
    session: Session,
    tracker_ids: Sequence[str],
    batch_id: str,
    now: datetime,
    interval_s: float,
    future_tolerance_s: float | None,
) -> tuple[schedule.FetchClaim, Positions]:
    claim = schedule.claim_fetch(session, tracker_ids, batch_id, now, interval_s)
    if not claim.admitted:
        return claim, {}
    return claim, report_store.fetch_positions(session, claim.admitted, future_tolerance_s)
