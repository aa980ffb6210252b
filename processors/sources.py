"""Where location reports come from: the ``LocationSource`` port and its adapters.

::

    SourceError
    ├── SourceUnavailable(retry_after_s)   transient: timeout, connection error, 5xx, 408, 429
    └── SourceRejected                     permanent: other 4xx
        └── SourceBadResponse              the response as a whole is not the contract's
                                           (not JSON, an HTML page, truncated, wrong shape):
                                           retried by the fetch stage, then dead-lettered

Adapters: :class:`SimulatedFleet` (deterministic trackers moving around real cities,
for demos and tests), :class:`HttpLocationSource` (a real batch API) and
:class:`ResilientSource`, which wraps either with a circuit breaker, a rate limit and
retries.

Where a fetch starts (the rule every adapter follows): the caller passes ``since``,
tracker -> a time derived from what the database holds (the fetch stage sends the
tracker's cursor, its latest stored report with a credible time, less
``source_lateness_s``: see :mod:`processors.stages.fetch`; None: nothing stored yet),
and the source returns the reports observed after it. A batch whose store failed is
simply fetched again. Without ``since`` (a tool calling the source directly)
:class:`SimulatedFleet` falls back to its in-memory cursor.

What a call returns (:meth:`fetch_batch`): a :class:`SourceBatch` of fixes, records
that cannot be stored as a location (:class:`RejectedRecord`, kept raw with the
reason: one bad report never costs the others) and per-tracker errors the API
answered with (:class:`TrackerError`). :meth:`fetch` returns the fixes alone.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import itertools
import json
import logging
import math
import random
import struct
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from processors.clock import Clock, system_clock
from processors.geofencing import destination_point, haversine_m
from processors.resilience import (
    CircuitBreaker,
    CircuitOpen,
    Limiter,
    Rng,
    Sleep,
    retry_after_s,
    retry_async,
    transient_http_status,
)
from schemas.events import TrackerId, UTCDateTime

log = logging.getLogger(__name__)

MAX_BATCH = 64  # trackers per call to the location API


@dataclass(frozen=True, slots=True)
class Fix:
    """One location report. ``observed_at`` is aware and normalised to UTC."""

    tracker_id: str
    observed_at: datetime
    lat: float
    lon: float
    accuracy_m: float | None
    source: str

    def __post_init__(self) -> None:
        if self.observed_at.tzinfo is None:
            raise ValueError("observed_at must be timezone-aware")
        object.__setattr__(self, "observed_at", self.observed_at.astimezone(UTC))


Since = Mapping[str, datetime | None]


class LocationSource(Protocol):
    async def fetch(self, tracker_ids: Sequence[str], since: Since | None = None) -> list[Fix]:
        """Reports for these trackers (any number per tracker, possibly none), observed
        after ``since[tracker]`` (see the module docstring)."""
        ...


class SourceError(Exception):
    """Base of the errors a location source raises on purpose."""


class SourceUnavailable(SourceError):
    """Transient: try again later (after ``retry_after_s`` when the source said so)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SourceRejected(SourceError):
    """Permanent: the same request will fail the same way."""


class SourceBadResponse(SourceRejected):
    """The response as a whole is not the contract's (not JSON, wrong shape): a broken
    proxy or a deploy in progress as often as a bug, so it is retried, then
    dead-lettered; it does not trip the breaker (the source answered)."""


RAW_MAX = 4000  # characters of a rejected record kept


@dataclass(frozen=True, slots=True)
class RejectedRecord:
    """A record the source sent that cannot be stored as a location."""

    tracker_id: str | None  # as sent, when it was a string
    reason: str
    raw: str  # the record as JSON, at most RAW_MAX characters

    @classmethod
    def of(cls, item: Any, reason: str) -> RejectedRecord:
        tracker = item.get("tracker_id") if isinstance(item, dict) else None
        try:
            raw = json.dumps(item, default=str, ensure_ascii=False)
        except (TypeError, ValueError):
            raw = repr(item)
        return cls(
            tracker[:128].replace("\x00", "\\u0000") if isinstance(tracker, str) else None,
            reason[:256],
            raw[:RAW_MAX],
        )


