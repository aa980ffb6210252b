"""A real stage worker in its own process, for SIGKILL tests: the pipeline's own
worker for STAGE, throttled by a middleware that sleeps before each batch so a test
can kill it mid-run. Settings come from TRACKSTREAM_* like any worker.
Usage: python -m tests.pipeline_worker STAGE CONSUMER DELAY_S"""

from __future__ import annotations

import asyncio
import sys

from processors.config import load
from processors.pipeline import Pipeline
from streams.middleware import Middleware
from tests.pipeline_support import FixedGeocoder


class Throttle(Middleware):
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    async def around_batch(self, stage, batch, call_next):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.delay_s)
        await call_next(batch)


async def main(stage: str, consumer: str, delay_s: float) -> None:
    streams, app = load()
    pipeline = Pipeline(streams, app, geocoder=FixedGeocoder())
    pipeline.middleware.append(Throttle(delay_s))
    await pipeline.worker(stage, consumer=consumer).run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
