"""A worker process for crash tests: handles Ping entries slowly, one at a time,
counting every handler call in Redis (hash ``{prefix}:calls``) so the test can see
progress and redeliveries across processes. Usage:
python -m tests.crash_worker URL CLUSTER(0|1) PREFIX CONSUMER"""

from __future__ import annotations

import asyncio
import sys

from streams.connection import connect
from streams.message import Codec
from streams.producer import Route
from streams.worker import Worker
from tests.support import Ping, fast_settings


class _Target:
    def __init__(self, url: str, cluster: bool) -> None:
        self.url, self.cluster = url, cluster


async def main(url: str, cluster: bool, prefix: str, consumer: str) -> None:
    settings = fast_settings(_Target(url, cluster), prefix, batch_size=50, concurrency=1)
    client = connect(settings)
    calls_key = f"{prefix}:calls"

    async def handle(msg, ctx):
        await client.hincrby(calls_key, str(msg.payload.n), 1)
        await asyncio.sleep(0.01)

    await Worker(
        client, settings, Route(prefix, "work"), Codec([Ping]), handler=handle, consumer=consumer
    ).run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]))
