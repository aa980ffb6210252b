"""fetch: FetchRequested -> location source -> location_history -> LocationReported.

No loss between source and store: each tracker's *cursor* is its latest report stored
in the database with a credible time (observed at most ``fix_future_tolerance_s``
after it was fetched: :func:`schemas.report_store.fetch_positions`), never what some process
was handed, and the source is asked for the reports observed after the cursor less
``source_lateness_s`` (``since``; see :mod:`processors.sources`). A batch whose store
failed (database down, the process died) is therefore fetched again by the retry,
whichever worker runs it; a report delivered up to ``source_lateness_s`` late is still
asked for, and the overlap's reports already stored are dropped by the natural key. A
new report observed before the cursor is counted late; one at or before ``since``
(delivered although not asked for: a bulk upload, an API that ignores ``since``) is
stored too, counted as later than the bound and logged (``tracker_source_stats``,
metric ``trackstream_fetch_late_reports_total``). A future-dated fix is stored (the
geofence stage rejects it) and never becomes the cursor.

One bad record never costs the others: a record that cannot be a location is kept in
``rejected_reports`` with its reason and raw JSON; a response bad as a whole
(:class:`~processors.sources.SourceBadResponse`) is retried, then dead-lettered. A
per-tracker error from the API affects only that tracker: its state is recorded and it
is due again after its own backoff (:func:`schemas.source_store.record_errors`), not
marked fetched; the first clean fetch ends the error.

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
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from pydantic import ValidationError

from processors.clock import Clock
from processors.database import Database, DatabaseUnavailable, classify_db_error
from processors.resilience import CircuitOpen
from processors.revalidate import FetchRevalidator
from processors.sources import (
    LocationSource,
    SourceBadResponse,
    SourceRejected,
    SourceUnavailable,
    fetch_batch,
)
from processors.topology import GEOCODE
from schemas import report_store, schedule, source_store, tracker_store
from schemas.events import FetchRequested, LocationReported
from streams.consumer import Context
from streams.errors import Defer, RateLimited, Reject, Retry
from streams.message import Message
from streams.producer import Route

log = logging.getLogger("trackstream.fetch")


@dataclass
class Outcome:
    """What a call brought besides new reports, stored with them (one transaction)."""

    cursors: dict[str, datetime | None]  # tracker -> its cursor when the call was made
    since: dict[str, datetime | None]  # what the source was asked from
    rejected: list[tuple[str | None, str, str]] = field(default_factory=list)
    errors: list[source_store.TrackerErrorRow] = field(default_factory=list)
    source: str = "unknown"
    min_interval_s: float = 300.0
    # filled in by the store: tracker -> {"late_reports": n, "beyond_bound_reports": n}
    late: dict[str, Counter[str]] = field(default_factory=dict)


class FetchStage:
    def __init__(
        self,
        db: Database,
        source: LocationSource,
        routes: dict[str, Route],
        clock: Clock,
        revalidator: FetchRevalidator | None = None,
        *,
        lateness_s: float = 3600.0,
        future_tolerance_s: float | None = 300.0,
        min_fetch_interval_s: float = 300.0,
        registry: CollectorRegistry | None = None,
    ):
        self.db = db
        self.source = source
        self.downstream = routes[GEOCODE]
        self.clock = clock
        self.revalidator = revalidator
        self.lateness = timedelta(seconds=lateness_s)
        self.future_tolerance_s = future_tolerance_s
        self.min_fetch_interval_s = min_fetch_interval_s
        self.reports_new = 0
        self.late = Counter[str]()  # "within" / "beyond" the bound
        self.rejected = 0
        self.tracker_errors = Counter[str]()  # by code
        self._metrics = _Metrics(registry) if registry is not None else None

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
            positions = await self.db.run(
                report_store.fetch_positions, ids, self.future_tolerance_s
            )
        if unknown := [t for t in ids if t not in positions]:
            log.warning(
                "not fetching %d unknown tracker(s): %s", len(unknown), ", ".join(unknown[:10])
            )
        ids = [t for t in ids if t in positions]
        if not ids:
            return
        lateness_s = self.lateness.total_seconds()
        since = {t: None if at is None else at - self.lateness for t, at in positions.items()}
        try:
            batch = await fetch_batch(self.source, ids, positions, lateness_s)
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
        except SourceBadResponse as exc:  # retried, then dead-lettered (the request)
            raise Retry(f"location source sent a bad response: {exc}") from exc
        except SourceRejected as exc:
            raise Reject(f"location source rejected the batch: {exc}") from exc
        now = self.clock()
        source_name = str(getattr(self.source, "source_name", None) or _inner_name(self.source))
        outcome = Outcome(
            positions,
            since,
            [(r.tracker_id, r.reason, r.raw) for r in batch.rejected],
            source=source_name,
            min_interval_s=self.min_fetch_interval_s,
        )
        asked = set(ids)
        errors = {e.tracker_id: e for e in batch.errors if e.tracker_id in asked}
        outcome.errors = [
            source_store.TrackerErrorRow(t, e.code, e.message, e.retry_after_s)
            for t, e in errors.items()
        ]
        reports = []
        for f in batch.fixes:
            try:
                reports.append(
                    LocationReported(
                        tracker_id=f.tracker_id,
                        observed_at=f.observed_at,
                        lat=f.lat,
                        lon=f.lon,
                        accuracy_m=f.accuracy_m,
                        source=f.source,
                        fetched_at=now,
                    )
                )
            except ValidationError as exc:  # a source that does not check its fixes
                outcome.rejected.append(_rejected_fix(f, exc))
        known = set(positions)
        # the fetch succeeded: recorded with the reports, in the same transaction
        fetched = list(request.tracker_ids) if self.revalidator is not None else []
        fetched = [t for t in fetched if t not in errors]
        try:
            new = await self.db.run(_store, reports, ids, now, known, fetched, outcome)
        except DatabaseUnavailable:
            raise  # deferred: the retry fetches these reports again (see the docstring)
        except Exception as exc:
            log.warning("storing the batch failed (%s): storing its reports one by one", exc)
            outcome.late.clear()
            new = await self.db.run(_store_each, reports, ids, now, known, fetched, outcome)
        self.reports_new += len(new)
        self._account(request.batch_id, outcome)
        for report in new:
            ctx.publish(self.downstream, report, partition_key=report.tracker_id, trace=_trace(msg))

    def _account(self, batch_id: str, outcome: Outcome) -> None:
        """Counts and logs what the stored batch brought besides new reports."""
        within = sum(c["late_reports"] - c["beyond_bound_reports"] for c in outcome.late.values())
        beyond = {t: c["beyond_bound_reports"] for t, c in outcome.late.items()}
        beyond = {t: n for t, n in beyond.items() if n}
        self.late["within"] += within
        self.late["beyond"] += sum(beyond.values())
        self.rejected += len(outcome.rejected)
        for e in outcome.errors:
            self.tracker_errors[e.code] += 1
        if self._metrics is not None:
            self._metrics.record(within, sum(beyond.values()), outcome)
        if beyond:
            log.warning(
                "request %s: %d report(s) later than the lateness bound (%g s) stored: %s",
                batch_id,
                sum(beyond.values()),
                self.lateness.total_seconds(),
                ", ".join(f"{t} x{n}" for t, n in sorted(beyond.items())[:10]),
            )
        if outcome.rejected:
            log.warning(
                "request %s: %d record(s) rejected (kept in rejected_reports), first: %s",
                batch_id,
                len(outcome.rejected),
                outcome.rejected[0][1],
            )
        if outcome.errors:
            log.warning(
                "request %s: the source answered %d tracker(s) with an error: %s",
                batch_id,
                len(outcome.errors),
                ", ".join(f"{e.tracker_id} {e.code}" for e in outcome.errors[:10]),
            )


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.late = PromCounter(
            "trackstream_fetch_late_reports",
            "New reports observed before their tracker's cursor; bound=beyond: at or "
            "before cursor - source_lateness_s (delivered although not asked for)",
            ["bound"],
            registry=registry,
        )
        self.rejected = PromCounter(
            "trackstream_fetch_rejected_records",
            "Records from the source that cannot be stored as a location "
            "(kept in rejected_reports)",
            registry=registry,
        )
        self.errors = PromCounter(
            "trackstream_fetch_tracker_errors",
            "Per-tracker errors the location API answered with, by code",
            ["code"],
            registry=registry,
        )
        for bound in ("within", "beyond"):
            self.late.labels(bound)

    def record(self, within: int, beyond: int, outcome: Outcome) -> None:
        if within:
            self.late.labels("within").inc(within)
        if beyond:
            self.late.labels("beyond").inc(beyond)
        if outcome.rejected:
            self.rejected.inc(len(outcome.rejected))
        for e in outcome.errors:
            self.errors.labels(e.code).inc()


def _inner_name(source: Any) -> str:
    inner = getattr(source, "inner", None)
    return str(getattr(inner, "source_name", "unknown")) if inner is not None else "unknown"


def _rejected_fix(f: Any, exc: ValidationError) -> tuple[str | None, str, str]:
    first = exc.errors(include_url=False)[0]
    reason = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    raw = {
        "tracker_id": f.tracker_id,
        "observed_at": f.observed_at.isoformat(),
        "lat": f.lat,
        "lon": f.lon,
        "accuracy_m": f.accuracy_m,
    }
    return f.tracker_id, reason[:256], json.dumps(raw, default=str)[:4000]


def _classify(new: list[LocationReported], outcome: Outcome) -> None:
    """Counts the new reports observed before their tracker's cursor (late) and at or
    before what the source was asked from (later than the bound)."""
    for r in new:
        cursor = outcome.cursors.get(r.tracker_id)
        if cursor is None or r.observed_at >= cursor:
            continue
        c = outcome.late.setdefault(r.tracker_id, Counter())
        c["late_reports"] += 1
        since = outcome.since.get(r.tracker_id)
        if since is not None and r.observed_at <= since:
            c["beyond_bound_reports"] += 1


def _store_outcome(
    session: Any,
    new: list[LocationReported],
    now: Any,
    known: Any,
    ok_ids: list[str],
    outcome: Outcome,
) -> None:
    """The batch's late counts, rejected records and per-tracker errors."""
    _classify(new, outcome)
    counts: dict[str, Counter[str]] = {t: Counter(c) for t, c in outcome.late.items()}
    for t, _, _ in outcome.rejected:
        if t is not None and t in known:
            counts.setdefault(t, Counter())["rejected_reports"] += 1
    source_store.add_counts(session, counts, now)
    source_store.insert_rejected(session, outcome.rejected, now, outcome.source)
    source_store.clear_errors(session, ok_ids)
    source_store.record_errors(session, outcome.errors, now, outcome.min_interval_s)


