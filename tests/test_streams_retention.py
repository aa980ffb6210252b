"""Automatic trimming (streams.trimmer) against a real Redis: stream lengths stay
bounded while workers run, and nothing a group has not acknowledged is ever cut."""

from __future__ import annotations

import asyncio

import pytest

from streams.connection import connect
from streams.consumer import Consumer
from streams.message import Codec
from streams.producer import Producer, Route
from streams.trimmer import Trimmer, last_trim
from streams.worker import Worker
from tests.support import Ping, fast_settings, wait_for


@pytest.fixture
async def env(redis_target, unique_prefix):
    settings = fast_settings(redis_target, unique_prefix, retention_ms=0, trim_interval_ms=50)
    client = connect(settings)
    yield settings, client, Codec([Ping]), Route(unique_prefix, "work")
    await client.aclose()


async def _noop(msg, ctx):
    return None


async def test_running_workers_keep_the_stream_bounded_and_lose_nothing(env):
    settings, client, codec, route = env
    keys = route.keys()
    seen: list[int] = []

    async def handle(msg, ctx):
        seen.append(msg.payload.n)

    workers = [Worker(client, settings, route, codec, handler=handle) for _ in range(2)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    producer = Producer(client, codec)
    total, lengths = 2_000, []
    try:
        for start in range(0, total, 100):
            await producer.publish(route, [Ping(n=n) for n in range(start, start + 100)])
            lengths.append(await client.xlen(keys.stream))
            await wait_for(lambda end=start + 100: len(seen) >= end, 10, "workers keeping up")
            # handled and acked: the next automatic trim cuts all but the last-read entry
            await wait_for(lambda: _len_at_most(client, keys.stream, 1), 5, "a trim")
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)
    assert sorted(seen) == list(range(total))  # nothing lost, nothing twice
    assert max(lengths) <= 101, lengths  # 2,000 published, never more than one batch held
    # one worker holds the trim lease; the other never trimmed
    removed = sorted(w.trimmer.removed for w in workers if w.trimmer)
    assert removed[0] == 0 and removed[1] >= total - 1
    state = await last_trim(client, keys)
    assert state is not None and state.by in {w.name for w in workers}


async def _len_at_most(client, stream, n):
    return await client.xlen(stream) <= n


async def test_trim_keeps_pending_and_undelivered_entries_of_every_group(env):
    settings, client, codec, route = env
    keys = route.keys()
    ids = await Producer(client, codec).publish(route, [Ping(n=n) for n in range(30)])
    await Consumer(client, settings, keys, codec, name="slow", handler=_noop)._start()
    await client.xgroup_create(keys.stream, "audit", id=ids[19])  # audit read up to 19
    await client.xreadgroup(keys.group, "slow", {keys.stream: ">"}, count=10)
    await client.xack(keys.stream, keys.group, *ids[:3], *ids[4:10])  # ids[3] stays pending
    trimmer = Trimmer(client, settings, [keys], owner="t")
    results = {r.stream: r for r in await trimmer.trim_once()}
    assert results[keys.stream].min_id == ids[3] and results[keys.stream].removed == 3
    left = [i.decode() for i, _ in await client.xrange(keys.stream)]
    assert left == ids[3:]
    # acked now: the cut moves to the stage's last-read entry (9, kept itself)
    await client.xack(keys.stream, keys.group, ids[3])
    await trimmer.trim_once()
    assert [i.decode() for i, _ in await client.xrange(keys.stream)] == ids[9:]
    # the stage reads everything: audit (at 19) pins the rest, its last-read entry kept
    await client.xreadgroup(keys.group, "slow", {keys.stream: ">"})
    await client.xack(keys.stream, keys.group, *ids[10:])
    await trimmer.trim_once()
    assert [i.decode() for i, _ in await client.xrange(keys.stream)] == ids[19:]


async def test_retention_keeps_recent_processed_entries(env):
    settings, client, codec, route = env
    keys = route.keys()
    await Producer(client, codec).publish(route, [Ping(n=n) for n in range(10)])
    await Worker(client, settings.with_(trim_interval_ms=0), route, codec, handler=_noop).run(
        burst=True
    )
    kept = Trimmer(client, settings.with_(retention_ms=3_600_000), [keys], owner="t")
    assert sum(r.removed for r in await kept.trim_once()) == 0
    assert await client.xlen(keys.stream) == 10
    assert sum(r.removed for r in await Trimmer(client, settings, [keys], "u").trim_once()) == 0
    await kept.release()  # until then, kept holds the lease: nobody else trims
    gone = Trimmer(client, settings, [keys], owner="t")
    assert sum(r.removed for r in await gone.trim_once()) == 9  # the last-read entry stays


def test_status_shows_the_retention_and_the_last_trims(redis_target, unique_prefix):
    import json

    from tests.test_cli_admin import cli, flat

    async def trim_geocode() -> None:
        settings = fast_settings(redis_target, unique_prefix, retention_ms=0)
        client = connect(settings)
        try:
            route = Route(unique_prefix, "geocode")
            await Producer(client, Codec([Ping])).publish(route, [Ping(n=1)])
            await Worker(client, settings, route, Codec([Ping]), handler=_noop).run(burst=True)
        finally:
            await client.aclose()

    asyncio.run(trim_geocode())
    args = ("status", "--no-require-consumers", "--no-database")
    report = json.loads(cli(redis_target, unique_prefix, *args, "--json").stdout)
    r = report["retention"]
    assert (r["retention_ms"], r["trim_interval_ms"], r["automatic"]) == (3_600_000, 60_000, True)
    shards = {s["stage"]: s for s in r["shards"]}
    assert shards["geocode"]["last_trim_age_ms"] is not None
    assert shards["fetch"]["last_trim_age_ms"] is None
    text = flat(cli(redis_target, unique_prefix, *args).stdout)
    assert "retention: processed entries kept 1h00m, trimmed every 1m00s by the workers" in text
    assert "never trimmed: fetch, geofence, view-refresh, notify" in text
    off = cli(redis_target, unique_prefix, *args, TRACKSTREAM_TRIM_INTERVAL_MS="0")
    assert "automatic trimming off" in flat(off.stdout)
