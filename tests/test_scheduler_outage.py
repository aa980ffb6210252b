"""The scheduler and the fetch stage through an outage and with an API too slow for the
fleet, on a manual clock: 10,000 trackers, a real Redis, a SQLite database, and the
real fetch stage (its fetch-time re-validation included) consuming the fetch stream at
the rate limit in-process, against a simulated location API that records every call.

Everything is checked against the API's own record of calls (an independent oracle):
no tracker fetched twice within 5 minutes, none outside its production run, the fetch
backlog (entries published minus entries acked) never above its bound, the catch-up
time against a formula from the rate limit, and the most overdue trackers first.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import pairwise

import pytest

from processors.clock import ManualClock
from processors.config import load
from processors.pipeline import Pipeline
from processors.sources import Fix, SourceUnavailable
from processors.topology import FETCH
from schemas import tracker_store
from schemas.db import upgrade
from streams.connection import ensure_group
from streams.consumer import Context
from streams.message import Message
from streams.parse import parse_entries
from tests.pipeline_support import START, FixedGeocoder

N = 10_000
BATCH = 64
FLOOR_S = 300
TICK_S = 30
GUARANTEE_S = 12 * 3600


class SimulatedApi:
    """The location API: when up, records (time, trackers) of each call; when down,
    fails every call."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.down = False
        self.calls: list[tuple[datetime, list[str]]] = []
        self.failed_calls = 0

    async def fetch(self, tracker_ids: Sequence[str], *_: object) -> list[Fix]:
        if self.down:
            self.failed_calls += 1
            raise SourceUnavailable("simulated outage")
        self.calls.append((self.clock(), list(tracker_ids)))
        return []


@dataclass
class FetchSim:
    """The fetch stage consuming at the rate limit: each source call takes 1/rate s of
    simulated time; a request whose trackers were all dropped makes no call and takes
    no time. While the API is down one request per tick is tried (the circuit
    breaker's trial) and stays pending, to be delivered again once it is back."""

    p: Pipeline
    api: SimulatedApi
    clock: ManualClock
    rate_per_s: float
    acked: int = 0
    next_call_at: datetime | None = None  # the rate limit's next free slot
    retrying: list[tuple[str, str, dict]] = field(default_factory=list)

    async def start(self) -> None:
        keys = self.p.routes[FETCH].keys()
        for stream in keys.streams():
            await ensure_group(self.p.client, "", stream, keys.group, "0")

    async def backlog(self) -> int:
        keys = self.p.routes[FETCH].keys()
        published = sum([await self.p.client.xlen(s) for s in keys.streams()])
        return published - self.acked

    async def _next(self, count: int) -> list[tuple[str, str, dict]]:
        if self.retrying:
            taken, self.retrying = self.retrying[:count], self.retrying[count:]
            return taken
        keys = self.p.routes[FETCH].keys()
        for stream in keys.streams():  # the priority lane first
            reply = await self.p.client.xreadgroup(keys.group, "sim", {stream: ">"}, count=count)
            if reply:
                return [(stream, i, f) for i, f in parse_entries(reply[0][1])]
        return []

    async def _handle(self, stream: str, entry_id: str, fields: dict) -> bool:
        """True when it was settled (acked), False when it failed (stays pending)."""
        stage = self.p.stage(FETCH)
        msg = Message(stream, entry_id, fields, 1, self.p.codec.decode(fields))
        try:
            await stage.handle(msg, Context(FETCH, "sim", self.p.producer.outbox()))
        except Exception:
            self.retrying.append((stream, entry_id, fields))
            return False
        keys = self.p.routes[FETCH].keys()
        await self.p.client.xack(stream, keys.group, entry_id)
        self.acked += 1
        return True

    async def run(self, seconds: float) -> None:
        """Fetch for ``seconds`` of simulated time from now, then stop there."""
        start = self.clock()
        end = start + timedelta(seconds=seconds)
        if self.api.down:
            for entry in await self._next(1):
                await self._handle(*entry)
            self.clock.now = end
            return
        step = timedelta(seconds=1 / self.rate_per_s)
        at = max(start, self.next_call_at or start)
        while at < end:
            entries = await self._next(1)
            if not entries:
                break
            self.clock.now = at
            calls = len(self.api.calls)
            await self._handle(*entries[0])
            if len(self.api.calls) > calls:
                at += step
        self.next_call_at = at
        self.clock.now = end