TRACKER_ERROR_CODES = ("unknown", "forbidden", "unavailable")


@dataclass(frozen=True, slots=True)
class TrackerError:
    """The API answered for one tracker with an error instead of reports: ``unknown``
    and ``forbidden`` are the API's word on the tracker, ``unavailable`` (and any other
    code) is taken as temporary. Only this tracker is affected: retried on its own
    schedule (:func:`schemas.source_store.record_errors`)."""

    tracker_id: str
    code: str
    message: str = ""
    retry_after_s: float | None = None


@dataclass(slots=True)
class SourceBatch:
    """What one call returned."""

    fixes: list[Fix]
    rejected: list[RejectedRecord] = field(default_factory=list)
    errors: list[TrackerError] = field(default_factory=list)


async def fetch_batch(
    source: LocationSource,
    tracker_ids: Sequence[str],
    since: Since | None,
    lateness_s: float = 0.0,
) -> SourceBatch:
    """``source.fetch_batch`` where the source has one, else its plain ``fetch``.

    ``since`` is each tracker's cursor; ``lateness_s`` how far before it the source is
    to look again for reports delivered late (the HTTP API is sent ``since`` less
    this). A plain ``fetch`` gets the shifted ``since``."""
    batch_fn = getattr(source, "fetch_batch", None)
    if batch_fn is not None:
        return await batch_fn(tracker_ids, since, lateness_s)  # type: ignore[no-any-return]
    if since is None:
        return SourceBatch(await source.fetch(tracker_ids))
    return SourceBatch(await source.fetch(tracker_ids, shift(since, lateness_s)))


def shift(since: Since, lateness_s: float) -> dict[str, datetime | None]:
    """``since`` less the lateness bound (None stays None)."""
    delta = timedelta(seconds=lateness_s)
    return {t: None if at is None else at - delta for t, at in since.items()}


# --- simulated fleet ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class City:
    name: str
    country_code: str
    factory: tuple[float, float]  # (lat, lon) of an industrial area
    port: tuple[float, float]  # (lat, lon) of a container terminal or logistics port


CITIES: tuple[City, ...] = (
    City("Shenzhen", "CN", (22.5430, 113.9490), (22.4790, 113.9100)),
    City("Rotterdam", "NL", (51.9330, 4.4330), (51.8800, 4.4250)),
    City("Hamburg", "DE", (53.4600, 9.9850), (53.5060, 9.9250)),
    City("Los Angeles", "US", (33.8320, -118.2600), (33.7460, -118.2700)),
    City("Singapore", "SG", (1.3330, 103.7200), (1.2750, 103.7650)),
    City("Shanghai", "CN", (31.2600, 121.6000), (31.3500, 121.5900)),
    City("Antwerp", "BE", (51.2500, 4.4400), (51.2950, 4.3400)),
    City("Chicago", "US", (41.6950, -87.6100), (41.7050, -87.5400)),
    City("Mumbai", "IN", (19.0100, 72.8600), (18.9400, 72.8450)),
    City("Santos", "BR", (-23.8800, -46.4200), (-23.9300, -46.3600)),
    City("Felixstowe", "GB", (52.0100, 1.2400), (51.9550, 1.3200)),
    City("Busan", "KR", (35.1600, 128.9850), (35.1100, 129.0450)),
    City("Dubai", "AE", (25.0100, 55.1200), (25.0100, 55.0600)),
    City("Lyon", "FR", (45.7000, 4.8850), (45.7250, 4.8200)),
    City("Nagoya", "JP", (35.0900, 136.8900), (35.0300, 136.8400)),
)

FACTORY_RADIUS_M = 500.0
# The port area: a pentagon around the terminal, vertices as (bearing_deg, distance_m).
_PORT_OUTLINE = ((20.0, 900.0), (100.0, 700.0), (160.0, 1000.0), (230.0, 800.0), (300.0, 750.0))
_FACTORY_PARK_M = 150.0  # parked within this distance of the factory point
_PORT_PARK_M = 300.0  # and of the port point


