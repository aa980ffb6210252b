"""What a location API sends, end to end: a scripted ``POST /locations/batch`` served on
loopback (a real HTTP server), the real stages on real Redis and PostgreSQL.

Late reports (minutes, hours, newest first), a bulk upload of 200 buffered reports,
clocks a day and 20 years ahead, one ``lat: 95`` among 64 trackers' reports, per-tracker
errors, the same report in three calls, two fetch workers on overlapping requests. Each
test computes the rows it expects from its own script and compares them with the
database exactly; events are compared with a from-scratch computation over the stored
history; and the trackers' later reports keep arriving.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select, text
from typer.testing import CliRunner

from ops.cli import app
from processors import topology
from processors.sources import HttpLocationSource, SimulatedFleet
from schemas import report_store, source_store
from schemas.events import FetchRequested
from schemas.tables import RejectedReport
from streams.deadletter import DeadLetters
from streams.producer import Producer
from tests.pipeline_support import START, Harness

runner = CliRunner()
FLEET = SimulatedFleet(7)  # positions along the demo fleet's routes: real enter/exit events
STEP = timedelta(minutes=5)


def cli(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Truth:
    """One report the API knows about: observed at ``observed_at``, available to
    callers from ``available_at`` (a relay's delay, a device's offline buffer)."""

    def __init__(self, tracker: str, observed_at: datetime, available_at: datetime, **raw: Any):
        self.tracker, self.observed_at, self.available_at = tracker, observed_at, available_at
        lat, lon = FLEET.position_at(tracker, observed_at)
        self.raw = {
            "tracker_id": tracker,
            "observed_at": iso(observed_at),
            "lat": round(lat, 6),
            "lon": round(lon, 6),
            "accuracy_m": 8.0,
            **raw,
        }

    @property
    def key(self) -> tuple[str, datetime]:
        return self.tracker, self.observed_at


class ScriptedAPI:
    """The documented contract: the reports available now and observed after each
    tracker's ``since``. ``push_new`` also delivers every report that became available
    since the tracker's previous call whatever its ``since`` (an API with a receive
    feed, or a device's upload sent as one): the way a report later than the bound
    reaches trackstream. ``extra`` adds raw records and errors to calls."""

    def __init__(self, clock: Callable[[], datetime], *, push_new: bool = False) -> None:
        self.clock = clock
        self.push_new = push_new
        self.truth: list[Truth] = []
        self.calls: list[dict[str, Any]] = []
        self.last_call: dict[str, datetime] = {}
        self.newest_first = False
        # (tracker, call number of that tracker) -> extra records / error entry
        self.extra_records: dict[tuple[str, int], list[Any]] = {}
        self.errors: dict[tuple[str, int], dict[str, Any]] = {}
        self.tracker_calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def add(self, truth: Truth) -> Truth:
        self.truth.append(truth)
        return truth

    def respond(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            now = self.clock()
            self.calls.append(body)
            since = {t: datetime.fromisoformat(v) for t, v in body.get("since", {}).items()}
            reports: list[Any] = []
            errors: list[Any] = []
            for t in body["tracker_ids"]:
                n = self.tracker_calls[t] = self.tracker_calls.get(t, 0) + 1
                if (t, n) in self.errors:
                    errors.append({"tracker_id": t, **self.errors[(t, n)]})
                    continue
                previous = self.last_call.get(t)
                self.last_call[t] = now
                mine = []
                for r in self.truth:
                    if r.tracker != t or r.available_at > now:
                        continue
                    after_since = t not in since or r.observed_at > since[t]
                    pushed = self.push_new and (previous is None or r.available_at > previous)
                    if after_since or pushed:
                        mine.append(r)
                mine.sort(key=lambda r: r.observed_at, reverse=self.newest_first)
                reports += [r.raw for r in mine]
                reports += self.extra_records.get((t, n), [])
            return {"reports": reports, "errors": errors}


@pytest.fixture
def api_server() -> Iterator[Callable[[ScriptedAPI], str]]:
    servers: list[ThreadingHTTPServer] = []

    def serve(api: ScriptedAPI) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(length))
                payload = json.dumps(api.respond(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


class Edges:
    """A harness whose source is the scripted API over HTTP."""

    def __init__(self, redis_target: Any, prefix: str, db_url: str, serve: Any, **kw: Any):
        self.push_new = kw.pop("push_new", False)
        trackers = kw.pop("trackers", 4)
        self._clock_box: list[Any] = []
        self.api = ScriptedAPI(lambda: self._clock_box[0](), push_new=self.push_new)
        url = serve(self.api)
        self.http = HttpLocationSource(url, None, 5.0)
        self.h = Harness(redis_target, prefix, db_url, trackers=trackers, source=self.http, **kw)
        self._clock_box.append(self.h.clock)
        self.ids = [f"SIM-{i:05d}" for i in range(1, trackers + 1)]

    @property
    def now(self) -> datetime:
        return self.h.clock()

    def on_time(self, tracker: str, at: datetime, **raw: Any) -> Truth:
        return self.api.add(Truth(tracker, at, at, **raw))

    def regular(self, until: datetime, trackers: list[str] | None = None) -> None:
        """Every tracker reports every 5 minutes, on time, up to ``until``."""
        for t in trackers or self.ids:
            at = START - timedelta(minutes=30)
            while at <= until:
                if not any(r.key == (t, at) for r in self.api.truth):
                    self.on_time(t, at)
                at += STEP

    async def cycles(self, n: int, minutes: float = 6) -> None:
        for _ in range(n):
            self.regular(self.now)
            await self.h.cycle(minutes=minutes)

    def stored(self) -> dict[tuple[str, datetime], Any]:
        return {(r.tracker_id, r.observed_at): r for r in self.h.reports()}

    def expected(self, excluded: set[tuple[str, datetime]] = frozenset()) -> set[Any]:  # type: ignore[assignment]
        """Every report available by now that the contract lets trackstream store."""
        return {r.key for r in self.api.truth if r.available_at <= self.now} - excluded

    def before_latest(self, tracker: str) -> datetime:
        """A time just before the tracker's latest stored report (its cursor)."""
        return max(k[1] for k in self.stored() if k[0] == tracker) - timedelta(minutes=2)

    def stats(self) -> dict[str, source_store.SourceStats]:
        return self.h.db.run_sync(source_store.source_stats)

    def check_events(self) -> None:
        events = self.h.events()
        assert events == self.h.expected_events()

    async def aclose(self) -> None:
        await self.h.aclose()
        await self.http.aclose()


