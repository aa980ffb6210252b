"""A rate limit shared by every process that uses the same key: GCRA in one Lua script.

An in-process token bucket limits one process; add workers and the external API sees
the sum. This limiter keeps the state in Redis instead, so ``rate_per_s`` holds for
all workers together, on any hosts::

    tat = max(stored TAT, now)               theoretical arrival time of the next call
    go  = tat - (burst - 1) * interval       the earliest this call may start
    TAT = tat + interval                     reserved: the next caller queues behind

Each :meth:`SharedRateLimiter.acquire` reserves its slot at once and sleeps until it
(first come, first served across processes). With ``max_wait_s`` a slot further away
than that is not reserved: :class:`~streams.errors.RateLimited` says when to come back,
so a caller inside a timeout (a handler) can defer its work instead of waiting past
it. Time comes from Redis (``TIME``), so the hosts' clocks do not matter. A
reservation abandoned by a cancelled caller is not given back: it costs one slot. The
key expires once it is idle.
"""

from __future__ import annotations

import asyncio

from streams.connection import Client
from streams.errors import RateLimited

# KEYS: limiter. ARGV: interval, burst, max wait (microseconds; -1: any).
# Returns {1, wait} when reserved, {0, wait} when the slot is too far away.
GCRA_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - (tonumber(ARGV[2]) - 1) * interval - now
if wait < 0 then wait = 0 end
if max_wait >= 0 and wait > max_wait then return {0, wait} end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new_tat),
           'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, wait}
"""


class SharedRateLimiter:
    """``rate_per_s`` calls a second across every process using ``key``, at most
    ``burst`` at once after an idle spell."""

    def __init__(
        self,
        client: Client,
        key: str,
        rate_per_s: float,
        burst: int = 1,
        url: str = "",
        *,
        max_wait_s: float | None = None,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        self.key = key
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._interval_us = max(1, round(1_000_000 / rate_per_s))
        self._max_wait_us = -1 if max_wait_s is None else round(max_wait_s * 1_000_000)
        self._url = url
        self._reserve = client.register_script(GCRA_RESERVE)

    async def reserve(self) -> float:
        """Reserve the next slot; returns the seconds until it (0: now). RateLimited,
        with nothing reserved, when it is more than ``max_wait_s`` away."""
        args = [self._interval_us, self.burst, self._max_wait_us]
        reserved, wait_us = await self._reserve(keys=[self.key], args=args)
        if not int(reserved):
            raise RateLimited(self.key, int(wait_us) / 1_000_000)
        return int(wait_us) / 1_000_000

    async def acquire(self) -> float:
        """Wait for the next slot; returns the seconds waited (RateLimited: see
        :meth:`reserve`)."""
        wait_s = await self.reserve()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        return wait_s