class _Route:
    """A tracker's loop: dwell at the factory, drive to the port, dwell, drive back.

    Held as one array of doubles (knot times, then latitudes, then longitudes of the
    waypoints, then the phase): a fleet of 40,000 keeps 40,000 routes, and tuples of
    float objects cost three times as much memory.
    """

    __slots__ = ("_data", "_n", "city", "report_offset_s")

    def __init__(
        self,
        city: City,
        waypoints: Sequence[tuple[float, float]],  # position at each knot
        knots_s: Sequence[float],  # seconds into the loop of each waypoint, from 0
        phase_s: float,  # where in the loop the tracker is at the epoch
        report_offset_s: int,  # reports fall at this offset within each interval
    ) -> None:
        if len(waypoints) != len(knots_s) or len(knots_s) < 2:
            raise ValueError("a route needs one knot per waypoint, at least two")
        self.city = city
        self.report_offset_s = report_offset_s
        self._n = len(knots_s)
        self._data = array(
            "d", [*knots_s, *(p[0] for p in waypoints), *(p[1] for p in waypoints), phase_s]
        )

    @property
    def period_s(self) -> float:
        return self._data[self._n - 1]

    def position(self, epoch_s: float) -> tuple[float, float]:
        n, d = self._n, self._data
        u = (epoch_s + d[3 * n]) % d[n - 1]
        i = min(bisect.bisect_right(d, u, 0, n), n - 1)
        t0, t1 = d[i - 1], d[i]
        lat0, lat1 = d[n + i - 1], d[n + i]
        lon0, lon1 = d[2 * n + i - 1], d[2 * n + i]
        f = 0.0 if t1 == t0 else (u - t0) / (t1 - t0)
        return lat0 + (lat1 - lat0) * f, lon0 + (lon1 - lon0) * f


