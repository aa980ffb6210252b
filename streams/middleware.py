"""Hooks around handling, so stages hold domain logic only.

``around_batch``/``around_message`` wrap the handler like ``call_next`` middleware
(outermost first); the ``on_*`` hooks observe outcomes. Every method is a no-op by
default: subclass and override what you need. Metrics and logging live here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from streams.message import Message

log = logging.getLogger("streams")

BatchCall = Callable[[Sequence[Message[Any]]], Awaitable[None]]
MessageCall = Callable[[Message[Any]], Awaitable[None]]


class Middleware:
    async def around_batch(
        self, stage: str, batch: Sequence[Message[Any]], call_next: BatchCall
    ) -> None:
        await call_next(batch)

    async def around_message(self, stage: str, msg: Message[Any], call_next: MessageCall) -> None:
        await call_next(msg)

    def on_acked(self, stage: str, count: int) -> None: ...

    def on_failed(
        self, stage: str, msg: Message[Any], exc: BaseException, category: str
    ) -> None: ...

    def on_retry(self, stage: str, msg: Message[Any], delay_ms: int) -> None: ...

    def on_deferred(self, stage: str, msg: Message[Any], delay_ms: int, reason: str) -> None: ...

    def on_dead_letter(self, stage: str, msg: Message[Any], category: str, error: str) -> None: ...

    def on_claimed(self, stage: str, count: int) -> None: ...

    def on_group_recreated(self, stage: str, stream: str) -> None: ...

    def on_backlog(self, stage: str, pending: int, lag: int | None) -> None: ...

    def on_heartbeat_failed(self, stage: str, consumer: str, exc: BaseException) -> None: ...

    def on_redis_error(self, stage: str, kind: str, reason: str) -> None:
        """A step failed on Redis; ``kind`` is transient, group-missing or bug
        (see :mod:`streams.faults`), ``reason`` a short label."""


class LoggingMiddleware(Middleware):
    """Structured-enough logs for failures, dead letters and recoveries."""

    def on_failed(self, stage: str, msg: Message[Any], exc: BaseException, category: str) -> None:
        log.warning(
            "%s: entry %s failed (%s, delivery %d): %s",
            stage,
            msg.entry_id,
            category,
            msg.deliveries,
            exc,
        )

    def on_deferred(self, stage: str, msg: Message[Any], delay_ms: int, reason: str) -> None:
        log.debug("%s: entry %s deferred %d ms: %s", stage, msg.entry_id, delay_ms, reason)

    def on_dead_letter(self, stage: str, msg: Message[Any], category: str, error: str) -> None:
        log.error("%s: entry %s dead-lettered (%s): %s", stage, msg.entry_id, category, error)

    def on_claimed(self, stage: str, count: int) -> None:
        log.info("%s: claimed %d idle entries from other consumers", stage, count)

    def on_group_recreated(self, stage: str, stream: str) -> None:
        log.error(
            "%s: consumer group on %s was missing (Redis restarted or flushed?); recreated it at "
            "0 so nothing still in the stream is skipped",
            stage,
            stream,
        )


class TimingMiddleware(Middleware):
    """Logs batches slower than ``slow_ms``."""

    def __init__(self, slow_ms: int = 5_000) -> None:
        self.slow_ms = slow_ms

    async def around_batch(
        self, stage: str, batch: Sequence[Message[Any]], call_next: BatchCall
    ) -> None:
        start = time.perf_counter()
        await call_next(batch)
        took_ms = (time.perf_counter() - start) * 1000
        if took_ms > self.slow_ms:
            log.warning("%s: batch of %d took %.0f ms", stage, len(batch), took_ms)