@pytest.fixture
async def edges(redis_target, unique_prefix, db_url, api_server, request):
    kw = getattr(request, "param", {})
    e = Edges(redis_target, unique_prefix, db_url, api_server, **kw)
    yield e
    await e.aclose()


async def dead_letters(e: Edges) -> int:
    total = 0
    for stage in topology.STAGES:
        total += await DeadLetters(e.h.client, e.h.keys(stage)).count()
    return total


# --- late reports ---------------------------------------------------------------------


async def test_late_by_minutes_and_newest_first_are_stored_and_recompute_events(edges):
    e = edges
    e.api.newest_first = True
    await e.cycles(3)
    # relayed 10 and 40 minutes late, observed before the latest report stored
    late = []
    for t, delay_min in ((e.ids[0], 10), (e.ids[1], 40)):
        at = e.before_latest(t)
        late.append(e.api.add(Truth(t, at, at + timedelta(minutes=delay_min))))
    await e.cycles(12)
    stored = e.stored()
    assert set(stored) == e.expected()
    assert all(r.key in stored for r in late)
    stats = e.stats()
    assert stats[e.ids[0]].late_reports == 1 and stats[e.ids[1]].late_reports == 1
    assert stats[e.ids[0]].beyond_bound_reports == 0
    assert all(r.fix_status is not None for r in stored.values())
    e.check_events()
    assert await dead_letters(e) == 0


@pytest.mark.parametrize("edges", [{"source_lateness_s": 4 * 3600}], indirect=True)
async def test_late_by_hours_within_a_longer_bound_is_stored(edges):
    e = edges
    await e.cycles(2)
    at = e.before_latest(e.ids[0])
    late = e.api.add(Truth(e.ids[0], at, at + timedelta(hours=3)))
    await e.cycles(8, minutes=30)  # fetched all along: the cursor moves on meanwhile
    assert late.key in e.stored()
    assert set(e.stored()) == e.expected()
    assert e.stats()[e.ids[0]].late_reports == 1
    assert e.stats()[e.ids[0]].beyond_bound_reports == 0
    e.check_events()


