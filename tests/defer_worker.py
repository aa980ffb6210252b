"""A worker process for the waiting tests: stage ``work`` (Ping payloads) behind a
shared rate limit. Each entry reserves its own slot once (kept in the hash
``{prefix}:slots``, so it survives the process) and defers until that slot's time;
at its slot it is "sent": ``{prefix}:sent`` counts sends per ``n``, and
``{prefix}:seen`` keeps the largest ``attempt``/``deliveries`` a send saw. Stops
gracefully on SIGTERM.

Usage: python -m tests.defer_worker URL CLUSTER(0|1) PREFIX CONSUMER RATE_PER_S [JSON]
JSON: StreamSettings overrides on top of tests.support.FAST.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

from streams.connection import connect
from streams.errors import Defer
from streams.message import Codec
from streams.producer import Route
from streams.ratelimit import SharedRateLimiter
from streams.worker import Worker, run_until_signal
from tests.support import Ping, fast_settings


class _Target:
    def __init__(self, url: str, cluster: bool) -> None:
        self.url, self.cluster = url, cluster


async def main(
    url: str, cluster: bool, prefix: str, consumer: str, rate: float, overrides: dict[str, Any]
) -> None:
    settings = fast_settings(_Target(url, cluster), prefix, **overrides)
    client = connect(settings)
    route = Route(prefix, "work")
    limiter = SharedRateLimiter(client, route.keys().ratelimit("send"), rate, url=url)
    slots, sent, seen = f"{prefix}:slots", f"{prefix}:sent", f"{prefix}:seen"

    async def handle(msg: Any, ctx: Any) -> None:
        n = str(msg.payload.n)
        stored = await client.hget(slots, n)
        if stored is None:
            at = time.time() + await limiter.reserve()
            await client.hset(slots, n, repr(at))
        else:
            at = float(stored)
        left = at - time.time()
        if left > 0.002:
            raise Defer("waiting for its rate slot", delay_ms=max(1, int(left * 1000)))
        await client.hincrby(sent, n, 1)
        for name, value in (("attempt", msg.envelope.attempt), ("deliveries", msg.deliveries)):
            old = await client.hget(seen, f"{n}:{name}")
            if old is None or int(old) < value:
                await client.hset(seen, f"{n}:{name}", value)

    worker = Worker(client, settings, route, Codec([Ping]), handler=handle, consumer=consumer)
    try:
        await run_until_signal(worker)
    finally:
        await client.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    args = sys.argv[1:]
    opts = json.loads(args[5]) if len(args) > 5 else {}
    asyncio.run(main(args[0], args[1] == "1", args[2], args[3], float(args[4]), opts))