class SimulatedFleet:
    """Deterministic trackers shuttling between a factory and a port in real cities.

    Each tracker id maps (by BLAKE2b of seed and id, stable across processes) to a home
    city and its own timings: it dwells 45-120 min inside the factory geofence, drives
    at 30-50 km/h along a bent road to the port, dwells 1-3 h inside the port geofence,
    and drives back another way. Where it is at a time is a pure function of (seed,
    tracker, time). It reports every ``report_interval_s`` at a per-tracker offset;
    ``fetch`` returns the reports observed after ``since[tracker]`` (at most
    ``max_reports_per_call``, the latest ones; only the latest when ``since`` is None).
    Called without ``since``, it uses the position of the previous call instead (an
    in-memory cursor: a second instance starts afresh).
    """

    source_name = "simulated"

    def __init__(
        self,
        seed: int,
        clock: Clock = system_clock,
        *,
        report_interval_s: int = 300,
        max_reports_per_call: int = 12,
        messy: bool = False,
    ) -> None:
        if report_interval_s < 1 or max_reports_per_call < 1:
            raise ValueError("report_interval_s and max_reports_per_call must be >= 1")
        self.messy = messy
        self.seed = seed
        self.clock = clock
        self.report_interval_s = report_interval_s
        self.max_reports_per_call = max_reports_per_call
        self.calls = 0
        self.reports_returned = 0
        self._routes: dict[str, _Route] = {}
        self._cursor: dict[str, int] = {}  # tracker -> index of the last report returned
        self._fail_next = 0
        self._outage = False

    # -- failure injection

    def fail_next(self, n: int = 1) -> None:
        """Make the next ``n`` fetches raise SourceUnavailable."""
        self._fail_next = n

    def outage(self, down: bool = True) -> None:
        """While down, every fetch raises SourceUnavailable."""
        self._outage = down

    # -- the port

    async def fetch(self, tracker_ids: Sequence[str], since: Since | None = None) -> list[Fix]:
        self.calls += 1
        if self._outage or self._fail_next > 0:
            self._fail_next = max(0, self._fail_next - 1)
            raise SourceUnavailable("simulated location API outage")
        if any(not t for t in tracker_ids):
            raise SourceRejected("empty tracker id")
        now_s = self.clock().timestamp()
        fixes: list[Fix] = []
        for tracker_id in dict.fromkeys(tracker_ids):
            latest = self._report_index(tracker_id, now_s)
            if since is None:
                last = self._cursor.get(tracker_id)
            else:
                stored = since.get(tracker_id)
                last = (
                    None if stored is None else self._report_index(tracker_id, stored.timestamp())
                )
            if last is None:  # first fetch: only the latest report
                first = latest
            else:  # everything since the last fetch, at most the latest K
                first = max(last + 1, latest - self.max_reports_per_call + 1)
                latest = max(latest, last)  # a clock that went back returns nothing
            fixes.extend(self.report(tracker_id, k) for k in range(first, latest + 1))
            self._cursor[tracker_id] = latest
        self.reports_returned += len(fixes)
        return fixes

    async def fetch_batch(
        self, tracker_ids: Sequence[str], since: Since | None = None, lateness_s: float = 0.0
    ) -> SourceBatch:
        """:meth:`fetch`; with ``messy``, the trouble of :meth:`_messy_batch`. The tidy
        fleet delivers every report on time, so it skips the lateness overlap (it
        would only send again what is stored)."""
        if not self.messy:
            return SourceBatch(await self.fetch(tracker_ids, since))
        self.calls += 1
        if self._outage or self._fail_next > 0:
            self._fail_next = max(0, self._fail_next - 1)
            raise SourceUnavailable("simulated location API outage")
        batch = self._messy_batch(list(dict.fromkeys(tracker_ids)), since or {}, lateness_s)
        self.reports_returned += len(batch.fixes)
        return batch

    # -- the messy fleet (pure functions of seed, tracker, report and time)

    def _traits(self, tracker_id: str) -> tuple[float, ...]:
        return _units(self.seed, tracker_id, "trouble", n=5)

    def available_at(self, tracker_id: str, k: int) -> float:
        """When report ``k`` reaches the API (epoch seconds): on time for most trackers;
        relayed 1 min to 2 h late (median 8 min) for 15 % of them; for 5 %, offline
        8-16 h a day, the buffer uploaded in bulk when they come back."""
        relay, offline = self._traits(tracker_id)[:2]
        at_s = k * self.report_interval_s + self._route(tracker_id).report_offset_s
        if relay < 0.15:
            (v,) = _units(self.seed, tracker_id, "delay", k, n=1)
            return at_s + 60.0 * (1 + 119 * v**4)
        if relay < 0.20:
            start_h, length_h = 24 * offline, 8 + 8 * offline
            day_s = 86_400.0
            into = (at_s - start_h * 3600) % day_s
            if into < length_h * 3600:
                return at_s - into + length_h * 3600  # the end of the offline spell
        return at_s

    def _messy_report(self, tracker_id: str, k: int) -> Fix:
        """A report as the messy fleet sends it: 1 % of the reports of 4 % of the
        trackers come from a wrong clock (a day ahead, or 20 years), 1 % of those of
        another 4 % have ``lat: 95``."""
        fix = self.report(tracker_id, k)
        _, _, clock, garbage, _ = self._traits(tracker_id)
        (v,) = _units(self.seed, tracker_id, "glitch", k, n=1)
        if clock < 0.04 and v < 0.01:
            ahead = timedelta(days=365 * 20) if v < 0.003 else timedelta(days=1)
            return Fix(
                tracker_id, fix.observed_at + ahead, fix.lat, fix.lon, fix.accuracy_m, fix.source
            )
        if garbage < 0.04 and v < 0.01:
            return Fix(tracker_id, fix.observed_at, 95.0, fix.lon, fix.accuracy_m, fix.source)
        return fix

    def _tracker_error(self, tracker_id: str, now_s: float) -> TrackerError | None:
        """3 % of the trackers are unavailable for about a third of the hours; one in
        200 is forbidden."""
        error = self._traits(tracker_id)[4]
        if error < 0.005:
            return TrackerError(tracker_id, "forbidden", "simulated: not your tracker")
        (v,) = _units(self.seed, tracker_id, "outage", int(now_s // 3600), n=1)
        if error < 0.035 and v < 0.33:
            return TrackerError(tracker_id, "unavailable", "simulated: relay unreachable")
        return None

    def _messy_batch(self, ids: list[str], since: Since, lateness_s: float) -> SourceBatch:
        """Reports observed after ``since`` less ``lateness_s`` and available now, plus
        (like an API with a receive feed) every report that reached the API after the
        tracker's cursor, however old: how a report later than the bound gets in. At
        most 256 reports a tracker (a bulk upload comes whole)."""
        now_s = self.clock().timestamp()
        out = SourceBatch([])
        for t in ids:
            if (error := self._tracker_error(t, now_s)) is not None:
                out.errors.append(error)
                continue
            latest = self._report_index(t, now_s)
            cursor = since.get(t)
            if cursor is None:  # the first call: the window's worth, so nothing is late
                first = latest - int(lateness_s // self.report_interval_s)
            else:
                first = self._report_index(t, cursor.timestamp() - lateness_s) + 1
                # anything that reached the API since the cursor: look back 3 h more
                first = max(first - 36, latest - 255)
            cursor_s = None if cursor is None else cursor.timestamp()
            for k in range(first, latest + 1):
                avail = self.available_at(t, k)
                if avail > now_s:
                    continue
                at_s = k * self.report_interval_s + self._route(t).report_offset_s
                in_window = cursor_s is None or at_s > cursor_s - lateness_s
                if not in_window and avail <= cursor_s:  # type: ignore[operator]
                    continue  # delivered before the cursor's report was
                out.fixes.append(self._messy_report(t, k))
            self._cursor[t] = latest
        return out

    # -- pure functions of (seed, tracker, time)

    def home_city(self, tracker_id: str) -> City:
        return self._route(tracker_id).city

    def position_at(self, tracker_id: str, at: datetime) -> tuple[float, float]:
        """Where the tracker truly is (no GPS noise), as (lat, lon)."""
        return self._route(tracker_id).position(at.timestamp())

    def reports_between(self, tracker_id: str, start: datetime, end: datetime) -> list[Fix]:
        """Every report observed in (start, end], as fetch would return them."""
        first = self._report_index(tracker_id, start.timestamp()) + 1
        last = self._report_index(tracker_id, end.timestamp())
        return [self.report(tracker_id, k) for k in range(first, last + 1)]

    def report(self, tracker_id: str, k: int) -> Fix:
        """The tracker's ``k``-th report since the epoch, with GPS noise and accuracy."""
        route = self._route(tracker_id)
        at_s = k * self.report_interval_s + route.report_offset_s
        lat, lon = route.position(at_s)
        u_acc, u_dir, u_err = _units(self.seed, tracker_id, "report", k, n=3)
        accuracy_m = round(4.0 + 46.0 * u_acc**3, 1)  # mostly under 10 m, up to 50 m
        lat, lon = destination_point(lat, lon, 360.0 * u_dir, 0.5 * accuracy_m * u_err)
        return Fix(
            tracker_id=tracker_id,
            observed_at=datetime.fromtimestamp(at_s, UTC),
            lat=round(lat, 6),
            lon=round(lon, 6),
            accuracy_m=accuracy_m,
            source=self.source_name,
        )

    @staticmethod
    def geofences_for_demo() -> list[dict[str, Any]]:
        """A circle around each city's factory and a polygon around its port area."""
        fences: list[dict[str, Any]] = []
        for city in CITIES:
            fences.append(
                {
                    "name": f"{city.name} factory",
                    "kind": "circle",
                    "center_lat": city.factory[0],
                    "center_lon": city.factory[1],
                    "radius_m": FACTORY_RADIUS_M,
                }
            )
            ring = [destination_point(*city.port, b, d) for b, d in reversed(_PORT_OUTLINE)]
            coords = [[round(lon, 6), round(lat, 6)] for lat, lon in ring]
            geometry = {"type": "Polygon", "coordinates": [[*coords, coords[0]]]}
            fences.append(
                {
                    "name": f"{city.name} port",
                    "kind": "polygon",
                    "geometry_geojson": json.dumps(geometry),
                }
            )
        return fences

    def _report_index(self, tracker_id: str, epoch_s: float) -> int:
        """Index of the last report observed at or before ``epoch_s``."""
        offset_s = self._route(tracker_id).report_offset_s
        return math.floor((epoch_s - offset_s) / self.report_interval_s)

    def _route(self, tracker_id: str) -> _Route:
        route = self._routes.get(tracker_id)
        if route is None:
            route = self._routes[tracker_id] = self._make_route(tracker_id)
        return route

    def _make_route(self, tracker_id: str) -> _Route:
        u = _units(self.seed, tracker_id, "route", n=11)
        city = CITIES[int(u[0] * len(CITIES))]
        factory = destination_point(*city.factory, 360.0 * u[1], _FACTORY_PARK_M * u[2])
        port = destination_point(*city.port, 360.0 * u[3], _PORT_PARK_M * u[4])
        speed_mps = 8.3 + 5.6 * u[5]  # 30-50 km/h
        bend = 0.1 + 0.2 * u[6]  # the road bows out by 10-30 % of the distance
        there = [factory, _bow(factory, port, bend), port]
        back = [port, _bow(port, factory, bend), factory]
        points = [factory]
        knots = [0.0, 60.0 * (45.0 + 75.0 * u[7])]  # dwell at the factory
        points.append(factory)
        for leg, dwell_s in ((there, 60.0 * (60.0 + 120.0 * u[8])), (back, 0.0)):
            for a, b in itertools.pairwise(leg):
                points.append(b)
                knots.append(knots[-1] + haversine_m(*a, *b) / speed_mps)
            if dwell_s:
                points.append(leg[-1])
                knots.append(knots[-1] + dwell_s)
        return _Route(
            city=city,
            waypoints=tuple(points),
            knots_s=tuple(knots),
            phase_s=u[9] * knots[-1],
            report_offset_s=int(u[10] * self.report_interval_s),
        )


def _units(seed: int, tracker_id: str, purpose: str, *parts: object, n: int) -> tuple[float, ...]:
    """``n`` deterministic numbers in [0, 1) from the seed, the tracker and ``parts``."""
    key = "\x1f".join(map(str, (seed, tracker_id, purpose, *parts))).encode()
    digest = hashlib.blake2b(key, digest_size=4 * n).digest()
    return tuple(x / 2**32 for x in struct.unpack(f">{n}I", digest))


def _bow(a: tuple[float, float], b: tuple[float, float], fraction: float) -> tuple[float, float]:
    """The midpoint of a-b pushed sideways (to the left of a->b) by ``fraction`` of a-b."""
    mid_lat, mid_lon = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
    k = math.cos(math.radians(mid_lat))
    dx, dy = (b[1] - a[1]) * k, b[0] - a[0]  # east, north in "degrees of latitude"
    return mid_lat + dx * fraction, mid_lon - dy * fraction / k


# --- HTTP adapter ------------------------------------------------------------------


class _Report(BaseModel):
    # strict, like the events: `lat: true` or `observed_at: 12.5` is an invalid response
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    tracker_id: TrackerId
    observed_at: UTCDateTime
    lat: float = Field(ge=-90.0, le=90.0)
    lon: float = Field(ge=-180.0, le=180.0)
    accuracy_m: float | None = Field(default=None, ge=0.0)


class _BatchResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")

    reports: list[_Report]
    errors: list[_Error] = []


class _Error(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    tracker_id: TrackerId
    error: str = Field(min_length=1, max_length=32)
    message: str = Field("", max_length=2000)
    retry_after_s: float | None = Field(default=None, ge=0.0)


_BatchResponse.model_rebuild()


def _reason(exc: ValidationError) -> str:
    """The first error of a report's validation, like ``lat: Input should be ... 90``."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "report"
    return f"{where}: {first['msg']}"


def parse_batch(content: bytes, wanted: set[str], source_name: str) -> SourceBatch:
    """A response body as a :class:`SourceBatch`; raises :class:`SourceBadResponse`
    when the body as a whole is not the contract's. Every report is validated on its
    own: a bad one becomes a :class:`RejectedRecord`, and the others are kept."""
    try:  # the common case, all valid, in one pass
        batch = _BatchResponse.model_validate_json(content)
        reports: list[Any] = list(batch.reports)
        errors: list[Any] = list(batch.errors)
    except ValidationError:
        try:
            data = json.loads(content)
        except ValueError as exc:
            snippet = content[:80].decode("utf-8", "replace")
            raise SourceBadResponse(f"invalid response: not JSON ({exc}): {snippet!r}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("reports"), list):
            raise SourceBadResponse(
                "invalid response: expected an object with a 'reports' list"
            ) from None
        if not isinstance(data.get("errors", []), list):
            raise SourceBadResponse("invalid response: 'errors' must be a list") from None
        reports, errors = data["reports"], data.get("errors", [])
    out = SourceBatch([])
    for item in reports:
        if not isinstance(item, _Report):
            try:
                item = _Report.model_validate_json(json.dumps(item))
            except ValidationError as exc:
                out.rejected.append(RejectedRecord.of(item, _reason(exc)))
                continue
            except ValueError as exc:  # NaN or Infinity in the JSON
                out.rejected.append(RejectedRecord.of(item, f"not finite: {exc}"))
                continue
        if item.tracker_id not in wanted:
            out.rejected.append(
                RejectedRecord.of(item.model_dump(mode="json"), "tracker not asked for")
            )
            continue
        out.fixes.append(
            Fix(item.tracker_id, item.observed_at, item.lat, item.lon, item.accuracy_m, source_name)
        )
    for entry in errors:
        if not isinstance(entry, _Error):
            try:
                entry = _Error.model_validate_json(json.dumps(entry))
            except (ValidationError, ValueError) as exc:
                reason = _reason(exc) if isinstance(exc, ValidationError) else str(exc)
                out.rejected.append(RejectedRecord.of(entry, f"error entry: {reason}"))
                continue
        if entry.tracker_id in wanted:
            out.errors.append(
                TrackerError(entry.tracker_id, entry.error, entry.message, entry.retry_after_s)
            )
    return out


class HttpLocationSource:
    """A batch location API over HTTP.

    ``POST {base_url}/locations/batch`` with ``{"tracker_ids": [...]}`` (and
    ``Authorization: Bearer <api_key>`` when given; with ``"since": {"T1":
    "2024-05-01T11:55:00+00:00", ...}``, the latest stored report per tracker, see the
    module docstring) must answer 200 with::

        {"reports": [{"tracker_id": "T1", "observed_at": "2024-05-01T12:00:00Z",
                      "lat": 51.92, "lon": 4.48, "accuracy_m": 12.5}, ...]}

    ``observed_at`` is ISO-8601 with an offset; ``accuracy_m`` may be missing or null;
    unknown fields are ignored. The API may answer for some trackers with an error
    instead (``"errors": [{"tracker_id": "T3", "error": "unavailable", "message":
    "...", "retry_after_s": 600}]``, see :class:`TrackerError`). Every report is
    checked on its own (:func:`parse_batch`): one that breaks the contract (``lat:
    95``, a time without an offset, a tracker not asked for) is returned as a
    :class:`RejectedRecord` and the rest are kept. Reports at or before ``since`` are
    kept too (the database drops what it already holds). A client passed in is left
    open; one made here is closed by :meth:`aclose`.
    """

    source_name = "http"

    def __init__(
        self,
        base_url: str,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = 10.0,
        api_key: str | None = None,
        *,
        clock: Clock = system_clock,
    ) -> None:
        self.url = base_url.rstrip("/") + "/locations/batch"
        self.timeout_s = timeout_s
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout_s)
        self._headers = {"Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._clock = clock

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def fetch(self, tracker_ids: Sequence[str], since: Since | None = None) -> list[Fix]:
        batch = await self.fetch_batch(tracker_ids, since)
        if batch.rejected or batch.errors:
            log.warning(
                "%s: %d record(s) rejected, %d tracker error(s) (only fetch_batch returns them)",
                self.url,
                len(batch.rejected),
                len(batch.errors),
            )
        return batch.fixes

    async def fetch_batch(
        self, tracker_ids: Sequence[str], since: Since | None = None, lateness_s: float = 0.0
    ) -> SourceBatch:
        ids = list(tracker_ids)
        body: dict[str, Any] = {"tracker_ids": ids}
        if since:
            since = shift(since, lateness_s)
            body["since"] = {
                t: at.astimezone(UTC).isoformat() for t, at in since.items() if at is not None
            }
        try:
            response = await self._client.post(
                self.url, json=body, headers=self._headers, timeout=self.timeout_s
            )
        except (httpx.UnsupportedProtocol, httpx.DecodingError, httpx.TooManyRedirects) as exc:
            raise SourceRejected(f"POST {self.url}: {exc!r}") from exc
        except httpx.TransportError as exc:  # timeouts, connection and protocol errors
            raise SourceUnavailable(f"POST {self.url}: {exc!r}") from exc
        status = response.status_code
        if transient_http_status(status):
            hint = retry_after_s(response.headers.get("Retry-After"), self._clock())
            raise SourceUnavailable(f"POST {self.url}: HTTP {status}", hint)
        if status != 200:
            raise SourceRejected(f"POST {self.url}: HTTP {status}: {response.text[:200]}")
        try:
            batch = parse_batch(response.content, set(ids), self.source_name)
        except SourceBadResponse as exc:
            raise SourceBadResponse(f"POST {self.url}: {exc}") from exc
        if batch.rejected:
            log.warning(
                "%s: %d of %d record(s) rejected, first: %s",
                self.url,
                len(batch.rejected),
                len(batch.rejected) + len(batch.fixes),
                batch.rejected[0].reason,
            )
        return batch


# --- resilience wrapper ------------------------------------------------------------


class ResilientSource:
    """Any source behind a circuit breaker, a rate limit and retries.

    Each attempt is admitted by the breaker (CircuitOpen at once while it is open),
    then waits for a rate-limit token, then calls the inner source; SourceUnavailable
    is retried with full-jitter backoff up to ``attempts`` calls in all. SourceRejected
    means the source answered: it is raised at once and does not trip the breaker.
    More than ``max_batch`` trackers is a programming error (ValueError).
    """

    def __init__(
        self,
        inner: LocationSource,
        breaker: CircuitBreaker,
        rate_limiter: Limiter,
        *,
        attempts: int = 3,
        base_delay_s: float = 0.5,
        max_delay_s: float = 10.0,
        max_batch: int = MAX_BATCH,
        sleep: Sleep = asyncio.sleep,
        rng: Rng = random.random,
    ) -> None:
        self.inner = inner
        self.breaker = breaker
        self.rate_limiter = rate_limiter
        self.attempts = attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.max_batch = max_batch
        self._sleep = sleep
        self._rng = rng

    async def fetch(self, tracker_ids: Sequence[str], since: Since | None = None) -> list[Fix]:
        return (await self.fetch_batch(tracker_ids, since)).fixes

    async def fetch_batch(
        self, tracker_ids: Sequence[str], since: Since | None = None, lateness_s: float = 0.0
    ) -> SourceBatch:
        if len(tracker_ids) > self.max_batch:
            raise ValueError(f"at most {self.max_batch} trackers per call, got {len(tracker_ids)}")
        if not tracker_ids:
            return SourceBatch([])
        return await retry_async(
            lambda: self._attempt(tracker_ids, since, lateness_s),
            attempts=self.attempts,
            base_delay_s=self.base_delay_s,
            max_delay_s=self.max_delay_s,
            retry_on=(SourceUnavailable,),
            sleep=self._sleep,
            rng=self._rng,
        )

    def blocked_for_s(self) -> float:
        """Seconds until the breaker would let a call through (0: now)."""
        return self.breaker.blocked_for_s()

    async def _attempt(
        self, tracker_ids: Sequence[str], since: Since | None, lateness_s: float
    ) -> SourceBatch:
        if (wait_s := self.breaker.blocked_for_s()) > 0:  # spend no rate-limit slot on it
            raise CircuitOpen(wait_s, self.breaker.name)
        # waiting for a slot (or being told to come back later) is not the source failing
        await self.rate_limiter.acquire()
        # a rejection means the source answered: it must not trip the breaker
        async with self.breaker.guard(success_on=(SourceRejected,)):
            return await fetch_batch(self.inner, tracker_ids, since, lateness_s)
