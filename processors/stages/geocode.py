"""geocode: LocationReported -> reverse geocoder (batch) -> address -> LocationGeocoded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from processors.clock import Clock
from processors.database import Database
from processors.geocoding import Geocoder
from processors.topology import GEOFENCE
from schemas import store
from schemas.events import LocationGeocoded, LocationReported
from streams.consumer import Context
from streams.message import Message
from streams.producer import Route


class GeocodeStage:
    def __init__(self, db: Database, geocoder: Geocoder, routes: dict[str, Route], clock: Clock):
        self.db = db
        self.geocoder = geocoder
        self.downstream = routes[GEOFENCE]
        self.clock = clock

    async def handle_batch(
        self, msgs: Sequence[Message[LocationReported]], ctx: Context
    ) -> Mapping[str, BaseException] | None:
        reports = [m.payload for m in msgs]
        addresses = await self.geocoder.reverse([(r.lat, r.lon) for r in reports])
        geocoded = [
            LocationGeocoded(
                tracker_id=r.tracker_id,
                observed_at=r.observed_at,
                lat=r.lat,
                lon=r.lon,
                city=a.city,
                country_code=a.country_code,
                country=a.country,
                address=a.address,
                region=a.region,
                district=a.district,
            )
            for r, a in zip(reports, addresses, strict=True)
        ]
        await self.db.run(store.set_addresses, geocoded, self.clock())
        for g in geocoded:
            ctx.publish(self.downstream, g, partition_key=g.tracker_id)
        return None
