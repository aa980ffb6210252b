"""Fetch-time re-validation (the 5-minute floor and production runs at the moment of
the call), the scheduler's backpressure on a single Redis and a cluster with two
schedulers, the freshness numbers, the status lines, and the settings' validation."""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from ops.cli import app
from processors.clock import ManualClock
from processors.config import load
from processors.pipeline import Pipeline
from processors.sources import Fix
from processors.topology import FETCH
from schemas import schedule, tracker_store
from schemas.db import make_engine, session_factory, upgrade
from schemas.events import FetchRequested
from schemas.tables import Tracker
from streams.consumer import Context
from streams.errors import ConfigError
from streams.message import Message
from tests.pipeline_support import START, FixedGeocoder

T = START


def tracker(ext: str, **kw: Any) -> dict[str, Any]:
    return {"external_id": ext, "name": ext, "active": True, **kw}


def set_times(db_or_session: Any, rows: dict[str, dict[str, datetime | str | None]]) -> None:
    def go(session: Any) -> None:
        for ext, values in rows.items():
            session.execute(update(Tracker).where(Tracker.external_id == ext).values(**values))

    db_or_session.run_sync(go)


class Db:
    def __init__(self, url: str) -> None:
        upgrade(url)
        self.engine = make_engine(url)
        self.sessions = session_factory(self.engine)

    def run_sync(self, fn: Any, *args: Any) -> Any:
        with self.sessions.begin() as session:
            return fn(session, *args)


@pytest.fixture
def db(db_url: str) -> Any:
    d = Db(db_url)
    yield d
    d.engine.dispose()