def make_pipeline(target, prefix, db_url, clock, api, **app):
    streams, settings = load(
        redis_url=target.url,
        redis_cluster=target.cluster,
        prefix=prefix,
        database_url=db_url,
        schedule_interval_s=TICK_S,
        min_fetch_interval_s=FLOOR_S,
        batch_trackers=BATCH,
        **app,
    )
    return Pipeline(streams, settings, clock=clock, source=api, geocoder=FixedGeocoder())


@dataclass(frozen=True)
class Run:
    starts: datetime
    ends: datetime


def seed_fleet(p: Pipeline, runs: dict[str, Run]) -> None:
    rows = [
        {"external_id": t, "name": t, "run_starts_at": r.starts, "run_ends_at": r.ends}
        for t, r in runs.items()
    ]
    p.db.run_sync(tracker_store.upsert_trackers, rows)


def fetch_times(api: SimulatedApi) -> dict[str, list[datetime]]:
    times: dict[str, list[datetime]] = defaultdict(list)
    for at, ids in api.calls:
        for t in ids:
            times[t].append(at)
    return times


def check_floor_and_runs(api: SimulatedApi, runs: dict[str, Run]) -> None:
    times = fetch_times(api)
    too_soon = [
        (t, a, b)
        for t, at in times.items()
        for a, b in pairwise(at)
        if b - a < timedelta(seconds=FLOOR_S)
    ]
    assert too_soon == [], f"{len(too_soon)} fetches within {FLOOR_S} s, e.g. {too_soon[:3]}"
    outside = [
        (t, a) for t, at in times.items() for a in at if not runs[t].starts <= a < runs[t].ends
    ]
    assert outside == [], f"{len(outside)} fetches outside the run, e.g. {outside[:3]}"


class Oldest:
    """The in-run tracker fetched least recently, from the API's record (a lazy heap)."""

    def __init__(self, last: dict[str, datetime]) -> None:
        self.last = dict(last)
        self.heap = [(at, t) for t, at in self.last.items()]
        heapq.heapify(self.heap)

    def fetched(self, tracker: str, at: datetime) -> None:
        self.last[tracker] = at
        heapq.heappush(self.heap, (at, tracker))

    def oldest(self) -> datetime:
        while self.heap[0][0] != self.last[self.heap[0][1]]:
            heapq.heappop(self.heap)
        return self.heap[0][0]


async def simulate(
    p, api, sim, clock, *, until, down_from, down_until, observe=None, outage_tick_s=TICK_S
):
    """Scheduler ticks every TICK_S with the fetch stage consuming in between (every
    ``outage_tick_s`` while the API is down: nothing but the circuit breaker's trial
    happens then, so a long outage is simulated in longer steps); returns the peak
    backlog (checked against the bound after every tick and every window)."""
    scheduler = p.scheduler()
    bound = scheduler.capacity.backlog_bound
    peak = 0
    while clock() < until:
        api.down = down_from <= clock() < down_until
        await scheduler.tick()
        backlog = await sim.backlog()
        assert backlog <= bound, (clock(), backlog, bound)
        peak = max(peak, backlog)
        await sim.run(outage_tick_s if api.down else TICK_S)
        if observe is not None:
            observe(clock())
    return peak, scheduler


