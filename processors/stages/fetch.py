"""fetch: FetchRequested -> location source -> location_history -> LocationReported.

Writes are idempotent on (tracker, observed_at); only reports new to the database are
published. If the process dies after the insert and before publishing, the redelivered
request finds nothing new: the reconciler publishes those reports after its grace
period (the database shows them as not geocoded).

A source outage: once the source's circuit breaker opens, the worker's gate
(:meth:`FetchStage.ready`) stops reading, and requests that hit the open circuit are
deferred without spending a delivery, so an outage of any length dead-letters
nothing; the breaker's half-open trial finds out when the source is back.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from processors.clock import Clock
from processors.database import Database
from processors.resilience import CircuitOpen
from processors.revalidate import FetchRevalidator
from processors.sources import LocationSource, SourceRejected, SourceUnavailable
from processors.topology import GEOCODE
from schemas import store
from schemas.events import FetchRequested, LocationReported
from streams.consumer import Context
from streams.errors import Defer, RateLimited, Reject, Retry
from streams.message import Message
from streams.producer import Route

log = logging.getLogger("trackstream.fetch")


class FetchStage:
    def __init__(
        self,
        db: Database,
        source: LocationSource,
        routes: dict[str, Route],
        clock: Clock,
        revalidator: FetchRevalidator | None = None,
    ):
        self.db = db
        self.source = source
        self.downstream = routes[GEOCODE]
        self.clock = clock
        self.revalidator = revalidator
        self.reports_new = 0

    def _blocked_for_s(self) -> float:
        blocked_for_s = getattr(self.source, "blocked_for_s", None)
        return float(blocked_for_s()) if blocked_for_s is not None else 0.0

    async def ready(self) -> None:
        """The worker's gate: while the source's circuit is open nothing is read, so an
        outage holds requests in the stream instead of spending their deliveries."""
        if (wait_s := self._blocked_for_s()) <= 0:
            return
        log.warning("location source circuit open: fetch paused for %.1f s", wait_s)
        while wait_s > 0:
            await asyncio.sleep(wait_s)
            wait_s = self._blocked_for_s()
        log.info("location source circuit admits calls again: fetch resumes")

    async def handle(self, msg: Message[FetchRequested], ctx: Context) -> None:
        request = msg.payload
        if self.revalidator is not None:  # the 5-minute floor and runs, now (revalidate.py)
            if (admitted := await self.revalidator.admit(request)) is None:
                return
            request = admitted
        try:
            fixes = await self.source.fetch(request.tracker_ids)
        except CircuitOpen as exc:
            # not tried at all: no delivery spent (the gate holds further reads)
            raise Defer("location source circuit is open", delay_ms=_ms(exc.retry_after_s)) from exc
        except SourceUnavailable as exc:
            if (wait_s := self._blocked_for_s()) > 0:
                # the source is down for everyone (the circuit opened): not this
                # request's fault, so it keeps its deliveries for real failures
                raise Defer(f"location source down: {exc}", delay_ms=_ms(wait_s)) from exc
            raise Retry(f"location source unavailable: {exc}") from exc
        except RateLimited as exc:  # no slot within the wait the limiter allows
            raise Defer(f"location API rate limit: {exc}", delay_ms=_ms(exc.retry_after_s)) from exc
        except SourceRejected as exc:
            raise Reject(f"location source rejected the batch: {exc}") from exc
        now = self.clock()
        reports = [
            LocationReported(
                tracker_id=f.tracker_id,
                observed_at=f.observed_at,
                lat=f.lat,
                lon=f.lon,
                accuracy_m=f.accuracy_m,
                source=f.source,
                fetched_at=now,
            )
            for f in fixes
        ]
        new = await self.db.run(_store, reports, list(request.tracker_ids), now)
        self.reports_new += len(new)
        for report in new:
            ctx.publish(self.downstream, report, partition_key=report.tracker_id, trace=_trace(msg))
        if self.revalidator is not None:
            await self.revalidator.fetched(request.tracker_ids, now)


def _store(session: Any, reports: list[LocationReported], tracker_ids: list[str], now: Any) -> Any:
    new = store.insert_reports(session, reports)
    store.mark_processed(session, tracker_ids, now)
    return new


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(1, int(seconds * 1000))


def _trace(msg: Message[Any]) -> str | None:
    return msg.envelope.trace if msg.envelope else None
