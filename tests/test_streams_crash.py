"""Crash recovery with a real worker process killed by SIGKILL mid-batch."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from streams.connection import connect
from streams.message import Codec
from streams.metrics import StreamMetrics
from streams.producer import Producer, Route
from streams.worker import Worker
from tests.support import Ping, fast_settings, run_until, wait_for

ROOT = Path(__file__).resolve().parent.parent
TOTAL = 400


async def test_sigkilled_worker_loses_nothing(redis_target, unique_prefix):
    settings = fast_settings(redis_target, unique_prefix)
    client = connect(settings)
    codec = Codec([Ping])
    route = Route(unique_prefix, "work")
    calls_key = f"{unique_prefix}:calls"
    await Producer(client, codec).publish(route, [Ping(n=n) for n in range(TOTAL)])

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.crash_worker",
            redis_target.url,
            "1" if redis_target.cluster else "0",
            unique_prefix,
            "doomed",
        ],
        cwd=ROOT,
    )
    try:

        async def mid_second_batch():
            assert proc.poll() is None, "crash worker exited early"
            return int(await client.hlen(calls_key)) >= 75  # batch 50..99 in flight, unacked

        await wait_for(mid_second_batch, 30, "the worker to be mid-batch")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    keys = route.keys()
    stranded = await client.xpending_range(
        keys.stream, keys.group, min="-", max="+", count=1000, consumername="doomed"
    )
    assert stranded, "the killed worker should have died holding entries"

    async def handle(msg, ctx):
        await client.hincrby(calls_key, str(msg.payload.n), 1)

    metrics = StreamMetrics(CollectorRegistry())
    rescuer = Worker(
        client, settings, route, codec, handler=handle, consumer="rescuer", middleware=[metrics]
    )

    async def all_done():
        return int(await client.hlen(calls_key)) == TOTAL and not await client.xpending_range(
            keys.stream, keys.group, min="-", max="+", count=1
        )

    await run_until(rescuer, all_done, 60, "every entry handled after the crash")
    calls = {int(k): int(v) for k, v in (await client.hgetall(calls_key)).items()}
    assert sorted(calls) == list(range(TOTAL))  # none lost
    redelivered = sum(calls.values()) - TOTAL
    assert redelivered >= 1  # the handled-but-unacked part of the killed batch
    assert metrics.claimed.labels("work")._value.get() == len(stranded)
    assert redelivered <= len(stranded)
    await client.aclose()


async def test_a_worker_rides_out_a_redis_crash_and_aof_keeps_every_entry(
    redis_factory, unique_prefix, caplog
):
    """Redis (AOF, appendfsync always) is SIGKILLed under a running worker and started
    again on the same port and data: the worker backs off, resumes by itself, takes
    back what it had pending, and every entry is handled (some twice, none lost)."""
    from collections import Counter

    from tests.conftest import RedisTarget

    server = redis_factory(extra=["--appendonly", "yes", "--appendfsync", "always"])
    settings = fast_settings(
        RedisTarget(server.url, False),
        unique_prefix,
        connect_retries=1,
        connect_backoff_max_ms=50,
        socket_timeout_ms=500,
    )
    client = connect(settings)
    codec = Codec([Ping])
    route = Route(unique_prefix, "work")
    keys = route.keys()
    await Producer(client, codec).publish(route, [Ping(n=n) for n in range(TOTAL)])
    seen: Counter[int] = Counter()

    async def handle(msg, ctx):
        seen[msg.payload.n] += 1
        await asyncio.sleep(0.002)

    worker = Worker(client, settings, route, codec, handler=handle, consumer="survivor")
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: len(seen) >= TOTAL // 4, 20, "a quarter handled")
        server.kill()
        during = len(seen)
        await wait_for(lambda: "retrying with backoff" in caplog.text, 20, "the outage noticed")
        server.start()

        async def all_done() -> bool:
            assert not task.done(), "the worker gave up"
            try:
                pending = (await client.xpending(keys.stream, keys.group))["pending"]
            except Exception:  # still reconnecting
                return False
            return len(seen) == TOTAL and pending == 0

        await wait_for(all_done, 60, "every entry handled after the restart")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
        await client.aclose()
    assert set(seen) == set(range(TOTAL))
    assert during < TOTAL, "the crash happened mid-run"
    assert "Redis is back" in caplog.text
    redone = sum(c - 1 for c in seen.values())
    assert redone <= settings.batch_size, "only in-flight work is redone"
