"""Location sources: the simulated fleet, the HTTP adapter and the resilient wrapper."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from processors.clock import ManualClock
from processors.geofencing import GeofenceIndex, events_from_history, haversine_m
from processors.resilience import CircuitBreaker, CircuitOpen, RateLimiter
from processors.sources import (
    CITIES,
    MAX_BATCH,
    Fix,
    HttpLocationSource,
    ResilientSource,
    SimulatedFleet,
    SourceBadResponse,
    SourceRejected,
    SourceUnavailable,
    TrackerError,
)

T0 = datetime(2024, 5, 1, 6, 0, tzinfo=UTC)
IDS = [f"SIM-{i:05d}" for i in range(1, 41)]
ROOT = Path(__file__).resolve().parents[1]


def test_fix_is_aware_and_normalised_to_utc() -> None:
    cest = timezone(timedelta(hours=2))
    fix = Fix("T1", datetime(2024, 5, 1, 14, 0, tzinfo=cest), 51.9, 4.5, 5.0, "test")
    assert fix.observed_at == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert fix.observed_at.tzinfo is UTC
    with pytest.raises(ValueError):
        Fix("T1", datetime(2024, 5, 1), 51.9, 4.5, 5.0, "test")


# --- simulated fleet ---------------------------------------------------------------


async def day_of_fetches(fleet: SimulatedFleet, clock: ManualClock, ids: list[str]) -> list[Fix]:
    fixes: list[Fix] = []
    for _ in range(24 * 4):  # every 15 min for a day
        clock.advance(minutes=15)
        fixes.extend(await fleet.fetch(ids))
    return fixes


async def test_fleet_is_deterministic_for_a_seed() -> None:
    runs = []
    for seed in (7, 7, 8):
        clock = ManualClock(T0)
        runs.append(await day_of_fetches(SimulatedFleet(seed, clock), clock, IDS[:10]))
    assert runs[0] == runs[1]
    assert len(runs[0]) == len(runs[2])
    assert [(f.lat, f.lon) for f in runs[0]] != [(f.lat, f.lon) for f in runs[2]]
    assert [f.observed_at for f in runs[0]] != [f.observed_at for f in runs[2]]


def test_positions_are_a_pure_function_of_tracker_and_time() -> None:
    a, b = SimulatedFleet(7, ManualClock(T0)), SimulatedFleet(7, ManualClock(T0))
    at = T0 + timedelta(hours=5, minutes=3)
    b.position_at("SIM-00002", T0)  # a different history of calls changes nothing
    assert a.position_at("SIM-00001", at) == b.position_at("SIM-00001", at)
    assert a.reports_between("SIM-00001", T0, at) == b.reports_between("SIM-00001", T0, at)
    assert a.home_city("SIM-00001") == b.home_city("SIM-00001")


def test_home_cities_use_a_stable_hash_not_pythons_salted_one() -> None:
    code = (
        "from processors.sources import SimulatedFleet as F\n"
        "f = F(7)\n"
        "print([f.home_city(f'SIM-{i:05d}').name for i in range(1, 41)])\n"
    )
    here = repr([SimulatedFleet(7).home_city(i).name for i in IDS])
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert out.stdout.strip() == here


def test_trackers_spread_over_many_real_cities() -> None:
    fleet = SimulatedFleet(7)
    cities = {fleet.home_city(f"SIM-{i:05d}").name for i in range(300)}
    assert len(cities) == len(CITIES) == 15
    for tracker_id in IDS[:10]:
        city = fleet.home_city(tracker_id)
        for hour in range(0, 24, 2):
            lat, lon = fleet.position_at(tracker_id, T0 + timedelta(hours=hour))
            assert haversine_m(lat, lon, *city.factory) < 25_000  # stays around its city


async def test_fetch_returns_reports_since_the_previous_fetch() -> None:
    clock = ManualClock(T0)
    fleet = SimulatedFleet(7, clock, report_interval_s=300, max_reports_per_call=12)
    first = await fleet.fetch(IDS[:5])
    assert [f.tracker_id for f in first] == IDS[:5]  # first fetch: the latest report only
    assert all(T0 - timedelta(minutes=5) < f.observed_at <= T0 for f in first)
    assert await fleet.fetch(IDS[:5]) == []  # nothing new yet

    clock.advance(minutes=30)
    second = await fleet.fetch(IDS[:5])
    assert len(second) == 30  # six 5-minute reports each
    for tracker_id in IDS[:5]:
        times = [f.observed_at for f in second if f.tracker_id == tracker_id]
        last_seen = next(f.observed_at for f in first if f.tracker_id == tracker_id)
        assert times == sorted(times) and times[0] > last_seen and times[-1] <= clock()
        assert {b - a for a, b in itertools.pairwise(times)} == {timedelta(minutes=5)}
    assert second == [
        f
        for t in IDS[:5]
        for f in fleet.reports_between(t, T0, clock())
        if f.observed_at > next(x.observed_at for x in first if x.tracker_id == t)
    ]

    clock.advance(days=3)  # a long gap: only the latest 12
    third = await fleet.fetch(IDS[:1] * 2)  # repeated ids count once
    assert len(third) == 12 and third[-1].observed_at > clock() - timedelta(minutes=5)
    assert fleet.calls == 4 and fleet.reports_returned == 5 + 30 + 12

    clock.now -= timedelta(hours=1)  # a clock that goes back returns nothing
    assert await fleet.fetch(IDS[:1]) == []


async def test_reports_look_like_gps() -> None:
    clock = ManualClock(T0)
    fleet = SimulatedFleet(7, clock)
    fixes = await day_of_fetches(fleet, clock, IDS)
    assert all(f.source == "simulated" and f.observed_at.tzinfo is UTC for f in fixes)
    accuracies = [f.accuracy_m for f in fixes if f.accuracy_m is not None]
    assert len(accuracies) == len(fixes)
    assert min(accuracies) >= 4.0 and max(accuracies) <= 50.0
    for f in fixes[:200]:  # noise stays within the stated accuracy
        true = fleet.position_at(f.tracker_id, f.observed_at)
        assert haversine_m(f.lat, f.lon, *true) <= f.accuracy_m


async def test_trackers_enter_and_leave_the_demo_geofences_over_a_day() -> None:
    fences = SimulatedFleet.geofences_for_demo()
    index = GeofenceIndex([{**g, "id": i} for i, g in enumerate(fences)])
    kinds = {i: g["kind"] for i, g in enumerate(fences)}
    clock = ManualClock(T0)
    fleet = SimulatedFleet(7, clock)
    fixes = await day_of_fetches(fleet, clock, IDS)
    entered: dict[str, set[str]] = {}
    exited: dict[str, set[str]] = {}
    for tracker_id in IDS:
        history = [(f.observed_at, f.lat, f.lon) for f in fixes if f.tracker_id == tracker_id]
        for _, gid, kind in events_from_history(history, index):
            (entered if kind == "enter" else exited).setdefault(tracker_id, set()).add(kinds[gid])
            name = fences[gid]["name"]
            assert name.startswith(fleet.home_city(tracker_id).name)
    assert set(entered) == set(exited) == set(IDS)  # every tracker came and went
    assert all(v == {"circle", "polygon"} for v in exited.values())


def test_demo_geofences_fit_the_store() -> None:
    fences = SimulatedFleet.geofences_for_demo()
    assert len(fences) == 2 * len(CITIES)
    assert len({g["name"] for g in fences}) == len(fences)
    for g in fences:
        if g["kind"] == "circle":
            assert set(g) == {"name", "kind", "center_lat", "center_lon", "radius_m"}
        else:
            assert set(g) == {"name", "kind", "geometry_geojson"}
            geometry = json.loads(g["geometry_geojson"])
            ring = geometry["coordinates"][0]
            assert geometry["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 6


async def test_simulated_outages() -> None:
    clock = ManualClock(T0)
    fleet = SimulatedFleet(7, clock)
    await fleet.fetch(IDS[:2])
    fleet.fail_next(2)
    clock.advance(minutes=10)
    for _ in range(2):
        with pytest.raises(SourceUnavailable):
            await fleet.fetch(IDS[:2])
    assert len(await fleet.fetch(IDS[:2])) == 4  # what was missed is still delivered
    fleet.outage(True)
    with pytest.raises(SourceUnavailable):
        await fleet.fetch(IDS[:2])
    fleet.outage(False)
    assert await fleet.fetch(IDS[:2]) == []
    with pytest.raises(SourceRejected):
        await fleet.fetch([""])


# --- HTTP adapter ------------------------------------------------------------------

BASE = "http://127.0.0.1:8123/api/"


def http_source(handler: Any, api_key: str | None = "k3y") -> HttpLocationSource:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return HttpLocationSource(BASE, client, 5.0, api_key, clock=lambda: T0)


def report(**overrides: Any) -> dict[str, Any]:
    return {
        "tracker_id": "T1",
        "observed_at": "2024-05-01T14:00:00+02:00",
        "lat": 51.92,
        "lon": 4.48,
        "accuracy_m": 12.5,
        **overrides,
    }


async def test_http_source_posts_the_batch_and_parses_reports() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        reports = [
            report(),
            report(tracker_id="T2", accuracy_m=None, extra="ignored"),
            report(tracker_id="T9"),
        ]  # T9 was not asked for: dropped
        return httpx.Response(200, json={"reports": reports})

    fixes = await http_source(handler).fetch(["T1", "T2"])
    request = seen[0]
    assert request.method == "POST"
    assert str(request.url) == "http://127.0.0.1:8123/api/locations/batch"
    assert json.loads(request.content) == {"tracker_ids": ["T1", "T2"]}
    assert request.headers["authorization"] == "Bearer k3y"
    assert fixes == [
        Fix("T1", datetime(2024, 5, 1, 12, tzinfo=UTC), 51.92, 4.48, 12.5, "http"),
        Fix("T2", datetime(2024, 5, 1, 12, tzinfo=UTC), 51.92, 4.48, None, "http"),
    ]


@pytest.mark.parametrize(
    ("status", "headers", "retry_after_s"),
    [
        (500, {}, None),
        (503, {"Retry-After": "7"}, 7.0),
        (502, {}, None),
        (408, {}, None),
        (429, {"Retry-After": "Wed, 01 May 2024 06:00:30 GMT"}, 30.0),
        (429, {"Retry-After": "soon"}, None),
    ],
)
async def test_http_transient_statuses_are_unavailable(
    status: int, headers: dict[str, str], retry_after_s: float | None
) -> None:
    source = http_source(lambda request: httpx.Response(status, headers=headers))
    with pytest.raises(SourceUnavailable) as info:
        await source.fetch(["T1"])
    assert info.value.retry_after_s == retry_after_s


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 301, 204])
async def test_http_permanent_statuses_are_rejected(status: int) -> None:
    source = http_source(lambda request: httpx.Response(status, text="nope"))
    with pytest.raises(SourceRejected, match=str(status)):
        await source.fetch(["T1"])


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"reports": {}}',
        b"<html><body>502 Bad Gateway</body></html>",
        b'{"reports": [{"tracker_id": "T1", "observed_at": "2024-05-01T1',  # truncated
        b'{"reports": [], "errors": {}}',
    ],
)
async def test_http_responses_bad_as_a_whole_are_bad_responses(body: bytes) -> None:
    source = http_source(lambda request: httpx.Response(200, content=body))
    with pytest.raises(SourceBadResponse, match="invalid response"):
        await source.fetch_batch(["T1"])


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (report(observed_at="2024-05-01T12:00:00"), "observed_at"),  # naive
        (report(lat=95.0), "lat"),
        (report(lon="east"), "lon"),
        ({"tracker_id": "T1"}, "observed_at"),
        (report(accuracy_m=-1), "accuracy_m"),
        (report(lat=True), "lat"),  # not 1.0
        (report(observed_at=12.5), "observed_at"),  # not 1970
        (report(observed_at="1714564800"), "observed_at"),
        (report(observed_at="0001-01-01T00:00:00+01:00"), "observed_at"),
        (report(tracker_id="T1\u0000"), "tracker_id"),
        ("not an object", "report"),
        (report(tracker_id="T9"), "tracker not asked for"),
    ],
)
async def test_http_a_bad_report_is_rejected_on_its_own(bad: Any, reason: str) -> None:
    good = [report(), report(tracker_id="T2", observed_at="2024-05-01T12:05:00Z")]
    body = json.dumps({"reports": [good[0], bad, good[1]]}).encode()
    batch = await http_source(lambda request: httpx.Response(200, content=body)).fetch_batch(
        ["T1", "T2"]
    )
    assert [(f.tracker_id, f.observed_at.minute) for f in batch.fixes] == [("T1", 0), ("T2", 5)]
    assert len(batch.rejected) == 1
    rejected = batch.rejected[0]
    assert rejected.reason.startswith(reason)
    assert json.loads(rejected.raw) == (
        bad if reason != "tracker not asked for" else rejected_json(bad)
    )
    sent = bad.get("tracker_id") if isinstance(bad, dict) else None
    # a NUL byte is escaped: PostgreSQL text cannot hold it
    assert rejected.tracker_id == (sent.replace("\x00", "\\u0000") if sent else None)


def rejected_json(r: dict[str, Any]) -> dict[str, Any]:
    """A valid report for a tracker not asked for, as kept (normalised to UTC)."""
    return {**r, "observed_at": "2024-05-01T12:00:00Z"}


async def test_http_per_tracker_errors_are_returned_with_the_reports() -> None:
    body = {
        "reports": [report()],
        "errors": [
            {"tracker_id": "T2", "error": "unavailable", "retry_after_s": 600},
            {"tracker_id": "T3", "error": "forbidden", "message": "no licence"},
            {"tracker_id": "T9", "error": "unknown"},  # not asked for: ignored
            {"error": "unknown"},  # no tracker: kept as a rejected record
        ],
    }
    batch = await http_source(lambda request: httpx.Response(200, json=body)).fetch_batch(
        ["T1", "T2", "T3"]
    )
    assert [f.tracker_id for f in batch.fixes] == ["T1"]
    assert batch.errors == [
        TrackerError("T2", "unavailable", "", 600.0),
        TrackerError("T3", "forbidden", "no licence", None),
    ]
    assert [r.reason.split(":")[0] for r in batch.rejected] == ["error entry"]


async def test_http_reports_at_or_before_since_are_kept() -> None:
    """The database drops what it already holds; a late report must get through."""
    seen: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"reports": [report()]})

    since = {"T1": datetime(2024, 5, 1, 13, tzinfo=UTC)}
    fixes = await http_source(handler).fetch(["T1"], since)
    assert [f.observed_at for f in fixes] == [datetime(2024, 5, 1, 12, tzinfo=UTC)]
    assert seen[0]["since"] == {"T1": "2024-05-01T13:00:00+00:00"}


@pytest.mark.parametrize(
    "error",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("x")],
)
async def test_http_transport_errors_are_unavailable(error: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    with pytest.raises(SourceUnavailable):
        await http_source(handler, api_key=None).fetch(["T1"])


async def test_http_source_against_a_closed_loopback_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = HttpLocationSource(f"http://127.0.0.1:{port}", None, 2.0)
    try:
        with pytest.raises(SourceUnavailable):
            await source.fetch(["T1"])
    finally:
        await source.aclose()


# --- resilient wrapper ---------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Scripted:
    """A source that raises or answers from a script, recording each call."""

    def __init__(self, *script: Exception | list[Fix]) -> None:
        self.script = list(script)
        self.calls: list[list[str]] = []

    async def fetch(self, tracker_ids: Sequence[str]) -> list[Fix]:
        self.calls.append(list(tracker_ids))
        step = self.script.pop(0) if self.script else []
        if isinstance(step, Exception):
            raise step
        return step


def resilient(
    inner: Scripted, t: FakeTime, failures: int = 5, attempts: int = 4, rate_per_s: float = 100.0
) -> ResilientSource:
    return ResilientSource(
        inner,
        CircuitBreaker(failures, 30.0, clock=t),
        RateLimiter(rate_per_s, 1, clock=t, sleep=t.sleep),
        attempts=attempts,
        base_delay_s=0.5,
        max_delay_s=4.0,
        sleep=t.sleep,
        rng=lambda: 1.0,
    )


FIX = Fix("T1", T0, 1.0, 2.0, 3.0, "test")


async def test_resilient_source_retries_transient_failures() -> None:
    t = FakeTime()
    inner = Scripted(SourceUnavailable("a"), SourceUnavailable("b"), [FIX])
    assert await resilient(inner, t).fetch(["T1"]) == [FIX]
    assert len(inner.calls) == 3
    assert t.sleeps == [0.5, 1.0]  # backoff ceilings with rng = 1.0; the limiter never waited


async def test_resilient_source_rate_limits_every_attempt() -> None:
    t = FakeTime()
    inner = Scripted(SourceUnavailable("a"), [FIX], [FIX])
    source = resilient(inner, t, rate_per_s=0.5)
    source.base_delay_s = 0.1
    await source.fetch(["T1"])
    await source.fetch(["T1"])
    assert t.sleeps == pytest.approx([0.1, 1.9, 2.0])  # backoff, then tokens every 2 s


async def test_rejections_are_not_retried_and_do_not_trip_the_breaker() -> None:
    t = FakeTime()
    inner = Scripted(SourceRejected("bad"), SourceRejected("bad"), [FIX])
    source = resilient(inner, t, failures=1)
    for _ in range(2):
        with pytest.raises(SourceRejected):
            await source.fetch(["T1"])
    assert source.breaker.state == "closed"
    assert await source.fetch(["T1"]) == [FIX]
    assert len(inner.calls) == 3
    assert t.sleeps == pytest.approx([0.01, 0.01])  # the limiter's spacing, no backoff


async def test_an_open_breaker_stops_the_retries() -> None:
    t = FakeTime()
    inner = Scripted(*[SourceUnavailable("down")] * 10)
    source = resilient(inner, t, failures=2, attempts=5)
    with pytest.raises(CircuitOpen) as info:
        await source.fetch(["T1"])
    assert len(inner.calls) == 2  # the third attempt was refused by the breaker
    assert 0 < info.value.retry_after_s <= 30.0
    with pytest.raises(CircuitOpen):
        await source.fetch(["T1"])
    assert len(inner.calls) == 2
    t.now += 30.0
    inner.script = [[FIX]]
    assert await source.fetch(["T1"]) == [FIX]
    assert source.breaker.state == "closed"


async def test_batches_are_capped_at_64() -> None:
    t = FakeTime()
    inner = Scripted()
    source = resilient(inner, t)
    assert await source.fetch([]) == []
    await source.fetch([f"T{i}" for i in range(MAX_BATCH)])
    with pytest.raises(ValueError, match="64"):
        await source.fetch([f"T{i}" for i in range(MAX_BATCH + 1)])
    assert len(inner.calls) == 1


async def test_the_messy_fleet_sends_trouble_and_the_tidy_one_skips_the_overlap() -> None:
    ids = [f"SIM-{i:05d}" for i in range(1, 401)]
    tidy = SimulatedFleet(7, lambda: T0)
    since = {t: T0 - timedelta(minutes=30) for t in ids[:5]}
    assert (await tidy.fetch_batch(ids[:5], since, 3600)).fixes == await SimulatedFleet(
        7, lambda: T0
    ).fetch(ids[:5], since)
    messy = SimulatedFleet(7, lambda: T0, messy=True)
    k = 1_000_000 // 300
    delays = [messy.available_at(t, k) - messy.report(t, k).observed_at.timestamp() for t in ids]
    assert 0.10 < sum(d > 0 for d in delays) / len(ids) < 0.30  # relayed or offline
    assert max(delays) > 3600  # hours, for some
    batch = await messy.fetch_batch(ids, {t: T0 - timedelta(hours=2) for t in ids}, 3600)
    codes = {e.code for e in batch.errors}
    assert "unavailable" in codes and 0 < len(batch.errors) < 40
    again = await SimulatedFleet(7, lambda: T0, messy=True).fetch_batch(
        ids, {t: T0 - timedelta(hours=2) for t in ids}, 3600
    )
    assert again.fixes == batch.fixes  # a pure function of seed, tracker and time
