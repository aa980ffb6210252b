"""The streams runtime against real Redis: every test runs on a standalone server and a
3-master cluster (the ``redis_target`` fixture)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from streams.connection import connect
from streams.consumer import Consumer
from streams.deadletter import DeadLetters
from streams.errors import GroupMissing, Reject
from streams.keys import StageKeys
from streams.message import Codec
from streams.metrics import StreamMetrics
from streams.monitor import stage_status
from streams.parse import entry_ms
from streams.producer import Producer, Route
from streams.replay import replay_copy, replay_rewind
from streams.retention import safe_trim
from streams.worker import Worker
from tests.conftest import RedisTarget
from tests.support import Ping, fast_settings, run_until, wait_for


@pytest.fixture
async def env(redis_target, unique_prefix):
    settings = fast_settings(redis_target, unique_prefix)
    client = connect(settings)
    codec = Codec([Ping])
    route = Route(unique_prefix, "work")
    yield settings, client, codec, route
    await client.aclose()


async def publish(client, codec, route, numbers):
    return await Producer(client, codec).publish(route, [Ping(n=n) for n in numbers])


async def pending_of(client, keys, consumer=None):
    rows = await client.xpending_range(
        keys.stream, keys.group, min="-", max="+", count=10_000, consumername=consumer
    )
    return len(rows)


async def test_every_entry_handled_once_and_acked(env):
    settings, client, codec, route = env
    await publish(client, codec, route, range(500))
    seen = Counter()

    async def handle(msg, ctx):
        seen[msg.payload.n] += 1

    worker = Worker(client, settings.with_(concurrency=8), route, codec, handler=handle)
    await worker.run(burst=True)
    assert sorted(seen) == list(range(500))
    assert set(seen.values()) == {1}
    assert await pending_of(client, route.keys()) == 0
    status = await stage_status(client, route.keys())
    assert (status.length, status.lag, status.pending, status.dead_letters) == (500, 0, 0, 0)


async def test_handler_publishes_downstream_before_ack(env):
    settings, client, codec, route = env
    nxt = Route(route.prefix, "next")
    await publish(client, codec, route, range(50))

    async def forward(batch, ctx):
        for m in batch:
            ctx.publish(nxt, Ping(n=m.payload.n * 2))

    await Worker(client, settings, route, codec, batch_handler=forward).run(burst=True)
    out = await client.xrange(nxt.keys().stream)
    assert sorted(codec.decode(f).payload.n for _, f in out) == [n * 2 for n in range(50)]


async def test_poison_goes_to_dead_letters_after_exactly_max_deliveries(env):
    settings, client, codec, route = env
    settings = settings.with_(max_deliveries=4)
    await publish(client, codec, route, range(20))
    calls = Counter()

    async def handle(msg, ctx):
        calls[msg.payload.n] += 1
        if msg.payload.n == 13:
            raise RuntimeError("always fails")

    metrics = StreamMetrics(CollectorRegistry())
    await Worker(client, settings, route, codec, handler=handle, middleware=[metrics]).run(
        burst=True
    )
    assert calls[13] == 4
    assert all(calls[n] == 1 for n in range(20) if n != 13)
    letters = await DeadLetters(client, route.keys()).list()
    assert len(letters) == 1
    (letter,) = letters
    assert letter.category == "max-deliveries"
    assert letter.attempts == 4
    assert "always fails" in letter.error
    assert codec.decode(letter.fields).payload.n == 13
    assert letter.origin == route.keys().stream and letter.group == "work"
    assert await pending_of(client, route.keys()) == 0
    assert metrics.retried.labels("work")._value.get() == 3
    assert metrics.dead_lettered.labels("work", "max-deliveries")._value.get() == 1


@pytest.mark.parametrize(
    ("fields", "category"),
    [
        ({"junk": "x"}, "decode"),
        ({"type": "test.ping", "v": "1", "msg_id": "m", "data": "{not json"}, "decode"),
        ({"type": "nope", "v": "1", "msg_id": "m", "data": "{}"}, "decode"),
        ({"type": "test.ping", "v": "1", "msg_id": "m", "data": '{"n": "x"}'}, "validation"),
        ({"type": "test.ping", "v": "1", "msg_id": "m", "data": '{"n": 1, "z": 2}'}, "validation"),
    ],
)
async def test_bad_entries_dead_lettered_at_once_and_stream_flows(env, fields, category):
    settings, client, codec, route = env
    await publish(client, codec, route, [1])
    await client.xadd(route.keys().stream, fields)
    await publish(client, codec, route, [2])
    seen = []

    async def handle(msg, ctx):
        seen.append(msg.payload.n)

    await Worker(client, settings, route, codec, handler=handle).run(burst=True)
    assert seen == [1, 2]
    (letter,) = await DeadLetters(client, route.keys()).list()
    assert letter.category == category
    assert letter.attempts == 1
    assert {k.decode(): v.decode() for k, v in letter.fields.items()} == fields


async def test_reject_and_timeout_categories(env):
    settings, client, codec, route = env
    settings = settings.with_(max_deliveries=2, handler_timeout_ms=100, claim_idle_ms=1_000)
    await publish(client, codec, route, [1, 2, 3])

    async def handle(msg, ctx):
        if msg.payload.n == 1:
            raise Reject("bad tracker")
        if msg.payload.n == 2:
            await asyncio.sleep(10)

    await Worker(client, settings, route, codec, handler=handle).run(burst=True)
    letters = {
        codec.decode(x.fields).payload.n: x for x in await DeadLetters(client, route.keys()).list()
    }
    assert letters[1].category == "handler" and "bad tracker" in letters[1].error
    assert letters[1].attempts == 1
    assert letters[2].category == "timeout" and letters[2].attempts == 2
    assert 3 not in letters


async def test_redrive_brings_a_dead_letter_back_once_and_purge(env):
    settings, client, codec, route = env
    settings = settings.with_(max_deliveries=1)
    await publish(client, codec, route, [1, 2])
    broken = {1}
    seen = []

    async def handle(msg, ctx):
        if msg.payload.n in broken:
            raise RuntimeError("downstream down")
        seen.append(msg.payload.n)

    await Worker(client, settings, route, codec, handler=handle).run(burst=True)
    dlq = DeadLetters(client, route.keys())
    (letter,) = await dlq.list()
    broken.clear()  # the cause is fixed
    first = await dlq.redrive([letter.id])
    again = await dlq.redrive([letter.id])
    assert first[letter.id] is not None and again[letter.id] is None
    await Worker(client, settings, route, codec, handler=handle).run(burst=True)
    assert sorted(seen) == [1, 2]
    assert await dlq.count() == 0

    await client.xadd(route.keys().stream, {"junk": "1"})
    await client.xadd(route.keys().stream, {"junk": "2"})
    await Worker(client, settings, route, codec, handler=handle).run(burst=True)
    letters = await dlq.list(category="decode")
    assert len(letters) == 2
    assert await dlq.purge([letters[0].id]) == 1
    assert await dlq.purge() == 1
    assert await dlq.count() == 0


async def test_replay_by_copy_and_by_rewind_from_id_and_time(env):
    settings, client, codec, route = env
    ids = await publish(client, codec, route, range(10))
    seen = []

    async def handle(msg, ctx):
        seen.append(msg.payload.n)

    await Worker(client, settings, route, codec, handler=handle).run(burst=True)
    keys = route.keys()

    dry = await replay_copy(client, keys, ids[6], dry_run=True)
    assert dry.count == 4 and dry.dry_run
    seen.clear()
    result = await replay_copy(client, keys, ids[6], ids[8])
    assert result.count == 3
    await Worker(client, settings, route, codec, handler=handle).run(burst=True)
    assert sorted(seen) == [6, 7, 8]

    seen.clear()
    await replay_rewind(client, keys, ids[7])
    await Worker(client, settings, route, codec, handler=handle).run(burst=True)
    assert sorted(seen) == [6, 7, 7, 8, 8, 9]  # 7..9 then the three copies

    # by time: the entries stamped at or after a moment (an entry id is its arrival ms)
    new_ids = await publish(client, codec, route, [100, 101])
    seen.clear()
    await Worker(client, settings, route, codec, handler=handle).run(burst=True)
    assert sorted(seen) == [100, 101]
    at = datetime.fromtimestamp(entry_ms(new_ids[0]) / 1000, UTC)
    expected = sorted(
        codec.decode(f).payload.n
        for _, f in await client.xrange(keys.stream, min=f"{entry_ms(new_ids[0])}-0")
    )
    assert {100, 101} <= set(expected)
    seen.clear()
    dry = await replay_rewind(client, keys, at, dry_run=True)
    assert dry.count == len(expected)
    await replay_rewind(client, keys, at)
    await Worker(client, settings, route, codec, handler=handle).run(burst=True)
    assert sorted(seen) == expected


async def test_graceful_shutdown_leaves_nothing_pending_for_the_stopped_consumer(env):
    """Stop mid-batch: in-flight handlers get shutdown_grace_ms, then are interrupted;
    what finished is acked, the rest handed back, nothing lost. An interruption by the
    shutdown is not the entry's failure: the hand-back spends no delivery (attempt 0)."""
    import time

    settings, client, codec, route = env
    settings = settings.with_(batch_size=50, concurrency=1, shutdown_grace_ms=100)
    await publish(client, codec, route, range(200))
    started = asyncio.Event()
    seen = Counter()

    async def slow(msg, ctx):
        started.set()
        await asyncio.sleep(0.2)
        seen[msg.payload.n] += 1

    worker = Worker(client, settings, route, codec, handler=slow, consumer="slowpoke")
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 10)
    stop_at = time.monotonic()
    worker.stop()  # the batch needs 50 x 0.2 s = 10 s; the grace is 0.1 s
    await asyncio.wait_for(task, 10)
    assert time.monotonic() - stop_at < 5, "the grace period bounds the shutdown"
    finished = set(seen)
    assert len(finished) < 50
    keys = route.keys()
    assert await pending_of(client, keys, "slowpoke") == 0
    names = [c["name"] for c in await client.xinfo_consumers(keys.stream, keys.group)]
    assert b"slowpoke" not in names

    attempts = {}

    async def fast(msg, ctx):
        seen[msg.payload.n] += 1
        attempts[msg.payload.n] = msg.envelope.attempt

    await Worker(client, settings, route, codec, handler=fast).run(burst=True)
    assert sorted(seen) == list(range(200))  # nothing lost
    assert all(seen[n] == 1 for n in finished), "finished work was acked, not redone"
    assert all(a == 0 for a in attempts.values()), attempts
    handed_back = set(range(50)) - finished  # re-added: one new entry each
    # plus the next batch, if the consumer had read it ahead before the stop
    assert await client.xlen(keys.stream) - 200 in (len(handed_back), len(handed_back) + 50)
    assert await pending_of(client, keys) == 0