def test_claim_drops_recent_and_out_of_run_trackers_and_admits_a_retry(db: Db) -> None:
    db.run_sync(
        tracker_store.upsert_trackers,
        [
            tracker("A"),
            tracker("B"),
            tracker("C", run_ends_at=T),  # the run ended exactly now
            tracker("D", active=False),
            tracker("F"),
            tracker("G", run_starts_at=T + timedelta(hours=1)),
        ],
    )
    other = schedule.batch_token("other")
    set_times(
        db,
        {
            "B": {"fetch_claimed_at": T - timedelta(minutes=4), "fetch_batch": other},
            "F": {"fetch_claimed_at": T - timedelta(minutes=5), "fetch_batch": other},
        },
    )
    ids = ["A", "B", "C", "D", "E-unknown", "F", "G", "H\x00"]
    claim = db.run_sync(schedule.claim_fetch, ids, "b1", T, 300)
    assert claim.admitted == ["A", "F"]
    assert claim.too_soon == ["B"]
    assert claim.outside_run == ["C", "D", "E-unknown", "G", "H\x00"]  # never queried
    # the same request again (its call failed): admitted again
    assert db.run_sync(
        schedule.claim_fetch, ids, "b1", T + timedelta(seconds=10), 300
    ).admitted == [
        "A",
        "F",
    ]
    # A's fetch succeeded; a redelivery of the request does not fetch it again
    db.run_sync(schedule.mark_fetched, ["A"], T + timedelta(seconds=10))
    again = db.run_sync(schedule.claim_fetch, ids, "b1", T + timedelta(seconds=20), 300)
    assert again.admitted == ["F"] and "A" in again.too_soon
    # another request within the 5 minutes gets neither; after them, both
    assert db.run_sync(schedule.claim_fetch, ["A", "F"], "b2", T + timedelta(minutes=5), 300) == (
        schedule.FetchClaim([], ["A", "F"], [])
    )
    later = T + timedelta(minutes=5, seconds=20)
    assert db.run_sync(schedule.claim_fetch, ["A", "F"], "b2", later, 300).admitted == ["A", "F"]
    # the scheduler does not pick a tracker claimed within the interval either
    set_times(db, {"A": {"last_processed_at": None}})
    assert "A" not in db.run_sync(schedule.reserve_due, later + timedelta(minutes=4), 300, 100)
    assert "A" in db.run_sync(schedule.reserve_due, later + timedelta(minutes=5), 300, 100)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_concurrent_claims_never_share_a_tracker(db: Db) -> None:
    """Two fetch workers claim overlapping requests in parallel, 20 rounds: every
    tracker goes to exactly one of them (row locks + the conditional UPDATE)."""
    ids = [f"T{i:03d}" for i in range(96)]
    db.run_sync(tracker_store.upsert_trackers, [tracker(t) for t in ids])
    wins: dict[str, list[str]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    for rnd in range(20):
        at = T + timedelta(minutes=5 * rnd)
        barrier = threading.Barrier(2, timeout=30)

        def claim(name: str, mine: list[str], at: datetime = at, barrier: Any = barrier) -> None:
            try:
                barrier.wait()
                got = db.run_sync(schedule.claim_fetch, mine, f"{name}{at}", at, 300)
                wins[name].extend(f"{t}@{at}" for t in got.admitted)
            except BaseException as exc:
                errors.append(exc)

        # overlapping halves in opposite orders
        threads = [
            threading.Thread(target=claim, args=("a", ids[:64])),
            threading.Thread(target=claim, args=("b", list(reversed(ids[32:])))),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert not set(wins["a"]) & set(wins["b"])
    assert len(wins["a"]) + len(wins["b"]) == 96 * 20


def test_freshness_counts_from_the_last_fetch_or_the_run_start(db: Db) -> None:
    now = T
    db.run_sync(
        tracker_store.upsert_trackers,
        [
            tracker("fresh"),
            tracker("eleven"),
            tracker("thirteen"),
            tracker("never-run-started-1h-ago", run_starts_at=now - timedelta(hours=1)),
            tracker("old-but-ended", run_ends_at=now - timedelta(seconds=1)),
            tracker("old-but-inactive", active=False),
        ],
    )
    ago = lambda **kw: now - timedelta(**kw)  # noqa: E731
    set_times(
        db,
        {
            "fresh": {"last_fetched_at": ago(minutes=3)},
            "eleven": {"last_fetched_at": ago(hours=11)},
            # reserved a minute ago, but fetched 13 h ago: stale all the same
            "thirteen": {"last_fetched_at": ago(hours=13), "last_processed_at": ago(minutes=1)},
            "never-run-started-1h-ago": {"created_at": ago(days=3)},
            "old-but-ended": {"last_fetched_at": ago(days=5)},
            "old-but-inactive": {"last_fetched_at": ago(days=5)},
        },
    )
    f = db.run_sync(schedule.freshness, now, 12 * 3600)
    assert f == schedule.Freshness(in_run=4, stale=1, oldest_age_s=13 * 3600.0)
    assert db.run_sync(schedule.freshness, now, 10 * 3600).stale == 2
    assert db.run_sync(schedule.freshness, now + timedelta(hours=2), 12 * 3600).stale == 2


class CountingApi:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def fetch(self, tracker_ids: Any, *_: Any) -> list[Fix]:
        self.calls.append(list(tracker_ids))
        return []


def pipeline(target: Any, prefix: str, db_url: str, clock: Any, **app: Any) -> Pipeline:
    source = app.pop("source", None) or CountingApi()
    streams, settings = load(
        redis_url=target.url,
        redis_cluster=target.cluster,
        prefix=prefix,
        database_url=db_url,
        schedule_interval_s=30,
        **app,
    )
    return Pipeline(streams, settings, clock=clock, source=source, geocoder=FixedGeocoder())


async def test_the_fetch_stage_drops_what_a_stale_request_must_not_fetch(
    standalone_target, unique_prefix, tmp_path
):
    """Two requests for the same trackers (the first waited past its reservation and
    the scheduler published them again), and a run that ended while one waited."""
    db_url = f"sqlite:///{tmp_path}/stale.db"
    upgrade(db_url)
    clock = ManualClock(T)
    api = CountingApi()
    p = pipeline(standalone_target, unique_prefix, db_url, clock, source=api)
    try:
        ids = [f"S{i:02d}" for i in range(64)]
        rows = [tracker(t) for t in ids]
        rows[0]["run_ends_at"] = T + timedelta(minutes=3)
        p.db.run_sync(tracker_store.upsert_trackers, rows)
        stage = p.stage(FETCH)

        async def handle(batch_id: str) -> None:
            req = FetchRequested(batch_id=batch_id, tracker_ids=ids, requested_at=T)
            fields = p.codec.encode(req)
            msg = Message("s", "1-0", fields, 1, p.codec.decode(fields))
            await stage.handle(msg, Context(FETCH, "test", p.producer.outbox()))

        await handle("first")
        clock.advance(minutes=4)  # the second request arrives 4 min after the first fetch
        await handle("second")
        assert api.calls == [ids]
        assert stage.revalidator.dropped == {"too_soon": 63, "outside_run": 1}
        clock.advance(minutes=1)  # 5 min after the first fetch: fetched again, not S00
        await handle("third")
        assert api.calls[1] == ids[1:]
        value = p.registry.get_sample_value(
            "trackstream_fetch_trackers_dropped_total", {"reason": "too_soon"}
        )
        assert value == 63
    finally:
        await p.aclose()


async def test_backpressure_with_two_schedulers(redis_target, unique_prefix, tmp_path):
    """Single Redis and a 3-master cluster; two schedulers with their lease lock tick
    together every 5 minutes of the clock while nothing consumes: the fetch stream never
    holds more than the bound (1 call/s x 60 s = 60 requests)."""
    db_url = f"sqlite:///{tmp_path}/bp.db"
    upgrade(db_url)
    clock = ManualClock(T)
    a = pipeline(
        redis_target, unique_prefix, db_url, clock, source_rate_per_s=1, fetch_backlog_s=60
    )
    b = pipeline(
        redis_target, unique_prefix, db_url, clock, source_rate_per_s=1, fetch_backlog_s=60
    )
    try:
        a.db.run_sync(tracker_store.upsert_trackers, [tracker(f"T{i:05d}") for i in range(5_000)])
        sa, sb = a.scheduler(), b.scheduler()
        stream = a.routes[FETCH].keys().stream
        lengths = []
        for _ in range(4):
            results = await asyncio.gather(sa.tick(), sb.tick())
            assert sum(1 for r in results if r) <= 1  # one leader at a time
            lengths.append(await a.client.xlen(stream))
            clock.advance(minutes=5)
        assert lengths == [60, 60, 60, 60]
        report = sa.last_report or sb.last_report
        assert report is not None and report.backlog == 60 and report.backlog_bound == 60
    finally:
        await a.aclose()
        await b.aclose()


def test_settings_are_validated_by_name() -> None:
    with pytest.raises(ConfigError, match="fetch_backlog_s"):
        load(fetch_backlog_s=400)  # longer than min_fetch_interval_s (300)
    with pytest.raises(ConfigError, match="fetch_backlog_s"):
        load(fetch_backlog_s=10)  # shorter than schedule_interval_s (30)
    with pytest.raises(ConfigError, match="max_tracker_age_s"):
        load(max_tracker_age_s=300)
    _, app_settings = load(fetch_backlog_s=120)
    assert app_settings.fetch_backlog_bound_s == 120
    assert load()[1].fetch_backlog_bound_s == 300


def test_status_shows_freshness_and_the_scheduler(standalone_target, unique_prefix, tmp_path):
    """The real clock: trackers fetched a minute, 11 h and 13 h ago; a scheduler tick
    leaves its report; status says so, and the one past 12 h is a breach."""
    db_url = f"sqlite:///{tmp_path}/status.db"
    upgrade(db_url)
    now = datetime.now(UTC)
    d = Db(db_url)
    try:
        d.run_sync(
            tracker_store.upsert_trackers, [tracker(t) for t in ("now", "eleven", "thirteen")]
        )
        set_times(
            d,
            {
                "now": {"last_fetched_at": now - timedelta(minutes=1)},
                "eleven": {"last_fetched_at": now - timedelta(hours=11)},
                "thirteen": {"last_fetched_at": now - timedelta(hours=13)},
            },
        )
    finally:
        d.engine.dispose()

    flags = ["--redis-url", standalone_target.url, "--prefix", unique_prefix]
    flags += ["--database-url", db_url]
    tick = CliRunner().invoke(app, [*flags, "scheduler", "--once"])
    assert tick.exit_code == 0, tick.output
    assert "published 1 batches" in tick.output
    assert "ok: 3 trackers in run, 3 due" in " ".join(tick.output.split())
    bad = CliRunner().invoke(
        app, [*flags, "scheduler", "--once"], env={"TRACKSTREAM_FETCH_BACKLOG_S": "900"}
    )
    assert bad.exit_code == 2 and "fetch_backlog_s (TRACKSTREAM_FETCH_BACKLOG_S)" in bad.output
    run = lambda *args: CliRunner().invoke(app, [*flags, "status", "--no-require-consumers", *args])  # noqa: E731
    result = run("--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    fresh = report["freshness"]
    assert (fresh["in_run"], fresh["stale"]) == (3, 1)
    assert fresh["oldest_age_s"] == pytest.approx(13 * 3600, abs=60)
    assert report["scheduler"]["in_run"] == 3 and report["scheduler"]["level"] == "ok"
    assert any("not fetched for 12.0 h" in b for b in report["breaches"])
    text = " ".join(run().output.split())
    assert "freshness: 3 trackers in their run, 1 not fetched for 12.0 h" in text
    assert "least recently fetched 13.0 h ago" in text
    assert "scheduler: ok: 3 trackers in run" in text
    assert run("--no-database").exit_code == 0
