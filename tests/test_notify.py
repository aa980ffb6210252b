"""The notify stage against real HTTP receivers (127.0.0.1), a real Redis and database.

Events are written to geofence_events (as the geofence stage does) and published to
the notify stream, often out of order, to show that order per tracker and endpoint
comes from the stage, not from the stream. Every request is verified by the receivers'
own Standard Webhooks implementation (tests/webhook_support.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ops.bench import fixtures
from processors import topology
from processors.config import load
from processors.database import Database
from processors.pipeline import Pipeline
from schemas import geofence_defs, tracker_store, webhook_store
from schemas.db import upgrade
from schemas.notify import GeofenceEvent
from schemas.secretbox import SecretBox
from streams.deadletter import DeadLetters
from streams.producer import Producer
from tests.conftest import RedisTarget
from tests.support import FAST, wait_for
from tests.webhook_support import Receiver, expected_id, make_secret, timeline

ROOT = Path(__file__).resolve().parent.parent
START = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)  # observed hours ago: stale as a timestamp
KEY = "q6Hq2F1l9cZkzM3-Yk2Zq1lq3zH2kR8cQwN8bX2mV0E="  # a Fernet key, for the tests only
NOTIFY_FAST = {
    **FAST,
    "webhook_keys": KEY,
    "handler_timeout_ms": 5_000,
    "claim_idle_ms": 6_000,
    "batch_size": 10,
    "notify_retry_base_s": 0.2,
    "notify_retry_max_s": 0.5,
    "notify_rate_per_min": 60_000,
    "notify_timeout_s": 5,
    "notify_poll_s": 0.1,
    "notify_inline_wait_s": 0.2,
}


class Env:
    """A database with trackers, geofences and subscriptions, and a pipeline factory."""

    def __init__(self, target: RedisTarget, prefix: str, db_url: str, **settings: Any) -> None:
        upgrade(db_url)
        self.values = {
            **NOTIFY_FAST,
            **settings,
            "redis_url": target.url,
            "redis_cluster": target.cluster,
            "prefix": prefix,
            "database_url": db_url,
        }
        self.streams, self.app = load(**self.values)
        self.db = Database(db_url)
        self.pipelines: list[Pipeline] = []

    def seed(self, trackers: list[str], geofences: int) -> list[int]:
        def work(s: Any) -> list[int]:
            tracker_store.upsert_trackers(s, [{"external_id": t} for t in trackers])
            return [
                geofence_defs.add_geofence(s, f"g{i}", "circle", 1.0 + i, 2.0, 100.0).id
                for i in range(geofences)
            ]

        return self.db.run_sync(work)

    def subscribe(self, receiver: Receiver, **filters: Any) -> int:
        return self.db.run_sync(
            webhook_store.add_subscription,
            receiver.url,
            receiver.secret,
            box=SecretBox([KEY]),
            allow_private=True,
            allow_http=True,
            **filters,
        )

    def write_events(self, events: list[tuple[str, int, datetime, str]]) -> list[GeofenceEvent]:
        def work(s: Any) -> None:
            for t, g, at, kind in events:
                fixtures.replace_events_at(s, t, at, {g: kind})

        self.db.run_sync(work)
        return [
            GeofenceEvent(tracker_id=t, geofence_id=g, observed_at=at, kind=k)  # type: ignore[arg-type]
            for t, g, at, k in events
        ]

    def pipeline(self) -> Pipeline:
        p = Pipeline(self.streams, self.app, registry=CollectorRegistry())
        self.pipelines.append(p)
        return p

    async def publish(self, events: list[GeofenceEvent]) -> None:
        p = self.pipelines[0] if self.pipelines else self.pipeline()
        await Producer(p.client, p.codec).publish(p.routes[topology.NOTIFY], events)

    def keys(self) -> Any:
        return topology.routes(self.streams.prefix)[topology.NOTIFY].keys()

    async def dead_letters(self) -> list[Any]:
        p = self.pipelines[0]
        return await DeadLetters(p.client, self.keys()).list(limit=1000)

    def states(self) -> dict[tuple[str, int], str]:
        rows = self.db.run_sync(webhook_store.delivery_states)
        return {(r[0], r[1]): r[2] for r in rows}

    def attempts(self, sub: int) -> list[dict[str, Any]]:
        return self.db.run_sync(webhook_store.recent_attempts, 10_000, sub)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKSTREAM_")}
        for k, v in self.values.items():
            env[f"TRACKSTREAM_{k.upper()}"] = str(v).lower() if isinstance(v, bool) else str(v)
        return env

    async def aclose(self) -> None:
        for p in self.pipelines:
            await p.aclose()
        self.db.dispose()


async def running(*workers: Any) -> list[asyncio.Task[Any]]:
    return [asyncio.create_task(w.run()) for w in workers]


async def stop(workers: list[Any], tasks: list[asyncio.Task[Any]]) -> None:
    for w in workers:
        w.stop()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)


def ids(events: list[tuple[str, int, datetime, str]]) -> set[str]:
    return {expected_id(*e) for e in events}


def assert_in_order(receiver: Receiver, events: list[tuple[str, int, datetime, str]]) -> None:
    """Per tracker, first arrivals follow observed_at (an exit never before its enter)."""
    arrivals = receiver.first_arrivals()
    by_id = {expected_id(*e): e for e in events}
    for tracker in {e[0] for e in events}:
        got = [by_id[i] for i in arrivals if i in by_id and by_id[i][0] == tracker]
        assert got == sorted(got, key=lambda e: e[2]), f"{tracker}: out of order"


@pytest.fixture
def receivers() -> Any:
    started: list[Receiver] = []

    def make(n: int = 0, **kwargs: Any) -> Receiver:
        r = Receiver(make_secret(n), **kwargs).start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


# ---------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_every_event_once_per_endpoint_in_order_through_sigkills(
    redis_server, pg_url, unique_prefix, receivers
):
    """Two notify worker processes, SIGKILLed twice mid-run: every event reaches every
    matching endpoint, signed, in order per tracker; a repeat carries the same id."""
    target = RedisTarget(redis_server.url, False)
    env = Env(target, unique_prefix, pg_url, claim_idle_ms=3_000, handler_timeout_ms=2_000)
    try:
        trackers = [f"T{i}" for i in range(4)]
        g1, g2 = env.seed(trackers, 2)
        slow = lambda _id, _n: (200, 0.03, {})  # noqa: E731 - work to be killed in the middle of
        everything, only_g1, t0_exits = receivers(1, respond=slow), receivers(2), receivers(3)
        env.subscribe(everything)
        env.subscribe(only_g1, geofence_ids=[g1])
        env.subscribe(t0_exits, tracker_ids=["T0"], kinds=["exit"])
        events = timeline(trackers, [g1, g2], START, 8)  # 32 events
        payloads = env.write_events(events)
        random.Random(5).shuffle(payloads)  # exits often ahead of their enters
        env.pipeline()
        await env.publish(payloads)

        def spawn(name: str) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", "ops.cli", "worker", "notify", "--consumer", name],
                cwd=ROOT,
                env=env.env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        procs = [spawn("w1"), spawn("w2")]
        try:
            for round_, victim in enumerate((0, 1)):
                goal = 8 * (round_ + 1)
                await wait_for(lambda g=goal: len(everything.accepted_ids()) >= g, 60, "progress")
                os.kill(procs[victim].pid, signal.SIGKILL)
                procs[victim].wait(10)
                procs[victim] = spawn(f"w{victim + 1}x")  # a new name: the old one's are claimed
            want = {
                everything.url: ids(events),
                only_g1.url: ids([e for e in events if e[1] == g1]),
                t0_exits.url: ids([e for e in events if e[0] == "T0" and e[3] == "exit"]),
            }
            for r in (everything, only_g1, t0_exits):
                await wait_for(lambda r=r: r.accepted_ids() == want[r.url], 90, "all delivered")
            await wait_for(lambda: set(env.states().values()) == {"delivered"}, 30, "settled")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for r in (everything, only_g1, t0_exits):
            assert r.accepted_ids() == want[r.url]  # nothing lost, nothing foreign
            assert all(x.valid for x in r.log), "every request verifies"
            assert_in_order(r, events)
            repeats = len(r.accepted()) - len(r.accepted_ids())
            print(f"\n{r.url}: {len(r.accepted_ids())} events, {repeats} repeats (same id)")
            # a worker killed between a 2xx and recording it re-sends that one (same id)
            assert repeats <= 2 * env.app.notify_endpoint_concurrency, repeats
        assert len(env.states()) == sum(len(w) for w in want.values())
        assert await env.dead_letters() == []
    finally:
        await env.aclose()


async def test_a_500_for_ever_is_dead_lettered_with_status_and_body_then_redriven(
    redis_server, tmp_path, unique_prefix, receivers, caplog
):
    caplog.set_level(logging.DEBUG)
    target = RedisTarget(redis_server.url, False)
    env = Env(target, unique_prefix, f"sqlite:///{tmp_path}/n.db", notify_max_attempts=3)
    healthy = False
    failing = receivers(respond=lambda _id, _n: (200 if healthy else 500, 0.0, {}))
    fine = receivers(2)
    try:
        (g,) = env.seed(["A"], 1)
        sub = env.subscribe(failing)
        other = env.subscribe(fine)
        events = [("A", g, START, "enter")]
        await env.publish(env.write_events(events))
        pipeline = env.pipeline()
        w = pipeline.worker(topology.NOTIFY, consumer="n1")
        tasks = await running(w)
        dead: list[Any] = []

        async def dead_lettered() -> bool:
            dead[:] = await env.dead_letters()
            return bool(dead)

        await wait_for(dead_lettered, 30, "a dead letter")
        assert len(dead) == 1
        assert "HTTP 500" in dead[0].error and "no thanks (500)" in dead[0].error
        assert "after 3 attempts" in dead[0].error
        assert [a["status"] for a in env.attempts(sub)] == [500, 500, 500]
        assert len(failing.log) == 3
        assert fine.accepted_ids() == ids(events)  # the other endpoint was not held back
        eid = expected_id(*events[0])
        assert env.states()[(eid, sub)] == "dead"

        healthy = True
        await DeadLetters(env.pipelines[0].client, env.keys()).redrive([dead[0].id])
        await wait_for(lambda: failing.accepted_ids() == {eid}, 20, "redriven delivery")
        await wait_for(lambda: env.states()[(eid, sub)] == "delivered", 10, "recorded")
        assert len(fine.accepted()) == 1, "a delivered endpoint is not sent the redrive"
        assert env.states()[(eid, other)] == "delivered"
        await stop([w], tasks)
        registry = pipeline.registry

        def metric(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, {"subscription": str(sub), **labels})

        assert metric("trackstream_webhook_failures_total", kind="retry") == 2
        assert metric("trackstream_webhook_failures_total", kind="dead") == 1
        assert metric("trackstream_webhook_deliveries_total") == 1  # the redriven one
        assert metric("trackstream_webhook_latency_seconds_count") == 4
        for secret in (failing.secret, fine.secret):
            assert secret not in caplog.text and secret[6:] not in caplog.text
    finally:
        await env.aclose()


async def test_410_ends_only_its_subscription_and_disables_it(
    redis_server, tmp_path, unique_prefix, receivers
):
    """One endpoint answers 410 Gone: its delivery ends after one attempt and its
    subscription is disabled with the reason; the other subscriber of the same event
    gets it, and nothing is dead-lettered."""
    target = RedisTarget(redis_server.url, False)
    env = Env(target, unique_prefix, f"sqlite:///{tmp_path}/n.db", notify_max_attempts=5)
    gone = receivers(respond=lambda _id, _n: (410, 0.0, {}))
    fine = receivers(2)
    try:
        (g,) = env.seed(["A"], 1)
        sub = env.subscribe(gone)
        other = env.subscribe(fine)
        events = [("A", g, START, "enter")]
        await env.publish(env.write_events(events))
        w = env.pipeline().worker(topology.NOTIFY, consumer="n1")
        tasks = await running(w)
        await wait_for(lambda: fine.accepted_ids() == ids(events), 20, "the other endpoint")
        await wait_for(lambda: w.handled >= 1, 20, "the entry acked")
        later = [("A", g, START + timedelta(minutes=1), "exit")]
        await env.publish(env.write_events(later))
        await wait_for(lambda: fine.accepted_ids() == ids(events + later), 20, "later event")
        await stop([w], tasks)
        assert await env.dead_letters() == []
        assert len(gone.log) == 1, "no retries, nothing after the 410"
        assert [a["status"] for a in env.attempts(sub)] == [410]
        eid = expected_id(*events[0])
        assert env.states()[(eid, sub)] == "dead"
        assert env.states()[(eid, other)] == "delivered"
        rows = {r["id"]: r for r in env.db.run_sync(webhook_store.subscription_rows, True)}
        assert rows[sub]["active"] is False and "410" in rows[sub]["disabled_reason"]
        assert rows[other]["active"] is True
    finally:
        await env.aclose()


async def test_rate_per_endpoint_holds_across_two_workers(
    redis_server, tmp_path, unique_prefix, receivers
):
    """120/min (one per 0.5 s) for one endpoint, two workers with their own Redis
    clients: the requests are spaced by the shared limiter, not per worker."""
    target = RedisTarget(redis_server.url, False)
    env = Env(
        target, unique_prefix, f"sqlite:///{tmp_path}/n.db", notify_rate_per_min=120, batch_size=2
    )
    limited, free = receivers(1), receivers(2)
    try:
        trackers = [f"T{i}" for i in range(8)]
        (g,) = env.seed(trackers, 1)
        env.subscribe(limited)
        env.subscribe(free, kinds=["exit"])  # nothing for it: another endpoint's own budget
        events = [(t, g, START, "enter") for t in trackers]
        await env.publish(env.write_events(events))
        workers = [env.pipeline().worker(topology.NOTIFY, consumer=f"n{i}") for i in (1, 2)]
        tasks = await running(*workers)
        await wait_for(lambda: limited.accepted_ids() == ids(events), 30, "all delivered")
        await stop(workers, tasks)
        assert all(w.handled > 0 for w in workers), "both workers delivered"
        times = sorted(r.at for r in limited.accepted())
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # slots are 0.5 s apart; arrivals carry some send noise (a first connection)
        assert min(gaps) >= 0.25, gaps
        assert (times[-1] - times[0]) / len(gaps) >= 0.5 * 0.95, gaps
    finally:
        await env.aclose()


@pytest.mark.timeout(90)
async def test_a_slow_receiver_does_not_hold_up_the_others(
    redis_server, tmp_path, unique_prefix, receivers
):
    target = RedisTarget(redis_server.url, False)
    env = Env(target, unique_prefix, f"sqlite:///{tmp_path}/n.db", notify_timeout_s=20)
    slow = receivers(1, respond=lambda _id, _n: (200, 10.0, {}))
    fast = receivers(2)
    try:
        trackers = [f"T{i}" for i in range(4)]
        (g,) = env.seed(trackers, 1)
        env.subscribe(slow, kinds=["enter"])  # 4 requests, all at once (concurrency 4)
        env.subscribe(fast)
        first = [(t, g, START, "enter") for t in trackers]
        w = env.pipeline().worker(topology.NOTIFY, consumer="n1", concurrency=4)
        tasks = await running(w)
        await env.publish(env.write_events(first))
        await wait_for(lambda: fast.accepted_ids() == ids(first), 5, "the fast endpoint")
        # and later events keep flowing to it while the slow one is still busy
        later = [(t, g, START + timedelta(minutes=1), "exit") for t in trackers]
        begun = time.monotonic()
        await env.publish(env.write_events(later))
        await wait_for(lambda: fast.accepted_ids() == ids(first + later), 5, "later events")
        assert time.monotonic() - begun < 5
        assert slow.accepted_ids() == set(), "the slow endpoint has not answered yet"
        await wait_for(lambda: slow.accepted_ids() == ids(first), 30, "the slow one")
        assert all(r.at - begun >= 5 for r in slow.accepted()), "it did take 10 s"
        await stop([w], tasks)
    finally:
        await env.aclose()


async def test_a_replay_guarding_receiver_accepts_every_delivery(
    redis_server, tmp_path, unique_prefix, receivers
):
    """The receiver rejects timestamps more than 5 minutes off. Events were observed
    hours ago and every first attempt gets a 503 with Retry-After: each attempt is
    signed with its own fresh timestamp, so every delivery is accepted."""
    target = RedisTarget(redis_server.url, False)
    env = Env(target, unique_prefix, f"sqlite:///{tmp_path}/n.db", notify_breaker_failures=50)
    guard = receivers(
        respond=lambda _id, n: (503, 0.0, {"retry-after": "1"}) if n == 0 else (200, 0.0, {}),
        replay_window_s=300,
    )
    try:
        trackers = [f"T{i}" for i in range(3)]
        (g,) = env.seed(trackers, 1)
        sub = env.subscribe(guard)
        events = timeline(trackers, [g], START, 2)
        await env.publish(env.write_events(events))
        w = env.pipeline().worker(topology.NOTIFY, consumer="n1")
        tasks = await running(w)
        await wait_for(lambda: guard.accepted_ids() == ids(events), 30, "all accepted")
        await stop([w], tasks)
        assert {r.status for r in guard.log} == {503, 200}, "no 400 (stale) nor 401 (bad sig)"
        assert all(abs(time.time() - r.stamp) < 60 for r in guard.log)
        by_id: dict[str, list[float]] = {}
        for r in guard.log:
            by_id.setdefault(r.msg_id, []).append(r.at)
        assert all(b - a >= 0.9 for a, b in by_id.values()), "Retry-After: 1 was honoured"
        assert_in_order(guard, events)
        assert len(env.attempts(sub)) == 2 * len(events)
    finally:
        await env.aclose()


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_a_receiver_down_for_two_minutes_loses_nothing(
    redis_server, tmp_path, unique_prefix, receivers
):
    """Down for 120 s (connection refused), back within the retry window: everything
    arrives after it returns, in order, and nothing is dead-lettered."""
    target = RedisTarget(redis_server.url, False)
    env = Env(
        target,
        unique_prefix,
        f"sqlite:///{tmp_path}/n.db",
        notify_retry_base_s=1,
        notify_retry_max_s=10,
        notify_max_attempts=30,  # a window of at least 0.5 * (1+2+4+8+10*26) s > 2 min
        notify_breaker_failures=3,
        notify_breaker_reset_s=5,
    )
    down = receivers()
    down.stop()
    try:
        trackers = [f"T{i}" for i in range(3)]
        (g,) = env.seed(trackers, 1)
        sub = env.subscribe(down)
        events = timeline(trackers, [g], START, 4)
        await env.publish(env.write_events(events))
        w = env.pipeline().worker(topology.NOTIFY, consumer="n1")
        tasks = await running(w)
        went_down = time.monotonic()
        await wait_for(lambda: len(env.attempts(sub)) >= 3, 30, "failed attempts")
        await asyncio.sleep(max(0.0, 120 - (time.monotonic() - went_down)))  # the outage
        assert env.states() and set(env.states().values()) == {"pending"}
        down.start()
        back = time.monotonic()
        await wait_for(lambda: down.accepted_ids() == ids(events), 60, "delivered after it is back")
        took = time.monotonic() - back
        await stop([w], tasks)
        assert await env.dead_letters() == []
        assert_in_order(down, events)
        failed = [a for a in env.attempts(sub) if a["status"] is None]
        assert failed and all("ConnectError" in a["error"] for a in failed)
        print(
            f"\nreceiver down 120 s: {len(failed)} failed attempts; all {len(events)} "
            f"delivered {took:.1f} s after it came back"
        )
    finally:
        await env.aclose()


async def test_two_subscriptions_to_one_url_share_its_limit_and_batches_carry_many(
    redis_server, tmp_path, unique_prefix, receivers
):
    """Two subscriptions to one URL (one of them batched, 5 events a request) at
    120/min for the origin: requests to it are spaced by one shared limit, and every
    event arrives, each with its own id, signed."""
    target = RedisTarget(redis_server.url, False)
    env = Env(
        target,
        unique_prefix,
        f"sqlite:///{tmp_path}/n.db",
        notify_rate_per_min=120,
        notify_max_rate_wait_s=0.4,  # a backlog waits for its slots: batches form
        batch_size=20,
    )
    shared = receivers(1)
    try:
        trackers = [f"T{i}" for i in range(6)]
        (g,) = env.seed(trackers, 1)
        env.subscribe(shared)
        env.subscribe(shared, batch_max=5)  # the same URL and secret
        events = [(t, g, START, "enter") for t in trackers]
        await env.publish(env.write_events(events))
        w = env.pipeline().worker(topology.NOTIFY, consumer="n1")
        tasks = await running(w)

        def arrived() -> set[str]:
            got = set()
            for r in shared.accepted():
                data = r.body["data"]
                got |= {d["id"] for d in data} if isinstance(data, list) else {data["id"]}
            return got

        await wait_for(lambda: arrived() == ids(events), 30, "all delivered")
        await wait_for(lambda: set(env.states().values()) == {"delivered"}, 10, "recorded")
        await stop([w], tasks)
        assert all(r.valid for r in shared.log)
        batched = [r for r in shared.accepted() if r.body["type"] == "geofence.batch"]
        assert batched and max(len(r.body["data"]) for r in batched) > 1
        times = sorted(r.at for r in shared.log)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # one limit (a slot every 0.5 s) for both subscriptions; arrivals carry send noise
        assert (times[-1] - times[0]) / len(gaps) >= 0.5 * 0.95, gaps
        assert all(sum(1 for t in times if s <= t < s + 1.0) <= 3 for s in times), gaps
        carried = sum(
            len(r.body["data"]) if isinstance(r.body["data"], list) else 1
            for r in shared.accepted()
        )
        assert carried == 2 * len(events), "each event once per subscription"
    finally:
        await env.aclose()
