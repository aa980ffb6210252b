"""The reconciler: work the database shows as incomplete is published again.

A report stored but not geocoded, or geocoded but not geofence-checked, after
``grace_s`` means a message was lost (Redis lost data, or a process died between a
commit and a publish). Re-publishing is safe because every stage is idempotent.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from processors.clock import Clock
from processors.database import Database
from processors.topology import GEOCODE, GEOFENCE
from schemas import store
from schemas.events import LocationGeocoded, LocationReported
from streams.producer import Producer, Route


class Reconciler:
    def __init__(
        self,
        db: Database,
        producer: Producer,
        routes: dict[str, Route],
        clock: Clock,
        grace_s: int = 300,
        limit: int = 10_000,
    ) -> None:
        self.db = db
        self.producer = producer
        self.routes = routes
        self.clock = clock
        self.grace_s = grace_s
        self.limit = limit

    async def run_once(self) -> tuple[int, int]:
        """Returns (reports re-sent to geocode, reports re-sent to geofence)."""
        older_than = self.clock() - timedelta(seconds=self.grace_s)
        not_geocoded, not_checked = await self.db.run(
            store.incomplete_reports, older_than, self.limit
        )
        box = self.producer.outbox()
        for r in not_geocoded:
            box.add(self.routes[GEOCODE], _reported(r), partition_key=r.tracker_id)
        for r in not_checked:
            box.add(self.routes[GEOFENCE], _geocoded(r), partition_key=r.tracker_id)
        await box.flush(self.producer.client, self.producer.url)
        return len(not_geocoded), len(not_checked)


def _reported(r: Any) -> LocationReported:
    if isinstance(r, LocationReported):
        return r
    return LocationReported(
        tracker_id=r.tracker_id,
        observed_at=r.observed_at,
        lat=r.lat,
        lon=r.lon,
        accuracy_m=r.accuracy_m,
        source=r.source,
        fetched_at=r.fetched_at,
    )


def _geocoded(r: Any) -> LocationGeocoded:
    if isinstance(r, LocationGeocoded):
        return r
    return LocationGeocoded(
        tracker_id=r.tracker_id,
        observed_at=r.observed_at,
        lat=r.lat,
        lon=r.lon,
        city=r.city,
        country_code=r.country_code,
        country=r.country,
        address=r.address,
    )