@pytest.mark.timeout(180)
@pytest.mark.parametrize("outage_h", [1, 20])
async def test_an_outage_then_back(standalone_target, unique_prefix, tmp_path, caplog, outage_h):
    """10,000 trackers, 1 API call/s (64 trackers/s: the fleet's 5-minute cadence needs
    33/s), the backlog bound at 60 s of fetching (60 requests). 10 minutes of normal
    work, the API down for an hour (or 20 hours: every tracker is past 12 h when it
    comes back), then back for 20 minutes. 500 trackers' runs end during the outage
    (their queued requests must not fetch them), 500 start after it."""
    caplog.set_level(logging.INFO, logger="trackstream")
    rate = 1.0
    db_url = f"sqlite:///{tmp_path}/outage.db"
    upgrade(db_url)
    clock = ManualClock(START)
    api = SimulatedApi(clock)
    p = make_pipeline(
        standalone_target,
        unique_prefix,
        db_url,
        clock,
        api,
        source_rate_per_s=rate,
        fetch_backlog_s=60,
    )
    down_from = START + timedelta(minutes=10)
    back = down_from + timedelta(hours=outage_h)
    end = back + timedelta(minutes=20)
    always = Run(START - timedelta(days=1), START + timedelta(days=2))
    runs = {f"T{i:05d}": always for i in range(N)}
    for i in range(0, N, 20):  # 500 end in the outage, 500 start after it
        runs[f"T{i:05d}"] = Run(always.starts, down_from + timedelta(minutes=30))
        runs[f"T{i + 1:05d}"] = Run(back + timedelta(minutes=10), always.ends)
    try:
        seed_fleet(p, runs)
        sim = FetchSim(p, api, clock, rate)
        await sim.start()
        ages: list[tuple[datetime, float]] = []
        # a tracker's age counts from its last fetch, or from START / its run's start
        last = {t: max(START, r.starts) for t, r in runs.items()}
        groups: dict[Run, list[str]] = defaultdict(list)
        for t, r in runs.items():
            groups[r].append(t)
        seen = [0]

        def observe(now: datetime) -> None:
            for at, ids in api.calls[seen[0] :]:
                for t in ids:
                    last[t] = at
            seen[0] = len(api.calls)
            oldest = min(
                min(map(last.__getitem__, ids))
                for r, ids in groups.items()
                if r.starts <= now < r.ends
            )
            ages.append((now, (now - oldest).total_seconds()))

        peak, scheduler = await simulate(
            p,
            api,
            sim,
            clock,
            until=end,
            down_from=down_from,
            down_until=back,
            observe=observe,
            outage_tick_s=TICK_S if outage_h == 1 else 600,
        )
        bound = scheduler.capacity.backlog_bound
        assert bound == 60
        check_floor_and_runs(api, runs)
        assert peak == bound  # the outage filled it, and no further

        # catch-up: every tracker in its run fetched again after the API came back
        in_run_at_back = {t for t, r in runs.items() if r.starts <= back < r.ends}
        first_after: dict[str, datetime] = {}
        for at, ids in api.calls:
            for t in ids:
                if at >= back:
                    first_after.setdefault(t, at)
        assert in_run_at_back <= set(first_after)
        catch_up_s = (max(first_after[t] for t in in_run_at_back) - back).total_seconds()
        # independent bound: every tracker once at the rate limit, plus two ticks (one to
        # publish after a request's reservation expires, one for a part-filled batch)
        expected_s = math.ceil(len(in_run_at_back) / BATCH) / rate + 2 * TICK_S
        assert catch_up_s <= expected_s, (catch_up_s, expected_s)

        # staleness: never over 12 h once caught up (nor at all after a 1-hour outage),
        # and within a round of the floor again soon after
        caught_up = back + timedelta(seconds=expected_s)
        assert max(a for t, a in ages if t >= caught_up) < GUARANTEE_S
        if outage_h == 1:
            assert max(a for _, a in ages) < GUARANTEE_S
        after = [a for t, a in ages if t >= caught_up + timedelta(seconds=FLOOR_S)]
        assert after and max(after) <= FLOOR_S + 60 + 2 * TICK_S, max(after)
        worst_outage_age = max(a for t, a in ages if t <= caught_up)

        stage = p.stage(FETCH)
        dropped = stage.revalidator.dropped
        # runs that ended while their requests waited in the backlog
        assert dropped["outside_run"] > 0
        assert scheduler.last_report is not None and scheduler.last_report.level == "ok"
        assert any("fetch backlog at its bound" in r.message for r in caplog.records)
        print(
            f"\n{outage_h} h outage: peak backlog {peak}/{bound} requests; "
            f"catch-up {catch_up_s:.0f} s (bound {expected_s:.0f} s) for "
            f"{len(in_run_at_back)} trackers; oldest age "
            f"{worst_outage_age / 3600:.2f} h at worst, {max(after):.0f} s after; "
            f"dropped at fetch time {dropped}; calls {len(api.calls)} ok, "
            f"{api.failed_calls} failed"
        )
    finally:
        await p.aclose()


