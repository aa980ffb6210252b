"""A pipeline on real servers for the tests: simulated fleet, manual clock, stages
drained in burst mode, and an independent reference for the expected results."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import select

from processors import topology
from processors.clock import ManualClock
from processors.config import load
from processors.crossings import StoredFix, evaluate_history
from processors.geocoding import Address
from processors.geofencing import GeofenceIndex
from processors.pipeline import Pipeline
from processors.resilience import CircuitBreaker, RateLimiter
from processors.sources import Fix, ResilientSource, SimulatedFleet, SourceBatch
from schemas import geofence_defs
from schemas.db import upgrade
from schemas.tables import GeofenceEventRow, LocationReport
from streams.keys import StageKeys
from tests.support import FAST

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
# stages write to a database: batches small enough to finish well within the timeout
PIPELINE = {"batch_size": 10, "handler_timeout_ms": 5_000, "claim_idle_ms": 6_000}


class RecordingSource:
    """Passes calls through to the fleet and remembers every fix it returned."""

    def __init__(self, inner: SimulatedFleet) -> None:
        self.inner = inner
        self.returned: list[Fix] = []

    async def fetch(self, tracker_ids: Sequence[str], since: Any = None) -> list[Fix]:
        fixes = await self.inner.fetch(tracker_ids, since)
        self.returned.extend(fixes)
        return fixes

    async def fetch_batch(
        self, tracker_ids: Sequence[str], since: Any = None, lateness_s: float = 0.0
    ) -> SourceBatch:
        batch = await self.inner.fetch_batch(tracker_ids, since, lateness_s)
        self.returned.extend(batch.fixes)
        return batch


class FixedGeocoder:
    """A deterministic stand-in for tests that are not about geocoding (the offline
    geocoder's data takes seconds to load)."""

    async def reverse(self, points: Sequence[tuple[float, float]]) -> list[Address]:
        return [
            Address(
                city=f"cell {round(lat, 1)},{round(lon, 1)}",
                country_code="XX",
                country="Testland",
                address=None,
            )
            for lat, lon in points
        ]


def seed_fleet(session: Any, count: int, now: datetime) -> None:
    from ops.seeding import seed_simulated

    seed_simulated(session, count, seed=7, now=now)


class Harness:
    """Builds a pipeline on ``redis_url``/``db_url`` and drives it step by step."""

    def __init__(
        self,
        target: Any,
        prefix: str,
        db_url: str,
        *,
        trackers: int = 20,
        start: datetime = START,
        breaker_failures: int = 1000,
        view_refresh_interval_s: float = 0,
        source: Any = None,
        **stream_overrides: Any,
    ) -> None:
        self.clock = ManualClock(start)
        upgrade(db_url)
        self.streams, self.app = load(
            redis_url=target.url,
            redis_cluster=target.cluster,
            prefix=prefix,
            database_url=db_url,
            **{**FAST, **stream_overrides},  # app settings too (source_lateness_s=...)
            view_refresh_interval_s=view_refresh_interval_s,
            reconcile_grace_s=60,
        )
        self.fleet = SimulatedFleet(7, self.clock)
        self.recording = RecordingSource(self.fleet)
        self.breaker = CircuitBreaker(breaker_failures, 0.2)
        source = ResilientSource(
            source or self.recording, self.breaker, RateLimiter(10_000, 10_000), attempts=1
        )
        self.registry = CollectorRegistry()
        self.pipeline = Pipeline(
            self.streams,
            self.app,
            clock=self.clock,
            source=source,
            geocoder=FixedGeocoder(),
            registry=self.registry,
        )
        self.db = self.pipeline.db
        self.db.run_sync(seed_fleet, trackers, start)
        self.workers = {s: self.pipeline.worker(s, consumer=f"t-{s}") for s in topology.STAGES}
        self.scheduler = self.pipeline.scheduler()

    @property
    def client(self) -> Any:
        return self.pipeline.client

    def keys(self, stage: str) -> StageKeys:
        return self.pipeline.routes[stage].keys()

    async def pump(self, stages: Iterable[str] = topology.STAGES, rounds: int = 20) -> bool:
        """Run the stages in burst mode, in order, until no stream has work left (True)
        or ``rounds`` passes are done (False: entries still pending, e.g. not yet idle
        long enough to be claimed)."""
        stages = list(stages)
        for _ in range(rounds):
            for s in stages:
                await self.workers[s].run(burst=True)
            if await self.idle(stages):
                return True
        return False

    async def drain(self, stages: Iterable[str] = topology.STAGES, rounds: int = 20) -> None:
        """:meth:`pump`, failing if the pipeline did not drain."""
        if not await self.pump(stages, rounds):
            raise AssertionError("the pipeline did not drain")

    async def idle(self, stages: Iterable[str] = topology.STAGES) -> bool:
        from streams.monitor import stage_status

        for s in stages:
            st = await stage_status(self.client, self.keys(s))
            if st.lag or st.pending:
                return False
        return True

    async def cycle(self, minutes: float = 6) -> None:
        """One scheduling round, drained, then the clock moves on."""
        await self.scheduler.tick()
        await self.drain()
        self.clock.advance(minutes=minutes)

    async def aclose(self) -> None:
        await self.pipeline.aclose()

    # -- what the database holds

    def reports(self) -> list[Any]:
        return self.db.run_sync(
            lambda s: list(
                s.scalars(
                    select(LocationReport).order_by(
                        LocationReport.tracker_id, LocationReport.observed_at
                    )
                )
            )
        )

    def events(self) -> list[tuple[str, datetime, int, str]]:
        return self.db.run_sync(
            lambda s: [
                (e.tracker_id, e.observed_at, e.geofence_id, e.kind)
                for e in s.scalars(
                    select(GeofenceEventRow).order_by(
                        GeofenceEventRow.tracker_id,
                        GeofenceEventRow.observed_at,
                        GeofenceEventRow.geofence_id,
                    )
                )
            ]
        )

    def expected_events(self) -> list[tuple[str, datetime, int, str]]:
        """Enter/exit events computed from scratch from the stored history (the stage
        computes them incrementally, in whatever order reports arrive)."""
        index = GeofenceIndex(self.db.run_sync(geofence_defs.active_geofences))
        by_tracker: dict[str, list[Any]] = defaultdict(list)
        for r in self.reports():
            by_tracker[r.tracker_id].append(
                StoredFix(r.observed_at, r.lat, r.lon, r.accuracy_m, r.fetched_at)
            )
        rules = self.app.geofence_rules()
        expected = [
            (tracker, at, gid, kind)
            for tracker, fixes in by_tracker.items()
            for at, gid, kind in evaluate_history(index, rules, fixes)
        ]
        return sorted(expected)
