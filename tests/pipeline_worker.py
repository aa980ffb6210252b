"""A real stage worker in its own process, for SIGKILL tests: the pipeline's own
worker for STAGE, throttled by a middleware that sleeps before each batch so a test
can kill it mid-run. Settings come from TRACKSTREAM_* like any worker.
Usage: python -m tests.pipeline_worker STAGE CONSUMER DELAY_S

Test knobs (environment): TS_TEST_CLOCK="ISO-START,SPEED" runs the pipeline on an
accelerated clock (SPEED 0: stopped at START); TS_TEST_GEOCODER=offline uses the real
offline geocoder instead of the fixed stand-in."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from datetime import datetime
from typing import Any

from processors.clock import AcceleratedClock, system_clock
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
    if level := os.environ.get("TS_TEST_LOG_LEVEL"):
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s")
    streams, app = load()
    clock: Any = system_clock
    if spec := os.environ.get("TS_TEST_CLOCK"):
        start, speed = spec.split(",")
        clock = AcceleratedClock(float(speed), datetime.fromisoformat(start))
    offline = os.environ.get("TS_TEST_GEOCODER") == "offline"
    pipeline = Pipeline(streams, app, clock=clock, geocoder=None if offline else FixedGeocoder())
    pipeline.middleware.append(Throttle(delay_s))
    await pipeline.worker(stage, consumer=consumer).run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