async def test_a_batch_read_ahead_and_never_handled_is_handed_back_spending_nothing(env):
    """While a batch is handled the consumer reads the next one. Stopped before it got
    to that batch, it hands it back spending no delivery (attempt 0), and the batch in
    hand is finished and acked."""
    settings, client, codec, route = env
    settings = settings.with_(batch_size=10, concurrency=10, shutdown_grace_ms=5_000)
    keys = route.keys()
    await publish(client, codec, route, range(30))
    release = asyncio.Event()
    handled = []

    async def held(msg, ctx):
        await release.wait()
        handled.append(msg.payload.n)

    worker = Worker(client, settings, route, codec, handler=held, consumer="ahead")
    task = asyncio.create_task(worker.run())

    async def read_ahead() -> bool:  # the batch in hand and the next one
        try:
            return await pending_of(client, keys, "ahead") == 20
        except GroupMissing:  # not created yet
            return False

    await wait_for(read_ahead, 10, "the next batch read ahead")
    worker.stop()
    release.set()
    await asyncio.wait_for(task, 10)
    assert sorted(handled) == list(range(10)), "the batch in hand was finished"
    assert await pending_of(client, keys) == 0
    assert await client.xlen(keys.stream) == 40, "the read-ahead batch re-added"
    assert not await client.exists(keys.deferrals)

    seen = {}

    async def fast(msg, ctx):
        seen[msg.payload.n] = (msg.envelope.attempt, msg.deliveries)

    await Worker(client, settings, route, codec, handler=fast).run(burst=True)
    assert sorted(seen) == list(range(10, 30))
    assert set(seen.values()) == {(0, 1)}, seen


