"""One stage of a four-stage chain named like the pipeline's stages (so their keys
sit where the pipeline's do on a cluster), as a worker process for cluster fault
tests. Each handled entry sleeps DELAY_S, is passed on to NEXT (none for the last
stage) and logged as ``n unix_time`` in ``LOGDIR/STAGE-PID.log``, so the test sees
every stage's progress and every duplicate, whatever state Redis is in. Settings
come from TRACKSTREAM_* like any worker; it runs until SIGTERM.
Usage: python -m tests.chain_worker STAGE NEXT|- LOGDIR DELAY_S"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path

from streams.connection import connect, probe
from streams.message import Codec
from streams.producer import Route
from streams.settings import StreamSettings
from streams.worker import Worker, run_until_signal
from tests.support import Ping


async def main(stage: str, nxt: str, logdir: str, delay_s: float) -> None:
    settings = StreamSettings.build()  # from the environment
    await probe(settings)
    client = connect(settings)
    log = (Path(logdir) / f"{stage}-{os.getpid()}.log").open("a", buffering=1)
    downstream = Route(settings.prefix, nxt) if nxt != "-" else None

    async def handle(msg, ctx):  # type: ignore[no-untyped-def]
        await asyncio.sleep(delay_s)
        if downstream is not None:
            ctx.publish(downstream, msg.payload)
        log.write(f"{msg.payload.n} {time.time():.3f}\n")

    worker = Worker(client, settings, Route(settings.prefix, stage), Codec([Ping]), handler=handle)
    try:
        await run_until_signal(worker)
    finally:
        log.close()


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