@pytest.mark.parametrize("edges", [{"push_new": True}], indirect=True)
async def test_later_than_the_bound_is_stored_counted_and_logged(edges, caplog):
    e = edges
    await e.cycles(2)
    at = e.before_latest(e.ids[0])
    late = e.api.add(Truth(e.ids[0], at, at + timedelta(hours=3)))
    with caplog.at_level("WARNING", logger="trackstream.fetch"):
        await e.cycles(8, minutes=30)  # fetched all along: the cursor moves on meanwhile
    assert late.key in e.stored()
    assert set(e.stored()) == e.expected()
    assert e.stats()[e.ids[0]].beyond_bound_reports == 1
    assert "later than the lateness bound" in caplog.text
    fetch = e.h.pipeline.stage(topology.FETCH)
    assert fetch.late["beyond"] == 1
    sample = e.h.registry.get_sample_value(
        "trackstream_fetch_late_reports_total", {"bound": "beyond"}
    )
    assert sample == 1.0
    e.check_events()


async def test_a_bulk_upload_of_200_buffered_reports(edges):
    e = edges
    await e.cycles(2)
    t = e.ids[2]
    start = e.now
    buffered = [start + STEP * i for i in range(200)]  # 16 h 40 min offline
    upload = buffered[-1] + timedelta(minutes=3)
    for at in buffered:
        e.api.add(Truth(t, at, upload))
    others = [x for x in e.ids if x != t]
    while e.now < upload:
        e.regular(e.now, others)
        await e.h.cycle(minutes=60)
    await e.cycles(2)
    stored = e.stored()
    assert all((t, at) in stored for at in buffered)
    assert set(stored) == e.expected()
    e.check_events()
    # and the tracker's reports after the upload keep arriving
    await e.cycles(2, minutes=30)
    assert set(e.stored()) == e.expected()
    assert max(k[1] for k in e.stored() if k[0] == t) > upload


# --- wrong clocks --------------------------------------------------------------------


@pytest.mark.parametrize("ahead", [timedelta(days=1), timedelta(days=365 * 20)])
async def test_a_future_clock_is_stored_rejected_and_does_not_block_the_tracker(edges, ahead):
    e = edges
    await e.cycles(2)
    t = e.ids[0]
    wrong = e.api.add(Truth(t, e.now + ahead, e.now))
    await e.cycles(1)
    # the next 5 real reports, and more
    await e.cycles(5)
    stored = e.stored()
    assert set(stored) == e.expected()
    assert stored[wrong.key].fix_status == "future"
    real_after = [k for k in stored if k[0] == t and wrong.available_at < k[1] < e.now]
    assert len(real_after) >= 5
    cursor = e.h.db.run_sync(report_store.fetch_positions, [t], 300.0)[t]
    assert cursor < e.now + timedelta(seconds=300)
    sent = [c["since"][t] for c in e.api.calls if t in c.get("since", {})]
    assert all(datetime.fromisoformat(s) < e.now for s in sent)
    e.check_events()


# --- bad records ---------------------------------------------------------------------


@pytest.mark.parametrize("edges", [{"trackers": 64}], indirect=True)
async def test_one_lat_95_among_64_trackers_costs_only_itself(edges):
    e = edges
    await e.cycles(1)
    bad_at = e.now - timedelta(minutes=1, seconds=17)  # between two regular reports
    bad = {
        "tracker_id": e.ids[7],
        "observed_at": iso(bad_at),
        "lat": 95.0,
        "lon": 4.4,
        "accuracy_m": 5.0,
    }
    n = e.api.tracker_calls.get(e.ids[7], 0) + 1
    e.api.extra_records[(e.ids[7], n)] = [bad]
    await e.cycles(2)
    stored = e.stored()
    assert set(stored) == e.expected()
    assert (e.ids[7], bad_at) not in stored
    rejected = e.h.db.run_sync(lambda s: list(s.scalars(select(RejectedReport))))
    assert [(r.tracker_id, r.reason.split(":")[0], json.loads(r.raw)) for r in rejected] == [
        (e.ids[7], "lat", bad)
    ]
    assert e.stats()[e.ids[7]].rejected_reports == 1
    assert await dead_letters(e) == 0
    e.check_events()


async def test_a_response_bad_as_a_whole_is_retried_then_dead_lettered(
    redis_target, unique_prefix, db_url
):
    import httpx

    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        return httpx.Response(200, text="<html>502 Bad Gateway</html>")

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    source = HttpLocationSource("http://127.0.0.1:9", client, 2.0)
    h = Harness(redis_target, unique_prefix, db_url, trackers=2, source=source, max_deliveries=3)
    try:
        await h.scheduler.tick()
        for _ in range(40):
            await h.workers[topology.FETCH].run(burst=True)
            letters = await DeadLetters(h.client, h.keys(topology.FETCH)).count()
            if letters:
                break
            await asyncio.sleep(0.05)
        assert letters == 1
        assert len(attempts) == 3
        assert h.reports() == []
    finally:
        await h.aclose()
        await client.aclose()