@pytest.mark.timeout(180)
async def test_an_api_too_slow_for_the_fleet(standalone_target, unique_prefix, tmp_path, caplog):
    """10,000 trackers want 33 fetches/s at the 5-minute floor; the API allows 0.25
    calls/s (16 trackers/s), so a round of the fleet takes 625 s. The queue stays at its
    bound (75 requests: 300 s of fetching) instead of growing; the scheduler says so;
    every fetch serves one of the most overdue trackers; through an hour's outage."""
    caplog.set_level(logging.INFO, logger="trackstream")
    rate = 0.25
    db_url = f"sqlite:///{tmp_path}/slow.db"
    upgrade(db_url)
    clock = ManualClock(START)
    api = SimulatedApi(clock)
    p = make_pipeline(standalone_target, unique_prefix, db_url, clock, api, source_rate_per_s=rate)
    down_from = START + timedelta(minutes=15)
    back = down_from + timedelta(hours=1)
    end = back + timedelta(minutes=20)
    always = Run(START - timedelta(days=1), START + timedelta(days=2))
    runs = {f"T{i:05d}": always for i in range(N)}
    try:
        seed_fleet(p, runs)
        sim = FetchSim(p, api, clock, rate)
        await sim.start()
        oldest = Oldest(dict.fromkeys(runs, START))
        seen = [0]
        behind: list[float] = []  # how much more overdue the oldest was than the one served

        def observe(now: datetime) -> None:
            for at, ids in api.calls[seen[0] :]:
                for t in ids:
                    behind.append((oldest.last[t] - oldest.oldest()).total_seconds())
                    oldest.fetched(t, at)
            seen[0] = len(api.calls)

        peak, scheduler = await simulate(
            p, api, sim, clock, until=end, down_from=down_from, down_until=back, observe=observe
        )
        bound = scheduler.capacity.backlog_bound
        assert bound == 75
        assert peak <= bound
        check_floor_and_runs(api, runs)
        report = scheduler.last_report
        assert report is not None and report.level == "slow"
        assert report.demand_per_s == pytest.approx(N / FLOOR_S, rel=1e-3)
        assert report.capacity_per_s == pytest.approx(rate * BATCH)
        assert report.cycle_s == pytest.approx(N / (rate * BATCH), rel=1e-3)
        said = [r.message for r in caplog.records if "slower than the fleet" in r.message]
        assert said and "33.33 fetches/s" in said[0] and "16.00/s" in said[0], said
        # most overdue first: each tracker served was at most the backlog's wait plus a
        # tick less overdue than the most overdue one at that moment
        tolerance_s = scheduler.capacity.backlog_s + TICK_S
        assert max(behind) <= tolerance_s, max(behind)

        first_after: dict[str, datetime] = {}
        for at, ids in api.calls:
            for t in ids:
                if at >= back:
                    first_after.setdefault(t, at)
        assert set(first_after) == set(runs)
        catch_up_s = (max(first_after.values()) - back).total_seconds()
        expected_s = math.ceil(N / BATCH) / rate + 2 * TICK_S
        assert catch_up_s <= expected_s, (catch_up_s, expected_s)
        print(
            f"\nslow API: peak backlog {peak}/{bound} requests; catch-up {catch_up_s:.0f} s "
            f"(bound {expected_s:.0f} s); served at most {max(behind):.0f} s less overdue "
            f"than the most overdue; dropped {p.stage(FETCH).revalidator.dropped}; "
            f"calls {len(api.calls)}"
        )
    finally:
        await p.aclose()


