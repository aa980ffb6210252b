"""The Prometheus exporter: a real Redis (standalone and cluster), scraped like Prometheus."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ops.exporter import PipelineCollector
from processors import topology
from streams.connection import connect
from streams.embedded import free_port
from streams.errors import Reject
from streams.message import Codec
from streams.producer import Producer
from streams.settings import StreamSettings
from streams.worker import Worker
from tests.support import Ping, fast_settings

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(registry: CollectorRegistry) -> Samples:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def stage(samples: Samples, name: str, stage_name: str, shard: int = 0) -> float:
    return samples[(name, (("shard", str(shard)), ("stage", stage_name)))]


def plain(samples: Samples, name: str) -> float:
    return samples[(name, ())]


@pytest.fixture
def exporter() -> Iterator:
    made: list[PipelineCollector] = []

    def make(settings: StreamSettings, **kwargs) -> tuple[CollectorRegistry, PipelineCollector]:
        registry = CollectorRegistry()
        collector = PipelineCollector(settings, **kwargs)
        registry.register(collector)
        made.append(collector)
        return registry, collector

    yield make
    for collector in made:
        collector.close()


@pytest.fixture
async def pipeline(redis_target, unique_prefix):
    settings = fast_settings(redis_target, unique_prefix, consumer_dead_after_ms=60_000)
    client = connect(settings)
    yield settings, client, Codec([Ping]), topology.routes(unique_prefix)
    await client.aclose()


async def test_scrape_shows_length_lag_pending_consumers_and_dead_letters(pipeline, exporter):
    settings, client, codec, routes = pipeline
    fetch = routes[topology.FETCH]
    producer = Producer(client, codec)
    await producer.publish(fetch, [Ping(n=n) for n in range(5)])

    async def handle(msg, ctx):
        if msg.payload.n == 0:
            raise Reject("poison")

    await Worker(client, settings, fetch, codec, handler=handle).run(burst=True)
    await producer.publish(fetch, [Ping(n=n) for n in range(5, 8)])
    keys = fetch.keys()
    # a consumer without heartbeats takes two entries and never acks them
    await client.xreadgroup(keys.group, "stuck", {keys.stream: ">"}, count=2)
    # geocode: entries published before any worker created its group
    await producer.publish(routes[topology.GEOCODE], [Ping(n=n) for n in range(4)])

    registry, _ = exporter(settings)
    samples = scrape(registry)

    assert stage(samples, "trackstream_stream_length", "fetch") == 8
    assert stage(samples, "trackstream_stream_lag", "fetch") == 1
    assert stage(samples, "trackstream_stream_pending", "fetch") == 2
    assert stage(samples, "trackstream_stream_oldest_pending_age_seconds", "fetch") >= 0
    assert stage(samples, "trackstream_dead_letters", "fetch") == 1
    assert stage(samples, "trackstream_stream_consumers", "fetch") == 2
    assert stage(samples, "trackstream_stream_live_consumers", "fetch") == 1
    assert stage(samples, "trackstream_stream_length", "geocode") == 4
    assert stage(samples, "trackstream_stream_lag", "geocode") == 4  # no group yet: all of it
    for name in ("geofence", "view-refresh"):
        assert stage(samples, "trackstream_stream_length", name) == 0
        assert stage(samples, "trackstream_dead_letters", name) == 0
    assert plain(samples, "trackstream_exporter_up") == 1
    assert samples[("trackstream_exporter_scrape_errors_total", (("source", "redis"),))] == 0
    # no database configured: no freshness metrics, no database errors
    assert not any(name.startswith("trackstream_reports_") for name, _ in samples)
    assert ("trackstream_exporter_scrape_errors_total", (("source", "database"),)) not in samples


async def test_oldest_pending_age_grows_and_scrapes_are_fast(pipeline, exporter):
    settings, client, codec, routes = pipeline
    route = routes[topology.GEOFENCE]
    keys = route.keys()
    await Producer(client, codec).publish(route, [Ping(n=1)])
    await client.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    await client.xreadgroup(keys.group, "slow", {keys.stream: ">"}, count=1)
    registry, _ = exporter(settings)
    scrape(registry)  # connect once
    start = time.perf_counter()
    samples = scrape(registry)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.3, f"a scrape of 4 stages took {elapsed:.3f} s"
    assert stage(samples, "trackstream_stream_pending", "geofence") == 1
    assert stage(samples, "trackstream_stream_oldest_pending_age_seconds", "geofence") >= 0
    assert stage(samples, "trackstream_stream_oldest_pending_age_seconds", "fetch") == 0


def test_exporter_down_when_redis_is_unreachable(exporter):
    settings = StreamSettings.build(redis_url=f"redis://127.0.0.1:{free_port()}/0", prefix="down")
    registry, _ = exporter(settings)
    start = time.perf_counter()
    samples = scrape(registry)
    assert time.perf_counter() - start < 3
    assert plain(samples, "trackstream_exporter_up") == 0
    assert samples[("trackstream_exporter_scrape_errors_total", (("source", "redis"),))] >= 1
    assert not any(name == "trackstream_stream_length" for name, _ in samples)
    again = scrape(registry)
    assert (
        again[("trackstream_exporter_scrape_errors_total", (("source", "redis"),))]
        > samples[("trackstream_exporter_scrape_errors_total", (("source", "redis"),))]
    )


def test_exporter_rides_out_a_redis_restart(redis_factory, unique_prefix, exporter):
    server = redis_factory()
    settings = StreamSettings.build(redis_url=server.url, prefix=unique_prefix)
    registry, _ = exporter(settings, scrape_timeout_s=2)
    errors = ("trackstream_exporter_scrape_errors_total", (("source", "redis"),))
    assert plain(scrape(registry), "trackstream_exporter_up") == 1
    server.kill()
    down = scrape(registry)
    assert plain(down, "trackstream_exporter_up") == 0 and down[errors] >= 1
    server.start()
    back = scrape(registry)  # the same collector and client reconnect
    assert plain(back, "trackstream_exporter_up") == 1
    assert back[errors] == down[errors]
    assert stage(back, "trackstream_stream_length", "fetch") == 0


async def test_database_outage_is_counted_and_redis_metrics_stay(pipeline, exporter, tmp_path):
    settings, *_ = pipeline
    missing = tmp_path / "no-such-dir" / "db.sqlite"
    registry, _ = exporter(settings, database_url=f"sqlite:///{missing}")
    samples = scrape(registry)
    assert samples[("trackstream_exporter_scrape_errors_total", (("source", "database"),))] == 1
    assert not any(name.startswith("trackstream_reports_") for name, _ in samples)
    assert ("trackstream_stalest_tracker_age_seconds", ()) not in samples
    assert plain(samples, "trackstream_exporter_up") == 1
    assert stage(samples, "trackstream_stream_length", "fetch") == 0
    assert not missing.parent.exists()  # the exporter never creates a database


def test_a_hung_database_delays_a_scrape_by_the_timeout_only(
    standalone_target, unique_prefix, exporter
):
    settings = fast_settings(standalone_target, unique_prefix)
    registry, collector = exporter(
        settings, database_url="postgresql://nobody@127.0.0.1:1/none", scrape_timeout_s=0.5
    )
    release = threading.Event()

    def hung_read():
        release.wait(10)
        raise ConnectionError("gave up")

    collector.freshness.read = hung_read
    try:
        start = time.perf_counter()
        samples = scrape(registry)
        assert time.perf_counter() - start < 2
        errors = ("trackstream_exporter_scrape_errors_total", (("source", "database"),))
        assert samples[errors] == 1
        assert plain(samples, "trackstream_exporter_up") == 1
        # the read is still hanging: the next scrape does not pile up another one
        start = time.perf_counter()
        assert scrape(registry)[errors] == 2
        assert time.perf_counter() - start < 1
    finally:
        release.set()


async def test_freshness_metrics_from_the_database(
    standalone_target, unique_prefix, exporter, db_url
):
    """SQLite and PostgreSQL: the stalest active tracker and the unfinished reports."""
    from schemas.db import make_engine, session_factory, upgrade
    from schemas.tables import LocationReport, Tracker

    settings = fast_settings(standalone_target, unique_prefix)
    upgrade(db_url)
    now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    ago = lambda **kw: now - timedelta(**kw)  # noqa: E731
    engine = make_engine(db_url)
    try:
        with session_factory(engine).begin() as session:
            session.add_all(
                [
                    Tracker(
                        external_id="T-1",
                        name="fresh",
                        last_processed_at=ago(minutes=2),
                        last_fetched_at=ago(minutes=2),
                    ),
                    Tracker(
                        external_id="T-2",
                        name="stale",
                        last_processed_at=ago(hours=3),
                        last_fetched_at=ago(hours=3),
                    ),
                    Tracker(
                        external_id="T-3",
                        name="inactive and older",
                        active=False,
                        last_processed_at=ago(days=9),
                        last_fetched_at=ago(days=9),
                    ),
                    Tracker(
                        external_id="T-4",
                        name="production run over",
                        run_ends_at=ago(days=1),
                        last_processed_at=ago(days=8),
                        last_fetched_at=ago(days=8),
                    ),
                ]
            )
            session.flush()

            def report(minutes: int, geocoded: bool, checked: bool) -> LocationReport:
                return LocationReport(
                    tracker_id="T-1",
                    observed_at=ago(minutes=minutes),
                    lat=52.5,
                    lon=13.4,
                    source="test",
                    fetched_at=ago(minutes=1),
                    geocoded_at=ago(seconds=30) if geocoded else None,
                    geofence_checked_at=ago(seconds=20) if checked else None,
                )

            session.add_all(
                [
                    report(10, geocoded=True, checked=True),
                    report(11, geocoded=True, checked=False),
                    report(12, geocoded=False, checked=False),
                    report(13, geocoded=False, checked=False),
                ]
            )
        from schemas import report_store
        from tests import store_support

        with session_factory(engine)() as session:
            expected = (
                store_support.stalest_active_tracker_age_s(session, now),
                report_store.count_not_geocoded(session),
                report_store.count_not_checked(session),
            )
    finally:
        engine.dispose()
    assert expected[0] == pytest.approx(3 * 3600)  # inactive and out-of-run ones do not count
    assert expected[1] == 2
    assert expected[2] == 1  # geocoded, not yet checked (the rest are not geocoded yet)

    registry, _ = exporter(settings, database_url=db_url, clock=lambda: now)
    samples = scrape(registry)
    assert samples[("trackstream_exporter_scrape_errors_total", (("source", "database"),))] == 0
    assert plain(samples, "trackstream_stalest_tracker_age_seconds") == pytest.approx(3 * 3600)
    assert plain(samples, "trackstream_trackers_in_run") == 2
    assert plain(samples, "trackstream_trackers_stale") == 0
    assert plain(samples, "trackstream_tracker_max_age_seconds") == 43_200
    assert plain(samples, "trackstream_reports_not_geocoded") == 2
    assert plain(samples, "trackstream_reports_not_checked") == 1
    assert plain(samples, "trackstream_exporter_up") == 1
    # the database changes, the next scrape shows it (nothing is cached)
    engine = make_engine(db_url)
    try:
        with session_factory(engine).begin() as session:
            for r in session.query(LocationReport).all():
                r.geocoded_at = r.geofence_checked_at = now
    finally:
        engine.dispose()
    samples = scrape(registry)
    assert plain(samples, "trackstream_reports_not_geocoded") == 0
    assert plain(samples, "trackstream_reports_not_checked") == 0


def _cli(*args: str, cwd) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKSTREAM_")}
    return subprocess.Popen(
        [sys.executable, "-m", "ops.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _get_when_up(proc: subprocess.Popen, url: str, timeout_s: float = 15) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            if proc.poll() is not None:
                raise AssertionError(f"the command exited: {proc.communicate()[0]}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_exporter_command_serves_metrics_and_stops_on_sigterm(
    redis_server, unique_prefix, tmp_path
):
    port = free_port()
    proc = _cli(
        "--redis-url",
        redis_server.url,
        "--prefix",
        unique_prefix,
        "exporter",
        "--port",
        str(port),
        cwd=tmp_path,
    )
    try:
        response = _get_when_up(proc, f"http://127.0.0.1:{port}/metrics")
        assert response.status_code == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
        }
        assert plain(samples, "trackstream_exporter_up") == 1
        for name in topology.STAGES:
            assert stage(samples, "trackstream_stream_length", name) == 0
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    # the default SQLite database does not exist here: Redis metrics only, nothing created
    assert "exporting Redis metrics only" in out
    assert not (tmp_path / ".trackstream").exists()


def test_metrics_are_served_on_metrics_only():
    import urllib.error
    import urllib.request

    from prometheus_client import CollectorRegistry, Counter

    from ops.metrics_http import serve_metrics
    from tests.servers import free_port

    registry = CollectorRegistry()
    Counter("probe_total", "a probe", registry=registry).inc()
    port = free_port()
    server, thread = serve_metrics(registry, "127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert answer.status == 200 and b"probe_total 1.0" in answer.read()
        for path in ("/", "/metric", "/favicon.ico"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
            assert err.value.code == 404 and b"/metrics" in err.value.read()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
