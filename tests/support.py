"""Shared test helpers: fast settings, a tiny payload, waiting for conditions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from streams.settings import StreamSettings

FAST = dict(
    block_ms=100,
    claim_idle_ms=1_500,
    claim_interval_ms=200,
    handler_timeout_ms=1_000,
    heartbeat_interval_ms=100,
    consumer_dead_after_ms=1_000,
    retry_base_ms=10,
    retry_max_ms=50,
    shutdown_grace_ms=2_000,
)


class Ping(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    TYPE: ClassVar[str] = "test.ping"
    VERSION: ClassVar[int] = 1
    n: int


def fast_settings(target: Any, prefix: str, **overrides: Any) -> StreamSettings:
    values: dict[str, Any] = {**FAST, **overrides}
    return StreamSettings.build(
        redis_url=target.url, redis_cluster=target.cluster, prefix=prefix, **values
    )


async def wait_for(
    condition: Callable[[], Awaitable[bool] | bool], timeout_s: float = 20, what: str = "condition"
) -> None:
    """Poll ``condition`` until true, failing after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


async def run_until(
    worker: Any,
    condition: Callable[[], Awaitable[bool] | bool],
    timeout_s: float = 20,
    what: str = "",
) -> None:
    """Run a worker until ``condition`` holds, then stop it gracefully."""
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: task.done() or condition(), timeout_s, what or "worker condition")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
