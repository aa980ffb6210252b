"""fetch: FetchRequested -> location source -> location_history -> LocationReported.

No loss between source and store: the source is asked for the reports observed after
each tracker's latest report *stored in the database* (``since``; see
:mod:`processors.sources`), never after what some process was handed. A batch whose
store failed (database down, the process died) is therefore fetched again by the retry,
whichever worker runs it.

Writes are idempotent on (tracker, observed_at); only reports new to the database are
published. If the process dies after the insert and before publishing, the redelivered
request finds nothing new: the reconciler publishes those reports after its grace
period (the database shows them as not geocoded).

Per request, two transactions: one claims the trackers (fetch-time re-validation) and
reads where to fetch them from; after the source call, the other runs one bulk
``INSERT ... ON CONFLICT DO NOTHING RETURNING``, one ``UPDATE`` of the trackers and
one marking them fetched. If that fails for a reason other than the database being
unavailable, the reports are stored one by one (each in a savepoint): a bad row is
logged and skipped, the rest are stored and published. A tracker id the database
cannot hold (a NUL byte) is skipped before any query.

A source outage: once the source's circuit breaker opens, the worker's gate
(:meth:`FetchStage.ready`) stops reading, and requests that hit the open circuit are
deferred without spending a delivery, so an outage of any length dead-letters
nothing; the breaker's half-open trial finds out when the source is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from processors.clock import Clock
from processors.database import Database, DatabaseUnavailable, classify
from processors.resilience import CircuitOpen
from processors.revalidate import FetchRevalidator
from processors.sources import LocationSource, SourceRejected, SourceUnavailable
from processors.topology import GEOCODE
from schemas import schedule, store
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
        positions = None
        if self.revalidator is not None:  # the 5-minute floor and runs, now (revalidate.py)
            if (admitted := await self.revalidator.admit(request)) is None:
                return
            request, positions = admitted
        ids = list(dict.fromkeys(request.tracker_ids))
        if bad := [t for t in ids if "\x00" in t]:
            log.error("skipping %d tracker id(s) with a NUL byte: %r", len(bad), bad[:5])
            ids = [t for t in ids if "\x00" not in t]
        if positions is None:
            positions = await self.db.run(store.fetch_positions, ids)
        if unknown := [t for t in ids if t not in positions]:
            log.warning(
                "not fetching %d unknown tracker(s): %s", len(unknown), ", ".join(unknown[:10])
            )
        ids = [t for t in ids if t in positions]
        if not ids:
            return
        try:
            fixes = await self.source.fetch(ids, positions)
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
        known = set(positions)
        # the fetch succeeded: recorded with the reports, in the same transaction
        fetched = list(request.tracker_ids) if self.revalidator is not None else []
        try:
            new = await self.db.run(_store, reports, ids, now, known, fetched)
        except DatabaseUnavailable:
            raise  # deferred: the retry fetches these reports again (see the docstring)
        except Exception as exc:
            log.warning("storing the batch failed (%s): storing its reports one by one", exc)
            new = await self.db.run(_store_each, reports, ids, now, known, fetched)
        self.reports_new += len(new)
        for report in new:
            ctx.publish(self.downstream, report, partition_key=report.tracker_id, trace=_trace(msg))


def _store(
    session: Any,
    reports: list[LocationReported],
    tracker_ids: list[str],
    now: Any,
    known: Any,
    fetched: list[str],
) -> Any:
    """Stores the reports, marks the trackers processed and ``fetched`` fetched (what
    the 12-hour guarantee is measured on, :func:`schemas.schedule.mark_fetched`)."""
    new = store.insert_reports(session, reports, known)
    store.mark_processed(session, tracker_ids, now)
    schedule.mark_fetched(session, fetched, now)
    return new


def _store_each(
    session: Any,
    reports: list[LocationReported],
    tracker_ids: list[str],
    now: Any,
    known: Any,
    fetched: list[str],
) -> list[LocationReported]:
    """:func:`_store` row by row, each in a savepoint; bad rows are logged and skipped."""
    new: list[LocationReported] = []
    for r in sorted(reports, key=lambda r: (r.tracker_id, r.observed_at)):
        with _on_its_own(session, f"skipping report {r.tracker_id}@{r.observed_at}"):
            new += store.insert_reports(session, [r], known)
    for t in sorted(tracker_ids):
        with _on_its_own(session, f"could not mark tracker {t!r} processed"):
            store.mark_processed(session, [t], now)
    with _on_its_own(session, f"could not mark {len(fetched)} tracker(s) fetched"):
        schedule.mark_fetched(session, fetched, now)
    order = {(r.tracker_id, r.observed_at): i for i, r in enumerate(reports)}
    return sorted(new, key=lambda r: order[(r.tracker_id, r.observed_at)])


@contextlib.contextmanager
def _on_its_own(session: Any, failure: str) -> Iterator[None]:
    """A step in its own savepoint: if it fails for a reason other than the database
    being unavailable, it is rolled back and logged (``failure: error``), and the
    caller goes on."""
    try:
        with session.begin_nested():
            yield
    except Exception as exc:
        if classify(exc) is not None:
            raise
        log.error("%s: %s", failure, exc)


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(1, int(seconds * 1000))


def _trace(msg: Message[Any]) -> str | None:
    return msg.envelope.trace if msg.envelope else None