def _store(
    session: Any,
    reports: list[LocationReported],
    tracker_ids: list[str],
    now: Any,
    known: Any,
    fetched: list[str],
    outcome: Outcome,
) -> Any:
    """Stores the reports and what else the call brought, marks the trackers processed
    and ``fetched`` fetched (what the 12-hour guarantee is measured on,
    :func:`schemas.schedule.mark_fetched`)."""
    new = report_store.insert_reports(session, reports, known)
    tracker_store.mark_processed(session, tracker_ids, now)
    errored = {e.tracker_id for e in outcome.errors}
    _store_outcome(session, new, now, known, [t for t in tracker_ids if t not in errored], outcome)
    schedule.mark_fetched(session, fetched, now)
    return new


def _store_each(
    session: Any,
    reports: list[LocationReported],
    tracker_ids: list[str],
    now: Any,
    known: Any,
    fetched: list[str],
    outcome: Outcome,
) -> list[LocationReported]:
    """:func:`_store` row by row, each in a savepoint; bad rows are logged and skipped."""
    new: list[LocationReported] = []
    for r in sorted(reports, key=lambda r: (r.tracker_id, r.observed_at)):
        with _on_its_own(session, f"skipping report {r.tracker_id}@{r.observed_at}"):
            new += report_store.insert_reports(session, [r], known)
    for t in sorted(tracker_ids):
        with _on_its_own(session, f"could not mark tracker {t!r} processed"):
            tracker_store.mark_processed(session, [t], now)
    errored = {e.tracker_id for e in outcome.errors}
    with _on_its_own(session, "could not record the batch's late, rejected and errors"):
        ok_ids = [t for t in tracker_ids if t not in errored]
        _store_outcome(session, new, now, known, ok_ids, outcome)
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
        if classify_db_error(exc) is not None:
            raise
        log.error("%s: %s", failure, exc)


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(1, int(seconds * 1000))


def _trace(msg: Message[Any]) -> str | None:
    return msg.envelope.trace if msg.envelope else None