async def test_a_closed_gate_reads_nothing_and_spends_no_delivery(env):
    """A stage whose dependency is down holds at its gate: entries stay undelivered
    (no delivery counted) until it opens; stopping while it is closed is prompt."""
    settings, client, codec, route = env
    keys = route.keys()
    await publish(client, codec, route, range(20))
    is_open = asyncio.Event()
    waiting = asyncio.Event()

    async def gate():
        waiting.set()
        await is_open.wait()

    deliveries = {}

    async def handle(msg, ctx):
        deliveries[msg.payload.n] = msg.deliveries

    worker = Worker(client, settings, route, codec, handler=handle, gate=gate)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(waiting.wait(), 10)
    info = await client.xinfo_groups(keys.stream)
    assert info[0]["pending"] == 0 and info[0]["lag"] == 20, "nothing read while closed"
    is_open.set()
    await wait_for(lambda: len(deliveries) == 20, what="entries after the gate opened")
    assert set(deliveries.values()) == {1}
    is_open.clear()
    waiting.clear()
    await asyncio.wait_for(waiting.wait(), 10)  # back at the gate after its last read
    await publish(client, codec, route, [99])
    worker.stop()
    await asyncio.wait_for(task, 5)
    assert 99 not in deliveries
    assert (await client.xinfo_groups(keys.stream))[0]["lag"] == 1
    assert await client.xinfo_consumers(keys.stream, keys.group) == []


