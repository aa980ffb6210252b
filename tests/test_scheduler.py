"""The scheduler on a simulated clock: fairness over 10,000 trackers, the 5-minute
floor, the 12-hour guarantee, production-run windows, lost batches, and two schedulers
at once (lease lock, and row locking on its own)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import timedelta
from itertools import pairwise

import pytest

from processors.clock import ManualClock
from processors.config import load
from processors.pipeline import Pipeline
from processors.topology import FETCH
from schemas import tracker_store
from schemas.db import upgrade
from streams.parse import parse_entries
from tests.pipeline_support import START, FixedGeocoder

FLOOR = timedelta(minutes=5)
GUARANTEE = timedelta(hours=12)


def make_pipeline(target, prefix, db_url, clock, **app):
    streams, settings = load(
        redis_url=target.url,
        redis_cluster=target.cluster,
        prefix=prefix,
        database_url=db_url,
        schedule_interval_s=60,
        **app,
    )
    return Pipeline(streams, settings, clock=clock, geocoder=FixedGeocoder())


def seed(db, n, *, start=START, **extra):
    rows = [
        {
            "external_id": f"T{i:05d}",
            "name": f"T{i}",
            "active": True,
            "run_starts_at": start - timedelta(days=1),
            "run_ends_at": start + timedelta(days=2),
            **extra,
        }
        for i in range(n)
    ]
    db.run_sync(tracker_store.upsert_trackers, rows)
    return [r["external_id"] for r in rows]


async def published(p: Pipeline) -> list:
    keys = p.routes[FETCH].keys()
    entries = parse_entries(await p.client.xrange(keys.stream))
    return [p.codec.decode(f).payload for _, f in entries]


async def test_ten_thousand_trackers_fetched_every_12_hours_never_within_5_minutes(
    standalone_target, unique_prefix, tmp_path
):
    """Capacity is 128 trackers a minute (2 batches of 64 per tick), so 10,000 trackers
    need a round of about 79 minutes: every tracker must come round within 12 h, none
    within 5 min of its previous fetch, and the order must be oldest first."""
    db_url = f"sqlite:///{tmp_path}/fair.db"
    upgrade(db_url)
    clock = ManualClock(START)
    # nothing consumes the fetch stream here: a backlog bound (10/s x 300 s = 3,000
    # requests) above the run's 1,560 keeps backpressure out of this test
    p = make_pipeline(
        standalone_target,
        unique_prefix,
        db_url,
        clock,
        max_batches_per_tick=2,
        source_rate_per_s=10,
    )
    try:
        ids = seed(p.db, 10_000)
        scheduler = p.scheduler()
        times: dict[str, list] = defaultdict(list)
        end = START + GUARANTEE + timedelta(hours=1)
        ticks = 0
        while clock() < end:
            for batch in await scheduler.tick():
                assert 1 <= len(batch.tracker_ids) <= 64
                for t in batch.tracker_ids:
                    times[t].append(batch.requested_at)
            clock.advance(minutes=1)
            ticks += 1
        assert ticks == 13 * 60 + 1 or ticks == 13 * 60
        assert set(times) == set(ids), "every active tracker was fetched"
        worst_gap = timedelta(0)
        for t, at in times.items():
            gaps = [b - a for a, b in pairwise(at)]
            assert min(gaps, default=FLOOR) >= FLOOR, t
            worst_gap = max([worst_gap, at[0] - START, end - at[-1], *gaps])
        assert worst_gap <= GUARANTEE
        assert worst_gap <= timedelta(minutes=90)  # ~79 min per round at this capacity
        counts = sorted(len(v) for v in times.values())
        assert counts[-1] - counts[0] <= 1, "fair: nobody is fetched more than one extra time"
        # what went to Redis is exactly what tick() returned
        assert sum(len(b.tracker_ids) for b in await published(p)) == sum(counts)
    finally:
        await p.aclose()


async def test_floor_window_and_inactive_trackers(standalone_target, unique_prefix, db_url):
    upgrade(db_url)
    clock = ManualClock(START)
    p = make_pipeline(standalone_target, unique_prefix, db_url, clock)
    try:
        ids = seed(p.db, 100)
        rows = [
            {
                "external_id": "OFF",
                "name": "off",
                "active": False,
                "run_starts_at": None,
                "run_ends_at": None,
            },
            {
                "external_id": "LATER",
                "name": "later",
                "active": True,
                "run_starts_at": START + timedelta(hours=1),
                "run_ends_at": None,
            },
            {
                "external_id": "OVER",
                "name": "over",
                "active": True,
                "run_starts_at": None,
                "run_ends_at": START - timedelta(minutes=1),
            },
        ]
        p.db.run_sync(tracker_store.upsert_trackers, rows)
        s = p.scheduler()
        first = {t for b in await s.tick() for t in b.tracker_ids}
        assert first == set(ids)
        clock.advance(minutes=4, seconds=59)
        assert await s.tick() == []
        clock.advance(seconds=1)
        assert {t for b in await s.tick() for t in b.tracker_ids} == set(ids)
        clock.advance(hours=1)
        later = {t for b in await s.tick() for t in b.tracker_ids}
        assert "LATER" in later and "OFF" not in later and "OVER" not in later
    finally:
        await p.aclose()


async def test_a_lost_batch_is_scheduled_again_after_the_floor(
    standalone_target, unique_prefix, tmp_path
):
    db_url = f"sqlite:///{tmp_path}/lost.db"
    upgrade(db_url)
    clock = ManualClock(START)
    p = make_pipeline(standalone_target, unique_prefix, db_url, clock)
    try:
        ids = seed(p.db, 10)
        s = p.scheduler()
        assert {t for b in await s.tick() for t in b.tracker_ids} == set(ids)
        await p.client.delete(p.routes[FETCH].keys().stream)  # the batch is lost in Redis
        clock.advance(minutes=5)
        assert {t for b in await s.tick() for t in b.tracker_ids} == set(ids)
    finally:
        await p.aclose()


async def test_two_schedulers_never_double_schedule(redis_target, unique_prefix, db_url):
    """Two schedulers (own connections, own database pools) ticking at the same time."""
    upgrade(db_url)
    clock = ManualClock(START)
    a = make_pipeline(redis_target, unique_prefix, db_url, clock, max_batches_per_tick=3)
    b = make_pipeline(redis_target, unique_prefix, db_url, clock, max_batches_per_tick=3)
    try:
        seed(a.db, 1_000)
        sa, sb = a.scheduler(), b.scheduler()
        times: dict[str, list] = defaultdict(list)
        for _ in range(40):
            for batches in await asyncio.gather(sa.tick(), sb.tick()):
                for batch in batches:
                    for t in batch.tracker_ids:
                        times[t].append(batch.requested_at)
            clock.advance(seconds=30)
        assert len(times) == 1_000
        for t, at in times.items():
            gaps = [y - x for x, y in pairwise(at)]
            assert min(gaps, default=FLOOR) >= FLOOR, (t, at)
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.parametrize("db", ["postgresql"])
async def test_row_locking_alone_keeps_two_schedulers_apart(
    standalone_target, unique_prefix, pg_url, db
):
    """Without the Redis lock (lock=None), FOR UPDATE SKIP LOCKED gives two schedulers
    ticking in parallel disjoint sets of trackers."""
    upgrade(pg_url)
    clock = ManualClock(START)
    a = make_pipeline(standalone_target, unique_prefix, pg_url, clock, max_batches_per_tick=4)
    b = make_pipeline(standalone_target, unique_prefix, pg_url, clock, max_batches_per_tick=4)
    try:
        seed(a.db, 2_000)
        sa, sb = a.scheduler(use_lock=False), b.scheduler(use_lock=False)
        seen: list[str] = []
        rounds = []
        for _ in range(4):
            picked = [
                [t for batch in batches for t in batch.tracker_ids]
                for batches in await asyncio.gather(sa.tick(), sb.tick())
            ]
            rounds.append(picked)
            seen.extend(t for p in picked for t in p)
        # 2 x 256 a round; 2,000 trackers: the fourth round takes the last 464
        assert len(seen) == len(set(seen)) == 2_000
        assert all(p for p in rounds[0]), "both schedulers got work in parallel"
    finally:
        await a.aclose()
        await b.aclose()
