"""Automatic retention: every worker trims its stage's streams periodically.

Every ``trim_interval_ms`` a worker tries to take the shard's ``trim`` lease
(:class:`~streams.lock.LeaseLock`, ``lock:trim``, held for two intervals and renewed by
its holder); only the holder trims, so one process per shard does it however many
workers run. The trim is :func:`~streams.retention.safe_trim`: never below an entry a
group has not delivered or still holds pending, and never an entry younger than
``retention_ms``. The outcome is written to ``state:trim`` (JSON, with a TTL) for
``status`` and the console. A failed trim is logged and tried at the next interval;
it never stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streams.connection import Client
from streams.keys import StageKeys
from streams.lock import LeaseLock
from streams.retention import TrimResult, safe_trim
from streams.settings import StreamSettings

log = logging.getLogger("streams.trimmer")


@dataclass(frozen=True, slots=True)
class LastTrim:
    """The last automatic trim of a shard, as ``state:trim`` holds it."""

    at_ms: int
    removed: int
    by: str
    streams: dict[str, str | None]  # stream -> cut (None: nothing to trim)

    @classmethod
    def parse(cls, raw: Any) -> LastTrim | None:
        if not raw:
            return None
        try:
            d = json.loads(raw)
            return cls(int(d["at_ms"]), int(d["removed"]), str(d["by"]), dict(d["streams"]))
        except (ValueError, KeyError, TypeError):
            return None


async def last_trim(client: Client, keys: StageKeys, url: str = "") -> LastTrim | None:
    return LastTrim.parse(await client.get(keys.state("trim")))


class Trimmer:
    """Trims the given shards' streams while the worker runs."""

    def __init__(
        self, client: Client, settings: StreamSettings, shards: Sequence[StageKeys], owner: str
    ) -> None:
        self.client = client
        self.settings = settings
        self.shards = list(shards)
        self.owner = owner
        self.removed = 0
        ttl_ms = max(2 * settings.trim_interval_ms, 1_000)
        self._locks = [
            LeaseLock(client, k, "trim", ttl_ms, settings.redis_url) for k in self.shards
        ]

    async def trim_once(self) -> list[TrimResult]:
        """Trim every shard whose lease this process holds (or takes now)."""
        out: list[TrimResult] = []
        for keys, lock in zip(self.shards, self._locks, strict=True):
            if await lock.acquire() is None:
                continue  # another process trims this shard
            results = [
                await safe_trim(
                    self.client, s, keep_ms=self.settings.retention_ms, url=self.settings.redis_url
                )
                for s in keys.streams()
            ]
            removed = sum(r.removed for r in results)
            self.removed += removed
            state = {
                "at_ms": time.time_ns() // 1_000_000,
                "removed": removed,
                "by": self.owner,
                "streams": {r.stream: r.min_id for r in results},
            }
            await self.client.set(
                keys.state("trim"), json.dumps(state), px=10 * lock.ttl_ms + 3_600_000
            )
            if removed:
                log.info("%s: trimmed %d processed entries", keys.tag, removed)
            out.extend(results)
        return out

    async def run(self, done: asyncio.Event) -> None:
        """Trim every ``trim_interval_ms`` until ``done``; then hand the leases back."""
        interval_s = self.settings.trim_interval_ms / 1000
        if interval_s <= 0:
            return
        try:
            while not done.is_set():
                try:
                    await self.trim_once()
                except Exception as exc:  # a failed trim waits for the next interval
                    log.warning("automatic trim failed: %s: %s", type(exc).__name__, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), interval_s)
        finally:
            if not _cancelling():
                await self.release()

    async def release(self) -> None:
        """Hand back the leases held, so another process trims at once."""
        for lock in self._locks:
            if lock.fence is not None:
                with contextlib.suppress(Exception):
                    await lock.release()


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