async def test_group_deleted_under_a_running_consumer_is_recreated(env):
    settings, client, codec, route = env
    seen = set()

    async def handle(msg, ctx):
        seen.add(msg.payload.n)

    metrics = StreamMetrics(CollectorRegistry())
    worker = Worker(client, settings, route, codec, handler=handle, middleware=[metrics])
    task = asyncio.create_task(worker.run())
    await publish(client, codec, route, [1])
    await wait_for(lambda: 1 in seen, what="first entry")
    keys = route.keys()
    await client.xgroup_destroy(keys.stream, keys.group)
    await publish(client, codec, route, [2, 3])
    await wait_for(lambda: {2, 3} <= seen, what="entries after the group was deleted")
    worker.stop()
    await asyncio.wait_for(task, 10)
    assert metrics.recreated.labels("work")._value.get() >= 1


async def test_restarted_consumer_rereads_its_own_pending_first(env):
    settings, client, codec, route = env
    keys = route.keys()
    await publish(client, codec, route, range(5))
    await Consumer(client, settings, keys, codec, name="w1", handler=_noop)._start()
    # a crash right after reading: delivered to w1, never acked
    await client.xreadgroup(keys.group, "w1", {keys.stream: ">"}, count=3)
    await publish(client, codec, route, range(5, 8))
    order = []

    async def handle(msg, ctx):
        order.append((msg.payload.n, msg.deliveries))

    await Worker(client, settings, route, codec, handler=handle, consumer="w1").run(burst=True)
    assert [n for n, _ in order[:3]] == [0, 1, 2]
    assert all(d >= 2 for _, d in order[:3])
    assert sorted(n for n, _ in order) == list(range(8))


async def test_idle_entries_of_a_dead_consumer_are_claimed_and_it_is_removed(env):
    settings, client, codec, route = env
    keys = route.keys()
    await publish(client, codec, route, range(30))
    await Consumer(client, settings, keys, codec, name="ghost", handler=_noop)._start()
    await client.xreadgroup(keys.group, "ghost", {keys.stream: ">"}, count=30)
    seen = Counter()

    async def handle(msg, ctx):
        seen[msg.payload.n] += 1

    metrics = StreamMetrics(CollectorRegistry())
    worker = Worker(client, settings, route, codec, handler=handle, middleware=[metrics])

    async def ghost_gone():
        names = {c["name"] for c in await client.xinfo_consumers(keys.stream, keys.group)}
        return len(seen) == 30 and b"ghost" not in names

    await run_until(worker, ghost_gone, what="claiming and dead-consumer cleanup")
    assert set(seen.values()) == {1}
    assert metrics.claimed.labels("work")._value.get() == 30


