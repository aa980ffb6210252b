"""Reverse geocoding: (lat, lon) -> city and country, in batches.

::

    GeocodingError
    ├── GeocoderUnavailable(retry_after_s)   transient: timeout, connection error, 5xx, 429
    └── GeocoderRejected                     permanent: other 4xx, malformed response

:class:`OfflineGeocoder` (GeoNames cities via ``reverse_geocode``, no network) is the
default; :class:`NominatimGeocoder` calls a Nominatim-compatible server;
:class:`CachedGeocoder` puts an LRU cache in front of either.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from processors.geofencing import haversine_m
from processors.resilience import CircuitBreaker, Limiter

Point = tuple[float, float]  # (lat, lon)


@dataclass(frozen=True, slots=True)
class Address:
    """What a point is near. Every field is None where nothing is known (open sea)."""

    city: str | None = None
    country_code: str | None = None  # ISO 3166-1 alpha-2, upper case
    country: str | None = None
    address: str | None = None  # one line for display


UNKNOWN = Address()


class Geocoder(Protocol):
    async def reverse(self, points: Sequence[Point]) -> list[Address]:
        """One address per (lat, lon) point, in order."""
        ...


class GeocodingError(Exception):
    """Base of the errors a geocoder raises on purpose."""


class GeocoderUnavailable(GeocodingError):
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GeocoderRejected(GeocodingError):
    pass


def check_point(lat: float, lon: float) -> None:
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        raise ValueError(f"not a (lat, lon) point: ({lat}, {lon})")


# --- offline -----------------------------------------------------------------------

_load_lock = threading.Lock()
_loaded: set[int] = set()  # min_population values whose data is loaded


class OfflineGeocoder:
    """Nearest GeoNames place (population >= 1000) from the ``reverse_geocode`` package.

    Its data (~150k places, a k-d tree) loads on first use, once per process, in about
    a second and a half; lookups run in a worker thread so the event loop keeps going.
    A point farther than ``max_distance_m`` from any place (open sea) gets an empty
    Address rather than a far-away city.
    """

    def __init__(self, max_distance_m: float | None = 100_000.0, min_population: int = 0) -> None:
        self.max_distance_m = max_distance_m
        self.min_population = min_population

    async def warm_up(self) -> None:
        """Load the place data now (e.g. at worker start) rather than on the first batch."""
        await asyncio.to_thread(self._search, [(0.0, 0.0)])

    async def reverse(self, points: Sequence[Point]) -> list[Address]:
        if not points:
            return []
        for lat, lon in points:
            check_point(lat, lon)
        places = await asyncio.to_thread(self._search, list(points))
        return [self._address(p, place) for p, place in zip(points, places, strict=True)]

    def _search(self, points: list[Point]) -> list[dict[str, Any]]:
        import reverse_geocode  # imported late: importing it pulls in scipy

        if self.min_population not in _loaded:
            with _load_lock:  # the package's own singleton is not thread-safe
                reverse_geocode.search([(0.0, 0.0)], self.min_population)
                _loaded.add(self.min_population)
        # The package hands out its shared records: copy before use.
        return [dict(r) for r in reverse_geocode.search(points, self.min_population)]

    def _address(self, point: Point, place: dict[str, Any]) -> Address:
        if (
            self.max_distance_m is not None
            and haversine_m(*point, place["latitude"], place["longitude"]) > self.max_distance_m
        ):
            return UNKNOWN
        city = place.get("city") or None
        code = (place.get("country_code") or "").upper() or None
        country = place.get("country") or None
        return Address(city, code, country, ", ".join(x for x in (city, country) if x) or None)


# --- Nominatim ---------------------------------------------------------------------


class _NominatimAddress(BaseModel):
    model_config = ConfigDict(extra="ignore")

    city: str | None = None
    town: str | None = None
    village: str | None = None
    municipality: str | None = None
    hamlet: str | None = None
    country: str | None = None
    country_code: str | None = None


class _NominatimReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    error: str | None = None
    display_name: str | None = None
    address: _NominatimAddress | None = None


DEFAULT_USER_AGENT = "trackstream/0.1 (GPS tracker pipeline)"


class NominatimGeocoder:
    """A Nominatim-compatible server: ``GET {base_url}/reverse?format=jsonv2&lat=..&lon=..``.

    Nominatim has no batch call, so a batch is one request per distinct point, each
    through the breaker and the rate limiter (the public server allows 1 request/s and
    requires a real User-Agent). "Unable to geocode" (open sea) is an empty Address.
    Cache with :class:`CachedGeocoder`. A client passed in is left open.
    """

    def __init__(
        self,
        base_url: str,
        client: httpx.AsyncClient | None = None,
        rate_limiter: Limiter | None = None,
        breaker: CircuitBreaker | None = None,
        *,
        timeout_s: float = 10.0,
        user_agent: str = DEFAULT_USER_AGENT,
        accept_language: str = "en",
    ) -> None:
        self.url = base_url.rstrip("/") + "/reverse"
        self.rate_limiter = rate_limiter
        self.breaker = breaker
        self.timeout_s = timeout_s
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout_s)
        self._headers = {"User-Agent": user_agent, "Accept-Language": accept_language}

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def reverse(self, points: Sequence[Point]) -> list[Address]:
        found: dict[Point, Address] = {}
        for point in points:
            check_point(*point)
            if point not in found:
                found[point] = await self._one(point)
        return [found[p] for p in points]

    async def _one(self, point: Point) -> Address:
        # A rejection means the server answered: it must not trip the breaker.
        guard = self.breaker.guard((GeocoderRejected,)) if self.breaker else nullcontext()
        async with guard:
            if self.rate_limiter:
                await self.rate_limiter.acquire()
            return await self._request(point)

    async def _request(self, point: Point) -> Address:
        params = {"format": "jsonv2", "lat": f"{point[0]:.7f}", "lon": f"{point[1]:.7f}"}
        try:
            response = await self._client.get(
                self.url, params=params, headers=self._headers, timeout=self.timeout_s
            )
        except (httpx.UnsupportedProtocol, httpx.DecodingError, httpx.TooManyRedirects) as exc:
            raise GeocoderRejected(f"GET {self.url}: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise GeocoderUnavailable(f"GET {self.url}: {exc!r}") from exc
        status = response.status_code
        if status in (408, 429) or status >= 500:
            retry_after = response.headers.get("Retry-After", "")
            retry_after_s = float(retry_after) if retry_after.isdigit() else None
            raise GeocoderUnavailable(f"GET {self.url}: HTTP {status}", retry_after_s)
        if status != 200:
            raise GeocoderRejected(f"GET {self.url}: HTTP {status}: {response.text[:200]}")
        try:
            reply = _NominatimReply.model_validate_json(response.content)
        except ValidationError as exc:
            raise GeocoderRejected(f"GET {self.url}: invalid response: {exc}") from exc
        if reply.error or reply.address is None:
            return UNKNOWN
        a = reply.address
        city = a.city or a.town or a.village or a.municipality or a.hamlet
        code = a.country_code.upper() if a.country_code else None
        return Address(city, code, a.country, reply.display_name)


# --- cache -------------------------------------------------------------------------


class CachedGeocoder:
    """An LRU cache of addresses keyed by coordinates rounded to ``precision_decimals``.

    4 decimals is about 11 m. A batch asks the inner geocoder only for the points not
    cached (each distinct key once). ``hits`` counts points answered without the inner
    geocoder (repeats within a batch included), ``misses`` the keys it was asked for.
    """

    def __init__(self, inner: Geocoder, max_entries: int, precision_decimals: int = 4) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.inner = inner
        self.max_entries = max_entries
        self.precision_decimals = precision_decimals
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Point, Address] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _key(self, point: Point) -> Point:
        lat, lon = point
        if not (math.isfinite(lat) and math.isfinite(lon)):
            raise ValueError(f"not a (lat, lon) point: {point}")
        # + 0.0 folds -0.0 into 0.0 so both share an entry
        return round(lat, self.precision_decimals) + 0.0, round(lon, self.precision_decimals) + 0.0

    async def reverse(self, points: Sequence[Point]) -> list[Address]:
        keys = [self._key(p) for p in points]
        known: dict[Point, Address] = {}
        missing: dict[Point, Point] = {}  # key -> the first point that had it
        for key, point in zip(keys, points, strict=True):
            if key in known or key in missing:
                continue
            cached = self._entries.get(key)
            if cached is None:
                missing[key] = point
            else:
                self._entries.move_to_end(key)
                known[key] = cached
        if missing:
            looked_up = await self.inner.reverse(list(missing.values()))
            for key, address in zip(missing, looked_up, strict=True):
                known[key] = address
                self._put(key, address)
        self.misses += len(missing)
        self.hits += len(points) - len(missing)
        return [known[k] for k in keys]

    def _put(self, key: Point, address: Address) -> None:
        self._entries[key] = address
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
