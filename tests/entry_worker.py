"""A worker process for the entry-side tests. It consumes stage ``work`` (Ping and
Stamp payloads) and, for every message its handler finishes, publishes an Echo to
stage ``out`` saying which consumer handled which ``n`` and how many times this
process's handler had seen that ``n``. Stops gracefully on SIGTERM.

Usage: python -m tests.entry_worker URL PREFIX CONSUMER [JSON]
JSON: {"settings": {...StreamSettings overrides...}, "sleep_ms": 0}
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections import Counter
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from schemas.events import UTCDateTime
from streams.connection import connect
from streams.message import Codec
from streams.producer import Route
from streams.settings import StreamSettings
from streams.worker import Worker, run_until_signal
from tests.support import Ping


class Stamp(BaseModel):
    """A payload with a time normalised to UTC, as the pipeline's events have."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    TYPE: ClassVar[str] = "test.stamp"
    VERSION: ClassVar[int] = 1
    n: int
    observed_at: UTCDateTime


class Echo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    TYPE: ClassVar[str] = "test.echo"
    VERSION: ClassVar[int] = 1
    n: int
    call: int
    consumer: str


def codec(max_bytes: int = 512 * 1024) -> Codec:
    return Codec([Ping, Stamp, Echo], max_bytes=max_bytes)


async def main(url: str, prefix: str, consumer: str, options: dict[str, Any]) -> None:
    settings = StreamSettings.build(redis_url=url, prefix=prefix, **options.get("settings", {}))
    client = connect(settings)
    sleep_s = options.get("sleep_ms", 0) / 1000
    out = Route(prefix, "out")
    calls: Counter[int] = Counter()

    async def handle(msg: Any, ctx: Any) -> None:
        n = msg.payload.n
        calls[n] += 1
        if sleep_s:
            await asyncio.sleep(sleep_s)
        ctx.publish(out, Echo(n=n, call=calls[n], consumer=consumer))

    worker = Worker(
        client,
        settings,
        Route(prefix, "work"),
        codec(settings.max_message_bytes),
        handler=handle,
        consumer=consumer,
    )
    try:
        await run_until_signal(worker)
    finally:
        await client.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], opts))
