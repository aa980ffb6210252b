"""Benchmark: a 4-stage pass-through pipeline through the runtime vs. raw redis-py loops.

Each stage reads a batch from its stream, publishes every entry to the next stage's
stream and acks; the last stage only acks. Three runs on the same Redis, same data:

- ``raw-batched``: the baseline ratios are quoted against: a hand-written loop (sync
  redis-py + hiredis), ``XREADGROUP COUNT`` per stage in turn, then one pipeline of
  every ``XADD`` plus the ``XACK`` per batch. What careful hand-written code reaches.
- ``raw``: the minimal loop: one ``XADD`` round trip per entry, one ``XACK`` per batch.
- ``runtime``: four :class:`~streams.worker.Worker` in one asyncio process, each
  decoding and validating the payload, with a batch handler that publishes through
  the outbox (pipelined, written before the ack).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import redis
from pydantic import BaseModel, ConfigDict

from streams.connection import connect
from streams.message import Codec, Message
from streams.producer import Producer, Route
from streams.settings import StreamSettings
from streams.worker import Worker

STAGES = ("s1", "s2", "s3", "s4")


class BenchReport(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    TYPE: ClassVar[str] = "bench.report"
    VERSION: ClassVar[int] = 1
    tracker_id: str
    observed_at: datetime
    lat: float
    lon: float
    accuracy_m: float


@dataclass(frozen=True)
class Result:
    name: str
    messages: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def _payloads(n: int) -> list[BenchReport]:
    now = datetime.now(UTC)
    return [
        BenchReport(
            tracker_id=f"T{i % 1000:05d}",
            observed_at=now,
            lat=51.9 + i * 1e-6,
            lon=4.4,
            accuracy_m=12.5,
        )
        for i in range(n)
    ]


async def _seed(settings: StreamSettings, prefix: str, n: int) -> None:
    client = connect(settings)
    codec = Codec([BenchReport])
    producer = Producer(client, codec)
    payloads = _payloads(n)
    for i in range(0, n, 1000):
        await producer.publish(Route(prefix, STAGES[0]), payloads[i : i + 1000])
    for stage in STAGES:
        keys = Route(prefix, stage).keys()
        for stream in keys.streams():
            await client.xgroup_create(stream, keys.group, id="0", mkstream=True)
    await client.aclose()


def run_raw(settings: StreamSettings, prefix: str, n: int, batch: int, pipelined: bool) -> Result:
    asyncio.run(_seed(settings, prefix, n))
    r = redis.Redis.from_url(settings.redis_url)
    keys = [Route(prefix, s).keys() for s in STAGES]
    done = 0
    start = time.perf_counter()
    while done < n:
        for i, k in enumerate(keys):
            reply: Any = r.xreadgroup(k.group, "raw", {k.stream: ">"}, count=batch)
            if not reply:
                continue
            entries = reply[0][1]
            ids = [e[0] for e in entries]
            last = i == len(keys) - 1
            if pipelined:
                pipe = r.pipeline(transaction=False)
                if not last:
                    for _, fields in entries:
                        pipe.xadd(keys[i + 1].stream, fields)
                pipe.xack(k.stream, k.group, *ids)
                pipe.execute()
            else:
                if not last:
                    for _, fields in entries:
                        r.xadd(keys[i + 1].stream, fields)
                r.xack(k.stream, k.group, *ids)
            if last:
                done += len(ids)
    elapsed = time.perf_counter() - start
    r.close()
    return Result("raw-batched" if pipelined else "raw", n, elapsed)


async def run_runtime(settings: StreamSettings, prefix: str, n: int) -> Result:
    await _seed(settings, prefix, n)
    client = connect(settings)
    codec = Codec([BenchReport])
    routes = [Route(prefix, s) for s in STAGES]

    def forward_to(nxt: Route | None) -> Any:
        async def handle(batch: list[Message[BenchReport]], ctx: Any) -> None:
            if nxt is not None:
                for m in batch:
                    ctx.publish(nxt, m.payload)

        return handle

    workers = [
        Worker(
            client,
            settings,
            r,
            codec,
            batch_handler=forward_to(routes[i + 1] if i < 3 else None),
            consumer=f"bench-{i}",
        )
        for i, r in enumerate(routes)
    ]
    start = time.perf_counter()
    tasks = [asyncio.create_task(w.run()) for w in workers]
    last = workers[-1]
    while last.handled < n:
        if any(t.done() for t in tasks):
            for t in tasks:
                if t.done():
                    t.result()
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - start
    for w in workers:
        w.stop()
    await asyncio.gather(*tasks)
    await client.aclose()
    return Result("runtime", n, elapsed)


def run_bench(
    redis_url: str,
    n: int = 20_000,
    batch: int = 200,
    progress: Any = print,
    rounds: int = 3,
) -> list[Result]:
    """Each loop ``rounds`` times, interleaved (so drift in machine load hits all three
    alike); per loop the median round is returned, in the order raw-batched, raw,
    runtime."""
    settings = StreamSettings.build(redis_url=redis_url, batch_size=batch, block_ms=5)
    stamp = time.time_ns() % 10**9
    runs: dict[str, list[Result]] = {"raw-batched": [], "raw": [], "runtime": []}
    for r in range(rounds):
        tag = f"{stamp}-{r}"
        progress(f"round {r + 1}/{rounds}: batched raw loop, {n} messages x {len(STAGES)} stages")
        runs["raw-batched"].append(run_raw(settings, f"bench-rawb-{tag}", n, batch, pipelined=True))
        progress(f"round {r + 1}/{rounds}: minimal raw loop ...")
        runs["raw"].append(run_raw(settings, f"bench-raw-{tag}", n, batch, pipelined=False))
        progress(f"round {r + 1}/{rounds}: runtime ...")
        runs["runtime"].append(asyncio.run(run_runtime(settings, f"bench-rt-{tag}", n)))
    return [sorted(rs, key=lambda x: x.rate)[len(rs) // 2] for rs in runs.values()]
