"""Reverse geocoding: offline GeoNames, a Nominatim-compatible server, and the LRU cache."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx
import pytest

from processors.geocoding import (
    UNKNOWN,
    Address,
    CachedGeocoder,
    GeocoderRejected,
    GeocoderUnavailable,
    NominatimGeocoder,
    OfflineGeocoder,
)
from processors.resilience import CircuitBreaker, CircuitOpen, RateLimiter
from processors.sources import CITIES, SimulatedFleet

# --- offline -----------------------------------------------------------------------


async def test_offline_geocoder_finds_known_cities() -> None:
    geocoder = OfflineGeocoder()
    await geocoder.warm_up()  # loads GeoNames once per process (about 1.5 s)
    found = await geocoder.reverse(
        [
            (51.9225, 4.4792),  # Rotterdam
            (51.95, 4.1),  # the Maasvlakte, west of Rotterdam
            (-23.9608, -46.3336),  # Santos
            (34.0522, -118.2437),  # Los Angeles
            (1.2897, 103.8501),  # Singapore
            (0.0, -30.0),  # the middle of the Atlantic
        ]
    )
    assert found[0] == Address(
        "Rotterdam",
        "NL",
        "Netherlands",
        "Rotterdam, South Holland, Netherlands",
        region="South Holland",
        time_zone="Europe/Amsterdam",
    )
    assert [a.country_code for a in found] == ["NL", "NL", "BR", "US", "SG", None]
    assert found[2].city == "Santos" and found[3].city == "Los Angeles"
    assert found[5] == Address(time_zone="Etc/GMT+2")  # open sea: the nautical zone only
    assert [a.time_zone for a in found[2:5]] == [
        "America/Sao_Paulo", "America/Los_Angeles", "Asia/Singapore",
    ]  # fmt: skip
    assert await geocoder.reverse([]) == []
    with pytest.raises(ValueError):
        await geocoder.reverse([(91.0, 0.0)])


async def test_offline_geocoder_names_the_simulated_cities() -> None:
    fleet = SimulatedFleet(7)
    points = [c.factory for c in CITIES] + [c.port for c in CITIES]
    found = await OfflineGeocoder().reverse(points)
    assert [a.country_code for a in found] == [c.country_code for c in CITIES] * 2
    fix = fleet.report("SIM-00001", 5_000_000)
    (address,) = await OfflineGeocoder().reverse([(fix.lat, fix.lon)])
    assert address.country_code == fleet.home_city("SIM-00001").country_code


async def test_offline_geocoder_does_not_block_the_event_loop() -> None:
    geocoder = OfflineGeocoder()
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await geocoder.reverse([(40.0 + i / 1000, -3.7) for i in range(20_000)])
    done.set()
    await task
    assert ticks > 1


# --- cache -------------------------------------------------------------------------


class Recording:
    def __init__(self) -> None:
        self.calls: list[list[tuple[float, float]]] = []

    async def reverse(self, points: Sequence[tuple[float, float]]) -> list[Address]:
        self.calls.append(list(points))
        return [Address(city=f"{lat:.4f},{lon:.4f}") for lat, lon in points]


async def test_cache_looks_up_only_the_misses() -> None:
    inner = Recording()
    cache = CachedGeocoder(inner, max_entries=100)
    a, a_close, b, c = (51.92251, 4.47921), (51.92249, 4.47919), (22.5, 114.0), (0.0, -0.0)
    first = await cache.reverse([a, b, a_close])
    assert inner.calls == [[a, b]]  # a_close rounds to a's key
    assert first[0] == first[2] == Address(city="51.9225,4.4792")
    assert (cache.hits, cache.misses) == (1, 2)

    second = await cache.reverse([b, c, a, (-0.0, 0.0)])
    assert inner.calls[1] == [c]
    assert second[0] == first[1] and second[2] == first[0] and second[3] == second[1]
    assert (cache.hits, cache.misses) == (4, 3)
    assert len(cache) == 3
    assert await cache.reverse([]) == [] and len(inner.calls) == 2


async def test_cache_evicts_the_least_recently_used() -> None:
    inner = Recording()
    cache = CachedGeocoder(inner, max_entries=2, precision_decimals=2)
    await cache.reverse([(1.0, 1.0), (2.0, 2.0)])
    await cache.reverse([(1.0, 1.0)])  # 1 is now the most recent
    await cache.reverse([(3.0, 3.0)])  # evicts 2
    await cache.reverse([(1.0, 1.0), (2.0, 2.0)])
    assert inner.calls[-1] == [(2.0, 2.0)]
    with pytest.raises(ValueError):
        CachedGeocoder(inner, max_entries=0)
    with pytest.raises(ValueError):
        await cache.reverse([(float("nan"), 0.0)])


# --- Nominatim ---------------------------------------------------------------------

ROTTERDAM = {
    "place_id": 1,
    "lat": "51.92",
    "lon": "4.48",
    "display_name": "Coolsingel, Rotterdam, NL",
    "address": {
        "road": "Coolsingel",
        "city": "Rotterdam",
        "country": "Netherlands",
        "country_code": "nl",
    },
}


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def nominatim(handler: object, t: FakeTime | None = None, failures: int = 3) -> NominatimGeocoder:
    t = t or FakeTime()
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
    return NominatimGeocoder(
        "http://127.0.0.1:8080/",
        client,
        RateLimiter(1.0, 1, clock=t, sleep=t.sleep),
        CircuitBreaker(failures, 60.0, clock=t),
        user_agent="trackstream-tests/1",
    )


async def test_nominatim_maps_the_reply_and_asks_once_per_distinct_point() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        lat = float(request.url.params["lat"])
        if lat > 50:
            return httpx.Response(200, json=ROTTERDAM)
        if lat > 0:
            return httpx.Response(
                200,
                json={
                    "display_name": "Somewhere",
                    "address": {
                        "village": "Kinderdijk",
                        "country": "Nederland",
                        "country_code": "nl",
                    },
                },
            )
        return httpx.Response(200, json={"error": "Unable to geocode"})

    t = FakeTime()
    geocoder = nominatim(handler, t)
    found = await geocoder.reverse([(51.92, 4.48), (1.0, 2.0), (51.92, 4.48), (-10.0, -30.0)])
    assert found == [
        Address("Rotterdam", "NL", "Netherlands", "Coolsingel, Rotterdam, NL"),
        Address("Kinderdijk", "NL", "Nederland", "Somewhere"),
        Address("Rotterdam", "NL", "Netherlands", "Coolsingel, Rotterdam, NL"),
        UNKNOWN,
    ]
    assert len(seen) == 3
    request = seen[0]
    assert request.url.path == "/reverse"
    assert request.url.params["format"] == "jsonv2"
    assert float(request.url.params["lat"]) == 51.92 and float(request.url.params["lon"]) == 4.48
    assert request.headers["user-agent"] == "trackstream-tests/1"
    assert t.sleeps == [1.0, 1.0]  # one request a second


async def test_nominatim_errors_and_breaker() -> None:
    statuses = iter([400, 500, 429, 503])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(statuses), headers={"Retry-After": "5"})

    t = FakeTime()
    geocoder = nominatim(handler, t, failures=3)
    with pytest.raises(GeocoderRejected):
        await geocoder.reverse([(1.0, 1.0)])
    with pytest.raises(GeocoderUnavailable):
        await geocoder.reverse([(1.0, 1.0)])
    with pytest.raises(GeocoderUnavailable) as info:
        await geocoder.reverse([(1.0, 1.0)])
    assert info.value.retry_after_s == 5.0
    with pytest.raises(GeocoderUnavailable):
        await geocoder.reverse([(1.0, 1.0)])
    with pytest.raises(CircuitOpen):  # three failures in a row; the 400 did not count
        await geocoder.reverse([(1.0, 1.0)])

    broken = nominatim(lambda request: httpx.Response(200, content=b"<html>"))
    with pytest.raises(GeocoderRejected, match="invalid response"):
        await broken.reverse([(1.0, 1.0)])

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with pytest.raises(GeocoderUnavailable):
        await nominatim(refuse).reverse([(1.0, 1.0)])


async def test_nominatim_behind_the_cache() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(200, json=ROTTERDAM)

    cache = CachedGeocoder(nominatim(handler), 10)
    for _ in range(3):
        await cache.reverse([(51.92, 4.48)])
    assert calls == 1 and cache.hits == 2