async def test_safe_trim_never_removes_unacknowledged_entries(env):
    settings, client, codec, route = env
    keys = route.keys()
    ids = await publish(client, codec, route, range(20))
    await Consumer(client, settings, keys, codec, name="slow", handler=_noop)._start()
    await client.xreadgroup(keys.group, "slow", {keys.stream: ">"}, count=10)
    await client.xack(keys.stream, keys.group, *ids[:5])  # 5..9 pending, 10..19 not delivered
    result = await safe_trim(client, keys.stream)
    assert result.min_id == ids[5] and result.removed == 5
    left = [i.decode() for i, _ in await client.xrange(keys.stream)]
    assert left == ids[5:]
    # a second group that has read nothing pins everything
    await client.xgroup_create(keys.stream, "audit", id="0")
    assert (await safe_trim(client, keys.stream)).removed == 0
    assert await client.xlen(keys.stream) == 15


async def test_stage_keys_share_a_slot(redis_target, unique_prefix):
    settings = fast_settings(redis_target, unique_prefix)
    client = connect(settings)
    try:
        for stage in ("scheduler", "fetch", "geocode", "geofence", "view-refresh"):
            for shard in range(3 if stage == "geocode" else 1):
                k = StageKeys(unique_prefix, stage, shard, 3 if stage == "geocode" else 1)
                own = {
                    await client.cluster_keyslot(key) if redis_target.cluster else _slot(key)
                    for key in (k.stream, k.priority, k.dlq, k.heartbeats, k.redriven, k.lease("c"))
                }
                assert len(own) == 1, f"{stage} keys span slots {own}"
    finally:
        await client.aclose()


# the key map in streams/keys.py: stage -> (slot, master by slot range on a default
# 3-master `redis-cli --cluster create` split: 0 = 0-5460, 1 = 5461-10922, 2 = the rest)
PLACEMENT = {
    "fetch": (1745, 0),
    "scheduler": (5398, 0),
    "geocode": (8387, 1),
    "view-refresh": (9757, 1),
    "geofence": (11589, 2),
}


async def test_stages_spread_over_three_masters(redis_cluster, unique_prefix):
    """CLUSTER KEYSLOT and CLUSTER SLOTS of a real 3-master cluster (made by
    ``redis-cli --cluster create``): the four stages sit on all three masters, as the
    key map says."""
    client = connect(fast_settings(RedisTarget(redis_cluster.url, True), unique_prefix))
    try:
        await client.initialize()
        slots = await client.cluster_slots(target_nodes=client.get_random_node())
        ranges = sorted((lo, hi, "{}:{}".format(*v["primary"])) for (lo, hi), v in slots.items())
        assert [(lo, hi) for lo, hi, _ in ranges] == [(0, 5460), (5461, 10922), (10923, 16383)]
        masters = {}
        for stage, (slot, index) in PLACEMENT.items():
            assert await client.cluster_keyslot(Route(unique_prefix, stage).keys().stream) == slot
            lo, hi, master = ranges[index]
            assert lo <= slot <= hi
            masters[stage] = master
        assert len({masters[s] for s in ("fetch", "geocode", "geofence", "view-refresh")}) == 3
    finally:
        await client.aclose()


async def _noop(msg, ctx):
    return None


def _slot(key: str) -> int:
    from redis.crc import key_slot

    return key_slot(key.encode())


