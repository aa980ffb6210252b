"""geocode: LocationReported -> reverse geocoder (batch) -> address -> LocationGeocoded.

Per batch: one geocoder call and one set-based write (:func:`schemas.report_store.set_addresses`,
rows locked in id order). A batch whose write fails for a reason other than the
database being unavailable is written again report by report (each in a savepoint), so
one bad row is dead-lettered alone and the rest go on; so is a report whose address the
geocoder answered unusable (a control character, too long), and a geocoder call that
fails on a bad point is retried point by point.

The worker's gate (:meth:`GeocodeStage.ready`) loads the geocoder's data before the
first entry is read, so the first batch does not pay for it inside its timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from processors.clock import Clock
from processors.database import Database, DatabaseUnavailable, is_permanent
from processors.geocoding import Address, Geocoder, OfflineGeocoder
from processors.topology import GEOFENCE
from schemas import report_store
from schemas.events import LocationGeocoded, LocationReported
from streams.consumer import Context
from streams.errors import Reject
from streams.message import Message
from streams.producer import Route

log = logging.getLogger("trackstream.geocode")

SET_BATCH_SIZE = 500  # entries per read with the offline geocoder


class GeocodeStage:
    def __init__(self, db: Database, geocoder: Geocoder, routes: dict[str, Route], clock: Clock):
        self.db = db
        self.geocoder = geocoder
        self.downstream = routes[GEOFENCE]
        self.clock = clock
        self.warm = False

    def _layers(self) -> Iterator[Any]:
        """The geocoder and what it wraps (a cache's ``inner``), outermost first."""
        geocoder: Any = self.geocoder
        while geocoder is not None:
            yield geocoder
            geocoder = getattr(geocoder, "inner", None)

    @property
    def batch_size(self) -> int | None:
        """Entries per read unless ``TRACKSTREAM_BATCH_SIZE`` is set: large batches for
        the offline geocoder (set-based, no network), the default for a remote one."""
        offline = any(isinstance(g, OfflineGeocoder) for g in self._layers())
        return SET_BATCH_SIZE if offline else None

    async def ready(self) -> None:
        """The worker's gate: the first time, load the geocoder's data (an offline
        geocoder's place index, also behind a cache) before anything is read."""
        if self.warm:
            return
        self.warm = True  # once: a failed load is retried by the first batch instead
        for geocoder in self._layers():
            if (warm_up := getattr(geocoder, "warm_up", None)) is not None:
                await warm_up()
                return

    async def _addresses(
        self, reports: Sequence[LocationReported]
    ) -> tuple[dict[int, Address], dict[int, BaseException]]:
        points = [(r.lat, r.lon) for r in reports]
        try:
            return dict(enumerate(await self.geocoder.reverse(points))), {}
        except ValueError:
            if len(points) == 1:
                raise
        # one bad point fails the whole call: look them up one by one
        found: dict[int, Address] = {}
        failed: dict[int, BaseException] = {}
        for i, point in enumerate(points):
            try:
                (found[i],) = await self.geocoder.reverse([point])
            except ValueError as exc:
                failed[i] = Reject(f"cannot geocode {point}: {exc}")
        return found, failed

    async def handle_batch(
        self, msgs: Sequence[Message[LocationReported]], ctx: Context
    ) -> Mapping[str, BaseException] | None:
        reports = [m.payload for m in msgs]
        addresses, failed = await self._addresses(reports)
        todo: list[int] = []
        geocoded: list[LocationGeocoded] = []
        for i in sorted(addresses):
            r, a = reports[i], addresses[i]
            try:
                g = LocationGeocoded(
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
                    time_zone=a.time_zone,
                )
            except ValidationError as exc:  # the geocoder's answer for this point is unusable
                failed[i] = Reject(f"unusable address for ({r.lat}, {r.lon}): {exc}")
                continue
            todo.append(i)
            geocoded.append(g)
        now = self.clock()
        try:
            await self.db.run(report_store.set_addresses, geocoded, now)
        except DatabaseUnavailable:
            raise  # the whole batch waits for the database
        except Exception as exc:
            log.warning("geocode batch write failed (%s): writing report by report", exc)
            for j, err in (
                await self.db.run(report_store.set_addresses_each, geocoded, now)
            ).items():
                # a row's error was caught in its savepoint, inside the thread: the
                # database's one translation makes an outage or a conflict a Defer
                failed[todo[j]] = (
                    Reject(f"cannot store the address: {err}")
                    if is_permanent(err)
                    else self.db.translate(err)
                )
        for j, g in enumerate(geocoded):
            if todo[j] not in failed:
                ctx.publish(self.downstream, g, partition_key=g.tracker_id)
        return {msgs[i].entry_id: exc for i, exc in failed.items()}
