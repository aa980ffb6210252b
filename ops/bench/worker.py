"""One real stage worker for ``trackstream bench --pipeline``, in its own process.

The pipeline's own worker for STAGE (settings from ``TRACKSTREAM_*`` like any worker),
plus what a measurement needs: it loads what the stage loads lazily (the offline
geocoder's data, the geofence index) before it reports ready, and reads nothing until
the benchmark opens its gate, so start-up is not measured.

Usage: python -m ops.bench.worker STAGE CONSUMER READY_KEY GO_KEY
"""

from __future__ import annotations

import asyncio
import logging
import sys

from processors import topology
from processors.config import load
from processors.pipeline import Pipeline
from streams.worker import run_until_signal


async def main(stage: str, consumer: str, ready_key: str, go_key: str) -> None:
    streams, app = load()
    pipeline = Pipeline(streams, app)
    try:
        if stage == topology.GEOCODE:
            await pipeline.geocoder.reverse([(51.9, 4.4)])
        if stage == topology.GEOFENCE:
            await pipeline.stage(stage).index()
        worker = pipeline.worker(stage, consumer=consumer)
        inner = worker.gate
        opened = False

        async def gate() -> None:
            nonlocal opened
            while not opened and not worker.stop_event.is_set():
                opened = bool(await pipeline.client.exists(go_key))
                if not opened:
                    await asyncio.sleep(0.01)
            if inner is not None:
                await inner()

        worker.gate = gate
        await pipeline.client.sadd(ready_key, f"{stage}/{consumer}")
        await run_until_signal(worker)
    finally:
        await pipeline.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    asyncio.run(main(*sys.argv[1:5]))