# --- per-tracker errors --------------------------------------------------------------


async def test_a_per_tracker_error_affects_only_that_tracker(edges):
    e = edges
    await e.cycles(1)
    t = e.ids[1]
    n = e.api.tracker_calls[t]
    for i in (1, 2):
        e.api.errors[(t, n + i)] = {"error": "unavailable", "message": "relay down"}
    e.regular(e.now)
    await e.h.cycle(minutes=6)
    state = e.stats()[t]
    assert (state.error_code, state.error_message, state.error_count) == (
        "unavailable",
        "relay down",
        1,
    )
    assert state.retry_at == START + timedelta(minutes=6) + timedelta(seconds=300)
    # visible to the operator: trackstream trackers
    args = ["--database-url", e.h.app.database_url, "trackers", "--source-trouble"]
    shown = json.loads((await asyncio.to_thread(cli, *args, "--json")).output)
    assert [(x["tracker_id"], x["source"]["error"]) for x in shown["trackers"]] == [
        (t, "unavailable")
    ]
    assert shown["summary"]["source"]["trackers_in_error"] == {"unavailable": 1}
    table = (await asyncio.to_thread(cli, *args)).output
    assert "trackers in error: 1 unavailable" in table
    assert "unavailable" in table.split("trackers in error")[1]  # the row's source column
    # the other trackers were stored; this one not, and not marked fetched
    stored = e.stored()
    for other in e.ids:
        if other != t:
            assert {k for k in e.expected() if k[0] == other} <= set(stored)
    fetched = dict(
        e.h.db.run_sync(
            lambda s: s.execute(text("SELECT external_id, last_fetched_at FROM trackers")).all()
        )
    )
    assert fetched[t] < fetched[e.ids[0]]
    # its own schedule: due again after 300 s, the second error doubles the wait
    while e.api.tracker_calls[t] < n + 2:
        assert e.now < START + timedelta(hours=1)
        e.regular(e.now)
        await e.h.cycle(minutes=6)
    second_error_at = e.now - timedelta(minutes=6)
    assert e.stats()[t].error_count == 2
    assert e.stats()[t].retry_at == second_error_at + timedelta(seconds=600)
    await e.cycles(4)
    assert set(e.stored()) == e.expected()
    assert e.stats()[t].error_code is None
    assert (
        e.h.registry.get_sample_value(
            "trackstream_fetch_tracker_errors_total", {"code": "unavailable"}
        )
        == 2.0
    )
    e.check_events()


# --- duplicates and concurrency ------------------------------------------------------


async def test_the_same_report_in_three_calls_is_stored_and_published_once(edges):
    e = edges
    await e.cycles(2)
    t = e.ids[0]
    old = min(k for k in e.stored() if k[0] == t)
    raw = next(r.raw for r in e.api.truth if r.key == old)
    n = e.api.tracker_calls[t]
    for i in (1, 2, 3):
        e.api.extra_records[(t, n + i)] = [raw]
    fetch = e.h.pipeline.stage(topology.FETCH)
    before = fetch.reports_new
    expected_new = 0
    for _ in range(3):
        e.regular(e.now)
        have = set(e.stored())
        await e.h.cycle(minutes=6)
        expected_new += len(set(e.stored()) - have)
    assert fetch.reports_new - before == expected_new
    assert set(e.stored()) == e.expected()
    assert e.stats().get(t) is None or e.stats()[t].late_reports == 0
    e.check_events()


@pytest.mark.parametrize("edges", [{"trackers": 12}], indirect=True)
async def test_two_fetch_workers_on_overlapping_requests(edges):
    e = edges
    await e.cycles(1)
    e.h.clock.advance(minutes=30)
    e.regular(e.now)
    second = e.h.pipeline.worker(topology.FETCH, consumer="t-fetch-2")
    producer = Producer(e.h.client, e.h.pipeline.codec)
    route = e.h.pipeline.routes[topology.FETCH]
    requests = [
        FetchRequested(batch_id=f"b{i}", tracker_ids=ids, requested_at=e.now)
        for i, ids in enumerate([e.ids[:8], e.ids[4:], e.ids[2:10], e.ids])
    ]
    await producer.publish(route, requests)
    await asyncio.gather(e.h.workers[topology.FETCH].run(burst=True), second.run(burst=True))
    await e.h.drain()
    stored = e.stored()
    assert set(stored) == e.expected()
    assert len(e.h.reports()) == len(stored)  # no duplicate rows
    e.check_events()
    await e.cycles(2)
    assert set(e.stored()) == e.expected()
    e.check_events()