@pytest.mark.timeout(120)
async def test_an_api_that_cannot_keep_the_guarantee(
    standalone_target, unique_prefix, tmp_path, caplog
):
    """0.003 calls/s: a round of 10,000 trackers takes 14.5 h, so the 12-hour guarantee
    cannot hold. The scheduler says so, keeps one request outstanding (the bound) and
    serves exactly the most overdue trackers first, and the freshness numbers agree
    with an independent count. Trackers were last fetched 1 to 11.9 h ago (random)."""
    import random

    from sqlalchemy import bindparam, update

    from schemas import schedule
    from schemas.tables import Tracker

    caplog.set_level(logging.INFO, logger="trackstream")
    rate = 0.003
    db_url = f"sqlite:///{tmp_path}/overloaded.db"
    upgrade(db_url)
    clock = ManualClock(START)
    api = SimulatedApi(clock)
    p = make_pipeline(standalone_target, unique_prefix, db_url, clock, api, source_rate_per_s=rate)
    always = Run(START - timedelta(days=1), START + timedelta(days=2))
    runs = {f"T{i:05d}": always for i in range(N)}
    ages = dict(zip(runs, random.Random(7).sample(range(3600, 42_840), N), strict=True))
    try:
        seed_fleet(p, runs)

        def backdate(session) -> None:
            t = Tracker.__table__
            session.execute(
                update(t)
                .where(t.c.external_id == bindparam("ext"))
                .values(last_fetched_at=bindparam("at"), last_processed_at=bindparam("at")),
                [{"ext": ext, "at": START - timedelta(seconds=age)} for ext, age in ages.items()],
            )

        p.db.run_sync(backdate)
        sim = FetchSim(p, api, clock, rate)
        await sim.start()
        hours = 1.5
        end = START + timedelta(hours=hours)
        peak, scheduler = await simulate(
            p, api, sim, clock, until=end, down_from=end, down_until=end
        )
        assert scheduler.capacity.backlog_bound == 1 and peak == 1
        check_floor_and_runs(api, runs)
        served = [t for _, ids in api.calls for t in ids]
        most_overdue = sorted(ages, key=lambda t: -ages[t])
        assert len(api.calls) >= int(hours * 3600 * rate)
        assert served == most_overdue[: len(served)]

        report = scheduler.last_report
        assert report is not None and report.level == "overloaded"
        said = [r for r in caplog.records if "too slow for the fleet" in r.message]
        assert said and said[0].levelno == logging.ERROR
        assert "cannot hold" in said[0].message and "14.5 h" in said[0].message

        # the freshness numbers against the seeded ages
        fetched = set(served)
        age_now = {t: a + hours * 3600 for t, a in ages.items() if t not in fetched}
        expected_stale = sum(1 for a in age_now.values() if a > GUARANTEE_S)
        fresh = p.db.run_sync(schedule.freshness, end, GUARANTEE_S)
        assert fresh.in_run == N
        assert fresh.stale == expected_stale > 0
        assert fresh.oldest_age_s == max(age_now.values())
        print(
            f"\noverloaded: {len(api.calls)} calls served the {len(served)} most overdue "
            f"in order; after {hours} h {expected_stale} trackers past 12 h, oldest "
            f"{fresh.oldest_age_s / 3600:.2f} h"
        )
    finally:
        await p.aclose()
