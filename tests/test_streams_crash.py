"""Crash recovery with a real worker process killed by SIGKILL mid-batch."""

from __future__ import annotations

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