async def test_a_restarted_worker_takes_its_old_name_back(env):
    """Names are ``{host}-{n}``: a lease held by a live process, or by another worker of
    this process, keeps its name; one left by a dead process on this host, or by a
    predecessor with our own pid (a container restart), is taken over."""
    import os
    import socket
    import subprocess
    import sys

    settings, client, codec, route = env
    keys = route.keys()
    host = socket.gethostname()
    prefix = host.lower().split(".")[0][:30]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    try:
        ttl = settings.consumer_dead_after_ms * 10
        await client.set(keys.lease(f"{prefix}-0"), f"{host}:{sleeper.pid}:1", px=ttl)
        await client.set(keys.lease(f"{prefix}-1"), f"{host}:{dead.pid}:1", px=ttl)
        await client.set(keys.lease(f"{prefix}-2"), f"{host}:{os.getpid()}:1", px=ttl)
        workers = [Worker(client, settings, route, codec, handler=_noop) for _ in range(3)]
        for w in workers:  # burst on an empty stream: takes a name, returns, keeps it
            await w.run(burst=True)
        assert [w.name for w in workers] == [f"{prefix}-1", f"{prefix}-2", f"{prefix}-3"]
    finally:
        sleeper.kill()
        sleeper.wait(10)


async def test_defer_redelivers_without_counting_a_delivery(env):
    """Defer (a dependency's circuit is open) never dead-letters: the entry comes back
    with its delivery count unchanged, however often it is deferred."""
    from streams.errors import Defer

    settings, client, codec, route = env
    settings = settings.with_(max_deliveries=2)
    await publish(client, codec, route, [1])
    seen = []

    async def handle(msg, ctx):
        seen.append(msg.attempts)
        if len(seen) <= 5:
            raise Defer("circuit open", delay_ms=5)

    await Worker(client, settings, route, codec, handler=handle).run(burst=True)
    assert seen == [1] * 6
    assert not await client.exists(route.keys().deferrals), "the count goes with the ack"
    assert await DeadLetters(client, route.keys()).count() == 0
    assert await pending_of(client, route.keys()) == 0


async def test_a_shared_rate_limit_holds_across_clients(redis_target, unique_prefix):
    """Two clients (two processes) share one GCRA key: together they get the burst at
    once, then one slot per interval, in the order they asked."""
    from streams.keys import StageKeys
    from streams.ratelimit import SharedRateLimiter

    settings = fast_settings(redis_target, unique_prefix)
    clients = [connect(settings), connect(settings)]
    try:
        key = StageKeys(unique_prefix, "fetch").ratelimit("api")
        limiters = [SharedRateLimiter(c, key, rate_per_s=2, burst=3) for c in clients]
        for c in clients:  # connected to the key's node before the clock starts
            await c.pttl(key)
        waits, asked_at = [], []
        start = time.monotonic()
        for i in range(8):
            asked_at.append(time.monotonic() - start)
            waits.append(await limiters[i % 2].reserve())
        assert waits[:3] == [0, 0, 0]
        for i in range(3, 8):  # slot i starts (i - 2) x 0.5 s after the first one
            assert abs(asked_at[i] + waits[i] - (i - 2) * 0.5) < 0.2, (waits, asked_at)
        assert 0 < await clients[0].pttl(key) <= 8 * 500 + 1000, "expires once idle"
        with pytest.raises(ValueError):
            SharedRateLimiter(clients[0], key, rate_per_s=0)
    finally:
        for c in clients:
            await c.aclose()


async def test_status_counts_the_lag_itself_when_redis_reports_it_unknown(env):
    """After an XDEL past the group's position Redis reports lag as null; the status
    counts the undelivered entries instead (and says the figure is exact)."""
    from streams.monitor import stream_status

    settings, client, codec, route = env
    keys = route.keys()
    ids = await publish(client, codec, route, range(6))
    await Consumer(client, settings, keys, codec, name="w", handler=_noop)._start()
    await client.xreadgroup(keys.group, "w", {keys.stream: ">"}, count=2)
    await client.xdel(keys.stream, ids[3])
    assert (await client.xinfo_groups(keys.stream))[0]["lag"] is None
    st = await stage_status(client, keys)
    assert (st.lag, st.pending) == (3, 2)
    main = await stream_status(client, keys.stream, keys.group, now_ms=0)
    assert main.lag == 3 and main.lag_exact
    await publish(client, codec, route, range(1_100))  # counted in chunks of 500
    full = await stream_status(client, keys.stream, keys.group, now_ms=0)
    assert full.lag == 1_103 and full.lag_exact
    capped = await stream_status(client, keys.stream, keys.group, now_ms=0, lag_count_cap=500)
    assert capped.lag == 500 and not capped.lag_exact, "a capped count is a lower bound"
